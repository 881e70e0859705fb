"""Train a LightCLIP model with the Hugging Face Trainer.

    python train_lightclip.py                                    # embedded default: Fashion-MNIST, 2 CPU cores
    python train_lightclip.py --recipe resnet18 --dataset_name imagefolder --data_dir my_images/
    accelerate launch train_lightclip.py --recipe vit_xs --train_file train.csv --validation_file val.csv
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train_lightclip.py --recipe tiny

`--recipe` loads configuration/NAME.json; every flag overrides it, including each LightCLIPConfig field by its
name (`--soft_label_mode none --relation_loss_weight 0` turns the default recipe's objective into plain CLIP;
the tower recipes such as `resnet18` train plain CLIP as they are). This file only parses arguments and wires the
pieces in `modeling_lightclip/` together.
"""

import argparse
from collections import Counter
import logging
import sys

from transformers import HfArgumentParser, set_seed

from modeling_lightclip.training.arguments import LightCLIPTrainingArguments, ModelArguments
from modeling_lightclip.training.build import build_run
from modeling_lightclip.training.data import DataArguments, StreamForProcesses, load_image_text_datasets
from modeling_lightclip.training.hub import HubUploadError, push_folder, write_model_card, write_training_info
from modeling_lightclip.training.lora import merge_lora
from modeling_lightclip.training.recipes import load_recipe
from modeling_lightclip.training.processes import end_processes, unwrap_model
from modeling_lightclip.training.stops import TrainingStopped, writing_to
from modeling_lightclip.training.trainer import LightCLIPTrainer, skip_metric_name


logger = logging.getLogger("train_lightclip")
OWN_LOGGERS = ("train_lightclip", "modeling_lightclip")


def configure_logging() -> None:
    """Our own progress and results at INFO; every other library only from WARNING up (faiss's loader, for one, logs
    each SIMD variant it tries at INFO, which is no news to a user)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def parse_args(argv):
    """Recipe first (it supplies defaults), then every flag on top."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="default")
    known, _ = pre.parse_known_args(argv)
    recipe = load_recipe(known.recipe)
    parser = HfArgumentParser((ModelArguments, DataArguments, LightCLIPTrainingArguments))
    parser.set_defaults(**recipe.get("training", {}), **recipe.get("data", {}), **recipe.get("towers", {}))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    return recipe, model_args, data_args, training_args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    recipe, model_args, data_args, training_args = parse_args(argv)
    configure_logging()
    set_seed(training_args.seed)

    splits = load_image_text_datasets(data_args)
    run = build_run(recipe, model_args, data_args, training_args, splits.get("train"), splits.get("validation"),
                    reinforced=splits.reinforced)
    model, processor, train_dataset, eval_dataset = run.model, run.processor, run.train_dataset, run.eval_dataset
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to count epochs by).")
    if data_args.streaming and data_args.shuffle_buffer_size > 0 and train_dataset is not None:
        # the same seed on every process: each reads the same order and takes its own slice of it
        train_dataset = train_dataset.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    if data_args.streaming and training_args.world_size > 1 and train_dataset is not None:
        train_dataset = StreamForProcesses(train_dataset)  # each process its slice of every global batch
        training_args.accelerator_config.dispatch_batches = False
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push once, at the end, with our card
    if push and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id ORG/NAME.")

    train_collator = run.train_collator
    trainer = LightCLIPTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        processing_class=processor,
        eval_collator=run.eval_collator if eval_dataset is not None else None,
        class_names=run.class_names,
        zero_shot_templates=run.zero_shot_templates,
        benchmark_sets=run.benchmark_sets,
    )
    with writing_to(training_args.output_dir):  # a full disk anywhere below: one message naming the folder
        if training_args.do_train:
            if run.checkpoint:
                logger.info("resuming from %s", run.checkpoint)
            if training_args.micro_batch_size:
                logger.info("contrastive accumulation: each device's batch of %d rows in %d micro-batches of up to %d; "
                            "every loss sees the global batch of %d", training_args.per_device_train_batch_size,
                            training_args.contrastive_accumulation_steps, training_args.micro_batch_size,
                            training_args.per_device_train_batch_size * training_args.world_size)
            result = trainer.train(resume_from_checkpoint=run.checkpoint)
            metrics = dict(result.metrics)
            train_metrics = dict(metrics)
            counts = (Counter(splits.file_skips.get("train", {})) + Counter(run.data_skips or {})
                      + trainer.training_skip_counts())
            metrics.update({f"train_{skip_metric_name(k)}": v for k, v in counts.items()})
            trainer.log_metrics("train", metrics)
            trainer.save_metrics("train", metrics)
            if model_args.lora_r is not None:  # fold the adapters in: the saved model is plain LightCLIP, no peft
                trainer.model = model = merge_lora(model)
            trainer.check_finite_before_saving()  # a NaN model is never written as the final one
            trainer.save_model()  # weights (safetensors) + remote code + processor: a Hub-ready folder
            trainer.save_state()
        if training_args.do_eval and eval_dataset is not None:
            metrics = trainer.evaluate()
            file_skips = splits.file_skips.get("validation", {})
            metrics.update({f"eval_{skip_metric_name(k)}": v for k, v in file_skips.items()})
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero() and training_args.do_train:
            write_training_info(training_args, data_args, recipe, train_dataset, model_args, source=splits.source,
                                teachers=run.teachers, train_metrics=train_metrics, license=model_args.license)
            write_model_card(training_args.output_dir, model=unwrap_model(trainer.model).to("cpu"),
                             processor=processor, repo_id=training_args.hub_model_id)
    if push and trainer.is_world_process_zero() and training_args.do_train:
        try:
            url = push_folder(training_args.output_dir, training_args.hub_model_id, training_args.hub_token,
                              bool(training_args.hub_private_repo))
            logger.info("pushed to %s", url)
        except HubUploadError as err:
            logger.error("%s", err)
            raise SystemExit(f"error: {err}") from None
    return trainer


def cli(argv=None) -> int:
    """`main` for the command line: a run refused at start-up or stopped on purpose ends with its one message and
    exit status 2, not a traceback (LIGHTCLIP_TRACEBACK=1 shows it)."""
    import os

    try:
        main(argv)
    except (ValueError, FileNotFoundError, TrainingStopped) as err:
        if os.environ.get("LIGHTCLIP_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    end_processes()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
