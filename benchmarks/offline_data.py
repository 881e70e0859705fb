"""Real image-text data that needs no network, from Debian's packages.

Fashion-MNIST (`dataset-fashion-mnist`): zero-shot classification.

    python benchmarks/offline_data.py fashion-mnist --out data/fashion_mnist --train_per_class 1000 \
        --validation_per_class 200

fetches the package with `apt-get download` + `dpkg -x` (no root needed for those two; an existing extraction can
be given with --package_root), reads the IDX files and writes `train.parquet` / `validation.parquet` in `datasets`
format: `image` (PNG), `caption` (class name in a prompt template), `label` (a `ClassLabel` carrying the class
names, which zero-shot evaluation reads). The validation split is drawn from the official *test* split only.
The repository ships the output of the command above under `data/fashion_mnist/` as the embedded default.

OpenClipart (`openclipart-svg`, 8,121 public-domain SVGs with human-written metadata): image-caption retrieval.

    python benchmarks/offline_data.py openclipart --out data/openclipart --image_size 64

rasterises every SVG with `cairosvg` (pip) onto white, builds its caption from the work's own metadata (title,
category path, keywords) and writes `train.parquet` / `validation.parquet` with a fixed split (a stable hash of the
file's path: 10% validation). SVGs that fail to parse or render are skipped and counted.
"""

import argparse
import contextlib
import gzip
import io
import random
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import sys

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Training captions: each image gets one template, drawn with a fixed seed; zero-shot evaluation averages the same
# templates per class (the CLIP prompt-ensemble recipe), the trainer's default for its embedded Fashion-MNIST data
from modeling_lightclip.training.data import EMBEDDED_CAPTION_TEMPLATES as CAPTION_TEMPLATES  # noqa: E402


FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle boot"]
_IDX = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@contextlib.contextmanager
def debian_package(name: str, package_root: str | Path | None = None) -> Iterator[Path]:
    """The extraction root of Debian package NAME: `package_root` (an existing `dpkg -x`) when given, else the
    package fetched with `apt-get download` + `dpkg -x` into a temporary folder that is removed on leaving."""
    if package_root:
        yield Path(package_root)
        return
    with tempfile.TemporaryDirectory(prefix=f"lightclip-{name}-") as scratch:
        subprocess.run(["apt-get", "download", name], cwd=scratch, check=True, capture_output=True)
        deb = sorted(Path(scratch).glob(f"{name}_*.deb"))[-1]
        root = Path(scratch) / "root"
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        yield root


def read_fashion_mnist(package_root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels int64 N) of the official `train` or `test` split."""
    folder = Path(package_root) / "usr" / "share" / "datasets" / "fashion-mnist"
    images_file, labels_file = _IDX[split]
    with gzip.open(folder / images_file, "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / labels_file, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(FASHION_MNIST_CLASSES))]
    return rng.permutation(np.concatenate(picked))


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def write_fashion_mnist(out_dir: Path, package_root: Path, train_per_class: int, validation_per_class: int,
                        seed: int = 0, test_per_class: int = 0) -> dict:
    """Write balanced train/validation (and, with `test_per_class`, test) parquet files; returns their row counts.
    validation and test are both drawn from the official test split: validation is for watching a run, test (all
    1,000 per class for the whole split) for reporting; nothing is ever selected on test."""
    from datasets import ClassLabel, Dataset, Features, Image, Value

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "caption": Value("string"),
                         "label": ClassLabel(names=FASHION_MNIST_CLASSES)})
    counts = {}
    splits = [("train", "train", train_per_class), ("validation", "test", validation_per_class)]
    if test_per_class:
        splits.append(("test", "test", test_per_class))
    for split, source, per_class in splits:
        images, labels = read_fashion_mnist(package_root, source)
        index = _balanced_subset(labels, per_class, seed)
        rng = random.Random(seed)
        rows = {"image": [], "caption": [], "label": []}
        for i in index:
            name = FASHION_MNIST_CLASSES[labels[i]]
            rows["image"].append({"bytes": _png(images[i]), "path": None})
            rows["caption"].append(rng.choice(CAPTION_TEMPLATES).format(name))
            rows["label"].append(int(labels[i]))
        Dataset.from_dict(rows, features=features).to_parquet(str(out_dir / f"{split}.parquet"))
        counts[split] = len(index)
    return counts


_NS = {"dc": "http://purl.org/dc/elements/1.1/", "cc": "http://web.resource.org/cc/",
       "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}
_IGNORED_KEYWORDS = {"unsorted", "clip art", "clipart", "image", "media", "png", "public domain", "svg"}


def openclipart_caption(svg_path: Path, svg_root: Path) -> str | None:
    """Caption from the work's own metadata: title, then the category path, then up to five keywords."""
    import xml.etree.ElementTree as ET

    work = ET.parse(svg_path).getroot().find(".//cc:Work", _NS)
    if work is None:
        return None
    title = " ".join((work.findtext("dc:title", default="", namespaces=_NS) or "").split())
    keywords = [" ".join((li.text or "").split()) for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS)]
    keywords = [k for k in dict.fromkeys(keywords) if k and k.lower() not in _IGNORED_KEYWORDS][:5]
    category = [part.replace("_", " ") for part in svg_path.relative_to(svg_root).parent.parts]
    if not title and not keywords:
        return None
    parts = [title] if title else []
    if category:
        parts.append(", ".join(category))
    if keywords:
        parts.append(", ".join(keywords))
    return ". ".join(parts) + "."


def _png_on_white(image) -> bytes:
    """An RGBA picture composed on a white background, as optimised RGB PNG bytes (clip-art and icons are
    transparent; the trainer reads RGB)."""
    from PIL import Image as PILImage

    flat = PILImage.new("RGBA", image.size, (255, 255, 255, 255))
    buffer = io.BytesIO()
    PILImage.alpha_composite(flat, image).convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def icon_caption(name: str) -> str | None:
    """An icon's caption from its freedesktop name (`media-playback-start` -> `media playback start`): the words of
    the name, lower case; None for names with fewer than two letters of words (application ids, mime codes)."""
    words = [w for w in re.split(r"[-_.\s]+", name.lower()) if w and w.isalpha() and len(w) > 1]
    return " ".join(words) if words else None


def write_icon_theme(out_dir: Path, package_root: Path, theme: str, image_size: int = 64, min_size: int = 48) -> dict:
    """A second retrieval test set from a freedesktop icon theme (a different source than OpenClipart): one image per
    icon name - its PNG at the smallest size >= `min_size` (symbolic variants and links left out), composed on white
    and resized to `image_size` - captioned with the name's words. Names whose captions repeat are kept (retrieval
    counts a same-caption hit). Writes `test.parquet`; returns row and skip counts."""
    from collections import Counter

    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    root = Path(package_root) / "usr" / "share" / "icons" / theme
    best: dict[str, tuple[int, Path]] = {}
    skipped = Counter()
    for path in sorted(root.rglob("*.png")):
        size = path.parent.name.split("x")[0]
        if path.is_symlink() or not size.isdigit() or int(size) < min_size or "symbolic" in path.parts:
            continue
        name = path.stem
        if name not in best or int(size) < best[name][0]:
            best[name] = (int(size), path)
    rows = {"image": [], "caption": [], "path": []}
    for name, (_, path) in sorted(best.items()):
        caption = icon_caption(name)
        if caption is None:
            skipped["no_words"] += 1
            continue
        try:
            image = PILImage.open(path).convert("RGBA").resize((image_size, image_size), PILImage.BICUBIC)
        except Exception:  # noqa: BLE001 - any unreadable file
            skipped["unreadable_png"] += 1
            continue
        rows["image"].append({"bytes": _png_on_white(image), "path": None})
        rows["caption"].append(caption)
        rows["path"].append(str(path.relative_to(root)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "caption": Value("string"), "path": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(out_dir / "test.parquet"))
    return {"test": len(rows["caption"]), "distinct_captions": len(set(rows["caption"])), **dict(skipped)}


def write_openclipart(out_dir: Path, package_root: Path, image_size: int = 64, validation_percent: int = 10,
                      limit: int | None = None) -> dict:
    """Rasterise and caption the OpenClipart SVGs; returns row counts and skip counts by reason."""
    import zlib
    from collections import Counter

    import cairosvg
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    svg_root = Path(package_root) / "usr" / "share" / "openclipart" / "svg"
    paths = sorted(svg_root.rglob("*.svg"))[:limit]
    rows = {"train": {"image": [], "caption": [], "path": []}, "validation": {"image": [], "caption": [], "path": []}}
    skipped = Counter()
    for path in paths:
        try:
            caption = openclipart_caption(path, svg_root)
        except Exception:  # noqa: BLE001 - malformed XML
            skipped["unparseable_svg"] += 1
            continue
        if caption is None:
            skipped["no_metadata"] += 1
            continue
        try:
            png = cairosvg.svg2png(url=str(path), output_width=image_size, output_height=image_size)
            image = PILImage.open(io.BytesIO(png)).convert("RGBA")
        except Exception:  # noqa: BLE001 - any rendering failure
            skipped["unrenderable_svg"] += 1
            continue
        relative = str(path.relative_to(svg_root))
        split = "validation" if zlib.crc32(relative.encode()) % 100 < validation_percent else "train"
        rows[split]["image"].append({"bytes": _png_on_white(image), "path": None})
        rows[split]["caption"].append(caption)
        rows[split]["path"].append(relative)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    features = Features({"image": Image(), "caption": Value("string"), "path": Value("string")})
    for split, columns in rows.items():
        Dataset.from_dict(columns, features=features).to_parquet(str(out_dir / f"{split}.parquet"))
    return {"train": len(rows["train"]["caption"]), "validation": len(rows["validation"]["caption"]),
            "skipped": dict(skipped)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["fashion-mnist", "openclipart"])
    parser.add_argument("--out")
    parser.add_argument("--package_root", help="an existing `dpkg -x` extraction of the Debian package")
    parser.add_argument("--image_size", type=int, default=64, help="openclipart: raster size")
    parser.add_argument("--limit", type=int, help="openclipart: only the first N SVGs (by path)")
    parser.add_argument("--train_per_class", type=int, default=1000)
    parser.add_argument("--validation_per_class", type=int, default=200)
    parser.add_argument("--test_per_class", type=int, default=0,
                        help="fashion-mnist: also write test.parquet (1000 = the whole official test split)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    package = "dataset-fashion-mnist" if args.dataset == "fashion-mnist" else "openclipart-svg"
    out = Path(args.out or ("data/fashion_mnist" if args.dataset == "fashion-mnist" else "data/openclipart"))
    with debian_package(package, args.package_root) as root:
        if args.dataset == "fashion-mnist":
            counts = write_fashion_mnist(out, root, args.train_per_class, args.validation_per_class, args.seed,
                                         args.test_per_class)
        else:
            counts = write_openclipart(out, root, args.image_size, limit=args.limit)
    print(f"wrote {counts} to {out}")


if __name__ == "__main__":
    main()
