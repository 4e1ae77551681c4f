"""What ingest does per plain-FITS image, step by step on one thread, against the serial astropy read.

Times (best of 3, warm page cache) each step ingest's tasks run per image — the header scan's read and parse,
the whole-file read, the CRC32C content digest, the decode to ``raw``, the LZ4 byte-shuffle encoding, the write
of the encoded bytes — and ``astropy.io.fits.getdata`` of the same files, then the ratio that two cores would reach
with no overhead at all (what ``bench_ingest.py`` measures is below it by the scan pass and the task round trips).
Runs under the workers' glibc settings (``cluster.WORKER_MALLOC``), re-executing itself to set them.

    python benchmarks/bench_ingest_steps.py [--images 300] [--workdir bench-out/ingest-steps]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fsspec
import numcodecs.blosc
import numpy as np
from astropy.io import fits
from numcodecs import Blosc

from cirrus_batch.cluster import WORKER_MALLOC
from cirrus_batch.fitsio import find_image, read_raw
from cirrus_batch.ingest import SCAN_BYTES, content_digest
from cirrus_batch.synth import write_archive


def per_image(fn: Callable[[], object], n: int, repeat: int = 3) -> float:
    """Best-of-``repeat`` milliseconds per image of ``fn`` over ``n`` images."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / n


def main() -> None:
    environ = {name: str(value) for name, value in WORKER_MALLOC.items()}
    if any(os.environ.get(k) != v for k, v in environ.items()):  # glibc reads them at start: run again with them
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **environ})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/ingest-steps"))
    args = parser.parse_args()
    archive = args.workdir / f"archive-{args.images}"
    if not archive.exists():
        write_archive(archive, nights=1, per_night=args.images, cadence_min=1, shape=(512, 640), seed=0,
                      progress=False)  # fmt: skip
    files = sorted(str(p) for p in archive.rglob("*.fits"))[: args.images]
    n = len(files)
    for f in files:
        Path(f).read_bytes()
    fs = fsspec.filesystem("file")
    bufs = [fs.cat_file(f) for f in files]
    layout = find_image(bufs[0][:SCAN_BYTES]).layout
    out = np.empty(layout.shape, np.uint16)
    images = []
    for b in bufs:
        read_raw(b, layout, out)
        images.append(out.copy())
    numcodecs.blosc.use_threads = False  # as in a Dask worker: Blosc's threads serve only the main thread
    blosc = Blosc(cname="lz4", clevel=3, shuffle=Blosc.SHUFFLE)  # the store's codec for raw
    encoded = [blosc.encode(a) for a in images]
    target = Path(tempfile.mkdtemp(dir=args.workdir)) / "shard"

    def write() -> None:
        with open(target, "wb") as fh:
            for e in encoded:
                fh.write(e)

    reference = per_image(lambda: [fits.getdata(f) for f in files], n)
    steps = {
        "header scan: read": per_image(lambda: [fs.cat_file(f, start=0, end=SCAN_BYTES) for f in files], n),
        "header scan: parse": per_image(lambda: [find_image(b[:SCAN_BYTES]) for b in bufs], n),
        "read the file": per_image(lambda: [fs.cat_file(f) for f in files], n),
        "content digest (CRC32C)": per_image(lambda: [content_digest(b) for b in bufs], n),
        "decode to raw": per_image(lambda: [read_raw(b, layout, out) for b in bufs], n),
        "encode (LZ4, byte shuffle)": per_image(lambda: [blosc.encode(a) for a in images], n),
        "write the encoded bytes": per_image(write, n),
    }
    print(f"{n} plain FITS images of {layout.shape[0]}x{layout.shape[1]}, one thread, best of 3, ms per image")
    for name, ms in steps.items():
        print(f"  {name:28s} {ms:6.3f}")
    work = sum(steps.values())
    print(f"  {'ingest, all steps':28s} {work:6.3f}   serial astropy getdata {reference:6.3f}")
    print(f"ratio two cores would reach with no overhead: {2 * reference / work:.2f}; encoded size "
          f"{np.mean([len(e) for e in encoded]) / images[0].nbytes:.3f} of raw")


if __name__ == "__main__":
    main()
