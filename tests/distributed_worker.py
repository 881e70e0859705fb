"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU).

Each rank loads the same saved model and the same global batch, keeps its own contiguous slice (re-padded to its
own longest caption, as a per-rank collator would), trains one step under DDP and reports the global loss and
every parameter's gradient (rank 0 writes them).
"""

import faulthandler
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from modeling_lightclip import LightCLIPModel


def main(model_dir: str, batch_path: str, out_path: str) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a hang shows its stacks and fails instead of blocking CI
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = LightCLIPModel.from_pretrained(model_dir).train()
    model.set_training_progress(1.0)
    batch = torch.load(batch_path, weights_only=True)
    size = batch["input_ids"].shape[0] // world
    local = {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}
    length = int(local["attention_mask"].sum(1).max())
    for key in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"):
        local[key] = local[key][:, :length]
    ddp = DistributedDataParallel(model)
    out = ddp(**local, return_loss=True)
    out.loss.backward()
    terms = torch.stack([out.loss.detach()] + [out.losses[k].detach() for k in sorted(out.losses)])
    dist.all_reduce(terms)
    terms /= world
    if rank == 0:
        tensors = {f"grad.{n}": p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}
        tensors["loss"] = terms[0]
        for i, k in enumerate(sorted(out.losses)):
            tensors[f"term.{k}"] = terms[i + 1]
        save_file(tensors, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
