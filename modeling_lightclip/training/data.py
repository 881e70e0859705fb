"""Image-text data for training (training side; not remote code).

* `load_image_text_datasets` - run_clip-style loading through `datasets`: a Hub id or a packaged builder
  (`imagefolder`, `webdataset`, `parquet`, `csv`, `json`) with `--data_dir`, or `--train_file` /
  `--validation_file` (csv or json lines, images as paths relative to the file or absolute), optionally
  streaming. With nothing given, the Fashion-MNIST subset shipped under `data/fashion_mnist/`.
* `ImageTextCollator` - decodes images (paths, bytes or PIL), applies the train-time augmentation or the eval
  transform (both end in the saved image processor, so what the model sees at inference matches), tokenises,
  masks for MLM, and skips bad samples, counting them by reason.
"""

import io
import math
import zlib
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ..objectives_lightclip import mask_for_mlm


import sys

_REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "fashion_mnist"
_INSTALLED_DATA = Path(sys.prefix) / "share" / "lightclip" / "data" / "fashion_mnist"
EMBEDDED_DATA = _REPO_DATA if (_REPO_DATA / "train.parquet").is_file() else _INSTALLED_DATA
PACKAGED_BUILDERS = ("imagefolder", "webdataset", "parquet", "csv", "json", "arrow", "text")
# PIL's own decompression-bomb guard: images above this many pixels raise instead of exhausting memory.
Image.MAX_IMAGE_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class DataArguments:
    """Where the image-text pairs come from (run_clip-style flags)."""

    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub dataset id, or a packaged builder: imagefolder, webdataset, parquet, csv, json. "
                "Default: the Fashion-MNIST subset shipped in data/fashion_mnist."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir for the builder."})
    train_file: str | None = field(default=None, metadata={"help": "csv / json lines / parquet training file."})
    validation_file: str | None = field(default=None, metadata={"help": "csv / json lines / parquet eval file."})
    train_split: str = field(default="train")
    validation_split: str = field(default="validation")
    image_column: str = field(default="image", metadata={"help": "Column holding images (PIL, path or bytes)."})
    caption_column: str = field(default="caption", metadata={"help": "Column holding captions."})
    label_column: str | None = field(default="label", metadata={
        "help": "Class column of the eval split for zero-shot classification (a ClassLabel, or ints with "
                "--class_names). Zero-shot is skipped when the split has no such column."})
    class_names: str | None = field(default=None, metadata={
        "help": "Comma-separated class names, or a file with one per line, when the label column is plain ints."})
    zero_shot_templates: str | None = field(default=None, metadata={
        "help": "Prompt templates with {} for zero-shot, '|'-separated or a file with one per line. "
                "Default: the Fashion-MNIST caption templates."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (IterableDataset)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_caption_length: int | None = field(default=None, metadata={
        "help": "Truncate captions to this many tokens (default: the tokenizer's model_max_length)."})
    caption_padding: str = field(default="auto", metadata={
        "help": "Pad each batch's captions to its longest (`longest`) or always to the maximum caption length "
                "(`max_length`: one text shape, so --torch_compile compiles once and never recompiles); auto = "
                "max_length with --torch_compile, else longest."})
    images_on_device: str = field(default="auto", metadata={
        "help": "Training batches carry uint8 images (resized and augmented on the CPU) that are scaled and "
                "normalised on the accelerator, a quarter of the bytes to copy and no float work in the loader "
                "workers: auto (on with CUDA), true, false."})
    random_resized_crop_scale: float = field(default=0.8, metadata={
        "help": "Train-time augmentation: random crop keeping at least this share of the area (1.0 disables)."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Train-time random horizontal flip."})
    ping_neighbours_dir: str | None = field(default=None, metadata={
        "help": "The frozen encoders' folder (features + neighbours) built by `python -m "
                "modeling_lightclip.training.neighbours build` for this training set, needed by CLIP-PING "
                "(ping_*_loss_weight > 0) and by soft_label_source=frozen; `auto` builds it once with the packaged "
                "encoders (EfficientNet-Lite0, all-MiniLM-L6-v2) into OUTPUT_DIR/_frozen_encoders."})
    ping_top_k: int | None = field(default=None, metadata={
        "help": "Draw each step's neighbour among the top-k (default: all k stored)."})


def _file_builder(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".json", ".jsonl"):
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise ValueError(f"{path}: use a .csv, .json/.jsonl or .parquet file")


def load_image_text_datasets(args: DataArguments) -> dict:
    """{"train": ..., "validation": ...} (either may be missing) as `datasets` (Iterable)Datasets."""
    from datasets import load_dataset

    if args.dataset_name is None and args.train_file is None and args.validation_file is None:
        if not (EMBEDDED_DATA / "train.parquet").is_file():
            raise FileNotFoundError(f"the embedded dataset is missing from {EMBEDDED_DATA}; regenerate it with "
                                    "`python -m modeling_lightclip.training.offline_data fashion-mnist`")
        args.dataset_name = "parquet"
        files = {"train": str(EMBEDDED_DATA / "train.parquet"), "validation": str(EMBEDDED_DATA / "validation.parquet")}
        raw = load_dataset("parquet", data_files=files, streaming=args.streaming)
    elif args.train_file or args.validation_file:
        files = {}
        if args.train_file:
            files["train"] = args.train_file
        if args.validation_file:
            files["validation"] = args.validation_file
        builder = _file_builder(next(iter(files.values())))
        raw = load_dataset(builder, data_files=files, streaming=args.streaming)
        raw = {split: _resolve_relative_paths(_defer_image_decoding(ds, args.image_column), args.image_column,
                                              Path(files[split]).parent)
               for split, ds in raw.items()}
    else:
        raw = load_dataset(args.dataset_name, args.dataset_config_name, data_dir=args.data_dir,
                           streaming=args.streaming)
    out = {}
    for name, split in (("train", args.train_split), ("validation", args.validation_split)):
        if split in raw:
            out[name] = raw[split]
    if "train" not in out and "validation" not in out:
        raise ValueError(f"no '{args.train_split}' or '{args.validation_split}' split in the dataset "
                         f"(found {list(raw)}); set --train_split / --validation_split.")
    for name, ds in out.items():
        columns = ds.column_names if ds.column_names is not None else list(ds.features or {})
        for column in (args.image_column, args.caption_column):
            if columns and column not in columns:
                raise ValueError(f"the {name} split has no column {column!r} (columns: {columns}); set "
                                 f"--image_column / --caption_column.")
    for name, ds in list(out.items()):
        out[name] = _defer_image_decoding(ds, args.image_column)
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples}
    for name, limit in limits.items():
        if limit is not None and name in out:
            ds = out[name]
            out[name] = ds.take(limit) if args.streaming else ds.select(range(min(limit, len(ds))))
    return out


def _defer_image_decoding(dataset, column: str):
    """`datasets` decodes an `Image()` column when a row is read, before the collator sees it, so one corrupt file
    would crash the data loader. Keep the raw bytes/path instead: the collator decodes, skips and counts."""
    from datasets import Image as ImageFeature

    feature = (dataset.features or {}).get(column) if dataset.features is not None else None
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def _resolve_relative_paths(dataset, column: str, root: Path):
    """Image paths in csv/json files are taken relative to the file's folder."""
    from datasets import Value

    feature = (dataset.features or {}).get(column) if dataset.features is not None else None
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return dataset  # images stored in the file itself (bytes), nothing to resolve
    def _absolute(example):
        value = example[column]
        if isinstance(value, str) and value and not Path(value).is_absolute():
            example[column] = str(root / value)
        return example

    return dataset.map(_absolute)


def class_names_for(dataset, args: DataArguments) -> list[str] | None:
    """Class names for zero-shot: from --class_names, else from the label column's ClassLabel feature."""
    if args.class_names:
        path = Path(args.class_names)
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
        return [name.strip() for name in args.class_names.split(",") if name.strip()]
    features = getattr(dataset, "features", None) or {}
    feature = features.get(args.label_column) if args.label_column else None
    return list(feature.names) if hasattr(feature, "names") else None


def zero_shot_templates(args: DataArguments) -> list[str]:
    from .offline_data import CAPTION_TEMPLATES

    if not args.zero_shot_templates:
        return list(CAPTION_TEMPLATES)
    path = Path(args.zero_shot_templates)
    templates = path.read_text().splitlines() if path.is_file() else args.zero_shot_templates.split("|")
    templates = [t.strip() for t in templates if t.strip()]
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every zero-shot template needs a {} for the class name")
    return templates


def check_image_column(dataset, image_column: str, probe: int = 8) -> None:
    """Stop at start-up, with one message, when the image column holds no images at all."""
    rows = []
    for i, row in enumerate(dataset):
        rows.append(row)
        if i + 1 >= probe:
            break
    decoded = 0
    for row in rows:
        try:
            load_image(row[image_column])
            decoded += 1
        except Exception:  # noqa: BLE001 - any failure counts as "not an image" here
            pass
    if rows and decoded == 0:
        example = repr(rows[0][image_column])[:80]
        raise ValueError(f"the image column {image_column!r} holds no readable images (first value: "
                         f"{example}); point --image_column at images (PIL, file paths or bytes).")


# ------------------------------------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16-bit greyscale is rescaled, transparency is composited on white, CMYK/P/LA/L are
    converted (the honest repair: the pixels are kept, only their encoding changes)."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        image = Image.fromarray(((array - lo) / max(hi - lo, 1e-12) * 255.0).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB") if image.mode != "RGB" else image


def repair_kind(image: Image.Image) -> str | None:
    """What `to_rgb` will have to repair beyond plain greyscale/palette -> RGB, for the skipped/repaired counts."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return "transparency"
    if image.mode == "CMYK":
        return "cmyk"
    if image.mode.startswith("I") or image.mode == "F":
        return "high_bit_depth"
    return None


def load_image(value, repairs: Counter | None = None) -> Image.Image:
    """A PIL image from a PIL image, a path, raw bytes or a `datasets` {"bytes", "path"} dict, converted to RGB.
    Non-trivial conversions are counted in `repairs` (by kind) when given."""
    with warnings.catch_warnings():
        # between MAX_IMAGE_PIXELS and twice that PIL only warns (at open): treat it as the bomb it may be
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes"):
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                raise ValueError("empty image record")
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, Path)):
            image = Image.open(value)
        else:
            raise TypeError(f"not an image: {type(value).__name__}")
        image.load()
    kind = repair_kind(image)
    if kind is not None and repairs is not None:
        repairs[f"repaired_{kind}"] += 1
    return to_rgb(image)


def normalize_on_device(pixel_values: torch.Tensor, image_processor, dtype=torch.float32) -> torch.Tensor:
    """uint8 images from `ImageTextCollator(uint8_images=True)` -> the model's input: rescaled and normalised as
    `image_processor` would, on whatever device they already are."""
    mean = torch.tensor(image_processor.image_mean, device=pixel_values.device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, device=pixel_values.device, dtype=dtype).view(1, -1, 1, 1)
    scale = getattr(image_processor, "rescale_factor", 1 / 255)
    return (pixel_values.to(dtype) * scale - mean) / std


def random_resized_crop(image: Image.Image, min_scale: float, rng: random.Random) -> Image.Image:
    """Crop a random square-ish region keeping at least `min_scale` of the area (aspect 3/4..4/3)."""
    width, height = image.size
    if min_scale >= 1.0 or width < 2 or height < 2:
        return image
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return image.crop((left, top, left + w, top + h))
    return image


# ------------------------------------------------------------------------------------------------------- collator


@dataclass
class ImageTextCollator:
    """Examples -> a LightCLIP batch. Bad samples are skipped and counted in `skipped` by reason.

    train=True applies the augmentation (random resized crop, horizontal flip) before the image processor and,
    when `model_config` has MLM on, adds `mlm_input_ids` / `mlm_labels` (masked by `mask_for_mlm`, the rule the
    model itself uses). Keys: pixel_values, input_ids,
    attention_mask, return_loss (so the Trainer computes an eval loss); with `neighbours` (a `NeighbourTable`,
    the frozen encoders' folder) sample_ids and, as `model_config` asks, one drawn image- and text-space neighbour
    id per sample (CLIP-PING) and the samples' frozen-encoder features (`soft_label_source="frozen"`); class_labels when
    `label_column` is set (evaluation only: the model takes no such input).
    """

    processor: object
    image_column: str = "image"
    caption_column: str = "caption"
    label_column: str | None = None
    train: bool = True
    max_length: int | None = None
    model_config: object = None
    random_resized_crop_scale: float = 0.8
    horizontal_flip: bool = True
    seed: int = 0
    epoch: int = 0
    neighbours: object = None
    pad_to_max_length: bool = False
    uint8_images: bool = False
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._batch_skipped = Counter()

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self._batch_skipped[reason] += 1

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _image(self, example):
        try:
            value = example[self.image_column]
        except KeyError:
            self._skip("no_image_column")
            return None
        if value is None:
            self._skip("missing_image")
            return None
        try:
            repairs = Counter()
            image = load_image(value, repairs)
            for reason, count in repairs.items():
                self.skipped[reason] += count
                self._batch_skipped[reason] += count
        except FileNotFoundError:
            self._skip("missing_file")
            return None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            self._skip("too_large")
            return None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            self._skip("undecodable_image")
            return None
        except TypeError:
            self._skip("not_an_image")
            return None
        if image.width < 1 or image.height < 1:
            self._skip("empty_image")
            return None
        if self.train:
            image = random_resized_crop(image, self.random_resized_crop_scale, self._rng)
            if self.horizontal_flip and self._rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def _caption(self, example):
        caption = example.get(self.caption_column)
        if isinstance(caption, (list, tuple)):  # several captions per image: draw one
            caption = self._rng.choice(caption) if caption else None
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                self._skip("non_utf8_caption")
                return None
        if not isinstance(caption, str):
            self._skip("missing_caption")
            return None
        caption = " ".join(caption.split())
        if not caption:
            self._skip("empty_caption")
            return None
        return caption

    def __call__(self, examples: list[dict]) -> dict:
        # This batch's randomness (augmentation, MLM masking) is derived from (seed, epoch, the batch's captions),
        # not from a running generator: the data loader collates one batch ahead of training, so a run resumed
        # from a checkpoint would otherwise augment and mask its first batches differently.
        key = repr((self.seed, self.epoch, [str(e.get(self.caption_column))[:200] for e in examples]))
        batch_seed = zlib.crc32(key.encode("utf-8", "replace"))
        self._rng = random.Random(batch_seed)
        generator = torch.Generator().manual_seed(batch_seed)
        self._batch_skipped = Counter()
        images, captions, keep = [], [], []
        for i, example in enumerate(examples):
            caption = self._caption(example)
            image = self._image(example) if caption is not None else None
            if image is None or caption is None:
                continue
            images.append(image)
            captions.append(caption)
            keep.append(i)
        if not images:
            self._skip("empty_batch")
            return {"skipped": dict(self._batch_skipped), "return_loss": True}
        max_length = self.max_length or min(getattr(self.tokenizer, "model_max_length", 77), 512)
        text = self.tokenizer(captions, padding="max_length" if self.pad_to_max_length else True, truncation=True,
                              max_length=max_length, return_tensors="pt")
        if self.uint8_images:  # resized and cropped here; scaled and normalised on the device (`normalize_on_device`)
            pixel_values = self.processor.image_processor(images, return_tensors="pt", do_rescale=False,
                                                          do_normalize=False)["pixel_values"]
            pixel_values = pixel_values.round_().clamp_(0, 255).to(torch.uint8)
        else:
            pixel_values = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        batch = {"pixel_values": pixel_values, "input_ids": text["input_ids"],
                 "attention_mask": text["attention_mask"], "return_loss": True}
        if self._batch_skipped:
            batch["skipped"] = dict(self._batch_skipped)
        if self.train and self.model_config is not None and self.model_config.uses_mlm:
            batch["mlm_input_ids"], batch["mlm_labels"] = mask_for_mlm(
                self.model_config, text["input_ids"], text["attention_mask"], generator)
        if self.label_column is not None and self.label_column in examples[0]:
            batch["class_labels"] = torch.tensor([int(examples[i][self.label_column]) for i in keep], dtype=torch.long)
        if self.train and self.neighbours is not None:
            if "sample_id" not in examples[0]:
                raise ValueError("CLIP-PING needs a sample_id column in the training set (its row index).")
            ids = [int(examples[i]["sample_id"]) for i in keep]
            batch["sample_ids"] = torch.tensor(ids, dtype=torch.long)
            config = self.model_config
            if config is None or config.uses_ping_bank:
                batch["image_neighbour_ids"], batch["text_neighbour_ids"] = self.neighbours.sample(
                    ids, np.random.default_rng(self._rng.getrandbits(63)))
            elif config.uses_ping_in_batch:  # the sampler laid the batch out in (anchor, neighbour) pairs
                kept = set(keep)
                layout = [int(e["sample_id"]) if i in kept else None for i, e in enumerate(examples)]
                batch["ping_partner_rows"], batch["ping_partner_spaces"] = self.neighbours.pair_partners(layout)
            if config is not None and config.uses_frozen_feature_batches:
                batch["frozen_image_features"], batch["frozen_text_features"] = self.neighbours.features(ids)
        return batch


__all__ = [
    "DataArguments",
    "ImageTextCollator",
    "check_image_column",
    "class_names_for",
    "load_image",
    "load_image_text_datasets",
    "normalize_on_device",
    "random_resized_crop",
    "to_rgb",
    "zero_shot_templates",
]
