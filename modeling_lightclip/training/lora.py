"""LoRA fine-tuning of a trained LightCLIP model with `peft` (training side; not remote code).

The adapters train on new data; the saved result is merged back into a plain `LightCLIPModel` (same keys, same
shapes as the original), so it loads and runs without peft, as remote code or through the zero-shot pipeline.
"""


def apply_lora(model, r: int, alpha: float | None = None, dropout: float = 0.0, target_modules: str = "all-linear"):
    """Wrap `model` in a `PeftModel` with LoRA adapters of rank `r` on `target_modules` (comma-separated module
    names or peft's "all-linear"). Everything but the adapters is frozen."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")
                                                                      if t.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                        target_modules=targets,
                        # the training-only heads stay out of the adapters: they are not shipped for inference
                        exclude_modules=r".*objectives.*")
    return get_peft_model(model, config)


def merge_lora(peft_model):
    """Fold the adapters into the weights; returns the plain `LightCLIPModel`."""
    return peft_model.merge_and_unload()


__all__ = ["apply_lora", "merge_lora"]
