"""Benchmark results as JSON files that say where they come from: the command that produced them and the
provenance block (`stamp()`: versions, commit, date, hardware) that model cards and reinforced copies also carry."""

import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_lightclip.training.provenance import stamp  # noqa: E402


def write_results(path, results: dict, argv: list | None = None) -> Path:
    """Write a benchmark's `results` as JSON to `path`, with the command that produced them and `stamp()`."""
    import json
    import shlex

    argv = sys.argv if argv is None else argv
    command = "python " + " ".join(shlex.quote(a) for a in argv)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "command": command, "provenance": stamp()}, indent=2))
    return path
