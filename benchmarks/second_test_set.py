"""Score finished study runs on a second retrieval test set from a different source: icons of a freedesktop icon
theme (Debian's `elementary-xfce-icon-theme`, one image per icon name, captioned with the name's words), which no
choice of the study ever saw.

    python benchmarks/second_test_set.py --study outputs/ablation/pretrained --baseline +frozen_relation \
        --json benchmarks/results/pretrained_icons.json

Every run folder `STUDY/runs/ARM/seedN` (a saved model) is scored once: image->text and text->image R@1/R@5 with a
same-caption hit counting (as on OpenClipart). Per arm: mean +- std over seeds; against the baseline arm a paired
bootstrap over test items (each item's hit averaged over seeds) with Holm's correction across the four metrics.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

METRICS = ["image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5"]
THEME = ("elementary-xfce-icon-theme", "elementary-xfce")


def prepare_icons(data_dir: Path, image_size: int = 64, package_root: str | None = None) -> Path:
    from offline_data import debian_package, write_icon_theme

    out = data_dir / f"icons_{THEME[1]}_{image_size}"
    if not (out / "test.parquet").is_file():
        with debian_package(THEME[0], package_root) as root:
            print("icons:", write_icon_theme(out, root, THEME[1], image_size=image_size))
    return out / "test.parquet"


def score(run_dir: Path, test_file: Path) -> dict:
    import torch
    from datasets import load_dataset
    from torch.utils.data import DataLoader

    from modeling_lightclip import LightCLIPModel, LightCLIPProcessor
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.evaluation import embed_pairs, retrieval_hits, retrieval_metrics

    model = LightCLIPModel.from_pretrained(run_dir).eval()
    processor = LightCLIPProcessor.from_pretrained(run_dir)
    if torch.cuda.is_available():
        model = model.cuda()
    data = load_dataset("parquet", data_files=str(test_file), split="train")
    loader = DataLoader(data, batch_size=256, collate_fn=ImageTextCollator(processor=processor, train=False))
    images, texts, ids, _ = embed_pairs(model, loader)
    metrics = retrieval_metrics(images, texts, captions=ids)
    hits = retrieval_hits(images, texts, captions=ids)
    return {**{k: metrics[k] for k in METRICS}, "items": {k: hits[k] for k in METRICS}, "pairs": len(ids)}


def main(argv=None):
    from ablation import bootstrap_with_holm

    from results_file import write_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="append", required=True, help="a study folder (repeatable)")
    parser.add_argument("--arms", nargs="+", help="only these arms")
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--data_dir", default="outputs/ablation/data")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--package_root", help="an existing `dpkg -x` of the icon theme package")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    test_file = prepare_icons(ROOT / args.data_dir, args.image_size, args.package_root)
    runs = {}
    for study in args.study:
        for run_dir in sorted((ROOT / study / "runs").glob("*/seed*")):
            arm = run_dir.parent.name
            if (args.arms and arm not in args.arms) or not (run_dir / "model.safetensors").is_file():
                continue
            cached = run_dir / "icons.json"
            result = json.loads(cached.read_text()) if cached.is_file() else score(run_dir, test_file)
            cached.write_text(json.dumps(result))
            runs.setdefault(arm, {})[run_dir.name] = result
    summary = {}
    base = runs[args.baseline]
    for arm, seeds in runs.items():
        entry = {"seeds": sorted(seeds), "metrics": {k: {"mean": statistics.fmean(r[k] for r in seeds.values()),
                                                          "std": statistics.stdev([r[k] for r in seeds.values()])
                                                          if len(seeds) > 1 else 0.0} for k in METRICS}}
        if arm != args.baseline:
            entry["vs_" + args.baseline] = bootstrap_with_holm([r for _, r in sorted(seeds.items())],
                                                               [r for _, r in sorted(base.items())], METRICS)
        summary[arm] = entry
        line = " | ".join(f"{k} {100 * entry['metrics'][k]['mean']:.1f} ± {100 * entry['metrics'][k]['std']:.1f}"
                          + (f" ({100 * entry['vs_' + args.baseline][k]['delta']:+.1f}, p_Holm "
                             f"{entry['vs_' + args.baseline][k]['p_holm']:.3f})" if arm != args.baseline else "")
                          for k in METRICS)
        print(f"{arm} [{len(seeds)} seeds]: {line}")
    result = {"test_set": f"{THEME[0]} ({THEME[1]}), one icon per name, caption = the name's words",
              "pairs": next(iter(base.values()))["pairs"], "baseline": args.baseline, "arms": summary}
    if args.json:
        write_results(args.json, result)
    return result


if __name__ == "__main__":
    main()
