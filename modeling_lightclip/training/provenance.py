"""Where a figure comes from: library versions, commit, date and hardware (training side; not remote code).

Every results file a benchmark writes and every model card carries this stamp, so a figure can be traced to the
code and the machine that produced it.
"""

import datetime
import os
import platform
import subprocess
from pathlib import Path


_REPO = Path(__file__).resolve().parents[2]
_LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "timm", "onnxruntime")


def library_versions() -> dict:
    """Installed versions of the libraries a LightCLIP figure depends on (None for one not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path = _REPO) -> str | None:
    """The checked-out commit of this repository, with `+dirty` when tracked files differ from it; None outside a
    git checkout (an installed package)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def hardware() -> dict:
    """The device figures were measured on: the GPU's name (and count) when CUDA is used, else the CPU."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": platform.processor() or platform.machine(), "cpu_cores": cores,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def stamp() -> dict:
    """The provenance block written into every results file: versions, commit, UTC date, hardware."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "versions": library_versions(), "hardware": hardware(),
            "python": platform.python_version()}


__all__ = ["git_commit", "hardware", "library_versions", "stamp"]
