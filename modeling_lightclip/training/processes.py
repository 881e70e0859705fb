"""The processes of a launch (training side): accelerate's view of `torchrun` / `accelerate launch`."""

import torch


def process_state():
    """accelerate's `PartialState` for this launch: on a machine without CUDA, CPU processes joined over gloo
    (accelerate treats a CPU launch as several processes only when asked for the CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def end_processes() -> None:
    """Leave a launch cleanly, once its work is done: the processes wait for one another, then the process group is
    destroyed while the interpreter is still whole. (Left to the interpreter's exit, gloo can destroy a worker thread
    that is still joinable and abort the process: "terminate called without an active exception".) Nothing to do in
    a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def unwrap_model(model):
    """The LightCLIPModel inside DDP/DeepSpeed/compile wrappers (accelerate's unwrapping) and a peft wrapper."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


__all__ = ["end_processes", "process_state", "unwrap_model"]
