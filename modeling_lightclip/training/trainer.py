"""Trainer pieces for contrastive training (training side; not remote code).

* `LightCLIPCallback` feeds training progress (global_step / max_steps) to the model's progressive soft labels at
  the start of every optimiser step and clamps the logit scale to `logit_scale_max` after it.
* `LightCLIPTrainer` is the HF `Trainer` with weight decay only on matrices (biases, every norm's weights, the
  logit scale and the fusion gates are excluded, as in CLIP/OpenCLIP), and each objective's term logged beside
  the total loss.
"""

import dataclasses
import logging
import os
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..objectives_lightclip import InBatchNeighbourLoss
from .benchmark import evaluate_benchmark
from .checkpoints import PING_BANK_FILE, last_finite_checkpoint
from .evaluation import class_text_embeddings, embed_pairs, retrieval_metrics, sum_over_processes, zero_shot_metrics
from .optimizer_groups import decay_parameter_names, optimizer_param_groups
from .processes import unwrap_model
from .stops import TrainingStopped


logger = logging.getLogger(__name__)


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
        if config is None or neighbours is None or not InBatchNeighbourLoss.enabled(config):
            return self._images_stay_on_host(super().get_train_dataloader())
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
        return self._images_stay_on_host(self.accelerator.prepare(loader))

    def _images_stay_on_host(self, loader):
        """Under contrastive accumulation the loader leaves its batches on the host: `_accumulated_training_step`
        moves the text side whole and the images one micro-batch at a time, so the device never holds the whole
        batch's pixels (at 224 px, 8192 float32 images are 4.9 GB). Other steps move their batch as usual
        (`_prepare_inputs`). A loader that dispatches batches from the main process places them itself."""
        if getattr(self.args, "micro_batch_size", None) and getattr(loader, "device", None) is not None \
                and hasattr(loader, "skip_batches"):  # accelerate's DataLoaderShard
            loader.device = None
        return loader

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

    def _model_inputs(self, model, inputs, normalise_images: bool = True) -> dict | None:
        """The collator's batch as the model's inputs: bad-sample counts recorded (training), uint8 images
        normalised on the device (`--images_on_device`; left to `_images_to_device` when not `normalise_images`);
        None when no usable sample is left."""
        skipped = inputs.get("skipped") or {}
        if model.training:
            self._skipped.update({k: int(v) for k, v in skipped.items()})
            self._count_bad_step("empty", "pixel_values" not in inputs)
        inputs = {k: v for k, v in inputs.items() if k not in ("return_loss", "skipped", "empty_batch")}
        if "pixel_values" not in inputs:
            return None
        if model.training:
            self._trained_samples += int(inputs["pixel_values"].shape[0])
        if normalise_images:
            inputs["pixel_values"] = self._images_to_device(inputs["pixel_values"])
        return inputs

    def _images_to_device(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images on the training device, uint8 ones (`--images_on_device`) scaled and normalised there."""
        pixel_values = pixel_values.to(self.args.device, non_blocking=True)
        if pixel_values.dtype == torch.uint8:
            from .data import normalize_on_device

            pixel_values = normalize_on_device(pixel_values, self.processing_class.image_processor)
        return pixel_values

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
        images = inputs.get("pixel_values")  # left on the host: moved a micro-batch at a time by the engine
        inputs = self._prepare_inputs({k: v for k, v in inputs.items() if k != "pixel_values"})
        if images is not None:
            inputs["pixel_values"] = images
        inputs = self._model_inputs(model, inputs, normalise_images=False)
        if inputs is None:
            loss = self._empty_batch_loss(model, False)
            self.accelerator.backward(loss)
            return loss.detach()
        engine = ContrastiveAccumulation(micro_batch_size, autocast=self.accelerator.autocast,
                                         backward=self.accelerator.backward, images_to_device=self._images_to_device)
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


__all__ = ["LightCLIPCallback", "LightCLIPTrainer", "compile_towers", "skip_metric_name"]
