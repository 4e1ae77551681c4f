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

from cirrus_batch.metrics import adaptive_calibration_error, calibration_bins

__all__ = ["classifier_gallery", "classifier_picks", "confusion_matrix_plot", "learning_curves",
           "learning_curves_figure", "new_figure", "reliability_diagram", "save", "segmentation_gallery",
           "segmentation_picks"]

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


CURVE_PANELS = (
    ("Loss", ("loss",)),
    ("Validation: IoU / F1 / accuracy", ("iou", "f1", "accuracy", "precision", "recall", "roc_auc")),
    ("Validation: calibration", ("ece", "ece_adaptive", "brier")),
)
"""The panels of :func:`learning_curves` and the metric names (after ``val_``/``train_``) each one draws;
counts (``n``), rates and the learning rate are drawn nowhere: they are not on a 0-1 metric scale."""


def learning_curves_figure(history: Sequence[dict[str, float]]) -> Figure:
    """Three panels over the epochs: every ``*loss`` key; the validation IoU, F1, accuracy, precision, recall,
    ROC AUC; the validation ECE (equal-width and equal-mass bins) and Brier score (see :data:`CURVE_PANELS`).

    ``history`` has one dict per epoch; the x axis is its ``"epoch"`` (+1: epochs count from 1) when present,
    else 1, 2, ...; keys missing from some epochs are gaps.
    """
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    x = np.array([_value(row, "epoch") + 1 if "epoch" in row else i + 1 for i, row in enumerate(history)],
                 dtype=float)  # fmt: skip
    groups = [[k for k in keys if k != "epoch" and k.endswith("loss")]]
    groups += [[f"val_{m}" for m in names if f"val_{m}" in keys] for _, names in CURVE_PANELS[1:]]
    fig = new_figure(15, 4.2)
    axes = fig.subplots(1, 3)
    for ax, group, (title, _) in zip(axes, groups, CURVE_PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        for key in group:
            y = np.array([_value(row, key) for row in history], dtype=float)
            ok = np.isfinite(y) & np.isfinite(x)
            if ok.any():
                ax.plot(x[ok], y[ok], marker="o", markersize=3, label=key if ax is axes[0] else key.removeprefix("val_"))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax_loss = axes[0]
    if ax_loss.lines and all(ln.get_ydata().min() > 0 for ln in ax_loss.lines):
        ymin = min(ln.get_ydata().min() for ln in ax_loss.lines)
        ymax = max(ln.get_ydata().max() for ln in ax_loss.lines)
        if ymax > 20 * ymin:
            ax_loss.set_yscale("log")
    if axes[1].lines:
        axes[1].set_ylim(min(0.0, *(ln.get_ydata().min() for ln in axes[1].lines)), 1.02)
    if axes[2].lines:
        axes[2].set_ylim(0.0, max(0.05, *(1.1 * ln.get_ydata().max() for ln in axes[2].lines)))
    fig.tight_layout()
    return fig


def learning_curves(history: Sequence[dict[str, float]], out_png: str | Path) -> Path:
    """:func:`learning_curves_figure` written as PNG."""
    return save(learning_curves_figure(history), out_png)


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


GALLERY_KINDS = ("clear", "cloudy", "borderline", "misclassified")


def classifier_picks(prob: np.ndarray, label: np.ndarray, cloud_fraction: np.ndarray, threshold: float,
                     per_kind: int = 4) -> dict[str, list[int]]:  # fmt: skip
    """Test frames worth looking at, by kind: ``clear`` and ``cloudy`` (right, the most confident first),
    ``borderline`` (cloud fraction nearest ``threshold``) and ``misclassified`` (the most confident mistakes);
    each index appears once."""
    prob, label, cf = (np.asarray(a, dtype=np.float64) for a in (prob, label, cloud_fraction))
    pred, truth = prob > 0.5, label > 0.5
    taken: set[int] = set()

    def take(candidates: np.ndarray, key: np.ndarray) -> list[int]:
        out = [int(i) for i in candidates[np.argsort(key[candidates], kind="stable")] if int(i) not in taken]
        taken.update(out[:per_kind])
        return out[:per_kind]

    wrong = np.flatnonzero(pred != truth)
    picks = {"misclassified": take(wrong, -np.abs(prob - 0.5))}
    picks["borderline"] = take(np.flatnonzero(np.isfinite(cf)), np.abs(cf - threshold))
    picks["clear"] = take(np.flatnonzero(~pred & ~truth), prob)
    picks["cloudy"] = take(np.flatnonzero(pred & truth), -prob)
    return {kind: picks[kind] for kind in GALLERY_KINDS}


def classifier_gallery(images: np.ndarray, prob: np.ndarray, label: np.ndarray, cloud_fraction: np.ndarray,
                       times: Sequence[str], out_png: str | Path, threshold: float = 0.05,
                       sky: np.ndarray | None = None, per_kind: int = 4) -> Path:  # fmt: skip
    """One row per kind of :func:`classifier_picks` (clear, cloudy, borderline, misclassified test frames), each
    frame titled with its time, ``p_cloudy``, its label and cloud fraction (red title: misclassified)."""
    picks = classifier_picks(prob, label, cloud_fraction, threshold, per_kind)
    h, w = np.asarray(images).shape[1:]
    cell = 2.4
    fig = new_figure(cell * per_kind + 1.0, (cell * h / w + 0.6) * len(picks) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(picks), per_kind, squeeze=False))
    for r, (kind, idx) in enumerate(picks.items()):
        axes[r, 0].set_ylabel(f"{kind}\n({len(idx)})", fontsize=10)
        if not idx:
            axes[r, 0].text(0.5, 0.5, f"no {kind} frame", ha="center", va="center", color="gray",
                            transform=axes[r, 0].transAxes)  # fmt: skip
        for c in range(per_kind):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(idx):
                if c:
                    ax.set_axis_off()
                continue
            i = idx[c]
            ax.imshow(_stretch(images[i], sky), cmap="gray", vmin=0, vmax=1)
            wrong = (prob[i] > 0.5) != (label[i] > 0.5)
            ax.set_title(f"{str(times[i])[:16]}\np={prob[i]:.3g} {'cloudy' if label[i] > 0.5 else 'clear'} "
                         f"cf={100 * cloud_fraction[i]:.1f}%", fontsize=8, color="tab:red" if wrong else "black")  # fmt: skip
    fig.suptitle("Classifier on test frames: p = p_cloudy;\nlabel and cf (cloud fraction) from prepare "
                 f"(cloudy above {100 * threshold:g} %);\nred title: misclassified", fontsize=9)  # fmt: skip
    fig.tight_layout()
    return save(fig, out_png)


SEGMENT_KINDS = (("clear", 0.0, 0.05), ("partly cloudy", 0.05, 0.4), ("broken", 0.4, 0.85), ("overcast", 0.85, 1.01))
"""Kinds of test frame of the U-Net gallery, by the label's cloud fraction [low, high)."""


def segmentation_picks(cloud_fraction: np.ndarray, per_kind: int = 1) -> list[tuple[str, int]]:
    """(kind, index) of up to ``per_kind`` frames of each :data:`SEGMENT_KINDS` kind, the middle of its range."""
    cf = np.asarray(cloud_fraction, dtype=np.float64)
    out = []
    for kind, lo, hi in SEGMENT_KINDS:
        inside = np.flatnonzero((cf >= lo) & (cf < hi))
        mid = min((lo + hi) / 2, 1.0)
        out += [(kind, int(i)) for i in inside[np.argsort(np.abs(cf[inside] - mid), kind="stable")][:per_kind]]
    return out


def segmentation_gallery(images: np.ndarray, masks: np.ndarray, probs: np.ndarray, sky: np.ndarray,
                         times: Sequence[str], out_png: str | Path, per_kind: int = 1) -> Path:  # fmt: skip
    """Test frames spanning :data:`SEGMENT_KINDS` (by the label's cloud fraction), one per row: the image; the
    prepare label; the U-Net probability; the U-Net cloud (> 0.5, red) with the label's outline (cyan).
    Each row is titled with its time, kind, label cloud fraction and the image's IoU."""
    masks = np.asarray(masks) > 0.5
    sky = np.broadcast_to(np.asarray(sky, dtype=bool), masks.shape)
    cf = np.array([m[s].mean() if s.any() else np.nan for m, s in zip(masks, sky)])
    picks = segmentation_picks(cf, per_kind)
    n = max(len(picks), 1)
    h, w = masks.shape[1:]
    cell = 2.6
    fig = new_figure(cell * 4 + 0.8, (cell * h / w + 0.5) * n + 0.9)
    axes = np.atleast_2d(fig.subplots(n, 4, squeeze=False))
    red = ListedColormap([(0, 0, 0, 0), (1.0, 0.15, 0.1, 0.5)])
    prob_cmap = colormaps["viridis"].with_extremes(bad="0.6")
    mask_cmap = colormaps["gray"].with_extremes(bad="0.6")
    for r, (kind, i) in enumerate(picks):
        valid = sky[i]
        gray = _stretch(images[i], valid)
        p = np.where(valid, np.asarray(probs[i], dtype=np.float64), np.nan)
        pred, truth = (p > 0.5) & valid, masks[i] & valid
        union = np.count_nonzero(pred | truth)
        iou = np.count_nonzero(pred & truth) / union if union else float("nan")
        row = axes[r]
        row[0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        row[0].set_ylabel(f"{str(times[i])[:16]}\n{kind}", fontsize=9)
        row[1].imshow(np.ma.masked_invalid(np.where(valid, truth, np.nan)), cmap=mask_cmap, vmin=0, vmax=1,
                      interpolation="nearest")  # fmt: skip
        row[1].set_title(f"cloud fraction {100 * cf[i]:.1f}%", fontsize=8)
        im = row[2].imshow(np.ma.masked_invalid(p), cmap=prob_cmap, vmin=0, vmax=1)
        fig.colorbar(im, ax=row[2], fraction=0.046, pad=0.03)
        row[3].imshow(gray, cmap="gray", vmin=0, vmax=1)
        row[3].imshow(pred.astype(np.uint8), cmap=red, vmin=0, vmax=1, interpolation="nearest")
        if truth.any() and not truth[valid].all():
            row[3].contour(truth.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        row[3].set_title(f"IoU {iou:.3f}" if np.isfinite(iou) else "IoU - (no cloud in either)", fontsize=8)
    for j, name in enumerate(("image (stretched)", "prepare label (white: cloud)", "U-Net probability",
                              "U-Net cloud > 0.5")):  # fmt: skip
        axes[0, j].set_title(f"{name}\n{axes[0, j].get_title()}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if not picks:
        axes[0, 0].text(0.5, 0.5, "no test frame", ha="center", va="center", transform=axes[0, 0].transAxes)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=(1.0, 0.15, 0.1, 0.5), label="U-Net cloud (p > 0.5)"),
                        Line2D([], [], color="cyan", lw=1, label="prepare label outline"),
                        Patch(color="0.6", label="not sky")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, out_png)


def reliability_diagram(
    prob: np.ndarray,
    target: np.ndarray,
    out_png: str | Path,
    bins: int = 15,
    weight: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Calibration curve (fraction positive, i.e. the mean target, vs mean probability per equal-width bin, with
    the count of each bin written beside its point) over a count histogram; the title gives n, the ECE and the
    equal-mass ECE."""
    count, sum_prob, sum_target = calibration_bins(prob, target, bins, weight)
    n = count.sum()
    ok = count > 0
    mean_p = np.divide(sum_prob, count, out=np.full(bins, np.nan), where=ok)
    frac_pos = np.divide(sum_target, count, out=np.full(bins, np.nan), where=ok)
    ece = float(np.abs(sum_prob - sum_target).sum() / n) if n > 0 else math.nan
    ece_adaptive = adaptive_calibration_error(prob, target, bins, weight)
    edges = np.linspace(0, 1, bins + 1)
    centers = 0.5 * (edges[:-1] + edges[1:])
    width = 1.0 / bins

    fig = new_figure(5.5, 6.5)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
    ax.bar(centers[ok], frac_pos[ok] - mean_p[ok], bottom=mean_p[ok], width=width * 0.9, color="tab:red",
           alpha=0.3, label="gap")
    ax.plot(mean_p[ok], frac_pos[ok], marker="o", color="tab:blue", label="model")
    for xp, yp, c in zip(mean_p[ok], frac_pos[ok], count[ok]):
        ax.annotate(f"{int(c):,}", (xp, yp), textcoords="offset points", xytext=(4, -10), fontsize=7, color="0.3")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction positive")
    ax.set_title(f"{title + chr(10) if title else ''}Reliability (n={int(n):,}, ECE={ece:.4f}, "
                 f"equal-mass ECE={ece_adaptive:.4f})", fontsize=10)  # fmt: skip
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
