"""What a new user meets first: the documented commands do what they say, the card describes what was trained, and
the rough edges of a first run (a full disk at the final save, a stream with the default recipe, a 1 MB caption,
library noise in the log, a private Trainer API) are gone. Inputs are generated here; expectations come from how
they were built, from the README's own text, or from the libraries' own signatures."""

import errno
import inspect
import json
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest

from conftest import CAPTIONS, FIXTURES, REPO
from modeling_lightclip.objectives_lightclip import InstanceContrastiveLoss, reads_teacher_knowledge


def _tiny_data(out: Path, *flags) -> list[str]:
    """A few steps on a slice of the embedded data, whatever the recipe."""
    return ["--max_train_samples", "64", "--max_eval_samples", "32", "--max_steps", "2",
            "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0", "--output_dir", str(out), *flags]


def _readme_command(marker: str) -> list[str]:
    """The flags of the README's `python train_lightclip.py ...` line that ends with the comment `marker`."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("python train_lightclip.py") and line.rstrip().endswith(marker):
            return shlex.split(line.split("#")[0])[2:]
    raise AssertionError(f"README has no `python train_lightclip.py ... {marker}` line")


# ------------------------------------------------------------------------------------------ documented commands


def test_the_documented_plain_clip_command_trains_plain_clip(tmp_path):
    from huggingface_hub import ModelCard

    import train_lightclip
    from modeling_lightclip import LightCLIPConfig
    from modeling_lightclip.objectives_lightclip import loss_weight_fields

    flags = _readme_command("# plain CLIP")
    out = tmp_path / "clip"
    train_lightclip.main([*flags, *_tiny_data(out)])
    config = LightCLIPConfig.from_pretrained(out)
    assert not InstanceContrastiveLoss.softens(config) and not reads_teacher_knowledge(config)
    assert {name: getattr(config, name) for name in loss_weight_fields().values()} == \
        dict.fromkeys(loss_weight_fields().values(), 0.0)
    assert not (out / "_reinforced").exists()               # no teacher features were built or read
    card = ModelCard.load(out / "README.md").text
    assert "**plain CLIP**" in card and "No teacher" in card
    # the script's own docstring names the same switches
    assert " ".join(flags) in train_lightclip.__doc__


def test_the_documented_streaming_command_streams(tmp_path):
    """README's streaming line, with a local parquet folder in place of the Hub id."""
    import train_lightclip
    from modeling_lightclip.training.data import EMBEDDED_DATA

    flags = _readme_command("# a Hub dataset, streamed")
    data = tmp_path / "data"
    shutil.copytree(EMBEDDED_DATA, data)
    flags[flags.index("--dataset_name") + 1] = "parquet"
    flags[flags.index("--max_steps") + 1] = "2"
    out = tmp_path / "run"
    train_lightclip.main([*flags, "--data_dir", str(data), "--image_size", "32", "--max_eval_samples", "32",
                          "--per_device_train_batch_size", "8", "--output_dir", str(out)])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert "eval_image_to_text_r1" in json.loads((out / "eval_results.json").read_text())


def test_streaming_with_the_default_recipe_names_what_needs_the_rows(tmp_path, capsys):
    import train_lightclip

    code = train_lightclip.cli(["--streaming", *_tiny_data(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "soft labels from the teachers" in err and "frozen-relation distillation" in err
    assert "CLIP-PING" not in err                         # the default recipe uses none
    assert "lightclip-reinforce --out R" in err and "--train_file R --streaming" in err
    assert "--soft_label_mode none" in err and "--relation_loss_weight 0" in err


# ------------------------------------------------------------------------------------------ the model card


def test_the_card_names_the_data_the_model_was_trained_on(tmp_path):
    from huggingface_hub import ModelCard

    import train_lightclip
    from modeling_lightclip.training.data import EMBEDDED_DATA

    data = tmp_path / "my_shop_photos"
    shutil.copytree(EMBEDDED_DATA, data)
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--dataset_name", "parquet", "--data_dir", str(data),
                          "--license", "cc-by-4.0", *_tiny_data(out)])
    card = ModelCard.load(out / "README.md")
    assert "parquet files in `my_shop_photos`" in card.text
    assert "Fashion-MNIST" not in card.text              # the embedded set is not what the flags pointed at
    assert not getattr(card.data, "datasets", None)       # a local folder has no Hub dataset id
    assert card.data.license == "cc-by-4.0"


def test_a_recommended_objective_card_names_and_credits_its_teachers(tmp_path):
    from importlib.metadata import version

    from huggingface_hub import ModelCard

    import train_lightclip

    out = tmp_path / "run"
    train_lightclip.main(_tiny_data(out))                  # the default recipe: the recommended objective
    text = ModelCard.load(out / "README.md").text
    assert "**recommended objective**" in text
    assert "| frozen-relation distillation | 2.0 |" in text
    assert "image teacher: **EfficientNet-Lite0**" in text and "text teacher: **all-MiniLM-L6-v2**" in text
    assert "arXiv:2312.00674" in text and "arXiv:2412.03871" in text
    (copy,) = (out / "_reinforced").glob("*/reinforced.json")      # the teachers' features, stored with the rows
    meta = json.loads(copy.read_text())
    info = json.loads((out / "training_info.json").read_text())
    assert info["teachers"] == meta["teachers"] and meta["teachers"][0]["image_encoder"] == "efficientnet-lite0"
    assert info["provenance"]["versions"]["torch"] == version("torch")


# ------------------------------------------------------------------------------------------ rough edges


def test_a_full_disk_at_the_final_save_is_one_message(tmp_path, monkeypatch, capsys):
    import safetensors
    import transformers.modeling_utils

    import train_lightclip

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)   # what save_pretrained writes with
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30, 0))
    out = tmp_path / "run"
    code = train_lightclip.cli(["--recipe", "tiny", *_tiny_data(out, "--do_eval", "false")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "SafetensorError" not in err
    assert f"no space left on device while writing to {out} (0 MiB free)" in err
    assert "--resume_from_checkpoint latest" in err


def test_disk_full_is_recognised_through_chained_errors(tmp_path, monkeypatch):
    from modeling_lightclip.training.stops import TrainingStopped, is_disk_full, writing_to

    try:
        try:
            raise OSError(errno.ENOSPC, "write failed")
        except OSError as inner:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed") from inner
    except RuntimeError as err:
        chained = err
    assert is_disk_full(chained)
    assert not is_disk_full(ValueError("a shape mismatch"))
    with pytest.raises(TrainingStopped, match="no space left"):   # by errno, however much space is left now
        with writing_to(tmp_path):
            raise chained
    with pytest.raises(KeyError):                                  # anything else passes unchanged
        with writing_to(tmp_path):
            raise KeyError("not a disk problem")


def test_a_one_megabyte_caption_is_kept_and_truncated(tmp_path, tokenizer):
    from modeling_lightclip.training.data import DataArguments, ImageTextCollator, load_image_text_datasets
    from modeling_lightclip.training.preprocessing import build_processor

    shutil.copy(FIXTURES / "astronaut.jpg", tmp_path / "a.jpg")
    long_caption = ", ".join(["a very long caption about an astronaut"] * 26_000)   # about 1 MB, with commas
    assert len(long_caption) > 1_000_000
    (tmp_path / "train.csv").write_text(f'image,caption\na.jpg,"{long_caption}"\na.jpg,{CAPTIONS[0]}\n')
    splits = load_image_text_datasets(DataArguments(train_file=str(tmp_path / "train.csv")))
    assert len(splits["train"]) == 2 and not splits.file_skips.get("train")
    assert splits["train"][0]["caption"] == long_caption
    collator = ImageTextCollator(build_processor(32, tokenizer), train=True, max_length=16)
    batch = collator([splits["train"][0], splits["train"][1]])
    assert batch["input_ids"].shape == (2, 16) and not collator.skipped


def test_no_pin_memory_warning_without_an_accelerator(tmp_path):
    import train_lightclip
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments

    assert LightCLIPTrainingArguments(output_dir=str(tmp_path)).dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_lightclip.main(["--recipe", "tiny", *_tiny_data(tmp_path / "run")])
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_only_our_own_progress_is_logged_at_info():
    """faiss's loader logs each SIMD build it tries at INFO (three ModuleNotFoundErrors on most machines): after
    the trainer's logging set-up, library INFO lines stay quiet and ours show."""
    pytest.importorskip("faiss")
    script = ("import logging, train_lightclip\ntrain_lightclip.configure_logging()\nimport faiss\n"
              "logging.getLogger('modeling_lightclip.training.data').info('our progress')\n"
              "logging.getLogger('datasets.builder').info('library chatter')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "our progress" in proc.stderr
    assert "faiss" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr
    assert "library chatter" not in proc.stderr


# ------------------------------------------------------------------------------------------ the Trainer API we use


def test_the_trainer_is_extended_only_through_public_methods_whose_signatures_still_match():
    """Every Trainer method LightCLIPTrainer overrides is public, and accepts every parameter the installed
    Trainer's version declares: a transformers release that renames or adds one fails here, not mid-training."""
    from transformers import Trainer

    from modeling_lightclip.training.trainer import LightCLIPTrainer

    overridden = [name for name, value in vars(LightCLIPTrainer).items()
                  if callable(value) and hasattr(Trainer, name) and name != "__init__"]
    assert overridden, "nothing overridden?"
    private = [name for name in overridden if name.startswith("_")]
    assert not private, f"overrides of private Trainer methods: {private}"
    for name in overridden:
        base = inspect.signature(getattr(Trainer, name)).parameters
        ours = inspect.signature(getattr(LightCLIPTrainer, name)).parameters
        takes_any = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ours.values())
        missing = [p for p in base if p not in ours and base[p].kind not in (base[p].VAR_POSITIONAL,
                                                                             base[p].VAR_KEYWORD)]
        assert takes_any or not missing, f"Trainer.{name} now takes {missing}, which LightCLIPTrainer.{name} lacks"


def test_the_installed_transformers_is_inside_the_range_setup_py_pins():
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    spec = re.search(r'"transformers([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert "<" in spec, f"transformers{spec}: pin an upper bound (the Trainer overrides are tested on this range)"
    assert version("transformers") in SpecifierSet(spec)
