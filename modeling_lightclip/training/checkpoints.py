"""Checkpoints (training side): whether one is whole enough to resume from or load, which one `latest` means, and the
CLIP-PING bank saved beside the weights."""

import json
import logging
from pathlib import Path

import torch

from .packaged_weights import shape_mismatches
from .processes import unwrap_model


logger = logging.getLogger(__name__)

PING_BANK_FILE = "ping_bank.pt"
# What a resume needs besides the weights: the Trainer writes these, trainer_state.json last.
CHECKPOINT_STATE = ("optimizer.pt", "scheduler.pt")


def _checkpoint_needs_bank(path: Path) -> bool:
    from ..configuration_lightclip import LightCLIPConfig
    from ..objectives_lightclip import NeighbourContrastiveLoss

    try:
        return NeighbourContrastiveLoss.enabled(LightCLIPConfig.from_pretrained(path))
    except (OSError, ValueError):
        return False


def _safetensors_header(path: Path) -> tuple[dict | None, str | None]:
    """(its header, None) when `path` is a whole safetensors file: its header parses and its data reaches the file's
    end; else (None, what is wrong)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                return None, "truncated (header)"
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if 8 + length + max(ends, default=0) > size:
            return None, f"truncated ({size} of {8 + length + max(ends)} bytes)"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return None, f"unreadable ({type(err).__name__})"
    return header, None


def _weights_problem(path: Path, header: dict) -> str | None:
    """None when the checkpoint's weights (`header`: its model.safetensors header) have the shapes its own
    config.json builds (the model is built on the meta device: no memory, no initialisation)."""
    from ..configuration_lightclip import LightCLIPConfig
    from ..modeling_lightclip import LightCLIPModel

    try:
        with torch.device("meta"):
            model = LightCLIPModel(LightCLIPConfig.from_pretrained(path))
    except Exception as err:  # noqa: BLE001 - any config this version cannot build makes the checkpoint unusable
        return f"not loadable with its config.json ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    wrong = shape_mismatches(model, {name: entry.get("shape", []) for name, entry in header.items()
                                     if isinstance(entry, dict)})
    if wrong:
        return (f"of another model than its config.json describes: {len(wrong)} weight(s) of another shape, e.g. "
                + "; ".join(wrong[:2]))
    return None


def _torch_file_problem(path: Path) -> str | None:
    """None when `path` is a whole `torch.save` archive (a zip whose members all pass their CRC check)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return None if bad is None else f"corrupt member {bad}"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"truncated or unreadable ({type(err).__name__})"


def checkpoint_problem(path, require_bank: bool | None = None) -> str | None:
    """Why checkpoint folder `path` cannot be resumed from, or None when it is complete: config and weights whole
    (safetensors header and length), optimizer, scheduler and RNG state present and readable, the trainer state
    (written last) parsing, and the CLIP-PING bank when `require_bank` (None: when the checkpoint's config uses it)."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    for name in ("config.json", "model.safetensors", *CHECKPOINT_STATE, "trainer_state.json"):
        if not (path / name).is_file():
            return f"{name} is missing"
    rng = sorted(path.glob("rng_state*.pth"))
    if not rng:
        return "rng_state.pth is missing"
    parsed = {}
    for name in ("trainer_state.json", "config.json"):
        try:
            parsed[name] = json.loads((path / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name} is truncated or unreadable ({type(err).__name__})"
        if not isinstance(parsed[name], dict):
            return f"{name} is not a JSON object (a {type(parsed[name]).__name__})"
    step = parsed["trainer_state.json"].get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"trainer_state.json's global_step is {step!r}, not a step number"
    header, problem = _safetensors_header(path / "model.safetensors")
    problem = problem or _weights_problem(path, header)
    if problem:
        return f"model.safetensors is {problem}"
    for file in [path / name for name in CHECKPOINT_STATE] + rng:
        problem = _torch_file_problem(file)
        if problem:
            return f"{file.name} is {problem}"
    if require_bank is None:
        require_bank = _checkpoint_needs_bank(path)
    if require_bank:
        if not (path / PING_BANK_FILE).is_file():
            return f"{PING_BANK_FILE} (the CLIP-PING bank) is missing"
        problem = _torch_file_problem(path / PING_BANK_FILE)
        if problem:
            return f"{PING_BANK_FILE} is {problem}"
    return None


def latest_complete_checkpoint(output_dir, require_bank: bool | None = None,
                               skipped: list | None = None) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that `checkpoint_problem` finds complete. A run killed (or out of
    disk) while saving leaves files missing or truncated: such a folder is skipped, with a warning saying why (and,
    when `skipped` is given, appended to it as (folder, problem))."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-")[-1]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path, require_bank)
        if problem is None:
            return str(path)
        logger.warning("skipping %s: %s", path, problem)
        if skipped is not None:
            skipped.append((path, problem))
    return None


def last_finite_checkpoint(output_dir) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir` whose weights are all finite, or None."""
    from safetensors import safe_open

    output_dir = Path(output_dir)
    found = sorted(((int(p.name.split("-")[-1]), p) for p in output_dir.glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-")[-1].isdigit()), reverse=True) if output_dir.is_dir() else []
    for _, path in found:
        if checkpoint_problem(path) is not None:
            continue
        with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
            if all(bool(torch.isfinite(weights.get_tensor(key)).all()) for key in weights.keys()):
                return str(path)
    return None


def resolve_checkpoint(training_args) -> str | None:
    """`--resume_from_checkpoint PATH` (verified), or `latest` for the newest complete checkpoint in --output_dir."""
    value = training_args.resume_from_checkpoint
    if value in (None, "", "false", "False"):
        return None
    if value in ("latest", "true", "True"):
        skipped = []
        found = latest_complete_checkpoint(training_args.output_dir, skipped=skipped)
        if found is None:
            why = "; ".join(f"{path.name}: {problem}" for path, problem in skipped[:3])  # the newest three
            hint = (" (--save_only_model writes no optimizer or scheduler state: such a checkpoint cannot be "
                    "resumed, only loaded with --model_name_or_path)" if "optimizer.pt is missing" in why else "")
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint in "
                                    f"{training_args.output_dir}" + (f" ({why}){hint}" if why else ""))
        return found
    problem = checkpoint_problem(value)
    if problem:
        raise ValueError(f"--resume_from_checkpoint {value}: cannot resume, {problem}. Pass another checkpoint, or "
                         "`latest` for the newest complete one.")
    return value


def load_ping_bank(model, checkpoint) -> bool:
    """Restore the CLIP-PING bank saved with a checkpoint; False when there is none to restore."""
    ping = getattr(getattr(unwrap_model(model), "objectives", None), "ping", None)
    path = Path(checkpoint) / PING_BANK_FILE
    if getattr(ping, "bank", None) is None or not path.is_file():
        return False
    ping.bank.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return True


__all__ = ["CHECKPOINT_STATE", "PING_BANK_FILE", "checkpoint_problem", "last_finite_checkpoint",
           "latest_complete_checkpoint", "load_ping_bank", "resolve_checkpoint"]
