"""Binary classification / segmentation metrics: numpy in, plain ``float`` out.

Every function takes probabilities ``prob`` in [0, 1] (any shape), a ``target`` of the same shape and an
optional 0/1 ``weight`` mask of the items to count (sky pixels, pixels still valid after augmentation, ...).
Items whose ``prob`` is not finite are ignored as well. A prediction is positive when ``prob > threshold``.
A target is 0/1, or the fraction of the item that is positive (a binned pixel's cloud fraction): the counts
(accuracy ... IoU) and the ROC AUC take its majority (> 0.5), while calibration (ECE, reliability bins) and the
Brier score compare the probability with the fraction itself. For a probability map at a coarser resolution
than its mask that is its calibration against every pixel of the mask: scored against the majority, a map
that says 0.3 where 30 % of the pixels are cloud would look miscalibrated.

Undefined quantities (precision with no positive prediction, ROC AUC with one class, anything on zero items)
are ``nan``, never exceptions. :class:`MetricAccumulator` computes the same numbers over many batches in
constant memory (ROC AUC from per-class histograms, see its docstring).

Two calibration errors: ``ece`` over equal-width bins of [0, 1], and ``ece_adaptive`` over equal-mass bins
(each holds the same number of items). With most probabilities near 0 or 1, equal-width bins put nearly
everything in the two end bins and hide how the rest is calibrated; equal-mass bins do not.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "METRIC_KEYS",
    "MetricAccumulator",
    "adaptive_calibration_error",
    "binary_metrics",
    "calibration_bins",
    "confusion_matrix",
    "expected_calibration_error",
]

METRIC_KEYS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "iou",
    "roc_auc",
    "brier",
    "ece",
    "ece_adaptive",
    "n",
    "positive_rate",
    "pred_positive_rate",
)
"""Keys of :func:`binary_metrics` and :meth:`MetricAccumulator.compute` (``positive_rate`` is the fraction
of positive targets, ``pred_positive_rate`` the fraction of positive predictions)."""

NAN = float("nan")


def _prepare(
    prob: np.ndarray, target: np.ndarray, weight: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Flattened float64 ``prob`` and float64 ``target`` (clipped to [0, 1]) of the counted items."""
    p = np.asarray(prob, dtype=np.float64)
    t = np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"prob shape {p.shape} != target shape {t.shape}")
    keep = np.isfinite(p)
    if weight is not None:
        w = np.asarray(weight)
        if w.shape != p.shape:
            raise ValueError(f"weight shape {w.shape} != prob shape {p.shape}")
        keep &= w > 0
    return p[keep].ravel(), np.clip(t[keep].astype(np.float64), 0.0, 1.0).ravel()


def _div(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else NAN


def _bin_index(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each probability in [0, 1] (1.0 goes to the last bin, out-of-range values clip)."""
    return np.clip((p * bins).astype(np.int64), 0, bins - 1)


def _count_metrics(tn: float, fp: float, fn: float, tp: float) -> dict[str, float]:
    n = tn + fp + fn + tp
    return {
        "accuracy": _div(tp + tn, n),
        "precision": _div(tp, tp + fp),
        "recall": _div(tp, tp + fn),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "iou": _div(tp, tp + fp + fn),
        "n": float(n),
        "positive_rate": _div(tp + fn, n),
        "pred_positive_rate": _div(tp + fp, n),
    }


def _ece_from_bins(count: np.ndarray, sum_prob: np.ndarray, sum_target: np.ndarray) -> float:
    n = count.sum()
    if n <= 0:
        return NAN
    return float(np.abs(sum_prob - sum_target).sum() / n)  # sum_b n_b/n * |mean_p_b - mean_t_b|


def confusion_matrix(
    prob: np.ndarray, target: np.ndarray, threshold: float = 0.5, weight: np.ndarray | None = None
) -> np.ndarray:
    """2x2 int64 counts ``[[tn, fp], [fn, tp]]`` (rows: true class, columns: predicted class)."""
    p, t = _prepare(prob, target, weight)
    pred, t = p > threshold, t > 0.5
    tp = int(np.count_nonzero(pred & t))
    fp = int(np.count_nonzero(pred & ~t))
    fn = int(np.count_nonzero(~pred & t))
    tn = int(p.size - tp - fp - fn)
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


def calibration_bins(
    prob: np.ndarray, target: np.ndarray, bins: int = 15, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of [0, 1]: ``(count, sum of prob, sum of target)`` as float64 arrays."""
    p, t = _prepare(prob, target, weight)
    idx = _bin_index(p, bins)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    sum_prob = np.bincount(idx, weights=p, minlength=bins)
    sum_target = np.bincount(idx, weights=t, minlength=bins)
    return count, sum_prob, sum_target


def expected_calibration_error(
    prob: np.ndarray, target: np.ndarray, bins: int = 15, weight: np.ndarray | None = None
) -> float:
    """ECE: ``sum_b n_b / n * |mean prob_b - fraction positive_b|`` over ``bins`` equal-width bins."""
    return _ece_from_bins(*calibration_bins(prob, target, bins, weight))


def adaptive_calibration_error(
    prob: np.ndarray, target: np.ndarray, bins: int = 15, weight: np.ndarray | None = None
) -> float:
    """ECE over ``bins`` equal-mass bins: the items sorted by probability, cut into ``bins`` runs of (nearly)
    equal length, ``sum_b n_b / n * |mean prob_b - fraction positive_b|``."""
    p, t = _prepare(prob, target, weight)
    if p.size == 0:
        return NAN
    order = np.argsort(p, kind="stable")
    edges = np.linspace(0, p.size, min(bins, p.size) + 1).round().astype(np.int64)
    sum_prob = np.add.reduceat(p[order], edges[:-1])
    sum_target = np.add.reduceat(t[order], edges[:-1])
    return float(np.abs(sum_prob - sum_target).sum() / p.size)


def _adaptive_from_fine(count: np.ndarray, sum_prob: np.ndarray, sum_target: np.ndarray, bins: int) -> float:
    """Adaptive ECE from a fine histogram in increasing probability: consecutive fine bins merged into ``bins``
    groups of about equal mass (a fine bin is never split)."""
    n = count.sum()
    if n <= 0:
        return NAN
    group = np.minimum((np.cumsum(count) - count / 2) * bins // n, bins - 1).astype(np.int64)
    gp = np.bincount(group, weights=sum_prob, minlength=bins)
    gt = np.bincount(group, weights=sum_target, minlength=bins)
    return float(np.abs(gp - gt).sum() / n)


def binary_metrics(
    prob: np.ndarray, target: np.ndarray, threshold: float = 0.5, weight: np.ndarray | None = None
) -> dict[str, float]:
    """Accuracy, precision, recall, F1, IoU, ROC AUC, Brier, ECE (15 equal-width and 15 equal-mass bins), n and
    positive rates.

    ``roc_auc`` is :func:`sklearn.metrics.roc_auc_score` (exact), ``nan`` when only one class is present.
    """
    p, t = _prepare(prob, target, weight)
    (tn, fp), (fn, tp) = confusion_matrix(p, t, threshold)
    out = _count_metrics(int(tn), int(fp), int(fn), int(tp))
    pos = t > 0.5
    if 0 < int(pos.sum()) < t.size:
        from sklearn.metrics import roc_auc_score  # lazy: sklearn is slow to import

        out["roc_auc"] = float(roc_auc_score(pos, p))
    else:
        out["roc_auc"] = NAN
    out["brier"] = float(np.mean((p - t) ** 2)) if t.size else NAN
    out["ece"] = expected_calibration_error(p, t, 15)
    out["ece_adaptive"] = adaptive_calibration_error(p, t, 15)
    return {k: out[k] for k in METRIC_KEYS}


class MetricAccumulator:
    """Streaming :func:`binary_metrics` over many batches in constant memory.

    Keeps the confusion counts at ``threshold``, the calibration histogram (``bins`` equal-width bins: count,
    sum of prob, sum of target), the Brier sum and, for the ROC AUC, one ``auc_bins``-bin probability
    histogram per class. Counts, accuracy..IoU, Brier and ECE equal the one-shot values (up to float
    summation order). The AUC is approximate: pairs of a positive and a negative in different histogram bins
    are ordered exactly, pairs within one bin count as ties (1/2), so the error is at most half the fraction
    of positive/negative pairs sharing a bin, in practice < 1e-3 with 1000 bins unless the probabilities
    pile up inside a single 1/``auc_bins`` interval.

    ``ece_adaptive`` comes from a fine histogram of the logit (``FINE_BINS`` bins over [-``FINE_LOGIT``,
    ``FINE_LOGIT``], each with count, sum of prob and sum of target) whose consecutive bins are merged into
    ``bins`` groups of about equal mass: within ~1e-3 of the exact value unless many items share one fine bin.
    """

    FINE_BINS = 4000
    FINE_LOGIT = 20.0

    def __init__(self, threshold: float = 0.5, bins: int = 15, auc_bins: int = 1000) -> None:
        if bins < 1 or auc_bins < 1:
            raise ValueError("bins and auc_bins must be >= 1")
        self.threshold = float(threshold)
        self.bins = int(bins)
        self.auc_bins = int(auc_bins)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.confusion = np.zeros((2, 2), dtype=np.int64)
        self.cal_count = np.zeros(self.bins, dtype=np.float64)
        self.cal_sum_prob = np.zeros(self.bins, dtype=np.float64)
        self.cal_sum_target = np.zeros(self.bins, dtype=np.float64)
        self.brier_sum = 0.0
        self.hist_pos = np.zeros(self.auc_bins, dtype=np.int64)
        self.hist_neg = np.zeros(self.auc_bins, dtype=np.int64)
        self.fine = np.zeros((3, self.FINE_BINS), dtype=np.float64)

    def update(self, prob: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None) -> None:
        """Add one batch (same conventions as :func:`binary_metrics`)."""
        p, t = _prepare(prob, target, weight)
        if p.size == 0:
            return
        self.confusion += confusion_matrix(p, t, self.threshold)
        tf, t = t, t > 0.5
        idx = _bin_index(p, self.bins)
        self.cal_count += np.bincount(idx, minlength=self.bins)
        self.cal_sum_prob += np.bincount(idx, weights=p, minlength=self.bins)
        self.cal_sum_target += np.bincount(idx, weights=tf, minlength=self.bins)
        self.brier_sum += float(np.sum((p - tf) ** 2))
        aidx = _bin_index(p, self.auc_bins)
        self.hist_pos += np.bincount(aidx[t], minlength=self.auc_bins)
        self.hist_neg += np.bincount(aidx[~t], minlength=self.auc_bins)
        with np.errstate(divide="ignore"):
            logit = np.clip(np.log(p) - np.log1p(-p), -self.FINE_LOGIT, self.FINE_LOGIT)
        fidx = _bin_index((logit + self.FINE_LOGIT) / (2 * self.FINE_LOGIT), self.FINE_BINS)
        self.fine[0] += np.bincount(fidx, minlength=self.FINE_BINS)
        self.fine[1] += np.bincount(fidx, weights=p, minlength=self.FINE_BINS)
        self.fine[2] += np.bincount(fidx, weights=tf, minlength=self.FINE_BINS)

    def roc_auc(self) -> float:
        """Histogram ROC AUC: P(score_pos > score_neg) + P(same bin) / 2; ``nan`` with one class."""
        pos = self.hist_pos.astype(np.float64)
        neg = self.hist_neg.astype(np.float64)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos == 0 or n_neg == 0:
            return NAN
        neg_below = np.cumsum(neg) - neg
        return float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg))

    def compute(self) -> dict[str, float]:
        """Metrics of everything seen so far (same keys as :func:`binary_metrics`)."""
        (tn, fp), (fn, tp) = self.confusion
        out = _count_metrics(int(tn), int(fp), int(fn), int(tp))
        n = out["n"]
        out["roc_auc"] = self.roc_auc()
        out["brier"] = self.brier_sum / n if n > 0 else NAN
        out["ece"] = _ece_from_bins(self.cal_count, self.cal_sum_prob, self.cal_sum_target)
        out["ece_adaptive"] = _adaptive_from_fine(*self.fine, self.bins)
        return {k: out[k] for k in METRIC_KEYS}
