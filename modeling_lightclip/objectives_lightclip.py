"""LightCLIP / CLIP-PING training objectives, each an `nn.Module` returning a dict of named loss terms.

Training code, part of the LightCLIP package: it is not saved beside the weights, so a Hub folder carries the
inference code only (`configuration_lightclip.training_objectives()` is how the model and config reach this module).
Anything beyond torch a training path needs (scipy's Hungarian solver, torch-linear-assignment) is imported lazily
inside the function that uses it.

Objectives
----------
* `InstanceContrastiveLoss` - symmetric InfoNCE over the *global* batch with LightCLIP's progressively
  softened labels.
* `SigmoidInstanceLoss` - SigLIP's pairwise sigmoid loss over the global batch (`instance_loss="sigmoid"`), with a
  learnable bias.
* `TokenAlignmentLoss` - relaxed bipartite matching between the words of a caption and the patches of its image
  (Hungarian algorithm), turned into a word<->patch contrastive objective.
* `MaskedLanguageModelling` - MLM on the shortened text tower, with a training-only fusion module that injects the
  unmasked image's multi-stage features into the masked caption by cross-attention.
* `NeighbourContrastiveLoss` - CLIP-PING: contrastive supervision from nearest neighbours (NN) and cross nearest
  neighbours (XNN) found offline with frozen pretrained unimodal encoders.
* `FrozenRelationLoss`, `CrossModalDistillationLoss`, `FeatureDistillationLoss` - what teachers know, distilled.
* `LightCLIPObjectives` - builds the enabled objectives from the config and is the one place their terms are
  computed and summed (`forward`); `LightCLIPModel.forward` calls it with the towers' outputs for the objectives
  (`TrainingFeatures`), which is also what contrastive gradient accumulation caches per micro-batch.

An objective is one `Objective` subclass: its switch, the checks of its config fields, the training targets it
reads, its card row and its terms live in the class, and `OBJECTIVES` lists the classes (CONTRIBUTING.md, "Add an
objective"). The model, the config, the collator and the model card ask this list; none names an objective.

Every term is normalised over the *global* batch (counts are all-reduced), so that with DDP's gradient averaging
the loss and gradients of N processes equal those of one process holding the whole batch.
"""

import contextlib
import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .configuration_lightclip import MIN_TEMPERATURE, require_choice, require_field


SOFT_LABEL_MODES = ("none", "uniform", "similarity")
SOFT_LABEL_SCHEDULES = ("constant", "linear", "cosine", "step")
SOFT_LABEL_SOURCES = ("student", "frozen")
SOFT_LABEL_MODALITIES = ("candidates", "both", "text")
PING_NEGATIVES = ("bank", "batch")
PING_POSITIVES = ("bank", "in_batch")
DISTILL_ENSEMBLES = ("concatenate", "mean_probabilities")


# --------------------------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_LOSS_GROUP = {}


def _loss_group():
    """A process group of its own for the losses' collectives.

    DDP all-reduces gradient buckets from autograd hooks on the default group while the backward of the gathers
    below issues reduce-scatters; on one shared group the two streams of collectives may interleave differently on
    different ranks, which deadlocks gloo. A separate communicator orders each stream on its own. Created on first
    use (every rank computes the loss, so every rank creates it, in the same order)."""
    default = dist.group.WORLD
    key = id(default)
    if key not in _LOSS_GROUP:
        _LOSS_GROUP[key] = dist.new_group(backend=dist.get_backend())
    return _LOSS_GROUP[key]


# (local rows, every rank's rows) of the objectives' call in progress (`rows_of_this_step`)
_STEP_ROWS: list = []


def batch_sizes(local: int, device=None) -> list[int]:
    """Every rank's number of rows in this step, in rank order ([local] when not distributed). Ranks may hold
    different numbers of rows (a bad sample skipped on one of them): the global batch is their concatenation.
    Inside `rows_of_this_step`, the counts it gathered for `local` rows are reused."""
    _, world = _world()
    if world == 1:
        return [int(local)]
    if _STEP_ROWS and _STEP_ROWS[-1][0] == int(local):
        return list(_STEP_ROWS[-1][1])
    parts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([int(local)], dtype=torch.long, device=device), group=_loss_group())
    return [int(p.item()) for p in parts]


@contextlib.contextmanager
def rows_of_this_step(local: int, device=None):
    """Every rank's row count gathered once for the objectives' call in progress: the gathers, row offsets and
    per-row means inside it read it instead of gathering it again (one small collective per step rather than one
    per gathered tensor)."""
    _, world = _world()
    if world > 1:
        _STEP_ROWS.append((int(local), batch_sizes(local, device)))
    try:
        yield
    finally:
        if world > 1:
            _STEP_ROWS.pop()


# (rows scored, this rank's row count, the step's cache) of a row-blocked objectives call in progress
_ROW_BLOCK: list = []


@contextlib.contextmanager
def scoring_rows(rows: slice, local: int, step_cache: dict | None = None):
    """Inside: the row-decomposable objectives (`row_decomposable = True`) score only the rows `rows` of this rank's
    `local` rows, each against every column of the global batch, and their per-row means keep the global batch's
    normaliser. The terms of the blocks of a partition of the rows then sum to the terms of the whole batch, and so
    do their gradients, while no objective holds more than `rows` x global-batch of any matrix (contrastive
    accumulation's objectives pass, computed block by block). `step_cache`: one dict shared by the blocks of a
    step, where `once_per_step` keeps what the first block computed for the whole batch."""
    _ROW_BLOCK.append((rows, int(local), step_cache if step_cache is not None else {}))
    try:
        yield
    finally:
        _ROW_BLOCK.pop()


def once_per_step(key: str, compute):
    """`compute()`, computed once per step: in a row-blocked call the first block's value is kept for the step's other
    blocks. For what is the whole batch's and carries no gradient - a matching solved on detached similarities, the
    neighbours read from a memory bank before the step writes it, a global count - so that blocks neither repeat
    the work nor see a state the step has already changed. Every rank runs the first block, so a collective inside
    `compute` stays matched across ranks."""
    if not _ROW_BLOCK:
        return compute()
    cache = _ROW_BLOCK[-1][2]
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def own_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of a per-row tensor of this rank that the objectives score: all of them, or the block of
    `scoring_rows`."""
    return tensor[_ROW_BLOCK[-1][0]] if _ROW_BLOCK else tensor


def scored(row_index: torch.Tensor) -> torch.Tensor:
    """Whether each of these local row indices is among the rows the objectives score (`own_rows`): for tensors
    indexed by batch row rather than one entry per row (MLM's masked captions)."""
    if not _ROW_BLOCK:
        return torch.ones_like(row_index, dtype=torch.bool)
    rows = _ROW_BLOCK[-1][0]
    return (row_index >= rows.start) & (row_index < rows.stop)


def first_global_row(local: int, device=None) -> int:
    """Where this rank's rows start in the step's global batch: the rows of the ranks before it."""
    rank, world = _world()
    if world == 1:
        return 0
    return sum(batch_sizes(local, device)[:rank])


def _own_global_rows(local: int, device) -> torch.Tensor:
    """The global-batch index of each of this rank's `local` rows that the objectives score (`own_rows`)."""
    return own_rows(torch.arange(local, device=device) + first_global_row(local, device))


def row_mean(per_row: torch.Tensor) -> torch.Tensor:
    """This rank's share of the mean of a per-row quantity over the global batch: the local sum times
    world / global rows, so that DDP's gradient averaging gives the global mean whatever each rank's row count
    (the plain mean when not distributed). Inside `scoring_rows`, `per_row` holds the block's rows and the
    normaliser stays the global batch's row count."""
    _, world = _world()
    if _ROW_BLOCK:
        local = _ROW_BLOCK[-1][1]
        return per_row.sum() * (world / max(sum(batch_sizes(local, per_row.device)), 1))
    if world == 1:
        return per_row.mean()
    if _STEP_ROWS and _STEP_ROWS[-1][0] == per_row.shape[0]:  # the step's row counts are known
        return per_row.sum() * (world / max(sum(_STEP_ROWS[-1][1]), 1))
    return per_row.sum() * _global_mean_normaliser(per_row.new_tensor(float(per_row.shape[0])))


LOGIT_CHUNK_ELEMENTS = 2**22  # logits held at once by `similarity_cross_entropy` (16 MiB in float32)


class _SimilarityCrossEntropy(torch.autograd.Function):
    """Forward and backward of `similarity_cross_entropy`, a block of key columns at a time (at least float32)."""

    @staticmethod
    def forward(ctx, queries, keys, targets, key_mask, temperature, columns):
        q, k = _at_least_float32(queries), _at_least_float32(keys)
        lse = q.new_full((q.shape[0],), float("-inf"))
        for start in range(0, k.shape[0], columns):
            logits = _masked_logits(q, k, key_mask, temperature, start, columns)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        target_logits = (q * k[targets]).sum(-1) / temperature
        ctx.save_for_backward(queries, keys, targets, lse, key_mask if key_mask is not None else torch.empty(0))
        ctx.temperature, ctx.columns, ctx.has_mask = temperature, columns, key_mask is not None
        return (lse - target_logits).sum()

    @staticmethod
    def backward(ctx, grad_output):
        queries, keys, targets, lse, key_mask = ctx.saved_tensors
        key_mask = key_mask if ctx.has_mask else None
        q, k, t = _at_least_float32(queries), _at_least_float32(keys), ctx.temperature
        grad_q, grad_k = torch.zeros_like(q), torch.zeros_like(k)
        for start in range(0, k.shape[0], ctx.columns):
            probs = torch.exp(_masked_logits(q, k, key_mask, t, start, ctx.columns) - lse[:, None])
            grad_q += probs @ k[start:start + ctx.columns]
            grad_k[start:start + ctx.columns] += probs.t() @ q
        grad_q -= k[targets]
        grad_k.index_add_(0, targets, -q)
        scale = grad_output.to(q.dtype) / t
        return (grad_q * scale).to(queries.dtype), (grad_k * scale).to(keys.dtype), None, None, None, None


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _masked_logits(q, k, key_mask, temperature, start, columns):
    with torch.autocast(q.device.type, enabled=False):  # at least float32 under mixed precision too
        logits = q @ k[start:start + columns].t() / temperature
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[start:start + columns], float("-inf"))
    return logits


def similarity_cross_entropy(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, temperature: float,
                             key_mask: torch.Tensor | None = None, columns: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `queries @ keys.T / temperature` (n, m) against `targets` (n,) - keys where `key_mask`
    is False are no candidates - without ever holding the (n, m) logits: they are computed `columns` keys at a time
    (default: `LOGIT_CHUNK_ELEMENTS` logits at once) in the forward pass with a running log-sum-exp, and again in the
    backward pass (a memory-bounded softmax cross-entropy, as Inf-CL tiles the contrastive loss). Token alignment's
    batch negatives score every word of a row block against every patch of the global batch: with it, their memory
    stays that of one chunk however large the batch."""
    if columns is None:
        columns = max(1, LOGIT_CHUNK_ELEMENTS // max(queries.shape[0], 1))
    return _SimilarityCrossEntropy.apply(queries, keys, targets, key_mask, float(temperature), int(columns))


def _gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """All-gather along dim 0; ranks may hold different numbers of rows (each is padded to the longest for the
    collective, and the padding dropped again)."""
    _, world = _world()
    if world == 1:
        return tensor
    sizes = batch_sizes(tensor.shape[0], tensor.device)
    longest = max(sizes)
    tensor = tensor.contiguous() if with_grad else tensor.detach().contiguous()
    padded = tensor if tensor.shape[0] == longest else torch.cat(
        [tensor, tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))])
    group = _loss_group()
    if with_grad:
        from torch.distributed import _functional_collectives as fc

        gathered = fc.all_gather_single_autograd(padded, gather_dim=0, group=group)
        gathered = fc.wait_tensor(gathered) if hasattr(fc, "wait_tensor") else gathered
        parts = gathered.split(longest)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
    if all(size == longest for size in sizes):
        return torch.cat(list(parts))
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` along dim 0 from every rank, keeping autograd.

    The backward of the functional collective sums the gradient of the gathered tensor back onto each rank's
    shard. With each rank computing its share of the loss of its local rows against the global columns (`row_mean`),
    and DDP averaging parameter gradients, the result equals the gradient of one process holding the whole batch.
    """
    return _gather(tensor, with_grad=True)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` along dim 0 from every rank, without autograd (ids, masks, bank entries)."""
    return _gather(tensor, with_grad=False)


def _global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a (detached) count over ranks."""
    _, world = _world()
    if world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=_loss_group())
    return value


def _global_mean_normaliser(count: torch.Tensor) -> torch.Tensor:
    """world / global count: multiply a local *sum* by this so DDP's averaging yields the global mean."""
    _, world = _world()
    return world / _global_sum(count.float()).clamp(min=1.0)


def _pad_to_global_length(tensor: torch.Tensor, dim: int, value) -> torch.Tensor:
    """Pad `dim` to the longest size over ranks (dynamic padding differs per rank) so it can be gathered."""
    _, world = _world()
    if world == 1:
        return tensor
    length = torch.tensor([tensor.shape[dim]], device=tensor.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX, group=_loss_group())
    missing = int(length.item()) - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [0, missing]
    return F.pad(tensor, pad, value=value)


def _gather_words(words: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Word states (B, L, d) and their mask (B, L) of the whole global batch: padded to the longest caption over
    ranks (each rank pads to its own), gathered - the states with autograd, the mask without. (B_g, L_max, ...)."""
    all_words = gather_with_grad(_pad_to_global_length(words, 1, 0.0))
    all_mask = gather_no_grad(_pad_to_global_length(word_mask, 1, False).to(torch.uint8)).bool()
    return all_words, all_mask


# --------------------------------------------------------------------------------------------------------------
# per-sample training targets
# --------------------------------------------------------------------------------------------------------------

# Every per-sample input an objective may read, travelling from the collator to `LightCLIPObjectives.forward` as one
# dict (`training_targets`): each objective takes what it needs.
TRAINING_TARGETS = {
    "teacher_image_features": "(B, D_i) teachers' image features, L2-normalised (several teachers: each scaled by "
                              "1/sqrt(T) and concatenated, so their dot products average the teachers' similarities); "
                              "frozen soft labels and relation distillation",
    "teacher_text_features": "(B, D_t) the same for captions",
    "teacher_image_embeds": "(B, D) multimodal teachers' image embeddings in their image-text space; distillation",
    "teacher_text_embeds": "(B, D) the same teachers' caption embeddings",
    "mlm_input_ids": "(B, L) a masked copy of input_ids (MLM)",
    "mlm_labels": "(B, L) MLM targets, -100 where nothing is predicted",
    "sample_ids": "(B,) training-set row of each sample (CLIP-PING's bank)",
    "image_neighbour_ids": "(B,) one image-space neighbour's row (CLIP-PING's bank), -1 for none",
    "text_neighbour_ids": "(B,) one text-space neighbour's row (CLIP-PING's bank), -1 for none",
    "ping_partner_rows": "(B,) each row's in-batch neighbour's row, -1 for none (CLIP-PING in batch)",
    "ping_partner_spaces": "(B,) the space the partner was found in: 0 image, 1 text (CLIP-PING in batch)",
    "text_tower_outputs": "(B, H) the locked text tower's pooled outputs, stored with each training row: used instead "
                          "of running the tower (`LightCLIPModel.locked_text_outputs`)",
}
TEACHER_FEATURES = ("teacher_image_features", "teacher_text_features")
# the targets that carry teacher knowledge: the teachers' features and embeddings, or neighbours found with them
TEACHER_TARGETS = {*TEACHER_FEATURES, "teacher_image_embeds", "teacher_text_embeds", "sample_ids",
                   "image_neighbour_ids", "text_neighbour_ids", "ping_partner_rows", "ping_partner_spaces"}
# the training targets the towers read (one entry per row, split with the rows into micro-batches); every other
# target is read by the objectives only, which see the whole batch
TOWER_TARGETS = ("mlm_input_ids", "mlm_labels", "text_tower_outputs")


def training_targets_from(training_targets: dict | None, keywords: dict) -> dict:
    """One dict of training targets from `training_targets` and targets given as keyword arguments; anything else is
    refused, naming the keys `forward` knows."""
    merged = dict(training_targets or {})
    for name, value in keywords.items():
        if name not in TRAINING_TARGETS:
            raise TypeError(f"LightCLIPModel.forward got an unexpected argument {name!r}; training targets are "
                            f"{sorted(TRAINING_TARGETS)}.")
        if value is not None:
            merged[name] = value
    return {key: value for key, value in merged.items() if value is not None}


# --------------------------------------------------------------------------------------------------------------
# what the towers hand the objectives
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingFeatures:
    """Everything the training objectives read from the towers for one batch: the tensors they differentiate through
    (the normalised embeddings; the token alignment's patch tokens and word states; MLM's fused masked-caption states)
    and the masks and labels that go with them. Fields an objective that is off does not need stay None.

    The objectives see the towers only through this object, so the loss of a batch is a function of its features:
    contrastive gradient accumulation (`training/accumulation.py`) computes the features of each micro-batch without
    a graph, concatenates them, takes the loss and its gradient with respect to them once for the whole batch, then
    re-runs each micro-batch's towers and back-propagates its slice of that gradient.

    Args:
        image_embeds, text_embeds: (B, D) L2-normalised projected embeddings.
        image_tokens: (B, P, Cv) patch tokens of the stage the token alignment reads; token alignment only.
        text_tokens: (B, L, Ct) the text tower's token states; token alignment only.
        word_mask: (B, L) True at real words; token alignment only.
        masked_states: (R, L, Ct) the text tower's states of the masked captions, fused with their images; MLM
            only, None while MLM has not started (`mlm_start`).
        mlm_labels: (R, L) MLM targets of those rows (-100 where nothing is predicted).
        mlm_rows: (R,) which rows of the batch the masked captions belong to.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    image_tokens: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    word_mask: torch.Tensor | None = None
    masked_states: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None
    mlm_rows: torch.Tensor | None = None

    # the fields a gradient flows back through into the towers
    DIFFERENTIABLE = ("image_embeds", "text_embeds", "image_tokens", "text_tokens", "masked_states")
    # the fields with one entry per masked caption (R rows) rather than one per batch row (B rows)
    PER_MASKED_ROW = ("masked_states", "mlm_labels", "mlm_rows")

    @property
    def num_rows(self) -> int:
        return self.image_embeds.shape[0]

    @classmethod
    def concatenate(cls, parts: list["TrainingFeatures"]) -> "TrainingFeatures":
        """The features of consecutive chunks of one batch, as the features of the whole batch: every field
        concatenated along rows, each chunk's masked-caption rows shifted by the rows before it."""
        values = {}
        offset = 0
        rows = []
        for part in parts:
            if part.mlm_rows is not None:
                rows.append(part.mlm_rows + offset)
            offset += part.num_rows
        for item in fields(cls):
            name = item.name
            present = [getattr(part, name) for part in parts if getattr(part, name) is not None]
            if present and len(present) != len(parts) and name not in cls.PER_MASKED_ROW:
                raise ValueError(f"TrainingFeatures.{name} is present in some chunks of the batch and not in others.")
            if name == "mlm_rows":
                values[name] = torch.cat(rows) if rows else None
            else:
                values[name] = torch.cat(present) if present else None
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------
# the objective unit
# --------------------------------------------------------------------------------------------------------------


def require_temperature(config, name: str) -> None:
    require_field(name, getattr(config, name), lambda v: v >= MIN_TEMPERATURE,
                  f"must be finite and at least {MIN_TEMPERATURE:g} (smaller makes the loss overflow)")


_TEACHER_HINT = ("train on a reinforced copy of the data (`lightclip-reinforce`), or let the trainer build one with "
                 "--teacher_features auto")


@dataclass
class TowerDims:
    """The tower widths an objective's own layers are built for: the token alignment's stage (`vision_token`), every
    image stage (`vision_stages`, MLM's fusion) and the text tower (`text`)."""

    vision_token: int
    vision_stages: list
    text: int


@dataclass
class ObjectiveStep:
    """What one objectives call hands every objective besides the features and the targets."""

    config: object
    logit_scale: torch.Tensor            # the exp'ed scale
    logit_bias: torch.Tensor | None      # the sigmoid loss's learnable bias (None for softmax)
    soft_label_alpha: float              # softening weight of the instance targets (0 outside training)
    word_embeddings: torch.Tensor | None  # the text tower's word embeddings: the one hook into a tower (MLM's decoder)


class Objective(nn.Module):
    """One training objective. A subclass declares what it is and `OBJECTIVES` lists it; everything that needs to
    know about objectives (the config's checks and loss weights, `LightCLIPObjectives`, the collator, the model
    card, the teacher set-up) asks the classes in that list.

    Class attributes:
        slot: its attribute on `LightCLIPObjectives` (its parameters save as `objectives.<slot>.*`); alternatives
            of one objective (softmax or sigmoid instance loss) share a slot and are never on together.
        weights: {term: config field of its weight}; a weight of 0 switches the term off.
        targets: the per-sample training targets it reads (`TRAINING_TARGETS`).
        config_fields: its config group, the `LightCLIPConfig` fields that belong to it (its weights among them);
            every field of the config belongs to one objective or to the model (`LightCLIPConfig.model_fields`).
        title: what cards and messages call it.
        training_only: computed in training only (teacher targets and neighbours exist for training rows only).
        row_decomposable: its terms are means over the global batch's rows of a function of the row and the
            batch's columns (`scoring_rows`): contrastive accumulation computes them a block of rows at a time.
    """

    slot = ""
    weights: dict = {}
    title = ""
    targets: tuple = ()  # the training targets it reads (`reads`), when they do not depend on the config
    config_fields: tuple = ()  # its config group: the LightCLIPConfig fields only it reads (weights included)
    missing_fix = _TEACHER_HINT  # the fix named when a training batch lacks a target it requires
    training_only = True
    row_decomposable = False

    @classmethod
    def enabled(cls, config) -> bool:
        """Whether `config` switches it on: by default, a weight above 0."""
        return any(getattr(config, field, 0.0) > 0 for field in cls.weights.values())

    @classmethod
    def validate(cls, config) -> None:
        """Check its config fields (on or off), each failure naming the field and the fix."""

    @classmethod
    def reads(cls, config) -> tuple:
        """The per-sample training targets (`TRAINING_TARGETS`) it reads: the collator builds them."""
        return cls.targets

    @classmethod
    def required(cls, config) -> tuple:
        """The targets a training step cannot do without (checked before `compute`)."""
        return cls.reads(config) if cls.training_only else ()

    @classmethod
    def build(cls, config, dims: TowerDims) -> "Objective":
        return cls()

    @classmethod
    def named(cls, config) -> str:
        """The objective and its switch, for messages."""
        return f"{cls.title} ({' / '.join(cls.weights.values())})"

    @classmethod
    def switch_off(cls, config) -> str:
        return " ".join(f"--{field} 0" for field in cls.weights.values())

    @classmethod
    def summary(cls, config) -> str:
        """Its words in the card's sentence naming what the model was trained with."""
        return cls.title

    @classmethod
    def settings(cls, config) -> dict:
        """Its config group's values."""
        return {name: getattr(config, name, None) for name in cls.config_fields}

    @classmethod
    def card_row(cls, config) -> tuple:
        """(name, weight, settings): its row of the card's objectives table."""
        weights = set(cls.weights.values())
        return (cls.title, " / ".join(f"{getattr(config, field, 0.0)}" for field in cls.weights.values()),
                ", ".join(f"{name} {value}" for name, value in cls.settings(config).items() if name not in weights))

    def compute(self, features: "TrainingFeatures", step: ObjectiveStep, targets: dict) -> dict[str, torch.Tensor]:
        """Its named, unweighted terms for one batch."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------
# instance level
# --------------------------------------------------------------------------------------------------------------


def soft_label_alpha(progress: float, alpha_max: float, schedule: str) -> float:
    """Softening weight alpha_t at training progress `progress` in [0, 1]: rises from 0 to `alpha_max`."""
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return alpha_max
    if schedule == "linear":
        return alpha_max * p
    if schedule == "cosine":
        return alpha_max * 0.5 * (1.0 - math.cos(math.pi * p))
    if schedule == "step":
        return alpha_max if p >= 0.5 else 0.0
    raise ValueError(f"unknown soft_label_schedule {schedule!r}")


def soft_targets(
    anchor_similarity: torch.Tensor | None, positives: torch.Tensor, num_columns: int, alpha: float, mode: str,
    temperature: float,
) -> torch.Tensor:
    """Targets (1 - alpha) * one-hot + alpha * q, with q spread over the negatives of each row.

    Args:
        anchor_similarity: (rows, columns) detached intra-modal similarity between each row's positive and every
            column ("similarity" mode); ignored in "uniform" mode.
        positives: (rows,) column index of each row's positive.
        num_columns: number of candidate columns (global batch size).
        alpha: softening weight; 0 gives one-hot targets.
        mode: "none", "uniform" or "similarity".
        temperature: softmax temperature over `anchor_similarity`.
    """
    rows = positives.shape[0]
    device = positives.device
    one_hot = F.one_hot(positives, num_columns).float()
    if mode == "none" or alpha <= 0.0 or num_columns < 2:
        return one_hot
    positive_mask = one_hot.bool()
    if mode == "uniform":
        q = torch.full((rows, num_columns), 1.0 / (num_columns - 1), device=device)
    elif mode == "similarity":
        logits = anchor_similarity.float() / temperature
        q = logits.masked_fill(positive_mask, float("-inf")).softmax(dim=-1)
    else:
        raise ValueError(f"unknown soft_label_mode {mode!r}")
    q = q.masked_fill(positive_mask, 0.0)
    return (1.0 - alpha) * one_hot + alpha * q


class InstanceLoss(Objective):
    """What the two instance losses share: always on (weight 1), one of them by `config.instance_loss`, computed in
    evaluation too, row-decomposable."""

    slot, training_only, row_decomposable = "instance", False, True
    form = ""  # the `instance_loss` value that picks it

    @classmethod
    def enabled(cls, config) -> bool:
        return config.instance_loss == cls.form


class InstanceContrastiveLoss(InstanceLoss):
    """Symmetric InfoNCE over the global batch with progressively softened labels (LightCLIP, instance level).

    Each rank scores its local rows against the columns of every rank (gathered with autograd); targets of local
    row i point at its own pair's global column (the rows of the ranks before it, plus i). With `alpha > 0`, a share `alpha` of each row's target mass moves
    from the positive onto the negatives:

    * ``"uniform"``: evenly over the negatives (label smoothing restricted to negatives);
    * ``"similarity"``: by a softmax over the *detached* intra-modal similarity between the row's positive and each
      negative, measured in the candidates' modality (image->text rows use text-text similarity, text->image rows
      image-image similarity). Negatives that look like the positive are the likeliest false negatives of web
      captions, so they receive most of the mass. The similarity is detached so the targets never pull the
      encoders toward making everything alike.

    The similarity comes from the student's own embeddings (`source="student"`) or from frozen pretrained unimodal
    encoders (`source="frozen"`, features passed in per batch): a student trained from scratch has no idea early in
    training which negatives look alike, while the frozen encoders do from the first step; their neighbourhood
    structure is distilled into the student through the targets.
    """

    form, title = "softmax", "soft labels from the teachers"
    config_fields = ("soft_label_mode", "soft_label_max", "soft_label_schedule", "soft_label_temperature",
                     "soft_label_source", "soft_label_modality")

    @classmethod
    def validate(cls, config) -> None:
        require_temperature(config, "soft_label_temperature")
        require_field("soft_label_max", config.soft_label_max, lambda v: True, "must be a finite number")
        for name, choices in (("soft_label_mode", SOFT_LABEL_MODES), ("soft_label_schedule", SOFT_LABEL_SCHEDULES),
                              ("soft_label_source", SOFT_LABEL_SOURCES),
                              ("soft_label_modality", SOFT_LABEL_MODALITIES)):
            require_choice(name, getattr(config, name), choices)
        if not 0.0 <= config.soft_label_max < 1.0:
            raise ValueError(f"soft_label_max={config.soft_label_max}: must lie in [0, 1).")
        if config.uses_sigmoid_loss and cls.softens(config):
            raise ValueError("soft labels (soft_label_mode) move a softmax's target mass from the positive onto the "
                             "negatives; the sigmoid loss has no such mass to move (each pair is its own binary "
                             "problem). Use --instance_loss softmax, or --soft_label_mode none with --instance_loss "
                             "sigmoid (relation distillation still works with it).")

    @staticmethod
    def softens(config) -> bool:
        """Whether the targets are softened (LightCLIP's soft labels)."""
        return config.soft_label_mode != "none" and config.soft_label_max > 0

    @classmethod
    def softens_from_teachers(cls, config) -> bool:
        """Soft labels spread by the frozen encoders' similarities: the batch must carry their features."""
        return cls.softens(config) and config.soft_label_mode == "similarity" and config.soft_label_source == "frozen"

    @classmethod
    def reads(cls, config) -> tuple:
        return TEACHER_FEATURES if cls.softens_from_teachers(config) else ()

    @classmethod
    def build(cls, config, dims: TowerDims) -> "InstanceContrastiveLoss":
        return cls(config.soft_label_mode, config.soft_label_temperature, config.soft_label_source,
                   config.soft_label_modality)

    @classmethod
    def named(cls, config) -> str:
        return "soft labels from the teachers (soft_label_source=frozen)"

    @classmethod
    def switch_off(cls, config) -> str:
        return "--soft_label_mode none"

    @classmethod
    def summary(cls, config) -> str:
        if not cls.softens(config):
            return ""
        source = "frozen teacher encoders'" if cls.softens_from_teachers(config) else "the student's own"
        return (f"soft labels ({config.soft_label_mode}"
                + (f", from {source} similarities" if config.soft_label_mode == "similarity" else "") + ")")

    @classmethod
    def card_row(cls, config) -> tuple:
        return ("instance contrastive (CLIP, global batch)", 1.0,
                f"soft labels: {config.soft_label_mode}" + (
                    f" from the {'frozen teachers' if config.soft_label_source == 'frozen' else 'student'}' "
                    f"similarities ({config.soft_label_modality}), max α {config.soft_label_max}, "
                    f"{config.soft_label_schedule} schedule" if cls.softens(config) else ""))

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        return self(features.image_embeds, features.text_embeds, step.logit_scale, alpha=step.soft_label_alpha,
                    teacher_image_features=targets.get("teacher_image_features"),
                    teacher_text_features=targets.get("teacher_text_features"))

    def __init__(self, soft_label_mode: str = "none", soft_label_temperature: float = 0.1, source: str = "student",
                 modality: str = "candidates"):
        super().__init__()
        self.soft_label_mode = soft_label_mode
        self.soft_label_temperature = soft_label_temperature
        self.source = source
        self.modality = modality

    def _similarities(self, image_embeds, text_embeds, all_images, all_texts, frozen_image, frozen_text):
        """Detached similarities of local rows to global columns that spread the mass of (image->text rows,
        text->image rows), or (None, None)."""
        if self.soft_label_mode != "similarity":
            return None, None
        if self.source == "frozen":
            if frozen_image is None or frozen_text is None:
                raise ValueError("soft_label_source='frozen' needs the teachers' features in the batch "
                                 f"(teacher_image_features / teacher_text_features): {_TEACHER_HINT}.")
            frozen_image, frozen_text = frozen_image.float(), frozen_text.float()
            text_sim = own_rows(frozen_text) @ gather_no_grad(frozen_text).t()
            image_sim = own_rows(frozen_image) @ gather_no_grad(frozen_image).t()
        else:
            text_sim = own_rows(text_embeds).detach() @ all_texts.detach().t()
            image_sim = own_rows(image_embeds).detach() @ all_images.detach().t()
        if self.modality == "both":
            both = 0.5 * (text_sim + image_sim)
            return both, both
        if self.modality == "text":
            return text_sim, text_sim
        return text_sim, image_sim

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, alpha: float = 0.0,
        teacher_image_features: torch.Tensor | None = None, teacher_text_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`image_embeds`, `text_embeds`: (B, D) L2-normalised local embeddings; `logit_scale`: the exp'ed scale;
        `teacher_*_features`: (B, D') L2-normalised teacher features (`source="frozen"` only)."""
        all_images = gather_with_grad(image_embeds)
        all_texts = gather_with_grad(text_embeds)
        positives = _own_global_rows(image_embeds.shape[0], image_embeds.device)
        logits_i2t = logit_scale * own_rows(image_embeds) @ all_texts.t()
        logits_t2i = logit_scale * own_rows(text_embeds) @ all_images.t()
        num_columns = all_texts.shape[0]
        if self.soft_label_mode == "none" or alpha <= 0.0:
            loss_i2t = row_mean(F.cross_entropy(logits_i2t, positives, reduction="none"))
            loss_t2i = row_mean(F.cross_entropy(logits_t2i, positives, reduction="none"))
        else:
            with torch.no_grad():
                text_sim, image_sim = self._similarities(image_embeds, text_embeds, all_images, all_texts,
                                                         teacher_image_features, teacher_text_features)
                targets_i2t = soft_targets(text_sim, positives, num_columns, alpha, self.soft_label_mode,
                                           self.soft_label_temperature)
                targets_t2i = soft_targets(image_sim, positives, num_columns, alpha, self.soft_label_mode,
                                           self.soft_label_temperature)
            loss_i2t = row_mean(F.cross_entropy(logits_i2t, targets_i2t, reduction="none"))
            loss_t2i = row_mean(F.cross_entropy(logits_t2i, targets_t2i, reduction="none"))
        return {"instance": 0.5 * (loss_i2t + loss_t2i)}


def _own_columns(rows: int, num_columns: int, device) -> torch.Tensor:
    """(rows, num_columns) bool, True at each local row's own pair in the global batch."""
    own = _own_global_rows(rows, device)
    return F.one_hot(own, num_columns).bool()


def sigmoid_pair_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss of (rows, columns) pair logits: -sum over every pair of log sigmoid(label * logit), label +1 at
    a row's own pair and -1 elsewhere, divided by the number of rows (of the global batch: `row_mean`)."""
    signs = positive.to(logits.dtype) * 2.0 - 1.0
    return row_mean(-F.logsigmoid(signs * logits).sum(-1))


class SigmoidInstanceLoss(InstanceLoss):
    """SigLIP's pairwise sigmoid loss over the global batch (Zhai et al., 2023), the alternative instance loss
    (`instance_loss="sigmoid"`).

    Every image-caption pair of the global batch is its own binary problem: logit = scale * cos + bias, label +1 for
    the batch's own pairs and -1 for every other pairing, loss = -sum log sigmoid(label * logit) / batch size. No
    softmax normalises over the batch, which the SigLIP paper found to help most at small batches. The scale starts at
    10 and the learnable bias at -10 (the paper's initialisation: the many negatives start out predicted as such).

    Each rank scores its local images against the captions of every rank (gathered with autograd), so each pair is
    counted once, on the rank holding its image; with DDP's gradient averaging that is the loss of one process holding
    the whole batch (the paper's chunked neighbour exchange computes the same sum with less memory per device).
    """

    form, title = "sigmoid", "SigLIP's sigmoid loss"
    config_fields = ("logit_bias_init_value",)

    @classmethod
    def validate(cls, config) -> None:
        require_field("logit_bias_init_value", config.logit_bias_init_value, lambda v: True, "must be a finite number")

    @classmethod
    def summary(cls, config) -> str:
        return ""  # the card's sentence starts with the instance loss

    @classmethod
    def card_row(cls, config) -> tuple:
        return ("instance sigmoid (SigLIP, global batch)", 1.0,
                f"every image-caption pair a binary problem; scale starts at "
                f"{math.exp(config.logit_scale_init_value):g}, bias at {config.logit_bias_init_value:g}")

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        return self(features.image_embeds, features.text_embeds, step.logit_scale, step.logit_bias)

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> dict[str, torch.Tensor]:
        all_texts = gather_with_grad(text_embeds)
        logits = logit_scale * own_rows(image_embeds).float() @ all_texts.float().t() + logit_bias
        own = _own_columns(image_embeds.shape[0], all_texts.shape[0], image_embeds.device)
        return {"instance": sigmoid_pair_loss(logits, own)}


class FrozenRelationLoss(Objective):
    """Relation distillation from the frozen pretrained unimodal encoders (training only).

    Within each modality, every local sample's similarity distribution over the *other* samples of the global
    batch, softmax(sim / temperature), is pulled toward the frozen encoder's distribution (KL(teacher || student)):
    the image tower learns which pictures the frozen image encoder finds alike, the text tower which captions the
    frozen sentence encoder finds alike. Soft labels use the same frozen similarities only to reweight the
    contrastive targets; this term shapes each tower's own geometry, which retrieval in either direction reads.
    The student's columns are gathered with gradient (as the instance loss's are), the teacher's without.
    """

    slot, title, row_decomposable = "relation", "frozen-relation distillation", True
    weights = {"relation": "relation_loss_weight"}
    config_fields = ("relation_loss_weight", "relation_temperature")
    targets = TEACHER_FEATURES

    @classmethod
    def validate(cls, config) -> None:
        require_temperature(config, "relation_temperature")

    @classmethod
    def build(cls, config, dims: TowerDims) -> "FrozenRelationLoss":
        return cls(config.relation_temperature)

    @classmethod
    def card_row(cls, config) -> tuple:
        return (cls.title, config.relation_loss_weight, f"per-modality similarity distributions toward the frozen "
                f"teachers', temperature {config.relation_temperature}")

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        return self(features.image_embeds, features.text_embeds, *(targets[key] for key in TEACHER_FEATURES))

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def _kl(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        all_student, all_teacher = gather_with_grad(student), gather_no_grad(teacher)
        self_column = F.one_hot(_own_global_rows(student.shape[0], student.device), all_student.shape[0]).bool()
        student_logits = (own_rows(student) @ all_student.t() / self.temperature).masked_fill(self_column,
                                                                                               _MASKED_LOGIT)
        teacher_logits = (own_rows(teacher) @ all_teacher.t() / self.temperature).masked_fill(self_column,
                                                                                               _MASKED_LOGIT)
        target = teacher_logits.softmax(-1)
        return row_mean((target * (target.clamp_min(1e-12).log() - student_logits.log_softmax(-1))).sum(-1))

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, teacher_image_features: torch.Tensor,
                teacher_text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """All inputs (B, D) and L2-normalised; the frozen features may have other widths than the embeddings."""
        image = self._kl(image_embeds.float(), teacher_image_features.float())
        text = self._kl(text_embeds.float(), teacher_text_features.float())
        return {"relation": 0.5 * (image + text)}


class CrossModalDistillationLoss(Objective):
    """Cross-modal distillation from multimodal (CLIP-like) teachers, CLIP-KD / MobileCLIP style (training only).

    Softmax form (the softmax instance loss): for every local image, the teacher's distribution over the captions of
    the global batch, softmax(teacher_image · teacher_textsᵀ / T), is the target of the student's, softmax(student
    logits / T) with the student's own learned scale folded into its logits; and the same for every caption over the
    images. The loss is KL(teacher ‖ student) averaged over both directions.

    Sigmoid form (`instance_loss="sigmoid"`, MobileCLIP2's distillation for a sigmoid student): every image-caption
    pair of the global batch has the teacher's probability sigmoid(teacher scale · cos + teacher bias) as the target of
    the student's sigmoid(scale · cos + bias); the loss is the Bernoulli KL summed over each row's pairs and averaged
    over rows (the sigmoid loss's normalisation; zero when the student matches the teacher). Pairs are scored once, on
    the rank holding the image, as the sigmoid loss does; the temperature divides both sides' logits.

    The teacher's embeddings arrive with each batch (stored once in a reinforced dataset), so training pays a B×B
    product for them and inference nothing.
    """

    slot, title, row_decomposable = "distill", "cross-modal distillation", True
    weights = {"distill": "distill_loss_weight"}
    config_fields = ("distill_loss_weight", "distill_temperature", "distill_teacher_logit_scale",
                     "distill_teacher_logit_bias", "distill_ensemble", "distill_teacher_dims",
                     "distill_teacher_logit_scales")
    missing_fix = ("train on data reinforced with a multimodal (CLIP-like) teacher: `lightclip-reinforce --teacher "
                   "PATH_OR_HUB_ID`")
    targets = ("teacher_image_embeds", "teacher_text_embeds")

    @classmethod
    def validate(cls, config) -> None:
        require_temperature(config, "distill_temperature")
        require_field("distill_teacher_logit_scale", config.distill_teacher_logit_scale,
                      lambda v: 0 < v <= 1 / MIN_TEMPERATURE,
                      f"must be positive, finite and at most {1 / MIN_TEMPERATURE:g}")
        if config.distill_teacher_logit_bias is not None:
            require_field("distill_teacher_logit_bias", config.distill_teacher_logit_bias, lambda v: True,
                          "must be a finite number")
        require_choice("distill_ensemble", config.distill_ensemble, DISTILL_ENSEMBLES, flag=True)
        if config.distill_ensemble == "mean_probabilities" and config.uses_sigmoid_loss and cls.enabled(config):
            raise ValueError("distill_ensemble='mean_probabilities' averages the teachers' softmaxes; the sigmoid "
                             "loss distils each pair's probability: use --distill_ensemble concatenate with it.")

    @classmethod
    def build(cls, config, dims: TowerDims) -> "CrossModalDistillationLoss":
        return cls(config.distill_temperature, config.instance_loss)

    @classmethod
    def summary(cls, config) -> str:
        return "cross-modal distillation from a multimodal teacher"

    @classmethod
    def card_row(cls, config) -> tuple:
        if config.uses_sigmoid_loss:
            how = (f"Bernoulli KL to the teachers' sigmoid of every pair of the global batch, temperature "
                   f"{config.distill_temperature}, teacher scale {config.distill_teacher_logit_scale:g}, bias "
                   f"{config.distill_teacher_logit_bias:g}")
        else:
            how = (f"KL to the teachers' image→text and text→image distributions over the global batch, temperature "
                   f"{config.distill_temperature}, " + (
                       "target: the mean of each teacher's softmax at its own scale ("
                       + ", ".join(f"{v:g}" for v in config.distill_teacher_logit_scales or []) + ")"
                       if config.distill_ensemble == "mean_probabilities"
                       else f"teacher scale {config.distill_teacher_logit_scale:g}"))
        return cls.title, config.distill_loss_weight, how

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        config = step.config
        ensemble = ((config.distill_teacher_dims, config.distill_teacher_logit_scales)
                    if config.distill_ensemble == "mean_probabilities" else None)
        return self(features.image_embeds, features.text_embeds, step.logit_scale, targets["teacher_image_embeds"],
                    targets["teacher_text_embeds"], config.distill_teacher_logit_scale, step.logit_bias,
                    config.distill_teacher_logit_bias, ensemble)

    def __init__(self, temperature: float = 1.0, form: str = "softmax"):
        super().__init__()
        if form not in ("softmax", "sigmoid"):
            raise ValueError(f"distillation form {form!r}: choose 'softmax' or 'sigmoid'.")
        self.temperature = temperature
        self.form = form

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                teacher_image_embeds: torch.Tensor, teacher_text_embeds: torch.Tensor,
                teacher_logit_scale: float = 100.0, logit_bias: torch.Tensor | None = None,
                teacher_logit_bias: float | None = None, ensemble: tuple | None = None) -> dict[str, torch.Tensor]:
        """Student embeddings (B, D) and the teachers' (B, D'), all L2-normalised; `logit_scale`: the student's
        exp'ed scale; `teacher_logit_scale`: the scale the teacher's cosine similarities are multiplied by; the
        biases: the sigmoid form's (the student's learnable one, the teacher's). `ensemble` (softmax form):
        (each teacher's dimensions, each teacher's logit scale): the teachers' embeddings are their blocks of the
        concatenation, and the target is the mean of each teacher's own softmax at its own scale (MobileCLIP's
        ensemble) instead of one softmax of the concatenation's mean similarity."""
        t = self.temperature
        if self.form == "sigmoid":
            all_texts = gather_with_grad(text_embeds)
            teacher_texts = gather_no_grad(teacher_text_embeds.float())
            student = (logit_scale * own_rows(image_embeds).float() @ all_texts.float().t() + logit_bias) / t
            teacher = (teacher_logit_scale * own_rows(teacher_image_embeds).float() @ teacher_texts.t()
                       + teacher_logit_bias) / t
            target = torch.sigmoid(teacher)
            kl = (target * (F.logsigmoid(teacher) - F.logsigmoid(student))
                  + (1 - target) * (F.logsigmoid(-teacher) - F.logsigmoid(-student)))
            return {"distill": row_mean(kl.sum(-1))}
        all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        teacher_images = gather_no_grad(teacher_image_embeds.float())
        teacher_texts = gather_no_grad(teacher_text_embeds.float())
        student_i2t = logit_scale * own_rows(image_embeds).float() @ all_texts.float().t() / t
        student_t2i = logit_scale * own_rows(text_embeds).float() @ all_images.float().t() / t
        teacher_image_rows, teacher_text_rows = own_rows(teacher_image_embeds), own_rows(teacher_text_embeds)
        if ensemble is None:
            target_i2t = (teacher_logit_scale * teacher_image_rows.float() @ teacher_texts.t() / t).softmax(-1)
            target_t2i = (teacher_logit_scale * teacher_text_rows.float() @ teacher_images.t() / t).softmax(-1)
        else:
            dims, scales = ensemble

            def blocks(x):  # each teacher's own (unit) embeddings
                return [F.normalize(b, dim=-1) for b in x.split(list(dims), dim=-1)]

            i2t, t2i = [], []
            for scale, image, text, images, texts in zip(scales, blocks(teacher_image_rows.float()),
                                                         blocks(teacher_text_rows.float()), blocks(teacher_images),
                                                         blocks(teacher_texts)):
                i2t.append((scale * image @ texts.t() / t).softmax(-1))
                t2i.append((scale * text @ images.t() / t).softmax(-1))
            target_i2t, target_t2i = torch.stack(i2t).mean(0), torch.stack(t2i).mean(0)

        def _kl(student, target):
            return row_mean((target * (target.clamp_min(1e-12).log() - student.log_softmax(-1))).sum(-1))

        return {"distill": 0.5 * (_kl(student_i2t, target_i2t) + _kl(student_t2i, target_t2i))}


class FeatureDistillationLoss(Objective):
    """Feature distillation (CLIP-KD's FD): each modality's embedding, through a training-only linear projection into
    the teachers' feature space and L2-normalised, is pulled toward the sample's teacher feature (unit length: one
    teacher's normalised feature, or several teachers' concatenated and scaled by 1/sqrt(T)). Term
    `feature_distill`: the mean over the global batch's rows of the squared distance (2 - 2 cos), averaged over the
    two modalities; per sample, so each process sums its own rows (scaled so that DDP's gradient averaging gives the
    global mean). The projections hold this objective's only parameters."""

    slot, title, row_decomposable = "feature_distill", "feature distillation", True
    weights = {"feature_distill": "feature_distill_loss_weight"}
    config_fields = ("feature_distill_loss_weight", "feature_distill_teacher_dims")
    targets = TEACHER_FEATURES

    @classmethod
    def validate(cls, config) -> None:
        dims = config.feature_distill_teacher_dims
        if dims is not None and (len(dims) != 2 or not all(isinstance(d, int) and d > 0 for d in dims)):
            raise ValueError(f"feature_distill_teacher_dims={dims}: [image_dim, text_dim], two positive integers (set "
                             "from the training data's teachers).")

    @classmethod
    def build(cls, config, dims: TowerDims) -> "FeatureDistillationLoss":
        if not config.feature_distill_teacher_dims:
            raise ValueError("feature_distill_loss_weight > 0 projects the embeddings into the teachers' feature "
                             "space, whose dimensions come from the training data's teachers: train with "
                             "teacher features (a reinforced copy, or --teacher_features auto), which sets "
                             "feature_distill_teacher_dims.")
        return cls(config.projection_dim, *config.feature_distill_teacher_dims)

    @classmethod
    def summary(cls, config) -> str:
        return "feature distillation (CLIP-KD)"

    @classmethod
    def card_row(cls, config) -> tuple:
        image_dim, text_dim = config.feature_distill_teacher_dims or ("?", "?")
        return (cls.title, config.feature_distill_loss_weight, f"each embedding, through a training-only projection, "
                f"toward the teachers' features ({image_dim}-d image, {text_dim}-d text; squared distance of unit "
                "vectors)")

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        return self(features.image_embeds, features.text_embeds, *(targets[key] for key in TEACHER_FEATURES))

    def __init__(self, embed_dim: int, teacher_image_dim: int, teacher_text_dim: int):
        super().__init__()
        self.image_projection = nn.Linear(embed_dim, teacher_image_dim, bias=False)
        self.text_projection = nn.Linear(embed_dim, teacher_text_dim, bias=False)

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, teacher_image: torch.Tensor,
                teacher_text: torch.Tensor) -> dict[str, torch.Tensor]:
        distances = []
        for projection, student, teacher in ((self.image_projection, image_embeds, teacher_image),
                                             (self.text_projection, text_embeds, teacher_text)):
            if teacher.shape[-1] != projection.out_features:
                raise ValueError(f"feature distillation was built for teacher features of {projection.out_features} "
                                 f"dimensions and the batch carries {teacher.shape[-1]}: the training data's "
                                 "teachers are not the ones the model was set up for (feature_distill_teacher_dims).")
            projected = F.normalize(projection(own_rows(student).to(projection.weight.dtype)).float(), dim=-1)
            distances.append(row_mean((projected - own_rows(teacher).float()).pow(2).sum(-1)))  # over the global batch
        return {"feature_distill": 0.5 * (distances[0] + distances[1])}


# --------------------------------------------------------------------------------------------------------------
# token level
# --------------------------------------------------------------------------------------------------------------


def _solve_assignments_scipy(similarity: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Maximum-similarity one-to-one word->patch assignment per pair, on CPU with scipy's Hungarian solver.

    similarity (B, L, P) and word_mask (B, L) arrive in one device-to-host transfer; returns (B, L) patch index per
    word, -1 for words left unmatched (padding, special tokens, or more words than patches).
    """
    from scipy.optimize import linear_sum_assignment

    sim = similarity.numpy()
    mask = word_mask.numpy()
    matches = torch.full(word_mask.shape, -1, dtype=torch.long)
    for b in range(sim.shape[0]):  # one problem per positive pair: B problems, never B^2
        rows = mask[b].nonzero()[0]
        if rows.size == 0:
            continue
        r, c = linear_sum_assignment(sim[b, rows], maximize=True)
        matches[b, torch.from_numpy(rows[r])] = torch.from_numpy(c).long()
    return matches


def _solve_assignments_batched(similarity: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """The same assignment with torch-linear-assignment's batched solver (Triton on CUDA).

    Invalid word rows get a constant cost, so they only take patches no real word needs: with at least as many
    patches as rows, the real rows' optimum is unchanged. With more words than patches the problem is solved
    transposed (each patch picks a word) and real words always beat the constant-cost rows.
    """
    from torch_linear_assignment import batch_linear_assignment

    cost = -similarity.float()
    big = cost.abs().max().detach() + 10.0 if cost.numel() else torch.tensor(10.0)
    cost = cost.masked_fill(~word_mask.unsqueeze(-1), float(big))
    num_words, num_patches = cost.shape[1], cost.shape[2]
    if num_words <= num_patches:
        matches = batch_linear_assignment(cost)
    else:
        patch_to_word = batch_linear_assignment(cost.transpose(1, 2).contiguous())  # (B, P)
        matches = torch.full(word_mask.shape, -1, dtype=torch.long, device=cost.device)
        valid = patch_to_word >= 0
        b_idx, p_idx = valid.nonzero(as_tuple=True)
        matches[b_idx, patch_to_word[b_idx, p_idx]] = p_idx
    return matches.masked_fill(~word_mask, -1)


def solve_word_patch_assignment(similarity: torch.Tensor, word_mask: torch.Tensor, solver: str = "auto") -> torch.Tensor:
    """One-to-one assignment maximising the summed word-patch similarity of each caption-image pair.

    `solver`: "scipy" (CPU Hungarian, one transfer for the batch), "batched" (torch-linear-assignment) or
    "auto" (batched on CUDA when the package is installed, else scipy). Returns matches on `similarity`'s device.
    """
    device = similarity.device
    # a diverged step (NaN/Inf similarities) still gets a matching: its loss stays non-finite and the trainer's
    # non-finite check reports it, instead of the solver failing on the matrix
    similarity = torch.nan_to_num(similarity.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    if solver == "batched" or (solver == "auto" and similarity.is_cuda):
        try:
            return _solve_assignments_batched(similarity, word_mask).to(device)
        except ImportError:
            if solver == "batched":
                raise
    matches = _solve_assignments_scipy(similarity.float().cpu(), word_mask.cpu())
    return matches.to(device, non_blocking=True)


def sinkhorn_partial_matching(similarity: torch.Tensor, word_mask: torch.Tensor, epsilon: float = 0.05,
                              iterations: int = 50) -> torch.Tensor:
    """Entropic relaxation of the partial bipartite matching: the plan T (..., L, P) maximising
    sum(T * similarity) + epsilon * H(T), each real word sending at most 1 and each patch receiving at most 1, with
    min(words, patches) units matched in all.

    The LP relaxation of bipartite matching is integral (its optimum is the Hungarian assignment); the entropy term
    makes it smooth and differentiable, and epsilon -> 0 recovers the assignment. The inequalities become equalities
    with a dummy word that takes the patches no real word needs (mass max(P - W, 0)) and a dummy patch that takes the
    words no patch is left for (mass max(W - P, 0)), both at similarity 0: the standard construction for partial
    transport. Padding/special tokens (`word_mask` False) send nothing. Log-domain Sinkhorn iterations.
    """
    *batch, num_words, num_patches = similarity.shape
    mask = word_mask.to(similarity.dtype)
    words = mask.sum(-1, keepdim=True)  # (..., 1)
    row_mass = torch.cat([mask, (num_patches - words).clamp(min=0.0)], dim=-1)  # (..., L + 1)
    col_mass = torch.cat([similarity.new_ones(*batch, num_patches), (words - num_patches).clamp(min=0.0)], dim=-1)
    scores = F.pad(similarity, (0, 1, 0, 1)) / epsilon  # dummy row and column at similarity 0

    def _log(mass):
        return torch.log(mass.clamp(min=1e-30)).masked_fill(mass <= 0, -1e9)

    log_rows, log_cols = _log(row_mass), _log(col_mass)
    f, g = torch.zeros_like(row_mass), torch.zeros_like(col_mass)
    for _ in range(iterations):
        f = log_rows - torch.logsumexp(scores + g.unsqueeze(-2), dim=-1)
        g = log_cols - torch.logsumexp(scores + f.unsqueeze(-1), dim=-2)
    plan = torch.exp(scores + f.unsqueeze(-1) + g.unsqueeze(-2))
    return plan[..., :num_words, :num_patches] * mask.unsqueeze(-1)


def fine_grained_scores(words: torch.Tensor, word_mask: torch.Tensor, patches: torch.Tensor, matching: str,
                        solver: str = "auto", epsilon: float = 0.05) -> torch.Tensor:
    """FILIP-style image-caption score from the word-patch matching: for every caption a (rows of `words`) and image
    b (rows of `patches`), the mean similarity of the caption's real words to the patches they are matched to.
    words (A, L, d), word_mask (A, L), patches (B, P, d), all L2-normalised -> scores (A, B).

    `matching="hungarian"`: the exact one-to-one assignment per (caption, image) pair (a discrete choice on
    detached similarities; gradients flow through the matched similarities). `"sinkhorn"`: its entropic LP
    relaxation (`sinkhorn_partial_matching`), differentiable end to end."""
    similarity = torch.einsum("ald,bpd->ablp", words, patches)  # (A, B, L, P)
    mask = word_mask.bool().unsqueeze(1).expand(-1, patches.shape[0], -1)  # (A, B, L)
    counts = mask.sum(-1).clamp(min=1)
    if matching == "sinkhorn":
        plan = sinkhorn_partial_matching(similarity, mask, epsilon)
        return (plan * similarity).sum((-1, -2)) / counts
    flat = similarity.flatten(0, 1)
    matches = solve_word_patch_assignment(flat, mask.flatten(0, 1), solver).view(mask.shape)  # (A, B, L)
    matched = flat.gather(2, matches.clamp(min=0).flatten(0, 1).unsqueeze(-1)).squeeze(-1).view(mask.shape)
    return (matched * (matches >= 0)).sum(-1) / counts


class TokenAlignmentLoss(Objective):
    """Relaxed bipartite token alignment (LightCLIP, token level).

    Words (special and padding tokens excluded) and image patches are projected into a shared token space. For
    each *positive* image-caption pair the Hungarian algorithm assigns every word its own patch, maximising the
    summed cosine similarity. "Relaxed": the matching is partial - there are more patches than words and the
    unmatched patches are free; with `match_threshold`, matched pairs whose similarity is below it are dropped.

    The matches become a contrastive objective that cannot collapse (a constant embedding scores every candidate
    alike and so gets the maximal loss):

    * word -> patch: each matched word must pick its matched patch against the other candidate patches;
    * patch -> word: each matched patch must pick its word against the other candidate words.

    `negatives="batch"` (default) takes the candidates from every image/caption of the global batch, so the term
    also teaches which image a word belongs to; `"image"` restricts them to the pair's own image and caption.
    Matching is solved on detached similarities (it is a discrete choice); gradients flow through the contrastive
    terms. Assignments are solved for the B positive pairs only, from one device-to-host transfer.
    """

    slot, title, training_only, row_decomposable = "token", "token alignment (relaxed bipartite matching)", False, True
    weights = {"token": "token_loss_weight"}
    config_fields = ("token_loss_weight", "token_match_threshold", "token_temperature", "token_negatives",
                     "token_solver", "token_objective", "token_matching", "token_projection_dim",
                     "vision_token_stage")

    @classmethod
    def validate(cls, config) -> None:
        require_temperature(config, "token_temperature")
        for name, choices in (("token_negatives", ("batch", "image")), ("token_objective", ("word_patch", "filip")),
                              ("token_matching", ("hungarian", "sinkhorn")),
                              ("token_solver", ("auto", "scipy", "batched"))):
            require_choice(name, getattr(config, name), choices)
        if config.token_matching == "sinkhorn" and config.token_objective != "filip":
            raise ValueError("token_matching='sinkhorn' relaxes the matching of the fine-grained score: use it with "
                             "token_objective='filip' (word_patch contrasts hard matches).")

    @classmethod
    def build(cls, config, dims: TowerDims) -> "TokenAlignmentLoss":
        return cls(dims.vision_token, dims.text, config.token_projection_dim, temperature=config.token_temperature,
                   match_threshold=config.token_match_threshold, negatives=config.token_negatives,
                   solver=config.token_solver, objective=config.token_objective, matching=config.token_matching)

    @classmethod
    def summary(cls, config) -> str:
        return "token alignment (LightCLIP)"

    @classmethod
    def card_row(cls, config) -> tuple:
        return (cls.title, config.token_loss_weight, f"{config.token_objective} objective, {config.token_matching} "
                f"matching, negatives: {config.token_negatives}, temperature {config.token_temperature}")

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        return self(features.image_tokens, features.text_tokens, features.word_mask)

    def __init__(self, vision_dim: int, text_dim: int, token_dim: int, temperature: float = 0.1,
                 match_threshold: float | None = None, negatives: str = "batch", solver: str = "auto",
                 objective: str = "word_patch", matching: str = "hungarian", sinkhorn_epsilon: float = 0.05):
        super().__init__()
        self.image_token_projection = nn.Linear(vision_dim, token_dim)
        self.text_token_projection = nn.Linear(text_dim, token_dim)
        self.temperature = temperature
        self.match_threshold = match_threshold
        if negatives not in ("batch", "image"):
            raise ValueError(f"token negatives {negatives!r}: choose 'batch' or 'image'.")
        self.negatives = negatives
        self.solver = solver
        self.objective, self.matching, self.sinkhorn_epsilon = objective, matching, sinkhorn_epsilon

    def _fine_grained(self, patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> dict:
        """`objective="filip"`: the fine-grained score of every image-caption pair of the global batch (mean
        similarity of matched word-patch pairs), contrasted like the instance loss: each image must pick its caption
        and each caption its image by that score (symmetric InfoNCE at `temperature`). Why: the word<->patch InfoNCE
        asks each word to find *its* patch among thousands, which the diagnosis found satisfiable through patches
        that only encode image identity (matches fell on the background); scoring whole pairs keeps the target the
        retrieval task itself, as FILIP does."""
        own = _own_global_rows(patches.shape[0], patches.device)
        all_patches = gather_with_grad(patches)
        all_words, all_mask = _gather_words(words, word_mask)
        text_to_image = fine_grained_scores(own_rows(words), own_rows(word_mask), all_patches, self.matching,
                                            self.solver, self.sinkhorn_epsilon) / self.temperature  # (rows, B_g)
        image_to_text = fine_grained_scores(all_words, all_mask, own_rows(patches), self.matching, self.solver,
                                            self.sinkhorn_epsilon).t() / self.temperature  # (rows, B_g)
        return {"token": 0.5 * (row_mean(F.cross_entropy(image_to_text, own, reduction="none"))
                                + row_mean(F.cross_entropy(text_to_image, own, reduction="none")))}

    def _matching(self, words: torch.Tensor, patches: torch.Tensor, word_mask: torch.Tensor) -> tuple:
        """(B, L) each word's patch in its own image (-1: none) for every row of this rank, solved on detached
        similarities, and the normaliser of the global count of matched words."""
        similarity = torch.einsum("bld,bpd->blp", words.detach(), patches.detach())
        matches = solve_word_patch_assignment(similarity, word_mask, self.solver)
        if self.match_threshold is not None:
            matched_sim = similarity.gather(2, matches.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            matches = matches.masked_fill(matched_sim < self.match_threshold, -1)
        return matches, _global_mean_normaliser((matches >= 0).sum())

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, word_mask: torch.Tensor,
                return_matches: bool = False) -> dict[str, torch.Tensor]:
        """image_tokens (B, P, Cv), text_tokens (B, L, Ct), word_mask (B, L) bool. The words of the rows scored
        (`own_rows`) against every candidate; the matching is solved once for the whole batch (`once_per_step`)."""
        patches = F.normalize(self.image_token_projection(image_tokens), dim=-1)
        words = F.normalize(self.text_token_projection(text_tokens), dim=-1)
        word_mask = word_mask.bool()
        if self.objective == "filip":
            return self._fine_grained(patches, words, word_mask)
        all_matches, normaliser = once_per_step("token.matching", lambda: self._matching(words, patches, word_mask))
        matches, row_words, row_patches = own_rows(all_matches), own_rows(words), own_rows(patches)
        b_idx, l_idx = (matches >= 0).nonzero(as_tuple=True)
        p_idx = matches[b_idx, l_idx]
        num_patches = patches.shape[1]

        if self.negatives == "image":
            similarity = torch.einsum("bld,bpd->blp", row_words, row_patches)
            p2w_logits = similarity[b_idx, :, p_idx].masked_fill(~own_rows(word_mask)[b_idx], float("-inf"))
            w2p = F.cross_entropy(similarity[b_idx, l_idx] / self.temperature, p_idx, reduction="sum")
            p2w = F.cross_entropy(p2w_logits / self.temperature, l_idx, reduction="sum")
            candidates = similarity.sum()
        else:
            all_patches = gather_with_grad(patches).flatten(0, 1)  # (B_g * P, d)
            all_words, all_word_mask = _gather_words(words, word_mask)
            length = all_words.shape[1]
            all_words, all_word_mask = all_words.flatten(0, 1), all_word_mask.flatten()  # (B_g * L, ...)
            global_b = _own_global_rows(patches.shape[0], patches.device)[b_idx]
            # each matched word against every patch of the batch and back, a chunk of the batch at a time
            w2p = similarity_cross_entropy(row_words[b_idx, l_idx], all_patches, global_b * num_patches + p_idx,
                                           self.temperature)
            p2w = similarity_cross_entropy(row_patches[b_idx, p_idx], all_words, global_b * length + l_idx,
                                           self.temperature, key_mask=all_word_mask)
            candidates = all_patches.sum() + all_words.sum()
        if b_idx.numel() == 0:
            # nothing matched in these rows: a zero that still reaches the projections (DDP needs every grad) and
            # the gathers (their backward is a collective every rank must join)
            w2p = p2w = 0.0 * (patches.sum() + words.sum() + candidates)
        losses = {"token": 0.5 * (w2p + p2w) * normaliser}
        if return_matches:
            losses["matches"] = all_matches
        return losses


# --------------------------------------------------------------------------------------------------------------
# MLM with multi-stage fusion
# --------------------------------------------------------------------------------------------------------------


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask_token_id: int,
                special_token_ids, vocab_size: int, probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the real, non-special tokens; of those 80% -> [MASK], 10% -> a random
    token, 10% kept. Returns (masked input ids, labels with -100 where no prediction is asked)."""
    device = input_ids.device
    candidates = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        candidates &= attention_mask.bool()
    special = [int(t) for t in special_token_ids if t is not None]
    if special:
        candidates &= ~torch.isin(input_ids, torch.tensor(special, device=device))

    def _uniform(shape):
        return torch.rand(shape, generator=generator, device="cpu" if generator is not None else device).to(device)

    selected = (_uniform(input_ids.shape) < probability) & candidates
    labels = input_ids.masked_fill(~selected, -100)
    roll = _uniform(input_ids.shape)
    to_mask = selected & (roll < 0.8)
    to_random = selected & (roll >= 0.8) & (roll < 0.9)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    random_ids = (_uniform(input_ids.shape) * vocab_size).long().clamp(max=vocab_size - 1)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def mask_for_mlm(config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one MLM masking rule, used by the training collator and by `forward`'s fallback: the config's mask
    token, its special-token ids (`LightCLIPConfig.special_token_ids`), random replacements drawn from the text
    tower's vocabulary, `config.mlm_probability` of the words."""
    return mask_tokens(input_ids, attention_mask, config.mask_token_id, config.special_token_ids(),
                       config.text_config.vocab_size, config.mlm_probability, generator)


def mlm_row_indices(num_rows: int, fraction: float, first_row: int = 0) -> torch.Tensor:
    """Which rows of a batch get a masked copy for MLM: row i of the step's global batch (i = `first_row` + local row)
    when ceil((i + 1) * fraction) > ceil(i * fraction), i.e. `fraction` of the rows evenly spaced, the first row
    always. A rule on the global row index, so one batch, its micro-batches (contrastive accumulation) and its
    per-process shares all pick the same rows. Returns the local indices (LongTensor)."""
    if fraction >= 1.0:
        return torch.arange(num_rows)
    index = torch.arange(first_row, first_row + num_rows, dtype=torch.float64)
    # the 1e-9 keeps products that are whole numbers in exact arithmetic (10 * 0.3) from rounding up
    chosen = torch.ceil((index + 1) * fraction - 1e-9) > torch.ceil(index * fraction - 1e-9)
    return chosen.nonzero().flatten()


class FusionBlock(nn.Module):
    """Text tokens attend to one image stage: pre-norm cross-attention behind a zero-initialised tanh gate, so
    that at the start of training the masked text pass is exactly the plain text tower. No feed-forward of its
    own: the text layer that follows (or the MLM head transform, after the last layer) provides it."""

    def __init__(self, text_dim: int, image_dim: int, num_heads: int):
        super().__init__()
        if text_dim % num_heads:
            num_heads = 1
        self.image_projection = nn.Linear(image_dim, text_dim)
        self.image_norm = nn.LayerNorm(text_dim)
        self.text_norm = nn.LayerNorm(text_dim)
        self.cross_attention = nn.MultiheadAttention(text_dim, num_heads, batch_first=True)
        self.attention_gate = nn.Parameter(torch.zeros(()))

    def forward(self, text_states: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """`image_features`: (B, N, C) tokens of one image stage."""
        image = self.image_norm(self.image_projection(image_features))
        attended, _ = self.cross_attention(self.text_norm(text_states), image, image, need_weights=False)
        return text_states + self.attention_gate.tanh() * attended


def find_text_layers(text_model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The text tower's list of transformer layers (BERT `encoder.layer`, CLIP `encoder.layers`, ...)."""
    for name in ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "layer"):
        module = text_model
        for part in name.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    for module in text_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"cannot find the {num_layers} transformer layers of the text tower {type(text_model).__name__}"
                     " for the MLM fusion module; set mlm_loss_weight=0 for this tower.")


class MaskedLanguageModelling(Objective):
    """MLM on the text tower, helped by a training-only fusion module (LightCLIP).

    The masked caption runs through the text tower; after each layer in `text_layers` a `FusionBlock` lets the
    text tokens cross-attend to the *unmasked* image's features from one stage of the image tower
    (`vision_stages`, indices into its hidden states), so low- and high-level image features both inform the
    prediction. An MLM head (transform + decoder) predicts the masked tokens. The masked copies ride in the same
    text-tower call as the plain captions (rows appended behind them; `fusing` applies the fusion blocks to those
    rows only), so MLM costs no second pass of launches: the same computation as a separate fused pass, in one.
    Fusion and head run only in training; the dual-encoder inference path never sees them.

    Switches (config): `tie_head` - the decoder is the text tower's word-embedding matrix (BERT's choice, default)
    or a matrix of its own, so MLM's gradient on the output side does not reach the word embeddings the retrieval
    embedding is built from; `fusion` - False runs plain MLM on the text tower (no image features), the control that
    tells whether the image helps at all.
    """

    slot, title, training_only, row_decomposable = "mlm", "masked language modelling", False, True
    weights = {"mlm": "mlm_loss_weight"}
    config_fields = ("mlm_loss_weight", "mlm_probability", "mlm_batch_fraction", "mlm_tie_head", "mlm_fusion",
                     "mlm_start", "fusion_text_layers", "fusion_vision_stages", "fusion_num_heads")
    targets = ("mlm_input_ids", "mlm_labels")  # masked by the collator; the model masks any batch without them

    @classmethod
    def validate(cls, config) -> None:
        for name in ("mlm_probability", "mlm_start", "mlm_batch_fraction"):
            require_field(name, getattr(config, name), lambda v: True, "must be a finite number")
        if not 0.0 < config.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={config.mlm_probability}: must lie in (0, 1).")
        if not 0.0 <= config.mlm_start < 1.0:
            raise ValueError(f"mlm_start={config.mlm_start}: the share of training before MLM starts lies in [0, 1).")
        if not 0.0 < config.mlm_batch_fraction <= 1.0:
            raise ValueError(f"mlm_batch_fraction={config.mlm_batch_fraction}: must lie in (0, 1].")
        if len(config.fusion_text_layers) != len(config.fusion_vision_stages):
            raise ValueError(f"fusion_text_layers {config.fusion_text_layers} and fusion_vision_stages "
                             f"{config.fusion_vision_stages} must have the same length: each text layer draws on one "
                             "image stage.")
        num_text_layers = getattr(config.text_config, "num_hidden_layers", None)
        if num_text_layers is not None:
            bad = [i for i in config.fusion_text_layers if not -num_text_layers <= i < num_text_layers]
            if bad:
                raise ValueError(f"fusion_text_layers {bad} out of range for a text tower of {num_text_layers} layers.")

    @classmethod
    def required(cls, config) -> tuple:
        return ()

    @classmethod
    def build(cls, config, dims: TowerDims) -> "MaskedLanguageModelling":
        return cls(dims.text, dims.vision_stages, config.fusion_text_layers, config.fusion_vision_stages,
                   config.fusion_num_heads, config.text_config.vocab_size,
                   layer_norm_eps=getattr(config.text_config, "layer_norm_eps", 1e-12), tie_head=config.mlm_tie_head,
                   fusion=config.mlm_fusion)

    @classmethod
    def summary(cls, config) -> str:
        return cls.title + (" with image fusion (LightCLIP)" if config.mlm_fusion else "")

    @classmethod
    def card_row(cls, config) -> tuple:
        return (cls.title + (" + fusion" if config.mlm_fusion else ""), config.mlm_loss_weight,
                f"mask {config.mlm_probability} of the words on {config.mlm_batch_fraction:g} of each batch" +
                (f", fusion after text layers {config.fusion_text_layers} from image stages "
                 f"{config.fusion_vision_stages}" if config.mlm_fusion else ""))

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        if features.masked_states is None:  # MLM not started yet (mlm_start)
            return self.skipped(features.text_embeds)
        return self(features.masked_states, features.mlm_labels, step.word_embeddings, features.mlm_rows)

    def __init__(self, text_dim: int, vision_stage_dims: list, text_layers: list, vision_stages: list,
                 num_heads: int, vocab_size: int, layer_norm_eps: float = 1e-12, tie_head: bool = True,
                 fusion: bool = True):
        super().__init__()
        self.text_layers = list(text_layers) if fusion else []
        self.vision_stages = list(vision_stages) if fusion else []
        self.fusion = nn.ModuleList(
            FusionBlock(text_dim, vision_stage_dims[stage], num_heads) for stage in self.vision_stages
        )
        self.head_transform = nn.Sequential(nn.Linear(text_dim, text_dim), nn.GELU(),
                                            nn.LayerNorm(text_dim, eps=layer_norm_eps))
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        self.head_decoder = None if tie_head else nn.Parameter(torch.randn(vocab_size, text_dim) * 0.02)
        self._fusion_inputs = None  # (image stages, first masked row) during a fused call (read by the hooks)

    def skipped(self, states_like: torch.Tensor) -> dict[str, torch.Tensor]:
        """A zero term that still reaches every parameter of this module (DDP needs every gradient), for steps
        where MLM is off (delayed start)."""
        # each parameter's zero is its own product, so its gradient is a tensor of its own: one sum over them all would
        # hand the scalar gates one shared gradient tensor, which a later accumulation adds into in place for both
        return {"mlm": 0.0 * states_like.sum() + sum((0.0 * p).sum() for p in self.parameters())}

    def _install_fusion_hooks(self, text_layers: nn.ModuleList) -> None:
        """Hook each fusion block behind its text layer, once per text tower, for good. A hook does nothing unless
        a fused pass is running (`self._fusion_inputs` set), so inference and the plain text pass are untouched;
        and since the hooks never change, a compiled text tower (`torch.compile`) is not recompiled every step."""
        if getattr(self, "_hooked_layers_id", None) == id(text_layers):
            return
        for block, layer_index, stage in zip(self.fusion, self.text_layers, self.vision_stages):

            def _inject(module, args, output, block=block, stage=stage, owner=self):
                if owner._fusion_inputs is None:
                    return output
                image_stages, start = owner._fusion_inputs
                states = output[0] if isinstance(output, tuple) else output
                fused = block(states[start:], image_stages[stage])
                states = torch.cat([states[:start], fused]) if start else fused
                return (states,) + tuple(output[1:]) if isinstance(output, tuple) else states

            text_layers[layer_index].register_forward_hook(_inject)
        self._hooked_layers_id = id(text_layers)

    @contextlib.contextmanager
    def fusing(self, text_layers: nn.ModuleList, image_stages: tuple, start_row: int = 0):
        """Within this context, text-tower rows `start_row:` are the masked captions: after each fusion layer they
        cross-attend to `image_stages` (the unmasked images of those rows). Rows before `start_row` pass through
        untouched, so the plain captions and their masked copies share one text-tower call."""
        if not self.fusion:
            yield
            return
        self._install_fusion_hooks(text_layers)
        self._fusion_inputs = (tuple(image_stages), int(start_row))
        try:
            yield
        finally:
            self._fusion_inputs = None

    def forward(self, masked_states: torch.Tensor, mlm_labels: torch.Tensor, word_embeddings: torch.Tensor,
                mlm_rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`masked_states` (R, L, D): the text tower's states of the masked captions (fused with their images);
        `mlm_labels` (R, L): targets, -100 where nothing is predicted; `word_embeddings`: the tied decoder;
        `mlm_rows` (R,): the batch row of each masked caption, so that only the rows scored (`own_rows`) are."""
        asked = mlm_labels != -100
        normaliser = once_per_step("mlm.normaliser", lambda: _global_mean_normaliser(asked.sum()))
        if mlm_rows is not None:
            rows = scored(mlm_rows)
            masked_states, mlm_labels, asked = masked_states[rows], mlm_labels[rows], asked[rows]
        states = masked_states
        hidden = self.head_transform(states[asked])
        decoder = word_embeddings if self.head_decoder is None else self.head_decoder
        logits = F.linear(hidden, decoder, self.head_bias)
        if logits.shape[0] == 0:
            return self.skipped(states)
        loss = F.cross_entropy(logits.float(), mlm_labels[asked], reduction="sum") * normaliser
        return {"mlm": loss}


# --------------------------------------------------------------------------------------------------------------
# CLIP-PING neighbour guidance
# --------------------------------------------------------------------------------------------------------------


_MASKED_LOGIT = -1e4  # exp() of this, relative to any real logit (|logit| <= logit scale <= 100), is 0 in fp32


class NeighbourEmbeddingBank:
    """The student's own most recent image and text embeddings, indexed by training-sample id, with a validity
    flag for samples not seen yet. Deliberately *not* a registered buffer: it is never saved with the weights and
    DDP does not broadcast it every step. Under several processes every rank writes the embeddings of the whole
    global batch, so all ranks hold the same bank. Allocated lazily on the embeddings' device."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32):
        self.size, self.dim, self.dtype = size, dim, dtype
        self.image = self.text = self.valid = None

    def _allocate(self, device):
        if self.image is None:
            self.image = torch.zeros(self.size, self.dim, dtype=self.dtype, device=device)
            self.text = torch.zeros(self.size, self.dim, dtype=self.dtype, device=device)
            self.valid = torch.zeros(self.size, dtype=torch.bool, device=device)
        elif self.image.device != device:  # e.g. restored from a checkpoint on CPU, training on GPU
            self.image, self.text, self.valid = (t.to(device) for t in (self.image, self.text, self.valid))

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, valid) for sample `ids`; ids < 0 (no neighbour) and unseen samples are invalid."""
        self._allocate(ids.device)
        in_range = (ids >= 0) & (ids < self.size)
        safe = ids.clamp(0, self.size - 1)
        table = self.image if modality == "image" else self.text
        return table[safe].float(), in_range & self.valid[safe]

    @torch.no_grad()
    def update(self, ids: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
        self._allocate(image_embeds.device)
        ids = gather_no_grad(ids)
        image_embeds = gather_no_grad(image_embeds)
        text_embeds = gather_no_grad(text_embeds)
        keep = (ids >= 0) & (ids < self.size)
        if not keep.all():
            raise IndexError(f"sample ids outside the bank of {self.size} samples: "
                             f"{ids[~keep][:5].tolist()}; is config.ping_bank_size the training-set size?")
        self.image[ids] = image_embeds.to(self.dtype)
        self.text[ids] = text_embeds.to(self.dtype)
        self.valid[ids] = True

    def state_dict(self) -> dict:
        return {"image": self.image, "text": self.text, "valid": self.valid} if self.image is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.image, self.text, self.valid = state["image"], state["text"], state["valid"]


class NeighbourGuidance(Objective):
    """What CLIP-PING's two forms share: their switches, settings, card row and scale."""

    slot, title, row_decomposable = "ping", "CLIP-PING", True
    weights = {"ping_nn": "ping_nn_loss_weight", "ping_xnn": "ping_xnn_loss_weight"}
    config_fields = ("ping_nn_loss_weight", "ping_xnn_loss_weight", "ping_bank_size", "ping_temperature",
                     "ping_negatives", "ping_positives")
    missing_fix = "train with --teacher_features (the neighbours of the teachers' features)"

    @classmethod
    def enabled(cls, config) -> bool:
        return cls.switched_on(config) and config.ping_positives == cls.positives

    @classmethod
    def switched_on(cls, config) -> bool:
        """CLIP-PING in either form (a weight above 0)."""
        return super().enabled(config)

    @classmethod
    def validate(cls, config) -> None:
        if config.ping_temperature is not None:
            require_field("ping_temperature", config.ping_temperature, lambda v: v >= MIN_TEMPERATURE,
                          f"must be finite and at least {MIN_TEMPERATURE:g} (or None for the learned logit scale)")
        require_choice("ping_negatives", config.ping_negatives, PING_NEGATIVES)
        require_choice("ping_positives", config.ping_positives, PING_POSITIVES)

    @classmethod
    def summary(cls, config) -> str:
        return "nearest-neighbour guidance (CLIP-PING)"

    @classmethod
    def card_row(cls, config) -> tuple:
        where = ("in the same batch (fresh)" if config.ping_positives == "in_batch"
                 else f"memory bank, {config.ping_negatives} negatives")
        return ("CLIP-PING NN / XNN", f"{config.ping_nn_loss_weight} / {config.ping_xnn_loss_weight}",
                f"frozen-encoder neighbours, {where}")

    def compute(self, features, step, targets) -> dict[str, torch.Tensor]:
        temperature = step.config.ping_temperature
        scale = step.logit_scale if temperature is None else step.logit_scale.new_tensor(1.0 / temperature)
        return self(features.image_embeds, features.text_embeds, scale,
                    *(targets[key] for key in self.reads(step.config)))


class NeighbourContrastiveLoss(NeighbourGuidance):
    """CLIP-PING: contrastive supervision from nearest neighbours (NN) and cross nearest neighbours (XNN) found
    offline in the feature spaces of frozen pretrained unimodal encoders.

    For local sample i with image-space neighbour a(i) and text-space neighbour t(i) (ids of other training
    samples, from the collator):

    * NN:  image i -> the text embedding of a(i);   text i -> the image embedding of t(i)
    * XNN: image i -> the text embedding of t(i);   text i -> the image embedding of a(i)

    Each is InfoNCE with the neighbour as the positive. Neighbour embeddings come from the
    `NeighbourEmbeddingBank` (detached, no extra encoder pass), so they are *stale*: written when that sample was
    last seen, up to an epoch ago. The negatives (`negatives`, config `ping_negatives`):

    * `"bank"` (default): the bank entries that are the other usable rows' positives, gathered over the global
      batch. Positive and negatives are then equally stale, so only their content tells them apart.
    * `"batch"`: the global batch's *current* embeddings of the other modality, with the column of i's own pair
      replaced by the neighbour. Measured to fail (docs/study.md): the positive is the only stale candidate, and
      where the batch holds a current copy of it (a repeated caption, a near-duplicate image) the loss can only
      be lowered by making embeddings drift over time, which the student learns to do — image and text embeddings
      ended in opposite cones (paired cosine -0.8) and zero-shot top-1 fell from 81% to 40%. Kept for comparison.

    Rows whose neighbour has not been seen yet are skipped (and are no candidates). Terms are normalised over the
    global count of usable rows.
    """

    positives = "bank"
    targets = ("sample_ids", "image_neighbour_ids", "text_neighbour_ids")

    @classmethod
    def build(cls, config, dims: TowerDims) -> "NeighbourContrastiveLoss":
        return cls(config.ping_bank_size, config.projection_dim, config.ping_nn_loss_weight,
                   config.ping_xnn_loss_weight, config.ping_negatives)

    def __init__(self, bank_size: int, dim: int, nn_weight: float, xnn_weight: float, negatives: str = "bank"):
        super().__init__()
        if bank_size <= 0:
            raise ValueError("CLIP-PING needs config.ping_bank_size = the number of training samples (> 0).")
        if negatives not in PING_NEGATIVES:
            raise ValueError(f"ping negatives {negatives!r}: choose one of {PING_NEGATIVES}.")
        self.bank = NeighbourEmbeddingBank(bank_size, dim)
        self.nn_weight, self.xnn_weight, self.negatives = nn_weight, xnn_weight, negatives

    @staticmethod
    def _term(queries, all_candidates, positives, valid, logit_scale, negatives: str, key: str):
        """One direction of one term for the rows scored (`own_rows`): `queries` (B, D) this rank's embeddings,
        `positives` / `valid` (B, ...) their neighbours' bank entries; `all_candidates` (the gathered current
        embeddings) is read in "batch" mode only. `key` names the direction for `once_per_step`."""
        own = _own_global_rows(queries.shape[0], queries.device)
        if negatives == "bank":
            all_positives, all_valid = once_per_step(f"ping.{key}.candidates", lambda: (
                gather_no_grad(positives), gather_no_grad(valid.to(torch.uint8)).bool()))  # bank entries: detached
            logits = logit_scale * own_rows(queries) @ all_positives.t()
            # unusable rows' entries are no candidates; a finite fill keeps rows without any candidate NaN-free
            logits = logits.masked_fill(~all_valid.unsqueeze(0), _MASKED_LOGIT)
        else:
            logits = logit_scale * own_rows(queries) @ all_candidates.t()
            positive_logit = logit_scale * (own_rows(queries) * own_rows(positives)).sum(-1)
            logits = logits.scatter(1, own.unsqueeze(1), positive_logit.unsqueeze(1))
        per_row = F.cross_entropy(logits, own, reduction="none")
        normaliser = once_per_step(f"ping.{key}.normaliser", lambda: _global_mean_normaliser(valid.sum()))
        return (per_row * own_rows(valid)).sum() * normaliser

    def _neighbours(self, image_neighbour_ids, text_neighbour_ids, sample_ids, image_embeds, text_embeds,
                    update_bank: bool) -> dict:
        """The bank entries of every row's neighbours, read before this step writes its own embeddings into the
        bank (then written, in training)."""
        found = {"text_of_image_nn": self.bank.lookup(image_neighbour_ids, "text"),
                 "image_of_text_nn": self.bank.lookup(text_neighbour_ids, "image"),
                 "text_of_text_nn": self.bank.lookup(text_neighbour_ids, "text"),
                 "image_of_image_nn": self.bank.lookup(image_neighbour_ids, "image")}
        if update_bank and self.training:
            self.bank.update(sample_ids, image_embeds.detach(), text_embeds.detach())
        return found

    def forward(self, image_embeds, text_embeds, logit_scale, sample_ids, image_neighbour_ids, text_neighbour_ids,
                update_bank: bool = True) -> dict[str, torch.Tensor]:
        all_images = all_texts = None  # "bank" negatives never look at the current batch's embeddings
        if self.negatives == "batch":
            all_images = gather_with_grad(image_embeds)
            all_texts = gather_with_grad(text_embeds)
        found = once_per_step("ping.neighbours", lambda: self._neighbours(
            image_neighbour_ids, text_neighbour_ids, sample_ids, image_embeds, text_embeds, update_bank))

        def term(queries, candidates, name):
            return self._term(queries, candidates, *found[name], logit_scale, self.negatives, name)

        losses = {}
        if self.nn_weight > 0:
            losses["ping_nn"] = 0.5 * (term(image_embeds, all_texts, "text_of_image_nn")
                                       + term(text_embeds, all_images, "image_of_text_nn"))
        if self.xnn_weight > 0:
            losses["ping_xnn"] = 0.5 * (term(image_embeds, all_texts, "text_of_text_nn")
                                        + term(text_embeds, all_images, "image_of_image_nn"))
        return losses


class InBatchNeighbourLoss(NeighbourGuidance):
    """CLIP-PING with fresh neighbours: the neighbour is in the same global batch, so its embedding is current.

    Why: with the memory bank the positive is a stale embedding, written up to an epoch earlier by an older student;
    the diagnosis (docs/study.md) found bank positives barely distinguishable from their negatives early in training and
    the `"batch"`-negatives variant learning to separate stale from current embeddings instead of content. Here a
    neighbour-aware sampler (`NeighbourPairSampler`) yields (anchor, neighbour) pairs and the collator passes, for
    each row, the local row of its partner (`partner_rows`, -1 for none) and the feature space the pair was found
    in (`partner_spaces`: 0 image, 1 text). Nothing is stale and nothing is stored.

    For row r with partner m found in space s, over the global batch's current embeddings (r's own pair excluded:
    it is the instance loss's positive, not a candidate here):

    * image r -> text m, and text r -> image m, each InfoNCE with m as the positive;
    * NN is the direction that stays in the space of the neighbour search (image -> text for image-space partners,
      text -> image for text-space ones), XNN the crossing one, as in the bank version.
    """

    positives = "in_batch"
    missing_fix = "the trainer samples neighbour pairs from the teachers' neighbours (--teacher_features)"
    targets = ("ping_partner_rows", "ping_partner_spaces")

    @classmethod
    def build(cls, config, dims: TowerDims) -> "InBatchNeighbourLoss":
        return cls(config.ping_nn_loss_weight, config.ping_xnn_loss_weight)

    def __init__(self, nn_weight: float, xnn_weight: float):
        super().__init__()
        self.nn_weight, self.xnn_weight = nn_weight, xnn_weight

    def forward(self, image_embeds, text_embeds, logit_scale, partner_rows, partner_spaces) -> dict[str, torch.Tensor]:
        """The rows scored (`own_rows`) against the global batch; normalised by the global count of usable rows."""
        local = image_embeds.shape[0]
        first_row = first_global_row(local, image_embeds.device)
        own = _own_global_rows(local, image_embeds.device)
        normaliser = once_per_step("ping.in_batch.normaliser",
                                   lambda: _global_mean_normaliser((partner_rows >= 0).sum()))
        partner_rows, partner_spaces = own_rows(partner_rows), own_rows(partner_spaces)
        valid = partner_rows >= 0
        partner = partner_rows.clamp(min=0) + first_row

        def _direction(queries, candidates):
            own_column = F.one_hot(own, candidates.shape[0]).bool()
            logits = (logit_scale * queries @ candidates.t()).masked_fill(own_column, _MASKED_LOGIT)
            return F.cross_entropy(logits, partner, reduction="none")

        image_to_text = _direction(own_rows(image_embeds), gather_with_grad(text_embeds))
        text_to_image = _direction(own_rows(text_embeds), gather_with_grad(image_embeds))
        image_space = (valid & (partner_spaces == 0)).to(image_to_text.dtype)
        text_space = (valid & (partner_spaces == 1)).to(image_to_text.dtype)
        losses = {}
        if self.nn_weight > 0:
            losses["ping_nn"] = ((image_to_text * image_space).sum() + (text_to_image * text_space).sum()) * normaliser
        if self.xnn_weight > 0:
            losses["ping_xnn"] = ((text_to_image * image_space).sum() + (image_to_text * text_space).sum()) * normaliser
        return losses


# Every objective, in the order its terms are computed and summed. Adding one: its class + one line here
# (CONTRIBUTING.md, "Add an objective"), or `register_objective(cls)` from outside the package.
OBJECTIVES = [
    InstanceContrastiveLoss,
    SigmoidInstanceLoss,
    TokenAlignmentLoss,
    MaskedLanguageModelling,
    NeighbourContrastiveLoss,
    InBatchNeighbourLoss,
    FrozenRelationLoss,
    CrossModalDistillationLoss,
    FeatureDistillationLoss,
]


def register_objective(objective: type) -> type:
    """Add an `Objective` subclass to `OBJECTIVES` (usable as a class decorator); models built afterwards train it
    when their config switches it on."""
    if not (isinstance(objective, type) and issubclass(objective, Objective)):
        raise TypeError(f"register_objective takes an Objective subclass, not {objective!r}.")
    if objective not in OBJECTIVES:
        OBJECTIVES.append(objective)
    return objective


def loss_weight_fields() -> dict[str, str]:
    """Each weighted term (its name in `LightCLIPOutput.losses`) and the config field holding its weight."""
    return {term: field for objective in OBJECTIVES for term, field in objective.weights.items()}


def loss_weights(config) -> dict[str, float]:
    """Weight of each enabled weighted term of `config`, by term name (the instance loss, weight 1, is not listed)."""
    return {term: float(getattr(config, name)) for term, name in loss_weight_fields().items()
            if getattr(config, name, 0.0) > 0}


def validate_config(config) -> None:
    """Check every objective's config fields (`LightCLIPConfig` calls this where the objectives are installed): each
    loss weight is a finite number, never negative, and each objective checks its own group (`Objective.validate`)."""
    for name in loss_weight_fields().values():
        weight = getattr(config, name, 0.0)  # a field an objective registered later may be absent: off
        require_field(name, weight, lambda v: True, "must be a finite number")
        if weight < 0:
            raise ValueError(f"{name}={weight}: a loss weight cannot be negative (0 switches it off).")
    for objective in OBJECTIVES:
        objective.validate(config)


def enabled_objectives(config) -> list:
    """The classes of the objectives `config` switches on, in `OBJECTIVES`' order."""
    return [objective for objective in OBJECTIVES if objective.enabled(config)]


def training_targets_read(config) -> set:
    """Every training target an objective of `config` reads: what the collator builds."""
    return {key for objective in enabled_objectives(config) for key in objective.reads(config)}


def reads_teacher_knowledge(config) -> bool:
    """Whether training `config` reads teacher knowledge per sample - the teachers' features or embeddings, or
    CLIP-PING's neighbours found with them - so that the data must carry it (a reinforced copy)."""
    return bool(training_targets_read(config) & TEACHER_TARGETS)


class LightCLIPObjectives(nn.Module):
    """Every training objective of a LightCLIP model, built from its config, and the one place their terms are
    computed and summed.

    Builds each objective of `OBJECTIVES` that the config switches on into its slot (`self.instance`, `self.token`,
    `self.mlm`, `self.ping`, ...; None when off: objectives whose weight is 0 cost nothing and hold no parameters).
    `forward` takes what the towers produced and returns the dict of named unweighted terms plus `"loss"`, their
    weighted sum (weights: `loss_weights(config)`; the instance term has weight 1).
    """

    def __init__(self, config, vision_token_dim: int, vision_stage_dims: list, text_dim: int):
        super().__init__()
        self.config = config
        dims = TowerDims(vision_token_dim, list(vision_stage_dims), text_dim)
        self._slots = tuple(dict.fromkeys(objective.slot for objective in OBJECTIVES))
        for slot in self._slots:
            setattr(self, slot, None)
        for objective in enabled_objectives(config):
            if getattr(self, objective.slot) is not None:
                raise ValueError(f"{objective.__name__} and {type(getattr(self, objective.slot)).__name__} are both "
                                 f"switched on and are alternatives ({objective.slot!r}): choose one.")
            setattr(self, objective.slot, objective.build(config, dims))

    def active(self) -> list:
        """The built objectives, in `OBJECTIVES`' order."""
        return [getattr(self, slot) for slot in self._slots if getattr(self, slot) is not None]

    def mlm_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, text_kwargs: dict,
                   mlm_input_ids: torch.Tensor | None, mlm_labels: torch.Tensor | None,
                   training_progress: float, first_row: int = 0) -> tuple | None:
        """The masked captions of this step: (ids, attention mask, labels, text kwargs, rows) of the rows
        `mlm_row_indices` picks (`mlm_batch_fraction` of them, evenly spaced over the step's global batch; `first_row`
        is this batch's first row in it), masked here by `mask_for_mlm` unless the collator did; None when MLM is off
        or has not started yet (`mlm_start`)."""
        config = self.config
        if not self.mlm_active(training_progress):
            return None
        if mlm_input_ids is None or mlm_labels is None:
            mlm_input_ids, mlm_labels = mask_for_mlm(config, input_ids, attention_mask)
        if mlm_input_ids.shape != input_ids.shape:
            raise ValueError(f"mlm_input_ids {tuple(mlm_input_ids.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}: mask a copy of the padded captions.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = mlm_row_indices(input_ids.shape[0], config.mlm_batch_fraction, first_row).to(input_ids.device)
        return (mlm_input_ids[rows], attention_mask[rows], mlm_labels[rows],
                {k: v[rows] for k, v in (text_kwargs or {}).items()}, rows)

    def soft_label_alpha(self, training_progress: float) -> float:
        """The soft labels' weight at `training_progress` (0 when the instance targets are not softened)."""
        config = self.config
        if not InstanceContrastiveLoss.softens(config):
            return 0.0
        return soft_label_alpha(training_progress, config.soft_label_max, config.soft_label_schedule)

    def mlm_active(self, training_progress: float) -> bool:
        """Whether this step trains MLM: it is on, and in training it has started (`mlm_start`)."""
        return self.mlm is not None and not (self.training and training_progress < self.config.mlm_start)

    @property
    def needs_image_stages(self) -> bool:
        """Whether `forward` reads the image tower's per-stage features (MLM fusion, or token alignment at an
        earlier stage): the model asks the tower for its hidden states only then."""
        return self.mlm is not None or (self.token is not None and self.config.vision_token_stage is not None)

    @property
    def row_decomposable(self) -> bool:
        """Whether every active objective is row-decomposable (`scoring_rows`): contrastive accumulation then
        computes them a block of rows at a time (every objective of this package is; one registered from outside
        may not be, and then the whole batch is computed at once)."""
        return all(objective.row_decomposable for objective in self.active())

    @property
    def needs_tokens(self) -> bool:
        """Whether `forward` reads token states (patch tokens, word states and the word mask): token alignment."""
        return self.token is not None

    def forward(
        self,
        features: TrainingFeatures,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        *,
        soft_label_alpha: float = 0.0,
        word_embeddings: torch.Tensor | None = None,
        targets: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            features: what the towers produced for this batch (`TrainingFeatures`); `masked_states` None while MLM
                has not started (`mlm_start`).
            logit_scale: the exp'ed scale; logit_bias: the sigmoid loss's learnable bias (None for softmax).
            soft_label_alpha: softening weight of the instance targets (applied in training only).
            word_embeddings: the text tower's word-embedding matrix, the tied MLM decoder (the one place the
                objectives reach into a tower's weights).
            targets: the batch's per-sample training targets (`TRAINING_TARGETS`): each objective reads its own.
        """
        targets = targets or {}
        step = ObjectiveStep(self.config, logit_scale, logit_bias, soft_label_alpha if self.training else 0.0,
                             word_embeddings)
        terms = {}
        with rows_of_this_step(features.num_rows, features.image_embeds.device):
            for objective in self.active():
                if objective.training_only and not self.training:
                    continue  # teacher targets and neighbours exist for training samples only
                _require_targets(targets, objective, self.config)
                terms.update(objective.compute(features, step, targets))
        loss = terms["instance"]
        for term, weight in loss_weights(self.config).items():
            if term in terms:
                loss = loss + weight * terms[term]
        terms["loss"] = loss
        return terms


def _require_targets(targets: dict, objective: Objective, config) -> None:
    missing = [key for key in objective.required(config) if key not in targets]
    if missing:
        raise ValueError(f"{objective.named(config)} needs {', '.join(missing)} in the batch's training targets: "
                         f"{objective.missing_fix}.")


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveStep",
    "TowerDims",
    "enabled_objectives",
    "loss_weight_fields",
    "loss_weights",
    "validate_config",
    "reads_teacher_knowledge",
    "register_objective",
    "training_targets_read",
    "TEACHER_TARGETS",
    "TOWER_TARGETS",
    "TRAINING_TARGETS",
    "CrossModalDistillationLoss",
    "FeatureDistillationLoss",
    "LightCLIPObjectives",
    "NeighbourContrastiveLoss",
    "NeighbourEmbeddingBank",
    "FrozenRelationLoss",
    "FusionBlock",
    "InBatchNeighbourLoss",
    "InstanceContrastiveLoss",
    "SigmoidInstanceLoss",
    "TrainingFeatures",
    "MaskedLanguageModelling",
    "TokenAlignmentLoss",
    "fine_grained_scores",
    "find_text_layers",
    "gather_no_grad",
    "gather_with_grad",
    "mask_for_mlm",
    "mask_tokens",
    "mlm_row_indices",
    "scoring_rows",
    "sigmoid_pair_loss",
    "soft_label_alpha",
    "sinkhorn_partial_matching",
    "soft_targets",
    "solve_word_patch_assignment",
    "training_targets_from",
]
