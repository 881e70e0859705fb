"""Feature distillation (CLIP-KD's FD): the term against a loop implementation, its projections absent from an
inference checkpoint (the inference path unchanged), and a run from a reinforced copy that sets the teachers'
dimensions from the data, logs the term and names it on the card."""

import json

import pytest
import torch
import torch.nn.functional as F

from test_reinforce import _copy_rows, _pairs  # noqa: F401 - helpers shared with the reinforced-data tests


def test_feature_distillation_equals_a_loop_implementation():
    from modeling_lightclip.objectives_lightclip import FeatureDistillationLoss

    torch.manual_seed(0)
    loss = FeatureDistillationLoss(8, 12, 5)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    teacher_image, teacher_text = F.normalize(torch.randn(6, 12), dim=-1), F.normalize(torch.randn(6, 5), dim=-1)
    total = 0.0
    for projection, student, teacher in ((loss.image_projection.weight, image, teacher_image),
                                         (loss.text_projection.weight, text, teacher_text)):
        rows = []
        for s, t in zip(student, teacher):
            p = projection @ s
            p = p / p.norm()
            rows.append(sum((p[j] - t[j]) ** 2 for j in range(len(t))))
        total = total + sum(rows) / len(rows)
    term = loss(image, text, teacher_image, teacher_text)["feature_distill"]
    torch.testing.assert_close(term, total / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="built for teacher features of 12"):
        loss(image, text, teacher_image[:, :10], teacher_text)


def test_the_projections_are_training_only(tiny_recipe, tokenizer, tmp_path):
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config

    plain = LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer))
    with pytest.raises(ValueError, match="feature_distill_teacher_dims"):
        LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer, feature_distill_loss_weight=1.0))
    config = build_model_config(tiny_recipe["model"], tokenizer, feature_distill_loss_weight=1.0,
                                feature_distill_teacher_dims=[20, 10], save_training_modules=False)
    model = LightCLIPModel(config)
    assert {k for k in model.state_dict() if k.startswith("objectives.feature_distill")} == {
        "objectives.feature_distill.image_projection.weight", "objectives.feature_distill.text_projection.weight"}
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in plain.state_dict().items()
                                                      if not k.startswith("objectives.")}
    reloaded = LightCLIPModel.from_pretrained(tmp_path).eval()
    model.eval()
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    enc = tokenizer(["a cat", "a red car parked"], padding=True, return_tensors="pt")
    torch.testing.assert_close(reloaded.get_image_features(pixel_values=pixels).pooler_output,
                               model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(reloaded.get_text_features(**enc).pooler_output, model.get_text_features(**enc).pooler_output)


def test_a_run_from_a_reinforced_copy_distils_the_teachers_features(tmp_path):
    from huggingface_hub import ModelCard

    import train_lightclip
    from modeling_lightclip import LightCLIPConfig
    from modeling_lightclip.training.reinforce import main

    csv = _pairs(tmp_path / "data", 12)
    out = tmp_path / "R"
    assert main(["--train_file", str(csv), "--out", str(out), "--teacher_image_size", "64"]) == 0
    meta = json.loads((out / "reinforced.json").read_text())
    dims = [meta["teachers"][0]["image_dim"], meta["teachers"][0]["text_dim"]]
    run = tmp_path / "run"
    trainer = train_lightclip.main(["--train_file", str(out), "--streaming", "--recipe", "tiny", "--max_steps", "2",
                                    "--per_device_train_batch_size", "6", "--feature_distill_loss_weight", "1",
                                    "--soft_label_mode", "none", "--relation_loss_weight", "0", "--logging_steps",
                                    "1", "--output_dir", str(run), "--do_eval", "false"])
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(0 < h["loss_feature_distill"] <= 4 for h in logged)
    assert LightCLIPConfig.from_pretrained(run).feature_distill_teacher_dims == dims == [1280, 384]
    card = ModelCard.load(run / "README.md").text
    assert "feature distillation" in card and "1280-d image, 384-d text" in card
    with pytest.raises(ValueError, match="Some specified arguments are not used"):
        train_lightclip.parse_args(["--feature_distill_teacher_dims", "3", "4"])  # set from the data, not a flag
