"""Trials per minute of ``cirrus tune`` with 1 and with 2 local Dask workers on a tiny problem.

The same study (``--trials`` random-sampled trials of a tiny U-Net, ``--epochs`` epochs each, no pruning, a
fresh SQLite Optuna storage and MLflow database each time) runs on a LocalCluster of 1 and then of 2
single-threaded worker processes (torch threads 1). Each worker first runs one untimed warm-up trial (a
separate study: imports, MLflow's first model logging); the time is that of the trial loop
(``TuneResult.seconds``: ask, train + MLflow logging on the workers, tell), not the final registration.
Target: trials/minute with 2 workers >= 1.7x with 1 worker.

The CPU seconds the workers used in the timed loop are printed too: per trial they show whether running two
trials at once adds work (a serial bottleneck would), and per wall second how many cores the workers actually
got (on a machine shared with other jobs, less than the worker count).

The store (96x120 synthetic images, 5 nights of 8, prepared) is built under ``--out`` when missing.

    python benchmarks/bench_tune.py [--trials 8] [--epochs 2] [--out bench-out/tune]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import shutil
import time
from pathlib import Path

from distributed import Client, LocalCluster

from cirrus_batch.config import IngestConfig, PrepareConfig, load_config
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import prepare
from cirrus_batch.synth import write_archive
from cirrus_batch.tune import tune

TINY = {
    "train.bin": 2, "train.batch_size": 8, "train.patience": 5, "train.threads": 1,
    "train.sampling.n_images": 100, "train.sampling.min_gap_min": 0.0, "train.sampling.val_fraction": 0.2,
    "train.sampling.test_fraction": 0.2, "train.unet.base_channels": 4, "train.unet.depth": 2,
    "tune.sampler": "random", "tune.pruner": "none", "tune.retrain_best": False,
    "tune.space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                   "unet.dropout": {"type": "float", "low": 0.0, "high": 0.3}},
}  # fmt: skip


def ensure_store(out: Path) -> str:
    """The prepared tiny store under ``out`` (built on 2 local workers when missing)."""
    url = out / "store.zarr"
    if not url.exists():
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as c:
            write_archive(out / "archive", nights=5, per_night=8, cadence_min=10, shape=(96, 120), seed=5,
                          progress=False)  # fmt: skip
            ingest(str(out / "archive"), str(url), c, IngestConfig(shard_size=8), progress=False)
            prepare(str(url), c, PrepareConfig(fit_images=40), progress=False)
    return str(url.absolute())


def _cpu_seconds() -> float:
    """CPU time of this worker process (all threads) and of its finished children (MLflow runs a subprocess to
    infer a logged model's requirements)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def rate(store: str, workers: int, trials: int, epochs: int, folder: Path) -> tuple[float, float, float]:
    """(trials per minute, seconds, worker CPU seconds) of one study on ``workers`` single-threaded workers."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    job = load_config(overrides={**TINY, "train.epochs": epochs, "tune.trials": trials,
                                 "train.tracking_uri": f"sqlite:///{folder}/mlflow.db",
                                 "train.checkpoint_dir": str(folder / "ckpt"),
                                 "tune.storage": f"sqlite:///{folder}/optuna.db"})  # fmt: skip
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:  # fmt: skip
        warm = dataclasses.replace(job.tune, study_name="warm-up", trials=workers)
        tune(store, "segment", job.train, warm, client, progress=False)
        cpu0 = sum(client.run(_cpu_seconds).values())
        result = tune(store, "segment", job.train, dataclasses.replace(job.tune, study_name="timed"), client,
                      progress=False)  # fmt: skip
        cpu = sum(client.run(_cpu_seconds).values()) - cpu0
    hosts = {t.user_attrs["host"] for t in result.trials}
    assert result.ran == trials and len(hosts) == workers, (result.ran, hosts)
    return trials / result.seconds * 60, result.seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/tune"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

    store = ensure_store(args.out.absolute())
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores (load average {load:.1f} before), {args.trials} trials of {args.epochs} epochs, "
          f"tiny U-Net on {store}")  # fmt: skip
    rates = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        rates[workers], seconds, cpu = rate(store, workers, args.trials, args.epochs,
                                            args.out.absolute() / f"w{workers}")  # fmt: skip
        print(f"{workers} worker{'s' if workers > 1 else ' '}: {rates[workers]:6.2f} trials/min "
              f"({args.trials} trials in {seconds:.1f} s; workers' CPU {cpu / args.trials:.1f} s per trial, "
              f"{cpu / seconds:.2f} cores busy; {time.perf_counter() - t0:.0f} s in all with cluster start-up, "
              f"warm-up and registration)")  # fmt: skip
    print(f"SCALING 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (target >= 1.7)")


if __name__ == "__main__":
    main()
