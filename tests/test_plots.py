"""Tests for cirrus_batch.plots: every figure is a real PNG, with and without optional arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cirrus_batch.metrics import confusion_matrix
from cirrus_batch.plots import (
    classifier_gallery,
    classifier_picks,
    confusion_matrix_plot,
    learning_curves,
    learning_curves_figure,
    reliability_diagram,
    segmentation_gallery,
    segmentation_picks,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, expected: Path) -> None:
    assert path == expected
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


@pytest.fixture
def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :32]
    sky = (yy - 12) ** 2 + (xx - 16) ** 2 < 11**2
    masks = np.stack([(xx > 10 + 5 * i) & sky for i in range(2)]).astype(np.uint8)
    images = 3000.0 + 2000.0 * masks + rng.normal(0, 100, masks.shape)
    probs = np.clip(0.8 * masks + rng.uniform(0, 0.3, masks.shape), 0, 1)
    return images, masks, probs, sky


def test_learning_curves(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": 0.65, "val_f1": 0.5, "val_iou": 0.4, "val_accuracy": 0.7},
        {"epoch": 2, "train_loss": 0.5, "val_loss": 0.55, "val_f1": 0.6, "val_ece": 0.08},
        {"epoch": 3, "train_loss": 0.4, "val_f1": 0.7, "val_iou": 0.55, "val_ece": 0.05, "lr": 1e-3},
    ]
    out = tmp_path / "sub" / "curves.png"
    assert_png(learning_curves(history, out), out)


def test_learning_curves_losses_only_and_no_epoch(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    assert_png(learning_curves([{"train_loss": 1.0}, {"train_loss": 0.01}], str(out)), out)


def test_confusion_matrix_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cm = confusion_matrix(rng.uniform(size=500), rng.integers(0, 2, 500))
    out = tmp_path / "cm.png"
    assert_png(confusion_matrix_plot(cm, ("clear", "cloud"), out, title="val"), out)
    out2 = tmp_path / "cm_empty_row.png"
    assert_png(confusion_matrix_plot(np.array([[0, 0], [3, 7]]), ("clear", "cloud"), out2), out2)


def test_learning_curves_keep_counts_off_the_metric_axes() -> None:
    # what train logs every epoch: val_n is 374 780 sky pixels for the U-Net; drawn beside IoU it flattens
    # every curve at 0
    history = [{"epoch": e, "train_loss": 0.7 - 0.1 * e, "lr": 1e-3, "val_loss": 0.6 - 0.1 * e, "val_iou": 0.5 + 0.1 * e,
                "val_f1": 0.6 + 0.1 * e, "val_accuracy": 0.8, "val_ece": 0.05, "val_ece_adaptive": 0.06,
                "val_brier": 0.1, "val_n": 374780.0, "val_positive_rate": 0.3, "val_pred_positive_rate": 0.31}
               for e in range(3)]  # fmt: skip
    fig = learning_curves_figure(history)
    loss, quality, calibration = fig.axes
    labels = {ax.get_title(): {ln.get_label() for ln in ax.lines} for ax in fig.axes}
    assert {ln.get_label() for ln in loss.lines} == {"train_loss", "val_loss"}
    assert {ln.get_label() for ln in quality.lines} == {"iou", "f1", "accuracy"}
    assert {ln.get_label() for ln in calibration.lines} == {"ece", "ece_adaptive", "brier"}
    drawn = set().union(*labels.values())
    assert not drawn & {"n", "val_n", "positive_rate", "pred_positive_rate", "lr"}
    for ax in (quality, calibration):  # metric axes stay on the metric scale
        assert max(ln.get_ydata().max() for ln in ax.lines) <= 1.0 and ax.get_ylim()[1] <= 1.02
    assert list(loss.lines[0].get_xdata()) == [1, 2, 3]  # epochs count from 1


def test_classifier_gallery_shows_each_kind_once(tmp_path: Path) -> None:
    prob = np.array([0.01, 0.2, 0.97, 0.6, 0.45, 0.9, 0.03, 0.99])
    label = np.array([0, 0, 1, 0, 1, 1, 0, 1])
    cf = np.array([0.0, 0.03, 0.4, 0.049, 0.052, 0.2, 0.01, 0.9])
    picks = classifier_picks(prob, label, cf, 0.05, per_kind=2)
    assert list(picks) == ["clear", "cloudy", "borderline", "misclassified"]
    assert picks["misclassified"] == [3, 4] and picks["borderline"] == [1, 6]  # 3, 4 are taken already
    assert picks["clear"] == [0] and picks["cloudy"] == [7, 2]
    times = [f"2026-01-05T20:{i:02d}:00" for i in range(8)]
    images = np.random.default_rng(0).normal(size=(8, 24, 32))
    out = tmp_path / "gallery.png"
    assert_png(classifier_gallery(images, prob, label, cf, times, out, 0.05, per_kind=2), out)


def test_segmentation_gallery_spans_the_kinds(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:24, :32]
    sky = (yy - 12) ** 2 + (xx - 16) ** 2 < 11**2
    masks = np.stack([(xx < x) & sky for x in (0, 3, 8, 16, 30, 40)]).astype(np.float32)
    cf = masks[:, sky].mean(axis=1)
    assert [k for k, _ in segmentation_picks(cf)] == ["clear", "partly cloudy", "broken", "overcast"]
    probs = np.clip(masks + rng.normal(0, 0.2, masks.shape), 0, 1)
    images = 3000.0 + 2000.0 * masks + rng.normal(0, 100, masks.shape)
    times = [f"2026-01-05T2{i}:00:00" for i in range(6)]
    out = tmp_path / "seg.png"
    assert_png(segmentation_gallery(images, masks, probs, sky, times, out), out)


def test_reliability_diagram(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    prob = rng.uniform(size=2000)
    target = (rng.uniform(size=prob.size) < prob).astype(np.uint8)
    out = tmp_path / "rel.png"
    assert_png(reliability_diagram(prob, target, out), out)
    out2 = tmp_path / "rel_w.png"
    weight = (rng.uniform(size=prob.size) < 0.5).astype(np.uint8)
    assert_png(reliability_diagram(prob**3, target, out2, bins=10, weight=weight), out2)
