"""ONNX export of both encoders, checked with onnxruntime against PyTorch on real images and captions."""

import json

import pytest
import torch

from conftest import CAPTIONS


pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _has_timm() -> bool:
    import importlib.util
    import os

    return os.environ.get("LIGHTCLIP_REQUIRE_TIMM") == "1" or importlib.util.find_spec("timm") is not None


_needs_timm = pytest.mark.skipif(not _has_timm(), reason="timm not installed (pip install '.[timm]')")


@pytest.mark.parametrize("recipe,image_size", [("tiny", 32), ("mobilenetv2", 64), ("vit_xs", 64),
                                               pytest.param("mobilenetv4", 64, marks=_needs_timm),
                                               pytest.param("fastvit", 64, marks=_needs_timm)])
def test_onnx_encoders_match_pytorch_with_dynamic_batch_and_length(tmp_path, tokenizer, photo_paths, recipe,
                                                                    image_size):
    import onnxruntime

    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.onnx_export import IMAGE_FILE, TEXT_FILE, TextEncoder, check_with_onnxruntime, main
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.recipes import build_model_config, load_recipe

    torch.manual_seed(0)
    model = LightCLIPModel(build_model_config(load_recipe(recipe)["model"], tokenizer, image_size=image_size)).eval()
    processor = build_processor(image_size, tokenizer)
    model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")

    report = main([str(tmp_path / "run"), "--out", str(tmp_path / "onnx")])  # default check: Fashion-MNIST rows
    assert report["images"] == 8 and report["image_max_abs_diff"] <= 1e-4 and report["text_max_abs_diff"] <= 1e-4
    assert json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())["logit_scale"] == pytest.approx(
        float(model.logit_scale.exp()))
    assert (tmp_path / "onnx" / "tokenizer.json").is_file() and (tmp_path / "onnx" / "config.json").is_file()

    # real photos, other batch sizes and caption lengths than at export
    photos = check_with_onnxruntime(model, processor, tmp_path / "onnx", [str(p) for p in photo_paths], CAPTIONS[:3])
    assert photos["image_max_abs_diff"] <= 1e-4 and photos["text_max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / TEXT_FILE), providers=["CPUExecutionProvider"])
    one = tokenizer([CAPTIONS[0]], return_tensors="pt")
    (embeds,) = session.run(None, {"input_ids": one["input_ids"].numpy(), "attention_mask": one["attention_mask"].numpy()})
    with torch.no_grad():
        expected = TextEncoder(model)(one["input_ids"], one["attention_mask"]).numpy()
    assert embeds.shape == expected.shape and abs(embeds - expected).max() <= 1e-4
    assert (tmp_path / "onnx" / IMAGE_FILE).stat().st_size > 1000

    # the check can fail: a model that is not the exported one differs
    with torch.no_grad():
        model.visual_projection.weight.mul_(-1.0)
    changed = check_with_onnxruntime(model, processor, tmp_path / "onnx")
    assert changed["image_max_abs_diff"] > 1e-2


def test_export_refuses_a_folder_without_a_model(tmp_path, capsys):
    from modeling_lightclip.training.onnx_export import main

    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "--out", str(tmp_path / "onnx")])
    assert stopped.value.code == 2 and "no config.json" in capsys.readouterr().err
