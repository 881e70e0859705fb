"""Trainer pieces for contrastive training (training side; not remote code).

* `LightCLIPCallback` feeds training progress (global_step / max_steps) to the model's progressive soft labels at
  the start of every optimiser step and clamps the logit scale to `logit_scale_max` after it.
* `LightCLIPTrainer` is the HF `Trainer` with weight decay only on matrices (biases, every norm's weights, the
  logit scale and the fusion gates are excluded, as in CLIP/OpenCLIP), and each objective's term logged beside
  the total loss.
"""

from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class LightCLIPCallback(TrainerCallback):
    """Progress for the soft-label schedule before each step; logit-scale clamp after each step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._set_progress(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set_progress(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model) if model is not None else None
        if model is not None and hasattr(model, "clamp_logit_scale_"):
            model.clamp_logit_scale_()

    @staticmethod
    def _set_progress(state, model):
        model = _unwrap(model) if model is not None else None
        if model is not None and hasattr(model, "set_training_progress") and state.max_steps:
            model.set_training_progress(state.global_step / state.max_steps)


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Weight decay on matrices and kernels only (ndim >= 2): biases, LayerNorm/BatchNorm/GroupNorm weights,
    scalar gates and the logit scale are all 1-D or 0-D and stay undecayed."""
    return [name for name, param in model.named_parameters() if param.ndim >= 2 and "logit_scale" not in name]


class LightCLIPTrainer(Trainer):
    """`Trainer` for LightCLIP: decay groups as CLIP, per-objective loss terms logged, callback installed."""

    def __init__(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, LightCLIPCallback) for c in callbacks):
            callbacks.append(LightCLIPCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._term_sums = defaultdict(float)
        self._term_count = 0

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, return_loss=True)
        loss = outputs["loss"]
        if model.training and outputs.get("losses"):
            for name, value in outputs["losses"].items():
                if torch.is_tensor(value) and value.dim() == 0:
                    self._term_sums[name] += float(value.detach())
            self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._term_count:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(total / self._term_count, 4)
            model = _unwrap(self.model)
            if hasattr(model, "soft_label_alpha"):
                logs["soft_label_alpha"] = round(model.soft_label_alpha, 4)
            if hasattr(model, "logit_scale"):
                logs["logit_scale"] = round(float(model.logit_scale.detach().exp()), 3)
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, *args, **kwargs)


__all__ = ["LightCLIPCallback", "LightCLIPTrainer", "decay_parameter_names"]
