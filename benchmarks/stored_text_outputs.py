"""Training-step time with a locked text tower run at every step vs its outputs stored with the rows
(`--store_locked_text_outputs`), same model, same batch.

    python benchmarks/stored_text_outputs.py                       # all-MiniLM-L6-v2 locked + the default image tower
    python benchmarks/stored_text_outputs.py --image_size 128 --batch_size 64 --threads 2

The text tower is all-MiniLM-L6-v2 (from its pip wheel offline), locked whole; the image tower the `default`
recipe's small ResNet (or --vision_model_name_or_path). A step is forward + backward of the CLIP loss; the two arms
run interleaved (round-robin) so machine noise hits them alike; figures are medians over --steps timed steps after
--warmup. The collator's tokenisation is the same in both arms and not timed.
"""

import argparse
import statistics
import time

import torch

from modeling_lightclip import LightCLIPModel
from modeling_lightclip.training.packaged_weights import pretrained_source
from modeling_lightclip.training.recipes import build_model_config, load_recipe


MINILM = "sentence-transformers/all-MiniLM-L6-v2"
CAPTIONS = [
    "a photo of an ankle boot made of brown leather with a low heel",
    "a grey pullover with long sleeves and a round neck on a white background",
    "a pair of blue denim trousers folded on a wooden table",
    "a red dress with short sleeves and a floral pattern",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--vision_model_name_or_path", default=None)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    text_tower = pretrained_source(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(text_tower)
    model_section = {k: v for k, v in load_recipe("default")["model"].items() if k != "text_config"}
    config = build_model_config({**model_section, "image_size": args.image_size, "soft_label_mode": "none",
                                 "relation_loss_weight": 0.0, "token_loss_weight": 0.0, "mlm_loss_weight": 0.0},
                                tokenizer)
    vision = pretrained_source(args.vision_model_name_or_path) if args.vision_model_name_or_path else None
    model = LightCLIPModel.from_vision_text_pretrained(vision, text_tower, **config.to_dict())
    model.lock_text_tower().train()
    captions = [CAPTIONS[i % len(CAPTIONS)] + f" number {i}" for i in range(args.batch_size)]
    text = tokenizer(captions, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    stored = model.locked_text_outputs(text["input_ids"], text["attention_mask"])
    batch = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], "pixel_values": pixels}
    arms = {"tower runs": {}, "outputs stored": {"text_tower_outputs": stored}}
    times = {name: [] for name in arms}
    for step in range(args.warmup + args.steps):
        for name, targets in arms.items():
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            model(**batch, return_loss=True, training_targets=targets).loss.backward()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["tower runs"])
    print(f"step (forward + backward), batch {args.batch_size}, {args.image_size} px, {torch.get_num_threads()} "
          f"thread(s), median of {args.steps}:")
    results = {"image_size": args.image_size, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
               "steps": args.steps, "vision_model_name_or_path": args.vision_model_name_or_path, "arms": {}}
    for name, values in times.items():
        median = statistics.median(values)
        results["arms"][name] = {"median_step_ms": round(median * 1000, 1), "ratio": round(median / base, 3)}
        print(f"  {name:15s} {median * 1000:8.1f} ms  ({median / base:.2f}x)")
    if args.json:
        from results_file import write_results

        write_results(args.json, results)


if __name__ == "__main__":
    main()
