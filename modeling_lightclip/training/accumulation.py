"""Contrastive gradient accumulation: a batch larger than memory, trained as one batch (training side).

Plain gradient accumulation sums the gradients of k micro-batches, each with its own loss: a contrastive loss then
contrasts every sample with its own micro-batch only (b - 1 negatives instead of kb - 1), and distillation, soft
labels and CLIP-PING see b x b relations instead of kb x kb - a weaker objective than the batch the run reports.

`ContrastiveAccumulation` computes the loss of the whole batch instead, in three passes (the gradient cache of Gao et
al., 2021, as OpenCLIP's `--accum-freq` does for its losses):

1. every micro-batch through both towers without a graph, keeping only what the objectives read
   (`TrainingFeatures`: embeddings, token states, MLM's fused masked captions);
2. the objectives of the whole batch, on its features made leaves: the loss, and its gradient with respect to
   those features (and to the parameters the objectives use directly: logit scale and bias, the MLM decoder) -
   one micro-batch of rows at a time against the whole batch's columns, every objective of this package being
   row-decomposable (an objective registered from outside that is not makes the whole pass one piece). What an
   objective needs of the whole batch - token alignment's matching, CLIP-PING's bank reads and the bank write, the
   global counts - is computed once, by the first block;
3. every micro-batch through the towers again, this time with a graph, back-propagating its slice of that gradient.

Memory is that of one micro-batch's towers and images (the trainer keeps the batch's images on the host and moves
each micro-batch's there for passes 1 and 3: twice the host-to-device copy of the images, none of the batch held on
the device) plus the whole batch's features (B x D embeddings, and the token states when token alignment or MLM is
on) plus the objectives' matrices, b x B by row blocks (micro-batch b; token alignment's word-patch scores against
the batch a bounded chunk at a time, `similarity_cross_entropy`). Compute is one extra forward pass of the towers.
The loss, the terms and the gradients equal those of one batch of the full size, to float precision, for every
objective - with two caveats the tests pin down: dropout draws the same masks in passes 1 and 3 (the random state is
replayed per micro-batch) but not the same as one big call would; BatchNorm normalises each micro-batch by its own
statistics (as DDP does each process's share), and its running statistics are updated once per micro-batch (in pass
3).

Across processes each rank runs its local rows this way and the objectives gather features as usual; the
parameters' gradients are then averaged over ranks here (the towers are called outside DDP's forward, so DDP's own
reducer stays idle).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..objectives_lightclip import (TOWER_TARGETS, TrainingFeatures, _world, batch_sizes, first_global_row,
                                    mask_for_mlm, rows_of_this_step, scoring_rows, training_targets_from)


TOWER_INPUTS = ("input_ids", "pixel_values", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class _RandomState:
    """The random state a micro-batch's pass 1 started from, replayed for its pass 3 (dropout, MLM fallback)."""

    cpu: torch.Tensor
    cuda: list | None

    @classmethod
    def capture(cls) -> "_RandomState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _batch_norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [buffer for module in model.modules() if isinstance(module, nn.modules.batchnorm._NormBase)
            for buffer in module.buffers(recurse=False) if buffer is not None]


def micro_batches(num_rows: int, micro_batch_size: int) -> list[slice]:
    """Consecutive row ranges of at most `micro_batch_size` rows covering `num_rows` (the last may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size {micro_batch_size}: >= 1.")
    return [slice(start, min(start + micro_batch_size, num_rows)) for start in range(0, num_rows, micro_batch_size)]


class ContrastiveAccumulation:
    """One training step of `LightCLIPModel` over a batch, computed `micro_batch_size` rows at a time with the
    objectives of the whole batch (module docstring).

    Args:
        micro_batch_size: rows per tower call.
        autocast: a context manager factory for mixed precision (accelerate's `Accelerator.autocast`); the engine calls
            the towers and the objectives itself, outside the model's wrapped `forward`.
        backward: how the loss is back-propagated (accelerate's `Accelerator.backward`, which scales for fp16);
            default `Tensor.backward`.
        images_to_device: called on each micro-batch's `pixel_values` before each tower call (passes 1 and 3), so the
            whole batch's images may stay on the host and only one micro-batch of them occupies the device at a time
            (the trainer moves them there and normalises `--images_on_device` uint8 images); default: used as given.
    """

    def __init__(self, micro_batch_size: int, autocast=None, backward=None, images_to_device=None):
        self.micro_batch_size = int(micro_batch_size)
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size {micro_batch_size}: >= 1.")
        self.autocast = autocast or contextlib.nullcontext
        self.backward = backward or (lambda loss: loss.backward())
        self.images_to_device = images_to_device

    def step(self, model: nn.Module, inputs: dict, distributed_model: nn.Module | None = None) -> dict:
        """Back-propagate the loss of the batch `inputs` (the collator's batch: tower inputs and `training_targets`)
        into `model`'s gradients; returns the detached terms (`loss` and each objective's). `distributed_model`: the
        DDP wrapper around `model`, when there is one, whose gradients are averaged over ranks here."""
        targets = training_targets_from(inputs.get("training_targets"), {})
        tower_inputs = {k: inputs[k] for k in TOWER_INPUTS if inputs.get(k) is not None}
        rows = tower_inputs["input_ids"].shape[0]
        if model.objectives.mlm_active(model.training_progress) and "mlm_input_ids" not in targets:
            # one masking for the whole batch, as one call would draw it (forward's fallback masks per call)
            targets["mlm_input_ids"], targets["mlm_labels"] = mask_for_mlm(
                model.config, tower_inputs["input_ids"], tower_inputs.get("attention_mask"))
        pieces = micro_batches(rows, self.micro_batch_size)
        first_row = first_global_row(rows, tower_inputs["input_ids"].device)  # after the ranks before it

        def piece_inputs(piece):
            chunk = {k: v[piece] for k, v in tower_inputs.items()}
            if self.images_to_device is not None and "pixel_values" in chunk:
                chunk["pixel_values"] = self.images_to_device(chunk["pixel_values"])
            chunk["training_targets"] = {k: targets[k][piece] for k in TOWER_TARGETS if k in targets}
            return chunk

        # pass 1: features of every micro-batch, no graph; BatchNorm statistics restored afterwards (pass 3 updates)
        norm_buffers = _batch_norm_buffers(model)
        saved_buffers = [buffer.clone() for buffer in norm_buffers]
        states, parts = [], []
        with torch.no_grad():
            for piece in pieces:
                states.append(_RandomState.capture())
                with self.autocast():
                    parts.append(model.training_features(**piece_inputs(piece), first_row=first_row + piece.start))
        for buffer, saved in zip(norm_buffers, saved_buffers):
            buffer.copy_(saved)

        # pass 2: the objectives of the whole batch, on its features made leaves
        features = TrainingFeatures.concatenate(parts)
        masked_rows = [0 if part.masked_states is None else part.masked_states.shape[0] for part in parts]
        del parts  # the batch's features are held once, concatenated
        leaves = {}
        for name in TrainingFeatures.DIFFERENTIABLE:
            value = getattr(features, name)
            if value is not None and value.is_floating_point():
                leaf = value.detach().requires_grad_(True)
                setattr(features, name, leaf)
                leaves[name] = leaf
        if model.objectives.row_decomposable:
            terms = self._objectives_by_row_blocks(model, features, targets, rows)
        else:
            with self.autocast():
                terms = model.objective_terms(features, targets)
            self.backward(terms["loss"])

        # pass 3: each micro-batch's towers again, with a graph, fed its slice of the features' gradient
        masked_start = 0
        for piece, state, masked_count in zip(pieces, states, masked_rows):
            state.restore()
            with self.autocast():
                again = model.training_features(**piece_inputs(piece), first_row=first_row + piece.start)
            outputs, grads = [], []
            for name, leaf in leaves.items():
                if leaf.grad is None:
                    continue
                if name in TrainingFeatures.PER_MASKED_ROW:
                    grad = leaf.grad[masked_start:masked_start + masked_count]
                else:
                    grad = leaf.grad[piece]
                output = getattr(again, name)
                if output is not None and output.requires_grad:
                    outputs.append(output)
                    grads.append(grad.to(output.dtype))
            masked_start += masked_count
            if outputs:
                torch.autograd.backward(outputs, grads)

        if distributed_model is not None and _world()[1] > 1:
            average_gradients(model)
            broadcast_batch_norm_buffers(model)
        return {name: value.detach() for name, value in terms.items() if torch.is_tensor(value)}

    def _objectives_by_row_blocks(self, model: nn.Module, features: TrainingFeatures, targets: dict,
                                  rows: int) -> dict:
        """Pass 2 for row-decomposable objectives: `micro_batch_size` of this rank's rows at a time scored against the
        whole global batch (`scoring_rows`), each block's loss back-propagated at once, so no objective ever holds more
        than micro-batch x global-batch of a matrix. The blocks' terms and gradients sum to the whole batch's. Every
        rank runs as many blocks as the rank with the most rows (the gathers are collectives); a rank out of rows
        scores an empty block."""
        device = features.image_embeds.device
        with rows_of_this_step(rows, device):
            longest = max(batch_sizes(rows, device))
            totals, step_cache = {}, {}  # what the first block computes for the whole batch (`once_per_step`)
            for start in range(0, max(longest, 1), self.micro_batch_size):
                block = slice(min(start, rows), min(start + self.micro_batch_size, rows))
                with scoring_rows(block, rows, step_cache):
                    with self.autocast():
                        terms = model.objective_terms(features, targets)
                    self.backward(terms["loss"])
                for name, value in terms.items():
                    if torch.is_tensor(value):
                        totals[name] = totals.get(name, 0) + value.detach()
        return totals


def average_gradients(model: nn.Module) -> None:
    """Average every trainable parameter's gradient over the ranks (what DDP's reducer does), a parameter without a
    gradient on this rank counting as zero; one flattened all-reduce per dtype."""
    _, world = _world()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype = {}
    for p in params:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_batch_norm_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm running statistics on every rank (DDP's `broadcast_buffers`)."""
    for buffer in _batch_norm_buffers(model):
        dist.broadcast(buffer, src=0)


__all__ = ["ContrastiveAccumulation", "TOWER_INPUTS", "average_gradients", "micro_batches"]
