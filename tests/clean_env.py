"""A fresh virtualenv that holds exactly some distributions and what they require, linked from this environment.

A Hub user's client has torch, transformers and pillow and nothing of ours. Installing them again with pip would
download and unpack a second CUDA torch (several GB, which a CI machine's disk may not have). Linking the files of
the distributions already installed here gives the same environment, file for file, at no cost in disk: the new
virtualenv's site-packages holds a symlink for every file its distributions' RECORDs list and nothing else, so
its interpreter's metadata lists those distributions alone and every other import fails as on the user's machine.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _installed() -> dict[str, metadata.Distribution]:
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist)  # first on sys.path wins, as for imports
    return found


def closure(names) -> list[metadata.Distribution]:
    """The installed distributions `names` and, recursively, the ones they require (with the requirements of any
    extras asked for, e.g. `cuda-toolkit[cublas]`; markers evaluated for this interpreter). A requirement that is not
    installed here is left out, as pip here would have had it."""
    installed = _installed()
    missing = [n for n in names if canonicalize_name(n) not in installed]
    if missing:
        raise LookupError(f"not installed in this environment: {missing}")
    todo = [(canonicalize_name(n), "") for n in names]
    done = set()
    while todo:
        name, extra = todo.pop()  # a requirement `pkg[extra]` brings pkg's requirements marked for that extra
        if (name, extra) in done or name not in installed:
            continue
        done.add((name, extra))
        for line in installed[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ("", *req.extras)]
    return [installed[name] for name in {name for name, _ in done}]


def link_distributions(site_packages: Path, names) -> None:
    """Symlink every file of `names`' closure into `site_packages`."""
    for dist in closure(names):
        if dist.files is None:  # no RECORD (an egg or a hand-made install): nothing says which files are its own
            raise LookupError(f"{dist.metadata['Name']} lists no files; reinstall it with pip")
        root = Path(dist.locate_file(""))
        for file in dist.files:
            parts = Path(file).parts
            if not parts or parts[0] == ".." or "__pycache__" in parts:  # scripts outside site-packages; caches
                continue
            source = root / file
            if not source.exists():
                continue
            target = site_packages / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                os.symlink(source, target)


def make_client_env(venv: Path, names) -> str:
    """A new virtualenv at `venv` holding `names` and what they require; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    add_to_client_env(python, names)
    return python


def add_to_client_env(python: str, names) -> None:
    """Link `names` and what they require into the virtualenv of `python`."""
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    link_distributions(Path(site), names)


def distributions_in(python: str) -> set[str]:
    """What the environment of `python` holds, read by that interpreter itself."""
    out = subprocess.run(
        [python, "-c", "import importlib.metadata as m, json; "
                       "print(json.dumps(sorted({d.metadata['Name'] for d in m.distributions()})))"],
        capture_output=True, text=True, check=True, cwd=Path(python).parent).stdout  # not a checkout's egg-info
    return {canonicalize_name(n) for n in json.loads(out)}
