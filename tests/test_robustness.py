"""Dirty data, interrupted training, clear start-up errors, safe loading."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FIXTURES, REPO


def _png(image: Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _dirty_parquet(folder: Path) -> tuple[Path, dict]:
    """48 rows: 32 good (several image modes, a 1x1 image, duplicates), 16 bad of known kinds."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    photo = Image.open(FIXTURES / "astronaut.jpg").convert("RGB")
    cat = Image.open(FIXTURES / "chelsea_cat.jpg").convert("RGB")
    rgba = cat.convert("RGBA")
    palette = cat.convert("P")
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((torch.rand(20, 20) * 60000).to(torch.int32).numpy().astype("uint16"))
    assert sixteen.mode.startswith("I;16")
    good = [
        (_png(photo), "an astronaut in a white suit"), (_png(cat), "a tabby cat"),
        (_png(photo.convert("L")), "a grey astronaut"), (_png(cat.convert("LA")), "a grey cat with alpha"),
        (_png(palette), "a palette cat with transparency"), (_png(rgba), "a cat with an alpha channel"),
        (_png(cat.convert("CMYK"), "JPEG"), "a cmyk cat"), (_png(sixteen), "sixteen bit noise"),
        (_png(Image.new("RGB", (1, 1), (200, 10, 10))), "a single red pixel"),
        (_png(photo), " ".join(["a very long caption"] * 300)),
    ]
    good = (good * 4)[:32]  # duplicates included
    truncated = _png(photo, "JPEG")[:200]
    bad = [
        ({"bytes": None, "path": str(folder / "missing.jpg")}, "a missing file", "missing_file"),
        ({"bytes": b"", "path": None}, "zero bytes", "empty_image_record"),
        ({"bytes": truncated, "path": None}, "a truncated jpeg", "undecodable_image"),
        ({"bytes": b"this is not an image at all", "path": None}, "a text file", "undecodable_image"),
        ({"bytes": _png(Image.new("L", (200, 200))), "path": None}, "a decompression bomb", "too_large"),
        ({"bytes": _png(photo), "path": None}, "", "empty_caption"),
        ({"bytes": _png(photo), "path": None}, "   \n\t ", "empty_caption"),
        ({"bytes": _png(photo), "path": None}, b"\xff\xfe not utf-8 \xc3\x28", "non_utf8_caption"),
    ] * 2
    rows = {"image": [{"bytes": b, "path": None} for b, _ in good] + [b[0] for b in bad],
            "caption": [c.encode() for _, c in good] + [c if isinstance(c, bytes) else c.encode() for _, c, _ in bad]}
    expected = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    features = Features({"image": ImageFeature(decode=False), "caption": Value("binary")})
    path = folder / "dirty.parquet"
    (folder / "missing.jpg").write_bytes(_png(photo))  # exists while the file is written (datasets stats it) ...
    Dataset.from_dict(rows, features=features).to_parquet(str(path))
    (folder / "missing.jpg").unlink()                  # ... and is gone when training reads it
    return path, expected


def test_dirty_dataset_trains_and_evaluates_with_counts(tmp_path, monkeypatch):
    import train_lightclip

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # 200x200 = 40,000 pixels: a "bomb"; photos are 96x96
    path, expected = _dirty_parquet(tmp_path)
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(path), "--validation_file", str(path),
                          "--label_column", "none", "--per_device_train_batch_size", "8",
                          "--per_device_eval_batch_size", "16", "--max_steps", "6", "--logging_steps", "1",
                          "--output_dir", str(out), "--seed", "3"])
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    # every row is seen once in the epoch (48 rows, batch 8, nothing dropped)
    seen = {k[len("train_skipped_"):]: v for k, v in train.items() if k.startswith("train_skipped_")}
    expected_train = {("undecodable_image" if k == "empty_image_record" else k): 0 for k in expected}
    for reason, count in expected.items():
        expected_train["undecodable_image" if reason == "empty_image_record" else reason] += count
    assert seen == expected_train
    assert train["train_repaired_transparency"] > 0 and train["train_repaired_cmyk"] > 0
    assert train["train_repaired_high_bit_depth"] > 0
    assert evaluation["eval_num_samples"] == 32 and evaluation["eval_skipped_samples"] == 16
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any("skipped_missing_file" in entry for entry in state["log_history"])


def test_dirty_dataset_streaming(tmp_path, monkeypatch):
    import train_lightclip

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    path, _ = _dirty_parquet(tmp_path)
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(path), "--streaming", "--max_steps", "6",
                          "--tokenizer_name", str(_saved_tokenizer(tmp_path)), "--per_device_train_batch_size", "8",
                          "--do_eval", "false", "--output_dir", str(out)])
    train = json.loads((out / "train_results.json").read_text())
    # the 16 bad rows are the last 16 of 48: steps 5 and 6 train on them (counted once, as in the map-style run)
    assert sum(v for k, v in train.items() if k.startswith("train_skipped_") and "empty_batch" not in k) == 16
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def _saved_tokenizer(folder: Path) -> Path:
    from conftest import CAPTIONS
    from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer

    path = folder / "tokenizer"
    train_wordpiece_tokenizer(CAPTIONS * 4, vocab_size=300, model_max_length=32).save_pretrained(path)
    return path


def test_a_batch_of_only_bad_samples_is_a_zero_step(tiny_model, tokenizer):
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.trainer import LightCLIPTrainer
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments

    collator = ImageTextCollator(build_processor(32, tokenizer))
    batch = collator([{"image": b"not an image", "caption": "x"}, {"image": None, "caption": "y"}])
    assert batch["skipped"] == {"undecodable_image": 1, "missing_image": 1, "empty_batch": 1}
    assert "pixel_values" not in batch and batch["empty_batch"].shape == (0,)
    trainer = LightCLIPTrainer(model=tiny_model.train(), args=LightCLIPTrainingArguments(output_dir="/tmp/unused"))
    loss = trainer.compute_loss(tiny_model, batch)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.abs().sum() for p in tiny_model.parameters())


# ---------------------------------------------------------------------------------------------- interruption


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


def test_sigkill_then_resume_reaches_the_same_end(tmp_path, one_thread):
    import train_lightclip

    reference = tmp_path / "reference"
    shared_tokenizer = _saved_tokenizer(tmp_path)
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


# ---------------------------------------------------------------------------------------------- clear errors


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


# ---------------------------------------------------------------------------------------------- safe loading


def test_every_torch_load_is_weights_only():
    sources = list((REPO / "modeling_lightclip").rglob("*.py")) + [REPO / "train_lightclip.py"]
    sources += list((REPO / "tests").glob("*.py")) + list((REPO / "benchmarks").glob("*.py"))
    import ast

    calls = 0
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                calls += 1
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, (
                    f"{path.name}:{node.lineno}")
    assert calls >= 3  # the bank, the packaged EfficientNet weights, the distributed test's tensors


def test_remote_code_files_do_no_io_at_import(tmp_path):
    """Import the remote-code set with sockets and file writes forbidden."""
    script = tmp_path / "probe.py"
    script.write_text(f"""
import builtins, socket, sys
def _no_network(*a, **k):
    raise RuntimeError("network access at import")
socket.socket.connect = _no_network
real_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if any(m in mode for m in "wax+"):
        raise RuntimeError(f"file write at import: {{file}}")
    return real_open(file, mode, *a, **k)
import torch, transformers  # their own imports may write caches; ours may not
builtins.open = _guarded_open
sys.path.insert(0, {str(REPO / "modeling_lightclip")!r})
import importlib.util
for name in ("configuration_lightclip", "objectives_lightclip", "processing_lightclip", "modeling_lightclip"):
    spec = importlib.util.spec_from_file_location("lightclip_remote." + name, {str(REPO / "modeling_lightclip")!r} + "/" + name + ".py",
                                                  submodule_search_locations=None)
import types
package = types.ModuleType("lightclip_remote"); package.__path__ = [{str(REPO / "modeling_lightclip")!r}]
sys.modules["lightclip_remote"] = package
for name in ("configuration_lightclip", "objectives_lightclip", "processing_lightclip", "modeling_lightclip"):
    importlib.import_module("lightclip_remote." + name)
print("ok")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_nothing_trusts_remote_code_on_the_users_behalf():
    """No call in the library passes trust_remote_code=True (usage examples in strings are fine)."""
    import ast

    sources = list((REPO / "modeling_lightclip").rglob("*.py")) + [REPO / "train_lightclip.py"]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code":
                        assert not (isinstance(keyword.value, ast.Constant) and keyword.value.value is True), (
                            f"{path.name}:{node.lineno}")


def test_ping_bank_is_checkpointed_and_restored(tmp_path):
    """The CLIP-PING bank is not in the weights: it travels in each checkpoint and comes back on resume."""
    import numpy as np
    import train_lightclip
    from modeling_lightclip.training.neighbours import FILES
    from modeling_lightclip.training.checkpoints import PING_BANK_FILE, latest_complete_checkpoint, load_ping_bank
    from modeling_lightclip import LightCLIPModel

    neighbours = tmp_path / "ping"
    neighbours.mkdir()
    rng = np.random.default_rng(0)
    for modality in ("image", "text"):  # 64 training rows, 4 neighbours each (never itself)
        table = np.stack([rng.permutation(np.delete(np.arange(64), i))[:4] for i in range(64)])
        np.save(neighbours / FILES[f"{modality}_neighbours"], table)
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


def test_corrupt_file_in_a_decoding_image_column(tmp_path):
    """An `Image()` column (decoded by datasets on read, as imagefolder and Hub datasets have) with a corrupt file:
    the loader defers decoding to the collator, which skips and counts it instead of crashing."""
    import train_lightclip
    from datasets import Dataset, Features, Image as ImageFeature, Value

    good = _png(Image.open(FIXTURES / "astronaut.jpg").convert("RGB"))
    rows = {"image": [{"bytes": good, "path": None}] * 15 + [{"bytes": b"\x89PNG corrupt", "path": None}],
            "caption": [f"an astronaut number {i}" for i in range(16)]}
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data.parquet"))
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(tmp_path / "data.parquet"), "--max_steps", "2",
                          "--per_device_train_batch_size", "8", "--do_eval", "false", "--output_dir", str(out)])
    assert json.loads((out / "train_results.json").read_text())["train_skipped_undecodable_image"] == 1
