"""Declarative recipes: named model + tokenizer + training settings in `configuration/NAME.{json,yaml}`.

A recipe has these sections: `model` (any `LightCLIPConfig` field, with `vision_config` / `text_config` dicts
carrying `model_type`), `tokenizer` (vocabulary size and maximum length of the WordPiece tokenizer trained on the
captions), `training` (`TrainingArguments` defaults, tower locks and learning rates included), `data` (data flags)
and, for pretrained starts, `towers` (`vision_model_name_or_path` / `text_model_name_or_path`: Hub ids or folders
the towers start from, replacing the `model` section's tower configs). Command-line flags override every field.
"""

import copy
import json
import os
import sys
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..configuration_lightclip import _DEFAULT_TEXT as DEFAULT_TEXT_CONFIG
from ..configuration_lightclip import LightCLIPConfig
from .preprocessing import text_config_token_ids


_REPO_RECIPES = Path(__file__).resolve().parents[2] / "configuration"
_INSTALLED_RECIPES = Path(sys.prefix) / "share" / "lightclip" / "configuration"
RECIPE_SUFFIXES = (".json", ".yaml", ".yml")
TOWER_SOURCES = ("vision_model_name_or_path", "text_model_name_or_path", "tokenizer_name")


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
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"recipe {path} cannot be read ({type(err).__name__}: {err}).") from None
    if not text.strip():
        raise ValueError(f"recipe {path} is empty: a recipe is a JSON or YAML mapping with a 'model' section.")
    if path.suffix == ".json":
        try:
            recipe = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"recipe {path}, line {err.lineno} column {err.colno}: not valid JSON ({err.msg}).") \
                from None
    else:
        import yaml

        try:
            recipe = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"recipe {path}{where}: not valid YAML ({problem}).") from None
    if not isinstance(recipe, dict) or "model" not in recipe:
        raise ValueError(f"recipe {path} must be a mapping with a 'model' section.")
    towers = recipe.get("towers") or {}
    unknown = set(towers) - set(TOWER_SOURCES) if isinstance(towers, dict) else {"(not a mapping)"}
    if unknown:
        raise ValueError(f"recipe {path}: its 'towers' section takes {', '.join(TOWER_SOURCES)}; not "
                         f"{', '.join(sorted(unknown))}.")
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
    vision_config = fields.get("vision_config")
    if overrides.get("image_size") is not None and isinstance(vision_config, dict) and "image_size" in vision_config:
        # a tower built for one input size (ViT position embeddings): from scratch, build it for the asked size
        fields["vision_config"] = {**vision_config, "image_size": overrides["image_size"]}
    text_config = dict(fields.get("text_config") or DEFAULT_TEXT_CONFIG)  # none in a pretrained-text recipe
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


def check_tokenizer_fits(config: LightCLIPConfig, tokenizer: PreTrainedTokenizerBase,
                         max_caption_length: int | None = None) -> int:
    """Stop with one clear message when the tokenizer cannot feed the text tower: ids it has no embedding for, no
    pad token (batches are padded), or a caption length the tower has no positions for / that leaves no room for a
    word. Returns the caption length to truncate to (`max_caption_length`, else the tokenizer's, capped at the
    tower's positions)."""
    vocab = config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the text tower embeds only {vocab}: use the tokenizer the "
            "model was trained with (it is saved beside the weights), or start from a recipe so the text tower is "
            "sized to the tokenizer."
        )
    if tokenizer.pad_token is None:
        raise ValueError(f"the tokenizer ({tokenizer.name_or_path or type(tokenizer).__name__}) has no pad token, "
                         "and captions are padded into batches: give --tokenizer_name a tokenizer with one, or add "
                         "one to it (`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`, then save it) and pass "
                         "that folder.")
    positions = getattr(config.text_config, "max_position_embeddings", None)
    default = min(getattr(tokenizer, "model_max_length", 77) or 77, 512, positions or 512)
    length = default if max_caption_length is None else int(max_caption_length)
    minimum = tokenizer.num_special_tokens_to_add() + 1
    if length < minimum:
        raise ValueError(f"--max_caption_length {length}: a caption needs at least {minimum} tokens (its "
                         f"{minimum - 1} special tokens and one word).")
    if positions is not None and length > positions:
        raise ValueError(f"--max_caption_length {length} exceeds the text tower's {positions} positions "
                         "(text_config.max_position_embeddings): use at most that.")
    return length


__all__ = ["build_model_config", "check_tokenizer_fits", "list_recipes", "load_recipe", "resolve_recipe_path"]
