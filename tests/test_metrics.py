"""Metrics against hand-computed values, float64 torch references, and scikit-learn/SciPy.

The scikit-learn and SciPy comparisons are skipped when those packages are missing;
the hand-computed cases always run. Tolerances are stated per test: exact rational
values are compared to 1e-12, which leaves room only for float64 rounding.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kasa_peft.metrics import (
    METRIC_NAMES,
    accuracy,
    average_ranks,
    compute_metrics,
    f1_score,
    matthews_corrcoef,
    pearson_corrcoef,
    spearman_corrcoef,
)

TOL = 1e-12


def test_accuracy_hand_computed():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(0.5, abs=TOL)
    assert accuracy(["a", "b"], ["a", "b"]) == 1.0
    assert accuracy([0], [1]) == 0.0


def test_f1_hand_computed():
    # TP = 2 (positions 0, 4), FP = 1 (position 1), FN = 1 (position 3): F1 = 4 / 6.
    assert f1_score([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3, abs=TOL)
    assert f1_score([1, 0], [1, 0]) == 1.0


def test_f1_no_true_positives_is_zero():
    assert f1_score([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1_score([0, 0, 0], [1, 1, 0]) == 0.0
    assert f1_score([1, 1, 0], [0, 0, 0]) == 0.0


def test_f1_rejects_non_binary_values():
    with pytest.raises(ValueError, match=r"predictions\[1\] is 2; binary F1 needs class ids 0 and 1"):
        f1_score([0, 2], [0, 1])


def test_matthews_binary_hand_computed():
    # TP = 2, TN = 1, FP = 1, FN = 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6.
    predictions = [1, 1, 0, 0, 1]
    references = [1, 0, 0, 1, 1]
    assert matthews_corrcoef(predictions, references) == pytest.approx(1 / 6, abs=TOL)


def test_matthews_multiclass_hand_computed():
    # s = 6 examples, c = 3 correct, predicted counts (3, 1, 2), true counts (2, 2, 2):
    # (3*6 - (3*2 + 1*2 + 2*2)) / sqrt((36 - 14) * (36 - 12)) = 6 / sqrt(528).
    predictions = [0, 2, 1, 0, 0, 2]
    references = [0, 1, 2, 0, 1, 2]
    assert matthews_corrcoef(predictions, references) == pytest.approx(6 / math.sqrt(528), abs=TOL)


def test_matthews_perfect_and_inverted():
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0, abs=TOL)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0, abs=TOL)


def test_matthews_constant_predictions_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0
    assert matthews_corrcoef([0, 1, 1, 0], [1, 1, 1, 1]) == 0.0


def test_pearson_hand_computed():
    # dx = (-1.5, -0.5, 0.5, 1.5), dy = (-3, -1, 0, 4): r = 11 / sqrt(5 * 26).
    assert pearson_corrcoef([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130), abs=TOL)


def test_pearson_constant_input_is_zero():
    assert pearson_corrcoef([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) == 0.0
    assert pearson_corrcoef([1.0, 2.0, 3.0], [2.5, 2.5, 2.5]) == 0.0
    assert pearson_corrcoef([1.0], [2.0]) == 0.0


def test_average_ranks_ties():
    assert average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert average_ranks([3, 3, 3]) == [2.0, 2.0, 2.0]
    assert average_ranks([0.5, -1.0, 0.5, 0.5, 2.0]) == [3.0, 1.0, 3.0, 3.0, 5.0]


def test_spearman_with_ties_hand_computed():
    # Ranks (2, 3.5, 3.5, 1) against (1, 2, 3, 4): r = -1.5 / sqrt(4.5 * 5) = -1 / sqrt(10).
    assert spearman_corrcoef([10, 20, 20, 5], [1, 2, 3, 4]) == pytest.approx(-1 / math.sqrt(10), abs=TOL)


def test_spearman_monotonic_is_one():
    assert spearman_corrcoef([1.0, 2.0, 30.0, 400.0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0, abs=TOL)


def test_spearman_constant_input_is_zero():
    assert spearman_corrcoef([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0


def test_pearson_matches_torch_float64():
    # Reference: torch.corrcoef on the same float64 tensors. Tolerance 1e-12.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=generator, dtype=torch.float64)
    y = 0.3 * x + torch.randn(500, generator=generator, dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    assert pearson_corrcoef(x, y) == pytest.approx(expected, abs=TOL)


def test_metrics_accept_tensors():
    predictions = torch.tensor([1, 1, 0, 0, 1])
    references = torch.tensor([1, 0, 0, 1, 1])
    assert accuracy(predictions, references) == pytest.approx(0.6, abs=TOL)
    assert f1_score(predictions, references) == pytest.approx(2 / 3, abs=TOL)
    assert matthews_corrcoef(predictions, references) == pytest.approx(1 / 6, abs=TOL)
    # float16 input: compared with the float64 result of the same float16 values.
    half = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float16)
    assert pearson_corrcoef(half, [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130), abs=TOL)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="accuracy: predictions and references are empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="got 2 predictions but 3 references"):
        pearson_corrcoef([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"must be a 1-D tensor; got shape \(2, 1\)"):
        pearson_corrcoef(torch.zeros(2, 1), [1.0, 2.0])
    with pytest.raises(ValueError, match=r"spearman: predictions\[1\] is nan"):
        spearman_corrcoef([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"pearson: references\[0\] is inf"):
        pearson_corrcoef([1.0, 2.0], [float("inf"), 2.0])


def test_compute_metrics_names():
    scores = compute_metrics(["f1", "accuracy"], [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert list(scores) == ["f1", "accuracy"]
    assert scores["f1"] == pytest.approx(2 / 3, abs=TOL)
    assert scores["accuracy"] == pytest.approx(0.6, abs=TOL)
    assert set(METRIC_NAMES) == {"accuracy", "f1", "matthews_correlation", "pearson", "spearman"}


def test_compute_metrics_unknown_name():
    with pytest.raises(ValueError, match=r"unknown metric names \['auc'\]; known metrics: \['accuracy'"):
        compute_metrics(["accuracy", "auc"], [1], [1])


def _random_classes(seed: int, size: int, num_classes: int) -> tuple[list[int], list[int]]:
    generator = random.Random(seed)
    references = [generator.randrange(num_classes) for _ in range(size)]
    # Predictions agree with the reference 60% of the time, so scores are neither 0 nor 1.
    predictions = [r if generator.random() < 0.6 else generator.randrange(num_classes) for r in references]
    return predictions, references


def test_classification_matches_sklearn():
    # Tolerance 1e-12: both compute float64 ratios of integer counts.
    metrics = pytest.importorskip("sklearn.metrics")
    for seed, num_classes in [(0, 2), (1, 2), (2, 3), (3, 5)]:
        predictions, references = _random_classes(seed, 300, num_classes)
        assert accuracy(predictions, references) == pytest.approx(
            metrics.accuracy_score(references, predictions), abs=TOL
        )
        assert matthews_corrcoef(predictions, references) == pytest.approx(
            metrics.matthews_corrcoef(references, predictions), abs=TOL
        )
        if num_classes == 2:
            assert f1_score(predictions, references) == pytest.approx(
                metrics.f1_score(references, predictions), abs=TOL
            )


def test_correlations_match_scipy():
    # Tolerance 1e-10, because SciPy sums in a different order. Both use float64.
    stats = pytest.importorskip("scipy.stats")
    generator = random.Random(7)
    x = [generator.gauss(0.0, 1.0) for _ in range(400)]
    y = [0.5 * a + generator.gauss(0.0, 1.0) for a in x]
    # Rounding to one decimal creates many ties, which exercises average ranks.
    tied_x = [round(a, 1) for a in x]
    tied_y = [round(b, 1) for b in y]
    for a, b in [(x, y), (tied_x, tied_y)]:
        assert pearson_corrcoef(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-10)
        assert spearman_corrcoef(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-10)
