"""The optimiser's parameter groups (training side): weight decay on matrices only, each tower at its own learning
rate, locked parameters left out."""

import torch


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Weight decay on matrices and kernels only (ndim >= 2): biases, LayerNorm/BatchNorm/GroupNorm weights,
    scalar gates, the logit scale and bias are all 1-D or 0-D and stay undecayed."""
    return [name for name, param in model.named_parameters()
            if param.ndim >= 2 and "logit_scale" not in name and "logit_bias" not in name]


def tower_of(name: str) -> str:
    """Which learning-rate group a parameter name belongs to: `vision`, `text` or `other`."""
    for prefix, side in (("vision_model.", "vision"), ("text_model.", "text")):
        if name.startswith(prefix) or f".{prefix}" in name:  # also under a peft / compile wrapper's prefix
            return side
    return "other"


def optimizer_param_groups(model: torch.nn.Module, decay_names, args) -> list[dict]:
    """The trainable parameters in up to six named groups, (vision | text | other) x (decay | no_decay): each tower at
    its learning rate (`args.vision_learning_rate` / `args.text_learning_rate`, default `args.learning_rate`), decay
    `args.weight_decay` on `decay_names`. Parameters without a gradient (locked) are left out."""
    decay_names = set(decay_names)
    rates = {"vision": getattr(args, "vision_learning_rate", None), "text": getattr(args, "text_learning_rate", None)}
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        side, decays = tower_of(name), name in decay_names
        key = (side, decays)
        if key not in groups:
            groups[key] = {"name": f"{side}_{'decay' if decays else 'no_decay'}", "params": [],
                           "weight_decay": args.weight_decay if decays else 0.0,
                           "lr": rates.get(side) if rates.get(side) is not None else args.learning_rate}
        groups[key]["params"].append(param)
    return list(groups.values())


__all__ = ["decay_parameter_names", "optimizer_param_groups", "tower_of"]
