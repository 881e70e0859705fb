"""Assembling a run from the parsed arguments (training side; not remote code).

`build_run` is the one set-up path of `train_lightclip.py`: it decides where the model comes from (a checkpoint
to resume, a trained LightCLIP to continue, or a recipe), builds the `LightCLIPConfig` first, then sets up the
teacher features (`teacher_features.setup_teacher_features`) *from that config* (so a saved config that learns from
teachers behaves as if its flags were given), then the model, the processor and the LoRA adapters. Nothing here
mutates the parsed arguments.
"""

from dataclasses import dataclass

from ..configuration_lightclip import LightCLIPConfig
from ..modeling_lightclip import LightCLIPModel
from ..processing_lightclip import LightCLIPProcessor
from .arguments import config_overrides, resolve_switch
from .benchmark import open_benchmark
from .checkpoints import load_ping_bank, resolve_checkpoint
from .data import (
    ImageTextCollator,
    captions_are_text,
    check_usable_samples,
    prepare_zero_shot_labels,
    zero_shot_templates,
)
from .locked_outputs import store_locked_text_outputs
from .lora import apply_lora
from .neighbours import NeighbourTable
from .packaged_weights import check_pretrained_source, image_normalisation, load_processor, pretrained_source
from .preprocessing import build_processor, text_config_token_ids, training_tokenizer
from .recipes import build_model_config, check_tokenizer_fits
from .teacher_features import setup_teacher_features


@dataclass
class Run:
    """What `train_lightclip.py` trains: the model, its processor, the training split (with `sample_id` when the
    frozen encoders' folder is used), that folder's table (or None), the checkpoint to resume (or None), and the
    training / evaluation collators."""

    model: object
    processor: LightCLIPProcessor
    train_dataset: object
    neighbours: NeighbourTable | None
    checkpoint: str | None
    train_collator: ImageTextCollator
    eval_collator: ImageTextCollator
    eval_dataset: object = None
    class_names: list | None = None
    zero_shot_templates: list | None = None
    teachers: list | None = None        # the teachers whose features training reads (reinforced data's metadata)
    data_skips: dict | None = None      # training rows a reinforced copy built for this run left out, by reason
    benchmark_sets: list | None = None  # clip_benchmark-format sets scored at each evaluation (benchmark.py)


_LOADABLE_MODEL_TYPES = ("lightclip", "clip")


def check_model_source(source: str, flag: str = "--model_name_or_path") -> None:
    """Refuse, with one message naming the path, a `--model_name_or_path` that cannot be a model
    (`check_pretrained_source`), or a folder whose config is not a LightCLIP (or CLIP) model."""
    def loadable(config: dict) -> None:
        if config.get("model_type") not in _LOADABLE_MODEL_TYPES:
            raise ValueError(f"{flag} {source}: a {config.get('model_type')!r} model, not a LightCLIP one. Start an "
                             "image or text tower from it with --vision_model_name_or_path / "
                             "--text_model_name_or_path instead.")

    check_pretrained_source(source, flag, "a trained LightCLIP folder (a run's --output_dir or a checkpoint-N inside "
                                          "it)", check_config=loadable)


def is_clip_checkpoint(source: str) -> bool:
    """Whether `source` (a folder or Hub id) holds a transformers `CLIPModel` rather than a LightCLIP."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source).model_type == "clip"
    except (OSError, ValueError, KeyError):
        return False


def _config_from_saved(source: str, overrides: dict, tokenizer=None) -> LightCLIPConfig:
    """The config of a saved LightCLIP - or of a `CLIPModel` (`LightCLIPConfig.from_clip_config`, with `tokenizer`'s
    special token ids) - with `overrides` applied; flags that would reshape its weights are refused."""
    if tokenizer is not None:
        from transformers import AutoConfig

        ids = text_config_token_ids(tokenizer)
        special = {key: ids[key] for key in ("mask_token_id", "cls_token_id", "sep_token_id")}
        saved = LightCLIPConfig.from_clip_config(AutoConfig.from_pretrained(source), **special)
    else:
        saved = LightCLIPConfig.from_pretrained(source)
    for name in LightCLIPConfig.architecture_fields:
        if name in overrides and overrides[name] != getattr(saved, name):
            raise ValueError(f"--{name} {overrides[name]} does not match the checkpoint's {getattr(saved, name)}: "
                             f"the weights in {source} have that shape. Drop the flag, or train from a recipe.")
    if tokenizer is not None:
        return LightCLIPConfig(**{**saved.to_dict(), **overrides})
    return LightCLIPConfig.from_pretrained(source, **overrides)


def _model_section(recipe: dict, model_args) -> dict:
    """The recipe's `model` section, with the image tower replaced by `--timm_architecture` when given."""
    name = model_args.timm_architecture
    if not name:
        return recipe["model"]
    if model_args.vision_model_name_or_path or model_args.model_name_or_path:
        raise ValueError("--timm_architecture builds the image tower from scratch: drop it, or drop "
                         "--vision_model_name_or_path / --model_name_or_path.")
    try:
        import timm
    except ImportError:
        raise ValueError("--timm_architecture needs timm: pip install '.[timm]' (timm needs a torchvision that "
                         "matches your torch).") from None
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"--timm_architecture {name!r}: timm has no such architecture"
                         f"{f' (close: {close})' if close else ''}.")
    return {**recipe["model"], "vision_config": {"model_type": "timm_wrapper", "architecture": name}}


def build_run(recipe: dict, model_args, data_args, training_args, train_dataset, eval_dataset=None,
              reinforced: dict | None = None) -> Run:
    """Config -> CLIP-PING -> model -> processor -> LoRA -> collators, for a checkpoint, a saved model or a recipe.
    Everything a run would otherwise find out late (after training, or at its first step) is checked here."""
    if not training_args.do_train and not model_args.model_name_or_path:
        raise ValueError("--do_train false evaluates an existing model: pass it with --model_name_or_path (a trained "
                         "LightCLIP folder or Hub id); without one the model would be randomly initialised.")
    if training_args.do_train and train_dataset is None:
        raise ValueError("--do_train needs training data: --train_file, --dataset_name with a "
                         f"'{data_args.train_split}' split (--train_split), or nothing for the embedded default.")
    eval_dataset, class_names = (prepare_zero_shot_labels(eval_dataset, data_args) if eval_dataset is not None
                                 else (None, None))
    benchmark_sets = [open_benchmark(folder) for folder in data_args.benchmark_dirs or []]
    if benchmark_sets and eval_dataset is None:
        raise ValueError("--benchmark_dirs are scored at each evaluation, and this run has no evaluation split: give "
                         "one (--validation_file, or a dataset with a validation split), or score the saved model "
                         "afterwards with `lightclip-eval`.")
    templates = zero_shot_templates(data_args)
    overrides = config_overrides(model_args)
    if model_args.model_name_or_path:
        check_model_source(model_args.model_name_or_path)
    checkpoint = resolve_checkpoint(training_args) if training_args.do_train else None
    vision_tower = pretrained_source(model_args.vision_model_name_or_path)
    text_tower = pretrained_source(model_args.text_model_name_or_path)
    for flag, tower in (("--vision_model_name_or_path", vision_tower), ("--text_model_name_or_path", text_tower)):
        if tower is not None:
            check_pretrained_source(tower, flag)
    source = checkpoint or model_args.model_name_or_path
    clip_start = bool(source) and not checkpoint and is_clip_checkpoint(source)
    if source:  # a checkpoint to resume, a trained LightCLIP to continue or a CLIPModel: its own tokenizer and config
        processor = load_processor(source, "--resume_from_checkpoint" if checkpoint else "--model_name_or_path")
        config = _config_from_saved(source, overrides, processor.tokenizer if clip_start else None)
    else:
        tokenizer = training_tokenizer(recipe, model_args, train_dataset, data_args.caption_column, training_args,
                                       text_tower=text_tower)
        config = build_model_config(_model_section(recipe, model_args), tokenizer, **overrides)
        processor = build_processor(config.image_size, tokenizer,
                                    *((image_normalisation(vision_tower) if vision_tower else None) or ()))
    captions_are_text(processor.tokenizer)
    teacher_setup = setup_teacher_features(config, train_dataset, reinforced, data_args, training_args,
                                           given=frozenset(overrides))
    train_dataset, neighbours = teacher_setup.train_dataset, teacher_setup.neighbours

    if clip_start:  # a transformers CLIPModel: its towers, projections and logit scale (`LightCLIPModel.from_clip`)
        model = LightCLIPModel.from_clip(source, config=config)
    elif source:
        model = LightCLIPModel.from_pretrained(source, config=config)
    elif vision_tower or text_tower:
        model = LightCLIPModel.from_vision_text_pretrained(  # the other tower from the recipe, from scratch
            vision_tower, text_tower, **config.to_dict())
    else:
        model = LightCLIPModel(config)
    max_caption_length = check_tokenizer_fits(model.config, processor.tokenizer, data_args.max_caption_length)
    if checkpoint and neighbours is not None:
        load_ping_bank(model, checkpoint)

    special_tokens = frozenset(processor.tokenizer.all_special_tokens)
    if training_args.do_train:
        global_batch = (training_args.per_device_train_batch_size * training_args.world_size
                        if training_args.dataloader_drop_last else 1)
        check_usable_samples(train_dataset, data_args.image_column, data_args.caption_column, special_tokens,
                             min_samples=global_batch, what="training")
    if eval_dataset is not None and training_args.do_eval:
        check_usable_samples(eval_dataset, data_args.image_column, data_args.caption_column, special_tokens,
                             what="evaluation")
    config = model.config
    if training_args.use_channels_last(model):
        model.set_channels_last(True)
    if training_args.do_train:
        if model_args.lora_r is not None and (training_args.lock_image_tower or training_args.lock_text_tower):
            raise ValueError("--lora_r already trains only its adapters: drop --lock_image_tower / --lock_text_tower.")
        training_args.apply_tower_locks(model)
    if model_args.lora_r is not None:
        if not model_args.model_name_or_path:
            raise ValueError("--lora_r fine-tunes an existing LightCLIP: pass --model_name_or_path (Hub id or folder).")
        model = apply_lora(model, model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout,
                           model_args.lora_target_modules)
    common = dict(processor=processor, image_column=data_args.image_column, caption_column=data_args.caption_column,
                  max_length=max_caption_length, max_image_aspect_ratio=data_args.max_image_aspect_ratio,
                  pad_to_max_length=resolve_switch("caption_padding", data_args.caption_padding,
                                                    training_args.compiles, on="max_length", off="longest"))
    stored_views = (reinforced or {}).get("augmentation")  # a copy's stored views are the crops trained on
    if stored_views:
        given = (data_args.random_resized_crop_scale, data_args.horizontal_flip)
        stored = (stored_views["random_resized_crop_scale"], stored_views["horizontal_flip"])
        if given != stored:  # training re-applies the stored views: other flags would be ignored, so say so
            raise ValueError(f"this training data stores {stored_views['num_augmentations']} views per image drawn "
                             f"with --random_resized_crop_scale {stored[0]} and horizontal flips "
                             f"{'on' if stored[1] else 'off'}, and training re-applies them; this run asks for "
                             f"--random_resized_crop_scale {given[0]} and flips {'on' if given[1] else 'off'}, which "
                             f"would not apply. Pass --random_resized_crop_scale {stored[0]} --horizontal_flip "
                             f"{str(stored[1]).lower()} (the copy's), or write a copy with the augmentation you want "
                             "(lightclip-reinforce takes the same two flags).")
    if not 0.0 <= data_args.synthetic_caption_ratio <= 1.0:
        raise ValueError(f"--synthetic_caption_ratio {data_args.synthetic_caption_ratio}: a share between 0 and 1.")
    if data_args.synthetic_caption_ratio and not (reinforced or {}).get("caption_model"):
        raise ValueError("--synthetic_caption_ratio trains on synthetic captions and this training data has none: "
                         "write a reinforced copy with `lightclip-reinforce --caption_model MODEL ...` and train "
                         "from it (--train_file COPY).")
    train_collator = ImageTextCollator(
        **common, train=True, synthetic_caption_ratio=data_args.synthetic_caption_ratio,
        random_resized_crop_scale=data_args.random_resized_crop_scale, horizontal_flip=data_args.horizontal_flip, seed=training_args.seed, neighbours=neighbours, model_config=config,
        teachers=teacher_setup.teachers,
        uint8_images=resolve_switch("images_on_device", data_args.images_on_device, training_args.on_cuda),
        jpeg_draft_decoding=data_args.jpeg_draft_decoding)
    eval_collator = ImageTextCollator(**common, train=False, label_column=data_args.label_column)
    if training_args.do_train and training_args.store_locked_text_outputs:
        train_dataset = store_locked_text_outputs(model, train_dataset, train_collator, data_args.caption_column,
                                                  training_args)
    return Run(model=model, processor=processor, train_dataset=train_dataset, neighbours=neighbours,
               checkpoint=checkpoint, train_collator=train_collator, eval_collator=eval_collator,
               eval_dataset=eval_dataset, class_names=class_names, zero_shot_templates=templates,
               teachers=teacher_setup.teachers, data_skips=teacher_setup.skipped, benchmark_sets=benchmark_sets)


__all__ = ["Run", "build_run", "check_model_source", "is_clip_checkpoint"]
