"""LightCLIP / CLIP-PING training objectives, each an `nn.Module` returning a dict of named loss terms.

Saved beside the weights as remote code: top-level imports are torch and transformers only. Anything a
training-only path needs beyond that (scipy's Hungarian solver, torch-linear-assignment) is imported lazily
inside the function that uses it.

Objectives
----------
* `InstanceContrastiveLoss` - symmetric InfoNCE over the *global* batch with LightCLIP's progressively
  softened labels.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather `tensor` along dim 0 from every rank, keeping autograd.

    The backward of the functional collective sums the gradient of the gathered tensor back onto each rank's
    shard. With each rank computing the loss of its local rows against the global columns, and DDP averaging
    parameter gradients, the result equals the gradient of one process holding the whole batch.
    """
    rank, world = _world()
    if world == 1:
        return tensor
    from torch.distributed import _functional_collectives as fc

    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    if len({int(s.item()) for s in sizes}) != 1:
        raise ValueError(
            f"global-batch contrastive loss needs the same batch size on every rank, got {[int(s) for s in sizes]}; "
            "drop the last partial batch (TrainingArguments(dataloader_drop_last=True))."
        )
    gathered = fc.all_gather_single_autograd(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)
    return fc.wait_tensor(gathered) if hasattr(fc, "wait_tensor") else gathered


# --------------------------------------------------------------------------------------------------------------
# instance level
# --------------------------------------------------------------------------------------------------------------


def soft_label_alpha(progress: float, alpha_max: float, schedule: str) -> float:
    """Softening weight alpha_t at training progress `progress` in [0, 1]: rises from 0 to `alpha_max`."""
    p = min(max(float(progress), 0.0), 1.0)
    if schedule == "constant":
        return alpha_max
    if schedule == "linear":
        return alpha_max * p
    if schedule == "cosine":
        return alpha_max * 0.5 * (1.0 - math.cos(math.pi * p))
    if schedule == "step":
        return alpha_max if p >= 0.5 else 0.0
    raise ValueError(f"unknown soft_label_schedule {schedule!r}")


def soft_targets(
    anchor_similarity: torch.Tensor | None, positives: torch.Tensor, num_columns: int, alpha: float, mode: str,
    temperature: float,
) -> torch.Tensor:
    """Targets (1 - alpha) * one-hot + alpha * q, with q spread over the negatives of each row.

    Args:
        anchor_similarity: (rows, columns) detached intra-modal similarity between each row's positive and every
            column ("similarity" mode); ignored in "uniform" mode.
        positives: (rows,) column index of each row's positive.
        num_columns: number of candidate columns (global batch size).
        alpha: softening weight; 0 gives one-hot targets.
        mode: "none", "uniform" or "similarity".
        temperature: softmax temperature over `anchor_similarity`.
    """
    rows = positives.shape[0]
    device = positives.device
    one_hot = F.one_hot(positives, num_columns).float()
    if mode == "none" or alpha <= 0.0 or num_columns < 2:
        return one_hot
    positive_mask = one_hot.bool()
    if mode == "uniform":
        q = torch.full((rows, num_columns), 1.0 / (num_columns - 1), device=device)
    elif mode == "similarity":
        logits = anchor_similarity.float() / temperature
        q = logits.masked_fill(positive_mask, float("-inf")).softmax(dim=-1)
    else:
        raise ValueError(f"unknown soft_label_mode {mode!r}")
    q = q.masked_fill(positive_mask, 0.0)
    return (1.0 - alpha) * one_hot + alpha * q


class InstanceContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the global batch with progressively softened labels (LightCLIP, instance level).

    Each rank scores its local rows against the columns of every rank (gathered with autograd); targets of local
    row i point at global column `rank * B + i`. With `alpha > 0`, a share `alpha` of each row's target mass moves
    from the positive onto the negatives:

    * ``"uniform"``: evenly over the negatives (label smoothing restricted to negatives);
    * ``"similarity"``: by a softmax over the *detached* intra-modal similarity between the row's positive and each
      negative, measured in the candidates' modality (image->text rows use text-text similarity, text->image rows
      image-image similarity). Negatives that look like the positive are the likeliest false negatives of web
      captions, so they receive most of the mass. The similarity is detached so the targets never pull the
      encoders toward making everything alike.
    """

    def __init__(self, soft_label_mode: str = "none", soft_label_temperature: float = 0.1):
        super().__init__()
        self.soft_label_mode = soft_label_mode
        self.soft_label_temperature = soft_label_temperature

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, alpha: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """`image_embeds`, `text_embeds`: (B, D) L2-normalised local embeddings; `logit_scale`: the exp'ed scale."""
        rank, _ = _world()
        all_images = gather_with_grad(image_embeds)
        all_texts = gather_with_grad(text_embeds)
        local = image_embeds.shape[0]
        positives = torch.arange(local, device=image_embeds.device) + rank * local
        logits_i2t = logit_scale * image_embeds @ all_texts.t()
        logits_t2i = logit_scale * text_embeds @ all_images.t()
        num_columns = all_texts.shape[0]
        if self.soft_label_mode == "none" or alpha <= 0.0:
            loss_i2t = F.cross_entropy(logits_i2t, positives)
            loss_t2i = F.cross_entropy(logits_t2i, positives)
        else:
            with torch.no_grad():
                text_sim = text_embeds.detach() @ all_texts.detach().t() if self.soft_label_mode == "similarity" else None
                image_sim = image_embeds.detach() @ all_images.detach().t() if self.soft_label_mode == "similarity" else None
                targets_i2t = soft_targets(text_sim, positives, num_columns, alpha, self.soft_label_mode,
                                           self.soft_label_temperature)
                targets_t2i = soft_targets(image_sim, positives, num_columns, alpha, self.soft_label_mode,
                                           self.soft_label_temperature)
            loss_i2t = F.cross_entropy(logits_i2t, targets_i2t)
            loss_t2i = F.cross_entropy(logits_t2i, targets_t2i)
        return {"instance": 0.5 * (loss_i2t + loss_t2i)}


__all__ = ["InstanceContrastiveLoss", "gather_with_grad", "soft_label_alpha", "soft_targets"]
