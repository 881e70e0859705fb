import json

import pytest
from transformers import AutoConfig, CLIPTextConfig, ResNetConfig

from modeling_lightclip import LightCLIPConfig


TOWERS = {
    "resnet": {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
    "vit": {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    "clip_vision_model": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
}


@pytest.mark.parametrize("vision", sorted(TOWERS))
def test_round_trip_dict_and_disk(vision, tmp_path):
    config = LightCLIPConfig(vision_config=TOWERS[vision],
                             text_config={"model_type": "clip_text_model", "hidden_size": 32, "num_hidden_layers": 3,
                                          "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 99},
                             projection_dim=24, soft_label_mode="uniform", token_loss_weight=0.25)
    as_dict = config.to_dict()
    json.dumps(as_dict)  # serialisable
    again = LightCLIPConfig.from_dict(as_dict)
    assert again.to_dict() == as_dict
    assert again.vision_config.model_type == vision
    assert again.text_config.vocab_size == 99 and again.projection_dim == 24

    config.save_pretrained(tmp_path)
    loaded = LightCLIPConfig.from_pretrained(tmp_path).to_dict()
    # saving as remote code records where the config class lives
    assert loaded.pop("auto_map") == {"AutoConfig": "configuration_lightclip.LightCLIPConfig"}
    loaded.pop("_name_or_path"), as_dict.pop("_name_or_path")
    assert loaded == as_dict
    # AutoConfig resolves our model_type once the package is imported
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "LightCLIPConfig"


def test_config_objects_accepted_as_sub_configs():
    vision = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    text = CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = LightCLIPConfig(vision_config=vision, text_config=text)
    assert config.vision_config is vision and config.text_config is text
    assert config.to_dict()["vision_config"]["model_type"] == "resnet"


def test_defaults_fill_fusion_layers_from_text_depth():
    config = LightCLIPConfig(text_config={"model_type": "bert", "num_hidden_layers": 6, "hidden_size": 32,
                                          "num_attention_heads": 2, "intermediate_size": 64})
    assert config.fusion_text_layers == [2, 5]
    assert len(config.fusion_vision_stages) == 2


@pytest.mark.parametrize("bad, message", [
    ({"vision_config": {"hidden_sizes": [8]}}, "has no `model_type`"),
    ({"vision_config": {"model_type": "not_a_model"}}, "Unknown vision tower type"),
    ({"soft_label_mode": "sharp"}, "soft_label_mode"),
    ({"soft_label_schedule": "exp"}, "soft_label_schedule"),
    ({"soft_label_max": 1.5}, "soft_label_max"),
    ({"token_loss_weight": -1.0}, "cannot be negative"),
    ({"fusion_text_layers": [0], "fusion_vision_stages": [-2, -1]}, "same length"),
    ({"fusion_text_layers": [0, 9], "fusion_vision_stages": [-2, -1]}, "out of range"),
])
def test_invalid_fields_fail_with_a_named_message(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LightCLIPConfig(**bad)


def test_every_config_field_belongs_to_the_model_or_to_one_objective():
    """Each objective owns its config group: the config's own dataclass fields are split, with nothing left over and
    nothing claimed twice, between the model's fields and the objectives' groups (alternatives of one objective,
    such as CLIP-PING's two forms, share one group); each objective's weights are in its group."""
    import dataclasses

    from modeling_lightclip.objectives_lightclip import OBJECTIVES

    groups = {}
    for objective in OBJECTIVES:
        groups.setdefault(objective.config_fields, []).append(objective.__name__)
        assert set(objective.weights.values()) <= set(objective.config_fields), objective.__name__
    claimed = [name for group in groups for name in group] + list(LightCLIPConfig.model_fields)
    declared = [f.name for f in dataclasses.fields(LightCLIPConfig) if f.name in LightCLIPConfig.__annotations__]
    assert sorted(claimed) == sorted(declared)
