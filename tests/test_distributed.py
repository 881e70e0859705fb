"""2 CPU processes (torchrun, gloo) vs 1 process on the same global batch: loss and every gradient equal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import all_objectives_model_and_batch


WORKER = Path(__file__).parent / "distributed_worker.py"


@pytest.mark.parametrize("variant, micro, split", [
    ("paper", None, None), ("redesign", None, None), ("paper", 3, None), ("sigmoid", 3, None),
    # a bad sample skipped on one process leaves the ranks unequal: the global batch is still their concatenation
    ("paper", None, "2,6"), ("redesign", 3, "6,2"), ("sigmoid", None, "2,6"),
    # every objective scored 3 rows at a time against the global batch; the rank with 2 rows runs an empty second
    # block beside the other's (the bank's read and write, the matching and the counts once, by the first block)
    ("paper", 3, "2,6"), ("sigmoid", 3, "6,2")])
def test_two_processes_equal_one_process(tokenizer, tmp_path, variant, micro, split):
    """`micro`: each process computes its rows 3 at a time (contrastive accumulation, micro-batches of 3 and 1).
    `split`: each process's number of rows, when they differ."""
    model, batch, bank = all_objectives_model_and_batch(tokenizer, variant)
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
         str(tmp_path / "model"), str(tmp_path / "batch.pt"), str(tmp_path / "grads.safetensors"),
         str(micro) if micro else "-", *([split] if split else [])],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = load_file(str(tmp_path / "grads.safetensors"))

    torch.testing.assert_close(result["loss"], out.loss.detach(), atol=1e-5, rtol=1e-5)
    for name in out.losses:
        torch.testing.assert_close(result[f"term.{name}"], out.losses[name].detach(), atol=1e-5, rtol=1e-5)
    # the ranks' row counts are gathered once for the objectives' call (and once where the model places its rows),
    # not once per gathered tensor (18-23 times per step for these variants before)
    assert int(result["row_count_gathers"]) <= 2, int(result["row_count_gathers"])
    assert {k[len("grad."):] for k in result if k.startswith("grad.")} == set(reference)
    for name, grad in reference.items():
        torch.testing.assert_close(result[f"grad.{name}"], grad, atol=1e-5, rtol=1e-4, msg=name)
    if bank is None:
        return
    # every rank's bank now holds the whole global batch, identically
    assert result["bank_equal_across_ranks"].item() == 1
    assert torch.equal(result["bank_valid"], model.objectives.ping.bank.valid)
    torch.testing.assert_close(result["bank_text"], model.objectives.ping.bank.text, atol=1e-6, rtol=1e-5)
