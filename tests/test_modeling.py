import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel
from transformers.models.clip.modeling_clip import image_text_contrastive_loss as clip_loss

from conftest import make_batch
from modeling_lightclip import LightCLIPModel


TEXT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32}
CLIP_TEXT = {"model_type": "clip_text_model", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 32}
# One tiny tower of every family the recipes use, plus the other backbones the config accepts.
VISION = {
    "resnet": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1],
               "layer_type": "basic"},
    "mobilenet_v2": {"model_type": "mobilenet_v2", "depth_multiplier": 0.35, "image_size": 64},
    "efficientnet": {"model_type": "efficientnet", "width_coefficient": 0.25, "depth_coefficient": 0.25,
                     "image_size": 64, "hidden_dim": 320},
    "vit": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 64, "patch_size": 16},
    "clip_vision_model": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "intermediate_size": 64, "image_size": 64, "patch_size": 16},
    "mobilevit": {"model_type": "mobilevit", "image_size": 64, "hidden_sizes": [32, 40, 48],
                  "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]},
    "convnext": {"model_type": "convnext", "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
}


def _tiny(vision, tokenizer, text=TEXT, **kwargs):
    from modeling_lightclip.training.recipes import build_model_config

    torch.manual_seed(0)
    config = build_model_config({"image_size": 64, "projection_dim": 16, "vision_config": VISION[vision],
                                 "text_config": dict(text), **kwargs}, tokenizer)
    return LightCLIPModel(config).eval()


def _oracle_tower_tokens(model, pixel_values):
    """Patch tokens straight from the tower, reshaped by hand: (B,C,H,W) -> (B,HW,C); ViT: drop the CLS token."""
    out = model.vision_model(pixel_values=pixel_values)
    last = out.last_hidden_state
    if last.dim() == 4:
        b, c, h, w = last.shape
        return last.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return last[:, 1:]


@pytest.mark.parametrize("vision", sorted(VISION))
@pytest.mark.parametrize("text", ["bert", "clip_text_model"])
def test_forward_shapes_and_tokens_every_tower_family(vision, text, tokenizer):
    model = _tiny(vision, tokenizer, text=TEXT if text == "bert" else CLIP_TEXT)
    batch = make_batch(tokenizer, batch_size=3, image_size=64)
    with torch.no_grad():
        out = model(**batch, return_loss=True, output_tokens=True)
    assert out.logits_per_image.shape == (3, 3) and out.logits_per_text.shape == (3, 3)
    assert torch.equal(out.logits_per_image, out.logits_per_text.t())
    assert out.image_embeds.shape == (3, 16) and out.text_embeds.shape == (3, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(3))
    assert torch.isfinite(out.loss)
    with torch.no_grad():
        expected_tokens = _oracle_tower_tokens(model, batch["pixel_values"])
    torch.testing.assert_close(out.image_tokens, expected_tokens)
    assert out.image_tokens.shape[1] == model.vision_shapes.num_tokens
    assert out.text_tokens.shape[:2] == batch["input_ids"].shape
    # word mask excludes [CLS], [SEP] and padding
    specials = torch.isin(batch["input_ids"], torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id,
                                                            tokenizer.pad_token_id]))
    assert torch.equal(out.text_word_mask, batch["attention_mask"].bool() & ~specials)


def test_loss_equals_independent_clip_loss(tiny_recipe, tokenizer):
    """alpha = 0 and no extra objectives: the standard CLIP loss."""
    from modeling_lightclip.training.recipes import build_model_config

    config = build_model_config(tiny_recipe["model"], tokenizer, soft_label_mode="similarity", soft_label_max=0.5,
                                token_loss_weight=0.0, mlm_loss_weight=0.0)
    model = LightCLIPModel(config).train()
    model.set_training_progress(0.0)  # alpha_0 = 0
    batch = make_batch(tokenizer, batch_size=6)
    out = model(**batch, return_loss=True)
    torch.testing.assert_close(out.loss, clip_loss(out.logits_per_text))
    # and by hand: mean of the two cross-entropies against the diagonal
    labels = torch.arange(6)
    by_hand = 0.5 * (F.cross_entropy(out.logits_per_image, labels) + F.cross_entropy(out.logits_per_text, labels))
    torch.testing.assert_close(out.loss, by_hand)
    assert set(out.losses) == {"instance"}


def test_features_match_forward_embeddings(tiny_model, tokenizer):
    batch = make_batch(tokenizer, batch_size=4)
    with torch.no_grad():
        out = tiny_model(**batch)
        image = tiny_model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = tiny_model.get_text_features(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).pooler_output
    torch.testing.assert_close(F.normalize(image, dim=-1), out.image_embeds)
    torch.testing.assert_close(F.normalize(text, dim=-1), out.text_embeds)
    torch.testing.assert_close(out.logits_per_text, tiny_model.logit_scale.exp() * out.text_embeds @ out.image_embeds.t())


def test_mean_text_pooling_ignores_padding(tiny_model, tokenizer):
    """A caption's embedding does not change when the batch pads it further."""
    short = tokenizer(["a tabby cat"], return_tensors="pt")
    padded = tokenizer(["a tabby cat", "a very long caption " * 20], padding=True, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        a = tiny_model.get_text_features(**short).pooler_output
        b = tiny_model.get_text_features(input_ids=padded["input_ids"][:1],
                                         attention_mask=padded["attention_mask"][:1]).pooler_output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_save_load_gives_identical_outputs(tiny_model, tokenizer, tmp_path):
    batch = make_batch(tokenizer, batch_size=4)
    with torch.no_grad():
        before = tiny_model(**batch)
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = LightCLIPModel.from_pretrained(tmp_path).eval()
    via_auto = AutoModel.from_pretrained(tmp_path).eval()
    assert type(via_auto) is LightCLIPModel
    with torch.no_grad():
        for model in (loaded, via_auto):
            after = model(**batch)
            assert torch.equal(before.logits_per_image, after.logits_per_image)
            assert torch.equal(before.image_embeds, after.image_embeds)


def test_inference_path_is_towers_and_projections_only(tiny_model, tokenizer):
    """Every parameter the inference forward touches belongs to a tower, a projection or the logit scale."""
    batch = make_batch(tokenizer, batch_size=2)
    tiny_model.zero_grad()
    out = tiny_model(**batch)
    out.logits_per_image.sum().backward()
    used = {n.split(".")[0] for n, p in tiny_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert used <= {"vision_model", "text_model", "visual_projection", "text_projection", "logit_scale"}
    assert {"vision_model", "text_model", "visual_projection", "text_projection"} <= used


def test_logit_scale_clamp(tiny_model):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(10.0)
    tiny_model.clamp_logit_scale_()
    assert tiny_model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_from_vision_text_pretrained(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    vision = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    text = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False)
    vision.save_pretrained(tmp_path / "v")
    text.save_pretrained(tmp_path / "t")
    model = LightCLIPModel.from_vision_text_pretrained(str(tmp_path / "v"), str(tmp_path / "t"), projection_dim=8,
                                                       image_size=32, mask_token_id=tokenizer.mask_token_id)
    for name, param in vision.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[name], param)
    for name, param in text.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], param)
    out = model(**make_batch(tokenizer, batch_size=2, image_size=32))
    assert out.image_embeds.shape == (2, 8)

    # one tower pretrained, the other from scratch from its config; LightCLIPConfig fields named vision_*/text_*
    # (pooling, token stage) stay config fields instead of going to the tower's from_pretrained
    scratch = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    model = LightCLIPModel.from_vision_text_pretrained(None, str(tmp_path / "t"), vision_config=scratch,
                                                       projection_dim=8, image_size=32, vision_pooling="mean",
                                                       text_pooling="cls", vision_token_stage=-2)
    assert (model.config.vision_pooling, model.config.text_pooling, model.config.vision_token_stage) == ("mean", "cls", -2)
    assert model.config.vision_config.hidden_sizes == [8, 16]
    for name, param in text.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], param)
    with pytest.raises(ValueError, match="no vision tower"):
        LightCLIPModel.from_vision_text_pretrained(None, str(tmp_path / "t"))


def test_overlong_caption_fails_with_a_clear_message(tiny_model, tokenizer):
    ids = torch.full((1, 100), tokenizer.cls_token_id)
    with pytest.raises(ValueError, match="truncat"):
        tiny_model.get_text_features(input_ids=ids)


def test_mlm_without_a_mask_token_fails_at_start(tiny_recipe, tokenizer):
    from modeling_lightclip.training.recipes import build_model_config

    config = build_model_config(tiny_recipe["model"], tokenizer)
    config.mask_token_id = None
    with pytest.raises(ValueError, match="needs a mask token"):
        LightCLIPModel(config)


def test_a_vit_recipe_at_another_size_builds_its_tower_for_it(tokenizer):
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config, load_recipe

    config = build_model_config(load_recipe("vit_xs")["model"], tokenizer, image_size=32)
    assert config.vision_config.image_size == 32
    model = LightCLIPModel(config)
    assert model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output.shape == (1, 256)
    with pytest.raises(ValueError, match="smaller than one 16-pixel patch"):
        build_model_config(load_recipe("vit_xs")["model"], tokenizer, image_size=8)


def test_a_size_a_vit_tower_was_not_built_for_is_one_message(tokenizer):
    from modeling_lightclip import LightCLIPConfig, LightCLIPModel
    from modeling_lightclip.training.recipes import load_recipe

    fields = dict(load_recipe("vit_xs")["model"], image_size=64)   # tower config still says 224
    with pytest.raises(ValueError, match="image_size=64 \\(--image_size\\) does not fit the clip_vision_model"):
        LightCLIPModel(LightCLIPConfig(**fields))
