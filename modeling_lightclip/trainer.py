"""Trainer pieces for contrastive training (training side; not remote code).

* `LightCLIPCallback` feeds training progress (global_step / max_steps) to the model's progressive soft labels at
  the start of every optimiser step and clamps the logit scale to `logit_scale_max` after it.
* `LightCLIPTrainer` is the HF `Trainer` with weight decay only on matrices (biases, every norm's weights, the
  logit scale and the fusion gates are excluded, as in CLIP/OpenCLIP), and each objective's term logged beside
  the total loss.
"""

import dataclasses
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback


def _unwrap(model):
    """The LightCLIPModel inside DDP/accelerate and peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
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
        callbacks = list(callbacks or [])
        if not any(isinstance(c, LightCLIPCallback) for c in callbacks):
            callbacks.append(LightCLIPCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self._term_sums = defaultdict(float)
        self._term_count = 0

    def get_decay_parameter_names(self, model) -> list[str]:
        return decay_parameter_names(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "return_loss"}
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
        self.data_collator = dataclasses.replace(self.eval_collator, label_column=None)
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

        from .evaluation import class_text_embeddings, embed_pairs, retrieval_metrics, zero_shot_metrics

        dataset = dataset if dataset is not None else self.eval_dataset
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                            collate_fn=self.eval_collator, num_workers=self.args.dataloader_num_workers)
        loader = self.accelerator.prepare_data_loader(loader) if self.accelerator.num_processes > 1 else loader
        accelerator = self.accelerator if self.accelerator.num_processes > 1 else None
        images, texts, captions, labels = embed_pairs(self.model, loader, accelerator)
        metrics = retrieval_metrics(images, texts, captions)
        if self.class_names and labels is not None:
            tokenizer = self.processing_class.tokenizer
            class_embeds = class_text_embeddings(self.model, tokenizer, self.class_names,
                                                 self.zero_shot_templates or ["a photo of a {}."])
            metrics.update(zero_shot_metrics(images, labels, class_embeds))
        metrics["num_samples"] = images.shape[0]
        skipped = sum(v for k, v in self.eval_collator.skipped.items() if k != "empty_batch")
        if skipped:
            metrics["skipped_samples"] = skipped
        return metrics

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
