"""Tests for cirrus_batch.plots: every figure is a real PNG, with and without optional arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cirrus_batch.metrics import confusion_matrix
from cirrus_batch.plots import confusion_matrix_plot, learning_curves, prediction_panel, reliability_diagram

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


def test_prediction_panel_full(tmp_path: Path, sample) -> None:
    images, masks, probs, sky = sample
    out = tmp_path / "panel.png"
    assert_png(prediction_panel(images, masks, probs, out, titles=["a", "b"], sky=sky), out)


def test_prediction_panel_minimal(tmp_path: Path, sample) -> None:
    images, _, probs, _ = sample
    out = tmp_path / "panel_min.png"
    assert_png(prediction_panel(images[0], None, probs[0], out), out)


def test_reliability_diagram(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    prob = rng.uniform(size=2000)
    target = (rng.uniform(size=prob.size) < prob).astype(np.uint8)
    out = tmp_path / "rel.png"
    assert_png(reliability_diagram(prob, target, out), out)
    out2 = tmp_path / "rel_w.png"
    weight = (rng.uniform(size=prob.size) < 0.5).astype(np.uint8)
    assert_png(reliability_diagram(prob**3, target, out2, bins=10, weight=weight), out2)
