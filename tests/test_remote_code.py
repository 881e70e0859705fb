"""The saved folder runs as remote code where this project is not importable (the Hub user's situation)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from clean_env import add_to_client_env, distributions_in, make_client_env
from modeling_lightclip import LightCLIPModel
from modeling_lightclip.training.preprocessing import build_processor


CLIENT = textwrap.dedent('''
    import importlib.abc, json, sys

    class _Block(importlib.abc.MetaPathFinder):
        """Make this project's package unimportable, as on a user's machine."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_lightclip", "train_lightclip"):
                raise ImportError(f"{name} is blocked: the client must run from the saved folder alone")
            return None

    sys.meta_path.insert(0, _Block())
    folder, photos, expected_path = sys.argv[1], sys.argv[2:4], sys.argv[4]
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    expected = json.load(open(expected_path))
    inputs = processor(text=expected["texts"], images=[Image.open(p) for p in photos], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        try:  # the training objectives are not in the folder: asking for the loss says where they are
            model(**inputs, return_loss=True)
            loss_error = None
        except ImportError as err:
            loss_error = str(err)
    pipe = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    result = pipe(photos[0], candidate_labels=["astronaut", "cat", "car"])
    print(json.dumps({
        "model_class": type(model).__name__,
        "model_module": type(model).__module__,
        "processor_class": type(processor).__name__,
        "logits_per_image": out.logits_per_image.tolist(),
        "pipeline_labels": sorted(r["label"] for r in result),
        "pipeline_score_sum": sum(r["score"] for r in result),
        "loss_error": loss_error,
    }))
''')


def _save_tiny_folder(model, tokenizer, folder: Path):
    model.save_pretrained(folder)
    build_processor(model.config.image_size, tokenizer).save_pretrained(folder)


def _expected(model, tokenizer, photo_paths, folder: Path, pil_backend: bool = False) -> dict:
    """The logits the client must print. transformers resizes with torchvision when it is installed and with PIL
    otherwise (pixels differ in the last bits): `pil_backend` computes them as a client without torchvision will."""
    processor = build_processor(model.config.image_size, tokenizer)
    if pil_backend:
        from transformers import CLIPImageProcessorPil

        processor.image_processor = CLIPImageProcessorPil(**processor.image_processor.to_dict())
    return expected_logits(model, processor, photo_paths, folder)


def expected_logits(model, processor, photo_paths, folder: Path) -> dict:
    """The client's captions, and the logits `model` gives them and the photos through `processor`; written to
    `folder/_expected.json` for the client to read."""
    from PIL import Image

    texts = ["a photo of an astronaut", "a tabby cat"]
    inputs = processor(text=texts, images=[Image.open(p) for p in photo_paths], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    expected = {"texts": texts, "logits_per_image": logits.tolist()}
    (folder / "_expected.json").write_text(json.dumps(expected))
    return expected


def _run_client(python: str, folder: Path, photo_paths, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(cwd / "hf_home")
    script = cwd / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.run(
        [python, str(script), str(folder), *map(str, photo_paths), str(folder / "_expected.json")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(result, expected):
    assert result["model_class"] == "LightCLIPModel"
    assert result["model_module"].startswith("transformers_modules.")  # loaded from the folder's code
    assert result["processor_class"] == "LightCLIPProcessor"
    torch.testing.assert_close(torch.tensor(result["logits_per_image"]), torch.tensor(expected["logits_per_image"]),
                               atol=1e-5, rtol=1e-5)
    assert result["pipeline_labels"] == ["astronaut", "car", "cat"]
    assert result["pipeline_score_sum"] == pytest.approx(1.0, abs=1e-4)
    assert "LightCLIP package" in result["loss_error"] and "return_loss" in result["loss_error"]


def test_saved_folder_is_flat_remote_code(tiny_model, tokenizer, tmp_path):
    _save_tiny_folder(tiny_model, tokenizer, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_lightclip.py", "modeling_lightclip.py",
            "processing_lightclip.py", "processor_config.json", "tokenizer.json"} <= names
    assert "objectives_lightclip.py" not in names  # training code: the inference user downloads none of it
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_lightclip.LightCLIPConfig",
        "AutoModel": "modeling_lightclip.LightCLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_lightclip.LightCLIPModel",
    }
    # relative imports only, and nothing but torch/transformers at top level
    for name in ("configuration_lightclip.py", "modeling_lightclip.py", "processing_lightclip.py"):
        for line in (tmp_path / name).read_text().splitlines():
            if line.startswith(("import ", "from ")):
                module = line.split()[1]
                top = module.split(".")[0]
                assert module.startswith(".") or top in ("torch", "transformers") or top in sys.stdlib_module_names, (
                    f"{name}: {line}")


def test_remote_code_and_pipeline_without_the_package(tiny_model, tokenizer, photo_paths, tmp_path):
    folder = tmp_path / "model"
    _save_tiny_folder(tiny_model, tokenizer, folder)
    expected = _expected(tiny_model, tokenizer, photo_paths, folder)
    _check(_run_client(sys.executable, folder, photo_paths, tmp_path), expected)


def test_clean_virtualenv_client(tiny_model, tokenizer, photo_paths, tmp_path):
    """A fresh virtualenv with only torch, transformers and pillow (and what they require): what a Hub user has
    (then + timm, for a timm image tower). Its files are linked from this environment (clean_env.py says why)."""
    folder = tmp_path / "model"
    _save_tiny_folder(tiny_model, tokenizer, folder)
    expected = _expected(tiny_model, tokenizer, photo_paths, folder, pil_backend=True)  # no torchvision there
    python = make_client_env(tmp_path / "venv", ["torch", "transformers", "pillow"])
    installed = distributions_in(python)
    assert {"torch", "transformers", "pillow"} <= installed
    assert not installed & {"lightclip", "datasets", "accelerate", "scipy", "peft", "torchvision", "timm"}
    blocked = subprocess.run([python, "-c", "import datasets"], capture_output=True, text=True, cwd=tmp_path)
    assert blocked.returncode != 0 and "No module named 'datasets'" in blocked.stderr  # the oracle: it is not there
    _check(_run_client(python, folder, photo_paths, tmp_path), expected)

    # the native export of a CLIP-shaped model: plain CLIPModel, no custom code, same pipeline
    from modeling_lightclip.training.hub import export_clip
    from modeling_lightclip.training.recipes import build_model_config
    from test_hub import CLIP_SHAPED

    torch.manual_seed(0)
    clip_shaped = LightCLIPModel(build_model_config(CLIP_SHAPED, tokenizer)).eval()
    native = export_clip(clip_shaped, build_processor(32, tokenizer), tmp_path / "native")
    probs = _native_probs(clip_shaped, tokenizer, photo_paths[0])
    script = tmp_path / "native_client.py"
    script.write_text(NATIVE_CLIENT)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([python, str(script), str(native), str(photo_paths[0])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_class"] == "CLIPModel"
    got = {r["label"]: r["score"] for r in result["pipeline"]}
    for label, p in probs.items():
        assert got[label] == pytest.approx(p, abs=1e-4)

    # a timm image tower (TimmWrapper): the same client once timm is added, and nothing else of ours
    if importlib.util.find_spec("timm") is None and os.environ.get("LIGHTCLIP_REQUIRE_TIMM") != "1":
        return

    add_to_client_env(python, ["timm"])
    installed = distributions_in(python)
    assert "timm" in installed and not installed & {"lightclip", "datasets", "accelerate", "scipy", "peft"}
    import train_lightclip
    from modeling_lightclip import LightCLIPProcessor

    folder = tmp_path / "timm_run"  # the `mobilenetv4` recipe trained with every objective on (issue #14's acceptance)
    train_lightclip.main([
        "--recipe", "mobilenetv4", "--image_size", "64", "--max_train_samples", "32", "--per_device_train_batch_size",
        "8", "--max_steps", "1", "--do_eval", "false", "--dataloader_num_workers", "0", "--soft_label_mode",
        "similarity", "--token_loss_weight", "0.5", "--vision_token_stage", "-2", "--mlm_loss_weight", "0.5",
        "--ping_nn_loss_weight", "0.5", "--ping_xnn_loss_weight", "0.5", "--relation_loss_weight", "1.0",
        "--teacher_features", "auto", "--output_dir", str(folder)])
    trained = LightCLIPModel.from_pretrained(folder).eval()
    expected = _expected(trained, LightCLIPProcessor.from_pretrained(folder).tokenizer, photo_paths, folder)
    _check(_run_client(python, folder, photo_paths, tmp_path), expected)  # timm brought torchvision there


NATIVE_CLIENT = textwrap.dedent('''
    import json, sys
    from transformers import AutoModel, pipeline

    folder, photo = sys.argv[1], sys.argv[2]
    model = AutoModel.from_pretrained(folder)
    pipe = pipeline("zero-shot-image-classification", model=folder)
    print(json.dumps({"model_class": type(model).__name__,
                      "pipeline": pipe(photo, candidate_labels=["astronaut", "cat", "car"])}))
''')


def _native_probs(model, tokenizer, photo) -> dict:
    """What the pipeline must return, computed from the LightCLIP model with the pipeline's default template."""
    from PIL import Image

    labels = ["astronaut", "cat", "car"]
    processor = build_processor(model.config.image_size, tokenizer)
    inputs = processor(text=[f"This is a photo of {label}." for label in labels], images=[Image.open(photo)],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(dim=-1)[0]
    return dict(zip(labels, probs.tolist()))


def test_processor_round_trip(tokenizer, photo_paths, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    processor = build_processor(48, tokenizer)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "LightCLIPProcessor"
    images = [Image.open(p) for p in photo_paths]
    texts = ["an astronaut", "a cat on a blanket"]
    a = processor(text=texts, images=images, padding=True, return_tensors="pt")
    b = loaded(text=texts, images=images, padding=True, return_tensors="pt")
    assert set(a) == set(b) == {"input_ids", "attention_mask", "pixel_values"}
    for key in a:
        assert torch.equal(a[key], b[key])
    assert a["pixel_values"].shape == (2, 3, 48, 48)
    # the parts load without custom code too (what the zero-shot pipeline does)
    assert torch.equal(AutoImageProcessor.from_pretrained(tmp_path)(images, return_tensors="pt")["pixel_values"],
                       a["pixel_values"])
    assert AutoTokenizer.from_pretrained(tmp_path)(texts, padding=True)["input_ids"] == a["input_ids"].tolist()
