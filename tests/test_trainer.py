"""The trainer and the command line: one message and exit code 2 for what cannot work, runs that diverge or
run out of disk stopped with the message, checkpoints verified, resumed runs equal to uninterrupted ones."""

import json
import shutil
from pathlib import Path
import pytest
import torch
from conftest import REPO, neighbours_folder, run_cli, saved_tokenizer, tiny_train_argv
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
import train_lightclip


RESUME_ARGS = ["--recipe", "tiny", "--max_train_samples", "96", "--per_device_train_batch_size", "8", "--max_steps",
               "10", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--do_eval", "false",
               "--seed", "7", "--dataloader_num_workers", "0"]


def _losses(out: Path) -> dict:
    state = json.loads((out / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture
def one_thread():
    """The killed run is a subprocess with OMP_NUM_THREADS=1; the in-process reference and resume must use the same
    thread count, or float sums differ in the last bits and the matching/masking steps amplify them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_command_line_prints_one_message_and_exits_2(tmp_path, capsys):
    import train_lightclip

    assert train_lightclip.cli(tiny_train_argv(tmp_path / "a", "--soft_label_temperature", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: soft_label_temperature=0.0 (--soft_label_temperature)") and "Traceback" not in err


def test_nan_losses_are_logged_as_nan_and_stop_the_run(tmp_path, monkeypatch, capsys):
    import train_lightclip
    from modeling_lightclip.modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.stops import TrainingStopped

    original = LightCLIPModel.forward

    def diverged(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
            out["loss"] = out.loss
        return out

    monkeypatch.setattr(LightCLIPModel, "forward", diverged)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="NaN or infinite for 3 steps in a row"):
        train_lightclip.main(tiny_train_argv(out, "--max_train_samples", "64", "--max_steps", "10", "--stop_after_bad_steps",
                                   "3", "--do_eval", "false"))
    logged = capsys.readouterr()
    assert "'loss': 'nan'" in logged.out + logged.err       # not the Trainer's filtered running average


@pytest.mark.parametrize("flags, flag", [
    (["--soft_label_temperature", "0"], "--soft_label_temperature"),
    (["--token_temperature", "-1"], "--token_temperature"),
    (["--token_temperature", "0"], "--token_temperature"),
    (["--logit_scale_init_value", "inf"], "--logit_scale_init_value"),
    (["--logit_scale_max", "-5"], "--logit_scale_max"),
    (["--vision_token_stage", "9"], "--vision_token_stage"),
    (["--fusion_vision_stages", "7", "9"], "--fusion_vision_stages"),
    (["--image_size", "0"], "--image_size"),
    (["--max_caption_length", "1"], "--max_caption_length"),
    (["--max_caption_length", "100"], "--max_caption_length"),
])
def test_flags_that_cannot_work_are_refused_naming_the_flag(tmp_path, flags, flag):
    import train_lightclip

    with pytest.raises(ValueError, match=flag):
        train_lightclip.main(tiny_train_argv(tmp_path / "out", "--max_train_samples", "16", *flags))


def test_latest_skips_incomplete_checkpoints_and_says_why(tmp_path, caplog):
    import train_lightclip
    from modeling_lightclip.training.checkpoints import checkpoint_problem, latest_complete_checkpoint

    out = tmp_path / "run"
    train_lightclip.main(tiny_train_argv(out, "--max_train_samples", "64", "--max_steps", "2", "--save_strategy", "steps",
                               "--save_steps", "1", "--do_eval", "false"))
    good, newest = out / "checkpoint-1", out / "checkpoint-2"
    assert checkpoint_problem(good) is None and latest_complete_checkpoint(out) == str(newest)
    for name, damage, reason in [("model.safetensors", "truncate", "model.safetensors is truncated"),
                                 ("optimizer.pt", "truncate", "optimizer.pt is truncated"),
                                 ("rng_state.pth", "truncate", "rng_state.pth is"),
                                 ("scheduler.pt", "delete", "scheduler.pt is missing"),
                                 ("trainer_state.json", "truncate", "trainer_state.json is truncated")]:
        broken = tmp_path / f"broken-{name}" / "checkpoint-3"
        shutil.copytree(newest, broken)
        target = broken / name
        if damage == "delete":
            target.unlink()
        else:
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        assert reason in checkpoint_problem(broken), name
        shutil.copytree(good, broken.parent / "checkpoint-1")
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert latest_complete_checkpoint(broken.parent) == str(broken.parent / "checkpoint-1")
        assert f"skipping {broken}: {reason}" in caplog.text
    only_model = tmp_path / "only_model"
    shutil.copytree(newest, only_model / "checkpoint-2")
    (only_model / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint-2: optimizer.pt is missing.*--save_only_model"):
        train_lightclip.main(tiny_train_argv(only_model, "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="cannot resume, trainer_state.json is truncated"):
        train_lightclip.main(tiny_train_argv(tmp_path / "again", "--resume_from_checkpoint",
                                   str(tmp_path / "broken-trainer_state.json" / "checkpoint-3")))


def test_a_full_disk_names_the_folder(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from modeling_lightclip.training.stops import TrainingStopped, writing_to

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30, 0))
    with pytest.raises(TrainingStopped, match=f"no space left on device while writing to {tmp_path} \\(0 MiB free"):
        with writing_to(tmp_path):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                               "basic_ios::clear: iostream error")
    with pytest.raises(TrainingStopped, match="no space left"):
        with writing_to(tmp_path):
            raise OSError(28, "No space left on device")
    with pytest.raises(RuntimeError, match="something else"):   # other errors pass unchanged
        with writing_to(tmp_path):
            raise RuntimeError("something else")


def test_a_full_disk_during_a_checkpoint_stops_the_run_with_the_message(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    import train_lightclip
    from modeling_lightclip.training.stops import TrainingStopped

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 832 vs 640: "
                           "basic_ios::clear: iostream error")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)          # the Trainer writes optimizer.pt / rng_state.pth with it
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(2**30, 2**30, 0))
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=f"no space left on device while writing to {out}"):
        train_lightclip.main(tiny_train_argv(out, "--max_train_samples", "32", "--save_strategy", "steps", "--save_steps", "1",
                                   "--do_eval", "false"))


@pytest.mark.parametrize("name, content, expected", [
    ("bad.yaml", "model:\n  image_size: [32\ntraining: {}\n", "not valid YAML"),
    ("bad.json", '{"model": {"image_size": 32,}}', "line 1 column 29: not valid JSON"),
    ("empty.json", "", "is empty"),
])
def test_a_recipe_that_does_not_parse_is_one_message_naming_it(name, content, expected, tmp_path, capsys):
    recipe = tmp_path / name
    recipe.write_text(content)
    code, err = run_cli(["--recipe", str(recipe), "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"recipe {recipe}" in err and expected in err


def test_a_run_that_ends_nan_saves_no_model_and_names_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """Fewer non-finite steps than the stop-after limit, at the very end: the final model is not written, the run
    exits 2, and the last checkpoint with finite weights is named."""
    from modeling_lightclip import LightCLIPModel

    original = LightCLIPModel.forward

    def diverges_at_step_4(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self._calls = getattr(self, "_calls", 0) + 1
        if self.training and self._calls >= 4:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LightCLIPModel, "forward", diverges_at_step_4)
    out = tmp_path / "run"
    code, err = run_cli(tiny_train_argv(out, "--max_steps", "4", "--max_train_samples", "32", "--save_strategy", "steps",
                           "--save_steps", "2", "--do_eval", "false", "--stop_after_bad_steps", "5"), capsys)
    assert code == 2 and "Traceback" not in err
    assert "training ended with a non-finite model" in err
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in err
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()


@pytest.mark.parametrize("flag, value", [("--soft_label_temperature", "1e-45"), ("--relation_temperature", "1e-6"),
                                         ("--logit_scale_max", "50")])
def test_temperatures_and_scales_have_a_floor_that_keeps_the_loss_finite(flag, value, tmp_path, capsys):
    code, err = run_cli(tiny_train_argv(tmp_path / "run", flag, value), capsys)
    assert code == 2 and f"({flag})" in err and "Traceback" not in err


def test_sigkill_then_resume_reaches_the_same_end(tmp_path, one_thread):
    import train_lightclip

    reference = tmp_path / "reference"
    shared_tokenizer = saved_tokenizer(tmp_path)
    common = RESUME_ARGS + ["--tokenizer_name", str(shared_tokenizer)]
    train_lightclip.main(common + ["--output_dir", str(reference)])

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    slow = common + ["--output_dir", str(out)]
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "slow_train.py"), *slow], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint-4" / "trainer_state.json").exists():
        time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-10").exists(), "the run finished before it was killed"
    # a checkpoint half-written at kill time: weights there, trainer state not yet
    half = out / "checkpoint-12"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\x00" * 100)
    from modeling_lightclip.training.checkpoints import latest_complete_checkpoint

    picked = latest_complete_checkpoint(out)
    assert picked is not None and Path(picked).name in ("checkpoint-4", "checkpoint-6", "checkpoint-8")
    train_lightclip.main(common + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 10
    resumed, uninterrupted = _losses(out), _losses(reference)
    start = int(Path(picked).name.split("-")[1])
    for step in range(start + 1, 11):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4, abs=1e-4), step


def test_start_up_errors_name_the_problem(tmp_path):
    import train_lightclip

    csv = tmp_path / "train.csv"
    csv.write_text("image,caption\n" + "".join(f"not a path {i},a caption {i}\n" for i in range(8)))
    with pytest.raises(ValueError, match="image column 'image' holds no readable images"):
        train_lightclip.main(["--recipe", "tiny", "--train_file", str(csv), "--output_dir", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="no column 'picture'"):
        train_lightclip.main(["--recipe", "tiny", "--image_column", "picture", "--output_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="Unknown vision tower type 'not_a_tower'"):
        from modeling_lightclip import LightCLIPConfig

        LightCLIPConfig(vision_config={"model_type": "not_a_tower"})


def test_changing_an_architecture_field_of_a_checkpoint_is_refused(tmp_path):
    import train_lightclip

    out = tmp_path / "run"
    train_lightclip.main(RESUME_ARGS[:6] + ["--max_steps", "1", "--do_eval", "false", "--output_dir", str(out)])
    with pytest.raises(ValueError, match="--projection_dim 64 does not match the checkpoint's 32"):
        train_lightclip.main(["--recipe", "tiny", "--model_name_or_path", str(out), "--projection_dim", "64",
                              "--output_dir", str(tmp_path / "again")])


def test_ping_bank_is_checkpointed_and_restored(tmp_path):
    """The CLIP-PING bank is not in the weights: it travels in each checkpoint and comes back on resume."""
    import train_lightclip
    from modeling_lightclip.training.checkpoints import PING_BANK_FILE, latest_complete_checkpoint, load_ping_bank
    from modeling_lightclip import LightCLIPModel

    neighbours = neighbours_folder(tmp_path / "ping")  # features of the 64 training rows
    out = tmp_path / "run"
    args = ["--recipe", "tiny", "--max_train_samples", "64", "--per_device_train_batch_size", "8", "--save_strategy",
            "steps", "--save_steps", "3", "--do_eval", "false", "--ping_nn_loss_weight", "0.5",
            "--ping_xnn_loss_weight", "0.5", "--teacher_features", str(neighbours), "--output_dir", str(out)]
    train_lightclip.main(args + ["--max_steps", "3"])
    checkpoint = out / "checkpoint-3"
    assert (checkpoint / PING_BANK_FILE).is_file()
    saved = torch.load(checkpoint / PING_BANK_FILE, weights_only=True)
    assert int(saved["valid"].sum()) == 24  # 3 steps x 8 samples seen
    # without its bank a checkpoint is incomplete for a CLIP-PING run
    (checkpoint / PING_BANK_FILE).rename(checkpoint / "moved.pt")
    assert latest_complete_checkpoint(out, require_bank=True) is None
    (checkpoint / "moved.pt").rename(checkpoint / PING_BANK_FILE)
    model = LightCLIPModel.from_pretrained(checkpoint)
    assert load_ping_bank(model, checkpoint)
    assert torch.equal(model.objectives.ping.bank.valid, saved["valid"])
    train_lightclip.main(args + ["--max_steps", "5", "--resume_from_checkpoint", "latest"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5


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
