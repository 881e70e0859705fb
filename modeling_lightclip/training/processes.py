"""The processes of a launch (training side): accelerate's view of `torchrun` / `accelerate launch`."""

import torch


def process_state():
    """accelerate's `PartialState` for this launch: on a machine without CUDA, CPU processes joined over gloo
    (accelerate treats a CPU launch as several processes only when asked for the CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


__all__ = ["process_state"]
