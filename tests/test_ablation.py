"""The ablation runner (benchmarks/ablation.py): arms parse as training flags, and the report's statistics equal
values computed by hand. The study itself takes about an hour of CPU; it is not a test."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from modeling_lightclip.objectives_lightclip import reads_teacher_knowledge


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation_runner", ROOT / "benchmarks" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ablation_runner"] = module
    spec.loader.exec_module(module)
    return module


def _run(arm, seed, top1, r1, step=1.0):
    return {"arm": arm, "seed": seed, "zero_shot_top1": top1, "image_to_text_r1": r1, "image_to_text_r5": r1,
            "text_to_image_r1": r1, "text_to_image_r5": r1, "step_seconds": step}


def test_every_arm_parses_as_training_flags(ablation, tmp_path):
    """Each arm's switches reach the config fields under their own names (a typo would fail the parser or
    leave a field at its default); the arms that read the frozen encoders' folder (CLIP-PING, frozen-encoder soft
    labels), and only they, get it."""
    import train_lightclip
    from modeling_lightclip.training.arguments import config_overrides
    from modeling_lightclip.training.recipes import build_model_config

    files = {"train": tmp_path / "train.parquet"}
    for name, overrides in ablation.ARMS.items():
        streamed = name in ablation.STREAMED_ARMS
        argv = ablation.train_argv(ablation.SETTINGS["cpu"], overrides, 3, files, tmp_path / "tok",
                                   tmp_path / "nn", tmp_path / name, tmp_path / "R" if streamed else None)
        recipe, model_args, data_args, training_args = train_lightclip.parse_args(argv)
        given = config_overrides(model_args)
        for key, value in overrides.items():
            if key in given:
                assert given[key] == (value if isinstance(value, str) else float(value)), (name, key)
            else:  # a tower start, lock or learning rate: a model or training argument of that name
                owner = model_args if hasattr(model_args, key) else training_args
                assert getattr(owner, key) == value, (name, key)
        assert training_args.seed == 3  # an arm's own steps (the batch study's equal samples) override the setting's
        assert training_args.max_steps == overrides.get("max_steps", ablation.SETTINGS["cpu"]["max_steps"])
        needs_folder = reads_teacher_knowledge(build_model_config(recipe["model"], **given))
        assert needs_folder == (name in ("lightclip+ping", "lightclip+ping_batch_negatives", "+ping_in_batch",
                                         "+frozen_soft_labels", "+frozen_relation", *ablation.STREAMED_ARMS)
                                or name.endswith(("+frozen_relation", "+frozen_soft_labels")) and not name.startswith("+")
                                or name.startswith("recommended@")), name
        if streamed:   # teacher features from a reinforced copy, streamed
            assert data_args.streaming and data_args.train_file == str(tmp_path / "R")
            assert data_args.teacher_features != str(tmp_path / "nn")
            continue
        assert (data_args.teacher_features == str(tmp_path / "nn")) == needs_folder
    # the arms differ from the baseline in exactly the objectives they name
    base = ablation.ARMS["clip"]
    changed = {name: {k for k in base if arm[k] != base[k]} for name, arm in ablation.ARMS.items()}
    assert changed["+frozen_relation_streamed"] == changed["+frozen_relation"]
    assert changed["+distill_aligned"] == {"distill_loss_weight"}
    assert changed["+frozen_relation+distill_aligned"] == changed["+frozen_relation"] | {"distill_loss_weight"}
    assert changed["+soft_labels"] == {"soft_label_mode"}
    assert changed["+token"] == {"token_loss_weight"}
    assert changed["+mlm_fusion"] == {"mlm_loss_weight"}
    assert changed["lightclip"] == {"soft_label_mode", "token_loss_weight", "mlm_loss_weight"}
    assert changed["lightclip+ping"] == changed["lightclip"] | {"ping_nn_loss_weight", "ping_xnn_loss_weight"}
    assert changed["+frozen_soft_labels"] == {"soft_label_mode"}
    assert changed["+ping_in_batch"] == {"ping_nn_loss_weight", "ping_xnn_loss_weight"}
    # the paper arms spell out the paper's soft labels: a change of the library's defaults cannot change them
    for name in ("+soft_labels", "lightclip", "lightclip+ping"):
        arm = ablation.ARMS[name]
        assert (arm["soft_label_source"], arm["soft_label_max"], arm["soft_label_schedule"]) == ("student", 0.2, "cosine")
    assert ablation.ARMS["+frozen_soft_labels"]["soft_label_source"] == "frozen"
    # pretrained starts: the recommended objective on top changes the objective and nothing else
    for name in ablation.PRETRAINED_ARMS:
        on_top = ablation.ARMS[f"{name}+frozen_relation"]
        assert {k for k in on_top if on_top[k] != ablation.ARMS[name].get(k)} <= set(ablation.ARMS["+frozen_relation"])
        assert changed[f"{name}+frozen_relation"] == changed["+frozen_relation"]


def test_parse_arm(ablation):
    name, overrides = ablation.parse_arm("soft_0.5=--soft_label_mode similarity --soft_label_max 0.5")
    assert name == "soft_0.5"
    assert overrides["soft_label_mode"] == "similarity" and overrides["soft_label_max"] == "0.5"
    assert overrides["token_loss_weight"] == 0.0  # everything else as the CLIP arm
    for bad in ("=--a 1", "x=--a", "x=a 1"):
        with pytest.raises(ValueError):
            ablation.parse_arm(bad)


def test_summary_statistics_by_hand(ablation):
    runs = [_run("clip", s, v, 0.1) for s, v in enumerate([0.4, 0.5, 0.6])]
    runs += [_run("lightclip", s, v, 0.2, step=2.0) for s, v in enumerate([0.5, 0.6, 0.7])]
    summary = ablation.summarise(runs, {"clip": None}, ["clip", "lightclip"])
    top1 = summary["lightclip"]["metrics"]["zero_shot_top1"]
    assert top1["mean"] == pytest.approx(0.6) and top1["std"] == pytest.approx(0.1)  # sample std (n-1)
    versus = summary["lightclip"]["vs_clip"]["zero_shot_top1"]
    assert versus["delta"] == pytest.approx(0.1)
    # Welch t = 0.1 / sqrt(0.01/3 + 0.01/3), 4 degrees of freedom; closed-form Student-t CDF for nu = 4
    t = 0.1 / math.sqrt(0.02 / 3)
    x = t / math.sqrt(4 + t * t)
    assert versus["welch_p"] == pytest.approx(2 * (1 - (0.5 + 0.75 * x * (1 - x * x / 3))), rel=1e-6)
    assert summary["lightclip"]["metrics"]["step_seconds"]["mean"] == pytest.approx(2.0)
    assert "vs_clip" not in summary["clip"]
    # constant metrics: zero variance on both sides -> no p-value rather than NaN
    assert summary["lightclip"]["vs_clip"]["image_to_text_r1"]["welch_p"] is None
    assert list(summary) == ["clip", "lightclip"]


def test_report_files(ablation, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import json

    study = tmp_path / "cpu"
    for arm, values in (("clip", [0.40, 0.50]), ("+token", [0.55, 0.65])):
        for seed, value in enumerate(values):
            folder = study / "runs" / arm / f"seed{seed}"
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps(_run(arm, seed, value, 0.3)))
    monkeypatch.setattr(ablation, "ROOT", tmp_path)
    inference = {"clip": {"inference_params": 1234567, "image_ms": 1.5, "text_ms": 0.5}}
    result = ablation.report(study, list(ablation.ARMS), "cpu", ablation.SETTINGS["cpu"], inference)
    assert set(result["summary"]) == {"clip", "+token"}
    table = (study / "results.md").read_text()
    assert "| `clip` | 45.0 ± 7.1 |" in table            # mean 0.45, std 0.0707
    assert "| `+token` | 60.0 ± 7.1 (+15.0, p=" in table
    assert "1,234,567" in table and "1.50 / 0.50" in table
    png = (tmp_path / "benchmarks" / "results" / "ablation_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_selection_split_is_carved_from_training_data(ablation, tmp_path):
    """Hyperparameters are selected on data carved from the training split: the carved rows are disjoint from the
    selection training set, Fashion-MNIST is carved per class, the test files are never touched, and the carve is
    the same every time."""
    from datasets import Dataset

    fm, oc = tmp_path / "fashion_mnist", tmp_path / "openclipart"
    fm.mkdir()
    oc.mkdir()
    Dataset.from_dict({"image": [f"fm{i}" for i in range(60)], "caption": [f"fm caption {i}" for i in range(60)],
                       "label": [i % 3 for i in range(60)]}).to_parquet(str(fm / "train.parquet"))
    Dataset.from_dict({"image": [f"oc{i}" for i in range(50)],
                       "caption": [f"oc caption {i}" for i in range(50)]}).to_parquet(str(oc / "train.parquet"))
    files = ablation.prepare_selection_data(tmp_path, {}, fm_per_class=4, oc_share=0.2)
    read = {k: Dataset.from_parquet(str(v)) for k, v in files.items()}
    train, fm_val, oc_val = (set(read[k]["image"]) for k in ("train", "zero_shot", "retrieval"))
    assert len(fm_val) == 12 and len(oc_val) == 10 and len(train) == 110 - 22
    assert not (train & fm_val) and not (train & oc_val)
    assert sorted(read["zero_shot"]["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    again = tmp_path / "again"
    for name in ("fashion_mnist", "openclipart"):
        (again / name).mkdir(parents=True)
        for f in (tmp_path / name).iterdir():
            (again / name / f.name).write_bytes(f.read_bytes())
    repeat = ablation.prepare_selection_data(again, {}, fm_per_class=4, oc_share=0.2)
    assert set(Dataset.from_parquet(str(repeat["zero_shot"]))["image"]) == fm_val


def test_second_test_set_scores_saved_runs_against_a_baseline(tiny_model, tokenizer, tmp_path):
    """benchmarks/second_test_set.py: every saved run scored once on the icon set, cached beside it; the arm's
    metrics equal a direct evaluation; the paired bootstrap of a run against itself is exactly zero."""
    import json

    from PIL import Image

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import second_test_set

    from modeling_lightclip.training.preprocessing import build_processor

    theme = tmp_path / "theme"
    for i, name in enumerate(["edit-copy", "folder-music", "media-playback-start", "user-trash", "mail-send"]):
        path = theme / "usr" / "share" / "icons" / "elementary-xfce" / "actions" / "48" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 48), (40 * i, 255 - 40 * i, 90)).save(path)
    study = tmp_path / "study"
    for arm in ("base", "same"):
        folder = study / "runs" / arm / "seed0"
        tiny_model.save_pretrained(folder)
        build_processor(tiny_model.config.image_size, tokenizer).save_pretrained(folder)
    out = tmp_path / "icons.json"
    result = second_test_set.main(["--study", str(study), "--baseline", "base", "--data_dir", str(tmp_path / "data"),
                                   "--image_size", "32", "--package_root", str(theme), "--json", str(out)])
    assert result["pairs"] == 5
    same = result["arms"]["same"]
    assert all(same["vs_base"][k]["delta"] == 0 and same["vs_base"][k]["p_holm"] == 1.0 for k in second_test_set.METRICS)
    scored = second_test_set.score(study / "runs" / "base" / "seed0",
                                   tmp_path / "data" / "icons_elementary-xfce_32" / "test.parquet")
    assert result["arms"]["base"]["metrics"]["image_to_text_r1"]["mean"] == scored["image_to_text_r1"]
    saved = json.loads(out.read_text())
    assert saved["command"] and saved["provenance"] and (study / "runs" / "same" / "seed0" / "icons.json").is_file()


def test_the_batch_study_arms_see_equal_samples(ablation):
    """Batch 128 / 512 / 2048 for each loss: batch x steps the same for every arm, the larger batches accumulated
    from micro-batches of 256, curves saved at the same numbers of samples, and each loss's switches as its arm."""
    for arm in ablation.BATCH_ARMS:
        spec = ablation.ARMS[arm]
        batch = spec["per_device_train_batch_size"]
        assert batch * spec["max_steps"] == ablation.BATCH_STUDY_SAMPLES, arm
        assert spec["save_steps"] * batch == ablation.BATCH_STUDY_SAMPLES // 4, arm
        assert spec.get("micro_batch_size") == (256 if batch > 256 else None), arm
        loss = arm.split("@")[0]
        assert (spec.get("instance_loss") == "sigmoid") == (loss == "sigmoid"), arm
        assert (spec["relation_loss_weight"] > 0) == (loss == "recommended"), arm
