"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank loads the same saved model and the same global batch, keeps its own contiguous slice (re-padded to its
own longest caption, as a per-rank collator would), trains one step under DDP and reports the global loss and
every parameter's gradient (rank 0 writes them). With a fourth argument, MICRO ("-" for none): the step is computed
MICRO rows at a time by contrastive accumulation. With a fifth, SPLIT ("2,6"): each rank's number of rows, as when a
bad sample was skipped on one of them (default: equal shares). Also reports how many times the step gathered the
ranks' row counts.
"""

import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from modeling_lightclip import LightCLIPModel


def main(model_dir: str, batch_path: str, out_path: str, micro: str | None = None, split: str | None = None) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hang shows its stacks and fails instead of blocking CI
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LightCLIPModel.from_pretrained(model_dir).train()
    model.set_training_progress(1.0)
    bank = getattr(model.objectives.ping, "bank", None)
    if bank is not None:
        bank.load_state_dict(torch.load(Path(batch_path).with_name("bank.pt"), weights_only=True))
    batch = torch.load(batch_path, weights_only=True)
    rows_of = ([int(n) for n in split.split(",")] if split else [batch["input_ids"].shape[0] // world] * world)
    start = sum(rows_of[:rank])
    local = {k: v[start:start + rows_of[rank]] for k, v in batch.items()}  # sample ids travel with the rows
    if "ping_partner_rows" in local:  # in-batch partners are local row indices
        rows = local["ping_partner_rows"]
        local["ping_partner_rows"] = torch.where(rows >= 0, rows - start, rows)
    length = int(local["attention_mask"].sum(1).max())
    for key in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        local[key] = local[key][:, :length]
    ddp = DistributedDataParallel(model)
    row_count_gathers = _count_row_count_gathers()
    if micro in (None, "-"):
        out = ddp(**local, return_loss=True)
        out.loss.backward()
        loss, losses = out.loss, out.losses
    else:
        from modeling_lightclip.objectives_lightclip import training_targets_from
        from modeling_lightclip.training.accumulation import ContrastiveAccumulation

        inputs = {k: v for k, v in local.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        inputs["training_targets"] = training_targets_from(
            {}, {k: v for k, v in local.items() if k not in inputs})
        losses = ContrastiveAccumulation(int(micro)).step(model, inputs, distributed_model=ddp)
        loss = losses.pop("loss")
    terms = torch.stack([loss.detach()] + [losses[k].detach() for k in sorted(losses)])
    dist.all_reduce(terms)
    terms /= world
    if bank is not None:
        mine = torch.cat([bank.image.flatten(), bank.text.flatten(), bank.valid.float()])
        theirs = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(theirs, mine)
    if rank == 0:
        tensors = {f"grad.{n}": p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
        if bank is not None:
            tensors["bank_equal_across_ranks"] = torch.tensor(int(all(torch.equal(t, mine) for t in theirs)))
            tensors["bank_valid"] = bank.valid.clone()
            tensors["bank_text"] = bank.text.clone()
        tensors["loss"] = terms[0]
        tensors["row_count_gathers"] = torch.tensor(row_count_gathers[0])
        for i, k in enumerate(sorted(losses)):
            tensors[f"term.{k}"] = terms[i + 1]
        save_file(tensors, out_path)
    dist.barrier()
    # Every result is written: leave without tearing anything down. destroy_process_group() while the DDP wrapper is
    # alive can wait on a dead communicator (a rare hang at exit), and letting the interpreter's exit destroy the gloo
    # groups can destroy a still-joinable worker thread ("terminate called without an active exception", SIGABRT,
    # seen once in CI). os._exit skips both.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _count_row_count_gathers() -> list:
    """Count, from now on, the all-gathers of one row count (a rank's number of rows: a (1,) long tensor)."""
    count = [0]
    original = dist.all_gather

    def counting(tensors, tensor, *args, **kwargs):
        if tensor.numel() == 1 and tensor.dtype == torch.long:
            count[0] += 1
        return original(tensors, tensor, *args, **kwargs)

    dist.all_gather = counting
    return count


if __name__ == "__main__":
    main(*sys.argv[1:6])
