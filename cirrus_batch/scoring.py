"""Scores of cloud masks against reference masks (true or human), pooled over frames and per kind of night."""

from __future__ import annotations

from typing import Any

import numpy as np


def _scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    nan = float("nan")
    tp, fp, fn = float(tp), float(fp), float(fn)
    union = tp + fp + fn
    return {
        "iou": tp / union if union else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if union else nan,
    }


def confusion_counts(
    mask: np.ndarray, truth: np.ndarray, sky: np.ndarray, kinds: np.ndarray | None = None,
    cloudy_threshold: float = 0.05,
) -> dict[str, Any]:  # fmt: skip
    """Additive counts of masks (n, y, x) against reference masks on ``sky`` pixels (combine with
    :func:`add_counts`). Reference pixels valued 255 (unlabelled) are left out.

    ``{"kinds": {kind: [tp, fp, fn, frames, labels right]}, "clear": [frames, cloud pixels, sky pixels],
    "labels": [right, frames], "clear_labels": [right, truly clear frames], "cloudy_labels": [right, truly
    cloudy frames]}``; ``kinds=None`` pools every frame under ``"all"``. A frame is cloudy when its cloud
    fraction exceeds ``cloudy_threshold``.
    """
    sky = np.asarray(sky, bool)
    m = np.asarray(mask)
    t = np.asarray(truth)
    m = (m[None] if m.ndim == 2 else m)[:, sky]
    t = (t[None] if t.ndim == 2 else t)[:, sky]
    known = t != 255
    m, t = m.astype(bool) & known, t.astype(bool) & known
    tp = (m & t).sum(axis=1)
    fp = (m & ~t).sum(axis=1)
    fn = (~m & t).sum(axis=1)
    npx = np.maximum(known.sum(axis=1), 1)
    cf_m, cf_t = (tp + fp) / npx, (tp + fn) / npx
    right = (cf_m > cloudy_threshold) == (cf_t > cloudy_threshold)
    clear = cf_t == 0
    truly_cloudy = cf_t > cloudy_threshold
    kinds = np.asarray(kinds).astype(str) if kinds is not None else np.full(len(m), "all")
    per_kind = {}
    for k in dict.fromkeys(kinds.tolist()):
        sel = kinds == k
        per_kind[k] = [int(tp[sel].sum()), int(fp[sel].sum()), int(fn[sel].sum()), int(sel.sum()),
                       int(right[sel].sum())]  # fmt: skip
    return {
        "kinds": per_kind,
        "clear": [int(clear.sum()), int((tp + fp)[clear].sum()), int(npx[clear].sum())],
        "labels": [int(right.sum()), len(m)],
        "clear_labels": [int(right[~truly_cloudy].sum()), int((~truly_cloudy).sum())],
        "cloudy_labels": [int(right[truly_cloudy].sum()), int(truly_cloudy.sum())],
    }


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum of two :func:`confusion_counts` results (``{}`` is the neutral element)."""
    if not a:
        return b
    if not b:
        return a
    kinds = dict(a["kinds"])
    for k, v in b["kinds"].items():
        kinds[k] = [x + y for x, y in zip(kinds.get(k, [0] * len(v)), v)]
    out: dict[str, Any] = {"kinds": kinds}
    for key in ("clear", "labels", "clear_labels", "cloudy_labels"):
        out[key] = [x + y for x, y in zip(a[key], b[key])]
    return out


def scores_from_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """Scores from :func:`confusion_counts`: see :func:`evaluate`."""
    per = counts["kinds"]
    tp, fp, fn, frames = (sum(v[i] for v in per.values()) for i in range(4))
    res: dict[str, Any] = _scores(tp, fp, fn)
    res["n_frames"] = int(frames)
    n_clear, cloud_px, sky_px = counts["clear"]
    res["clear_false_alarm"] = cloud_px / sky_px if sky_px else float("nan")
    res["n_clear_frames"] = int(n_clear)
    for key, name in (("labels", "label_accuracy"), ("clear_labels", "clear_label_accuracy"),
                      ("cloudy_labels", "cloudy_label_accuracy")):  # fmt: skip
        right, total = counts[key]
        res[name] = right / total if total else float("nan")
    res["per_kind"] = {k: {**_scores(*v[:3]), "n_frames": int(v[3]), "label_accuracy": v[4] / v[3] if v[3] else float("nan")}
                       for k, v in per.items() if k != "all"}  # fmt: skip
    return res


def evaluate(
    mask: np.ndarray, truth: np.ndarray, sky: np.ndarray, kinds: np.ndarray | None = None,
    cloudy_threshold: float = 0.05,
) -> dict[str, Any]:  # fmt: skip
    """Scores of masks (n, y, x) against reference masks on sky pixels, pooled over frames.

    Returns plain floats: ``iou``, ``f1``, ``precision``, ``recall`` (NaN where undefined), ``n_frames``,
    ``clear_false_alarm`` (fraction of sky pixels marked cloud on frames whose true cloud fraction is 0),
    ``n_clear_frames``, ``label_accuracy`` (cf(mask) > thr vs cf(truth) > thr), ``clear_label_accuracy`` and
    ``cloudy_label_accuracy`` (the same over truly clear / truly cloudy frames), and ``per_kind``:
    {kind: {iou, f1, precision, recall, n_frames, label_accuracy}}.
    """
    return scores_from_counts(confusion_counts(mask, truth, sky, kinds, cloudy_threshold))
