import pytest
import torch

from conftest import make_batch
from modeling_lightclip import LightCLIPModel
from modeling_lightclip.training.recipes import build_model_config, check_tokenizer_fits, list_recipes, load_recipe


EXPECTED = {"tiny", "resnet18", "mobilenetv2", "efficientnet_b0", "vit_xs"}


def test_recipe_list():
    assert EXPECTED <= set(list_recipes())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_recipe_builds_and_runs(name, tokenizer):
    recipe = load_recipe(name)
    config = build_model_config(recipe["model"], tokenizer)
    assert config.text_config.num_hidden_layers <= 6  # shortened text encoder
    assert config.text_config.vocab_size == len(tokenizer)
    torch.manual_seed(0)
    model = LightCLIPModel(config).eval()
    batch = make_batch(tokenizer, batch_size=2, image_size=config.image_size)
    with torch.no_grad():
        out = model(**batch, return_loss=True)
    assert out.logits_per_image.shape == (2, 2) and torch.isfinite(out.loss)
    # a freshly built tower must not be silent (EfficientNet's own init would make it so)
    assert out.image_embeds.abs().sum() > 0
    assert torch.isfinite(out.image_embeds).all()


def test_vit_xs_is_clip_shaped(tokenizer):
    config = build_model_config(load_recipe("vit_xs")["model"], tokenizer)
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.model_type == "clip_text_model"
    # CLIP's text tower pools at the end-of-text token: ours is [SEP]
    assert config.text_config.eos_token_id == tokenizer.sep_token_id


def test_overrides_beat_the_recipe(tokenizer):
    config = build_model_config(load_recipe("tiny")["model"], tokenizer, projection_dim=12, soft_label_mode="none")
    assert config.projection_dim == 12 and config.soft_label_mode == "none"


def test_tokenizer_that_does_not_fit_is_refused(tokenizer):
    from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer

    config = build_model_config(load_recipe("tiny")["model"], tokenizer)
    bigger = train_wordpiece_tokenizer([f"word{i} token{i}" for i in range(400)], vocab_size=2000)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the text tower embeds only"):
        check_tokenizer_fits(config, bigger)


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="known recipes: .*tiny"):
        load_recipe("does_not_exist")
