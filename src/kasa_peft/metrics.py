"""Evaluation metrics for classification and regression, in plain Python.

Each metric takes ``predictions`` and ``references`` as equal-length 1-D sequences
(lists, tuples or 1-D torch tensors) and returns a Python float. Sums use
``math.fsum`` in float64, so results do not depend on the input dtype. The library
does not need scikit-learn or SciPy; the tests compare against both when installed.

Metric names, as used by ``compute_metrics`` and task presets:

============================  =================================================
``accuracy``                  fraction of predictions equal to the reference
``f1``                        binary F1 with class 1 as the positive class
``matthews_correlation``      Matthews correlation coefficient (multi-class form)
``pearson``                   Pearson correlation coefficient
``spearman``                  Spearman rank correlation, ties get average ranks
============================  =================================================

Undefined cases return 0.0 rather than NaN, so that a degenerate evaluation (for
example a model that predicts one class for every example) can still be logged and
compared:

- ``f1`` is 0.0 when there are no true positives. This includes the case with no
  positive predictions and no positive references, where precision and recall are
  both 0/0. scikit-learn 1.9 returns 0.0 there too (its default
  ``zero_division="warn"``) and also warns.
- ``matthews_correlation`` is 0.0 when all predictions or all references are one
  class, as in scikit-learn 1.9.
- ``pearson`` and ``spearman`` are 0.0 when either input is constant, which includes
  any input of length 1. SciPy 1.17 returns NaN with a warning there instead.

Empty inputs, inputs of different lengths, non-finite values in correlation inputs,
and values other than 0 and 1 for ``f1`` raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import torch

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS: tuple[str, ...] = ("pearson", "spearman")
METRIC_NAMES: tuple[str, ...] = CLASSIFICATION_METRICS + REGRESSION_METRICS

# Lists, tuples or 1-D tensors. For accuracy and MCC the class labels may be any hashable values.
MetricInput = Sequence[object] | torch.Tensor


def _as_list(values: MetricInput, name: str) -> list:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            shape = tuple(values.shape)
            raise ValueError(f"{name} must be a 1-D tensor; got shape {shape}. Flatten or squeeze it first.")
        return values.tolist()
    return list(values)


def _paired_lists(predictions: MetricInput, references: MetricInput, metric: str) -> tuple[list, list]:
    predicted = _as_list(predictions, "predictions")
    expected = _as_list(references, "references")
    if len(predicted) != len(expected):
        raise ValueError(
            f"{metric}: got {len(predicted)} predictions but {len(expected)} references; they must have the same length"
        )
    if not predicted:
        raise ValueError(f"{metric}: predictions and references are empty; at least one example is needed")
    return predicted, expected


def _finite_floats(values: list, name: str, metric: str) -> list[float]:
    numbers = [float(value) for value in values]
    for index, number in enumerate(numbers):
        if not math.isfinite(number):
            raise ValueError(f"{metric}: {name}[{index}] is {number}; correlations need finite values")
    return numbers


def accuracy(predictions: MetricInput, references: MetricInput) -> float:
    """Return the fraction of positions where the prediction equals the reference."""
    predicted, expected = _paired_lists(predictions, references, "accuracy")
    correct = sum(1 for p, r in zip(predicted, expected) if p == r)
    return correct / len(predicted)


def f1_score(predictions: MetricInput, references: MetricInput) -> float:
    """Return binary F1 = 2 TP / (2 TP + FP + FN) with class 1 as the positive class.

    Every value must be 0 or 1. Returns 0.0 when there are no true positives.
    """
    predicted, expected = _paired_lists(predictions, references, "f1")
    for name, values in (("predictions", predicted), ("references", expected)):
        for index, value in enumerate(values):
            if value not in (0, 1):
                raise ValueError(
                    f"f1: {name}[{index}] is {value!r}; binary F1 needs class ids 0 and 1 (1 is the positive class)"
                )

    true_positives = sum(1 for p, r in zip(predicted, expected) if p == 1 and r == 1)
    false_positives = sum(1 for p, r in zip(predicted, expected) if p == 1 and r == 0)
    false_negatives = sum(1 for p, r in zip(predicted, expected) if p == 0 and r == 1)
    if true_positives == 0:
        return 0.0
    return 2 * true_positives / (2 * true_positives + false_positives + false_negatives)


def matthews_corrcoef(predictions: MetricInput, references: MetricInput) -> float:
    """Return the Matthews correlation coefficient of class predictions.

    Uses the multi-class form over the confusion matrix, which equals
    ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))`` for two classes:
    ``(c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))`` with ``s``
    examples, ``c`` correct, ``p_k`` predicted and ``t_k`` true counts of class k.
    Returns 0.0 when the denominator is zero.
    """
    predicted, expected = _paired_lists(predictions, references, "matthews_correlation")
    total = len(predicted)
    correct = sum(1 for p, r in zip(predicted, expected) if p == r)
    predicted_counts = Counter(predicted)
    true_counts = Counter(expected)

    # Integer arithmetic keeps numerator and denominator exact until the final division.
    numerator = correct * total - sum(count * true_counts[label] for label, count in predicted_counts.items())
    predicted_spread = total * total - sum(count * count for count in predicted_counts.values())
    true_spread = total * total - sum(count * count for count in true_counts.values())
    if predicted_spread == 0 or true_spread == 0:
        return 0.0
    return numerator / (math.sqrt(predicted_spread) * math.sqrt(true_spread))


def _pearson(x: list[float], y: list[float]) -> float:
    if all(value == x[0] for value in x) or all(value == y[0] for value in y):
        return 0.0
    mean_x = math.fsum(x) / len(x)
    mean_y = math.fsum(y) / len(y)
    dx = [value - mean_x for value in x]
    dy = [value - mean_y for value in y]
    covariance = math.fsum(a * b for a, b in zip(dx, dy))
    spread = math.sqrt(math.fsum(a * a for a in dx)) * math.sqrt(math.fsum(b * b for b in dy))
    if spread == 0.0:
        return 0.0
    return max(-1.0, min(1.0, covariance / spread))


def pearson_corrcoef(predictions: MetricInput, references: MetricInput) -> float:
    """Return the Pearson correlation coefficient, or 0.0 if either input is constant."""
    predicted, expected = _paired_lists(predictions, references, "pearson")
    x = _finite_floats(predicted, "predictions", "pearson")
    y = _finite_floats(expected, "references", "pearson")
    return _pearson(x, y)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Return the 1-based ranks of ``values``, where tied values share the mean of their ranks.

    For example ``[10, 20, 20, 5]`` has ranks ``[2.0, 3.5, 3.5, 1.0]``.
    """
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        # Positions start..end (0-based) hold ranks start+1..end+1, whose mean is below.
        shared_rank = (start + end) / 2 + 1
        for position in range(start, end + 1):
            ranks[order[position]] = shared_rank
        start = end + 1
    return ranks


def spearman_corrcoef(predictions: MetricInput, references: MetricInput) -> float:
    """Return the Spearman rank correlation: Pearson's r of the average ranks.

    Returns 0.0 if either input is constant.
    """
    predicted, expected = _paired_lists(predictions, references, "spearman")
    x = _finite_floats(predicted, "predictions", "spearman")
    y = _finite_floats(expected, "references", "spearman")
    return _pearson(average_ranks(x), average_ranks(y))


METRIC_FUNCTIONS: dict[str, Callable[[MetricInput, MetricInput], float]] = {
    "accuracy": accuracy,
    "f1": f1_score,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson_corrcoef,
    "spearman": spearman_corrcoef,
}


def compute_metrics(names: Iterable[str], predictions: MetricInput, references: MetricInput) -> dict[str, float]:
    """Compute each named metric and return ``{name: value}`` in the order given.

    Raises ``ValueError`` listing the known names for an unknown metric name.
    """
    names = list(names)
    unknown = [name for name in names if name not in METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metric names {unknown}; known metrics: {list(METRIC_NAMES)}")

    predicted = _as_list(predictions, "predictions")
    expected = _as_list(references, "references")
    return {name: METRIC_FUNCTIONS[name](predicted, expected) for name in names}
