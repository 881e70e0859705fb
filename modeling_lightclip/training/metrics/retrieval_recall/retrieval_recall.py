"""Recall@k of cross-modal retrieval from ranked candidates (a local `evaluate` module)."""

import datasets
import evaluate


_DESCRIPTION = """
Recall@k for retrieval: a query counts as retrieved at k when any of its relevant candidates is among the first k
ranked candidates. Used for image->text and text->image retrieval (one call per direction).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[int]]`): candidate indices per query, ranked best first (at least max(k) long).
    references (`list[list[int]]`): the relevant candidate indices of each query (one or more).
    k (`list[int]`, optional): default [1, 5, 10].
Returns:
    `r1`, `r5`, `r10`: fractions in [0, 1].
Examples:
    >>> metric = evaluate.load("modeling_lightclip/training/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[3, 1, 0], [0, 2, 1]], references=[[1], [1, 4]], k=[1, 2, 3])
    {'r1': 0.0, 'r2': 0.5, 'r3': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5, 10)):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if not references:
            return {f"r{n}": 0.0 for n in k}
        hits = {n: 0 for n in k}
        for ranked, relevant in zip(predictions, references):
            relevant = set(relevant)
            for n in k:
                hits[n] += any(c in relevant for c in list(ranked)[:n])
        return {f"r{n}": hits[n] / len(references) for n in k}
