"""Shared fixtures: a tokenizer trained on real-looking captions, tiny LightCLIP models, real photos."""

import os
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

CAPTIONS = [
    "a photo of an astronaut in a white space suit",
    "a tabby cat lying on a blanket",
    "a red car parked on the street",
    "a black and white photo of a dog running",
    "two people walking on the beach at sunset",
    "a bowl of fruit on a wooden table",
    "an ankle boot made of brown leather",
    "a pullover with long sleeves",
]


@pytest.fixture(scope="session")
def captions():
    return list(CAPTIONS)


@pytest.fixture(scope="session")
def tokenizer():
    from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(CAPTIONS * 4, vocab_size=300, model_max_length=32)


@pytest.fixture(scope="session")
def tiny_recipe():
    from modeling_lightclip.training.recipes import load_recipe

    return load_recipe("tiny")


@pytest.fixture()
def tiny_config(tiny_recipe, tokenizer):
    from modeling_lightclip.training.recipes import build_model_config

    return build_model_config(tiny_recipe["model"], tokenizer)


@pytest.fixture()
def tiny_model(tiny_config):
    from modeling_lightclip import LightCLIPModel

    torch.manual_seed(0)
    return LightCLIPModel(tiny_config).eval()


@pytest.fixture(scope="session")
def photo_paths():
    return [FIXTURES / "astronaut.jpg", FIXTURES / "chelsea_cat.jpg"]


def make_batch(tokenizer, batch_size=4, image_size=32, seed=0, captions=None):
    """Random images + real captions, tokenised with padding."""
    generator = torch.Generator().manual_seed(seed)
    texts = (captions or CAPTIONS)[:batch_size]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    pixel_values = torch.randn(len(texts), 3, image_size, image_size, generator=generator)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": pixel_values}
