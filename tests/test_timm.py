"""timm backbones as image towers, through transformers' `TimmWrapper`: several families built from config offline,
checked against timm's own API (features, intermediates, head), trained, saved and reloaded; a pretrained tower
from a folder in the timm Hub layout; a timm recipe end to end through `train_lightclip.py`."""

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import make_batch

if os.environ.get("LIGHTCLIP_REQUIRE_TIMM") == "1":  # `make test` installs timm: there, missing it is a failure
    import timm  # noqa: F401
else:
    timm = pytest.importorskip("timm")

# MobileNetV4, FastViT (MobileCLIP's family), EfficientViT, RepViT, MobileOne: the families issue #14 names
FAMILIES = ["mobilenetv4_conv_small", "fastvit_t8", "efficientvit_b0", "repvit_m0_9", "mobileone_s0"]


def _timm_config(tiny_recipe, tokenizer, architecture, **overrides):
    from modeling_lightclip.training.recipes import build_model_config

    model = dict(tiny_recipe["model"], vision_config={"model_type": "timm_wrapper", "architecture": architecture})
    # the tiny recipe's objectives: soft labels, token alignment on stage -2, MLM with fusion from stages -2 and -1
    return build_model_config(model, tokenizer, image_size=64, soft_label_source="student", **overrides)


@pytest.mark.parametrize("architecture", FAMILIES)
def test_timm_family_against_timm_trains_and_round_trips(architecture, tiny_recipe, tokenizer, tmp_path):
    from modeling_lightclip import LightCLIPModel

    torch.manual_seed(0)
    model = LightCLIPModel(_timm_config(tiny_recipe, tokenizer, architecture)).eval()
    backbone = model.vision_model.timm_model
    batch = make_batch(tokenizer, batch_size=4, image_size=64)
    with torch.no_grad():
        out = model(**batch, return_loss=True, output_tokens=True)
        # oracle: timm's own pooled features and stage outputs, projected / flattened by hand
        pooled = backbone.forward_head(backbone.forward_features(batch["pixel_values"]))
        expected_embeds = F.normalize(model.visual_projection(pooled), dim=-1)
        expected_tokens = backbone.forward_features(batch["pixel_values"]).flatten(2).transpose(1, 2)
        _, stages = backbone.forward_intermediates(batch["pixel_values"])
    torch.testing.assert_close(out.image_embeds, expected_embeds)
    torch.testing.assert_close(out.image_tokens, expected_tokens)
    # the stages the token alignment and the fusion read are timm's own stage outputs
    assert model.vision_shapes.stage_dims == [s.shape[1] for s in stages]
    assert model.vision_shapes.stage_num_tokens == [s.shape[2] * s.shape[3] for s in stages]
    assert set(out.losses) == {"instance", "token", "mlm"} and torch.isfinite(out.loss)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(**batch, return_loss=True).loss
    loss.backward()
    with_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters()]
    assert sum(with_grad) / len(with_grad) > 0.9  # the tower learns (a few timm parameters may be unused)
    optimizer.step()

    model.eval().save_pretrained(tmp_path / "saved")
    reloaded = LightCLIPModel.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.config.vision_config.model_type == "timm_wrapper"
    assert reloaded.config.vision_config.architecture == architecture
    with torch.no_grad():
        a = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        b = reloaded.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    torch.testing.assert_close(a, b)


def test_a_pretrained_timm_tower_from_the_hub_layout(tiny_recipe, tokenizer, tmp_path):
    """`--vision_model_name_or_path timm/...` reads a timm Hub repo (timm's config.json + model.safetensors): a folder
    written by timm's own `save_for_hf` is that layout, offline."""
    from timm.models import create_model, save_for_hf

    from modeling_lightclip import LightCLIPModel

    torch.manual_seed(1)
    source = create_model("mobilenetv4_conv_small").eval()   # as published: an ImageNet head
    save_for_hf(source, str(tmp_path / "timm_repo"), safe_serialization=True)
    config = _timm_config(tiny_recipe, tokenizer, "mobilenetv4_conv_small")
    model = LightCLIPModel.from_vision_text_pretrained(str(tmp_path / "timm_repo"), None, **config.to_dict()).eval()
    loaded = model.vision_model.timm_model.state_dict()
    for name, tensor in source.state_dict().items():
        if not name.startswith("classifier"):  # the wrapper keeps no classifier (num_classes=0)
            torch.testing.assert_close(loaded[name], tensor, msg=name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_model(pixel_values=x).pooler_output,
                                   source.forward_head(source.forward_features(x), pre_logits=True))


def test_timm_recipes_build(tokenizer):
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config, load_recipe

    for name, architecture in (("mobilenetv4", "mobilenetv4_conv_small"), ("fastvit", "fastvit_t8")):
        config = build_model_config(load_recipe(name)["model"], tokenizer)
        assert config.vision_config.architecture == architecture and config.image_size == 224
        model = LightCLIPModel(config)
        assert model.is_convolutional
        assert 2e6 < sum(p.numel() for p in model.vision_model.parameters()) < 6e6  # headless


def test_mobilenetv4_recipe_trains_with_every_objective_and_runs_the_pipeline(tmp_path, photo_paths):
    """The acceptance run, shrunk: every objective on (CLIP-PING with the packaged frozen encoders), saved, reloaded
    as remote code, zero-shot pipeline."""
    import json

    from transformers import AutoModel, pipeline

    import train_lightclip

    out = tmp_path / "run"
    train_lightclip.main([
        "--recipe", "mobilenetv4", "--image_size", "64", "--max_train_samples", "32", "--max_eval_samples", "16",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_steps", "2",
        "--logging_steps", "1", "--dataloader_num_workers", "0",
        "--soft_label_mode", "similarity", "--token_loss_weight", "0.5", "--vision_token_stage", "-2",
        "--mlm_loss_weight", "0.5", "--ping_nn_loss_weight", "0.5", "--ping_xnn_loss_weight", "0.5",
        "--relation_loss_weight", "1.0", "--teacher_features", "auto", "--output_dir", str(out)])
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 2
    for term in ("instance", "token", "mlm", "ping_nn", "ping_xnn", "relation"):
        assert f"loss_{term}" in logged[-1], term
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "LightCLIPModel" and model.config.vision_config.model_type == "timm_wrapper"
    pipe = pipeline("zero-shot-image-classification", model=str(out), trust_remote_code=True)
    result = pipe(str(photo_paths[0]), candidate_labels=["astronaut", "cat", "car"])
    assert sorted(r["label"] for r in result) == ["astronaut", "car", "cat"]
    assert sum(r["score"] for r in result) == pytest.approx(1.0, abs=1e-4)


def test_any_timm_architecture_by_name_from_the_command_line(tmp_path):
    import json

    import train_lightclip
    from modeling_lightclip.training.hub import _tower_name
    from modeling_lightclip import LightCLIPConfig

    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--timm_architecture", "repvit_m0_9", "--image_size", "64",
                          "--soft_label_source", "student", "--max_train_samples", "16", "--max_steps", "1",
                          "--per_device_train_batch_size", "8", "--do_eval", "false", "--dataloader_num_workers", "0",
                          "--output_dir", str(out)])
    config = LightCLIPConfig.from_pretrained(out)
    assert config.vision_config.architecture == "repvit_m0_9"
    assert _tower_name(config.vision_config) == "timm repvit_m0_9"
    assert "timm repvit_m0_9" in (out / "README.md").read_text()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    with pytest.raises(ValueError, match="timm has no such architecture"):
        train_lightclip.main(["--recipe", "tiny", "--timm_architecture", "repvit_m9_not_a_model",
                              "--output_dir", str(tmp_path / "bad")])
