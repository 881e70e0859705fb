"""Batch size at equal samples seen: the CLIP loss, the sigmoid loss and the recommended objective at batch 128,
512 and 2048 (the larger two accumulated from micro-batches of 256), 65,536 samples per run, 3 seeds.

    python benchmarks/batch_study.py                  # train what is missing, score, report
    python benchmarks/batch_study.py --skip_training  # score and report the runs finished so far

1. **Training** (`benchmarks/ablation.py --name batch --eval_split val --curve_every 128`, the arms `BATCH_ARMS`):
   every run on the selection split's training pairs (validation carved from the training data), scored on that
   validation at 16k, 32k, 48k and 64k samples seen (the learning curves) and at the end.
2. **Choice** on the selection split only: per loss, the batch with the best mean of the validation metrics.
3. **Test, once per final arm** (each loss at batch 128, the baseline, and at its validation choice): scored on the
   study's test splits (Fashion-MNIST test zero-shot, OpenClipart test retrieval); every run on the icon-theme second
   test set (`second_test_set.py`), which no choice saw.
   Differences with a paired bootstrap over test items (seeds averaged per item) and Holm's correction across each
   comparison's metrics; Welch's t over seeds beside them.

Writes `benchmarks/results/batch_study.{json,md,png}`.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402
import second_test_set  # noqa: E402

STUDY = ROOT / "outputs" / "ablation" / "batch_val"
LOSSES = ("clip", "sigmoid", "recommended")
BATCHES = (128, 512, 2048)
VAL_KEYS = [key for key, _ in ablation.METRICS]
ICON_KEYS = second_test_set.METRICS
# within a loss, each larger batch against 128; across losses, at each batch, against the CLIP loss
COMPARISONS = ([(f"{loss}@b{b}", f"{loss}@b128") for loss in LOSSES for b in BATCHES[1:]]
               + [(f"{loss}@b{b}", f"clip@b{b}") for b in BATCHES for loss in LOSSES[1:]])


def _train() -> None:
    ablation.main(["--name", "batch", "--eval_split", "val", "--curve_every", "128", "--baseline", "clip@b128",
                   "--arms", *ablation.BATCH_ARMS])


def _finished_runs(study: Path = STUDY) -> dict:
    runs = {}
    for run_json in sorted(study.glob("runs/*/seed*/run.json")):
        runs.setdefault(run_json.parent.parent.name, {})[run_json.parent.name] = run_json.parent
    return runs


def _scored(run_dir: Path, name: str, score) -> dict:
    """A run's scores on one test set, computed once and kept beside the model."""
    cached = run_dir / f"{name}.json"
    if not cached.is_file():
        cached.write_text(json.dumps(score(run_dir)))
    return json.loads(cached.read_text())


def _stats(rows: list[dict], keys: list[str]) -> dict:
    return {k: {"mean": statistics.fmean(r[k] for r in rows),
                "std": statistics.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0} for k in keys}


def _compare(rows: dict, keys: list[str], comparisons=COMPARISONS) -> dict:
    out = {}
    for arm, base in comparisons:
        a, b = rows.get(arm), rows.get(base)
        if not a or not b or len(a) != len(b) or len(a) < 2:
            continue
        boot = ablation.bootstrap_with_holm(a, b, keys)
        for key in boot:
            boot[key]["welch_p"] = ablation._welch_p([r[key] for r in a], [r[key] for r in b])
        out[f"{arm} vs {base}"] = boot
    return out


def _curves(val_rows: dict) -> dict:
    """Per arm and validation metric: mean +- std over seeds at each number of samples seen."""
    curves = {}
    for arm, rows in val_rows.items():
        batch = int(arm.rsplit("@b", 1)[1])
        by_samples = {}
        for row in rows:
            for step, metrics in (row.get("curve") or {}).items():
                by_samples.setdefault(int(step) * batch, []).append(metrics)
        curves[arm] = {samples: _stats(points, VAL_KEYS) for samples, points in sorted(by_samples.items())
                       if len(points) == len(rows)}
    return curves


def _choice(val_summary: dict) -> dict:
    """Per loss, the batch whose validation metrics have the best mean (selection split only)."""
    chosen = {}
    for loss in LOSSES:
        scored = {b: statistics.fmean(val_summary[f"{loss}@b{b}"][k]["mean"] for k in VAL_KEYS)
                  for b in BATCHES if f"{loss}@b{b}" in val_summary}
        if scored:
            chosen[loss] = {"batch": max(scored, key=scored.get), "mean_of_validation_metrics": scored}
    return chosen


def study_arguments(argv, doc: str, name: str):
    """A study script's flags: --skip_training (score and report the finished runs only) and --out."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip_training", action="store_true", help="score and report the finished runs only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / name))
    return parser.parse_args(argv)


def table(rows: dict, keys: list[str]) -> dict:
    return {arm: {"seeds": len(r), "metrics": _stats(r, keys)} for arm, r in rows.items()}


def validation_rows(finished: dict) -> dict:
    return {arm: [json.loads((d / "run.json").read_text()) for _, d in sorted(seeds.items())]
            for arm, seeds in finished.items()}


def score_tests(finished: dict, final: set, data: Path) -> tuple[dict, dict]:
    """(test rows of the final arms, icon rows of every arm), each run scored once and the scores kept beside it:
    Fashion-MNIST test zero-shot and OpenClipart test retrieval, and the icon-theme second test set."""
    test_files = {"zero_shot": data / "fashion_mnist" / "test.parquet",
                  "retrieval": data / "openclipart" / "validation.parquet"}
    icons = second_test_set.prepare_icons(data)
    test, icon = {}, {}
    for arm, seeds in finished.items():
        for seed, run_dir in sorted(seeds.items()):
            if arm in final:
                test.setdefault(arm, []).append(_scored(run_dir, "test",
                                                        lambda d: ablation.evaluate_run(d, test_files)))
            icon.setdefault(arm, []).append(_scored(run_dir, "icons", lambda d: second_test_set.score(d, icons)))
    return test, icon


def _cell(stats: dict, key: str) -> str:
    return f"{100 * stats[key]['mean']:.1f} ± {100 * stats[key]['std']:.1f}"


def _markdown(result: dict) -> str:
    lines = [f"Batch size at equal samples seen ({ablation.BATCH_STUDY_SAMPLES:,} per run): recipe `default` at 64 px, "
             f"lr 2e-3, mean ± std over seeds (%).", "", *markdown_tables(result, ablation.BATCH_ARMS)]
    if result.get("choice"):
        lines.append("Chosen on validation (best mean of the five validation metrics): " + ", ".join(
            f"{loss} → batch {c['batch']}" for loss, c in result["choice"].items()) + ".")
    return "\n".join(lines) + "\n"


def markdown_tables(result: dict, arm_order: list[str]) -> list[str]:
    """Per split (validation, test, icons): a table of the arms' mean ± std and the comparisons beneath it."""
    titles = dict(ablation.METRICS)
    lines = []
    for split, keys, names in (("validation", VAL_KEYS, titles), ("test", VAL_KEYS, titles),
                               ("icons", ICON_KEYS, {k: "icons " + k.replace("_", " ") for k in ICON_KEYS})):
        summary = result[split]
        if not summary:
            continue
        lines += [f"**{split}**", "", "| arm | seeds | " + " | ".join(names[k] for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for arm in arm_order:
            if arm in summary:
                lines.append(f"| `{arm}` | {summary[arm]['seeds']} | "
                             + " | ".join(_cell(summary[arm]['metrics'], k) for k in keys) + " |")
        lines.append("")
        for name, boot in result.get(f"{split}_comparisons", {}).items():
            lines.append(f"- `{name}`: " + ", ".join(
                f"{names[k]} {100 * b['delta']:+.1f} [{100 * b['ci95'][0]:+.1f}, {100 * b['ci95'][1]:+.1f}; "
                f"p_Holm={b['p_holm']:.3f}]" for k, b in boot.items()))
        lines.append("")
    return lines


def _plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["zero_shot_top1", "image_to_text_r1", "text_to_image_r1"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    styles = {128: "-", 512: "--", 2048: ":"}
    colours = {"clip": "tab:blue", "sigmoid": "tab:orange", "recommended": "tab:green"}
    for axis, key in zip(axes, keys):
        for arm, points in curves.items():
            loss, batch = arm.rsplit("@b", 1)
            xs = list(points)
            axis.errorbar(xs, [100 * points[x][key]["mean"] for x in xs], [100 * points[x][key]["std"] for x in xs],
                          linestyle=styles[int(batch)], color=colours[loss], label=arm, capsize=2)
        axis.set_xlabel("samples seen")
        axis.set_title(dict(ablation.METRICS)[key] + " (validation)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    from results_file import write_results

    args = study_arguments(argv, __doc__, "batch_study")
    if not args.skip_training:
        _train()
    finished = _finished_runs()
    val = validation_rows(finished)
    val_summary = {arm: s["metrics"] for arm, s in table(val, VAL_KEYS).items()}
    choice = _choice(val_summary)
    # the test splits once per final arm: each loss at batch 128 (the baseline) and at its validation choice
    final = {f"{loss}@b128" for loss in LOSSES} | {f"{loss}@b{c['batch']}" for loss, c in choice.items()}
    test, icon = score_tests(finished, final, STUDY.parent / "data")
    result = {"samples_per_run": ablation.BATCH_STUDY_SAMPLES, "arms": {a: ablation.ARMS[a] for a in val},
              "validation": table(val, VAL_KEYS), "test": table(test, VAL_KEYS), "icons": table(icon, ICON_KEYS),
              "test_comparisons": _compare(test, VAL_KEYS), "icons_comparisons": _compare(icon, ICON_KEYS),
              "choice": choice, "learning_curves": _curves(val),
              "step_seconds": {arm: statistics.fmean(r["step_seconds"] for r in rows) for arm, rows in val.items()}}
    out = Path(args.out)
    write_results(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(_markdown(result))
    _plot(result["learning_curves"], out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return result


if __name__ == "__main__":
    main()
