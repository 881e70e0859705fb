"""The SigLIP sigmoid instance loss (`instance_loss="sigmoid"`) and the sigmoid form of cross-modal distillation:
against a loop over the pairs and against transformers' own `SiglipModel` loss; the model's bias, its
initialisation, saving, the card, export and the refusals. (Global over 2 processes: tests/test_distributed.py.)"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modeling_lightclip import LightCLIPConfig, LightCLIPModel
from modeling_lightclip.objectives_lightclip import CrossModalDistillationLoss, SigmoidInstanceLoss


def _embeds(n, d, seed):
    generator = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=generator), dim=-1),
            F.normalize(torch.randn(n, d, generator=generator), dim=-1))


def test_sigmoid_loss_against_a_loop_over_the_pairs():
    images, texts = _embeds(6, 8, 0)
    scale, bias = torch.tensor(7.0), torch.tensor(-3.0)
    total = 0.0
    for i in range(6):
        for j in range(6):
            label = 1.0 if i == j else -1.0
            logit = float(scale) * float(images[i] @ texts[j]) + float(bias)
            total += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    got = SigmoidInstanceLoss()(images, texts, scale, bias)["instance"]
    assert float(got) == pytest.approx(total / 6, rel=1e-5)


def test_sigmoid_loss_equals_transformers_siglip_loss():
    """transformers' SiglipModel computes its own loss (return_loss=True) from its embeddings, scale and bias: ours on
    the same embeddings, scale and bias is the same number."""
    from transformers import SiglipConfig, SiglipModel

    config = SiglipConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8})
    torch.manual_seed(0)
    siglip = SiglipModel(config).eval()
    with torch.no_grad():  # away from the initial values, so scale and bias both matter
        siglip.logit_scale.fill_(math.log(12.0))
        siglip.logit_bias.fill_(-4.0)
        out = siglip(input_ids=torch.randint(0, 100, (5, 7)), pixel_values=torch.randn(5, 3, 32, 32),
                     return_loss=True)
    ours = SigmoidInstanceLoss()(out.image_embeds, out.text_embeds, siglip.logit_scale.exp(), siglip.logit_bias)
    torch.testing.assert_close(ours["instance"], out.loss, rtol=1e-5, atol=1e-6)


def test_sigmoid_distillation_against_a_loop_and_zero_at_the_teacher():
    images, texts = _embeds(5, 8, 1)
    teacher_images, teacher_texts = _embeds(5, 6, 2)
    loss = CrossModalDistillationLoss(temperature=2.0, form="sigmoid")
    scale, bias, t_scale, t_bias = torch.tensor(9.0), torch.tensor(-2.0), 20.0, -6.0
    got = loss(images, texts, scale, teacher_images, teacher_texts, t_scale, bias, t_bias)["distill"]
    total = 0.0
    for i in range(5):
        for j in range(5):
            p = 1 / (1 + math.exp(-(t_scale * float(teacher_images[i] @ teacher_texts[j]) + t_bias) / 2.0))
            q = 1 / (1 + math.exp(-(float(scale) * float(images[i] @ texts[j]) + float(bias)) / 2.0))
            total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert float(got) == pytest.approx(total / 5, rel=1e-5)
    same = loss(teacher_images, teacher_texts, torch.tensor(t_scale), teacher_images, teacher_texts, t_scale,
                torch.tensor(t_bias), t_bias)["distill"]
    assert abs(float(same)) < 1e-6


def _sigmoid_config(tokenizer, tiny_recipe, **fields):
    from modeling_lightclip.training.recipes import build_model_config

    fields = {"instance_loss": "sigmoid", "soft_label_mode": "none", "token_loss_weight": 0.0, "mlm_loss_weight": 0.0,
              **fields}
    return build_model_config(tiny_recipe["model"], tokenizer, **fields)


def test_the_model_learns_a_bias_from_siglips_initialisation_and_keeps_it(tokenizer, tiny_recipe, tmp_path):
    from conftest import make_batch

    config = _sigmoid_config(tokenizer, tiny_recipe)
    model = LightCLIPModel(config).train()
    assert float(model.logit_scale.detach().exp()) == pytest.approx(10.0)
    assert float(model.logit_bias.detach()) == pytest.approx(-10.0)
    batch = make_batch(tokenizer, batch_size=4)
    out = model(**batch, return_loss=True)
    out.loss.backward()
    assert model.logit_bias.grad is not None and float(model.logit_bias.grad) != 0.0
    expected = (model.logit_scale.exp() * out.text_embeds @ out.image_embeds.t() + model.logit_bias).detach()
    torch.testing.assert_close(out.logits_per_text.detach(), expected)
    with torch.no_grad():
        model.logit_bias.fill_(-3.25)
    model.save_pretrained(tmp_path)
    reloaded = LightCLIPModel.from_pretrained(tmp_path)
    assert float(reloaded.logit_bias.detach()) == -3.25 and reloaded.config.instance_loss == "sigmoid"
    assert LightCLIPModel(LightCLIPConfig()).logit_bias is None  # softmax models have none


def test_what_has_no_sigmoid_reading_is_refused(tokenizer, tiny_recipe, tmp_path):
    from modeling_lightclip.training.hub import export_clip
    from modeling_lightclip.training.teacher_features import setup_teacher_features

    with pytest.raises(ValueError, match="soft labels"):
        _sigmoid_config(tokenizer, tiny_recipe, soft_label_mode="similarity")
    # distillation: a softmax-trained teacher has no bias, so its sigmoid is no probability
    config = _sigmoid_config(tokenizer, tiny_recipe, distill_loss_weight=1.0)
    data_args = SimpleNamespace(teacher_features=None, streaming=False)
    training_args = SimpleNamespace(do_train=True)
    clip_teacher = {"kind": "multimodal", "name": "a-clip", "logit_scale": 50.0}
    with pytest.raises(ValueError, match="has no bias"):
        setup_teacher_features(config, [0], {"teachers": [clip_teacher]}, data_args, training_args)
    siglip_teacher = {**clip_teacher, "name": "a-siglip", "logit_bias": -12.5}
    setup_teacher_features(config, [0], {"teachers": [siglip_teacher]}, data_args, training_args)
    assert config.distill_teacher_logit_bias == -12.5 and config.distill_teacher_logit_scale == 50.0
    # a value the data records is not silently replaced by a flag, nor a flag by it: a conflict is refused
    for field, flag in (("distill_teacher_logit_scale", 30.0), ("distill_teacher_logit_bias", -4.0)):
        config = _sigmoid_config(tokenizer, tiny_recipe, distill_loss_weight=1.0, **{field: flag})
        with pytest.raises(ValueError, match=f"--{field} .*records its teacher's value"):
            setup_teacher_features(config, [0], {"teachers": [siglip_teacher]}, data_args, training_args,
                                   given=frozenset({field}))
        setup_teacher_features(config, [0], {"teachers": [siglip_teacher]}, data_args, training_args)  # saved config
        assert (config.distill_teacher_logit_scale, config.distill_teacher_logit_bias) == (50.0, -12.5)
    config = _sigmoid_config(tokenizer, tiny_recipe, distill_loss_weight=1.0, distill_teacher_logit_scale=30.0)
    setup_teacher_features(config, [0], {"teachers": [{**siglip_teacher, "logit_scale": None}]}, data_args,
                           training_args, given=frozenset({"distill_teacher_logit_scale"}))
    assert config.distill_teacher_logit_scale == 30.0  # the data records no scale: the flag is what it distils with
    # a CLIPModel has no bias: native export would drop it
    clip_towers = LightCLIPConfig(
        instance_loss="sigmoid",
        vision_config={"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        text_config={"model_type": "clip_text_model", "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 300})
    with pytest.raises(ValueError, match="logit_bias would be lost"):
        export_clip(LightCLIPModel(clip_towers), None, tmp_path / "native")


def test_a_sigmoid_model_trains_with_accumulation_reloads_in_a_client_and_exports(tmp_path, photo_paths):
    """`--instance_loss sigmoid` end to end, with contrastive accumulation and gradient checkpointing on: the run
    logs the bias, the card names the loss, a client without this package (remote code) gets the logits with the
    bias, and the ONNX export's report carries it."""
    import json
    import sys

    from test_remote_code import _run_client, expected_logits

    import train_lightclip
    from modeling_lightclip import LightCLIPProcessor
    from modeling_lightclip.training.onnx_export import main as onnx_main

    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--instance_loss", "sigmoid", "--soft_label_mode", "none",
                          "--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "4",
                          "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "true", "--max_steps", "2",
                          "--logging_steps", "1", "--dataloader_num_workers", "0", "--output_dir", str(out)])
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert "logit_bias" in logged[0] and state["train_batch_size"] == 8
    card = (out / "README.md").read_text()
    assert "SigLIP's pairwise sigmoid loss" in card and "learned bias" in card
    model = LightCLIPModel.from_pretrained(out).eval()
    assert float(model.logit_bias.detach()) != -10.0  # it trained
    client = tmp_path / "client"
    client.mkdir()
    expected = expected_logits(model, LightCLIPProcessor.from_pretrained(out), photo_paths, out)
    result = _run_client(sys.executable, out, photo_paths, client)
    torch.testing.assert_close(torch.tensor(result["logits_per_image"]), torch.tensor(expected["logits_per_image"]),
                               atol=1e-5, rtol=1e-5)
    report = onnx_main([str(out), "--out", str(tmp_path / "onnx")])
    assert report["logit_bias"] == pytest.approx(float(model.logit_bias.detach()))
