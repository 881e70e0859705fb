"""Trainer pieces for contrastive training (training side; not remote code).

* `LightCLIPCallback` feeds training progress (global_step / max_steps) to the model's progressive soft labels at
  the start of every optimiser step and clamps the logit scale to `logit_scale_max` after it.
* `LightCLIPTrainer` is the HF `Trainer` with weight decay only on matrices (biases, every norm's weights, the
  logit scale and the fusion gates are excluded, as in CLIP/OpenCLIP), and each objective's term logged beside
  the total loss.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .benchmark import evaluate_benchmark
from .evaluation import class_text_embeddings, embed_pairs, retrieval_metrics, sum_over_processes, zero_shot_metrics
from .packaged_weights import shape_mismatches


logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (it could not train); the message says why and what to do."""


def unwrap_model(model):
    """The LightCLIPModel inside DDP/DeepSpeed/compile wrappers (accelerate's unwrapping) and a peft wrapper."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


PING_BANK_FILE = "ping_bank.pt"
# What a resume needs besides the weights: the Trainer writes these, trainer_state.json last.
CHECKPOINT_STATE = ("optimizer.pt", "scheduler.pt")
_NO_SPACE_MARKERS = ("no space left", "os error 28", "code: 28", "iostream error", "unexpected pos",
                     "file write failed", "pytorchstreamwriter", "disk quota")


def _checkpoint_needs_bank(path: Path) -> bool:
    from ..configuration_lightclip import LightCLIPConfig

    try:
        return LightCLIPConfig.from_pretrained(path).uses_ping_bank
    except (OSError, ValueError):
        return False


def _safetensors_header(path: Path) -> tuple[dict | None, str | None]:
    """(its header, None) when `path` is a whole safetensors file: its header parses and its data reaches the file's
    end; else (None, what is wrong)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                return None, "truncated (header)"
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            return None, f"truncated ({size} of {8 + length + max(ends)} bytes)"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return None, f"unreadable ({type(err).__name__})"
    return header, None


def _weights_problem(path: Path, header: dict) -> str | None:
    """None when the checkpoint's weights (`header`: its model.safetensors header) have the shapes its own
    config.json builds (the model is built on the meta device: no memory, no initialisation)."""
    from ..configuration_lightclip import LightCLIPConfig
    from ..modeling_lightclip import LightCLIPModel

    try:
        with torch.device("meta"):
            model = LightCLIPModel(LightCLIPConfig.from_pretrained(path))
    except Exception as err:  # noqa: BLE001 - any config this version cannot build makes the checkpoint unusable
        return f"not loadable with its config.json ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    wrong = shape_mismatches(model, {name: entry.get("shape", []) for name, entry in header.items()
                                     if isinstance(entry, dict)})
    if wrong:
        return (f"of another model than its config.json describes: {len(wrong)} weight(s) of another shape, e.g. "
                + "; ".join(wrong[:2]))
    return None


def _torch_file_problem(path: Path) -> str | None:
    """None when `path` is a whole `torch.save` archive (a zip whose members all pass their CRC check)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return None if bad is None else f"corrupt member {bad}"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"truncated or unreadable ({type(err).__name__})"


def checkpoint_problem(path, require_bank: bool | None = None) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, or None when it is complete: config and weights whole
    (safetensors header and length), optimizer, scheduler and RNG state present and readable, the trainer state
    (written last) parsing, and the CLIP-PING bank when `require_bank` (None: when the checkpoint's config uses it)."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    for name in ("config.json", "model.safetensors", *CHECKPOINT_STATE, "trainer_state.json"):
        if not (path / name).is_file():
            return f"{name} is missing"
    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    parsed = {}
    for name in ("trainer_state.json", "config.json"):
        try:
            parsed[name] = json.loads((path / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name} is truncated or unreadable ({type(err).__name__})"
        if not isinstance(parsed[name], dict):
            return f"{name} is not a JSON object (a {type(parsed[name]).__name__})"
    step = parsed["trainer_state.json"].get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"trainer_state.json's global_step is {step!r}, not a step number"
    header, problem = _safetensors_header(path / "model.safetensors")
    problem = problem or _weights_problem(path, header)
    if problem:
        return f"model.safetensors is {problem}"
    for file in [path / name for name in CHECKPOINT_STATE] + rng:
        problem = _torch_file_problem(file)
        if problem:
            return f"{file.name} is {problem}"
    if require_bank is None:
        require_bank = _checkpoint_needs_bank(path)
    if require_bank:
        if not (path / PING_BANK_FILE).is_file():
            return f"{PING_BANK_FILE} (the CLIP-PING bank) is missing"
        problem = _torch_file_problem(path / PING_BANK_FILE)
        if problem:
            return f"{PING_BANK_FILE} is {problem}"
    return None


def latest_complete_checkpoint(output_dir, require_bank: bool | None = None,
                               skipped: list | None = None) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that `checkpoint_problem` finds complete. A run killed (or out of
    disk) while saving leaves files missing or truncated: such a folder is skipped, with a warning saying why (and,
    when `skipped` is given, appended to it as (folder, problem))."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-")[-1]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path, require_bank)
        if problem is None:
            return str(path)
        logger.warning("skipping %s: %s", path, problem)
        if skipped is not None:
            skipped.append((path, problem))
    return None


def last_finite_checkpoint(output_dir) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` whose weights are all finite, or None."""
    from safetensors import safe_open

    output_dir = Path(output_dir)
    found = sorted(((int(p.name.split("-")[-1]), p) for p in output_dir.glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-")[-1].isdigit()), reverse=True) if output_dir.is_dir() else []
    for _, path in found:
        if checkpoint_problem(path) is not None:
            continue
        with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
            if all(bool(torch.isfinite(weights.get_tensor(key)).all()) for key in weights.keys()):
                return str(path)
    return None


def resolve_checkpoint(training_args) -> str | None:
    """`--resume_from_checkpoint PATH` (verified), or `latest` for the newest complete checkpoint in --output_dir."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if value in ("latest", "true", "True"):
        skipped = []
        found = latest_complete_checkpoint(training_args.output_dir, skipped=skipped)
        if found is None:
            why = "; ".join(f"{path.name}: {problem}" for path, problem in skipped[:3])  # the newest three
            hint = (" (--save_only_model writes no optimizer or scheduler state: such a checkpoint cannot be "
                    "resumed, only loaded with --model_name_or_path)" if "optimizer.pt is missing" in why else "")
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in "
                                    f"{training_args.output_dir}" + (f" ({why}){hint}" if why else ""))
        return found
    problem = checkpoint_problem(value)
    if problem:
        raise ValueError(f"--resume_from_checkpoint {value}: cannot resume, {problem}. Pass another checkpoint, or "
                         "`latest` for the newest complete one.")
    return value


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or any exception chained to it, says the disk is full: errno ENOSPC / EDQUOT, or the words
    the writers use for it (safetensors' `os error 28` / `code: 28`, torch's zip writer `unexpected pos` /
    `basic_ios::clear: iostream error`, `No space left on device`)."""
    return _has_errno(err) or any(marker in str(link).lower() for link in _chain(err) for marker in _NO_SPACE_MARKERS)


def _chain(err: BaseException):
    """`err` and every exception chained under it (`raise ... from`, or raised while handling), each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _has_errno(err: BaseException) -> bool:
    return any(getattr(link, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for link in _chain(err))


@contextlib.contextmanager
def writing_to(folder, then: str = "free some space or point --output_dir at a larger disk, then resume with "
                                   "--resume_from_checkpoint latest."):
    """Turn a full disk while saving - wherever it surfaces: an OSError ENOSPC, safetensors' `SafetensorError ...
    (os error 28)`, torch's zip writer, or any of them chained under another error - into one message naming the
    folder, the space left and `then`, what to do (by default: the resume command); any other error passes
    unchanged."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - the writers' errors share no base class; others are re-raised
        if not is_disk_full(err):
            raise
        try:
            free = shutil.disk_usage(Path(folder).resolve()).free
        except OSError:
            free = None
        if free is not None and free > 256 * 2**20 and not _has_errno(err):
            raise  # the words matched but the disk has room: a write failed for another reason, keep the error
        left = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
        raise TrainingStopped(f"no space left on device while writing to {folder} ({left}): {then}") from err


class LightCLIPCallback(TrainerCallback):
    """Progress for the soft-label schedule before each step; logit-scale clamp after each step; the CLIP-PING
    embedding bank saved into each checkpoint (it is not part of the weights)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model) if model is not None else None
        ping = getattr(getattr(model, "objectives", None), "ping", None)
        if getattr(ping, "bank", None) is None or not args.should_save:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            tmp = folder / (PING_BANK_FILE + ".tmp")
            torch.save({k: v.cpu() for k, v in ping.bank.state_dict().items()}, tmp)
            os.replace(tmp, folder / PING_BANK_FILE)  # atomic: a kill leaves no half-written bank

    def __init__(self, collator=None):
        self.collator = collator

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._set_progress(state, model)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.collator is not None and hasattr(self.collator, "epoch"):
            self.collator.epoch = int(state.epoch or 0)  # the collator's per-batch randomness depends on it

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set_progress(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = unwrap_model(model) if model is not None else None
        if model is not None and hasattr(model, "clamp_logit_scale_"):
            model.clamp_logit_scale_()

    @staticmethod
    def _set_progress(state, model):
        model = unwrap_model(model) if model is not None else None
        if model is not None and hasattr(model, "set_training_progress") and state.max_steps:
            model.set_training_progress(state.global_step / state.max_steps)


def skip_metric_name(reason: str) -> str:
    """The logged / saved name of a collator count: repairs keep their `repaired_*` name, skips get `skipped_`."""
    return reason if reason.startswith("repaired_") else f"skipped_{reason}"


def compile_towers(model, backend: str | None = None, mode: str | None = None) -> None:
    """`torch.compile` the image and text towers in place (`nn.Module.compile`: parameter names, saving and
    loading unchanged). The objectives stay eager: the bipartite matching (scipy), the masking and the cross-rank
    gathers have data-dependent shapes that would break graphs and recompile."""
    options = {k: v for k, v in (("backend", backend), ("mode", mode)) if v is not None}
    model.vision_model.compile(**options)
    model.text_model.compile(**options)


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Weight decay on matrices and kernels only (ndim >= 2): biases, LayerNorm/BatchNorm/GroupNorm weights,
    scalar gates, the logit scale and bias are all 1-D or 0-D and stay undecayed."""
    return [name for name, param in model.named_parameters()
            if param.ndim >= 2 and "logit_scale" not in name and "logit_bias" not in name]


def tower_of(name: str) -> str:
    """Which learning-rate group a parameter name belongs to: `vision`, `text` or `other`."""
    for prefix, side in (("vision_model.", "vision"), ("text_model.", "text")):
        if name.startswith(prefix) or f".{prefix}" in name:  # also under a peft / compile wrapper's prefix
            return side
    return "other"


def optimizer_param_groups(model: torch.nn.Module, decay_names, args) -> list[dict]:
    """The trainable parameters in up to six named groups, (vision | text | other) x (decay | no_decay): each tower at
    its learning rate (`args.vision_learning_rate` / `args.text_learning_rate`, default `args.learning_rate`), decay
    `args.weight_decay` on `decay_names`. Parameters without a gradient (locked) are left out."""
    decay_names = set(decay_names)
    rates = {"vision": getattr(args, "vision_learning_rate", None), "text": getattr(args, "text_learning_rate", None)}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        side, decays = tower_of(name), name in decay_names
        key = (side, decays)
        if key not in groups:
            groups[key] = {"name": f"{side}_{'decay' if decays else 'no_decay'}", "params": [],
                           "weight_decay": args.weight_decay if decays else 0.0,
                           "lr": rates.get(side) if rates.get(side) is not None else args.learning_rate}
        groups[key]["params"].append(param)
    return list(groups.values())


class LightCLIPTrainer(Trainer):
    """`Trainer` for LightCLIP: decay groups as CLIP, per-objective loss terms logged, callback installed, and
    evaluation that adds zero-shot accuracy and retrieval recall to the eval loss.

    Args beyond `Trainer`'s:
        eval_collator: collator for evaluation embeddings (no augmentation, no masking, with class labels).
        class_names, zero_shot_templates: for zero-shot classification of the eval split (skipped when None).
        benchmark_sets: `benchmark.BenchmarkSet`s scored at each evaluation, after the eval split.
    """

    def __init__(self, *args, callbacks=None, eval_collator=None, class_names=None, zero_shot_templates=None,
                 benchmark_sets=None, **kwargs):
        self.eval_collator = eval_collator
        self.benchmark_sets = list(benchmark_sets or [])
        self.class_names = class_names
        self.zero_shot_templates = zero_shot_templates
        training_args = kwargs.get("args")
        compiling_towers = getattr(training_args, "compile_towers", False)
        if compiling_towers:  # in place; the Accelerator compiles nothing (below)
            compile_towers(unwrap_model(kwargs["model"]), **training_args.tower_compile_options)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, LightCLIPCallback) for c in callbacks):
            callbacks.append(LightCLIPCallback(kwargs.get("data_collator")))
        if compiling_towers:  # the Accelerator built now gets no dynamo backend: it would compile the whole model
            given = training_args.torch_compile_backend, training_args.torch_compile_mode
            training_args.torch_compile_backend = training_args.torch_compile_mode = None
        try:
            super().__init__(*args, callbacks=callbacks, **kwargs)
        finally:
            if compiling_towers:  # the arguments (and the saved training_args.bin) say what ran
                training_args.torch_compile_backend, training_args.torch_compile_mode = given
        self._term_sums = defaultdict(float)
        self._term_count = 0
        self._skipped = Counter()       # bad samples of the batches trained on, by reason
        self._trained_samples = 0
        self._bad_steps = Counter()     # consecutive steps with no usable sample / a non-finite loss

    def _empty_batch_loss(self, model, return_outputs):
        """Every sample of this batch was bad (and skipped): a zero loss that still reaches every parameter, so
        the optimiser step happens as usual. With several processes every process takes this path in the same step
        (`_usable_on_every_process`), so the gradients are zero everywhere without an all-reduce."""
        loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return (loss, {"loss": loss}) if return_outputs else loss

    def get_train_dataloader(self):
        """CLIP-PING with in-batch neighbours trains on (anchor, neighbour) pairs laid out by `NeighbourPairSampler`;
        every other run takes the Trainer's own loader."""
        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        from .neighbours import NeighbourPairSampler

        config = getattr(self.data_collator, "model_config", None)
        neighbours = getattr(self.data_collator, "neighbours", None)
        if config is None or neighbours is None or not config.uses_ping_in_batch:
            return super().get_train_dataloader()
        args = self.args
        if args.per_device_train_batch_size % 2:
            raise ValueError("ping_positives='in_batch' lays batches out in (anchor, neighbour) pairs: use an even "
                             "--per_device_train_batch_size.")
        workers = args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset, batch_size=args.train_batch_size,
            sampler=NeighbourPairSampler(neighbours, len(self.train_dataset), args.seed),
            collate_fn=self.data_collator, drop_last=args.dataloader_drop_last, num_workers=workers,
            pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers if workers
            else False, prefetch_factor=args.dataloader_prefetch_factor if workers else None,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index))
        return self.accelerator.prepare(loader)

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def get_optimizer_cls_and_kwargs(self, args, model=None):
        """The Trainer's optimizer class and settings, with the parameters in named groups (`optimizer_param_groups`):
        each tower at its own learning rate (`--vision_learning_rate`, `--text_learning_rate`), the rest (projections,
        logit scale, training-only modules) at `--learning_rate`; decay as `get_decay_parameter_names`. Locked
        parameters (no gradient) are in no group, so the optimizer keeps no state for them. The Trainer builds the
        optimizer from the `params` it is handed here."""
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if model is None or any(key in optimizer_kwargs for key in ("params", "model", "optimizer_dict")):
            return optimizer_cls, optimizer_kwargs  # an optimizer that builds its own groups (GaLore, LOMO, ...)
        groups = optimizer_param_groups(model, self.get_decay_parameter_names(model), args)
        return optimizer_cls, {**optimizer_kwargs, "params": groups}

    def _usable_on_every_process(self, inputs: dict) -> dict:
        """The batch, or, when another process's batch holds no usable sample, the batch without its samples (each
        counted as `other_process_batch_empty`). The objectives gather every process's rows, so a process left with
        none cannot sit a step out alone: every process then skips this step's loss together. Processes may keep
        different numbers of samples otherwise (the objectives' global batch is their concatenation). Costs one
        all-reduce of a count per step with several processes."""
        if self.accelerator.num_processes == 1:
            return inputs
        import torch.distributed as dist

        rows = int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0
        fewest = torch.tensor([rows], dtype=torch.long, device=self.accelerator.device)
        dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
        if int(fewest.item()) > 0 or rows == 0:
            return inputs
        skipped = Counter(inputs.get("skipped") or {})
        skipped["other_process_batch_empty"] += rows
        return {"skipped": dict(skipped), "empty_batch": torch.zeros(0, dtype=torch.long), "return_loss": True}

    def _model_inputs(self, model, inputs) -> dict | None:
        """The collator's batch as the model's inputs: bad-sample counts recorded (training), uint8 images
        normalised on the device (`--images_on_device`); None when no usable sample is left."""
        skipped = inputs.get("skipped") or {}
        if model.training:
            self._skipped.update({k: int(v) for k, v in skipped.items()})
            self._count_bad_step("empty", "pixel_values" not in inputs)
        inputs = {k: v for k, v in inputs.items() if k not in ("return_loss", "skipped", "empty_batch")}
        if "pixel_values" not in inputs:
            return None
        if model.training:
            self._trained_samples += int(inputs["pixel_values"].shape[0])
        if inputs["pixel_values"].dtype == torch.uint8:  # `--images_on_device`: scaled and normalised here
            from .data import normalize_on_device

            inputs["pixel_values"] = normalize_on_device(inputs["pixel_values"], self.processing_class.image_processor)
        return inputs

    def _record_terms(self, terms: dict) -> None:
        for name, value in terms.items():
            if torch.is_tensor(value) and value.dim() == 0:
                self._term_sums[name] += float(value.detach())
        self._term_count += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self._model_inputs(model, inputs)
        if inputs is None:
            return self._empty_batch_loss(model, return_outputs)
        outputs = model(**inputs, return_loss=True)
        loss = outputs["loss"]
        if model.training and outputs.get("losses"):
            self._record_terms(outputs["losses"])
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        micro = getattr(self.args, "micro_batch_size", None)
        if not micro and self.args.gradient_accumulation_steps > 1:
            raise ValueError("the Trainer's gradient accumulation would give each micro-batch a contrastive loss of its "
                             "own (a weaker objective than the batch it reports): train with "
                             "LightCLIPTrainingArguments, which turns --gradient_accumulation_steps into contrastive "
                             "accumulation over the whole batch.")
        inputs = self._usable_on_every_process(inputs)
        rows = inputs.get("input_ids")
        if micro and rows is not None and rows.shape[0] > micro:
            loss = self._accumulated_training_step(model, inputs, micro)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._count_bad_step("non_finite", not bool(torch.isfinite(loss)))
        return loss

    def _accumulated_training_step(self, model, inputs, micro_batch_size: int) -> torch.Tensor:
        """`training_step` for a batch computed `micro_batch_size` rows at a time with the whole batch's objectives
        (`ContrastiveAccumulation`); the optimiser step after it is the Trainer's, as usual."""
        from .accumulation import ContrastiveAccumulation

        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._model_inputs(model, self._prepare_inputs(inputs))
        if inputs is None:
            loss = self._empty_batch_loss(model, False)
            self.accelerator.backward(loss)
            return loss.detach()
        engine = ContrastiveAccumulation(micro_batch_size, autocast=self.accelerator.autocast,
                                         backward=self.accelerator.backward)
        inner = unwrap_model(model)
        terms = engine.step(inner, inputs, distributed_model=model if model is not inner else None)
        self._record_terms({k: v for k, v in terms.items() if k != "loss"})
        return terms["loss"]

    def _count_bad_step(self, kind: str, bad: bool) -> None:
        """Stop (`TrainingStopped`) after `--stop_after_bad_steps` consecutive steps of one kind: no usable sample in
        the batch, or a NaN/Inf loss (logged as such: `logging_nan_inf_filter` is off)."""
        self._bad_steps[kind] = self._bad_steps[kind] + 1 if bad else 0
        limit = getattr(self.args, "stop_after_bad_steps", 0)
        if not limit or self._bad_steps[kind] < limit:
            return
        step = self.state.global_step + 1  # the step under way
        if kind == "empty":
            counts = ", ".join(f"{n} {reason}" for reason, n in self._skipped.most_common(4))
            raise TrainingStopped(f"stopped at step {step}: {limit} batches in a row held no usable sample "
                                  f"(skipped so far: {counts}). Clean the data or check --image_column / "
                                  "--caption_column.")
        raise TrainingStopped(f"stopped at step {step}: the loss was NaN or infinite for {limit} steps in a row. "
                              "Lower --learning_rate, keep --max_grad_norm on, train in bf16 rather than fp16, or "
                              "check the data; the last good checkpoint (if any) is in --output_dir.")

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        trained = sum_over_processes(Counter(samples=self._trained_samples), self.accelerator)["samples"]
        if trained == 0 and self.state.global_step > 0:
            raise TrainingStopped(f"{self.state.global_step} steps ran but no sample was trained on: every batch was "
                                  f"skipped as bad data ({dict(self.training_skip_counts())}).")
        return result

    def check_finite_before_saving(self) -> None:
        """Never save a model that is not finite: every parameter NaN/Inf-free and the last step's loss finite;
        otherwise stop (`TrainingStopped`) naming the newest complete checkpoint whose weights are finite."""
        model = unwrap_model(self.model)
        bad = [name for name, param in model.named_parameters() if not bool(torch.isfinite(param).all())]
        last_loss_bad = self._bad_steps["non_finite"] > 0
        if not bad and not last_loss_bad:
            return
        what = (f"{len(bad)} of {sum(1 for _ in model.parameters())} weight tensors hold NaN or Inf (e.g. {bad[0]})"
                if bad else "the loss of the last training step was NaN or infinite")
        good = last_finite_checkpoint(self.args.output_dir)
        where = (f"the last good checkpoint is {good} (continue with --resume_from_checkpoint {good} and a lower "
                 "--learning_rate)" if good else "no finite checkpoint was saved (--save_strategy steps keeps some)")
        raise TrainingStopped(f"training ended with a non-finite model: {what}. Nothing was saved as the final model; "
                              f"{where}. Lower --learning_rate, keep --max_grad_norm on, or train in bf16 rather than "
                              "fp16.")

    def training_skip_counts(self) -> Counter:
        """The bad samples of the batches trained on (not those the loader prefetched), by reason, summed over
        processes; they travel with each batch, so loader workers do not hide them."""
        return sum_over_processes(self._skipped, self.accelerator)

    def get_eval_dataloader(self, eval_dataset=None):
        """The eval loss sees evaluation inputs (no augmentation, no neighbour ids, no class labels) and every sample:
        the last partial batch is kept, whatever --dataloader_drop_last says for training."""
        original, drop_last = self.data_collator, self.args.dataloader_drop_last
        if self.eval_collator is not None:
            self.data_collator = dataclasses.replace(self.eval_collator, label_column=None, skipped=Counter())
        self.args.dataloader_drop_last = False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator, self.args.dataloader_drop_last = original, drop_last

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """A batch whose samples were all bad has no loss: left out of `eval_loss` rather than counted as 0 (with
        several processes, the step's batches of every process are left out together)."""
        if "pixel_values" not in self._usable_on_every_process(inputs):
            return None, None, None
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        self._current_eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return super().evaluate(eval_dataset, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.eval_collator is not None:
            extra = self.embedding_metrics(getattr(self, "_current_eval_dataset", None))
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.benchmark_metrics().items()})
        return output

    def benchmark_metrics(self) -> dict:
        """Each benchmark set's metrics (`<set>_<metric>`, as `lightclip-eval` computes them) and the seconds it
        took (`<set>_seconds`), the samples shared across processes."""
        metrics = {}
        for benchmark in self.benchmark_sets:
            started = time.perf_counter()
            scores = evaluate_benchmark(unwrap_model(self.model), self.processing_class, benchmark,
                                        self.args.per_device_eval_batch_size)
            metrics.update({f"{benchmark.slug}_{key}": value for key, value in scores.items()})
            metrics[f"{benchmark.slug}_seconds"] = round(time.perf_counter() - started, 2)
        return metrics

    def embedding_metrics(self, dataset=None) -> dict:
        """Zero-shot top-1/top-5 (when class names are known) and retrieval R@1/5/10 on the eval split."""
        from torch.utils.data import DataLoader

        dataset = dataset if dataset is not None else self.eval_dataset
        accelerator = self.accelerator if self.accelerator.num_processes > 1 else None
        if accelerator is not None:  # each process embeds its own rows, once (`embed_pairs` gathers them)
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=accelerator.process_index,
                                            world_size=accelerator.num_processes)
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.eval_collator, num_workers=self.args.dataloader_num_workers)
        this_pass = Counter()
        model = unwrap_model(self.model)
        images, texts, captions, labels = embed_pairs(model, loader, accelerator, skipped=this_pass)
        metrics = retrieval_metrics(images, texts, captions)
        if self.class_names and labels is not None:
            tokenizer = self.processing_class.tokenizer
            class_embeds = class_text_embeddings(model, tokenizer, self.class_names,
                                                 self.zero_shot_templates or ["a photo of a {}."])
            metrics.update(zero_shot_metrics(images, labels, class_embeds))
        metrics["num_samples"] = images.shape[0]
        dropped = {k: v for k, v in this_pass.items() if k != "empty_batch" and not k.startswith("repaired_")}
        if dropped:
            metrics["skipped_samples"] = sum(dropped.values())
            metrics.update({skip_metric_name(k): v for k, v in dropped.items()})
        return metrics

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._term_count:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(total / self._term_count, 4)
            model = unwrap_model(self.model)
            if hasattr(model, "soft_label_alpha"):
                logs["soft_label_alpha"] = round(model.soft_label_alpha, 4)
            if hasattr(model, "logit_scale"):
                logs["logit_scale"] = round(float(model.logit_scale.detach().exp()), 3)
            if getattr(model, "logit_bias", None) is not None:
                logs["logit_bias"] = round(float(model.logit_bias.detach()), 3)
            self._term_sums.clear()
            self._term_count = 0
        if "loss" in logs and self._skipped:  # cumulative counts of bad training samples, by reason
            for reason, count in self._skipped.items():
                logs[skip_metric_name(reason)] = count
        super().log(logs, *args, **kwargs)


def load_ping_bank(model, checkpoint) -> bool:
    """Restore the CLIP-PING bank saved with a checkpoint; False when there is none to restore."""
    ping = getattr(getattr(unwrap_model(model), "objectives", None), "ping", None)
    path = Path(checkpoint) / PING_BANK_FILE
    if getattr(ping, "bank", None) is None or not path.is_file():
        return False
    ping.bank.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


__all__ = ["LightCLIPCallback", "LightCLIPTrainer", "TrainingStopped", "checkpoint_problem", "compile_towers",
           "decay_parameter_names", "is_disk_full", "latest_complete_checkpoint", "load_ping_bank",
           "optimizer_param_groups", "resolve_checkpoint", "tower_of",
           "skip_metric_name", "unwrap_model", "writing_to"]
