"""WSISEG as a real-data benchmark: 400 visible all-sky frames (ASC100 camera, 480x450 RGB PNG without
extension) with hand-drawn masks (255 cloud, 100 sky, 0 undefined: horizon and sun blocker).

1. ``ingest`` the PNGs as they are: one channel by ``--rgb`` (default ``red_blue_ratio``, 1000 R / B, the cloud
   index of visible cameras; ``luma`` separates cloud from sky far worse: best global threshold on 40 frames 62 % of
   labelled pixels right vs 92.5 % for R/B), time by frame number (``time_from = "index"``, one frame every 1296 s,
   so the 400 frames fill 6 days of ~67 consecutive frames: the blocks the split deals out);
2. ``prepare --masks`` imports the 400 annotations beside the astropy masks;
3. (a) the astropy masks of ``prepare`` against the human masks (labelled pixels): IoU, F1, pixel accuracy, cloudy-
   label accuracy (an image is cloudy above 5 % cloud);
   (b) the U-Net (8 base channels, depth 3, one pass) trained on the human masks (``[train] masks = "human-only"``,
       input ``norm`` of that channel and the zenith angle, binned to 112x120) of two thirds of the frames (train +
       val: whole days of consecutive frames), tested on the other third (two days): pixel accuracy, IoU, F1, ECE on
       labelled pixels;
   (c) the same U-Net trained on the astropy masks only (``masks = "astropy"``), scored on the same test frames
       against the human masks (``--truth`` = the store).

Settings (file names, mask values, the sky circle of ``[prepare.sky]``) come from ``jobs/wsiseg.toml``; the
options below override it. If the astropy part of ``prepare`` fails, (a) is reported as failed with its error
and (b) still runs when the store could be prepared. The data stay outside git:

    python benchmarks/bench_wsiseg.py PATH [--out bench-out/wsiseg] [--epochs 15] [--bin 4] [--rgb red_blue_ratio]
                                           [--parts bc] [--reuse]

PATH holds ``whole sky images/`` and ``annotation/`` (github.com/CV-Application/WSISEG-Database).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

from distributed import Client, LocalCluster

from cirrus_batch.config import load_config
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import evaluate_store, prepare
from cirrus_batch.store import Store
from cirrus_batch.train import train

JOB = Path(__file__).resolve().parent.parent / "jobs" / "wsiseg.toml"  # file names, mask values, sky circle


def train_overrides(out: Path, epochs: int, binning: int, masks: str) -> dict:
    return {
        "train.masks": masks, "train.image": "norm", "train.bin": binning, "train.epochs": epochs,
        "train.patience": 5, "train.batch_size": 8, "train.sampling.n_images": 400, "train.threads": 2,
        "train.unet.base_channels": 8, "train.unet.depth": 3, "train.unet.flip_average": False,
        "train.sampling.min_gap_min": 0.0, "train.sampling.block": "day", "train.sampling.test_fraction": 1 / 3,
        "train.sampling.val_fraction": 1 / 6, "train.log_model": False, "train.register": False,
        "train.tracking_uri": f"sqlite:///{out}/mlflow.db", "train.checkpoint_dir": str(out / f"ckpt-{masks}"),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench-out/wsiseg"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--bin", type=int, default=4)
    p.add_argument("--rgb", default="red_blue_ratio", help="[ingest.image_files] rgb (luma: the default of ingest)")
    p.add_argument("--parts", default="bc", help="trainings to run: b (human masks), c (astropy masks)")
    p.add_argument("--reuse", action="store_true", help="keep OUT's store (ingest and prepare again: no-ops)")
    args = p.parse_args()
    out = args.out.absolute()
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    store = str(out / "wsiseg.zarr")
    results: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        cfg = load_config(JOB, overrides={"prepare.human.source": str(args.path / "annotation"),
                                          "ingest.image_files.rgb": args.rgb})
        t0 = time.perf_counter()
        report = ingest(str(args.path / "whole sky images"), store, client, cfg.ingest, progress=False)
        results["ingest"] = {"images": report.total, "rejected": len(report.rejected),
                             "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(f"ingest: {report.total} images in the store, {len(report.rejected)} rejected")
        try:
            prep = prepare(store, client, cfg.prepare, progress=False)
            results["masks_imported"] = prep.human_masks
            print(f"prepare: {prep.human_masks} human masks imported, {prep.cloudy} images cloudy")
            scores = evaluate_store(store, store, client, cfg.prepare, progress=False)
            results["a"] = {k: scores[k] for k in ("iou", "f1", "accuracy", "label_accuracy", "precision", "recall")}
        except Exception as exc:  # the astropy recipe may fail on visible images: report it, go on
            results["a"] = {"failed": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
            group = Store.open(store, mode="r").group
            results["masks_imported"] = int((group["human_mask_source"][:] != "").sum()) if "human_mask_source" \
                in group else 0  # fmt: skip
    print(f"(a) astropy masks vs human masks: {results['a']}")

    for key, masks in (("b", "human-only"), ("c", "astropy")):
        if key not in args.parts:
            continue
        shutil.rmtree(out / f"ckpt-{masks}", ignore_errors=True)
        tcfg = load_config(JOB, overrides=train_overrides(out, args.epochs, args.bin, masks)).train
        try:
            r = train(store, "segment", tcfg, progress=False, truth=store)
        except Exception as exc:
            results[key] = {"failed": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
            continue
        t = r.test
        results[key] = {"accuracy": t["truth_accuracy"], "iou": t["truth_iou"], "f1": t["truth_f1"],
                        "ece": t["truth_ece"], "epochs": r.epochs_run, "split": r.split_sizes,
                        "seconds": round(r.seconds)}  # fmt: skip
        print(f"({key}) U-Net, masks = {masks}: {results[key]}")
    (out / f"results-{args.parts}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
