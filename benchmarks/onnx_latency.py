"""ONNX export of every recipe's towers: onnxruntime vs PyTorch agreement and CPU latency.

    python benchmarks/onnx_latency.py --threads 1 --runs 50

For each recipe (untrained weights: agreement and latency do not depend on training), exports the image and text
encoders with `modeling_lightclip.training.onnx_export`, checks them against PyTorch on the embedded Fashion-MNIST
validation images and captions (max |Δ| of the normalised embeddings), then times one image and one caption
(batch 1) in onnxruntime (CPU) and in PyTorch eager (CPU), same thread count, median of --runs after warm-up.
"""

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_lightclip import LightCLIPModel  # noqa: E402
from modeling_lightclip.training.hub import median_ms  # noqa: E402
from modeling_lightclip.training.onnx_export import (  # noqa: E402
    IMAGE_FILE, TEXT_FILE, ImageEncoder, TextEncoder, check_with_onnxruntime, export_encoders)
from modeling_lightclip.training.preprocessing import build_processor, train_wordpiece_tokenizer  # noqa: E402
from modeling_lightclip.training.recipes import build_model_config, load_recipe  # noqa: E402


RECIPES = ["default", "resnet18", "mobilenetv2", "efficientnet_b0", "vit_xs"]  # each at its own image size
if importlib.util.find_spec("timm") is not None:
    RECIPES += ["mobilenetv4", "fastvit"]  # timm towers through TimmWrapper


def _median_ms(fn, runs: int) -> float:
    return median_ms(fn, runs, warmup=5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    import onnxruntime

    torch.set_num_threads(args.threads)
    from modeling_lightclip.training.onnx_export import _default_check_inputs

    images, captions = _default_check_inputs()
    tokenizer = train_wordpiece_tokenizer(captions * 50, vocab_size=1000, model_max_length=32)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    results = {}
    print(f"{'recipe':<16}{'size':>5}{'max |Δ| image':>15}{'max |Δ| text':>14}{'image ORT':>11}{'image torch':>13}"
          f"{'text ORT':>10}{'text torch':>12}")
    scratch = tempfile.TemporaryDirectory(prefix="lightclip-onnx-")  # removed after the runs (on error: at exit)
    for recipe in args.recipes:
        torch.manual_seed(0)
        model = LightCLIPModel(build_model_config(load_recipe(recipe)["model"], tokenizer)).eval()
        size = model.config.image_size
        processor = build_processor(size, tokenizer)
        out = Path(scratch.name) / recipe
        export_encoders(model, processor, out)
        check = check_with_onnxruntime(model, processor, out, images, captions)
        image_session = onnxruntime.InferenceSession(str(out / IMAGE_FILE), options, providers=["CPUExecutionProvider"])
        text_session = onnxruntime.InferenceSession(str(out / TEXT_FILE), options, providers=["CPUExecutionProvider"])
        one = processor(text=[captions[0]], images=[images[0]], return_tensors="pt")
        pixel_values, ids, mask = one["pixel_values"], one["input_ids"], one["attention_mask"]
        image_encoder, text_encoder = ImageEncoder(model), TextEncoder(model)
        with torch.inference_mode():
            figures = {
                **check,
                "image_onnxruntime_ms": _median_ms(lambda: image_session.run(None, {"pixel_values": pixel_values.numpy()}),
                                                   args.runs),
                "image_torch_ms": _median_ms(lambda: image_encoder(pixel_values), args.runs),
                "text_onnxruntime_ms": _median_ms(lambda: text_session.run(None, {"input_ids": ids.numpy(),
                                                                                  "attention_mask": mask.numpy()}),
                                                  args.runs),
                "text_torch_ms": _median_ms(lambda: text_encoder(ids, mask), args.runs),
            }
        results[recipe] = {"image_size": size, **figures}
        print(f"{recipe:<16}{size:>5}{figures['image_max_abs_diff']:>15.1e}{figures['text_max_abs_diff']:>14.1e}"
              f"{figures['image_onnxruntime_ms']:>9.2f}ms{figures['image_torch_ms']:>11.2f}ms"
              f"{figures['text_onnxruntime_ms']:>8.2f}ms{figures['text_torch_ms']:>10.2f}ms")
    scratch.cleanup()
    if args.json:
        from results_file import write_results

        write_results(args.json, results)


if __name__ == "__main__":
    main()
