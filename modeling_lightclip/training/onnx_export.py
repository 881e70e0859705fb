"""ONNX export of a trained LightCLIP's two encoders, for edge runtimes (training side; not remote code).

    python -m modeling_lightclip.training.onnx_export RUN_DIR --out DIR
    lightclip-export-onnx RUN_DIR --out DIR --images a.jpg b.jpg --captions "a cat" "a dog"

Writes `image_encoder.onnx` (pixel_values -> image_embeds) and `text_encoder.onnx` (input_ids, attention_mask ->
text_embeds), both with a dynamic batch dimension (and a dynamic caption length), L2-normalised embeddings in the
shared space, plus the processor files (image processor + tokenizer) and the model config, so a runtime needs
nothing else: `cosine = image_embeds @ text_embeds.T`, times `exp(logit_scale)` (in `onnx_export.json`) for
logits. Exported with `torch.onnx.export(dynamo=True)`; then both files are run with onnxruntime on real images
and captions (the embedded Fashion-MNIST validation rows unless `--images` / `--captions` are given) and compared
with PyTorch: the largest absolute difference is reported and must stay within `--tolerance` (1e-4).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling_lightclip import LightCLIPModel
from ..processing_lightclip import LightCLIPProcessor


IMAGE_FILE, TEXT_FILE, REPORT_FILE = "image_encoder.onnx", "text_encoder.onnx", "onnx_export.json"


class ImageEncoder(nn.Module):
    """pixel_values (B, 3, H, W) -> L2-normalised image embeddings (B, projection_dim)."""

    def __init__(self, model: LightCLIPModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixel_values).pooler_output, dim=-1)


class TextEncoder(nn.Module):
    """input_ids, attention_mask (B, L) -> L2-normalised text embeddings (B, projection_dim)."""

    def __init__(self, model: LightCLIPModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_text_features(input_ids, attention_mask).pooler_output, dim=-1)


def _max_caption_tokens(model: LightCLIPModel, processor: LightCLIPProcessor) -> int:
    limits = [getattr(model.config.text_config, "max_position_embeddings", None),
              getattr(processor.tokenizer, "model_max_length", None)]
    return min(int(x) for x in limits if x is not None and x < 100_000)


def export_encoders(model: LightCLIPModel, processor: LightCLIPProcessor, out_dir) -> dict:
    """Write the two ONNX encoders to `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("sequence", min=2, max=_max_caption_tokens(model, processor))
    size = model.config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    text = processor.tokenizer(["a photo of a cat", "a small red car parked on a street"], padding=True,
                               return_tensors="pt")
    with torch.no_grad():
        torch.onnx.export(ImageEncoder(model).eval(), (pixel_values,), str(out_dir / IMAGE_FILE), dynamo=True,
                          input_names=["pixel_values"], output_names=["image_embeds"],
                          dynamic_shapes={"pixel_values": {0: batch}}, verbose=False)
        torch.onnx.export(TextEncoder(model).eval(), (text["input_ids"], text["attention_mask"]), str(out_dir / TEXT_FILE),
                          dynamo=True, input_names=["input_ids", "attention_mask"], output_names=["text_embeds"],
                          dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
                          verbose=False)
    for leftover in out_dir.glob("*.onnx.data"):  # small models fit inside the .onnx file itself
        if leftover.stat().st_size == 0:
            leftover.unlink()
    return {"image_encoder": str(out_dir / IMAGE_FILE), "text_encoder": str(out_dir / TEXT_FILE)}


def _default_check_inputs(count: int = 8):
    """Real images and captions: the embedded Fashion-MNIST validation rows."""
    from datasets import load_dataset

    from .data import EMBEDDED_DATA, load_image

    rows = load_dataset("parquet", data_files=str(EMBEDDED_DATA / "validation.parquet"), split="train")
    rows = rows.select(range(min(count, len(rows))))
    return [load_image(row["image"]) for row in rows], [row["caption"] for row in rows]


def check_with_onnxruntime(model: LightCLIPModel, processor: LightCLIPProcessor, out_dir, images=None,
                           captions=None) -> dict:
    """Run both ONNX files with onnxruntime (CPU) on real images and captions; max |ONNX - PyTorch| per encoder."""
    import onnxruntime

    from .data import load_image

    if images is None or captions is None:
        default_images, default_captions = _default_check_inputs()
        images = default_images if images is None else images
        captions = default_captions if captions is None else captions
    images = [load_image(image) for image in images]
    inputs = processor(text=list(captions), images=images, padding=True, truncation=True,
                       max_length=_max_caption_tokens(model, processor), return_tensors="pt")
    options = onnxruntime.SessionOptions()
    image_session = onnxruntime.InferenceSession(str(Path(out_dir) / IMAGE_FILE), options,
                                                 providers=["CPUExecutionProvider"])
    text_session = onnxruntime.InferenceSession(str(Path(out_dir) / TEXT_FILE), options,
                                                providers=["CPUExecutionProvider"])
    with torch.no_grad():
        image_reference = ImageEncoder(model.eval())(inputs["pixel_values"]).numpy()
        text_reference = TextEncoder(model)(inputs["input_ids"], inputs["attention_mask"]).numpy()
    image_onnx = image_session.run(None, {"pixel_values": inputs["pixel_values"].numpy()})[0]
    text_onnx = text_session.run(None, {"input_ids": inputs["input_ids"].numpy(),
                                        "attention_mask": inputs["attention_mask"].numpy()})[0]
    return {"images": len(images), "captions": len(captions),
            "image_max_abs_diff": float(abs(image_onnx - image_reference).max()),
            "text_max_abs_diff": float(abs(text_onnx - text_reference).max())}


def export_onnx(model_dir, out_dir, images=None, captions=None, tolerance: float = 1e-4) -> dict:
    """Export a saved LightCLIP folder's encoders to `out_dir`, copy the processor and config, check with
    onnxruntime; raises when an encoder differs from PyTorch by more than `tolerance`."""
    model = LightCLIPModel.from_pretrained(model_dir).eval()
    processor = LightCLIPProcessor.from_pretrained(model_dir)
    out_dir = Path(out_dir)
    files = export_encoders(model, processor, out_dir)
    processor.save_pretrained(out_dir)
    model.config.save_pretrained(out_dir)
    check = check_with_onnxruntime(model, processor, out_dir, images, captions)
    bias = getattr(model, "logit_bias", None)
    report = {**files, "logit_scale": float(model.logit_scale.detach().exp()), "tolerance": tolerance, **check,
              "outputs": "L2-normalised embeddings; logits = logit_scale * image_embeds @ text_embeds.T"
                         + (" + logit_bias (sigmoid loss: sigmoid(logits) is a match probability)" if bias is not None
                            else "")}
    if bias is not None:
        report["logit_bias"] = float(bias.detach())
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    worst = max(check["image_max_abs_diff"], check["text_max_abs_diff"])
    if not math.isfinite(worst) or worst > tolerance:
        raise RuntimeError(f"the ONNX encoders differ from PyTorch by {worst:.2e} (> {tolerance:g}) on "
                           f"{check['images']} images / {check['captions']} captions; see {out_dir / REPORT_FILE}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a saved LightCLIP folder (train_lightclip.py's output_dir)")
    parser.add_argument("--out", required=True, help="folder for the .onnx files, processor and config")
    parser.add_argument("--images", nargs="+", help="image files for the onnxruntime check")
    parser.add_argument("--captions", nargs="+", help="captions for the onnxruntime check")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    from .packaged_weights import check_saved_model

    try:  # a folder that cannot load: one message naming the file, not a library's traceback
        check_saved_model(args.model_dir, "onnx_export")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        report = export_onnx(args.model_dir, args.out, args.images, args.captions, args.tolerance)
    except ImportError as err:
        raise SystemExit(f"error: ONNX export needs onnx, onnxscript and onnxruntime ({err}): "
                         "pip install 'lightclip[onnx]'") from None
    print(json.dumps(report, indent=2))
    return report


__all__ = ["ImageEncoder", "TextEncoder", "check_with_onnxruntime", "export_encoders", "export_onnx"]


if __name__ == "__main__":
    main()
