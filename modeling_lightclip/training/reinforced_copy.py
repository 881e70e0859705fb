"""The reinforced-copy format: its metadata file and shard layout (training side; read by the data loader and
written by `reinforce`)."""

import json
from pathlib import Path


META_FILE = "reinforced.json"
FORMAT = "lightclip-reinforced/1"


def teacher_columns(index: int) -> dict:
    """The columns holding teacher `index`'s image and text features."""
    return {"image": f"teacher{index}_image", "text": f"teacher{index}_text"}


def read_meta(folder) -> dict | None:
    """The metadata of a reinforced copy, or None when `folder` is not one."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; rebuild it with "
                         "lightclip-reinforce.")
    return meta


def split_files(folder, split: str) -> list[str]:
    """The parquet shards of one split of a reinforced copy, in shard order."""
    return sorted(str(p) for p in (Path(folder) / split).glob("part-*.parquet"))


__all__ = ["FORMAT", "META_FILE", "read_meta", "split_files", "teacher_columns"]
