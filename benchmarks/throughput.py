"""Training throughput (pairs/s) of each CNN recipe, end to end and model-only, against a plain-PyTorch anchor.

    python benchmarks/throughput.py                                   # CPU: 64 px, batch 64
    python benchmarks/throughput.py --image_size 224 --batch_size 256 --bf16 --compile --json out.json   # GPU

For each recipe, in one run:

* **end-to-end**: `train_lightclip.main` on a generated parquet of JPEG images with captions (the real loader:
  decode, augmentation, tokenising, the Trainer's step), CLIP objective; pairs/s over the steps after warm-up, with
  the run's own defaults (channels-last, workers, uint8 images normalised on the device: all `auto`).
* **model-only**: `LightCLIPModel` forward + backward + AdamW on one fixed batch already on the device, the CLIP
  objective and full LightCLIP (soft labels, token alignment, MLM + fusion); channels-last as the run would choose,
  towers compiled with `--compile`.
* **anchor**: the same two towers in a minimal plain-PyTorch CLIP step (projections, InfoNCE, AdamW), channels-last
  for CNN towers and `torch.compile` with `--compile`: what the towers reach without our trainer.
* **input pipeline**: the training collator's cost per image (decode + augment + resize + tokenise), float vs uint8.

Prints the ratios end-to-end / model-only, model-only / anchor and full / CLIP step.
"""

import argparse
import copy
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_lightclip import LightCLIPModel  # noqa: E402
from modeling_lightclip.training.hub import median_ms  # noqa: E402
from modeling_lightclip.training.preprocessing import build_processor, train_wordpiece_tokenizer  # noqa: E402
from modeling_lightclip.training.recipes import build_model_config, load_recipe  # noqa: E402
from modeling_lightclip.training.trainer import compile_towers  # noqa: E402


WORDS = ["red", "blue", "small", "large", "striped", "leather", "wooden", "shiny", "old", "new", "boot", "bag", "shirt",
         "dress", "chair", "lamp", "car", "dog", "cat", "tree", "house", "cup", "on", "a", "table", "with", "the"]
OFF = {"soft_label_mode": "none", "token_loss_weight": 0.0, "mlm_loss_weight": 0.0, "ping_nn_loss_weight": 0.0,
       "ping_xnn_loss_weight": 0.0, "relation_loss_weight": 0.0}
FULL = {**OFF, "soft_label_mode": "similarity", "soft_label_source": "student", "soft_label_schedule": "constant",
        "token_loss_weight": 0.5, "mlm_loss_weight": 0.5}


def _captions(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 14))) for _ in range(n)]


def write_dataset(folder: Path, n: int, image_size: int, seed: int = 0) -> Path:
    """n JPEG images (a little larger than the training size, so the crop and resize do real work) + captions."""
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = int(image_size * 1.25)
    images = []
    for _ in range(n):
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)  # smooth, JPEG-like content, not noise
        image = Image.fromarray(base).resize((side, side), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    path = folder / "train.parquet"
    Dataset.from_dict({"image": images, "caption": _captions(n, rng)}, features=features).to_parquet(str(path))
    return path


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _PlainCLIP(nn.Module):
    """The anchor: two towers, two projections, symmetric InfoNCE. Nothing else."""

    def __init__(self, vision, text, vision_dim, text_dim, projection_dim):
        super().__init__()
        self.vision, self.text = vision, text
        self.vision_projection = nn.Linear(vision_dim, projection_dim, bias=False)
        self.text_projection = nn.Linear(text_dim, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixel_values, input_ids, attention_mask):
        vision = self.vision(pixel_values=pixel_values)
        pooled = getattr(vision, "pooler_output", None)
        image = pooled.flatten(1) if pooled is not None else vision.last_hidden_state.mean((2, 3))
        states = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        text = (states * mask).sum(1) / mask.sum(1)
        image = F.normalize(self.vision_projection(image), dim=-1)
        text = F.normalize(self.text_projection(text), dim=-1)
        logits = self.logit_scale.exp() * image @ text.t()
        labels = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _train_step(module, optimiser, inputs, bf16, device, lightclip: bool):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module(**inputs, return_loss=True).loss if lightclip else module(**inputs)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step


def model_only(recipe: str, tokenizer, captions: list[str], args, device, channels_last: bool) -> dict:
    """pairs/s of the LightCLIP step (CLIP objective and full LightCLIP) and of the plain-PyTorch anchor, on one
    batch of the benchmark's captions padded as the end-to-end run pads them; the three steps run interleaved
    (round-robin), so machine noise hits them alike."""
    enc = tokenizer(captions[:args.batch_size], padding="max_length" if args.compile else True, truncation=True,
                    max_length=args.max_length, return_tensors="pt")
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    inputs = {"pixel_values": pixel_values.to(device), "input_ids": enc["input_ids"].to(device),
              "attention_mask": enc["attention_mask"].to(device)}
    if channels_last:
        inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
    model_config = load_recipe(recipe)["model"]
    steps, towers = {}, None
    for arm, overrides in (("clip", OFF), ("full", FULL)):
        torch.manual_seed(0)
        config = build_model_config(copy.deepcopy(model_config), tokenizer, image_size=args.image_size, **overrides)
        model = LightCLIPModel(config).to(device).train()
        model.set_training_progress(1.0)
        if channels_last:
            model.set_channels_last(True)
        if towers is None:  # the anchor gets copies of the same towers, before any compilation
            towers = (copy.deepcopy(model.vision_model), copy.deepcopy(model.text_model), model.vision_embed_dim,
                      model.text_embed_dim, config.projection_dim)
        if args.compile:
            compile_towers(model)
        steps[arm] = _train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), inputs, args.bf16, device,
                                 True)
    vision, text, vision_dim, text_dim, projection_dim = towers
    anchor = _PlainCLIP(vision, text, vision_dim, text_dim, projection_dim).to(device).train()
    forward = torch.compile(anchor) if args.compile else anchor
    steps["anchor"] = _train_step(forward, torch.optim.AdamW(anchor.parameters(), lr=1e-4), inputs, args.bf16,
                                  device, False)
    times = {arm: [] for arm in steps}
    for i in range(args.warmup + args.steps):
        for arm, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            if i >= args.warmup:
                times[arm].append(time.perf_counter() - start)
    seconds = {arm: statistics.median(values) for arm, values in times.items()}
    return {"model_only_clip_pairs_per_s": args.batch_size / seconds["clip"],
            "model_only_clip_step_ms": 1000 * seconds["clip"],
            "model_only_full_pairs_per_s": args.batch_size / seconds["full"],
            "model_only_full_step_ms": 1000 * seconds["full"],
            "anchor_pairs_per_s": args.batch_size / seconds["anchor"]}


def end_to_end(recipe: str, train_file: Path, tokenizer_dir: Path, args, out: Path) -> dict:
    """pairs/s through train_lightclip.main (CLIP objective), over the steps after warm-up."""
    from transformers import TrainerCallback

    import train_lightclip

    stamps, frames = [], []

    def _compiled_frames() -> int:
        from torch._dynamo.utils import counters

        return int(counters["frames"]["ok"])

    class _Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            frames.append(_compiled_frames())

    original = train_lightclip.LightCLIPTrainer.__init__

    def _init(self, *a, callbacks=None, **k):
        original(self, *a, callbacks=list(callbacks or []) + [_Clock()], **k)

    train_lightclip.LightCLIPTrainer.__init__ = _init
    argv = ["--recipe", recipe, "--train_file", str(train_file), "--tokenizer_name", str(tokenizer_dir),
            "--image_size", str(args.image_size), "--per_device_train_batch_size", str(args.batch_size),
            "--max_steps", str(args.warmup + args.steps), "--do_eval", "false", "--output_dir", str(out),
            "--save_strategy", "no", "--logging_steps", "1000", "--report_to", "none",
            "--max_caption_length", str(args.max_length)]
    for name, value in OFF.items():
        argv += [f"--{name}", str(value)]
    if args.bf16:
        argv += ["--bf16", "true"]
    if args.compile:
        argv += ["--torch_compile", "true"]
    if args.workers is not None:
        argv += ["--dataloader_num_workers", str(args.workers)]
    try:
        started = time.perf_counter()
        trainer = train_lightclip.main(argv)
    finally:
        train_lightclip.LightCLIPTrainer.__init__ = original
    timed = stamps[args.warmup:]
    rate = args.batch_size * (len(timed) - 1) / (timed[-1] - timed[0])
    # the first step includes start-up and, with --compile, compiling the towers; frames dynamo compiled after it
    # are recompiles
    return {"end_to_end_pairs_per_s": rate, "end_to_end_first_step_s": stamps[0] - started,
            "frames_compiled_after_step_1": frames[-1] - frames[0], "workers": trainer.args.dataloader_num_workers}


def collator_cost(train_file: Path, tokenizer, args) -> dict:
    """Milliseconds per image of the training collator in one process, float output vs uint8 output."""
    from datasets import load_dataset

    from modeling_lightclip.training.data import ImageTextCollator

    rows = list(load_dataset("parquet", data_files=str(train_file), split="train").select(range(args.batch_size)))
    processor = build_processor(args.image_size, tokenizer)
    figures = {}
    for name, uint8 in (("float", False), ("uint8", True)):
        collator = ImageTextCollator(processor, train=True, uint8_images=uint8, max_length=args.max_length)
        figures[f"collator_{name}_ms_per_image"] = median_ms(lambda: collator(rows), 5) / len(rows)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["resnet18", "mobilenetv2", "efficientnet_b0"])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=32, help="caption tokens (fixed-length padding)")
    parser.add_argument("--threads", type=int, help="CPU threads of the training process (default: torch's)")
    parser.add_argument("--workers", type=int, help="end-to-end loader workers (default: the trainer's auto)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the towers and the anchor")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    channels_last = device.type == "cuda"  # what --channels_last auto does for a CNN tower

    scratch = tempfile.TemporaryDirectory(prefix="lightclip-throughput-")  # removed after the runs (on error: at exit)
    work = Path(scratch.name)
    train_file = write_dataset(work, args.batch_size * (args.warmup + args.steps + 2), args.image_size)
    from datasets import load_dataset

    captions = load_dataset("parquet", data_files=str(train_file), split="train")["caption"]
    tokenizer = train_wordpiece_tokenizer(_captions(2000, np.random.default_rng(1)), 1000, args.max_length)
    tokenizer.save_pretrained(work / "tokenizer")
    print(f"device={device} image_size={args.image_size} batch={args.batch_size} bf16={args.bf16} "
          f"compile={args.compile} channels_last={channels_last} threads={torch.get_num_threads()}")
    results = {"setting": vars(args) | {"device": str(device), "channels_last": channels_last}}
    results.update(collator_cost(train_file, tokenizer, args))
    print(f"collator per image: float {results['collator_float_ms_per_image']:.2f} ms, uint8 "
          f"{results['collator_uint8_ms_per_image']:.2f} ms (one process)")
    header = (f"{'recipe':<16}{'end-to-end':>12}{'model-only':>12}{'anchor':>10}{'e2e/model':>11}{'model/anchor':>14}"
              f"{'full/clip step':>16}")
    rows = []
    for recipe in args.recipes:
        figures = model_only(recipe, tokenizer, captions, args, device, channels_last)
        figures.update(end_to_end(recipe, train_file, work / "tokenizer", args, work / f"run-{recipe}"))
        figures["end_to_end_over_model_only"] = figures["end_to_end_pairs_per_s"] / figures["model_only_clip_pairs_per_s"]
        figures["model_only_over_anchor"] = figures["model_only_clip_pairs_per_s"] / figures["anchor_pairs_per_s"]
        figures["full_over_clip_step"] = figures["model_only_full_step_ms"] / figures["model_only_clip_step_ms"]
        results[recipe] = figures
        rows.append(f"{recipe:<16}{figures['end_to_end_pairs_per_s']:>12.0f}{figures['model_only_clip_pairs_per_s']:>12.0f}"
                    f"{figures['anchor_pairs_per_s']:>10.0f}{figures['end_to_end_over_model_only']:>10.2f}x"
                    f"{figures['model_only_over_anchor']:>13.2f}x{figures['full_over_clip_step']:>15.2f}x")
    scratch.cleanup()
    print("pairs/s (median step after warm-up)")
    print(header)
    print("\n".join(rows))
    if args.json:
        from results_file import write_results

        write_results(args.json, results)


if __name__ == "__main__":
    main()
