"""Calibration of a trained and reprocessed season against the generator's truth (issue 16's figures).

    python benchmarks/bench_calibration.py DEMO     # DEMO/season.zarr (reprocessed), DEMO/archive_truth.zarr,
                                                    # DEMO/mlflow.db (what `make demo` leaves)
    python benchmarks/bench_calibration.py DIR --classify
        # p_cloudy computed here by the classifier champion as reprocess computes it, not read from the store:
        # a large season without a full reprocess (no U-Net pass, nothing written)

Prints, for every reprocessed frame whose true cloud fraction lies within +-3 points of the cloudy threshold
(the borderline frames), the fraction with ``p_cloudy`` < 0.01 or > 0.99 (target < 50 %); the champions'
adaptive (equal-mass) ECE on their test images against the true labels / masks (``test_truth/ece_adaptive``,
target <= 0.03); and their fitted temperatures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import zarr
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cirrus_batch.data import store_zenith
from cirrus_batch.models import autocast_dtype, pick_device
from cirrus_batch.prepare import Models, truth_index
from cirrus_batch.registry import CHAMPION
from cirrus_batch.reprocess import _images, _sources, classify, load_model, resolve_model


def champion_p_cloudy(group: zarr.Group, n: int, tracking: str, batch: int = 64) -> np.ndarray:
    """``p_cloudy`` of the first ``n`` images by the classifier champion, inputs built as reprocess does."""
    model = resolve_model(f"models:/cirrus-classifier@{CHAMPION}", tracking)
    device = pick_device()
    net = load_model(model, tracking, device)
    normalization = Models.from_store(group).normalization
    zenith = model.spec.zenith_input(store_zenith(group)) if model.spec.zenith else None
    binned = model.spec.binned(group)
    out = np.empty(n, np.float32)
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        images = _images(_sources(group, model.spec, binned), rows, normalization)
        x = model.spec.inputs(images, zenith_input=zenith, binned=binned)
        out[rows] = classify(net, x, device, autocast_dtype(device))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path)
    parser.add_argument("--band", type=float, default=0.03, help="borderline: |true cloud fraction - threshold| <=")
    parser.add_argument("--classify", action="store_true",
                        help="compute p_cloudy with the classifier champion instead of reading it from the store")  # fmt: skip
    args = parser.parse_args()
    store, truth = args.demo / "season.zarr", args.demo / "archive_truth.zarr"
    group = zarr.open_group(str(store), mode="r")
    n = int(group.attrs["committed"])
    threshold = float(group["cloudy"].attrs.get("threshold", 0.05))
    index = truth_index(list(np.asarray(group["source"][:n], dtype=object)), str(truth))
    true_cf = np.asarray(zarr.open_group(str(truth), mode="r")["cloud_fraction"][:])[index]
    tracking = f"sqlite:///{(args.demo / 'mlflow.db').resolve()}"
    p = champion_p_cloudy(group, n, tracking) if args.classify else group["p_cloudy"][:n]
    done = np.isfinite(p) & (index >= 0)
    border = done & (np.abs(true_cf - threshold) <= args.band)
    extreme = border & ((p < 0.01) | (p > 0.99))
    print(f"frames {'scored' if args.classify else 'reprocessed'}: {int(done.sum())}; all with p < 0.01 or > 0.99: "
          f"{int((done & ((p < 0.01) | (p > 0.99))).sum())}")  # fmt: skip
    print(f"borderline frames (true cloud fraction {threshold:.0%} +- {args.band * 100:.0f} points): "
          f"{int(border.sum())}; p_cloudy < 0.01 or > 0.99: {int(extreme.sum())} "
          f"({extreme.sum() / max(border.sum(), 1):.1%}, target < 50 %)")  # fmt: skip
    if border.any():
        order = np.argsort(true_cf[border])
        pairs = ", ".join(f"{c:.3f}:{q:.3g}" for c, q in zip(true_cf[border][order], p[border][order]))
        print(f"  true cloud fraction : p_cloudy, borderline frames in order: {pairs}")
    client = MlflowClient(tracking)
    for name in ("cirrus-classifier", "cirrus-unet"):
        try:
            version = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException as exc:
            print(f"{name}: no champion in {tracking} ({str(exc).splitlines()[0]})")
            continue
        m = client.get_run(version.run_id).data.metrics
        print(f"{name} v{version.version} (champion): temperature {m.get('calibration/temperature', np.nan):.3f}; "
              f"test against the truth: ECE (equal-mass bins) {m.get('test_truth/ece_adaptive', np.nan):.4f}, "
              f"ECE (equal-width) {m.get('test_truth/ece', np.nan):.4f}, Brier {m.get('test_truth/brier', np.nan):.4f}, "
              f"F1 {m.get('test_truth/f1', np.nan):.3f}, IoU {m.get('test_truth/iou', np.nan):.3f} "
              "(target: ECE <= 0.03)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
