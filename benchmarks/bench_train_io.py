"""Training from the zarr store against training on the same images already in memory, in one run.

The training step must not be starved by reading the store: the same model (``build_model(task, **unet)``,
Adam, ``cirrus_batch.train._train_epoch``: same loss and augmentation, same seeds, same shuffle order) is
trained for ``--epochs`` on N prepared cloudy images (quality 0):

(a) store: ``StoreSamples`` built as ``cirrus_batch.train.train`` builds it (soft targets, the ``cache_mb``
    sample cache of ``TrainConfig``) through a ``DataLoader`` set up exactly as train does (batch 16, shuffle,
    ``--num-workers`` persistent workers); the first epoch reads every sample from the store, later ones
    from the worker's cache;
(b) memory: the tensors ``StoreSamples`` returns for those images, read beforehand into a ``TensorDataset``,
    through a ``DataLoader`` with ``num_workers=0``.

A warm-up batch (throw-away model) runs untimed before each side; ``torch.set_num_threads`` as ``train()``.
The OS page cache holds the store's chunk files for both sides (read once beforehand), so the comparison is the
loading pipeline (zarr decode, binning, collation, workers), not the disk. Target: RATIO store/memory >= 0.9
(fastest epochs); the first epochs' ratio is printed too (every sample read from the store).
Memory: peak RSS (sampled every 0.1 s) of the training process (and of its DataLoader workers) in the store run,
measured before the in-memory dataset exists, and in the in-memory run, against that dataset's size and the
full-resolution size of the images.

Before timing it waits (polls every 10 s, up to 15 min) until no other training or prepare/ingest benchmark
runs on the machine (``pgrep -f "cirrus train"``, ``pgrep -f "bench_prepare|bench_ingest"``).

    python benchmarks/bench_train_io.py [--images 256] [--epochs 3] [--num-workers 1] [--bin 4]
                                        [--task segment] [--store bench-out/prepare-500-512x640.zarr]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import zarr
from torch.utils.data import DataLoader, Subset, TensorDataset

from bench_prepare import RssPeaks

from cirrus_batch.config import TrainConfig, to_dict
from cirrus_batch.data import StoreSamples
from cirrus_batch.models import build_model, pick_device
from cirrus_batch.store import Store
from cirrus_batch.train import _threads, _train_epoch, input_spec, mixed_precision, net_config

MIB = 2**20
BUSY = ("cirrus train", "bench_prepare|bench_ingest")


def others_running() -> list[str]:
    """Command lines of competing jobs (``pgrep -f`` patterns), leaving out this process and its ancestors."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for pattern in BUSY:
        out = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, cmd = line.partition(" ")
            if int(pid) not in mine:
                found.append(f"{pid} {cmd[:100]}")
    return found


def wait_quiet(poll: float = 10.0, limit: float = 900.0) -> str:
    """Wait until :func:`others_running` is empty; a line saying how long it waited (or that it timed out)."""
    t0 = time.monotonic()
    while found := others_running():
        waited = time.monotonic() - t0
        if waited >= limit:
            return (f"WARNING: timed out after waiting {waited:.0f} s for other jobs to finish; timings may be "
                    f"skewed by: {'; '.join(found)}")  # fmt: skip
        print(f"waiting for {len(found)} other job(s): {found[0]}", file=sys.stderr, flush=True)
        time.sleep(poll)
    waited = time.monotonic() - t0
    return f"waited {waited:.0f} s for other jobs to finish" if waited > 1 else "no other jobs running"


def ensure_store(url: Path, n: int = 500, shape: tuple[int, int] = (512, 640)) -> str:
    """The prepared store at ``url`` (prepared again when it predates an array training reads); when missing, a
    synthetic one as ``bench_prepare`` builds, then prepared."""
    if url.exists() and "residual" in zarr.open_group(str(url), mode="r", zarr_format=3):
        return str(url.absolute())
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_prepare  # noqa: E402  (distributed only when a store must be built)
    from distributed import Client

    from cirrus_batch.config import PrepareConfig
    from cirrus_batch.prepare import prepare

    url.parent.mkdir(parents=True, exist_ok=True)
    with bench_prepare.make_cluster(os.cpu_count() or 1) as cluster, Client(cluster) as client:
        built = bench_prepare.ensure_store(url.parent, n, shape, client)
        prepare(built, client, PrepareConfig(), progress=False)
    return built


def cloudy_positions(url: str, n: int, seed: int) -> np.ndarray:
    """``n`` positions (sorted, drawn with ``seed``) of prepared (quality 0) cloudy images."""
    group = zarr.open_group(url, mode="r", zarr_format=3)
    committed = Store.open(url).committed
    good = np.flatnonzero((group["quality"][:committed] == 0) & (group["cloudy"][:committed] > 0))
    if len(good) < n:
        raise SystemExit(f"{url} has only {len(good)} prepared cloudy images, fewer than --images {n}")
    return np.sort(np.random.default_rng(seed).choice(good, n, replace=False))


def warm_page_cache(url: str, names: tuple[str, ...]) -> int:
    """Read every file of the arrays ``names`` once (bytes only); returns the bytes read."""
    total = 0
    for name in names:
        for path in Path(url, name).rglob("*"):
            if path.is_file():
                total += len(path.read_bytes())
    return total


def make_loader(dataset, cfg: TrainConfig, num_workers: int, device: torch.device) -> DataLoader:
    """The training DataLoader as ``train()`` builds it (its own seeded shuffle generator)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                      num_workers=num_workers, persistent_workers=num_workers > 0,
                      pin_memory=device.type == "cuda")  # fmt: skip


def warm_up(dataset, task: str, cfg: TrainConfig, device: torch.device) -> None:
    """One untimed training batch on a throw-away model (lazy initialisation, allocator, kernels)."""
    model = build_model(task, in_channels=input_spec(task, cfg).in_channels, **to_dict(net_config(task, cfg))).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype, scaler = mixed_precision(cfg, device)
    loader = DataLoader(Subset(dataset, range(min(cfg.batch_size, len(dataset)))), batch_size=cfg.batch_size)
    _train_epoch(model, loader, optimizer, scaler, cfg, device, torch.Generator(device=device).manual_seed(99),
                 amp_dtype, "warm-up", False)  # fmt: skip


def run(dataset, task: str, cfg: TrainConfig, epochs: int, num_workers: int,
        device: torch.device) -> tuple[float, list[float], list[float]]:  # fmt: skip
    """Train a freshly seeded model for ``epochs``: images/s of the fastest epoch (the least disturbed by other
    load on the machine), per-epoch seconds and losses."""
    warm_up(dataset, task, cfg, device)
    loader = make_loader(dataset, cfg, num_workers, device)
    torch.manual_seed(cfg.seed)
    model = build_model(task, in_channels=input_spec(task, cfg).in_channels, **to_dict(net_config(task, cfg))).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype, scaler = mixed_precision(cfg, device)
    augment_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    seconds, losses = [], []
    for epoch in range(epochs):
        e0 = time.perf_counter()
        losses.append(_train_epoch(model, loader, optimizer, scaler, cfg, device, augment_gen, amp_dtype,
                                   f"epoch {epoch + 1}", False))  # fmt: skip
        seconds.append(time.perf_counter() - e0)
    del loader  # stops persistent workers
    return len(dataset) / min(seconds), seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="prepared cloudy images to train on")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the store side")
    parser.add_argument("--cache-mb", type=float, default=TrainConfig.cache_mb,
                        help="sample cache of the store side (0: read the store every epoch)")
    parser.add_argument("--bin", type=int, default=4)
    parser.add_argument("--task", choices=("segment", "classify"), default="segment")
    parser.add_argument("--store", type=Path, default=Path("bench-out/prepare-500-512x640.zarr"),
                        help="prepared store (built as bench_prepare does, 500 images, when missing)")  # fmt: skip
    args = parser.parse_args()

    cfg = TrainConfig(bin=args.bin, num_workers=args.num_workers, batch_size=16, cache_mb=args.cache_mb)
    quiet = wait_quiet()
    url = ensure_store(args.store)
    threads = _threads(cfg)
    torch.set_num_threads(threads)
    device = pick_device()
    positions = cloudy_positions(url, args.images, cfg.seed)
    spec = input_spec(args.task, cfg)
    names = (*spec.images, "mask") if args.task == "segment" else spec.images
    cached = warm_page_cache(url, names)
    committed = Store.open(url).committed
    group = zarr.open_group(url, mode="r", zarr_format=3)
    shape, pixel_bytes = group[spec.images[0]].shape[1:], sum(group[name].dtype.itemsize for name in names)

    store_ds = StoreSamples(url, positions, spec, cfg.soft_targets, cfg.cache_mb)
    print(f"{quiet}; {os.cpu_count()} cores, torch {torch.__version__} on {device}, {threads} torch threads")
    print(f"store {url}: {committed} images of {shape[0]}x{shape[1]}, {len(positions)} prepared cloudy ones "
          f"used, bin {args.bin} -> {tuple(store_ds[0][0].shape)}, task {args.task}, batch {cfg.batch_size}, "
          f"{args.epochs} epochs, seed {cfg.seed}, sample cache {cfg.cache_mb:g} MiB; page cache warmed "
          f"({cached / MIB:.0f} MiB of "
          f"{'+'.join(names)} chunk files read)")  # fmt: skip

    base = psutil.Process().memory_info().rss
    with RssPeaks() as peak:
        store_rate, store_s, store_loss = run(store_ds, args.task, cfg, args.epochs, args.num_workers, device)
    time.sleep(0.2)

    t0 = time.perf_counter()
    uncached = StoreSamples(url, positions, spec, cfg.soft_targets)
    samples = [uncached[i] for i in range(len(uncached))]
    memory_ds = TensorDataset(*(torch.stack([s[k] for s in samples]) for k in range(3)))
    del samples
    preload = time.perf_counter() - t0
    data_bytes = sum(t.nbytes for t in memory_ds.tensors)
    full_bytes = len(positions) * int(np.prod(shape)) * pixel_bytes
    memory_base = psutil.Process().memory_info().rss
    with RssPeaks() as memory_peak:
        memory_rate, memory_s, memory_loss = run(memory_ds, args.task, cfg, args.epochs, 0, device)

    fmt = lambda v: " ".join(f"{x:.4f}" for x in v)  # noqa: E731
    print(f"store : StoreSamples + DataLoader(num_workers={args.num_workers}) {store_rate:7.2f} images/s "
          f"(epochs {' '.join(f'{s:.1f}' for s in store_s)} s, train loss {fmt(store_loss)})")
    print(f"memory: TensorDataset + DataLoader(num_workers=0)  {memory_rate:7.2f} images/s "
          f"(epochs {' '.join(f'{s:.1f}' for s in memory_s)} s, train loss {fmt(memory_loss)}; "
          f"preloaded in {preload:.1f} s)")
    diff = max(abs(a - b) / abs(b) for a, b in zip(store_loss, memory_loss))
    print(f"RATIO store/memory {store_rate / memory_rate:.3f} (target >= 0.9); first epochs "
          f"{memory_s[0] / store_s[0]:.3f}; same images, order, model and augmentation seeds (train losses differ "
          f"by at most {diff:.1e} relative)")  # fmt: skip
    print(f"memory: peak RSS of the training process: store run {peak.client / MIB:.0f} MiB "
          f"({(peak.client - base) / MIB:+.0f} MiB over the {base / MIB:.0f} MiB before it; its "
          f"{args.num_workers} worker(s) {sum(peak.per_pid.values()) / MIB:.0f} MiB RSS, pages shared with it by fork "
          f"included), in-memory run {memory_peak.client / MIB:.0f} MiB ({(memory_peak.client - memory_base) / MIB:+.0f} "
          f"MiB over {memory_base / MIB:.0f}) | in-memory dataset {data_bytes / MIB:.0f} MiB binned "
          f"({full_bytes / MIB:.0f} MiB of {'+'.join(names)} at full resolution; whole store "
          f"{committed * int(np.prod(shape)) * pixel_bytes / MIB:.0f} MiB of {'+'.join(names)})")  # fmt: skip

if __name__ == "__main__":
    main()
