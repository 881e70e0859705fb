"""A LightCLIP model inside LAION's clip_benchmark (`pip install clip-benchmark`): its model type `lightclip`.

    python -m modeling_lightclip.training.clip_benchmark_model eval --model_type lightclip \\
        --pretrained ORG/my-lightclip --dataset wds/imagenet1k --dataset_root "DIR/{dataset_cleaned}" \\
        --output "{dataset_cleaned}_lightclip_{task}.json"

is clip_benchmark's own command line (`clip_benchmark eval ...`, every flag of it) with the model type registered;
`--pretrained` is the saved model (folder or Hub id), `--model` is ignored. From Python, `register()` once and then
use clip_benchmark's API as for any model type. clip_benchmark runs under autocast by default (`--no_amp` for float32).
"""

import torch


class LightCLIPForClipBenchmark(torch.nn.Module):
    """The `encode_image` / `encode_text` interface clip_benchmark's metrics call (OpenCLIP's)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.pad_token_id = model.config.text_config.pad_token_id

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        attention_mask = (input_ids != self.pad_token_id).long()
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class _Transform:
    """One PIL image -> its pixel tensor, as the model's processor prepares it."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, image):
        return self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


class _Tokenizer:
    """Captions -> padded token ids (a LongTensor), as OpenCLIP's tokenizers return them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")["input_ids"]


def load_lightclip(model_name: str = "", pretrained: str = "", cache_dir: str | None = None, device="cpu"):
    """clip_benchmark's loader signature -> (model, transform, tokenizer); `pretrained` is the saved model."""
    from modeling_lightclip import LightCLIPModel, LightCLIPProcessor

    source = pretrained or model_name
    if not source:
        raise ValueError("clip_benchmark --model_type lightclip: give the saved model (folder or Hub id) as "
                         "--pretrained.")
    model = LightCLIPModel.from_pretrained(source, cache_dir=cache_dir).to(device).eval()
    processor = LightCLIPProcessor.from_pretrained(source, cache_dir=cache_dir)
    return LightCLIPForClipBenchmark(model), _Transform(processor.image_processor), _Tokenizer(processor.tokenizer)


def register() -> None:
    """Make `lightclip` one of clip_benchmark's model types (its loader table and the CLI's choices)."""
    try:
        from clip_benchmark import models
    except ImportError:
        raise ImportError("clip_benchmark is not installed: pip install clip-benchmark") from None
    models.TYPE2FUNC["lightclip"] = load_lightclip
    if "lightclip" not in models.MODEL_TYPES:
        models.MODEL_TYPES.append("lightclip")  # the list the CLI's --model_type choices were imported from


def main() -> None:
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    clip_benchmark_main()


__all__ = ["LightCLIPForClipBenchmark", "load_lightclip", "register"]


if __name__ == "__main__":
    main()
