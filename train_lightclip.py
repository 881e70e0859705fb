"""Train a LightCLIP model with the Hugging Face Trainer.

    python train_lightclip.py                                    # embedded default: Fashion-MNIST, 2 CPU cores
    python train_lightclip.py --recipe resnet18 --dataset_name imagefolder --data_dir my_images/
    accelerate launch train_lightclip.py --recipe vit_xs --train_file train.csv --validation_file val.csv
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train_lightclip.py --recipe tiny

`--recipe` loads configuration/NAME.json; every flag overrides it, including each LightCLIPConfig field by its
name (`--soft_label_mode none --token_loss_weight 0 --mlm_loss_weight 0` is the CLIP baseline). This file only
parses arguments and wires the pieces in `modeling_lightclip/` together.
"""

import argparse
import logging
import sys
from pathlib import Path

from transformers import HfArgumentParser, set_seed

from modeling_lightclip import LightCLIPConfig, LightCLIPModel, LightCLIPProcessor
from modeling_lightclip.arguments import LightCLIPTrainingArguments, ModelArguments, config_overrides
from modeling_lightclip.data import (
    DataArguments,
    ImageTextCollator,
    class_names_for,
    load_image_text_datasets,
    zero_shot_templates,
)
from modeling_lightclip.hub import HubUploadError, push_folder, write_model_card
from modeling_lightclip.lora import apply_lora, merge_lora
from modeling_lightclip.neighbours import NeighbourTable
from modeling_lightclip.preprocessing import build_processor, load_tokenizer, train_wordpiece_tokenizer
from modeling_lightclip.recipes import build_model_config, check_tokenizer_fits, load_recipe
from modeling_lightclip.trainer import LightCLIPTrainer, latest_complete_checkpoint, load_ping_bank, unwrap_model


logger = logging.getLogger("train_lightclip")
# Fields that shape the weights: they cannot change when continuing from a checkpoint.
ARCHITECTURE_FIELDS = ("projection_dim", "token_projection_dim", "image_size", "vision_token_stage",
                       "fusion_text_layers", "fusion_vision_stages", "fusion_num_heads")


def parse_args(argv):
    """Recipe first (it supplies defaults), then every flag on top."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="default")
    known, _ = pre.parse_known_args(argv)
    recipe = load_recipe(known.recipe)
    parser = HfArgumentParser((ModelArguments, DataArguments, LightCLIPTrainingArguments))
    parser.set_defaults(**recipe.get("training", {}), **recipe.get("data", {}))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    return recipe, model_args, data_args, training_args


def _captions(dataset, column, limit=200_000):
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([column])  # no image decoding while reading captions
    for i, example in enumerate(dataset):
        if i >= limit:
            break
        captions = example.get(column)
        for caption in captions if isinstance(captions, list) else [captions]:
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8", errors="ignore")
            if isinstance(caption, str):
                yield caption


def resolve_checkpoint(training_args, require_bank: bool = False) -> str | None:
    """`--resume_from_checkpoint PATH`, or `latest` for the newest complete checkpoint in --output_dir."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if value in ("latest", "true", "True"):
        found = latest_complete_checkpoint(training_args.output_dir, require_bank=require_bank)
        if found is None:
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in "
                                    f"{training_args.output_dir}")
        return found
    if not Path(value).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return value


def _tokenizer(recipe, model_args, train_dataset, data_args, training_args):
    """A given tokenizer, or one trained on the captions. WordPiece training is not deterministic from run to
    run, so the main process trains it once and saves it; the other processes load that copy."""
    settings = recipe.get("tokenizer", {})
    max_length = settings.get("model_max_length", 77)
    if model_args.tokenizer_name:
        return load_tokenizer(model_args.tokenizer_name, max_length)
    if train_dataset is None:
        raise ValueError("no training data to train a tokenizer on: pass --tokenizer_name or a train split.")
    shared = Path(training_args.output_dir) / "_tokenizer"
    with training_args.main_process_first(local=False, desc="training the tokenizer"):
        if training_args.process_index == 0:
            vocab = model_args.tokenizer_vocab_size or settings.get("vocab_size", 8192)
            tokenizer = train_wordpiece_tokenizer(_captions(train_dataset, data_args.caption_column), vocab,
                                                  max_length)
            tokenizer.save_pretrained(shared)
        else:
            tokenizer = load_tokenizer(str(shared), max_length)
    return tokenizer


def build_model_and_processor(recipe, model_args, train_dataset, data_args, training_args):
    overrides = config_overrides(model_args)
    checkpoint = resolve_checkpoint(training_args, require_bank=model_args.ping_bank_size is not None)
    source = checkpoint or model_args.model_name_or_path
    if source:  # a checkpoint to resume, or a trained LightCLIP to continue: its own tokenizer and config
        saved = LightCLIPConfig.from_pretrained(source)
        for name in ARCHITECTURE_FIELDS:
            if name in overrides and overrides[name] != getattr(saved, name):
                raise ValueError(f"--{name} {overrides[name]} does not match the checkpoint's {getattr(saved, name)}: "
                                 f"the weights in {source} have that shape. Drop the flag, or train from a recipe.")
        processor = LightCLIPProcessor.from_pretrained(source)
        model = LightCLIPModel.from_pretrained(source, **overrides)
        check_tokenizer_fits(model.config, processor.tokenizer)
        if checkpoint:
            load_ping_bank(model, checkpoint)
        return model, processor
    tokenizer = _tokenizer(recipe, model_args, train_dataset, data_args, training_args)
    config = build_model_config(recipe["model"], tokenizer, **overrides)
    if model_args.vision_model_name_or_path or model_args.text_model_name_or_path:
        model = LightCLIPModel.from_vision_text_pretrained(
            model_args.vision_model_name_or_path, model_args.text_model_name_or_path,
            **{k: v for k, v in config.to_dict().items() if k not in ("vision_config", "text_config")})
    else:
        model = LightCLIPModel(config)
    check_tokenizer_fits(model.config, tokenizer)
    return model, build_processor(model.config.image_size, tokenizer)


def check_image_column(dataset, data_args, probe: int = 8) -> None:
    """Stop at start-up, with one message, when the image column holds no images at all."""
    from modeling_lightclip.data import load_image

    rows = []
    for i, row in enumerate(dataset):
        rows.append(row)
        if i + 1 >= probe:
            break
    decoded = 0
    for row in rows:
        try:
            load_image(row[data_args.image_column])
            decoded += 1
        except Exception:  # noqa: BLE001 - any failure counts as "not an image" here
            pass
    if rows and decoded == 0:
        example = repr(rows[0][data_args.image_column])[:80]
        raise ValueError(f"the image column {data_args.image_column!r} holds no readable images (first value: "
                         f"{example}); point --image_column at images (PIL, file paths or bytes).")


def write_training_info(training_args, data_args, recipe, train_dataset, model_args) -> None:
    """What the model card says about training, recorded beside the weights."""
    import json

    info = {
        "recipe": recipe.get("name"),
        "dataset": data_args.dataset_name if data_args.dataset_name not in (None, "parquet", "csv", "json")
        else ("Fashion-MNIST (embedded subset)" if data_args.train_file is None and data_args.dataset_name == "parquet"
              else data_args.train_file or data_args.dataset_name),
        "dataset_hub_id": data_args.dataset_name if data_args.dataset_name and "/" in data_args.dataset_name else None,
        "train_samples": len(train_dataset) if hasattr(train_dataset, "__len__") else None,
        "global_batch_size": training_args.per_device_train_batch_size * training_args.world_size
        * training_args.gradient_accumulation_steps,
        "learning_rate": training_args.learning_rate,
        "epochs": training_args.num_train_epochs,
        "seed": training_args.seed,
        "eval_split": data_args.validation_split,
        "base_models": [m for m in (model_args.model_name_or_path, model_args.vision_model_name_or_path,
                                    model_args.text_model_name_or_path) if m and "/" in m and not Path(m).exists()],
    }
    (Path(training_args.output_dir) / "training_info.json").write_text(json.dumps(info, indent=2))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    recipe, model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    splits = load_image_text_datasets(data_args)
    train_dataset, eval_dataset = splits.get("train"), splits.get("validation")
    neighbours = None
    ping_weights = [getattr(model_args, k) if getattr(model_args, k) is not None else recipe["model"].get(k, 0.0)
                    for k in ("ping_nn_loss_weight", "ping_xnn_loss_weight")]
    if any(w and w > 0 for w in ping_weights) and training_args.do_train:
        if not data_args.ping_neighbours_dir:
            raise ValueError("CLIP-PING is on (ping_nn_loss_weight / ping_xnn_loss_weight > 0) but no neighbour files "
                             "were given: build them with `python -m modeling_lightclip.neighbours build --out DIR` "
                             "and pass --ping_neighbours_dir DIR.")
        if data_args.streaming:
            raise ValueError("CLIP-PING needs row indices: it does not work with --streaming.")
        neighbours = NeighbourTable(data_args.ping_neighbours_dir, len(train_dataset), data_args.ping_top_k,
                                    training_args.seed)
        train_dataset = train_dataset.add_column("sample_id", list(range(len(train_dataset))))
        model_args.ping_bank_size = len(train_dataset)
    model, processor = build_model_and_processor(recipe, model_args, train_dataset, data_args, training_args)
    check_image_column(train_dataset if train_dataset is not None else eval_dataset, data_args)
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a stream has no length to count epochs by).")

    lora = model_args.lora_r is not None
    if lora:
        if not model_args.model_name_or_path:
            raise ValueError("--lora_r fine-tunes an existing LightCLIP: pass --model_name_or_path (Hub id or folder).")
        model = apply_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                           model_args.lora_target_modules)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push once, at the end, with our card
    if push and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id ORG/NAME.")

    common = dict(processor=processor, image_column=data_args.image_column, caption_column=data_args.caption_column,
                  max_length=data_args.max_caption_length)
    train_collator = ImageTextCollator(
        **common, train=True, random_resized_crop_scale=data_args.random_resized_crop_scale,
        horizontal_flip=data_args.horizontal_flip, seed=training_args.seed, neighbours=neighbours,
        mlm_probability=model.config.mlm_probability if model.config.mlm_loss_weight > 0 else None)
    eval_collator = ImageTextCollator(**common, train=False, label_column=data_args.label_column)
    class_names = class_names_for(eval_dataset, data_args) if eval_dataset is not None else None

    trainer = LightCLIPTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        processing_class=processor,
        eval_collator=eval_collator if eval_dataset is not None else None,
        class_names=class_names,
        zero_shot_templates=zero_shot_templates(data_args),
    )
    if training_args.do_train and train_dataset is not None:
        checkpoint = resolve_checkpoint(training_args, require_bank=neighbours is not None)
        if checkpoint:
            logger.info("resuming from %s", checkpoint)
        result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = dict(result.metrics)
        metrics.update({(f"train_{k}" if k.startswith("repaired_") else f"train_skipped_{k}"): v
                        for k, v in train_collator.skipped.items()})
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        if lora:  # fold the adapters in: the saved model is a plain LightCLIP that loads without peft
            trainer.model = model = merge_lora(model)
        trainer.save_model()  # weights (safetensors) + remote code + processor: a Hub-ready folder
        trainer.save_state()
    if training_args.do_eval and eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero() and training_args.do_train:
        write_training_info(training_args, data_args, recipe, train_dataset, model_args)
        write_model_card(training_args.output_dir, model=unwrap_model(trainer.model).to("cpu"), processor=processor,
                         repo_id=training_args.hub_model_id)
        if push:
            try:
                url = push_folder(training_args.output_dir, training_args.hub_model_id, training_args.hub_token,
                                  bool(training_args.hub_private_repo))
                logger.info("pushed to %s", url)
            except HubUploadError as err:
                logger.error("%s", err)
                raise SystemExit(f"error: {err}") from None
    return trainer


if __name__ == "__main__":
    main()
