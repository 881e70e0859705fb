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
import logging
import math
import os
import random
import sys
import unicodedata
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..objectives_lightclip import mask_for_mlm, training_targets_read
from .reinforced_copy import SYNTHETIC_CAPTIONS
from .tables import read_table, table_kind


logger = logging.getLogger(__name__)
_REPO_DATA = Path(__file__).resolve().parents[2] / "data" / "fashion_mnist"
_INSTALLED_DATA = Path(sys.prefix) / "share" / "lightclip" / "data" / "fashion_mnist"
EMBEDDED_DATA = _REPO_DATA if (_REPO_DATA / "train.parquet").is_file() else _INSTALLED_DATA
# The embedded data's caption templates (each training image's caption is its class name in one of them), and the
# default zero-shot prompts (averaged per class, the CLIP prompt-ensemble recipe)
EMBEDDED_CAPTION_TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale picture of the {}.",
    "a small photo of a {}, a piece of clothing.",
    "a centered photo of a {} on a black background.",
    "a product photo of a {}.",
    "an image of a {}.",
]
PACKAGED_BUILDERS = ("imagefolder", "webdataset", "parquet", "csv", "json", "arrow", "text")
# PIL's own decompression-bomb guard: images above this many pixels raise instead of exhausting memory.
Image.MAX_IMAGE_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False
MAX_IMAGE_SIDE = 32_768            # pixels on either side, checked from the header before decoding
MAX_IMAGE_ASPECT_RATIO = 20.0      # long side / short side, likewise (panoramas are ~10:1)
_EXIF_ORIENTATION = 0x0112
_CROP_ASPECTS = (3 / 4, 4 / 3)     # width / height range of the random resized crop
AUGMENTATIONS = "augmentations"    # a reinforced copy's column of stored views (`draw_augmentation`'s parameters)
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})  # control, format (zero-width), surrogate, private


class ImageRejected(ValueError):
    """An image refused before or after decoding; `reason` is the name it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class DataSourceArguments:
    """Where the image-caption pairs come from and how their files are read (run_clip-style flags): the same flags
    for training and for `lightclip-reinforce`."""

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
        "help": "Class column, where the data has one: kept with each row, and read by zero-shot classification of "
                "the eval split (a ClassLabel, or ints with --class_names; skipped when the split has no such "
                "column)."})
    file_encoding: str = field(default="utf-8", metadata={
        "help": "Text encoding of --train_file / --validation_file (csv, tsv, json): e.g. cp1252 or latin-1 for a "
                "spreadsheet exported on Windows. Rows with bytes it cannot decode are skipped and counted; a "
                "byte-order mark (utf-8, utf-16) is honoured whatever this says."})
    max_image_aspect_ratio: float = field(default=20.0, metadata={
        "help": "Images whose long side exceeds this many times the short side are skipped (`extreme_aspect_ratio`), "
                "read from the file's header before decoding: a 1 x 300,000 strip has few pixels but resizing its "
                "short side to the model's needs gigabytes."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (IterableDataset)."})
    max_train_samples: int | None = field(default=None)


@dataclass
class AugmentationArguments:
    """The training augmentation (also what `lightclip-reinforce --num_augmentations` draws its stored views from)."""

    random_resized_crop_scale: float = field(default=0.8, metadata={
        "help": "Train-time augmentation: random crop keeping at least this share of the area (1.0 disables)."})
    horizontal_flip: bool = field(default=True, metadata={"help": "Train-time random horizontal flip."})


@dataclass
class DataArguments(DataSourceArguments, AugmentationArguments):
    """The data flags of a training run: the source, the augmentation, and how training reads and batches the rows."""

    benchmark_dirs: list[str] | None = field(default=None, metadata={
        "help": "Benchmark sets in clip_benchmark's webdataset layout (folders, e.g. wds_imagenet1k downloaded from "
                "the clip-benchmark datasets on the Hub): scored at every evaluation as `lightclip-eval` scores "
                "them, logged as eval_<set>_<metric> (e.g. eval_imagenet1k_acc1) with the time they took."})
    class_names: str | None = field(default=None, metadata={
        "help": "Comma-separated class names, or a file with one per line, when the label column is plain ints."})
    zero_shot_templates: str | None = field(default=None, metadata={
        "help": "Prompt templates with {} for zero-shot, '|'-separated or a file with one per line. "
                "Default: the Fashion-MNIST caption templates."})
    shuffle_buffer_size: int = field(default=10_000, metadata={
        "help": "With --streaming: training rows are shuffled through a buffer of this many (datasets' "
                "IterableDataset.shuffle: the shards' order and the rows within the buffer, reseeded every epoch "
                "from --seed); 0 reads the stream in order."})
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
    synthetic_caption_ratio: float = field(default=0.0, metadata={
        "help": "Training from a reinforced copy written with --caption_model: the share of samples, drawn anew each "
                "step, that train on one of the image's synthetic captions (with the teachers' features of that "
                "caption) instead of its own. 0 (default): the real captions only."})
    jpeg_draft_decoding: bool = field(default=True, metadata={
        "help": "Training images: let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (DCT scaling, a fraction "
                "of the decoding work) when the smallest random crop still has at least the model's input size; a "
                "12-megapixel phone photo trained at 224 px then decodes at 1/8. Evaluation always decodes in full, "
                "as the processor does at inference."})
    teacher_features: str | None = field(default=None, metadata={"help":
        "Where the objectives that learn from teachers (soft_label_source=frozen, relation_loss_weight, "
        "distill_loss_weight, CLIP-PING) get each sample's teacher features when the training data is not a "
        "reinforced copy (`lightclip-reinforce`, which carries them): `auto` writes a reinforced copy of the training "
        "split once with the packaged teachers (EfficientNet-Lite0, all-MiniLM-L6-v2) into OUTPUT_DIR/_reinforced and "
        "trains from it; a folder built by `python -m modeling_lightclip.training.neighbours build` is converted "
        "the same way into a reinforced copy of its features."})
    ping_top_k: int | None = field(default=None, metadata={
        "help": "Draw each step's neighbour among the top-k (default: all k stored)."})


# the column `locked_outputs.store_locked_text_outputs` adds (each caption's locked text tower output), and the
# training target the collator passes it on as
STORED_TEXT_OUTPUTS = "text_tower_outputs"

EMBEDDED_SOURCE = {"name": "the embedded Fashion-MNIST subset (10,000 images, captions from prompt templates)",
                   "hub_id": "zalando-datasets/fashion_mnist"}


class Splits(dict):
    """{"train": ..., "validation": ...} (either may be missing), plus `file_skips`: per split, the rows of a csv /
    tsv / json file that could not be read, by reason (`tables.read_table`), and images an imagefolder dropped; and
    `source`: what the data is, for the model card ({"name": ..., "hub_id": Hub dataset id or None})."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.file_skips = {}
        self.source = {"name": "custom image-text data", "hub_id": None}
        self.reinforced = None  # a reinforced copy's metadata (`reinforce.read_meta`): its teachers and columns


class StreamForProcesses(torch.utils.data.IterableDataset):
    """A `datasets` stream handed to several training processes: every process reads the stream's rows in the same
    order and accelerate's `IterableDatasetShard` gives each process its own slice of every global batch, so each
    sample is trained on once per epoch and every process takes the same number of steps (a per-process split of
    the shards would leave processes with unequal counts, and accelerate's default of one process reading and
    sending batches cannot carry a batch's skip counts). Only a process's own rows are decoded, by its collator."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(epoch)


def data_source(args: "DataArguments") -> dict:
    """What the flags point at, named for a model card: the embedded Fashion-MNIST subset, the training file, a
    builder's folder or a Hub dataset id."""
    if args.dataset_name is None and args.train_file is None and args.validation_file is None:
        return dict(EMBEDDED_SOURCE)
    if args.train_file or args.validation_file:
        return {"name": f"`{Path(args.train_file or args.validation_file).name}`", "hub_id": None}
    if args.dataset_name in PACKAGED_BUILDERS:
        where = f" in `{Path(args.data_dir).name}`" if args.data_dir else ""
        return {"name": f"{args.dataset_name} files{where}", "hub_id": None}
    name = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
    return {"name": name, "hub_id": args.dataset_name}


def _relative_image_path(value, root: Path):
    """An image path from a table file, taken relative to the file's folder; a Windows export's `images\\cat.jpg`
    is read as `images/cat.jpg` when only that exists."""
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return value
    path = root / value
    if "\\" in value and not path.exists() and (root / value.replace("\\", "/")).exists():
        path = root / value.replace("\\", "/")
    return str(path)


def _table_dataset(paths: list, args: "DataArguments"):
    """csv/tsv/json files of one split read row by row (`tables.read_table`) into one `datasets.Dataset`, image paths
    taken relative to each file's folder; (dataset, skipped rows by reason)."""
    from datasets import Dataset

    merged, skipped = {}, Counter()
    total = 0
    for path in paths:
        columns, report = read_table(path, args.file_encoding, text_columns=(args.image_column, args.caption_column),
                                     caption_column=args.caption_column)
        skipped.update(report.skipped)
        images = columns.get(args.image_column)
        if images is not None:
            root = Path(path).parent
            columns[args.image_column] = [_relative_image_path(v, root) for v in images]
        for name in set(merged) | set(columns):  # union of the files' columns, None where one lacks it
            merged.setdefault(name, [None] * total).extend(columns.get(name, [None] * report.rows))
        total += report.rows
    return Dataset.from_dict(merged), skipped


def _from_files(args: "DataArguments", files: dict) -> "Splits":
    """Split -> file(s): csv/tsv/json read row by row (bad rows skipped and counted), parquet/arrow through
    `datasets`; image paths taken relative to each file's folder."""
    from datasets import concatenate_datasets, load_dataset

    raw = Splits()
    for split, paths in files.items():
        paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        if all(table_kind(path) is not None for path in paths):
            dataset, raw.file_skips[split] = _table_dataset(paths, args)
        elif all(Path(path).suffix.lower() in (".parquet", ".arrow") for path in paths):
            parts = []
            for path in paths:
                builder = "parquet" if Path(path).suffix.lower() == ".parquet" else "arrow"
                part = _defer_image_decoding(load_dataset(builder, data_files={split: path})[split], args.image_column)
                parts.append(_resolve_relative_paths(part, args.image_column, Path(path).parent))
            dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        else:
            raise ValueError(f"{', '.join(paths)}: use .csv, .tsv, .json/.jsonl or .parquet files (one kind per split)")
        raw[split] = dataset.to_iterable_dataset() if args.streaming else dataset
    return raw


def _builder_files(args: "DataArguments") -> dict | None:
    """`--dataset_name csv|json --data_dir DIR`: the split -> files `datasets` would pick (train*, validation*, ...),
    to be read row by row like --train_file; None when `datasets` should load it."""
    if args.dataset_name not in ("csv", "json") or not args.data_dir:
        return None
    from datasets.data_files import DataFilesDict, get_data_patterns

    found = DataFilesDict.from_patterns(get_data_patterns(args.data_dir), base_path=args.data_dir)
    files = {str(split): [f for f in paths if table_kind(f) is not None] for split, paths in found.items()}
    return {split: paths for split, paths in files.items() if paths} or None


def load_image_text_datasets(args: DataArguments) -> "Splits":
    """{"train": ..., "validation": ...} (either may be missing) as `datasets` (Iterable)Datasets."""
    from datasets import load_dataset

    reinforced_folder = _reinforced_folder(args)
    if reinforced_folder is not None:
        raw = _from_reinforced(reinforced_folder, args)
    elif args.dataset_name is None and args.train_file is None and args.validation_file is None:
        if not (EMBEDDED_DATA / "train.parquet").is_file():
            raise FileNotFoundError(f"the embedded dataset is missing from {EMBEDDED_DATA}; regenerate it with "
                                    "`python benchmarks/offline_data.py fashion-mnist` from the repository")
        files = {"train": str(EMBEDDED_DATA / "train.parquet"), "validation": str(EMBEDDED_DATA / "validation.parquet")}
        raw = Splits(load_dataset("parquet", data_files=files, streaming=args.streaming))
    elif args.train_file or args.validation_file:
        files = {}
        if args.train_file:
            files[args.train_split] = args.train_file
        if args.validation_file:
            files[args.validation_split] = args.validation_file
        raw = _from_files(args, files)
    elif builder_files := _builder_files(args):
        raw = _from_files(args, builder_files)
    else:
        if args.dataset_name in ("imagefolder", "audiofolder") and args.data_dir:
            _check_metadata_files(Path(args.data_dir))
        raw = Splits(load_dataset(args.dataset_name, args.dataset_config_name, data_dir=args.data_dir,
                                  streaming=args.streaming))
        if args.dataset_name == "imagefolder" and args.data_dir and not args.streaming:
            raw.file_skips = _images_without_metadata(raw, args)
    out = Splits()
    out.source = raw.source if reinforced_folder is not None else data_source(args)
    out.reinforced = raw.reinforced
    for name, split in (("train", args.train_split), ("validation", args.validation_split)):
        if split in raw:
            out[name] = raw[split]
            if split in raw.file_skips:
                out.file_skips[name] = raw.file_skips[split]
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


def _check_metadata_files(root: Path) -> None:
    """`imagefolder` reads its metadata.csv / metadata.jsonl as UTF-8 through pyarrow, which fails the whole load on
    one byte it cannot decode, naming neither file nor line: check them first and say both, and the fix."""
    for path in sorted(root.rglob("metadata.*")):
        if path.suffix.lower() not in (".csv", ".jsonl", ".json", ".parquet") or path.suffix.lower() == ".parquet":
            continue
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[:err.start].count(b"\n") + 1
            raise ValueError(f"{path}, line {line}: byte 0x{raw[err.start]:02x} is not UTF-8, and imagefolder reads its "
                             "metadata file as UTF-8. Re-save the file as UTF-8 (for a Windows export: `iconv -f "
                             f"cp1252 -t utf-8 {path.name} > fixed && mv fixed {path.name}`), or list the images in a "
                             "csv and use --train_file with --file_encoding.") from None


def _reinforced_folder(args: "DataArguments") -> Path | None:
    """The reinforced copy `--train_file` (or `--dataset_name parquet --data_dir`) points at, or None."""
    from .reinforced_copy import META_FILE

    for candidate in (args.train_file, args.data_dir if args.dataset_name in (None, "parquet") else None):
        if candidate and Path(candidate).is_dir() and (Path(candidate) / META_FILE).is_file():
            return Path(candidate)
    return None


def _from_reinforced(folder: Path, args: "DataArguments") -> "Splits":
    """A reinforced copy's splits (its training shards with their teacher columns; its validation shards unless
    --validation_file says otherwise), streamed or memory-mapped by `datasets`' parquet builder."""
    from datasets import ClassLabel, load_dataset

    from .reinforced_copy import check_shards, read_meta, split_files

    meta = read_meta(folder)
    files = {args.train_split: split_files(folder, "train")}
    if not files[args.train_split]:
        raise ValueError(f"{folder} is a reinforced copy without training shards ({folder}/train/part-*.parquet): "
                         "finish it with lightclip-reinforce (it resumes).")
    check_shards(folder, meta, "train")
    if args.validation_file:
        validation = _from_files(args, {args.validation_split: args.validation_file})[args.validation_split]
    elif split_files(folder, "validation"):
        check_shards(folder, meta, "validation")
        files[args.validation_split] = split_files(folder, "validation")
    raw = Splits(load_dataset("parquet", data_files=files, streaming=args.streaming))
    if args.validation_file:
        raw[args.validation_split] = validation
    names = meta.get("class_names")
    if names and args.validation_split in raw and "label" in (raw[args.validation_split].features or {}):
        raw[args.validation_split] = raw[args.validation_split].cast_column("label", ClassLabel(names=names))
    raw.reinforced = meta
    source = dict(meta.get("source") or {"name": "custom image-text data", "hub_id": None})
    raw.source = source
    train_skips = (meta["splits"].get("train") or {}).get("skipped")
    if train_skips:  # rows the copy left out, counted as training counts them
        raw.file_skips[args.train_split] = Counter(train_skips)
    return raw


def _images_without_metadata(raw, args) -> dict:
    """`imagefolder` with a metadata file drops every image that has no metadata row, silently: count them (under
    the training split) and say which, so a half-written metadata file is noticed."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    root = Path(args.data_dir)
    if not any(root.rglob("metadata.*")):
        return {}
    extensions = {e.lower() for e in ImageFolder.EXTENSIONS}
    on_disk = {str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in extensions and p.is_file()}
    listed = set()
    for dataset in raw.values():
        values = _defer_image_decoding(dataset, args.image_column)[args.image_column] \
            if args.image_column in dataset.column_names else []
        listed.update(str(Path(v["path"]).resolve()) for v in values if isinstance(v, dict) and v.get("path"))
    missing = sorted(on_disk - listed)
    if not missing:
        return {}
    logger.warning("%d image(s) under %s have no row in the metadata file and are not used (e.g. %s)", len(missing),
                   root, ", ".join(missing[:3]))
    return {args.train_split: Counter(image_without_metadata=len(missing))}


def _defer_image_decoding(dataset, column: str):
    """`datasets` decodes an `Image()` column when a row is read, before the collator sees it, so one corrupt file
    would crash the data loader. Keep the raw bytes/path instead: the collator decodes, skips and counts."""
    from datasets import Image as ImageFeature

    feature = (dataset.features or {}).get(column) if dataset.features is not None else None
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def _resolve_relative_paths(dataset, column: str, root: Path):
    """Image paths in a parquet/arrow file are taken relative to the file's folder (`_relative_image_path`, the rule
    the csv/json files follow)."""
    from datasets import Value

    feature = (dataset.features or {}).get(column) if dataset.features is not None else None
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        return dataset  # images stored in the file itself (bytes), nothing to resolve

    def _absolute(example):
        example[column] = _relative_image_path(example[column], root)
        return example

    return dataset.map(_absolute)


def _given_class_names(args: DataArguments) -> list[str] | None:
    if not args.class_names:
        return None
    path = Path(args.class_names)
    lines = path.read_text(encoding="utf-8-sig").splitlines() if path.is_file() else args.class_names.split(",")
    names = [name.strip() for name in lines if name.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"--class_names repeats a name: {names}")
    return names or None


def _label_id(value, lookup: dict, unknown: set) -> int:
    """One label cell -> class id (strings through `lookup`, casefolded; `unknown` collects those it lacks); -1 for a
    missing one (None, NaN, datasets' -1 convention)."""
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return -1
        if float(value).is_integer():
            value = int(value)
    if value is None:
        return -1
    if isinstance(value, str):
        key = value.strip().casefold()
        if not key:
            return -1
        if key not in lookup:
            unknown.add(value)
            return -1
        return lookup[key]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    unknown.add(repr(value))
    return -1


def prepare_zero_shot_labels(dataset, args: DataArguments):
    """(dataset, class names or None) for zero-shot classification of the evaluation split, validated at start-up.

    Class names come from --class_names, else the label column's `ClassLabel`, else (labels written as strings)
    the sorted distinct strings. String labels are mapped to their class ids (case-insensitively) or refused when
    they name no class; ids outside the class names are refused; missing labels (empty cells, None, NaN, -1) stay
    in retrieval, are left out of zero-shot and counted (`eval_zero_shot_unlabelled`)."""
    column = args.label_column
    columns = getattr(dataset, "column_names", None) or list(getattr(dataset, "features", None) or {})
    if not column or column not in columns:
        return dataset, _given_class_names(args)
    feature = (dataset.features or {}).get(column) if dataset.features is not None else None
    names = _given_class_names(args) or (list(feature.names) if hasattr(feature, "names") else None)
    try:
        values = list(dataset[column])
    except TypeError:  # a stream: checked batch by batch instead (bad labels are left out of zero-shot)
        return dataset, names
    strings = {}
    for v in values:  # distinct label strings, case-insensitively, in their first spelling
        if isinstance(v, str) and v.strip():
            strings.setdefault(v.strip().casefold(), v.strip())
    if strings and names is None:
        names = [strings[key] for key in sorted(strings)]
        logger.info("zero-shot class names from the %r column's values: %s", column, names)
    lookup = {name.strip().casefold(): i for i, name in enumerate(names or [])}
    unknown = set()
    ids = [_label_id(v, lookup, unknown) for v in values]
    if unknown:
        shown = ", ".join(sorted(map(str, unknown))[:5])
        raise ValueError(f"the {column!r} column holds labels that name no class ({shown}); class names: {names}. "
                         "Fix the labels or --class_names.")
    bad = sorted({i for i in ids if i < -1 or (names is not None and i >= len(names))})
    if bad:
        raise ValueError(f"the {column!r} column holds class ids {bad[:5]} outside the {len(names or [])} class names"
                         f"{' (none given: pass --class_names)' if names is None else ''}; ids run from 0 to "
                         "len(class names) - 1 (-1 or an empty cell = no label).")
    missing = sum(i == -1 for i in ids)
    if missing:
        logger.warning("%d evaluation rows have no label: scored for retrieval, left out of zero-shot", missing)
    if names is None:
        logger.warning("zero-shot classification is skipped: the %r column holds class ids but no class names are "
                       "known; pass --class_names (comma-separated, or a file with one per line) to score it.", column)
    if ids != values:
        dataset = dataset.remove_columns(column).add_column(column, ids)
    return dataset, names


def zero_shot_templates(args: DataArguments) -> list[str]:
    """The prompt templates, each checked by formatting it once with a class name."""
    if not args.zero_shot_templates:
        return list(EMBEDDED_CAPTION_TEMPLATES)
    path = Path(args.zero_shot_templates)
    templates = (path.read_text(encoding="utf-8-sig").splitlines() if path.is_file()
                 else args.zero_shot_templates.split("|"))
    templates = [t.strip() for t in templates if t.strip()]
    if not templates:
        raise ValueError("--zero_shot_templates holds no template: give '|'-separated templates with {} for the "
                         "class name, or a file with one per line.")
    for template in templates:
        try:
            formatted = template.format("\x00")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"zero-shot template {template!r} does not format with one class name "
                             f"({type(err).__name__}: {err}): write {{}} once where the class name goes and {{{{ }}}} "
                             "for a literal brace.") from None
        if "\x00" not in formatted:
            raise ValueError(f"zero-shot template {template!r} has no {{}} for the class name.")
    return templates


def _probe_rows(dataset, probe: int, seed: int = 0) -> list:
    """Up to `probe` rows spread over the whole dataset (seeded), or a stream's first rows."""
    try:
        n = len(dataset)
    except TypeError:  # a stream
        return [row for _, row in zip(range(probe), dataset)]
    indices = sorted(random.Random(seed).sample(range(n), min(probe, n)))
    return [dataset[i] for i in indices]


def _caption_values(dataset, caption_column: str, limit: int = 200_000) -> list | None:
    """The caption column (one column read, no images; the first `limit` rows) of a map-style dataset; None for a
    stream."""
    try:
        n = len(dataset)
    except TypeError:
        return None
    if n > limit:
        return list(dataset.select(range(limit))[caption_column])
    return list(dataset[caption_column])


def check_usable_samples(dataset, image_column: str, caption_column: str, special_tokens=frozenset(),
                         min_samples: int = 1, what: str = "training", probe: int = 32) -> None:
    """Refuse, at start-up and with one message, data that cannot train: an image column with no readable image
    among `probe` rows drawn across the dataset, no caption left after `clean_caption`, or fewer usable captions
    than `min_samples` (one global batch when the last partial batch is dropped)."""
    rows = _probe_rows(dataset, probe)
    captions = _caption_values(dataset, caption_column)
    whole = True
    if captions is None:  # a stream: the probed rows, read once for both checks; its size is known only when short
        captions = [row.get(caption_column) for row in rows]
        whole = len(rows) < probe
    reasons = Counter()
    usable = 0
    for value in captions:
        options = value if isinstance(value, (list, tuple)) else [value]
        results = [clean_caption(v, special_tokens) for v in options] or [(None, "missing_caption")]
        if any(caption is not None for caption, _ in results):
            usable += 1
        else:
            reasons[results[0][1]] += 1
    if usable == 0:
        counts = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        raise ValueError(f"no usable caption in the {what} data ({counts}) in column {caption_column!r}: captions "
                         "that are empty after dropping control and zero-width characters, or made only of "
                         "special-token strings, cannot train. Point --caption_column at the captions.")
    if usable < min_samples and whole:
        raise ValueError(f"the {what} data has {usable} usable samples, fewer than one global batch "
                         f"({min_samples} = --per_device_train_batch_size x processes): the run would take no "
                         "step. Lower --per_device_train_batch_size, add data, or set --dataloader_drop_last false.")
    decoded = 0
    for row in rows:
        try:
            load_image(row[image_column])
            decoded += 1
        except Exception:  # noqa: BLE001 - any failure counts as "not an image" here
            pass
    if rows and decoded == 0:
        example = repr(rows[0][image_column])[:80]
        raise ValueError(f"the image column {image_column!r} holds no readable images ({len(rows)} rows tried across "
                         f"the data, e.g. {example}); point --image_column at images (PIL, file paths or bytes).")


# ------------------------------------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16-bit greyscale is rescaled, transparency is composited on white, CMYK/P/LA/L are
    converted (the honest repair: the pixels are kept, only their encoding changes)."""
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():  # a float TIFF with NaN/Inf: no honest 8-bit picture of it
            raise ImageRejected("undecodable_image", "the image holds NaN or infinite pixel values")
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


def _check_shape(image: Image.Image, max_side: int, max_aspect_ratio: float) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("empty_image", f"the image is {width} x {height} pixels")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageRejected("extreme_aspect_ratio", f"the image is {width} x {height} pixels (aspect ratio above "
                                                    f"{max_aspect_ratio:g})")
    if max(width, height) > max_side:
        raise ImageRejected("too_large", f"the image is {width} x {height} pixels (more than {max_side} on a side)")


def _draft_jpeg(image: Image.Image, min_short_side: int) -> None:
    """Ask libjpeg to decode at the smallest of 1/2, 1/4, 1/8 scale whose short side is still >= `min_short_side`
    (PIL's `draft`: the scaling happens in the inverse DCT, so most of the decoding work is skipped). Nothing for
    other formats or JPEGs too small to halve (PIL ignores it for an image already decoded)."""
    if getattr(image, "format", None) != "JPEG":
        return
    width, height = image.size
    if min(width, height) < 2 * min_short_side:
        return
    scale = min_short_side / min(width, height)
    image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _image_file(path):
    """`path`, when it names a regular file: a FIFO, a device or a socket would block (or never end) when opened,
    and a folder cannot be an image (`not_a_file`); a path that names nothing raises FileNotFoundError as `open`
    would (`missing_file`)."""
    import stat

    mode = os.stat(path).st_mode  # FileNotFoundError when there is nothing
    if not stat.S_ISREG(mode):
        raise ImageRejected("not_a_file", f"{path} is not a regular file")
    return path


def load_image(value, repairs: Counter | None = None, max_side: int = MAX_IMAGE_SIDE,
               max_aspect_ratio: float = MAX_IMAGE_ASPECT_RATIO, min_short_side: int | None = None) -> Image.Image:
    """A PIL image from a PIL image, a path, raw bytes or a `datasets` {"bytes", "path"} dict, converted to RGB and
    turned upright by its EXIF orientation. Its size is checked from the header before decoding (pixels by PIL,
    each side and the aspect ratio here: `ImageRejected`). Non-trivial conversions are counted in `repairs` (by kind)
    when given. With `min_short_side`, a JPEG at least twice that size on its short side is decoded reduced
    (`_draft_jpeg`), keeping the short side >= `min_short_side`."""
    with warnings.catch_warnings():
        # between MAX_IMAGE_PIXELS and twice that PIL only warns (at open): treat it as the bomb it may be
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes"):
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(_image_file(value["path"]))
            else:
                raise ValueError("empty image record")
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, Path)):
            image = Image.open(_image_file(value))
        else:
            raise TypeError(f"not an image: {type(value).__name__}")
        _check_shape(image, max_side, max_aspect_ratio)
        if min_short_side:
            _draft_jpeg(image, min_short_side)
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # a phone photo taken sideways: turn it upright
            image = ImageOps.exif_transpose(image)
    kind = repair_kind(image)
    if kind is not None and repairs is not None:
        repairs[f"repaired_{kind}"] += 1
    return to_rgb(image)


def clean_caption(value, special_tokens=frozenset()) -> tuple[str | None, str | None]:
    """(caption, None) for a usable caption, (None, reason) for one to skip and count.

    Bytes are decoded as utf-8 (`non_utf8_caption` when they are not); numbers are text ("1984"); control and
    invisible format characters (zero-width spaces, a stray byte-order mark) are dropped and whitespace collapsed;
    what is left empty, or made only of the tokenizer's special-token strings however they are spaced ("[PAD] [PAD]",
    "[CLS][SEP]": export artefacts), is `empty_caption`."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8_caption"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = str(value) if math.isfinite(value) else None  # NaN: pandas' empty cell
    if value is None:
        return None, "missing_caption"
    if not isinstance(value, str):  # an object, a nested list, an image...: no text to train on
        return None, "caption_not_text"
    if not value.isprintable():  # the slow path only for text with controls, format characters or line breaks
        value = "".join(" " if ch.isspace() else ch for ch in value
                        if ch.isspace() or unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)
    value = " ".join(value.split())
    if not value or (any(token in value for token in special_tokens)  # the slow path only when one occurs
                     and not _without_special_tokens(value, special_tokens).strip()):
        return None, "empty_caption"
    return value, None


def captions_are_text(tokenizer):
    """The one tokenisation rule for captions: a caption that says "[MASK]" or "<|endoftext|>" is text, never that
    token's id. Set on the tokenizer itself (`split_special_tokens`, saved in its config), so training batches, the
    saved processor, the zero-shot prompts and the Hub pipeline all tokenise a caption the same way."""
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True
    return tokenizer


def _without_special_tokens(text: str, special_tokens) -> str:
    """`text` with every special-token string removed, however it is spaced ("[CLS][SEP]", "[PAD] [PAD]")."""
    for token in sorted(special_tokens, key=len, reverse=True):
        if token:
            text = text.replace(token, " ")
    return text


def normalize_on_device(pixel_values: torch.Tensor, image_processor, dtype=torch.float32) -> torch.Tensor:
    """uint8 images from `ImageTextCollator(uint8_images=True)` -> the model's input: rescaled and normalised as
    `image_processor` would, on whatever device they already are."""
    mean = torch.tensor(image_processor.image_mean, device=pixel_values.device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(image_processor.image_std, device=pixel_values.device, dtype=dtype).view(1, -1, 1, 1)
    scale = getattr(image_processor, "rescale_factor", 1 / 255)
    return (pixel_values.to(dtype) * scale - mean) / std


def random_crop_box(width: int, height: int, min_scale: float, rng: random.Random) -> tuple | None:
    """(left, top, right, bottom) of a random square-ish region keeping at least `min_scale` of the area (aspect
    3/4..4/3); None for the whole image (no crop)."""
    if min_scale >= 1.0 or width < 2 or height < 2:
        return None
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*(math.log(a) for a in _CROP_ASPECTS)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    return None


def random_resized_crop(image: Image.Image, min_scale: float, rng: random.Random) -> Image.Image:
    """Crop a random square-ish region keeping at least `min_scale` of the area (aspect 3/4..4/3)."""
    box = random_crop_box(*image.size, min_scale, rng)
    return image if box is None else image.crop(box)


def draw_augmentation(width: int, height: int, min_scale: float, horizontal_flip: bool,
                      rng: random.Random) -> list[float]:
    """One draw of the training augmentation as parameters that can be stored and re-applied (`apply_augmentation`):
    [left, top, right, bottom] of the crop as fractions of the image's width and height, then 1.0 for a horizontal
    flip (else 0.0). Fractions, so that a JPEG decoded reduced in training crops the same region."""
    box = random_crop_box(width, height, min_scale, rng) or (0, 0, width, height)
    flip = horizontal_flip and rng.random() < 0.5
    return [box[0] / width, box[1] / height, box[2] / width, box[3] / height, 1.0 if flip else 0.0]


def apply_augmentation(image: Image.Image, params) -> Image.Image:
    """`image` cropped and flipped as `params` (`draw_augmentation`) say; the crop box in pixels is recovered
    exactly at the size the parameters were drawn at."""
    width, height = image.size
    left, top, right, bottom, flip = (float(p) for p in params)
    box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
    if box != (0, 0, width, height):
        image = image.crop(box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip >= 0.5 else image


def _decode_short_side(image_processor, min_crop_scale: float) -> int | None:
    """The short side a training image must keep for `_draft_jpeg` so that the smallest random crop (area share
    `min_crop_scale`, at the most elongated of `_CROP_ASPECTS`) still covers the processor's input size without
    upsampling; None when the processor's size cannot be read."""

    def _side(size) -> int:
        if size is None:
            return 0
        read = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
        return read("shortest_edge") or max(read("height") or 0, read("width") or 0)

    side = _side(getattr(image_processor, "size", None)) or _side(getattr(image_processor, "crop_size", None))
    if not side:
        return None
    if min_crop_scale < 1.0:
        side = side / math.sqrt(min_crop_scale * min(min(_CROP_ASPECTS), 1 / max(_CROP_ASPECTS)))
    return math.ceil(side)


# ------------------------------------------------------------------------------------------------------- collator


@dataclass
class ImageTextCollator:
    """Examples -> a LightCLIP batch. Bad samples are skipped and counted in `skipped` by reason.

    train=True decodes large JPEGs reduced (`jpeg_draft_decoding`, never below what the smallest crop needs),
    applies the augmentation (random resized crop, horizontal flip) before the image processor and adds
    `training_targets`: what the objectives `model_config` switches on read (`_training_targets`: MLM's masked
    copies by `mask_for_mlm`, the rule the model itself uses; the teachers' features from each sample's own row,
    `teachers` being the reinforced data's teacher metadata; CLIP-PING's neighbours from `neighbours`, a
    `NeighbourTable`). Keys: pixel_values, input_ids, attention_mask, return_loss (so the Trainer computes an eval
    loss), training_targets; class_labels when `label_column` is set (evaluation only: the model takes no such
    input).
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
    teachers: list | None = None
    pad_to_max_length: bool = False
    uint8_images: bool = False
    max_image_aspect_ratio: float = MAX_IMAGE_ASPECT_RATIO
    jpeg_draft_decoding: bool = True
    synthetic_caption_ratio: float = 0.0
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        captions_are_text(self.tokenizer)
        self._batch_skipped = Counter()
        # training only: evaluation decodes in full, as the processor does at inference
        self._decode_short_side = (_decode_short_side(self.processor.image_processor, self.random_resized_crop_scale)
                                   if self.train and self.jpeg_draft_decoding else None)
        self._special_tokens = frozenset(getattr(self.tokenizer, "all_special_tokens", None) or ())

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
            image = load_image(value, repairs, max_aspect_ratio=self.max_image_aspect_ratio,
                               min_short_side=self._decode_short_side)
            for reason, count in repairs.items():
                self.skipped[reason] += count
                self._batch_skipped[reason] += count
        except ImageRejected as err:
            self._skip(err.reason)
            return None
        except FileNotFoundError:
            self._skip("missing_file")
            return None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            self._skip("too_large")
            return None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError):
            self._skip("undecodable_image")
            return None
        except TypeError:
            self._skip("not_an_image")
            return None
        if self.train and example.get(AUGMENTATIONS) is not None and len(example[AUGMENTATIONS]):
            # a reinforced copy's stored views: one drawn, re-applied exactly, its teachers' features read with it
            self._view = self._rng.randrange(len(example[AUGMENTATIONS]))
            return apply_augmentation(image, example[AUGMENTATIONS][self._view])
        if self.train:
            image = random_resized_crop(image, self.random_resized_crop_scale, self._rng)
            if self.horizontal_flip and self._rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image

    def _caption(self, example):
        """The sample's caption (one drawn when it has several, or, in training at `synthetic_caption_ratio`, one of
        its synthetic captions; `_drawn` says which, so the teachers' text features of that caption are the ones
        read), or None, counted."""
        synthetic = example.get(SYNTHETIC_CAPTIONS) if self.train and self.synthetic_caption_ratio > 0 else None
        if synthetic and self._rng.random() < self.synthetic_caption_ratio:
            self._drawn = (SYNTHETIC_CAPTIONS, self._rng.randrange(len(synthetic)))
            caption, reason = self.clean(synthetic[self._drawn[1]])
            if reason is not None:
                self._skip(reason)
            return caption
        caption = example.get(self.caption_column)
        self._drawn = None
        if isinstance(caption, (list, tuple)):  # several captions per image: draw one
            self._drawn = self._rng.randrange(len(caption)) if caption else None
            caption = caption[self._drawn] if caption else None
        caption, reason = self.clean(caption)
        if reason is not None:
            self._skip(reason)
        return caption

    @staticmethod
    def _class_label(value) -> int:
        """The class id of an evaluation row; -1 (left out of zero-shot, counted there) for a missing label."""
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            return -1
        return int(value)

    def tokenize(self, captions: list[str]) -> dict:
        """Clean captions -> `input_ids`, `attention_mask` (tensors), as every batch tokenises them."""
        max_length = self.max_length or min(getattr(self.tokenizer, "model_max_length", 77), 512)
        # a caption that says "[MASK]" is text: the tokenizer's own rule (`captions_are_text`)
        return self.tokenizer(captions, padding="max_length" if self.pad_to_max_length else True, truncation=True,
                              max_length=max_length, return_tensors="pt")

    def clean(self, caption) -> tuple[str | None, str | None]:
        """(caption, None) or (None, why it is skipped): `clean_caption` with this tokenizer's special tokens."""
        return clean_caption(caption, self._special_tokens)

    def __call__(self, examples: list[dict]) -> dict:
        # This batch's randomness (augmentation, MLM masking) is derived from (seed, epoch, the batch's captions),
        # not from a running generator: the data loader collates one batch ahead of training, so a run resumed
        # from a checkpoint would otherwise augment and mask its first batches differently.
        key = repr((self.seed, self.epoch, [str(e.get(self.caption_column))[:200] for e in examples]))
        batch_seed = zlib.crc32(key.encode("utf-8", "replace"))
        self._rng = random.Random(batch_seed)
        generator = torch.Generator().manual_seed(batch_seed)
        self._batch_skipped = Counter()
        images, captions, keep, drawn, views = [], [], [], [], []
        for i, example in enumerate(examples):
            caption = self._caption(example)
            self._view = None
            image = self._image(example) if caption is not None else None
            if image is None or caption is None:
                continue
            images.append(image)
            captions.append(caption)
            keep.append(i)
            drawn.append(self._drawn)
            views.append(self._view)
        if not images:
            self._skip("empty_batch")
            # an empty tensor first: loaders that measure a batch (accelerate's, for streams) find size 0
            return {"empty_batch": torch.zeros(0, dtype=torch.long), "skipped": dict(self._batch_skipped),
                    "return_loss": True}
        text = self.tokenize(captions)
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
        if self.label_column is not None and self.label_column in examples[0]:
            batch["class_labels"] = torch.tensor([self._class_label(examples[i][self.label_column]) for i in keep],
                                                 dtype=torch.long)
        if self.train:
            targets = self._training_targets(examples, keep, text, generator, drawn, views)
            if targets:
                batch["training_targets"] = targets
        return batch

    def _training_targets(self, examples: list[dict], keep: list[int], text, generator, drawn=None,
                          views=None) -> dict:
        """The per-sample training targets the model's objectives read (`training_targets_read`: each objective
        declares its own), built here, in one place, one builder per target: MLM's masked copies, the teachers'
        features and embeddings read from each sample's own row (of the caption drawn, `drawn`, and the stored view
        drawn, `views`, when a row has several), CLIP-PING's neighbour ids or in-batch partners."""
        config = self.model_config
        if config is None:
            return {}
        wanted = training_targets_read(config)
        targets = {}
        if "mlm_input_ids" in wanted:
            targets["mlm_input_ids"], targets["mlm_labels"] = mask_for_mlm(
                config, text["input_ids"], text["attention_mask"], generator)
        if self.teachers and wanted & {"teacher_image_features", "teacher_image_embeds"}:
            kept = [examples[i] for i in keep]
            if "teacher_image_features" in wanted:
                targets["teacher_image_features"], targets["teacher_text_features"] = teacher_tensors(
                    kept, self.teachers, drawn, views)
            if "teacher_image_embeds" in wanted:
                targets["teacher_image_embeds"], targets["teacher_text_embeds"] = teacher_tensors(
                    kept, [t for t in self.teachers if t.get("kind") == "multimodal"], drawn, views)
        if STORED_TEXT_OUTPUTS in examples[0]:  # the locked text tower's outputs, stored with each row
            targets[STORED_TEXT_OUTPUTS] = torch.tensor(
                np.asarray([examples[i][STORED_TEXT_OUTPUTS] for i in keep], dtype=np.float32))
        if self.neighbours is not None and wanted & {"sample_ids", "ping_partner_rows"}:
            if "sample_id" not in examples[0]:
                raise ValueError("CLIP-PING needs a sample_id column in the training set (its row index).")
            ids = [int(examples[i]["sample_id"]) for i in keep]
            if "sample_ids" in wanted:
                targets["sample_ids"] = torch.tensor(ids, dtype=torch.long)
                targets["image_neighbour_ids"], targets["text_neighbour_ids"] = self.neighbours.sample(
                    ids, np.random.default_rng(self._rng.getrandbits(63)))
            if "ping_partner_rows" in wanted:  # the sampler laid the batch out in (anchor, neighbour) pairs
                kept_rows = set(keep)
                layout = [int(e["sample_id"]) if i in kept_rows else None for i, e in enumerate(examples)]
                targets["ping_partner_rows"], targets["ping_partner_spaces"] = self.neighbours.pair_partners(layout)
        return targets


def one_of_stored(value, index: int | None):
    """A row's stored features of one caption or one view: the row holds one vector, or one per caption (several
    captions per image) or per stored augmentation, of which the `index`-th (the one drawn for this step)."""
    if len(value) and isinstance(value[0], (list, tuple, np.ndarray)):
        return value[index or 0]
    return value


def teacher_tensors(examples: list[dict], teachers: list[dict], drawn: list | None = None,
                    views: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) teacher features of `examples`, read from each sample's own row (image: of the stored view in
    `views`, text: of the caption in `drawn`, when the row stores several). Each teacher's vectors are L2-normalised
    and, with several teachers, scaled by 1/sqrt(T) and concatenated: a dot product of two such rows is the mean of
    the teachers' cosine similarities (an ensemble), whatever the teachers' dimensions."""
    scale = 1.0 / math.sqrt(len(teachers))
    chosen = {"image": views or [None] * len(examples), "text": drawn or [None] * len(examples)}
    out = []
    for side in ("image", "text"):
        parts = []
        for teacher in teachers:
            column = teacher["columns"][side]
            rows = []
            for example, k in zip(examples, chosen[side]):
                if isinstance(k, tuple):  # a synthetic caption: its features are in the teacher's synthetic column
                    rows.append(example[teacher["columns"]["synthetic_text"]][k[1]])
                else:
                    rows.append(one_of_stored(example[column], k))
            values = torch.tensor(np.asarray(rows, dtype=np.float32))
            parts.append(torch.nn.functional.normalize(values, dim=-1) * scale)
        out.append(torch.cat(parts, dim=1))
    return out[0], out[1]


__all__ = [
    "EMBEDDED_CAPTION_TEMPLATES",
    "DataArguments",
    "ImageTextCollator",
    "ImageRejected",
    "Splits",
    "captions_are_text",
    "check_usable_samples",
    "clean_caption",
    "data_source",
    "teacher_tensors",
    "load_image",
    "load_image_text_datasets",
    "normalize_on_device",
    "prepare_zero_shot_labels",
    "apply_augmentation",
    "draw_augmentation",
    "random_resized_crop",
    "to_rgb",
    "zero_shot_templates",
]
