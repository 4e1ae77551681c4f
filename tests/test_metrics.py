"""Tests for cirrus_batch.metrics: hand-computed cases, sklearn agreement, calibration, streaming."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cirrus_batch.metrics import (
    METRIC_KEYS,
    MetricAccumulator,
    binary_metrics,
    confusion_matrix,
    expected_calibration_error,
)


def test_perfect_predictions() -> None:
    target = np.array([[0, 1, 1], [0, 0, 1]])
    m = binary_metrics(target.astype(float), target)
    assert set(m) == set(METRIC_KEYS)
    for key in ("accuracy", "precision", "recall", "f1", "iou", "roc_auc"):
        assert m[key] == 1.0, key
    assert m["brier"] == 0.0
    assert m["ece"] == 0.0
    assert m["n"] == 6.0
    assert m["positive_rate"] == 0.5
    assert all(isinstance(v, float) for v in m.values())


def test_all_wrong() -> None:
    target = np.array([0, 1, 0, 1])
    m = binary_metrics(1.0 - target, target)
    assert m["accuracy"] == 0.0
    assert m["precision"] == 0.0
    assert m["recall"] == 0.0
    assert m["iou"] == 0.0
    assert m["roc_auc"] == 0.0
    assert m["brier"] == 1.0
    assert m["ece"] == 1.0
    assert m["f1"] == 0.0


def test_known_counts() -> None:
    # tp=2 fp=1 fn=3 tn=4
    prob = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.4])
    target = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 0])
    cm = confusion_matrix(prob, target)
    np.testing.assert_array_equal(cm, [[4, 1], [3, 2]])
    m = binary_metrics(prob, target)
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 3))
    assert m["iou"] == pytest.approx(2 / 6)
    assert m["brier"] == pytest.approx(np.mean((prob - target) ** 2))
    assert m["positive_rate"] == pytest.approx(0.5)
    assert m["pred_positive_rate"] == pytest.approx(0.3)
    # threshold moves predictions
    np.testing.assert_array_equal(confusion_matrix(prob, target, threshold=0.05), [[0, 5], [0, 5]])


def test_roc_auc_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 2000)
    prob = np.clip(0.3 * target + rng.uniform(0, 0.7, 2000), 0, 1)
    assert binary_metrics(prob, target)["roc_auc"] == pytest.approx(roc_auc_score(target, prob), abs=1e-12)


def test_ece_calibrated_vs_overconfident() -> None:
    rng = np.random.default_rng(1)
    prob = rng.uniform(0, 1, 100_000)
    target = (rng.uniform(0, 1, prob.size) < prob).astype(np.uint8)
    assert binary_metrics(prob, target)["ece"] < 0.02
    over = np.where(prob > 0.5, 1.0, 0.0)  # hard 0/1 predictions for soft truths
    assert expected_calibration_error(over, target) > 0.2


def test_ece_hand_computed() -> None:
    # one bin [0.4, 0.467): mean prob 0.45, fraction positive 0.5 -> ece 0.05
    assert expected_calibration_error(np.array([0.44, 0.46]), np.array([0, 1])) == pytest.approx(0.05)


def test_weight_excludes_items() -> None:
    prob = np.array([0.9, 0.1, 0.9, 0.2])
    target = np.array([1, 0, 0, 1])
    weight = np.array([1, 1, 0, 0])
    m = binary_metrics(prob, target, weight=weight)
    assert m["n"] == 2.0
    assert m["accuracy"] == 1.0
    assert m == pytest.approx(binary_metrics(prob[:2], target[:2]), nan_ok=True)
    np.testing.assert_array_equal(confusion_matrix(prob, target, weight=weight), [[1, 0], [0, 1]])


def test_nan_where_undefined() -> None:
    target = np.zeros(5)
    m = binary_metrics(np.full(5, 0.2), target)
    assert m["accuracy"] == 1.0
    for key in ("precision", "recall", "f1", "iou", "roc_auc"):
        assert math.isnan(m[key]), key
    empty = binary_metrics(np.array([0.3]), np.array([1]), weight=np.array([0]))
    assert empty["n"] == 0.0
    for key in ("accuracy", "brier", "ece", "roc_auc", "positive_rate"):
        assert math.isnan(empty[key]), key
    assert all(math.isnan(v) for k, v in MetricAccumulator().compute().items() if k != "n")


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        binary_metrics(np.zeros(3), np.zeros(4))


def test_accumulator_matches_concatenation() -> None:
    rng = np.random.default_rng(2)
    acc = MetricAccumulator()
    probs, targets, weights = [], [], []
    for _ in range(5):
        shape = (3, 24, 24)
        target = (rng.uniform(size=shape) < 0.4).astype(np.uint8)
        prob = np.clip(0.35 * target + rng.beta(2, 3, shape), 0, 1)
        weight = (rng.uniform(size=shape) < 0.8).astype(np.uint8)
        acc.update(prob, target, weight)
        probs.append(prob.ravel())
        targets.append(target.ravel())
        weights.append(weight.ravel())
    acc.update(np.zeros((0,)), np.zeros((0,)))  # empty batch is a no-op
    got = acc.compute()
    want = binary_metrics(np.concatenate(probs), np.concatenate(targets), weight=np.concatenate(weights))
    assert set(got) == set(want)
    for key in METRIC_KEYS:
        if key in ("roc_auc", "ece_adaptive"):  # from histograms
            assert got[key] == pytest.approx(want[key], abs=1e-3)
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    np.testing.assert_array_equal(acc.confusion, confusion_matrix(
        np.concatenate(probs), np.concatenate(targets), weight=np.concatenate(weights)))


def test_accumulator_threshold_and_reset() -> None:
    acc = MetricAccumulator(threshold=0.3)
    acc.update(np.array([0.35, 0.2]), np.array([1, 0]))
    assert acc.compute()["accuracy"] == 1.0
    acc.reset()
    assert acc.compute()["n"] == 0.0


def test_adaptive_ece_sees_what_equal_width_bins_hide() -> None:
    # 900 clear items at p = 0.06 (too high) and 100 at p = 0.001 of which half are cloudy (far too low): one
    # equal-width bin holds both and the errors cancel; equal-mass bins keep the two groups apart
    prob = np.r_[np.full(900, 0.06), np.full(100, 0.001)]
    target = np.r_[np.zeros(900), np.arange(100) % 2]
    m = binary_metrics(prob, target)
    assert m["ece"] == pytest.approx(abs(prob.mean() - target.mean()))
    assert m["ece"] < 0.005
    assert m["ece_adaptive"] > 0.09


def test_adaptive_ece_hand_computed_and_streamed() -> None:
    from cirrus_batch.metrics import adaptive_calibration_error

    prob, target = np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 1, 1, 1])
    # two bins of two: |0.3 - 1| + |1.6 - 2| over 4 items
    assert adaptive_calibration_error(prob, target, bins=2) == pytest.approx((0.7 + 0.4) / 4)
    rng = np.random.default_rng(1)
    p = rng.beta(0.3, 0.3, 20000)
    t = rng.random(20000) < p**1.3
    acc = MetricAccumulator()
    for k in range(0, 20000, 3000):
        acc.update(p[k : k + 3000], t[k : k + 3000])
    assert acc.compute()["ece_adaptive"] == pytest.approx(binary_metrics(p, t)["ece_adaptive"], abs=2e-3)


def test_fraction_targets_count_their_majority_and_calibrate_against_the_fraction() -> None:
    """A binned probability map that says 0.3 where 30 % of the mask's pixels are cloud is calibrated: its ECE
    against the fractions is 0 (against their majority it would be 0.3); accuracy counts the majority."""
    frac = np.array([0.3, 0.3, 0.9, 0.9, 0.0, 1.0])
    prob = frac.copy()
    m = binary_metrics(prob, frac)
    assert m["ece"] == pytest.approx(0.0, abs=1e-12) and m["ece_adaptive"] == pytest.approx(0.0, abs=1e-12)
    assert m["accuracy"] == 1.0 and m["positive_rate"] == pytest.approx(0.5)
    assert m["brier"] == pytest.approx(0.0, abs=1e-12)
    hard = binary_metrics(prob, frac > 0.5)
    assert hard["ece"] == pytest.approx((0.3 + 0.3 + 0.1 + 0.1) / 6)
    acc = MetricAccumulator()
    acc.update(prob[:3], frac[:3])
    acc.update(prob[3:], frac[3:])
    streamed = acc.compute()
    for key in ("ece", "ece_adaptive", "brier", "accuracy", "iou"):
        assert streamed[key] == pytest.approx(m[key], abs=1e-9), key
