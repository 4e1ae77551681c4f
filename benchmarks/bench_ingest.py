"""Ingest throughput against the decode limit, in one run.

Compares ``cirrus_batch.ingest.ingest`` on a local Dask cluster (one worker per core, started before
timing) with a plain serial loop that only reads the same FITS files with astropy
(``astropy.io.fits.getdata``). Both read from a warm page cache. Targets on 2 cores (issue 21): ratio >= 1.5
for plain FITS, >= 1.9 for ``.fits.fz``.
Runs on plain FITS and on tile-compressed ``.fits.fz`` archives of the same synthetic images.

Then (``--late``, plain FITS) the cost of a night that arrives late: ingesting the season's first night into a
store that holds the other nights (appended at the end) against ingesting the whole season into a new store
(what a store that only grows in time order needs).

    python benchmarks/bench_ingest.py [--images 600] [--shape 512 640] [--repeat 3] [--formats plain fz] [--late]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

from astropy.io import fits
from distributed import Client

from cirrus_batch.cluster import local_cluster
from cirrus_batch.config import ClusterConfig, IngestConfig
from cirrus_batch.ingest import ingest
from cirrus_batch.synth import write_archive

TARGET = {"plain": 1.5, "fz": 1.9}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench(archive: Path, store: Path, client: Client, repeat: int) -> tuple[float, float, int, float, float]:
    """Median images/s of the serial astropy read loop and of ingest, the number of files, and the median CPU
    seconds per ingest of this process (client and scheduler) and of all workers together."""
    files = sorted(p for p in archive.rglob("*") if p.is_file())
    for f in files:  # warm the page cache for both contenders
        f.read_bytes()
    serial, rates, client_cpu, worker_cpu = [], [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in files:
            fits.getdata(f)
        serial.append(len(files) / (time.perf_counter() - t0))
        shutil.rmtree(store, ignore_errors=True)
        workers, mine = client.run(cpu_seconds), cpu_seconds()
        report = ingest(str(archive), str(store), client, IngestConfig(shard_size=100), progress=False)
        client_cpu.append(cpu_seconds() - mine)
        worker_cpu.append(sum(client.run(cpu_seconds).values()) - sum(workers.values()))
        assert report.ingested == len(files) and not report.rejected
        rates.append(report.ingested / report.seconds)
    median = statistics.median
    return median(serial), median(rates), len(files), median(client_cpu), median(worker_cpu)


def bench_late(archive: Path, workdir: Path, client: Client, repeat: int) -> tuple[float, float, int, int]:
    """Median seconds to append the first night late, and to ingest the whole season anew; images of each."""
    nights = sorted(d for d in (archive / "2026").iterdir() if d.is_dir())
    held = workdir / "late-night"
    append, rewrite, late = [], [], 0
    for _ in range(repeat):
        store = workdir / "late.zarr"
        shutil.rmtree(store, ignore_errors=True)
        shutil.move(nights[0], held)
        try:
            ingest(str(archive), str(store), client, IngestConfig(shard_size=100), progress=False)
        finally:
            shutil.move(held, nights[0])
        report = ingest(str(archive), str(store), client, IngestConfig(shard_size=100), progress=False)
        assert not report.rejected
        append.append(report.seconds)
        late = report.ingested
        shutil.rmtree(store)
        full = ingest(str(archive), str(store), client, IngestConfig(shard_size=100), progress=False)
        rewrite.append(full.seconds)
        total = full.ingested
        shutil.rmtree(store)
    return statistics.median(append), statistics.median(rewrite), late, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 640))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=["plain", "fz"], choices=["plain", "fz"])
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--late", action="store_true", help="also time a late night: append vs rewrite the season")
    args = parser.parse_args()
    if args.late and "plain" not in args.formats:
        parser.error("--late times the plain FITS archive: keep plain in --formats")

    cores = os.cpu_count() or 1
    print(f"{args.images} synthetic images of {args.shape[0]}x{args.shape[1]} uint16, {cores} cores, "
          f"median of {args.repeat} runs")
    with local_cluster(ClusterConfig(n_workers=cores)) as cluster, Client(cluster) as client:
        for fmt in args.formats:
            archive = args.workdir / f"archive-{fmt}-{args.images}-{args.shape[0]}x{args.shape[1]}"
            if not archive.exists():
                write_archive(archive, nights=6, per_night=-(-args.images // 6), cadence_min=1.0,
                              shape=tuple(args.shape), seed=1, compress=fmt == "fz", progress=False)
            store = args.workdir / f"bench-{fmt}.zarr"
            serial, rate, n, client_cpu, worker_cpu = bench(archive, store, client, args.repeat)
            fits_bytes = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
            print(f"[{fmt:5s}] serial astropy read-only loop {serial:7.1f} images/s | cirrus ingest {rate:7.1f} "
                  f"images/s | store {du(store) / 2**20:.0f} MiB for {fits_bytes / 2**20:.0f} MiB of FITS "
                  f"| RATIO {rate / serial:.2f} (target >= {TARGET[fmt]})")
            print(f"        CPU per ingest: workers {worker_cpu:.3f} s, client and scheduler {client_cpu:.3f} s, in "
                  f"{n / rate:.3f} s on {cores} cores (the serial loop: {n / serial:.3f} s on one)")
        if args.late:
            archive = args.workdir / f"archive-plain-{args.images}-{args.shape[0]}x{args.shape[1]}"
            append, rewrite, late, total = bench_late(archive, args.workdir, client, args.repeat)
            print(f"[late ] append a late night of {late} images {append:6.2f} s | ingest the season of {total} "
                  f"images anew {rewrite:6.2f} s | append costs {append / rewrite:.0%} of a rewrite")


if __name__ == "__main__":
    main()
