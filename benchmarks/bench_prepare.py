"""Prepare throughput against a serial loop, and prepare memory against the number of images, in one run.

1. Throughput: the per-block map of ``cirrus_batch.prepare.prepare`` (models already fitted, every block reset
   to unprepared) on a local Dask cluster of single-threaded worker processes, one per core (started before
   timing), against a serial in-process loop of ``prepare_block`` over the same shard blocks: identical work
   (read ``raw``, quality flags, residual, brightness, cloud masks, cloud fraction, writes) from a warm page cache.
   Target: RATIO >= 1.7 on 2 cores.
2. Memory: the full ``prepare`` (fit + map) on a fresh cluster for each store size; peak RSS of the client
   process, of each worker process (psutil, sampled every 0.1 s, cross-checked by the workers' own
   ``getrusage`` peak) and of the whole process tree. Target: peaks flat in the number of images (ratio ~1).

    python benchmarks/bench_prepare.py [--images 500 2000] [--repeat 1] [--workdir bench-out]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
import zarr
from dask.utils import key_split
from distributed import Client, LocalCluster, get_task_stream
from threadpoolctl import threadpool_limits

from cirrus_batch.cluster import local_cluster
from cirrus_batch.config import ClusterConfig, IngestConfig, PrepareConfig
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import UNPREPARED, Models, ambient_temps, fit_block, prepare, prepare_block, todo_blocks
from cirrus_batch.clearsky import choose_eps
from cirrus_batch.errors import StoreError
from cirrus_batch.store import Store
from cirrus_batch.synth import KINDS, write_archive

SHARD = 100
MIB = 2**20


def make_cluster(workers: int) -> LocalCluster:
    """The project's local cluster (as ``cirrus --cluster local``): single-threaded worker processes."""
    return local_cluster(ClusterConfig(n_workers=workers))


def worker_malloc_env() -> str:
    """glibc malloc tuning the nanny gave the worker processes (dask sets ``MALLOC_TRIM_THRESHOLD_``)."""
    return " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "none"


def ensure_store(workdir: Path, n: int, shape: tuple[int, int], client: Client) -> str:
    """A store of ``n`` synthetic images (every night kind); reuses the archive and store in ``workdir``."""
    tag = f"{n}-{shape[0]}x{shape[1]}"
    archive, store = workdir / f"prepare-archive-{tag}", workdir / f"prepare-{tag}.zarr"
    if not archive.exists():
        nights = len(KINDS)
        write_archive(archive, nights=nights, per_night=-(-n // nights), cadence_min=1.0, shape=shape, seed=1,
                      client=client, progress=False)  # fmt: skip
    try:
        if Store.open(str(store)).committed >= n:
            return str(store.absolute())
    except StoreError:  # no store yet
        pass
    report = ingest(str(archive), str(store), client, IngestConfig(shard_size=SHARD), progress=False)
    assert not report.rejected, report.reasons
    return str(store.absolute())


def reset(url: str) -> int:
    """Mark every image unprepared and blank its cloud fraction; returns the number of images."""
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    n = Store.open(url).committed
    group["quality"][:n] = np.full(n, UNPREPARED, np.uint8)
    group["cloud_fraction"][:n] = np.full(n, np.nan, np.float32)
    return n


def check_prepared(url: str, n: int) -> None:
    """Every image was recomputed since the last :func:`reset`."""
    group = zarr.open_group(url, mode="r", zarr_format=3)
    assert (group["quality"][:n] != UNPREPARED).all(), "some images were not prepared"
    assert np.isfinite(group["cloud_fraction"][:n]).all(), "some cloud fractions were not recomputed"


def warm_up(url: str, client: Client | None = None) -> None:
    """Prepare one image in this process, or one on each worker, so that lazy imports are not timed."""
    if client is None:
        prepare_block(url, 0, 1)
        return
    for i, worker in enumerate(client.scheduler_info()["workers"]):
        a = min(i * SHARD, Store.open(url).committed - 1)
        client.submit(prepare_block, url, a, a + 1, workers=[worker], pure=False).result()


def serial_rate(url: str) -> tuple[float, float]:
    """Images/s of ``fit_block`` then ``prepare_block`` called in a loop in this process over every unprepared
    block (the two passes of prepare), and the cores it kept busy (CPU time / wall time: blosc threads may use
    more than one). BLAS, OpenMP and torch run one thread each, as in a worker (its nanny sets
    ``OMP_NUM_THREADS=1`` and the like): one worker's work, not more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return _serial_rate(url)
    finally:
        torch.set_num_threads(before)


def _serial_rate(url: str) -> tuple[float, float]:
    n = reset(url)
    group = zarr.open_group(url, mode="r", zarr_format=3)
    blocks = todo_blocks(group["quality"][:n], SHARD)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for a, b in blocks:  # the same two passes as prepare: each image's clear sky, the nights' trends, the masks
        fit_block(url, a, b)
    models = Models.from_store(zarr.open_group(url, mode="r", zarr_format=3))
    g = zarr.open_group(url, mode="r+", zarr_format=3)
    eps, p, source = choose_eps(g["time"][:n].astype("datetime64[us]"), ambient_temps(g, models.ambient_key, slice(0, n)),
                                g["eps_fit"][:n], g["p_fit"][:n],
                                g["sky_excess"][:n], g["sky_clear"][:n], models.clear_sky, models.clear_config)
    g["clear_eps"][:n], g["clear_p"][:n], g["clear_eps_source"][:n] = eps, p, source
    done = sum(prepare_block(url, a, b) for a, b in blocks)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    check_prepared(url, n)
    assert done == n
    return n / seconds, cpu / seconds


def parallel_rate(url: str, client: Client) -> tuple[float, dict[str, dict[str, float]]]:
    """Images/s of ``prepare`` with fitted models: its two maps (``fit_block``, ``prepare_block``) over the
    cluster; and, per map, from Dask's task stream: its span (first task start to last task end), its tasks,
    the workers' summed compute time and the idle core-seconds at its end (a worker done while the other still
    computes: the barrier between the passes)."""
    n = reset(url)
    with get_task_stream(client) as stream:
        t0 = time.perf_counter()
        report = prepare(url, client, PrepareConfig(), progress=False)
        seconds = time.perf_counter() - t0
    check_prepared(url, n)
    assert not report.fitted and report.prepared_now == n, report
    return n / seconds, pass_profile(stream.data)


def pass_profile(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per task prefix (``fit_block``, ``prepare_block``): span, tasks, compute seconds, idle tail core-seconds."""
    out = {}
    for prefix in ("fit_block", "prepare_block"):
        spans = [(r["worker"], ss["start"], ss["stop"]) for r in records if key_split(r["key"]) == prefix
                 for ss in r["startstops"] if ss["action"] == "compute"]  # fmt: skip
        if not spans:
            continue
        end = max(stop for _, _, stop in spans)
        last = {}
        for worker, _, stop in spans:
            last[worker] = max(last.get(worker, 0.0), stop)
        out[prefix] = {"span": end - min(start for _, start, _ in spans), "tasks": len(spans),
                       "compute": sum(stop - start for _, start, stop in spans),
                       "tail_idle": sum(end - t for t in last.values())}
    return out


@dataclass
class RssPeaks:
    """Peak RSS (bytes) of the client, of each descendant process and of the whole tree (sampling thread)."""

    interval: float = 0.1
    pid: int | None = None
    """Root of the sampled tree, whose peak is ``client``: this process by default (sampling stops when it exits)."""
    client: int = 0
    per_pid: dict[int, int] = field(default_factory=dict)
    anon: dict[int, int] = field(default_factory=dict)
    """Peak of each descendant's RSS less its file-backed and shared pages (libraries, page cache maps)."""
    total: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        me = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                total = own = me.memory_info().rss
                children = me.children(recursive=True)
            except psutil.Error:  # the root exited
                return
            for child in children:
                try:
                    info = child.memory_info()
                except psutil.Error:  # exited between listing and reading
                    continue
                rss = info.rss
                self.per_pid[child.pid] = max(self.per_pid.get(child.pid, 0), rss)
                self.anon[child.pid] = max(self.anon.get(child.pid, 0), rss - getattr(info, "shared", 0))
                total += rss
            self.client, self.total = max(self.client, own), max(self.total, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssPeaks:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def worker_maxrss() -> int:
    """Task-side peak RSS of this worker process (bytes; ``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_run(url: str, workers: int) -> tuple[int, int, int, int, float]:
    """Full ``prepare(refit=True)`` on a fresh cluster: peak client, max worker (sampled), max worker
    (getrusage) and total RSS, and the seconds it took."""
    with make_cluster(workers) as cluster, Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        with RssPeaks() as peaks:
            t0 = time.perf_counter()
            report = prepare(url, client, PrepareConfig(), refit=True, progress=False)
            seconds = time.perf_counter() - t0
            time.sleep(2 * peaks.interval)
        assert report.fitted and report.prepared_now == report.images, report
        worker = max(peaks.per_pid.get(pid, 0) for pid in pids)
        rusage = max(client.run(worker_maxrss).values())
    return peaks.client, worker, rusage, peaks.total, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[500, 2000],
                        help="store sizes for the memory table; throughput runs on the largest")  # fmt: skip
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 640))
    parser.add_argument("--repeat", type=int, default=1, help="throughput runs per side (median)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    sizes, shape = sorted(set(args.images)), (args.shape[0], args.shape[1])
    args.workdir.mkdir(parents=True, exist_ok=True)
    with make_cluster(cores) as cluster, Client(cluster) as client:
        urls = {n: ensure_store(args.workdir, n, shape, client) for n in sizes}
        malloc = next(iter(client.run(worker_malloc_env).values()))

    print(f"synthetic stores of {', '.join(map(str, sizes))} images of {shape[0]}x{shape[1]}, "
          f"shards of {SHARD}, {cores} cores, LocalCluster of {cores} single-threaded worker processes "
          f"(worker malloc env: {malloc})")
    print("\nmemory: full prepare (fit + map), fresh cluster per store, RSS sampled every 0.1 s")
    print(f"{'images':>8} {'seconds':>8} {'client MiB':>11} {'max worker MiB':>15} {'(getrusage)':>12} "
          f"{'total MiB':>10}")
    rows = {}
    for n in sizes:
        rows[n] = memory_run(urls[n], cores)
        client_rss, worker, rusage, total, seconds = rows[n]
        print(f"{n:8d} {seconds:8.1f} {client_rss / MIB:11.0f} {worker / MIB:15.0f} {rusage / MIB:12.0f} "
              f"{total / MIB:10.0f}")
    if len(sizes) > 1:
        lo, hi = rows[sizes[0]], rows[sizes[-1]]
        ratios = [hi[i] / lo[i] for i in range(4)]
        print(f"{f'{sizes[-1]}/{sizes[0]}':>8} {'':>8} {ratios[0]:11.2f} {ratios[1]:15.2f} {ratios[2]:12.2f} "
              f"{ratios[3]:10.2f}   (target ~1.0)")

    url = urls[sizes[-1]]  # models fitted by its memory run
    print(f"\nthroughput: per-block map on {sizes[-1]} images (models fitted, all blocks reset), "
          f"median of {args.repeat}")
    warm_up(url)
    serial, busy = (statistics.median(v) for v in zip(*(serial_rate(url) for _ in range(args.repeat))))
    with make_cluster(cores) as cluster, Client(cluster) as client:
        warm_up(url, client)
        runs = [parallel_rate(url, client) for _ in range(args.repeat)]
    parallel = statistics.median(rate for rate, _ in runs)
    print(f"serial prepare_block loop {serial:6.1f} images/s ({busy:.2f} cores busy) | cirrus prepare map on "
          f"{cores} workers {parallel:6.1f} images/s | RATIO {parallel / serial:.2f} (target >= 1.7; issue 21: "
          f">= 1.9)")
    for rate, passes in runs:
        print(f"  run at {rate:5.1f} images/s: " + "; ".join(
            f"{name} {p['tasks']} tasks in {p['span']:.1f} s, compute {p['compute']:.1f} core-s, idle at its end "
            f"{p['tail_idle']:.2f} core-s" for name, p in passes.items()))


if __name__ == "__main__":
    main()
