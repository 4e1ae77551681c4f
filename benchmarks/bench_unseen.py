"""Train and reprocess on a camera the mask method was not tuned on (issue 14): the ``make demo`` steps on a
synthetic season, then ``cloud_prob`` and ``p_cloudy`` of every reprocessed frame scored against the true masks.

    python benchmarks/bench_unseen.py FOLDER [--camera ortho --tilt 4 120 --mirror --north-deg 37]
                                             [--nights 10] [--per-night 60] [--cadence-min 3] [--epochs 15]
                                             [--seed 0] [--shape H W]

With ``--camera`` the steps run first in FOLDER (synth, ingest, prepare --evaluate, train --task both
--config jobs/train.toml --truth, reprocess; logs in FOLDER/*.log); without it FOLDER must hold a demo-like run
(``season.zarr``, ``archive_truth.zarr``, ``mlflow.db``). Prints, over all reprocessed frames: the IoU of
``cloud_prob`` > 0.5 against the true masks on the true sky pixels (pooled and per night kind; frames classified
clear count as no cloud), the accuracy of ``p_cloudy`` > 0.5 against the true label (true cloud fraction above
the store's ``cloudy`` threshold), the same scores of prepare's masks, the train runs' ``test_truth/`` metrics,
and the issue's targets (IoU >= 0.85, ``p_cloudy`` accuracy >= 0.98).
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr

from cirrus_batch import scoring
from cirrus_batch.prepare import read_images, truth_index
from cirrus_batch.reprocess import NOT_COMPUTED, PROB_SCALE
from cirrus_batch.store import Store

IOU_TARGET, ACCURACY_TARGET = 0.85, 0.98
BLOCK = 60


def run_steps(folder: Path, args: argparse.Namespace) -> None:
    """The ``make demo`` steps with the camera options, timed, each logged to FOLDER/STEP.log."""
    cirrus = [sys.executable, "-m", "cirrus_batch.cli"]
    archive, store, truth = folder / "archive", folder / "season.zarr", folder / "archive_truth.zarr"
    camera = ["--camera", args.camera, *(["--tilt", *map(str, args.tilt)] if args.tilt else []),
              *(["--mirror"] if args.mirror else []),
              *(["--north-deg", str(args.north_deg)] if args.north_deg is not None else [])]  # fmt: skip
    steps = {
        "synth": ["synth", archive, "--nights", args.nights, "--per-night", args.per_night, "--cadence-min",
                  args.cadence_min, "--seed", args.seed, *(["--shape", *args.shape] if args.shape else []), *camera],
        "ingest": ["ingest", archive, store, "--config", "jobs/default.toml"],
        "prepare": ["prepare", store, "--config", "jobs/default.toml", "--evaluate", truth,
                    "--panel", folder / "prepare-panel.png"],
        "train": ["train", store, "--task", "both", "--config", "jobs/train.toml", "--epochs", args.epochs,
                  "--truth", truth],
        "reprocess": ["reprocess", store, "--config", "jobs/default.toml"],
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for name, cmd in steps.items():
        t0 = time.perf_counter()
        with open(folder / f"{name}.log", "w") as log:
            rc = subprocess.call([*cirrus, *map(str, cmd), "--no-progress"], stdout=log,
                                 stderr=subprocess.STDOUT)
        failed = f" FAILED (rc {rc}, see {folder / name}.log)" if rc else ""
        print(f"{name}: {time.perf_counter() - t0:.0f} s{failed}", flush=True)
        if rc:
            raise SystemExit(rc)


def score(store_url: str, truth_url: str) -> dict:
    """Counts of ``cloud_prob`` > 0.5 and of prepare's ``mask`` against the truth; ``p_cloudy``, true labels."""
    store = Store.open(store_url, mode="r")
    group, n = store.group, store.committed
    truth = zarr.open_group(truth_url, mode="r", zarr_format=3)
    index = truth_index(group["source"][:n].tolist(), truth_url)
    if (index < 0).any():
        raise SystemExit(f"{int((index < 0).sum())} frames of {store_url} are not in {truth_url}")
    threshold = float(group["cloudy"].attrs.get("threshold", 0.05))
    p_cloudy = np.asarray(group["p_cloudy"][:n])
    done = np.flatnonzero(np.isfinite(p_cloudy))
    if not len(done):
        raise SystemExit(f"{store_url} has no reprocessed frame (run cirrus reprocess)")
    sky = truth["sky"][:].astype(bool)
    kinds = np.asarray(truth["night_kind"][:], dtype=object).astype(str)[index]
    true_cloudy = np.asarray(truth["cloud_fraction"][:])[index] > threshold
    net, masks, fractions = {}, {}, []
    for block in np.array_split(done, -(-len(done) // BLOCK)):
        true = read_images(truth["mask"], index[block])
        q = np.stack([group["cloud_prob"][int(i)] for i in block])
        cloud = (q != NOT_COMPUTED) & (q > 0.5 * PROB_SCALE)  # not computed (classified clear): no cloud
        net = scoring.add_counts(net, scoring.confusion_counts(cloud, true, sky, kinds[block], threshold))
        mask = np.stack([group["mask"][int(i)] for i in block])
        masks = scoring.add_counts(masks, scoring.confusion_counts(mask, true, sky, kinds[block], threshold))
        t = true[:, sky].astype(bool)
        c = cloud[:, sky]
        fractions += [((c & t).sum(1), (c | t).sum(1), t.mean(1))]
    inter, union, cf = (np.concatenate(x) for x in zip(*fractions))
    return {"net": scoring.scores_from_counts(net), "mask": scoring.scores_from_counts(masks), "threshold": threshold,
            "frames": done, "n": n, "kinds": kinds[done], "p_cloudy": p_cloudy[done], "true_cloudy": true_cloudy[done],
            "frame_iou": np.where(union > 0, inter / np.maximum(union, 1), np.nan), "true_fraction": cf,
            "sources": np.asarray(group["source"].get_orthogonal_selection(done), dtype=object)}  # fmt: skip


def test_truth_metrics(db: Path) -> dict[str, dict[str, float]]:
    """``test_truth/`` metrics of the latest classifier and U-Net runs in the MLflow database ``db``."""
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT r.name, m.key, m.value FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
            "WHERE m.key LIKE 'test%truth/%' ORDER BY r.start_time").fetchall()  # fmt: skip
    out: dict[str, dict[str, float]] = {}
    for run, key, value in rows:
        out.setdefault(run, {})[key] = value
    return out


def report(res: dict, db: Path) -> bool:
    net, mask = res["net"], res["mask"]
    pred = res["p_cloudy"] > 0.5
    right = pred == res["true_cloudy"]
    print(f"frames reprocessed: {len(res['frames'])} of {res['n']}; cloudy threshold {res['threshold']}; "
          f"truly cloudy {int(res['true_cloudy'].sum())}")
    print(f"{'kind':12s} {'frames':>6s} {'cloud_prob IoU':>14s} {'mask IoU':>9s} {'p_cloudy acc':>12s}")
    for kind in dict.fromkeys(res["kinds"].tolist()):
        sel = res["kinds"] == kind
        print(f"{kind:12s} {int(sel.sum()):6d} {net['per_kind'][kind]['iou']:14.4f} "
              f"{mask['per_kind'][kind]['iou']:9.4f} {right[sel].mean():12.4f}")
    print(f"{'all':12s} {len(right):6d} {net['iou']:14.4f} {mask['iou']:9.4f} {right.mean():12.4f}")
    print(f"cloud_prob: F1 {net['f1']:.4f}, precision {net['precision']:.4f}, recall {net['recall']:.4f}; "
          f"p_cloudy: clear frames right {right[~res['true_cloudy']].mean():.4f}, "
          f"cloudy frames right {right[res['true_cloudy']].mean():.4f}; sky pixels called cloud on truly clear "
          f"frames: cloud_prob {net['clear_false_alarm']:.4f}, mask {mask['clear_false_alarm']:.4f}")
    wrong = np.flatnonzero(~right)
    for i in wrong[:10]:
        print(f"  p_cloudy wrong: {res['sources'][i]} ({res['kinds'][i]}) p={res['p_cloudy'][i]:.3f} "
              f"true cf={res['true_fraction'][i]:.4f}")
    worst = np.argsort(np.nan_to_num(res["frame_iou"], nan=1.0))[:5]
    for i in worst:
        print(f"  low IoU frame: {res['sources'][i]} ({res['kinds'][i]}) IoU {res['frame_iou'][i]:.3f} "
              f"true cf={res['true_fraction'][i]:.4f} p_cloudy={res['p_cloudy'][i]:.3f}")
    for run, metrics in test_truth_metrics(db).items():
        print(f"{run}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    ok = net["iou"] >= IOU_TARGET and right.mean() >= ACCURACY_TARGET
    print(f"targets (cloud_prob IoU >= {IOU_TARGET}, p_cloudy accuracy >= {ACCURACY_TARGET}): "
          f"{'met' if ok else 'MISSED'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="demo-like folder (season.zarr, archive_truth.zarr, mlflow.db)")
    ap.add_argument("--camera", help="run the steps first with this cirrus synth camera kind")
    ap.add_argument("--tilt", type=float, nargs=2, metavar=("DEG", "AZ"))
    ap.add_argument("--mirror", action="store_true")
    ap.add_argument("--north-deg", type=float)
    ap.add_argument("--nights", type=int, default=10)
    ap.add_argument("--per-night", type=int, default=60)
    ap.add_argument("--cadence-min", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=int, nargs=2, metavar=("H", "W"),
                    help="image size (default: synth's, as in the demo)")
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    if args.camera:
        run_steps(args.folder, args)
    t0 = time.perf_counter()
    res = score(str(args.folder / "season.zarr"), str(args.folder / "archive_truth.zarr"))
    ok = report(res, args.folder / "mlflow.db")
    print(f"scored in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
