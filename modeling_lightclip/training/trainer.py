"""Trainer pieces for contrastive training (training side; not remote code).

* `LightCLIPCallback` feeds training progress (global_step / max_steps) to the model's progressive soft labels at
  the start of every optimiser step and clamps the logit scale to `logit_scale_max` after it.
* `LightCLIPTrainer` is the HF `Trainer` with weight decay only on matrices (biases, every norm's weights, the
  logit scale and the fusion gates are excluded, as in CLIP/OpenCLIP), and each objective's term logged beside
  the total loss.
"""

import dataclasses
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .evaluation import class_text_embeddings, embed_pairs, retrieval_metrics, zero_shot_metrics


def unwrap_model(model):
    """The LightCLIPModel inside DDP/DeepSpeed/compile wrappers (accelerate's unwrapping) and a peft wrapper."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


PING_BANK_FILE = "ping_bank.pt"
CHECKPOINT_REQUIRED = ("config.json", "model.safetensors", "trainer_state.json")


def _checkpoint_needs_bank(path: Path) -> bool:
    from ..configuration_lightclip import LightCLIPConfig

    try:
        return LightCLIPConfig.from_pretrained(path).uses_ping_bank
    except (OSError, ValueError):
        return False


def _checkpoint_complete(path: Path, require_bank: bool | None = None) -> bool:
    """All files a resume needs are there and the trainer state (written last) parses. The CLIP-PING bank is
    required when `require_bank`, or (None) when the checkpoint's own config has CLIP-PING with the bank on."""
    if not all((path / name).is_file() for name in CHECKPOINT_REQUIRED):
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if require_bank is None:
        require_bank = _checkpoint_needs_bank(path)
    return not require_bank or (path / PING_BANK_FILE).is_file()


def latest_complete_checkpoint(output_dir, require_bank: bool | None = None) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was completely written. A run killed while saving leaves a
    checkpoint without its trainer state (the Trainer writes it last) or without the CLIP-PING bank (written right
    after): such a folder is skipped, never resumed from."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-")[-1]
        if path.is_dir() and suffix.isdigit() and _checkpoint_complete(path, require_bank):
            found.append((int(suffix), path))
    return str(max(found)[1]) if found else None


def resolve_checkpoint(training_args) -> str | None:
    """`--resume_from_checkpoint PATH`, or `latest` for the newest complete checkpoint in --output_dir."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if value in ("latest", "true", "True"):
        found = latest_complete_checkpoint(training_args.output_dir)
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in "
                                    f"{training_args.output_dir}")
        return found
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


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


def compile_towers(model, backend: str | None = None, mode: str | None = None) -> None:
    """`torch.compile` the image and text towers in place (`nn.Module.compile`: parameter names, saving and
    loading unchanged). The objectives stay eager: the bipartite matching (scipy), the masking and the cross-rank
    gathers have data-dependent shapes that would break graphs and recompile."""
    options = {k: v for k, v in (("backend", backend), ("mode", mode)) if v is not None}
    model.vision_model.compile(**options)
    model.text_model.compile(**options)


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Weight decay on matrices and kernels only (ndim >= 2): biases, LayerNorm/BatchNorm/GroupNorm weights,
    scalar gates and the logit scale are all 1-D or 0-D and stay undecayed."""
    return [name for name, param in model.named_parameters() if param.ndim >= 2 and "logit_scale" not in name]


class LightCLIPTrainer(Trainer):
    """`Trainer` for LightCLIP: decay groups as CLIP, per-objective loss terms logged, callback installed, and
    evaluation that adds zero-shot accuracy and retrieval recall to the eval loss.

    Args beyond `Trainer`'s:
        eval_collator: collator for evaluation embeddings (no augmentation, no masking, with class labels).
        class_names, zero_shot_templates: for zero-shot classification of the eval split (skipped when None).
    """

    def __init__(self, *args, callbacks=None, eval_collator=None, class_names=None, zero_shot_templates=None,
                 **kwargs):
        self.eval_collator = eval_collator
        self.class_names = class_names
        self.zero_shot_templates = zero_shot_templates
        training_args = kwargs.get("args")
        if training_args is not None and self._compiles_towers(training_args):
            compile_towers(unwrap_model(kwargs["model"]), training_args.torch_compile_backend,
                           training_args.torch_compile_mode)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, LightCLIPCallback) for c in callbacks):
            callbacks.append(LightCLIPCallback(kwargs.get("data_collator")))
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._term_sums = defaultdict(float)
        self._term_count = 0
        self._skipped = Counter()

    @staticmethod
    def _compiles_towers(training_args) -> bool:
        return bool(training_args.torch_compile and getattr(training_args, "torch_compile_scope", "model") == "towers")

    def _build_accelerator_args(self, **kwargs):
        """With `torch_compile_scope="towers"` the towers are compiled already: no dynamo plugin for the whole model."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self._compiles_towers(self.args):
            accelerator_args.pop("dynamo_plugin", None)
        return accelerator_args

    def _empty_batch_loss(self, model, return_outputs):
        """Every sample of this batch was bad (and skipped): a zero loss that still reaches every parameter, so
        the optimiser step and DDP's gradient all-reduce happen as usual. Several processes would wait in the
        loss's collectives for this one, so there it stops with a clear message instead."""
        if self.accelerator.num_processes > 1:
            raise RuntimeError("a whole batch was skipped as bad data on one process while the others train; "
                               "clean the data (see the skipped_* counts) or use a larger batch.")
        loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return (loss, {"loss": loss}) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """CLIP-PING with in-batch neighbours trains on (anchor, neighbour) pairs; otherwise the Trainer's sampler."""
        from .neighbours import NeighbourPairSampler

        config = getattr(self.data_collator, "model_config", None)
        neighbours = getattr(self.data_collator, "neighbours", None)
        if config is None or neighbours is None or not config.uses_ping_in_batch:
            return super()._get_train_sampler(train_dataset)
        if self.args.per_device_train_batch_size % 2:
            raise ValueError("ping_positives='in_batch' lays batches out in (anchor, neighbour) pairs: use an even "
                             "--per_device_train_batch_size.")
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return NeighbourPairSampler(neighbours, len(dataset), self.args.seed)

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def _prepare_inputs(self, inputs):
        """On the device: uint8 training images (`--images_on_device`) are scaled and normalised here."""
        from .data import normalize_on_device

        inputs = super()._prepare_inputs(inputs)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None and pixel_values.dtype == torch.uint8:
            inputs["pixel_values"] = normalize_on_device(pixel_values, self.processing_class.image_processor)
        return inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.get("skipped") or {}
        if model.training:
            self._skipped.update({k: int(v) for k, v in skipped.items()})
        inputs = {k: v for k, v in inputs.items() if k not in ("return_loss", "skipped")}
        if "pixel_values" not in inputs:
            return self._empty_batch_loss(model, return_outputs)
        outputs = model(**inputs, return_loss=True)
        loss = outputs["loss"]
        if model.training and outputs.get("losses"):
            for name, value in outputs["losses"].items():
                if torch.is_tensor(value) and value.dim() == 0:
                    self._term_sums[name] += float(value.detach())
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        """The eval loss sees evaluation inputs: no augmentation, no neighbour ids, no class labels."""
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        original = self.data_collator
        self.data_collator = dataclasses.replace(self.eval_collator, label_column=None, skipped=Counter())
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = original

    def evaluate(self, eval_dataset=None, *args, **kwargs):
        self._current_eval_dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return super().evaluate(eval_dataset, *args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.eval_collator is not None:
            extra = self.embedding_metrics(getattr(self, "_current_eval_dataset", None))
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
        return output

    def embedding_metrics(self, dataset=None) -> dict:
        """Zero-shot top-1/top-5 (when class names are known) and retrieval R@1/5/10 on the eval split."""
        from torch.utils.data import DataLoader

        dataset = dataset if dataset is not None else self.eval_dataset
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.eval_collator, num_workers=self.args.dataloader_num_workers)
        loader = self.accelerator.prepare_data_loader(loader) if self.accelerator.num_processes > 1 else loader
        accelerator = self.accelerator if self.accelerator.num_processes > 1 else None
        before = Counter(self.eval_collator.skipped)
        model = unwrap_model(self.model)
        images, texts, captions, labels = embed_pairs(model, loader, accelerator)
        this_pass = Counter(self.eval_collator.skipped)
        this_pass.subtract(before)
        metrics = retrieval_metrics(images, texts, captions)
        if self.class_names and labels is not None:
            tokenizer = self.processing_class.tokenizer
            class_embeds = class_text_embeddings(model, tokenizer, self.class_names,
                                                 self.zero_shot_templates or ["a photo of a {}."])
            metrics.update(zero_shot_metrics(images, labels, class_embeds))
        metrics["num_samples"] = images.shape[0]
        skipped = sum(v for k, v in this_pass.items() if k != "empty_batch" and not k.startswith("repaired_"))
        if skipped:
            metrics["skipped_samples"] = skipped
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
            self._term_sums.clear()
            self._term_count = 0
        if "loss" in logs and self._skipped:  # cumulative counts of bad training samples, by reason
            for reason, count in self._skipped.items():
                logs[reason if reason.startswith("repaired_") else f"skipped_{reason}"] = count
        super().log(logs, *args, **kwargs)


def load_ping_bank(model, checkpoint) -> bool:
    """Restore the CLIP-PING bank saved with a checkpoint; False when there is none to restore."""
    ping = getattr(getattr(unwrap_model(model), "objectives", None), "ping", None)
    path = Path(checkpoint) / PING_BANK_FILE
    if getattr(ping, "bank", None) is None or not path.is_file():
        return False
    ping.bank.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


__all__ = ["LightCLIPCallback", "LightCLIPTrainer", "compile_towers", "decay_parameter_names", "latest_complete_checkpoint",
           "load_ping_bank", "resolve_checkpoint", "unwrap_model"]
