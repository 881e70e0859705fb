"""Reinforced data, round 2: the teachers' features of stored views against those of the un-augmented image, and
feature distillation against logit distillation, at equal steps, 3 seeds.

    python benchmarks/views_study.py                  # train what is missing, score, report
    python benchmarks/views_study.py --skip_training  # score and report the runs finished so far

1. **Training** (`benchmarks/ablation.py --name views --eval_split val`, the arms `VIEWS_ARMS`, setting `cpu`: recipe
   `default` at 64 px, batch 128, 250 steps, lr 2e-3): every run on the selection split's training pairs, streamed
   from a reinforced copy of them (frozen-pair teacher at 64 px), scored on the selection split's validation.
   - the recommended objective (frozen soft labels + frozen-relation distillation) reading features of the
     un-augmented image (`+frozen_relation_streamed`, K = 0) or of 4 or 8 stored views per image re-applied in
     training (`+frozen_relation_views4`, `+frozen_relation_views8`: `lightclip-reinforce --num_augmentations K`);
   - distillation from the aligned teacher (the frozen pair aligned into one space on the training pairs,
     `aligned_teacher.py`): logit distillation (`+distill_aligned`) or feature distillation
     (`+feature_distill_aligned`) from the un-augmented image's features, and logit distillation from 4 or 8 stored
     views (`+distill_aligned_views4`, `+distill_aligned_views8`: the alignment fitted and applied per view).
2. **Test, once per arm**: Fashion-MNIST test zero-shot and OpenClipart test retrieval, and the icon-theme second test
   set (`second_test_set.py`), which no choice saw. Differences with a paired bootstrap over test items (seeds averaged
   per item) and Holm's correction across each comparison's metrics; Welch's t over seeds beside them.

Writes `benchmarks/results/views_study.{json,md}`.
"""

import statistics
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablation  # noqa: E402
import second_test_set  # noqa: E402
from batch_study import (_compare, _finished_runs, markdown_tables, score_tests, study_arguments, table,  # noqa: E402
                         validation_rows)

STUDY = ROOT / "outputs" / "ablation" / "views_val"
VAL_KEYS = [key for key, _ in ablation.METRICS]
ICON_KEYS = second_test_set.METRICS
COMPARISONS = [("+frozen_relation_views4", "+frozen_relation_streamed"),
               ("+frozen_relation_views8", "+frozen_relation_streamed"),
               ("+distill_aligned_views4", "+distill_aligned"),
               ("+distill_aligned_views8", "+distill_aligned"),
               ("+feature_distill_aligned", "+distill_aligned")]


def _train() -> None:
    ablation.main(["--name", "views", "--eval_split", "val", "--baseline", "+frozen_relation_streamed",
                   "--arms", *ablation.VIEWS_ARMS])


def _markdown(result: dict) -> str:
    lines = ["Stored views and feature distillation: recipe `default` at 64 px, batch 128, 250 steps, lr 2e-3, "
             "trained from a reinforced copy (frozen-pair teacher at 64 px), mean ± std over seeds (%).", "",
             *markdown_tables(result, ablation.VIEWS_ARMS)]
    lines.append("Step time (s, median over runs): " + ", ".join(
        f"`{arm}` {seconds:.2f}" for arm, seconds in result["step_seconds"].items()) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from results_file import write_results

    args = study_arguments(argv, __doc__, "views_study")
    if not args.skip_training:
        _train()
    finished = _finished_runs(STUDY)
    val = validation_rows(finished)
    test, icon = score_tests(finished, set(finished), STUDY.parent / "data")  # every arm final: test once each
    result = {"arms": {a: ablation.ARMS[a] for a in val}, "copies": {a: ablation.STREAMED_ARMS[a] for a in val},
              "validation": table(val, VAL_KEYS), "test": table(test, VAL_KEYS), "icons": table(icon, ICON_KEYS),
              "validation_comparisons": _compare(val, VAL_KEYS, COMPARISONS),
              "test_comparisons": _compare(test, VAL_KEYS, COMPARISONS),
              "icons_comparisons": _compare(icon, ICON_KEYS, COMPARISONS),
              "step_seconds": {arm: statistics.median(r["step_seconds"] for r in rows) for arm, rows in val.items()}}
    out = Path(args.out)
    write_results(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(_markdown(result))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
