"""Top-k accuracy of zero-shot classification from ranked class predictions (a local `evaluate` module)."""

import datasets
import evaluate


_DESCRIPTION = """
Top-1 and top-5 accuracy of zero-shot image classification. Each prediction is the list of class indices ranked
by image-text similarity (best first); a sample counts for top-k when its reference class is among the first k.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): class indices per sample, ranked best first (at least max(top_k) long, or all
        classes when there are fewer).
    references (`list[int]`): the true class index per sample.
    top_k (`list[int]`, optional): the k to report, default [1, 5].
Returns:
    `top1`, `top5`, ...: fractions in [0, 1].
Examples:
    >>> metric = evaluate.load("modeling_lightclip/training/metrics/zero_shot_accuracy")
    >>> metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[0, 1], top_k=[1, 2])
    {'top1': 0.5, 'top2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShotAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not references:
            return {f"top{k}": 0.0 for k in top_k}
        return {
            f"top{k}": sum(ref in list(pred)[:k] for pred, ref in zip(predictions, references)) / len(references)
            for k in top_k
        }
