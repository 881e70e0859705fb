"""Shared fixtures: a tokenizer trained on real-looking captions, tiny LightCLIP models, real photos."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


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



def tiny_train_argv(out: Path, *flags) -> list[str]:
    """train_lightclip's flags for two steps of the tiny recipe into `out`, then `flags`."""
    return ["--recipe", "tiny", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
            "--max_steps", "2", "--logging_steps", "1", "--dataloader_num_workers", "0", "--output_dir", str(out),
            *flags]


def run_cli(argv, capsys) -> tuple[int, str]:
    """train_lightclip's command line: (exit code, what it wrote to stderr)."""
    import train_lightclip

    code = train_lightclip.cli(argv)
    return code, capsys.readouterr().err


def image_files(folder: Path, n: int, bad: set = frozenset()) -> list[str]:
    """`n` distinct 40-px PNGs (a photo shifted by a few pixels each) written into `folder`, named img0.png...; the
    ones whose index is in `bad` are files of bytes that are no image."""
    import numpy as np
    from PIL import Image

    photo = np.asarray(Image.open(FIXTURES / "astronaut.jpg").convert("RGB").resize((40, 40)))
    names = []
    for i in range(n):
        name = f"img{i}.png"
        if i in bad:
            (folder / name).write_bytes(b"not an image at all")
        else:
            Image.fromarray(np.roll(photo, 3 * i, axis=1)).save(folder / name)
        names.append(name)
    return names


def saved_tokenizer(folder: Path) -> Path:
    """A small WordPiece tokenizer trained on CAPTIONS, saved into folder/tokenizer."""
    from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer

    path = folder / "tokenizer"
    train_wordpiece_tokenizer(CAPTIONS * 4, vocab_size=300, model_max_length=32).save_pretrained(path)
    return path


def neighbours_folder(folder: Path, rows: int = 64, k: int = 4) -> Path:
    """A folder as `neighbours build` writes it for `rows` training rows: random unit features (6-d image, 4-d
    text) and k random neighbours each, never the row itself."""
    import numpy as np

    from modeling_lightclip.training.neighbours import FILES

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for modality, dim in (("image", 6), ("text", 4)):
        table = np.stack([rng.permutation(np.delete(np.arange(rows), i))[:k] for i in range(rows)])
        np.save(folder / FILES[f"{modality}_neighbours"], table)
        features = rng.normal(size=(rows, dim)).astype("float32")
        np.save(folder / FILES[f"{modality}_features"], features / np.linalg.norm(features, axis=1, keepdims=True))
    return folder

# the objectives' settings of all_objectives_model_and_batch's variants
PAPER = {"soft_label_source": "student", "soft_label_modality": "candidates", "ping_positives": "bank"}
REDESIGN = {"soft_label_source": "frozen", "soft_label_modality": "both", "ping_positives": "in_batch",
            "relation_loss_weight": 0.5, "distill_loss_weight": 0.5, "distill_temperature": 2.0,
            "distill_teacher_logit_scale": 50.0, "distill_ensemble": "mean_probabilities",
            "distill_teacher_dims": [6, 4], "distill_teacher_logit_scales": [50.0, 20.0],
            "feature_distill_loss_weight": 0.5, "feature_distill_teacher_dims": [12, 6]}
SIGMOID = {"instance_loss": "sigmoid", "soft_label_mode": "none", "distill_teacher_logit_bias": -4.0,
           "distill_ensemble": "concatenate"}


def all_objectives_model_and_batch(tokenizer, variant: str = "paper"):
    """CLIP-vision + BERT (no BatchNorm, no dropout: both would make 1 vs 2 processes differ by design), all
    objectives on (CLIP-PING too, with a pre-filled bank), soft labels at full strength, fusion gates open so
    every parameter gets a gradient. `variant="redesign"`: soft labels from frozen-encoder features (gathered across
    ranks), relation distillation, cross-modal distillation from a teacher's embeddings and CLIP-PING with in-batch
    neighbours instead of the bank. `variant="sigmoid"`: the redesign with the sigmoid instance loss and sigmoid
    distillation (no soft labels: they are a softmax's)."""
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config

    config = build_model_config({**(PAPER if variant == "paper" else REDESIGN),
        "image_size": 32, "projection_dim": 16, "token_projection_dim": 16, "fusion_num_heads": 2,
        "soft_label_mode": "similarity", "soft_label_max": 0.3, "soft_label_schedule": "constant",
        "token_loss_weight": 0.5, "token_negatives": "batch", "mlm_loss_weight": 0.5, "mlm_probability": 0.3,
        "mlm_batch_fraction": 1.0,
        "ping_nn_loss_weight": 0.5, "ping_xnn_loss_weight": 0.5, "ping_bank_size": 16,
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
        "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 64, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0},
        **(SIGMOID if variant == "sigmoid" else {}),
    }, tokenizer)
    torch.manual_seed(0)
    model = LightCLIPModel(config)
    if model.objectives.mlm is not None:
        with torch.no_grad():
            for block in model.objectives.mlm.fusion:
                block.attention_gate.fill_(0.5)
    generator = torch.Generator().manual_seed(1)
    # captions of different lengths so that the two ranks pad differently
    texts = [CAPTIONS[i % len(CAPTIONS)] + (" with a hat" * (i % 3)) for i in range(8)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    mlm_input_ids, mlm_labels = model.mask_for_mlm(enc["input_ids"], enc["attention_mask"], generator)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "pixel_values": torch.randn(8, 3, 32, 32, generator=generator),
             "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels,
             # CLIP-PING: this batch is samples 0..7; neighbours among 0..15, some unseen (8, 9) or none (-1)
             "sample_ids": torch.arange(8),
             "image_neighbour_ids": torch.tensor([12, 9, 3, 15, -1, 10, 0, 13]),
             "text_neighbour_ids": torch.tensor([14, 11, 8, 2, 12, -1, 15, 5])}
    bank = {"image": F.normalize(torch.randn(16, 16, generator=generator), dim=-1),
            "text": F.normalize(torch.randn(16, 16, generator=generator), dim=-1),
            "valid": torch.arange(16) >= 10}
    bank["valid"][[0, 2, 3, 5]] = True
    if variant != "paper":
        for key in ("sample_ids", "image_neighbour_ids", "text_neighbour_ids"):
            batch.pop(key)
        batch["teacher_image_features"] = F.normalize(torch.randn(8, 12, generator=generator), dim=-1)
        batch["teacher_text_features"] = F.normalize(torch.randn(8, 6, generator=generator), dim=-1)
        batch["teacher_image_embeds"] = F.normalize(torch.randn(8, 10, generator=generator), dim=-1)
        batch["teacher_text_embeds"] = F.normalize(torch.randn(8, 10, generator=generator), dim=-1)
        batch["ping_partner_rows"] = torch.tensor([1, 0, 3, 2, 5, 4, -1, -1])  # pairs never straddle two ranks
        batch["ping_partner_spaces"] = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])
        return model, batch, None
    if model.objectives.ping is None:
        return model, batch, None
    model.objectives.ping.bank.load_state_dict({k: v.clone() for k, v in bank.items()})
    return model, batch, bank


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
