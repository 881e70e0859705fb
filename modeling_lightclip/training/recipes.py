"""Declarative recipes: named model + tokenizer + training settings in `configuration/NAME.{json,yaml}`.

A recipe has three sections: `model` (any `LightCLIPConfig` field, with `vision_config` / `text_config` dicts
carrying `model_type`), `tokenizer` (vocabulary size and maximum length of the WordPiece tokenizer trained on the
captions) and `training` (`TrainingArguments` defaults). Command-line flags override every field.
"""

import copy
import json
import os
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..configuration_lightclip import LightCLIPConfig
from .preprocessing import text_config_token_ids


_REPO_RECIPES = Path(__file__).resolve().parents[2] / "configuration"
_INSTALLED_RECIPES = Path(sys.prefix) / "share" / "lightclip" / "configuration"
RECIPE_SUFFIXES = (".json", ".yaml", ".yml")


def recipe_dirs() -> list[Path]:
    return [d for d in (_REPO_RECIPES, _INSTALLED_RECIPES) if d.is_dir()]


def list_recipes() -> list[str]:
    names = set()
    for directory in recipe_dirs():
        names.update(p.stem for p in directory.iterdir() if p.suffix in RECIPE_SUFFIXES and p.is_file())
    return sorted(names)


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for directory in recipe_dirs():
        for suffix in RECIPE_SUFFIXES:
            candidate = directory / f"{path.stem if path.suffix in RECIPE_SUFFIXES else path.name}{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no recipe {str(name_or_path)!r}; known recipes: {', '.join(list_recipes())}")


def load_recipe(name_or_path: str | os.PathLike) -> dict:
    """Read a recipe by name (`tiny`, `resnet18`, ...) or path (JSON or YAML)."""
    path = resolve_recipe_path(name_or_path)
    text = path.read_text()
    if path.suffix == ".json":
        recipe = json.loads(text)
    else:
        import yaml

        recipe = yaml.safe_load(text)
    if not isinstance(recipe, dict) or "model" not in recipe:
        raise ValueError(f"recipe {path} must be a mapping with a 'model' section.")
    recipe.setdefault("tokenizer", {})
    recipe.setdefault("training", {})
    recipe["name"] = path.stem
    return recipe


def build_model_config(model_section: dict, tokenizer: PreTrainedTokenizerBase | None = None,
                       **overrides) -> LightCLIPConfig:
    """A `LightCLIPConfig` from a recipe's `model` section, fitted to `tokenizer` (vocabulary size and special
    token ids), with `overrides` (any config field) applied last."""
    fields = copy.deepcopy(model_section)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    text_config = dict(fields.get("text_config") or {})
    if tokenizer is not None:
        ids = text_config_token_ids(tokenizer)
        text_config["vocab_size"] = ids["vocab_size"]
        text_config["pad_token_id"] = ids["pad_token_id"]
        if text_config.get("model_type") == "clip_text_model":
            # CLIP's text tower pools at the first eos_token_id: our tokenizer's end-of-text is [SEP].
            text_config["bos_token_id"] = ids["cls_token_id"]
            text_config["eos_token_id"] = ids["sep_token_id"]
        for key in ("mask_token_id", "cls_token_id", "sep_token_id"):
            fields.setdefault(key, ids[key])
        max_length = getattr(tokenizer, "model_max_length", None)
        positions = text_config.get("max_position_embeddings")
        if positions is not None and max_length is not None and max_length > positions:
            tokenizer.model_max_length = positions
    fields["text_config"] = text_config
    return LightCLIPConfig(**fields)


def check_tokenizer_fits(config: LightCLIPConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Stop with one clear message when the tokenizer can emit ids the text tower has no embedding for."""
    vocab = config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the text tower embeds only {vocab}: use the tokenizer the "
            "model was trained with (it is saved beside the weights), or start from a recipe so the text tower is "
            "sized to the tokenizer."
        )


__all__ = ["build_model_config", "check_tokenizer_fits", "list_recipes", "load_recipe", "resolve_recipe_path"]
