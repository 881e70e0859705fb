"""Robustness, round 4: pretrained-checkpoint paths (tower starts, a whole model, a teacher) that cannot load get one
message naming the flag, the path, what is wrong and what to do, before any work; bad samples under several processes
are skipped and counted once."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
    a config that is not JSON, weights of other sizes than the config builds."""
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
        "other sizes": (str(_folder_with(tmp_path, "other_sizes", {
            "config.json": json.dumps({**json.loads(config), "projection_dim": 2 * tiny_model.config.projection_dim}),
            "model.safetensors": weights})), "weights are of another model than its config.json describes"),
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


def test_a_checkpoint_whose_state_or_weights_do_not_fit_is_skipped_by_latest_and_refused_by_path(tmp_path,
                                                                                                 tiny_recipe,
                                                                                                 tokenizer):
    """`trainer_state.json` that is a list or has a string step, and weights of another shape than the checkpoint's
    config builds: `latest` skips the checkpoint naming why (and resumes from an older one), an explicit path is
    refused in one line."""
    import shutil

    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config
    from modeling_lightclip.training.checkpoints import checkpoint_problem, resolve_checkpoint

    run = tmp_path / "run"
    common = ["--recipe", "tiny", "--max_train_samples", "32", "--per_device_train_batch_size", "8", "--do_eval",
              "false", "--output_dir", str(run), "--save_strategy", "steps", "--save_steps", "1",
              "--dataloader_num_workers", "0", "--report_to", "none"]
    train_lightclip.main([*common, "--max_steps", "2"])
    good, newest = run / "checkpoint-1", run / "checkpoint-2"
    assert checkpoint_problem(newest) is None
    other = LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer, projection_dim=24))
    damages = {
        "a list": lambda: (newest / "trainer_state.json").write_text("[1, 2]"),
        "a string step": lambda: (newest / "trainer_state.json").write_text(
            json.dumps({**json.loads((good / "trainer_state.json").read_text()), "global_step": "2"})),
        "other shapes": lambda: other.save_pretrained(newest),
    }
    expected = {"a list": "trainer_state.json is not a JSON object", "a string step": "global_step is '2'",
                "other shapes": "weight\\(s\\) of another shape"}
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)
    for case, damage in damages.items():
        shutil.rmtree(newest)
        shutil.copytree(pristine, newest)
        if case == "other shapes":
            (newest / "config.json").write_text((pristine / "config.json").read_text())  # the run's own config
            damage()
            (newest / "config.json").write_text((pristine / "config.json").read_text())
        else:
            damage()
        with pytest.raises(ValueError, match=f"--resume_from_checkpoint {newest}: cannot resume, .*{expected[case]}"):
            resolve_checkpoint(SimpleNamespace(resume_from_checkpoint=str(newest), output_dir=str(run)))
        assert resolve_checkpoint(SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(run))) == str(good)
    with pytest.raises(ValueError, match="cannot resume"):  # the run itself refuses it before any work
        train_lightclip.main([*common, "--max_steps", "3", "--resume_from_checkpoint", str(newest)])
    trainer = train_lightclip.main([*common, "--max_steps", "2", "--resume_from_checkpoint", "latest",
                                    "--save_strategy", "no"])
    assert trainer.state.global_step == 2  # resumed from checkpoint-1, skipping the damaged checkpoint-2


@pytest.mark.parametrize("flags, message", [
    (["--shard_size", "0"], "--shard_size 0: must be at least 1"),
    (["--shard_size", "-5"], "--shard_size -5: must be at least 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--out_is_a_file"], "a file is there"),
])
def test_reinforce_flags_that_cannot_work_are_refused_before_any_work(tmp_path, capsys, flags, message):
    from modeling_lightclip.training.reinforce import main

    out = tmp_path / "R"
    if flags == ["--out_is_a_file"]:
        out.write_text("not a folder")
        flags = []
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_file", str(tmp_path / "never_read.csv"), "--out", str(out), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_json_nested_deeper_than_the_parser_goes_is_a_malformed_row(tmp_path):
    from PIL import Image

    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "caption": "a red square"})
    for depth in (5_000, 200_000):
        deep = '{"image": "a.png", "caption": ' + "[" * depth + "]" * depth + "}"
        (tmp_path / "rows.jsonl").write_text("\n".join([good, good, deep, good]) + "\n")
        train = load_image_text_datasets(DataArguments(train_file=str(tmp_path / "rows.jsonl")))["train"]
        assert len(train) == 3 and train[0]["caption"] == "a red square"
    (tmp_path / "rows.json").write_text("[" + good + ", " + deep + "]")
    with pytest.raises(ValueError, match="nests deeper than Python's parser goes"):
        load_image_text_datasets(DataArguments(train_file=str(tmp_path / "rows.json")))


def test_a_clip_start_or_teacher_without_tokenizer_files_is_refused(tmp_path, tokenizer):
    """transformers loads a CLIP folder without its tokenizer files as a tokenizer of two special tokens, which
    would give every caption the same features: the start and the teacher are refused naming the folder."""
    from test_reinforce import _clip_teacher

    from modeling_lightclip.training.reinforce import load_teacher

    folder = _clip_teacher(tmp_path / "clip", tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=f"--model_name_or_path {folder}: the folder has no tokenizer files"):
        train_lightclip.main(["--model_name_or_path", str(folder), "--max_steps", "1", "--max_train_samples", "8",
                              "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=f"--teacher {folder}: its tokenizer knows only 2 token"):
        load_teacher(str(folder))


# ------------------------------------------------------------------------------------- bad samples, two processes

REPO = Path(__file__).resolve().parents[1]


def _images_with_bad_ones(folder: Path, n: int, bad: set) -> list[str]:
    import numpy as np
    from PIL import Image

    from conftest import FIXTURES

    photo = np.asarray(Image.open(FIXTURES / "astronaut.jpg").convert("RGB").resize((40, 40)))
    names = []
    for i in range(n):
        name = f"img{i}.png"
        if i in bad:
            (folder / name).write_bytes(b"not an image at all")
        else:
            Image.fromarray(np.roll(photo, 3 * i, axis=1)).save(folder / name)
        names.append(name)
    return names


def _torchrun_train(out: Path, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train_lightclip.py"), "--recipe", "tiny", "--per_device_eval_batch_size", "8", "--logging_steps",
         "1", "--dataloader_num_workers", "0", "--output_dir", str(out), "--label_column", "none", *flags],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_two_processes_skip_bad_images_and_count_each_once(tmp_path):
    """One sample per process per step over exactly one epoch: each bad image empties its process's batch in some
    step (the other process's sample that step is dropped with it and counted as such), every row is seen once, and
    evaluation embeds every good row once."""
    bad = {1, 5, 9}
    names = _images_with_bad_ones(tmp_path, 24, bad)
    data = tmp_path / "train.csv"
    data.write_text("image,caption\n" + "".join(f"{n},a photo number {i}\n" for i, n in enumerate(names)))
    out = tmp_path / "run"
    proc = _torchrun_train(out, "--train_file", str(data), "--validation_file", str(data),
                           "--per_device_train_batch_size", "1", "--max_steps", "12")
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = json.loads((out / "train_results.json").read_text())
    assert train["epoch"] == 1.0
    assert train["train_skipped_undecodable_image"] == len(bad)
    assert train["train_skipped_empty_batch"] == len(bad)  # a batch of one bad sample is empty
    # a step with one bad sample drops the other process's good one; a step with two drops nothing more
    assert train.get("train_skipped_other_process_batch_empty", 0) in (len(bad), len(bad) - 2)
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_num_samples"] == 24 - len(bad)
    assert evaluation["eval_skipped_undecodable_image"] == len(bad)


def test_two_processes_stream_rows_with_junk_and_count_file_errors_once(tmp_path):
    """A streamed JSON-lines file with malformed lines, a row without an image and undecodable images: both
    processes train with batches of different sizes, and the file's malformed lines are counted once in all."""
    names = _images_with_bad_ones(tmp_path, 24, {1, 5, 9})
    lines = [json.dumps({"image": n, "caption": f"a photo number {i}"}) for i, n in enumerate(names)]
    lines[4] = '{"image": "img2.png", "caption": "cut off'
    lines[11] = "[1, 2, 3]"
    lines[15] = json.dumps({"image": None, "caption": "no image"})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    csv = tmp_path / "val.csv"
    csv.write_text("image,caption\n" + "".join(f"{n},a photo number {i}\n" for i, n in enumerate(names)))
    out = tmp_path / "run"
    proc = _torchrun_train(out, "--train_file", str(data), "--validation_file", str(csv), "--streaming",
                           "--per_device_train_batch_size", "4", "--max_steps", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_skipped_malformed_json"] == 2
    seen_bad = train.get("train_skipped_undecodable_image", 0) + train.get("train_skipped_missing_image", 0)
    assert 0 < seen_bad <= 4  # 3 steps x 2 processes x 4 rows = 24 rows read: the 22 lines that parse, once each


# ------------------------------------------------------------------------------------- reinforce reruns


class _CountingTeacher:
    """A stand-in teacher: features derived from the input (so a mixed copy would show), calls counted."""

    kind = "multimodal"

    def __init__(self, name="teacher-a"):
        self.name, self.image_dim, self.text_dim, self.calls = name, 4, 3, 0

    def describe(self):
        return {"name": self.name, "kind": self.kind, "image_dim": self.image_dim, "text_dim": self.text_dim}

    def image_features(self, images):
        import torch

        self.calls += 1
        rows = [[float(image.size[0]), 1.0, 2.0, 3.0] for image in images]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    def text_features(self, texts):
        import torch

        return torch.nn.functional.normalize(torch.tensor([[float(len(t)), 1.0, 1.0] for t in texts]), dim=-1)


def _source(folder: Path, n: int, word: str = "cat"):
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    names = _images_with_bad_ones(folder, n, set())
    return Dataset.from_dict({"image": [str(folder / name) for name in names],
                              "caption": [f"{word} number {i}" for i in range(n)]})


def _reinforce(dataset, out: Path, teacher=None, shard_size=4, stream=False):
    from modeling_lightclip.training.reinforce import reinforce_split

    source = dataset.to_iterable_dataset() if stream else dataset
    return reinforce_split(source, out, [teacher or _CountingTeacher()], shard_size=shard_size, progress=False)


def _rows_of(out: Path):
    import pyarrow.parquet as pq

    return sorted(row for path in sorted(out.glob("part-*.parquet"))
                  for row in pq.read_table(path, columns=["source_row"]).column("source_row").to_pylist())


@pytest.mark.parametrize("stream", [False, True])
def test_a_rerun_redoes_a_cut_short_shard_and_keeps_the_whole_ones(tmp_path, stream):
    data = _source(tmp_path / "images", 10)
    out = tmp_path / "R" / "train"
    _reinforce(data, out, stream=stream)
    whole = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name != "part-00001.parquet"}
    cut = out / "part-00001.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a kill or a full disk half-way through
    teacher = _CountingTeacher()
    _reinforce(data, out, teacher, stream=stream)
    assert teacher.calls == 1  # one shard of 4 rows written again, in one teacher call
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name != cut.name} == whole
    assert _rows_of(out) == list(range(10))  # every row once


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("change, message", [
    ("data", "holds other source rows"), ("shard_size", "shard_size 4 there, 5 now"),
    ("teacher", "teachers ['teacher-a'] there, ['teacher-b'] now"), ("fewer_rows", "is past the 2 shard")])
def test_a_rerun_into_a_copy_of_other_data_or_settings_is_refused(tmp_path, stream, change, message):
    data = _source(tmp_path / "images", 10)
    out = tmp_path / "R" / "train"
    _reinforce(data, out, stream=stream)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = {"data": _source(tmp_path / "other", 10, word="dog"), "fewer_rows": data.select(range(8))}.get(change, data)
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        _reinforce(again, out, _CountingTeacher("teacher-b" if change == "teacher" else "teacher-a"),
                   shard_size=5 if change == "shard_size" else 4, stream=stream)
    assert "choose another --out, or delete" in str(refused.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing mixed in


def test_a_full_disk_while_reinforcing_names_the_folder_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno

    from datasets import Dataset

    from modeling_lightclip.training.stops import TrainingStopped

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Dataset, "to_parquet", full)
    out = tmp_path / "R" / "train"
    with pytest.raises(TrainingStopped, match="no space left on device while writing to .*rerun the same command"):
        _reinforce(_source(tmp_path / "images", 6), out)
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.parquet"))


@pytest.mark.parametrize("damage, message", [
    ("cut_shard", "part-00001.parquet: not a whole parquet file"),
    ("dims", "column 'teacher0_image' holds features of 4 dimensions and reinforced.json says 8"),
    ("column", "has no column 'teacher7_text'"),
    ("not_json", "not readable as the copy's metadata"),
    ("a_list", "holds a JSON list, not the copy's metadata")])
def test_a_reinforced_copy_whose_shards_and_metadata_disagree_is_refused_naming_the_file(tmp_path, damage, message):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets
    from modeling_lightclip.training.reinforce import reinforce

    out = tmp_path / "R"
    reinforce({"train": _source(tmp_path / "images", 8)}, out, [], shard_size=4, teachers=[_CountingTeacher()])
    assert load_image_text_datasets(DataArguments(train_file=str(out)))["train"].num_rows == 8  # whole: it loads
    meta_file = out / "reinforced.json"
    meta = json.loads(meta_file.read_text())
    if damage == "cut_shard":
        shard = out / "train" / "part-00001.parquet"
        shard.write_bytes(shard.read_bytes()[:-40])
    elif damage == "dims":
        meta["teachers"][0]["image_dim"] = 8
    elif damage == "column":
        meta["teachers"][0]["columns"]["text"] = "teacher7_text"
    elif damage == "not_json":
        meta_file.write_text('{"format": "lightclip-reinforced/1", "teach')
    elif damage == "a_list":
        meta_file.write_text("[]")
    if damage in ("dims", "column"):
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_image_text_datasets(DataArguments(train_file=str(out)))


# ------------------------------------------------------------------------------------- captions and labels kept


def test_several_captions_per_image_are_all_kept_with_each_ones_features_and_the_drawn_ones_are_trained(
        tmp_path, tokenizer):
    import numpy as np
    import torch
    from datasets import Dataset

    from conftest import CAPTIONS
    from modeling_lightclip.training.data import DataArguments, ImageTextCollator, load_image_text_datasets
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.reinforce import reinforce

    first, second = CAPTIONS[1], CAPTIONS[3]  # of different lengths: the stand-in teacher tells them apart
    assert len(first) != len(second)
    images = tmp_path / "images"
    images.mkdir()
    names = _images_with_bad_ones(images, 8, set())
    lists = [[first, second] if i % 2 else [second, "  ", first] for i in range(8)]  # a blank one is no caption
    teacher = _CountingTeacher()
    out = tmp_path / "R"
    reinforce({"train": Dataset.from_dict({"image": [str(images / n) for n in names], "caption": lists})}, out, [],
              shard_size=4, teachers=[teacher])
    copy = load_image_text_datasets(DataArguments(train_file=str(out)))
    rows = list(copy["train"])
    assert [row["caption"] for row in rows] == [[c for c in captions if c.strip()] for captions in lists]
    for row in rows:
        for caption, stored in zip(row["caption"], row["teacher0_text"]):
            np.testing.assert_allclose(stored, teacher.text_features([caption])[0].numpy(), atol=2e-3)

    from modeling_lightclip import LightCLIPConfig

    config = LightCLIPConfig(relation_loss_weight=1.0)  # reads the teachers' features
    collator = ImageTextCollator(build_processor(32, tokenizer), model_config=config,
                                 teachers=copy.reinforced["teachers"])
    decoded = {tokenizer.decode(tokenizer(c)["input_ids"], skip_special_tokens=True): c for c in (first, second)}
    drawn = set()
    for seed in range(4):  # a few draws: both captions come up
        collator.seed = seed
        batch = collator(rows)
        for ids, features in zip(batch["input_ids"], batch["training_targets"]["teacher_text_features"]):
            caption = decoded[tokenizer.decode(ids, skip_special_tokens=True)]
            drawn.add(caption)
            expected = torch.nn.functional.normalize(teacher.text_features([caption]).float(), dim=-1)[0]
            torch.testing.assert_close(features, expected, atol=2e-3, rtol=0)
    assert drawn == {first, second}


def test_string_labels_are_kept_in_a_reinforced_copy_and_scored_by_their_names(tmp_path):
    from datasets import Dataset

    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets, prepare_zero_shot_labels
    from modeling_lightclip.training.reinforce import reinforce

    images = tmp_path / "images"
    images.mkdir()
    names = _images_with_bad_ones(images, 6, set())
    labels = ["cat", "Dog", "cat", None, "dog", "bird"]
    source = Dataset.from_dict({"image": [str(images / n) for n in names], "caption": [f"photo {i}" for i in range(6)],
                                "label": labels})
    out = tmp_path / "R"
    reinforce({"train": source, "validation": source}, out, [], shard_size=4, teachers=[_CountingTeacher()])
    copy = load_image_text_datasets(DataArguments(train_file=str(out)))
    assert list(copy["validation"]["label"]) == ["cat", "Dog", "cat", None, "dog", "bird"]
    scored, class_names = prepare_zero_shot_labels(copy["validation"], DataArguments(train_file=str(out)))
    assert class_names == ["bird", "cat", "Dog"]  # the distinct strings, case-insensitively, sorted
    assert list(scored["label"]) == [1, 2, 1, -1, 2, 0]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_unicode_line_separators_inside_a_caption_keep_the_row_and_the_whole_caption(tmp_path, suffix):
    from modeling_lightclip.training.data import clean_caption
    from modeling_lightclip.training.tables import read_table

    captions = ["a line\u2028separator", "a next\u0085line", "a paragraph\u2029separator", "a form\x0cfeed",
                "a vertical\x0btab", "plain", "a file\x1cseparator"]
    if suffix == ".csv":
        text = "image,caption\n" + "".join(f"img{i}.png,{c}\r\n" for i, c in enumerate(captions))
    else:
        text = "".join(json.dumps({"image": f"img{i}.png", "caption": c}, ensure_ascii=False) + "\n"
                       for i, c in enumerate(captions))
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(text.encode("utf-8"))
    columns, report = read_table(path, text_columns=("image", "caption"), caption_column="caption")
    assert not report.skipped and columns["caption"] == captions and columns["image"][-1] == "img6.png"
    assert [clean_caption(c)[0] for c in columns["caption"]] == [" ".join(c.replace("\x1c", " ").split())
                                                                 for c in captions]


def test_a_caption_that_is_an_object_or_a_nested_list_is_counted_not_trained_as_its_json(tmp_path):
    from modeling_lightclip.training.data import clean_caption
    from modeling_lightclip.training.tables import read_table

    rows = [{"image": "a.png", "caption": {"text": "a cat"}}, {"image": "b.png", "caption": [["a", "b"]]},
            {"image": "c.png", "caption": ["one", "two"]}, {"image": "d.png", "caption": "three"},
            {"image": "e.png", "caption": [{"text": "x"}]}, {"image": "f.png", "caption": 1984}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns, report = read_table(path, text_columns=("image", "caption"), caption_column="caption")
    assert report.skipped == {"caption_not_text": 3} and report.lines["caption_not_text"] == [1, 2, 5]
    assert columns["caption"] == [["one", "two"], ["three"], ["1984"]]  # with lists present: every row a list
    assert clean_caption({"text": "a cat"}) == (None, "caption_not_text")  # from parquet or a Hub dataset too


# ------------------------------------------------------------------------------------- wide encodings, special files


@pytest.mark.parametrize("written, given, outcome", [
    ("utf-32", "utf-8", "read"),          # with a byte-order mark (FF FE 00 00: not UTF-16's FF FE)
    ("utf-32-be", "utf-8", "read"),
    ("utf-32-le", "utf-32-le", "read"),
    ("utf-32-le", "utf-8", "Pass --file_encoding utf-32-le"),
    ("utf-32-be", "utf-8", "Pass --file_encoding utf-32-be"),
    ("utf-32-be", "utf-32", "--file_encoding utf-32-le or utf-32-be"),
    ("utf-16-le", "utf-8", "Pass --file_encoding utf-16-le")])
def test_utf32_files_are_read_or_refused_naming_the_encoding(tmp_path, written, given, outcome):
    import codecs

    from modeling_lightclip.training.tables import TableFileError, read_table

    captions = [f"a photo {i} of a caf\u00e9 \u2615" for i in range(6)]
    text = "image,caption\n" + "".join(f"img{i}.png,{c}\n" for i, c in enumerate(captions))
    raw = text.encode(written)
    if written == "utf-32-be" and outcome == "read":
        raw = codecs.BOM_UTF32_BE + raw
    path = tmp_path / "pairs.csv"
    path.write_bytes(raw)
    if outcome == "read":
        columns, report = read_table(path, given, caption_column="caption")
        assert columns["caption"] == captions and not report.skipped
    else:
        with pytest.raises(TableFileError, match=re.escape(outcome)):
            read_table(path, given, caption_column="caption")


def test_a_fifo_or_a_folder_as_an_image_path_is_skipped_without_opening_it(tmp_path):
    from modeling_lightclip.training.data import ImageRejected, load_image

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path in (fifo, tmp_path):
        with pytest.raises(ImageRejected) as rejected:
            load_image(str(path))
        assert rejected.value.reason == "not_a_file"
    with pytest.raises(ImageRejected):
        load_image({"path": str(fifo), "bytes": None})
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "gone.png"))


def test_a_csv_with_a_fifo_among_its_images_trains_and_counts_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = _images_with_bad_ones(images, 8, set())
    os.mkfifo(images / "pipe.png")
    data = images / "train.csv"
    data.write_text("image,caption\n" + "pipe.png,a pipe\n" + "".join(f"{n},a photo number {i}\n"
                                                                      for i, n in enumerate(names)))
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(data), "--per_device_train_batch_size", "9",
                          "--max_steps", "1", "--do_eval", "false", "--dataloader_num_workers", "0",
                          "--output_dir", str(out)])
    assert json.loads((out / "train_results.json").read_text())["train_skipped_not_a_file"] == 1


# ------------------------------------------------------------------------------------- broken saved folders


@pytest.fixture()
def broken_saved_folders(tmp_path, tiny_model, tokenizer):
    """A saved model folder (weights, config, tokenizer, processor) with one part missing or cut short each."""
    import shutil

    from modeling_lightclip.training.preprocessing import build_processor

    good = tmp_path / "good"
    tiny_model.save_pretrained(good)
    build_processor(32, tokenizer).save_pretrained(good)
    processor_configs = [p.name for p in good.glob("*processor_config.json")]
    assert processor_configs and (good / "tokenizer.json").is_file()

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return str(folder)

    def cut(file):
        def change(folder):
            (folder / file).write_bytes((folder / file).read_bytes()[: (folder / file).stat().st_size // 2])
        return change

    def remove(*files):
        return lambda folder: [(folder / f).unlink() for f in files]

    return str(good), {
        "no weights": (variant("no_weights", remove("model.safetensors")), "no weights"),
        "cut weights": (variant("cut_weights", cut("model.safetensors")), "model.safetensors cannot be read"),
        "no tokenizer": (variant("no_tokenizer", remove("tokenizer.json", "tokenizer_config.json")),
                         "no tokenizer files"),
        "cut tokenizer": (variant("cut_tokenizer", cut("tokenizer.json")), "tokenizer.json cannot be read"),
        "no processor": (variant("no_processor", remove(*processor_configs)), "no image processor"),
    }


def test_evaluation_and_export_of_a_broken_folder_end_in_one_message(broken_saved_folders, tmp_path, capsys):
    from modeling_lightclip.training import benchmark, hub, onnx_export

    good, broken = broken_saved_folders
    commands = {
        "hub card": lambda f: hub.main(["card", f]),
        "hub export": lambda f: hub.main(["export", f, "--out", str(tmp_path / "native")]),
        "onnx_export": lambda f: onnx_export.main([f, "--out", str(tmp_path / "onnx")]),
        "--model": lambda f: benchmark.main(["--model", f, "--validation_file", "unused.csv"]),
    }
    for case, (folder, message) in broken.items():
        for name, command in commands.items():
            try:
                code = command(folder)
            except SystemExit as stopped:
                code = stopped.code
            err = capsys.readouterr().err
            assert code == 2, (case, name, err[-600:])
            expected = f"^error: {re.escape(name)} {re.escape(folder)}: .*{message}"
            assert re.search(expected, err, re.M), (case, name, err)
        with pytest.raises(ValueError, match=f"^--model_name_or_path {re.escape(folder)}: .*{message}"):
            train_lightclip.main(["--do_train", "false", "--model_name_or_path", folder, "--max_eval_samples", "8",
                                  "--output_dir", str(tmp_path / "eval")])
    with pytest.raises(SystemExit) as stopped:  # export without --out
        hub.main(["export", good])
    assert stopped.value.code == 2 and "export needs --out" in capsys.readouterr().err
    hub.main(["card", good])  # the whole folder passes the check
    assert (Path(good) / "README.md").is_file()


def test_reinforcing_data_where_every_row_is_bad_fails_with_the_counts(tmp_path, monkeypatch, capsys):
    from modeling_lightclip.training import reinforce

    monkeypatch.setattr(reinforce, "load_teacher", lambda *args, **kwargs: _CountingTeacher())
    data = tmp_path / "pairs.csv"
    data.write_text("image,caption\n" + "".join(f"gone{i}.png,a photo {i}\n" for i in range(5)) + "img.png,\n")
    assert reinforce.main(["--train_file", str(data), "--out", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err
    assert "no usable training sample" in err and "5 missing_file, 1 missing_caption" in err
