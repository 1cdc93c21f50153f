"""Accuracy as an `evaluate` metric module, loaded by path so nothing comes from the Hub:

    import evaluate
    accuracy = evaluate.load("recipes/metrics/accuracy")  # this folder
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {'accuracy': 0.666...}

Same inputs and output as the Hub's ``evaluate-metric/accuracy``, without scikit-learn.
"""

import datasets
import evaluate

_DESCRIPTION = """Accuracy: the proportion of predictions equal to their references,
(TP + TN) / (TP + TN + FP + FN) for binary tasks; with ``normalize=False`` the count of
correct predictions; with ``sample_weight`` a weighted proportion."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`): the proportion (default) or, if False, the number of correct ones.
    sample_weight (`list` of `float`): per-sample weights; default all 1.
Returns:
    accuracy (`float`): in [0, 1] when normalized.
Example:
    >>> accuracy = evaluate.load("recipes/metrics/accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0], predictions=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("int64"),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if sample_weight is None:
            sample_weight = [1.0] * len(predictions)
        correct = sum(w for p, r, w in zip(predictions, references, sample_weight) if p == r)
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(sample_weight)
        return {"accuracy": float(correct / total) if total else float("nan")}
