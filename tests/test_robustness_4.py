"""Robustness, round 4: pretrained-checkpoint paths (tower starts, a whole model, a teacher) that cannot load get one
message naming the flag, the path, what is wrong and what to do, before any work."""

import json

import pytest

import train_lightclip


def _folder_with(tmp_path, name, files: dict):
    folder = tmp_path / name
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.fixture()
def damaged_folders(tmp_path, tiny_model):
    """Folders a user could point a flag at: missing, without weights, truncated / corrupted safetensors,
    a config that is not JSON."""
    good = tmp_path / "good"
    tiny_model.save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    config = (good / "config.json").read_text()
    return {
        "missing": (str(tmp_path / "no" / "such" / "folder"), "no such folder"),
        "relative missing": ("./not-here", "no such folder"),
        "no config": (str(_folder_with(tmp_path, "no_config", {"model.safetensors": weights})), "no config.json"),
        "no weights": (str(_folder_with(tmp_path, "no_weights", {"config.json": config})), "no weights"),
        "truncated": (str(_folder_with(tmp_path, "truncated", {"config.json": config,
                                                               "model.safetensors": weights[: len(weights) // 3]})),
                      "model.safetensors cannot be read .*truncated or corrupted"),
        "bad header": (str(_folder_with(tmp_path, "bad_header", {"config.json": config,
                                                                 "model.safetensors": b"\xff" * 64})),
                       "model.safetensors cannot be read .*truncated or corrupted"),
        "config not json": (str(_folder_with(tmp_path, "config_not_json", {"config.json": "{not json",
                                                                           "model.safetensors": weights})),
                            "config.json cannot be read"),
        "hub id not cached": ("some-org/not-downloaded", "not in the local Hugging Face cache.*hf download"),
    }


@pytest.mark.parametrize("flag", ["--vision_model_name_or_path", "--text_model_name_or_path", "--model_name_or_path"])
def test_a_checkpoint_that_cannot_load_is_named_with_its_flag(flag, damaged_folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for case, (path, message) in damaged_folders.items():
        with pytest.raises(ValueError, match=f"^{flag} {path}: .*{message}"):
            train_lightclip.main(["--recipe", "tiny", "--max_steps", "1", "--max_train_samples", "16",
                                  "--output_dir", str(tmp_path / "run"), flag, path])
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_teacher_that_cannot_load_is_named_before_any_work(damaged_folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from modeling_lightclip.training.reinforce import load_teacher

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for case, (path, message) in damaged_folders.items():
        with pytest.raises(ValueError, match=f"^--teacher {path}: .*{message}"):
            load_teacher(path)


def test_a_good_folder_and_a_cached_hub_id_pass_the_check(tmp_path, tiny_model, monkeypatch):
    """The control: the checks refuse only what cannot load (a complete folder, sharded weights, a Hub id in the
    cache while offline)."""
    from huggingface_hub import constants

    from modeling_lightclip.training.packaged_weights import check_pretrained_source

    tiny_model.save_pretrained(tmp_path / "whole")
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    for folder in ("whole", "sharded"):
        assert check_pretrained_source(str(tmp_path / folder), "--flag")["model_type"] == "lightclip"
    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (cache / "models--some-org--cached" / "refs").mkdir()
    (cache / "models--some-org--cached" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert check_pretrained_source("some-org/cached", "--flag") is None
