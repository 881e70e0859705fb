"""Why a run stops on purpose, with one message that says what to do (training side): `TrainingStopped`, and a full
disk turned into one wherever the writers report it."""

import contextlib
import errno
import shutil
from pathlib import Path


class TrainingStopped(RuntimeError):
    """A run stopped on purpose (it could not train); the message says why and what to do."""


_NO_SPACE_MARKERS = ("no space left", "os error 28", "code: 28", "iostream error", "unexpected pos",
                     "file write failed", "pytorchstreamwriter", "disk quota")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or any exception chained to it, says the disk is full: errno ENOSPC / EDQUOT, or the words
    the writers use for it (safetensors' `os error 28` / `code: 28`, torch's zip writer `unexpected pos` /
    `basic_ios::clear: iostream error`, `No space left on device`)."""
    return _has_errno(err) or any(marker in str(link).lower() for link in _chain(err) for marker in _NO_SPACE_MARKERS)


def _chain(err: BaseException):
    """`err` and every exception chained under it (`raise ... from`, or raised while handling), each once."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _has_errno(err: BaseException) -> bool:
    return any(getattr(link, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for link in _chain(err))


@contextlib.contextmanager
def writing_to(folder, then: str = "free some space or point --output_dir at a larger disk, then resume with "
                                   "--resume_from_checkpoint latest."):
    """Turn a full disk while saving - wherever it surfaces: an OSError ENOSPC, safetensors' `SafetensorError ...
    (os error 28)`, torch's zip writer, or any of them chained under another error - into one message naming the
    folder, the space left and `then`, what to do (by default: the resume command); any other error passes
    unchanged."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - the writers' errors share no base class; others are re-raised
        if not is_disk_full(err):
            raise
        try:
            free = shutil.disk_usage(Path(folder).resolve()).free
        except OSError:
            free = None
        if free is not None and free > 256 * 2**20 and not _has_errno(err):
            raise  # the words matched but the disk has room: a write failed for another reason, keep the error
        left = f"{free / 2**20:.0f} MiB free" if free is not None else "free space unknown"
        raise TrainingStopped(f"no space left on device while writing to {folder} ({left}): {then}") from err


__all__ = ["TrainingStopped", "is_disk_full", "writing_to"]
