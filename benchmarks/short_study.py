"""A short study that fits a GPU slot: plain CLIP vs the recommended objective, several seeds, fixed steps, on the
Fashion-MNIST subset embedded in this repository (no download, so it runs on a machine without a network).

    python benchmarks/short_study.py --recipe resnet18 --image_size 64 --batch_size 256 --max_steps 300 \
        --seeds 0 1 2 --bf16 --json benchmarks/results/short_study_gpu.json

Both arms train the same towers, steps, batch and schedule (`--recipe`'s), differing only in the objective switches
of `benchmarks/ablation.py`'s `clip` and `+frozen_relation` arms; the frozen encoders' features are extracted once
for every arm and seed. Each run is scored on the embedded validation split (2,000 images from Fashion-MNIST's test
split): zero-shot top-1 with the training prompt templates (closed-set classification with seen prompts) and
retrieval R@1/R@5 over the distinct captions. Reports mean ± std over seeds and a Welch p-value per metric.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

METRICS = ("zero_shot_top1", "image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5")
STUDY_ARMS = {"clip": "clip", "recommended": "+frozen_relation"}   # name here -> arm of benchmarks/ablation.py


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_train_samples", type=int, help="a slice of the training data (the dry run)")
    parser.add_argument("--max_eval_samples", type=int)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (-1: the trainer's auto)")
    parser.add_argument("--out", default="outputs/short_study")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    import ablation
    import train_lightclip
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets
    from modeling_lightclip.training.neighbours import build_folder
    from results_file import write_results

    out = Path(args.out)
    frozen = out / "frozen_encoders"
    train = load_image_text_datasets(DataArguments(max_train_samples=args.max_train_samples))["train"]
    started = time.perf_counter()
    build_folder(train, frozen, image_size=max(64, args.image_size))
    extraction_s = time.perf_counter() - started
    runs = []
    for seed in args.seeds:
        for name, arm in STUDY_ARMS.items():
            run_dir = out / name / f"seed{seed}"
            argv = ["--recipe", args.recipe, "--image_size", str(args.image_size), "--per_device_train_batch_size",
                    str(args.batch_size), "--max_steps", str(args.max_steps), "--learning_rate",
                    str(args.learning_rate), "--seed", str(seed), "--output_dir", str(run_dir), "--save_strategy",
                    "no", "--logging_steps", "50", "--report_to", "none", "--dataloader_num_workers",
                    str(args.workers), *ablation.arm_flags(ablation.ARMS[arm])]
            if ablation.needs_teacher_knowledge(ablation.arm_config({"recipe": args.recipe}, ablation.ARMS[arm])):
                argv += ["--teacher_features", str(frozen)]
            for flag, value in (("--max_train_samples", args.max_train_samples),
                                ("--max_eval_samples", args.max_eval_samples)):
                if value is not None:
                    argv += [flag, str(value)]
            if args.bf16:
                argv += ["--bf16", "true"]
            train_lightclip.main(argv)
            metrics = json.loads((run_dir / "eval_results.json").read_text())
            runtime = json.loads((run_dir / "train_results.json").read_text())["train_runtime"]
            runs.append({"arm": name, "seed": seed, "train_seconds": runtime,
                         **{key: metrics[f"eval_{key}"] for key in METRICS}})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {100 * runs[-1][k]:.1f}" for k in METRICS), flush=True)
    summary = {}
    for name in STUDY_ARMS:
        rows = [r for r in runs if r["arm"] == name]
        summary[name] = {key: {"mean": statistics.fmean(r[key] for r in rows),
                               "std": statistics.stdev([r[key] for r in rows]) if len(rows) > 1 else 0.0,
                               "values": [r[key] for r in rows]} for key in (*METRICS, "train_seconds")}
    for key in METRICS:
        summary["recommended"][key]["delta_vs_clip"] = (summary["recommended"][key]["mean"]
                                                        - summary["clip"][key]["mean"])
        summary["recommended"][key]["welch_p"] = ablation._welch_p(summary["recommended"][key]["values"],
                                                                  summary["clip"][key]["values"])
    write_results(args.json, {"setting": vars(args), "frozen_feature_extraction_s": extraction_s,
                              "summary": summary, "runs": runs})
    for key in METRICS:
        clip, rec = summary["clip"][key], summary["recommended"][key]
        p = rec["welch_p"]
        print(f"{key:<20} clip {100 * clip['mean']:5.1f} ± {100 * clip['std']:.1f}   recommended "
              f"{100 * rec['mean']:5.1f} ± {100 * rec['std']:.1f}  ({100 * rec['delta_vs_clip']:+.1f}"
              + (f", p={p:.2f})" if p is not None else ")"))


if __name__ == "__main__":
    main()
