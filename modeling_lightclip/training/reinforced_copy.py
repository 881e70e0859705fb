"""The reinforced-copy format: its metadata file and shard layout (training side; read by the data loader and
written by `reinforce`)."""

import json
from pathlib import Path


META_FILE = "reinforced.json"
FORMAT = "lightclip-reinforced/1"


SYNTHETIC_CAPTIONS = "synthetic_captions"  # a copy's column of captions written by an image-to-text model


def teacher_columns(index: int, synthetic: bool = False) -> dict:
    """The columns holding teacher `index`'s image and text features (and, in a copy with synthetic captions, its
    text features of those)."""
    columns = {"image": f"teacher{index}_image", "text": f"teacher{index}_text"}
    if synthetic:
        columns["synthetic_text"] = f"teacher{index}_synthetic_text"
    return columns


def read_meta(folder) -> dict | None:
    """The metadata of a reinforced copy, or None when `folder` is not one."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not readable as the copy's metadata ({err}); rerun lightclip-reinforce with "
                         "the command that made the copy: it keeps the finished shards and writes this file "
                         "again.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: holds a JSON {type(meta).__name__}, not the copy's metadata; rerun "
                         "lightclip-reinforce with the command that made the copy to write it again.")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; rebuild it with "
                         "lightclip-reinforce.")
    return meta


def split_files(folder, split: str) -> list[str]:
    """The parquet shards of one split of a reinforced copy, in shard order."""
    return sorted(str(p) for p in (Path(folder) / split).glob("part-*.parquet"))


def feature_width(arrow_type) -> int | None:
    """The dimension of a stored feature column: a fixed-size list of numbers, or a list of them (one vector per
    caption, or per stored view)."""
    while hasattr(getattr(arrow_type, "value_type", None), "value_type"):  # a list of lists: the vectors inside
        arrow_type = arrow_type.value_type
    return getattr(arrow_type, "list_size", None)


def check_shards(folder, meta: dict, split: str) -> None:
    """Refuse, naming the file, a shard of `split` that is cut short or damaged, or whose columns or feature sizes
    are not those `meta` (the copy's metadata) promises: training would otherwise stop deep inside a library at
    the first batch that reaches it. Reads each shard's parquet footer only."""
    import pyarrow.parquet as pq

    rerun = "rerun lightclip-reinforce with the command that made the copy (it writes such shards again)"
    teachers = meta.get("teachers") if split == "train" else []
    if not isinstance(teachers, list) or not all(isinstance(t, dict) for t in teachers):
        raise ValueError(f"{Path(folder) / META_FILE}: `teachers` should be a list of teacher records; {rerun}.")
    columns = meta.get("columns") if isinstance(meta.get("columns"), dict) else {}
    expected = {name: None for name in (columns.get("image"), columns.get("caption"), columns.get("label")) if name}
    for i, teacher in enumerate(teachers):
        names = teacher.get("columns") or teacher_columns(i)
        for side, name in names.items():
            expected[name] = teacher.get("image_dim" if side == "image" else "text_dim")
    for path in split_files(folder, split):
        try:
            schema = pq.read_schema(path)
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for a cut-short or damaged file vary
            raise ValueError(f"{path}: not a whole parquet file ({type(err).__name__}: {str(err)[:120]}); {rerun}.") \
                from None
        for name, size in expected.items():
            if name not in schema.names:
                raise ValueError(f"{path}: has no column {name!r}, which {META_FILE} lists ({', '.join(schema.names)} "
                                 f"are there): the shards and the metadata come from different copies; {rerun}.")
            width = feature_width(schema.field(name).type)
            if size is not None and width is not None and width != size:
                raise ValueError(f"{path}: column {name!r} holds features of {width} dimensions and {META_FILE} says "
                                 f"{size}: the shards and the metadata come from different copies; {rerun}.")


__all__ = ["FORMAT", "META_FILE", "SYNTHETIC_CAPTIONS", "check_shards", "feature_width", "read_meta", "split_files", "teacher_columns"]
