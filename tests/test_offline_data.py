"""Preparation of the real offline data sets (`benchmarks/offline_data.py`): OpenClipart captions and rasters from
SVG metadata."""

import os
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="40" height="40" viewBox="0 0 40 40">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Someone Else</dc:title></cc:Agent></dc:publisher>
  </cc:Work></rdf:RDF></metadata>
  <rect x="5" y="5" width="30" height="30" fill="#c00000"/>
</svg>"""


def _write(root: Path, relative: str, text: str) -> None:
    path = root / "usr" / "share" / "openclipart" / "svg" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_openclipart_captions_from_metadata(tmp_path):
    from offline_data import openclipart_caption

    _write(tmp_path, "animals/birds/rooster.svg",
           SVG.format(title="Red  Rooster", keywords="<rdf:li>rooster</rdf:li><rdf:li>unsorted</rdf:li>"
                                                     "<rdf:li>farm</rdf:li><rdf:li>rooster</rdf:li>"))
    _write(tmp_path, "food/empty.svg", SVG.format(title="", keywords=""))
    svg_root = tmp_path / "usr" / "share" / "openclipart" / "svg"
    # the work's own title (not the publisher's), the category path, keywords deduplicated without "unsorted"
    assert openclipart_caption(svg_root / "animals/birds/rooster.svg", svg_root) == \
        "Red Rooster. animals, birds. rooster, farm."
    assert openclipart_caption(svg_root / "food/empty.svg", svg_root) is None


def test_openclipart_parquet_with_rasters_and_skips(tmp_path):
    try:
        import cairosvg  # noqa: F401 - needs the cairo system library too
    except (ImportError, OSError):
        pytest.skip("cairosvg (and libcairo) not available")
    from datasets import load_dataset

    from offline_data import write_openclipart

    for i in range(12):
        _write(tmp_path, f"objects/item_{i}.svg", SVG.format(title=f"Thing {i}", keywords="<rdf:li>box</rdf:li>"))
    _write(tmp_path, "objects/broken.svg", "<svg><metadata>not closed")
    _write(tmp_path, "objects/nometa.svg", SVG.format(title="", keywords=""))
    counts = write_openclipart(tmp_path / "out", tmp_path, image_size=24)
    assert counts["train"] + counts["validation"] == 12
    assert counts["skipped"] == {"unparseable_svg": 1, "no_metadata": 1}
    data = load_dataset("parquet", data_files={"train": str(tmp_path / "out" / "train.parquet")})["train"]
    row = data[0]
    assert row["image"].size == (24, 24) and row["image"].mode == "RGB"
    assert row["image"].getpixel((12, 12)) == (192, 0, 0) and row["image"].getpixel((0, 0)) == (255, 255, 255)
    assert row["caption"].startswith("Thing ") and row["caption"].endswith("objects. box.")
    # the split is a function of the path alone: a second build puts every file in the same split
    again = write_openclipart(tmp_path / "again", tmp_path, image_size=24)
    assert (again["train"], again["validation"]) == (counts["train"], counts["validation"])


def _idx(path: Path, array, magic: int) -> None:
    import gzip
    import struct

    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_splits_from_idx_files(tmp_path):
    """Balanced train/validation subsets and, with test_per_class=1000 here standing for 'all', the whole test
    split: every test image once, with its own label and a caption naming that label's class."""
    import numpy as np
    from datasets import load_dataset

    from offline_data import FASHION_MNIST_CLASSES, write_fashion_mnist

    folder = tmp_path / "root" / "usr" / "share" / "datasets" / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 40)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)  # each image identifiable by its first pixel
        images[:, 5:, 5:] = rng.integers(0, 255, (n, 23, 23), dtype=np.uint8)
        _idx(folder / f"{split}-images-idx3-ubyte.gz", images, 2051)
        _idx(folder / f"{split}-labels-idx1-ubyte.gz", labels, 2049)
    counts = write_fashion_mnist(tmp_path / "out", tmp_path / "root", 3, 2, seed=0, test_per_class=1000)
    assert counts == {"train": 30, "validation": 20, "test": 40}
    test = load_dataset("parquet", data_files=str(tmp_path / "out" / "test.parquet"), split="train")
    first_pixels = sorted(np.asarray(image)[0, 0] for image in test["image"])
    assert first_pixels == list(range(40))
    names = test.features["label"].names
    assert names == FASHION_MNIST_CLASSES
    for image, label, caption in zip(test["image"], test["label"], test["caption"]):
        assert np.asarray(image)[0, 0] % 10 == label and names[label] in caption
    train = load_dataset("parquet", data_files=str(tmp_path / "out" / "train.parquet"), split="train")
    assert sorted(np.bincount(train["label"]).tolist()) == [3] * 10


def test_icon_theme_test_set_one_image_per_name(tmp_path):
    """An icon theme becomes one image per icon name (its smallest PNG >= 48 px; symbolic variants, links and
    names without words left out), captioned with the name's words."""
    from datasets import load_dataset
    from PIL import Image

    from offline_data import icon_caption, write_icon_theme

    theme = tmp_path / "usr" / "share" / "icons" / "demo"
    files = {"actions/16/edit-copy.png": 16, "actions/48/edit-copy.png": 48, "actions/128/edit-copy.png": 128,
             "places/64/folder-music.png": 64, "places/symbolic/folder-music-symbolic.png": 64,
             "apps/48/org.x11.xterm.png": 48, "mimetypes/48/application-x-7z.png": 48}
    for relative, size in files.items():
        path = theme / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (size, size), (size, 0, 0, 128)).save(path)
    (theme / "actions" / "48" / "edit-duplicate.png").symlink_to(theme / "actions" / "48" / "edit-copy.png")
    counts = write_icon_theme(tmp_path / "out", tmp_path, "demo", image_size=32)
    rows = load_dataset("parquet", data_files=str(tmp_path / "out" / "test.parquet"), split="train")
    by_caption = dict(zip(rows["caption"], rows["path"]))
    assert by_caption == {"edit copy": "actions/48/edit-copy.png", "folder music": "places/64/folder-music.png",
                          "org xterm": "apps/48/org.x11.xterm.png", "application": "mimetypes/48/application-x-7z.png"}
    assert counts["test"] == 4 and rows[0]["image"].size == (32, 32)
    assert icon_caption("x-7z") is None and icon_caption("media-playback-start") == "media playback start"


def test_debian_package_extraction_is_removed_on_leaving(tmp_path, monkeypatch):
    """A fetched package (stand-in `apt-get` and `dpkg` on PATH, recording their calls) is extracted into a temporary
    folder that is gone after the block; a given extraction is used as it is and left in place."""
    from offline_data import debian_package

    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "apt-get $*" >> {calls}\ntouch "$2_1.0-1_all.deb"\n')
    (bin_dir / "dpkg").write_text(f'#!/bin/sh\necho "dpkg $*" >> {calls}\n'
                                  'mkdir -p "$3/usr/share/doc" && basename "$2" > "$3/usr/share/doc/from"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    with debian_package("some-package") as root:
        assert (root / "usr" / "share" / "doc" / "from").read_text().strip() == "some-package_1.0-1_all.deb"
        scratch = root.parent
    assert not scratch.exists()
    assert calls.read_text().splitlines() == ["apt-get download some-package",
                                              f"dpkg -x {scratch}/some-package_1.0-1_all.deb {root}"]

    given = tmp_path / "given"
    given.mkdir()
    with debian_package("some-package", str(given)) as root:
        assert root == given
    assert given.is_dir() and len(calls.read_text().splitlines()) == 2  # nothing fetched
