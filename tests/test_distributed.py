"""2 CPU processes (torchrun, gloo) vs 1 process on the same global batch: loss and every gradient equal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import CAPTIONS
from modeling_lightclip import LightCLIPModel
from modeling_lightclip.training.recipes import build_model_config


WORKER = Path(__file__).parent / "distributed_worker.py"


PAPER = {"soft_label_source": "student", "soft_label_modality": "candidates", "ping_positives": "bank"}
REDESIGN = {"soft_label_source": "frozen", "soft_label_modality": "both", "ping_positives": "in_batch",
            "relation_loss_weight": 0.5, "distill_loss_weight": 0.5, "distill_temperature": 2.0,
            "distill_teacher_logit_scale": 50.0}


def _model_and_batch(tokenizer, variant: str = "paper"):
    """CLIP-vision + BERT (no BatchNorm, no dropout: both would make 1 vs 2 processes differ by design), all
    objectives on (CLIP-PING too, with a pre-filled bank), soft labels at full strength, fusion gates open so
    every parameter gets a gradient. `variant="redesign"`: soft labels from frozen-encoder features (gathered across
    ranks), relation distillation, cross-modal distillation from a teacher's embeddings and CLIP-PING with in-batch
    neighbours instead of the bank."""
    config = build_model_config({**(REDESIGN if variant == "redesign" else PAPER),
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
    }, tokenizer)
    torch.manual_seed(0)
    model = LightCLIPModel(config)
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
    if variant == "redesign":
        for key in ("sample_ids", "image_neighbour_ids", "text_neighbour_ids"):
            batch.pop(key)
        batch["frozen_image_features"] = F.normalize(torch.randn(8, 12, generator=generator), dim=-1)
        batch["frozen_text_features"] = F.normalize(torch.randn(8, 6, generator=generator), dim=-1)
        batch["teacher_image_embeds"] = F.normalize(torch.randn(8, 10, generator=generator), dim=-1)
        batch["teacher_text_embeds"] = F.normalize(torch.randn(8, 10, generator=generator), dim=-1)
        batch["ping_partner_rows"] = torch.tensor([1, 0, 3, 2, 5, 4, -1, -1])  # pairs never straddle two ranks
        batch["ping_partner_spaces"] = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])
        return model, batch, None
    model.objectives.ping.bank.load_state_dict({k: v.clone() for k, v in bank.items()})
    return model, batch, bank


@pytest.mark.parametrize("variant", ["paper", "redesign"])
def test_two_processes_equal_one_process(tokenizer, tmp_path, variant):
    model, batch, bank = _model_and_batch(tokenizer, variant)
    model.save_pretrained(tmp_path / "model")
    torch.save(batch, tmp_path / "batch.pt")
    if bank is not None:
        torch.save(bank, tmp_path / "bank.pt")

    # reference: one process, the whole batch
    model.train()
    model.set_training_progress(1.0)
    out = model(**batch, return_loss=True)
    out.loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(reference) == len(list(model.parameters())), "every parameter should get a gradient"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         str(tmp_path / "model"), str(tmp_path / "batch.pt"), str(tmp_path / "grads.safetensors")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = load_file(str(tmp_path / "grads.safetensors"))

    torch.testing.assert_close(result["loss"], out.loss.detach(), atol=1e-5, rtol=1e-5)
    for name in out.losses:
        torch.testing.assert_close(result[f"term.{name}"], out.losses[name].detach(), atol=1e-5, rtol=1e-5)
    assert {k[len("grad."):] for k in result if k.startswith("grad.")} == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(result[f"grad.{name}"], grad, atol=1e-5, rtol=1e-4, msg=name)
    if bank is None:
        return
    # every rank's bank now holds the whole global batch, identically
    assert result["bank_equal_across_ranks"].item() == 1
    assert torch.equal(result["bank_valid"], model.objectives.ping.bank.valid)
    torch.testing.assert_close(result["bank_text"], model.objectives.ping.bank.text, atol=1e-6, rtol=1e-5)
