"""Diagnostic figures for training and evaluation; every function writes one PNG and returns its Path.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no global state, safe
in worker threads and without a display).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cirrus_batch.metrics import calibration_bins

__all__ = ["confusion_matrix_plot", "learning_curves", "new_figure", "prediction_panel", "reliability_diagram", "save"]

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas (inches), outside pyplot's global state."""
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, out_png: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG (creating the folder) and return the path."""
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def _value(row: dict[str, float], key: str) -> float:
    v = row.get(key)
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def learning_curves(history: Sequence[dict[str, float]], out_png: str | Path) -> Path:
    """Loss curves (left: every ``*loss`` key) and validation metrics (right: every other ``val_*`` key).

    ``history`` has one dict per epoch; the x axis is its ``"epoch"`` when present, else 1, 2, ...; keys
    missing from some epochs are gaps.
    """
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    x = np.array(
        [_value(row, "epoch") if "epoch" in row else i + 1 for i, row in enumerate(history)], dtype=float
    )
    loss_keys = [k for k in keys if k != "epoch" and k.endswith("loss")]
    metric_keys = [k for k in keys if k.startswith("val_") and not k.endswith("loss")]

    fig = new_figure(11, 4.2)
    ax_loss, ax_met = fig.subplots(1, 2)
    for ax, group, title in ((ax_loss, loss_keys, "Loss"), (ax_met, metric_keys, "Validation metrics")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        for key in group:
            y = np.array([_value(row, key) for row in history], dtype=float)
            ok = np.isfinite(y) & np.isfinite(x)
            if ok.any():
                ax.plot(x[ok], y[ok], marker="o", markersize=3, label=key)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    if ax_loss.lines and all(ln.get_ydata().min() > 0 for ln in ax_loss.lines):
        ymin = min(ln.get_ydata().min() for ln in ax_loss.lines)
        ymax = max(ln.get_ydata().max() for ln in ax_loss.lines)
        if ymax > 20 * ymin:
            ax_loss.set_yscale("log")
    fig.tight_layout()
    return save(fig, out_png)


def confusion_matrix_plot(
    cm: np.ndarray, labels: tuple[str, str], out_png: str | Path, title: str = ""
) -> Path:
    """Confusion matrix (rows: true, columns: predicted): colour = row-normalized %, text = count and %."""
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(labels) != k:
        raise ValueError(f"cm must be square with one label per class, got {cm.shape} and {len(labels)}")
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    fig = new_figure(5.2, 4.4)
    ax = fig.add_subplot()
    im = ax.imshow(frac * 100, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, label="% of true class")
    for i in range(k):
        for j in range(k):
            color = "white" if frac[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(cm[i, j]):,}\n{100 * frac[i, j]:.1f}%", ha="center", va="center",
                    color=color, fontsize=11)
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = cm.sum()
    acc = np.trace(cm) / total if total > 0 else math.nan
    ax.set_title(f"{title}{' - ' if title else ''}n={int(total):,}, accuracy={acc:.3f}", fontsize=10)
    fig.tight_layout()
    return save(fig, out_png)


def _stack(a: np.ndarray | None, n_dims: int = 3) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a)
    return a[None] if a.ndim == n_dims - 1 else a


def _stretch(image: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """Robust 1-99 percentile stretch to [0, 1] (percentiles over ``valid`` finite pixels)."""
    img = np.asarray(image, dtype=np.float64)
    ok = np.isfinite(img) if valid is None else np.isfinite(img) & valid
    if not ok.any():
        return np.zeros_like(img)
    lo, hi = np.percentile(img[ok], [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((img - lo) / (hi - lo), 0, 1)
    return np.where(np.isfinite(out), out, 0.0)


def prediction_panel(
    images: np.ndarray,
    masks: np.ndarray | None,
    probs: np.ndarray,
    out_png: str | Path,
    titles: list[str] | None = None,
    sky: np.ndarray | None = None,
) -> Path:
    """One row per sample: image, true mask (when given), probability map, prediction (> 0.5) overlay.

    ``images``/``masks``/``probs`` are ``(N, H, W)`` (or a single ``(H, W)``); ``sky`` is an optional bool
    mask ``(H, W)`` or ``(N, H, W)``: pixels outside it are grey in the mask and probability columns and
    ignored by the image stretch.
    """
    imgs = _stack(images)
    prb = _stack(probs)
    msk = _stack(masks)
    n = imgs.shape[0]
    if prb.shape != imgs.shape or (msk is not None and msk.shape != imgs.shape):
        raise ValueError("images, masks and probs must have the same shape")
    if sky is not None:
        sky = np.broadcast_to(np.asarray(sky, dtype=bool), imgs.shape)
    cols = ["image"] + (["true mask"] if msk is not None else []) + ["probability", "prediction > 0.5"]
    ncol = len(cols)
    h, w = imgs.shape[1:]
    cell = 2.6
    fig = new_figure(cell * ncol + 0.8, max(cell * n * h / w, 2.0) + 0.5)
    axes = np.atleast_2d(fig.subplots(n, ncol, squeeze=False))
    red = ListedColormap([(0, 0, 0, 0), (1.0, 0.15, 0.1, 0.45)])
    prob_cmap = colormaps["viridis"].with_extremes(bad="0.6")
    mask_cmap = colormaps["gray"].with_extremes(bad="0.6")
    for i in range(n):
        valid = None if sky is None else sky[i]
        gray = _stretch(imgs[i], valid)
        p = np.asarray(prb[i], dtype=np.float64)
        if valid is not None:
            p = np.where(valid, p, np.nan)
        pred = (np.nan_to_num(p, nan=0.0) > 0.5).astype(np.uint8)
        row = list(axes[i])
        ax = row.pop(0)
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        if titles is not None and i < len(titles):
            ax.set_ylabel(titles[i], fontsize=8)
        if msk is not None:
            ax = row.pop(0)
            m = np.asarray(msk[i], dtype=np.float64)
            if valid is not None:
                m = np.where(valid, m, np.nan)
            ax.imshow(np.ma.masked_invalid(m), cmap=mask_cmap, vmin=0, vmax=1, interpolation="nearest")
        ax = row.pop(0)
        im = ax.imshow(np.ma.masked_invalid(p), cmap=prob_cmap, vmin=0, vmax=1)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        ax = row.pop(0)
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        ax.imshow(pred, cmap=red, vmin=0, vmax=1, interpolation="nearest")
        if msk is not None:
            truth = np.asarray(msk[i]) > 0.5
            if truth.any() and not truth.all():
                ax.contour(truth.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    for j, name in enumerate(cols):
        axes[0, j].set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save(fig, out_png)


def reliability_diagram(
    prob: np.ndarray,
    target: np.ndarray,
    out_png: str | Path,
    bins: int = 15,
    weight: np.ndarray | None = None,
) -> Path:
    """Calibration curve (fraction positive vs mean probability per bin, with ECE) over a count histogram."""
    count, sum_prob, sum_target = calibration_bins(prob, target, bins, weight)
    n = count.sum()
    ok = count > 0
    mean_p = np.divide(sum_prob, count, out=np.full(bins, np.nan), where=ok)
    frac_pos = np.divide(sum_target, count, out=np.full(bins, np.nan), where=ok)
    ece = float(np.abs(sum_prob - sum_target).sum() / n) if n > 0 else math.nan
    edges = np.linspace(0, 1, bins + 1)
    centers = 0.5 * (edges[:-1] + edges[1:])
    width = 1.0 / bins

    fig = new_figure(5.5, 6.5)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    ax.bar(centers[ok], frac_pos[ok] - mean_p[ok], bottom=mean_p[ok], width=width * 0.9, color="tab:red",
           alpha=0.3, label="gap")
    ax.plot(mean_p[ok], frac_pos[ok], marker="o", color="tab:blue", label="model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction positive")
    ax.set_title(f"Reliability diagram (n={int(n):,}, ECE={ece:.4f})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax_hist.bar(centers, count, width=width * 0.9, color="tab:blue", alpha=0.7)
    if n > 0 and count[ok].max() > 50 * max(count[ok].min(), 1):
        ax_hist.set_yscale("log")
    ax_hist.set_xlabel("predicted probability")
    ax_hist.set_ylabel("count")
    ax_hist.grid(True, alpha=0.3)
    fig.tight_layout()
    return save(fig, out_png)
