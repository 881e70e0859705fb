"""Reading the csv / tsv / json(-lines) files people export from spreadsheets and scripts (training side).

`datasets`' own csv/json builders go through pandas / pyarrow, where one undecodable byte, one ragged row or one
broken json line fails the whole load ("An error occurred while generating the dataset"). These files are small
(paths and captions), so they are read here row by row instead: a row that cannot be read is skipped and counted
by reason, with its line number, and the rest becomes a `datasets.Dataset` as before.

* Delimiter by extension: `.tsv` / `.tab` tab-separated, `.csv` comma-separated (or, when the header line has no
  comma, the `;`, tab or `|` it has: Excel writes `;` in locales with a decimal comma); `.json` holding one array is
  read whole, otherwise (and `.jsonl`) one object per line.
* Encoding: `--file_encoding` (default utf-8). A byte-order mark wins (utf-8-sig, and the utf-16 of Excel's
  "Unicode text" export). Undecodable bytes skip their row (`undecodable_text`), and the warning names the fix.
* Lines end at a line feed (or CR LF) only: a caption holding a Unicode line or paragraph separator (U+2028,
  U+2029), NEL (U+0085) or a form feed stays one caption, as csv and JSON mean it (`str.splitlines` would cut it).
* Cells stay text; other columns (labels) become integers when every filled cell is one. Empty cells are None.
  A JSON caption may be a list of captions (several per image: training draws one); a caption that is an object,
  or a list holding anything but text, is no caption (`caption_not_text`).
"""

import codecs
import csv
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


logger = logging.getLogger(__name__)

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl"}
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what `errors="surrogateescape"` leaves for a byte it could not decode
_SURROGATE = re.compile("[\ud800-\udfff]")    # a lone surrogate: valid JSON escape ("\\ud83d"), invalid Unicode
_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")  # "3", and "3.0" as pandas writes an int column with an empty cell
_SHOWN_LINES = 5


class TableFileError(ValueError):
    """A file that cannot be read at all; the message names the file, the line where known, and the fix."""


@dataclass
class TableReport:
    """What reading one file kept and skipped: `skipped[reason]` rows, the first line numbers of each reason."""

    path: str
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    lines: dict = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        self.lines.setdefault(reason, [])
        if len(self.lines[reason]) < _SHOWN_LINES:
            self.lines[reason].append(line)

    def summary(self) -> str:
        parts = [f"{count} {reason.replace('_', ' ')} (line {', '.join(map(str, self.lines[reason]))}"
                 f"{', ...' if count > len(self.lines[reason]) else ''})" for reason, count in self.skipped.items()]
        return f"{self.path}: kept {self.rows} rows, skipped " + "; ".join(parts)


def table_kind(path) -> str | None:
    """'csv', 'tsv', 'json' or 'jsonl' by extension; None for anything else (parquet, arrow: `datasets` reads it)."""
    return TABLE_SUFFIXES.get(Path(path).suffix.lower())


def _sniff_encoding(raw: bytes, encoding: str) -> str:
    if raw.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE 00 00 starts with FF FE
        return "utf-32"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return encoding


def _decode(raw: bytes, encoding: str, path) -> str:
    try:
        return raw.decode(encoding, errors="surrogateescape")
    except LookupError:
        raise TableFileError(f"--file_encoding {encoding!r} is not an encoding Python knows (e.g. utf-8, cp1252, "
                             "latin-1, utf-16).") from None
    except UnicodeError as err:  # utf-16 cannot escape an odd byte count
        family = encoding.lower().replace("_", "-").rstrip("-lebe")
        hint = (f" A file without a byte-order mark needs its byte order named: --file_encoding {family}-le or "
                f"{family}-be." if family in ("utf-16", "utf-32") else "")
        raise TableFileError(f"{path} cannot be decoded as {encoding} ({err}); pass the file's encoding with "
                             f"--file_encoding.{hint}") from None


def _refuse_bomless_wide(raw: bytes, encoding: str, path) -> None:
    """A file saved as UTF-16 (or UTF-32) without a byte-order mark has one (three) NUL bytes beside every ASCII
    character; read as UTF-8 it would become text full of NULs. Name the encoding to pass instead."""
    if encoding.lower().replace("_", "-").startswith(("utf-16", "utf-32", "utf16", "utf32")):
        return
    head = raw[:4096 - 4096 % 4]
    if len(head) < 4 or head.count(0) < len(head) // 4:
        return
    if head.count(0) >= len(head) * 5 // 8:  # ASCII in UTF-32: 3 of every 4 bytes are NUL
        order = "le" if head[0::4].count(0) <= head[3::4].count(0) else "be"
        width, beside = "32", "three NUL bytes"
    else:
        order = "le" if head[1::2].count(0) >= head[0::2].count(0) else "be"
        width, beside = "16", "a NUL byte"
    raise TableFileError(f"{path} has {beside} beside every character: it is UTF-{width} saved without a "
                         f"byte-order mark. Pass --file_encoding utf-{width}-{order}.")


def physical_lines(text: str, keepends: bool = False) -> list[str]:
    """The file's lines, split at line feeds only (a CR before one is kept with the line, as csv reads it; a file
    with bare carriage returns only - classic Mac - splits at those)."""
    separator = "\n" if "\n" in text or "\r" not in text else "\r"
    lines = text.split(separator)
    if lines and lines[-1] == "":
        lines.pop()
    return [line + separator for line in lines] if keepends else [line.rstrip("\r") for line in lines]


def _csv_delimiter(text: str) -> str:
    """`,` unless the header line holds none and another separator a spreadsheet uses: `;` (Excel in locales with
    a decimal comma), a tab, or `|`."""
    header = next((line for line in physical_lines(text) if line.strip()), "")
    if "," in header:
        return ","
    counts = {d: header.count(d) for d in (";", "\t", "|")}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


# Python's csv refuses a cell above 128 KiB as an error; a long caption is still a caption (the tokenizer truncates
# it), so the limit is the largest a C long holds.
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


class _Lines:
    """The file's physical lines for `csv.reader`, with the position of the next one: after a record that went wrong
    the reader restarts on the line after the record's first."""

    def __init__(self, text: str):
        self.lines = physical_lines(text, keepends=True)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.position >= len(self.lines):
            raise StopIteration
        self.position += 1
        return self.lines[self.position - 1]


def _csv_rows(text: str, delimiter: str, report: TableReport):
    """(line number, row) of each well-formed data row. A record that breaks - ragged, a stray quote, or a quote
    opened and never closed, which would swallow every line after it - costs its first line only: the reader
    resynchronises on the next line, so the rows after it are read (and counted) as rows."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    source = _Lines(text)
    header = None
    while source.position < len(source.lines):
        start = source.position
        reader = csv.reader(source, delimiter=delimiter, strict=True)
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error:
            cells = None
        spanned = source.position - start
        broken = cells is None or (header is not None and cells and len(cells) != len(header)
                                   and any(c.strip() for c in cells))
        if broken:
            reason = "unterminated_quote" if spanned > 1 or cells is None and '"' in source.lines[start] else \
                "malformed_row"
            report.skip(reason, start + 1)
            source.position = start + 1  # resynchronise: the record's first line is the broken one
            continue
        if not cells or all(not c.strip() for c in cells):
            continue  # blank line
        if header is None:
            header = [c.strip() for c in cells]
            duplicated = sorted({c for c in header if header.count(c) > 1})
            if duplicated or not all(header):
                raise TableFileError(f"{report.path}, line {start + 1}: the header needs distinct, non-empty column "
                                     f"names (got {header}).")
            continue
        yield start + 1, dict(zip(header, cells))
    if header is None:
        raise TableFileError(f"{report.path} has no header row; the first line names the columns, e.g. "
                             "`image,caption`.")


def _json_rows(text: str, kind: str, report: TableReport):
    stripped = text.lstrip()
    if kind == "json" and stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise TableFileError(f"{report.path}, line {err.lineno}: not valid JSON ({err.msg}); a file of one "
                                 "object per line (.jsonl) lets a broken row be skipped instead.") from None
        except RecursionError:
            raise TableFileError(f"{report.path}: its JSON nests deeper than Python's parser goes; a file of one "
                                 "object per line (.jsonl) lets such a row be skipped instead.") from None
        for i, row in enumerate(rows):
            if isinstance(row, dict):
                yield i + 1, row
            else:
                report.skip("malformed_json", i + 1)
        return
    for number, line in enumerate(physical_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than the parser goes
            report.skip("malformed_json", number)
            continue
        if not isinstance(row, dict):
            report.skip("malformed_json", number)
            continue
        yield number, row


def _has(pattern: re.Pattern, value) -> bool:
    if isinstance(value, str):
        return bool(pattern.search(value))
    if isinstance(value, dict):
        return any(_has(pattern, v) for v in value.values())
    if isinstance(value, list):
        return any(_has(pattern, v) for v in value)
    return False


def _is_text(value) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def caption_is_text(value) -> bool:
    """A caption cell a reader can keep: text (a number is text), empty, or a list of such (several captions)."""
    return value is None or _is_text(value) or (isinstance(value, list) and all(_is_text(v) for v in value))


def _column_values(rows: list[dict], name: str, text_columns, caption_column=None) -> list:
    values = [row.get(name) for row in rows]
    values = [None if (isinstance(v, str) and not v.strip()) else v for v in values]
    if name == caption_column and any(isinstance(v, list) for v in values):  # several captions per image: lists
        return [None if v is None else [c if isinstance(c, str) else str(c)
                                        for c in (v if isinstance(v, list) else [v])] for v in values]
    filled = [v for v in values if v is not None]
    if name not in text_columns and filled and all(isinstance(v, str) and _INTEGER.fullmatch(v.strip())
                                                   for v in filled):
        return [int(float(v)) if v is not None else None for v in values]  # a label column written as text
    kinds = {type(v) for v in filled}
    if (name in text_columns and kinds - {str, dict, list}) or len(kinds) > 1:
        # numbers where text is expected (a caption "2024"), or mixed types in json: everything as text
        return [v if v is None else (v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list))
                                     else str(v)) for v in values]
    return values


def read_table(path, encoding: str = "utf-8", text_columns=(), caption_column=None) -> tuple[dict, TableReport]:
    """The rows of a csv / tsv / json(-lines) file as columns ({name: [values]}), and what was skipped.
    `caption_column`: a row whose caption is an object or a list of non-text is skipped (`caption_not_text`).

    Raises `TableFileError` (one message naming the file and the fix) for a file that is missing, empty, has only
    a header, or is a JSON array that does not parse; every other problem skips one row and is counted."""
    path = Path(path)
    report = TableReport(str(path))
    kind = table_kind(path)
    if kind is None:
        raise TableFileError(f"{path}: use a .csv, .tsv, .json/.jsonl or .parquet file")
    if not path.is_file():
        raise TableFileError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise TableFileError(f"{path} is empty.")
    encoding = _sniff_encoding(raw, encoding)
    _refuse_bomless_wide(raw, encoding, path)
    text = _decode(raw, encoding, path)
    if kind in ("csv", "tsv"):
        rows_iter = _csv_rows(text, "\t" if kind == "tsv" else _csv_delimiter(text), report)
    else:
        rows_iter = _json_rows(text, kind, report)
    rows = []
    for line, row in rows_iter:
        if _has(_UNDECODABLE, row):
            report.skip("undecodable_text", line)
            continue
        if _has(_SURROGATE, row):  # half of an emoji escaped on its own: no text can be made of it
            report.skip("invalid_unicode", line)
            continue
        if caption_column is not None and not caption_is_text(row.get(caption_column)):
            report.skip("caption_not_text", line)
            continue
        rows.append(row)
    report.rows = len(rows)
    if not rows:
        if report.skipped:
            hint = (f" Most likely the file is not {encoding}: pass its encoding with --file_encoding (e.g. cp1252 "
                    "for a spreadsheet exported on Windows)." if "undecodable_text" in report.skipped else "")
            raise TableFileError(f"no readable row in {report.summary()}.{hint}")
        raise TableFileError(f"{path} has a header but no rows.")
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {name: _column_values(rows, name, set(text_columns), caption_column) for name in names}
    if report.skipped:
        hint = (f" (rows that are not {encoding}: pass the file's encoding with --file_encoding, e.g. cp1252)"
                if "undecodable_text" in report.skipped else "")
        logger.warning("%s%s", report.summary(), hint)
    return columns, report


__all__ = ["TABLE_SUFFIXES", "TableFileError", "TableReport", "read_table", "table_kind"]
