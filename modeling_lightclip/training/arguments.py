"""Command-line arguments of `train_lightclip.py` (training side; not remote code).

`ModelArguments` is generated from `LightCLIPConfig`'s fields: every scalar or list config field (objective
weights, soft-label schedule, fusion layers, ...) is a flag of the same name whose default `None` means "as the
recipe says". `LightCLIPTrainingArguments` is `TrainingArguments` with defaults right for contrastive training.
"""

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..configuration_lightclip import LightCLIPConfig


_NOT_FLAGS = {"vision_config", "text_config",
              # set from the data (teacher_features.setup_teacher_features): the training set's size, the teachers'
              # feature dimensions
              "ping_bank_size", "feature_distill_teacher_dims", "distill_teacher_dims", "distill_teacher_logit_scales"}


def _flag_type(annotation):
    """An argparse-friendly `X | None` type for a config field."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if isinstance(
        annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else [annotation]
    base = args[0] if args else str
    if base is list or typing.get_origin(base) is list:
        return typing.Optional[list[int]]
    return typing.Optional[base]


def _config_field_specs():
    specs = []
    for name, config_field in LightCLIPConfig.own_fields().items():
        if name in _NOT_FLAGS:
            continue
        default = None if config_field.default is dataclasses.MISSING else config_field.default
        specs.append((name, _flag_type(config_field.type),
                      field(default=None, metadata={"help": f"LightCLIPConfig.{name} (recipe/config default: "
                                                            f"{default!r})"})))
    return specs


CONFIG_FLAGS = [name for name, _, _ in _config_field_specs()]


@dataclass
class _ModelSource:
    recipe: str = field(default="default", metadata={
        "help": "Recipe name in configuration/ (e.g. default, tiny, resnet18, mobilenetv2, efficientnet_b0, vit_xs) "
                "or a path to a recipe JSON/YAML. Command-line flags override it."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Continue from a LightCLIP checkpoint (Hub id or folder) instead of building from the recipe."})
    vision_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Start the image tower from this pretrained checkpoint (Hub id or folder)."})
    timm_architecture: str | None = field(default=None, metadata={
        "help": "Build the image tower from scratch as this timm architecture (any name `timm.list_models()` knows, "
                "e.g. mobilenetv4_conv_small, fastvit_t8, repvit_m0_9), through transformers' TimmWrapper; it "
                "replaces the recipe's image tower. For timm's pretrained weights use --vision_model_name_or_path "
                "timm/NAME.TAG instead. Needs timm (pip install '.[timm]')."})
    text_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Start the text tower from this pretrained checkpoint (Hub id or folder)."})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "Tokenizer (Hub id or folder). Default: train a WordPiece tokenizer on the training captions."})
    tokenizer_vocab_size: int | None = field(default=None, metadata={"help": "Vocabulary size when training one."})
    license: str = field(default="apache-2.0", metadata={
        "help": "Licence the model card declares (a Hub licence id: apache-2.0, mit, cc-by-4.0, other, ...): choose "
                "one your training data and the towers' weights allow."})
    lora_r: int | None = field(default=None, metadata={
        "help": "Fine-tune --model_name_or_path with LoRA adapters of this rank (peft); the saved model is merged."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names to adapt (e.g. query,value), or peft's all-linear."})


ModelArguments = dataclasses.make_dataclass(
    "ModelArguments", _config_field_specs(), bases=(_ModelSource,),
)
ModelArguments.__doc__ = "Model source and every LightCLIPConfig field (None = as the recipe or checkpoint says)."


@dataclass
class LightCLIPTrainingArguments(TrainingArguments):
    """`TrainingArguments` with contrastive-training defaults: the last partial batch dropped (the global-batch
    loss needs equal batches on every rank), dataset columns kept for the collator, no `labels` (the eval loss is
    requested through `return_loss`), eval loss only from the loss loop."""

    output_dir: str | None = field(default="outputs/lightclip", metadata={"help": "Where checkpoints and the "
                                                                                   "final Hub-ready folder go."})
    dataloader_drop_last: bool = field(default=True)
    remove_unused_columns: bool = field(default=False)
    label_names: list[str] | None = field(default_factory=list)
    prediction_loss_only: bool = field(default=True)
    per_device_train_batch_size: int = field(default=128)
    per_device_eval_batch_size: int = field(default=256)
    learning_rate: float = field(default=1e-3)
    weight_decay: float = field(default=0.1)
    logging_steps: float = field(default=10)
    save_strategy: str = field(default="no")
    eval_strategy: str = field(default="no")
    do_train: bool = field(default=True)
    do_eval: bool = field(default=True)
    dataloader_num_workers: int = field(default=-1, metadata={
        "help": "Data-loading processes; -1 (default) = auto: on a GPU machine one per CPU core up to 16 (minus "
                "one for the training process), with persistent workers and a prefetch factor of 4; on CPU 0 "
                "(workers would take cores from the training step itself)."})
    channels_last: str = field(default="auto", metadata={
        "help": "Channels-last memory format for a convolutional image tower and its inputs: auto (on with CUDA "
                "and a CNN tower), true, false. Strides only: the saved weights are the same."})

    logging_nan_inf_filter: bool = field(default=False, metadata={
        "help": "The Trainer's filter that logs a NaN/Inf loss as the running average; off here, so divergence "
                "shows in the logs as nan/inf."})
    stop_after_bad_steps: int = field(default=5, metadata={
        "help": "Stop with an error after this many consecutive training steps whose loss was NaN/Inf, or whose "
                "batch held no usable sample (0: never)."})
    torch_compile_scope: str = field(default="towers", metadata={
        "help": "With --torch_compile: compile the two towers in place (`towers`, default: the objectives' "
                "data-dependent parts - matching, masking, gathers - stay eager, so nothing recompiles) or the whole "
                "model (`model`, the Trainer's own way)."})

    micro_batch_size: int | None = field(default=None, metadata={
        "help": "Compute each per-device batch this many rows at a time while every loss still sees the whole global "
                "batch (contrastive gradient accumulation: the towers run per micro-batch, the objectives once per "
                "batch; one extra forward pass of the towers). `--gradient_accumulation_steps K` means the same: a "
                "per-device batch of K x --per_device_train_batch_size, computed --per_device_train_batch_size rows at "
                "a time."})

    lock_image_tower: bool = field(default=False, metadata={
        "help": "Lock the image tower (LiT; OpenCLIP's --lock-image): its weights get no gradient and no optimizer "
                "state and come out bit for bit as they went in; its BatchNorm statistics stay frozen. For a "
                "pretrained tower (--vision_model_name_or_path, or a --model_name_or_path start)."})
    lock_image_unlocked_groups: int = field(default=0, metadata={
        "help": "With --lock_image_tower: leave the last N groups of the image tower trainable (its head, then its "
                "last stages or blocks; the stem is group 0)."})
    lock_text_tower: bool = field(default=False, metadata={
        "help": "Lock the text tower (OpenCLIP's --lock-text): no gradient, no optimizer state, weights unchanged."})
    lock_text_unlocked_layers: int = field(default=0, metadata={
        "help": "With --lock_text_tower: leave the last N groups of the text tower trainable (its final norm where it "
                "has one, then its last transformer layers; the embeddings are group 0)."})
    store_locked_text_outputs: bool = field(default=False, metadata={
        "help": "With the text tower locked whole: compute its outputs for every training caption once, store them "
                "beside the rows (OUTPUT_DIR/_reinforced, reused by later runs on the same data and tower) and train "
                "from them instead of running the tower at every step. Pays from the second epoch on; map-style "
                "data, one caption per row, no MLM or token alignment."})
    vision_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the image tower (default: --learning_rate). A pretrained tower usually wants one "
                "10-100x lower than the freshly initialised projections."})
    text_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the text tower (default: --learning_rate)."})

    def __post_init__(self):
        for side, flag in (("image", "lock_image_unlocked_groups"), ("text", "lock_text_unlocked_layers")):
            value = getattr(self, flag)
            if value < 0:
                raise ValueError(f"--{flag} {value}: >= 0.")
            if value and not getattr(self, f"lock_{side}_tower"):
                raise ValueError(f"--{flag} {value} leaves part of a locked tower trainable: add --lock_{side}_tower.")
        if self.store_locked_text_outputs and not (self.lock_text_tower and not self.lock_text_unlocked_layers):
            raise ValueError("--store_locked_text_outputs stores the outputs of a text tower that never changes: add "
                             "--lock_text_tower, without --lock_text_unlocked_layers.")
        for flag in ("vision_learning_rate", "text_learning_rate"):
            value = getattr(self, flag)
            if value is not None and not value >= 0:
                raise ValueError(f"--{flag} {value}: a learning rate >= 0.")
        for side, rate, unlocked in (("image", "vision_learning_rate", "lock_image_unlocked_groups"),
                                     ("text", "text_learning_rate", "lock_text_unlocked_layers")):
            if getattr(self, f"lock_{side}_tower") and not getattr(self, unlocked) and getattr(self, rate) is not None:
                raise ValueError(f"--{rate} {getattr(self, rate)}: the {side} tower is locked whole, so nothing trains "
                                 f"at that rate (drop it, or leave part unlocked with --{unlocked} N).")
        if self.torch_compile_scope not in ("towers", "model"):
            raise ValueError(f"--torch_compile_scope {self.torch_compile_scope!r}: choose towers or model.")
        self._contrastive_accumulation()
        resolve_switch("channels_last", self.channels_last, False)  # refuse a bad value at start-up
        if self.stop_after_bad_steps < 0:
            raise ValueError(f"--stop_after_bad_steps {self.stop_after_bad_steps}: >= 0 (0 never stops).")
        if self.dataloader_num_workers < -1:
            raise ValueError(f"--dataloader_num_workers {self.dataloader_num_workers}: -1 (auto) or >= 0.")
        if self.dataloader_num_workers == -1:
            self.dataloader_num_workers = auto_num_workers()
            if self.dataloader_num_workers > 0:
                self.dataloader_persistent_workers = True
                if self.dataloader_prefetch_factor is None:
                    self.dataloader_prefetch_factor = 4
        if not _accelerator_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator to copy to (torch warns otherwise)
        super().__post_init__()
        # `towers` scope: LightCLIPTrainer compiles the two towers in place and gives the Accelerator no dynamo
        # backend (it would compile the whole model as well); the flags stay as given, so the saved arguments say what
        # ran
        self.compile_towers = bool(self.torch_compile and self.torch_compile_scope == "towers")
        self.tower_compile_options = {}
        if self.compile_towers:
            self.tower_compile_options = {"backend": self.torch_compile_backend, "mode": self.torch_compile_mode}

    def _contrastive_accumulation(self) -> None:
        """`--gradient_accumulation_steps K` as contrastive accumulation: the Trainer's own accumulation would give
        each micro-batch a loss of its own (its own negatives, its own soft labels and relations: a weaker objective
        than the batch the run reports), so the per-device batch becomes K x --per_device_train_batch_size rows,
        computed --per_device_train_batch_size rows at a time by `ContrastiveAccumulation`, and the Trainer
        accumulates nothing."""
        steps = self.gradient_accumulation_steps
        if steps < 1:
            raise ValueError(f"--gradient_accumulation_steps {steps}: >= 1.")
        if steps > 1:
            if self.micro_batch_size is not None:
                raise ValueError(f"--gradient_accumulation_steps {steps} and --micro_batch_size "
                                 f"{self.micro_batch_size} both ask for accumulation: give the batch and one of them "
                                 "(--per_device_train_batch_size B --micro_batch_size b, or "
                                 "--per_device_train_batch_size b --gradient_accumulation_steps K).")
            self.micro_batch_size = self.per_device_train_batch_size
            self.per_device_train_batch_size *= steps
            self.gradient_accumulation_steps = 1
        if self.micro_batch_size is None:
            return
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro_batch_size {self.micro_batch_size}: >= 1.")
        if self.micro_batch_size >= self.per_device_train_batch_size:
            self.micro_batch_size = None  # one piece: nothing to accumulate
            return
        if self.deepspeed or self.fsdp:
            raise ValueError("contrastive accumulation (--gradient_accumulation_steps / --micro_batch_size) calls the "
                             "towers outside the wrapped model's forward, which DeepSpeed and FSDP need to see: train "
                             "with DDP (accelerate launch / torchrun), or without accumulation.")
        if self.torch_compile and self.torch_compile_scope == "model":
            raise ValueError("contrastive accumulation calls the towers and the objectives separately, so a compiled "
                             "whole model would never run: use --torch_compile_scope towers (the default).")

    @property
    def contrastive_accumulation_steps(self) -> int:
        """How many micro-batches each per-device batch is computed in (1: one piece)."""
        if not self.micro_batch_size:
            return 1
        return -(-self.per_device_train_batch_size // self.micro_batch_size)

    @property
    def compiles(self) -> bool:
        """Whether this run compiles (the towers, or the whole model through the Trainer)."""
        return bool(self.torch_compile)

    @property
    def on_cuda(self) -> bool:
        """Whether this run trains on a CUDA device (what the `auto` switches key on)."""
        import torch

        return bool(torch.cuda.is_available() and not self.use_cpu)

    def apply_tower_locks(self, model) -> None:
        """Lock the towers `--lock_image_tower` / `--lock_text_tower` ask for (the model's `lock_*_tower`)."""
        if self.lock_image_tower:
            model.lock_image_tower(self.lock_image_unlocked_groups)
        if self.lock_text_tower:
            model.lock_text_tower(self.lock_text_unlocked_layers)

    def use_channels_last(self, model) -> bool:
        """The resolved `--channels_last` for this model (auto: CUDA and a convolutional image tower)."""
        return resolve_switch("channels_last", self.channels_last, self.on_cuda and model.is_convolutional)


def resolve_switch(flag: str, value: str, auto: bool, on: str = "true", off: str = "false") -> bool:
    """An `auto | ON | OFF` flag -> bool, `auto` taking the value `auto`; any other value is refused naming the flag."""
    if value not in ("auto", on, off):
        raise ValueError(f"--{flag} {value!r}: choose auto, {on} or {off}.")
    return auto if value == "auto" else value == on


def _accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, MPS, XPU, ...) that pinned memory would be copied to."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return bool(torch.cuda.is_available())


def auto_num_workers() -> int:
    """Data-loading processes for `--dataloader_num_workers -1`: with a GPU, one per usable CPU core (one left for
    the training process) up to 16; without, 0."""
    import torch

    if not torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(torch.cuda.device_count(), 1) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else cores
    return max(0, min(16, per_process - 1))


def config_overrides(model_args) -> dict:
    """The LightCLIPConfig fields given on the command line (not None)."""
    return {name: getattr(model_args, name) for name in CONFIG_FLAGS if getattr(model_args, name) is not None}


__all__ = ["CONFIG_FLAGS", "LightCLIPTrainingArguments", "ModelArguments", "auto_num_workers", "config_overrides",
           "resolve_switch"]
