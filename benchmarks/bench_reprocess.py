"""Reprocess throughput against the bare forward pass and a naive serial loop; reprocess memory against the
archive size.

Throughput (one run, the same synthetic season of 512x640 images and the same two models, trained briefly
with the architecture of ``jobs/train.toml``; quality is irrelevant here):

(a) ``cirrus_batch.reprocess.reprocess(force=True)`` on the project's local cluster (one single-threaded worker
    process per core), models already loaded on the workers by a first, untimed run (the cold run's rate is
    printed too): read the models' input image (``residual``), classify, segment the cloudy images, upsample,
    quantize, write;
(b) the bare forward pass of both models in this process on the same network inputs already in memory
    (the models as reprocess runs them: ``reprocess.load_model``, autocast to ``models.autocast_dtype``; torch
    with one thread per core, batches of ``batch_size``): the classifier on every image, the U-Net on the
    images (a) classified cloudy. The compute limit. Target: a/b >= 0.95 with the U-Net of ``jobs/train.toml``
    (it averages the 4 flips of each image), >= 0.8 with ``--single-pass`` (``flip_average = false``: the other
    work per image is then a larger share);
(c) a naive serial loop over the FITS files: ``astropy.io.fits.getdata`` -> normalize -> classify one image ->
    segment it when cloudy -> ``np.save`` its results (the clear-sky residual that the models of
    ``jobs/train.toml`` read comes from the store, as reprocess reads it); the models as
    ``mlflow.pytorch.load_model`` returns them, torch with its default threads. Target: a/c >= 2.

The season has 2000 images by default: with shards of 100 that is 20 block tasks, so that the last block does
not leave a worker idle for a large share of the run (a real season has thousands of shards).

(a) and (b) run ``--repeat`` times, interleaved, and the median of each counts; (b) is also measured with one
thread (``a/(2 x one-thread forward)``: against perfect scaling over the cores). The 1-minute load average is
printed: above 1.5 x cores other processes competed (the machine is shared) and the figures are disturbed;
then the CPU time per image (workers' process time against the one-thread forward pass's) still compares the
work done per image: forward/reprocess is a/b on idle cores with a perfectly scaling forward pass.

The classifier of a short training (3 epochs on 200 images) separates the images only roughly, so the threshold
is set near the quantile that classifies as many images cloudy as the store's ``cloudy`` labels say (a
realistic share of U-Net work), in a gap of the probabilities; (a), (b) and (c) use it alike. The share each
side segmented is printed.

``--memory``: peak RSS of the client and of each worker (sampled every 0.1 s, and the workers' own getrusage)
during a cold ``reprocess`` on a fresh cluster, for stores of 1k and 10k images. These stores hold 128x160
images (models trained on them) to keep the run short; peak memory depends on the image size and the shard
size, not on the number of images. Target: ratio ~1.

    python benchmarks/bench_reprocess.py [--images 2000] [--naive-images 300] [--repeat 3] [--single-pass]
                                          [--workdir bench-out]
    python benchmarks/bench_reprocess.py --memory [--memory-images 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from statistics import median_low
from pathlib import Path

import mlflow
import numpy as np
import psutil
import torch
import zarr
from astropy.io import fits
from bench_prepare import RssPeaks, make_cluster, worker_maxrss
from distributed import Client
from mlflow.tracking import MlflowClient

from cirrus_batch.normalization import Normalization, normalize
from cirrus_batch.config import IngestConfig, PrepareConfig, ReprocessConfig, load_config, to_dict
from cirrus_batch.data import store_zenith
from cirrus_batch.errors import StoreError
from cirrus_batch.ingest import ingest
from cirrus_batch.models import autocast_dtype
from cirrus_batch.prepare import prepare
from cirrus_batch.reprocess import classify, load_model, reprocess, resolve_model, segment
from cirrus_batch.store import Store, json_attr
from cirrus_batch.synth import KINDS, write_archive
from cirrus_batch.train import train

SHARD = 100
MIB = 2**20
CLASSIFIER, UNET = "models:/cirrus-classifier/latest", "models:/cirrus-unet/latest"


def ensure_season(workdir: Path, n: int, shape: tuple[int, int], client: Client) -> str:
    """A prepared store of ``n`` synthetic images (every night kind), reusing what ``workdir`` holds (the
    archive is the one ``bench_prepare.py`` writes for the same size)."""
    tag = f"{n}-{shape[0]}x{shape[1]}"
    archive, store = workdir / f"prepare-archive-{tag}", workdir / f"reprocess-{tag}.zarr"
    if not archive.exists():  # nights of at most 600 one-minute frames, every kind alike
        nights = len(KINDS) * -(-n // (600 * len(KINDS)))
        write_archive(archive, nights=nights, per_night=-(-n // nights), cadence_min=1.0, shape=shape, seed=1,
                      client=client, progress=False)  # fmt: skip
    try:
        ingested = Store.open(str(store)).committed >= n
    except StoreError:  # no store yet
        ingested = False
    if not ingested:
        ingest(str(archive), str(store), client, IngestConfig(shard_size=SHARD), progress=False)
    prepare(str(store), client, PrepareConfig(), progress=False)  # nothing to do when prepared
    return str(store.absolute())


def ensure_models(store: str, single_pass: bool) -> str:
    """Tracking URI of an MLflow DB beside the store holding both models, trained on it for 3 epochs with the
    networks of ``jobs/train.toml`` (the U-Net without the flip average if ``single_pass``; once per training
    config, reused afterwards)."""
    base = Path(f"{Path(store).with_suffix('')}{'-single' if single_pass else ''}")
    tracking = f"sqlite:///{base}-mlflow.db"
    overrides = {"train.epochs": 3, "train.sampling.n_images": 200, "train.sampling.min_gap_min": 0.0,
                 "train.num_workers": 0, "train.tracking_uri": tracking, "train.checkpoint_dir": f"{base}-ckpt",
                 "train.unet.flip_average": not single_pass}  # fmt: skip
    cfg = load_config("jobs/train.toml", overrides).train
    done, config = Path(f"{base}-models.json"), json.loads(json.dumps(to_dict(cfg)))
    if done.exists() and json.loads(done.read_text()).get("config") == config:
        return tracking
    client = MlflowClient(tracking)
    if client.get_experiment_by_name(cfg.experiment) is None:  # artifacts beside the DB, not in ./mlruns
        client.create_experiment(cfg.experiment, artifact_location=f"{base}-mlruns")
    uris = {task: train(store, task, cfg, progress=False).model_uri for task in ("classify", "segment")}
    done.write_text(json.dumps({"config": config, "uris": uris}))
    return tracking


def set_threshold(store: str, client: Client, tracking: str) -> tuple[float, float]:
    """Threshold classifying about as many images cloudy as the ``cloudy`` labels (after a cold reprocess run
    that also loads the models on the workers), in the widest gap of ``p_cloudy`` within +-10 % of that
    quantile, so that float32 and mixed precision pick the same images; returns it and the cold run's images/s."""
    cold = reprocess(store, client, progress=False, force=True, tracking_uri=tracking)
    group = zarr.open_group(store, mode="r")
    p = np.sort(group["p_cloudy"][:])
    k, d = round((1 - float(group["cloudy"][:].mean())) * len(p)), len(p) // 10
    window = p[max(k - d, 0) : k + d + 1]
    i = int(np.argmax(np.diff(window)))
    return float(window[i] + window[i + 1]) / 2, cold.processed / cold.seconds


def reprocess_rate(store: str, client: Client, tracking: str, cfg: ReprocessConfig) -> tuple[float, float]:
    """(a) images/s of a forced reprocess on warm workers, and the workers' CPU seconds per image."""
    cpu0 = sum(client.run(time.process_time).values())
    report = reprocess(store, client, cfg=cfg, force=True, progress=False, tracking_uri=tracking)
    cpu = sum(client.run(time.process_time).values()) - cpu0
    return report.processed / report.seconds, cpu / report.processed


def load_models(tracking: str, as_reprocess: bool) -> tuple:
    """(model, identity) of both; the models as ``reprocess`` runs them, or as MLflow loads them."""
    mlflow.set_tracking_uri(tracking)
    ids = [resolve_model(uri, tracking) for uri in (CLASSIFIER, UNET)]
    load = (lambda m: load_model(m, tracking, torch.device("cpu"))) if as_reprocess else (
        lambda m: mlflow.pytorch.load_model(m.source))  # fmt: skip
    return tuple((load(m), m) for m in ids)


def stack(images: dict, spec) -> np.ndarray:
    """(n, k, y, x) the images ``spec`` reads, from ``images``: name -> a function giving (n, y, x)."""
    return np.stack([images[k]() for k in spec.images], axis=1)


def forward_inputs(store: str, tracking: str) -> tuple:
    """Both models and their inputs in memory: every image for the classifier, the cloudy ones for the U-Net."""
    (clf, clf_id), (unet, unet_id) = load_models(tracking, as_reprocess=True)
    group = zarr.open_group(store, mode="r")
    normalization = Normalization.from_attrs(json_attr(group.attrs, "prepare")["normalization"])
    zenith = store_zenith(group)
    cloudy = group["cloudy_pred"][:]
    xc, xu = [], []
    for a in range(0, len(cloudy), SHARD):
        images = {"norm": lambda: normalize(group["raw"][a : a + SHARD], normalization),
                  **{k: (lambda k=k: group[k][a : a + SHARD].astype(np.float32)) for k in ("residual", "brightness")}}
        xc.append(torch.from_numpy(clf_id.spec.inputs(stack(images, clf_id.spec), zenith)))
        xu.append(torch.from_numpy(unet_id.spec.inputs(stack(images, unet_id.spec)[cloudy[a : a + SHARD]], zenith)))
    return clf, unet, torch.cat(xc), torch.cat(xu)


def forward_rate(inputs: tuple, batch: int, threads: int, dtype: torch.dtype | None) -> tuple[float, float]:
    """(b) images/s of the bare forward passes on inputs in memory (classifier on all, U-Net on the cloudy), and
    the CPU seconds per image."""
    clf, unet, xc, xu = inputs
    torch.set_num_threads(threads)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        clf(xc[:batch]), unet(xu[:batch])  # warm-up
        t0, cpu0 = time.perf_counter(), time.process_time()
        for i in range(0, len(xc), batch):
            clf(xc[i : i + batch])
        for i in range(0, len(xu), batch):
            unet(xu[i : i + batch])
        return len(xc) / (time.perf_counter() - t0), (time.process_time() - cpu0) / len(xc)


def naive_rate(store: str, archive: Path, tracking: str, threshold: float, k: int, out: Path,
               threads: int) -> tuple[float, float]:  # fmt: skip
    """(c) images/s of the serial per-file loop over ``k`` files spread over the season, and their cloudy share."""
    (clf, clf_id), (unet, unet_id) = load_models(tracking, as_reprocess=False)
    group = zarr.open_group(store, mode="r")
    normalization = Normalization.from_attrs(json_attr(group.attrs, "prepare")["normalization"])
    zenith = store_zenith(group)
    sky = torch.from_numpy(group["sky"][:].astype(bool))
    sources = np.asarray(group["source"][:], dtype=object)
    picks = np.unique(np.linspace(0, len(sources) - 1, k).round().astype(int))
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    cloudy = 0
    t0 = time.perf_counter()
    for i in picks:
        raw = fits.getdata(archive / sources[i])
        images = {"norm": lambda: normalize(raw[None], normalization),
                  **{k: (lambda k=k: group[k][i : i + 1]) for k in ("residual", "brightness")}}
        p = classify(clf, clf_id.spec.inputs(stack(images, clf_id.spec), zenith), torch.device("cpu"))
        result = {"p_cloudy": p}
        if p[0] >= threshold:
            cloudy += 1
            x = unet_id.spec.inputs(stack(images, unet_id.spec), zenith)
            result["cloud_prob"], result["cloud_fraction_pred"] = segment(unet, x, sky, unet_id.spec.bin)
        np.save(out / f"{i}.npy", result, allow_pickle=True)
    return len(picks) / (time.perf_counter() - t0), cloudy / len(picks)


def memory_run(store: str, tracking: str, workers: int) -> tuple[int, int, int, int, float]:
    """Cold forced reprocess on a fresh cluster: peak client RSS, its growth during the run, max worker RSS
    (sampled, and getrusage) and images/s."""
    with make_cluster(workers) as cluster, Client(cluster) as client:
        pids = set(client.run(os.getpid).values())
        before = psutil.Process().memory_info().rss
        with RssPeaks() as peaks:
            report = reprocess(store, client, force=True, progress=False, tracking_uri=tracking)
            time.sleep(2 * peaks.interval)
        worker = max(peaks.per_pid.get(pid, 0) for pid in pids)
        rusage = max(client.run(worker_maxrss).values())
    return peaks.client, peaks.client - before, worker, rusage, report.processed / report.seconds


def memory(args: argparse.Namespace, cores: int) -> None:
    shape = (128, 160)
    sizes = sorted(set(args.memory_images))
    with make_cluster(cores) as cluster, Client(cluster) as client:
        stores = {n: ensure_season(args.workdir, n, shape, client) for n in sizes}
    tracking = ensure_models(stores[sizes[0]], args.single_pass)  # trained on the smallest store, used on all
    print(f"memory: cold forced reprocess on a fresh LocalCluster of {cores} single-threaded workers, stores of "
          f"{', '.join(map(str, sizes))} images of {shape[0]}x{shape[1]} (small images keep the 10k run short; "
          f"memory depends on image and shard size, not on the number of images), shards of {SHARD}")
    print("client: this benchmark process (torch and MLflow imported; it trained the models when it had to); "
          "growth: its peak during the run minus its RSS before")
    print(f"{'images':>8} {'images/s':>9} {'client MiB':>11} {'growth MiB':>11} {'max worker MiB':>15} "
          f"{'(getrusage)':>12}")
    rows = {}
    for n in sizes:
        rows[n] = memory_run(stores[n], tracking, cores)
        client_rss, growth, worker, rusage, rate = rows[n]
        print(f"{n:8d} {rate:9.1f} {client_rss / MIB:11.0f} {growth / MIB:11.0f} {worker / MIB:15.0f} "
              f"{rusage / MIB:12.0f}")
    if len(sizes) > 1:
        lo, hi = rows[sizes[0]], rows[sizes[-1]]
        print(f"{f'{sizes[-1]}/{sizes[0]}':>8} {'':>9} {hi[0] / lo[0]:11.2f} {'':>11} {hi[2] / lo[2]:15.2f} "
              f"{hi[3] / lo[3]:12.2f}   (target ~1.0)")


def throughput(args: argparse.Namespace, cores: int) -> None:
    shape = (args.shape[0], args.shape[1])
    load = [os.getloadavg()[0]]
    with make_cluster(cores) as cluster, Client(cluster) as client:
        store = ensure_season(args.workdir, args.images, shape, client)
        tracking = ensure_models(store, args.single_pass)
        threshold, cold = set_threshold(store, client, tracking)
        cfg = ReprocessConfig(threshold=threshold)
        reprocess(store, client, cfg=cfg, force=True, progress=False, tracking_uri=tracking)  # warm-up: this threshold
        inputs = forward_inputs(store, tracking)
        dtype = autocast_dtype(torch.device("cpu")) if cfg.amp else None
        runs = []
        for _ in range(args.repeat):  # interleaved, so that a burst of other load hits every side alike
            runs.append((reprocess_rate(store, client, tracking, cfg),
                         forward_rate(inputs, cfg.batch_size, cores, dtype),
                         forward_rate(inputs, cfg.batch_size, 1, dtype)))  # fmt: skip
            load.append(os.getloadavg()[0])
    (rate, cpu), (forward, _), (forward_1, cpu_1) = (median_low(v) for v in zip(*runs))
    cloudy = float(zarr.open_group(store, mode="r")["cloudy_pred"][:].mean())
    archive = args.workdir / f"prepare-archive-{args.images}-{shape[0]}x{shape[1]}"
    naive, naive_cloudy = naive_rate(store, archive, tracking, threshold, args.naive_images,
                                     args.workdir / "reprocess-naive-out", cores)  # fmt: skip
    load.append(os.getloadavg()[0])
    clf = resolve_model(CLASSIFIER, tracking).spec
    print(f"throughput: {args.images} images of {shape[0]}x{shape[1]} (bin {clf.bin} -> "
          f"{shape[0] // clf.bin}x{shape[1] // clf.bin}), classifier and U-Net of jobs/train.toml, {cores} cores, "
          f"batches of {cfg.batch_size}, {cloudy:.0%} of the images classified cloudy and segmented "
          f"({naive_cloudy:.0%} of the naive loop's {args.naive_images}); U-Net "
          f"{'single-pass' if args.single_pass else 'flip-averaged'}; median of {args.repeat} runs for (a), (b)")
    print(f"(a) cirrus reprocess, LocalCluster of {cores} single-threaded workers: {rate:7.1f} images/s "
          f"(first run on fresh workers, loading the models, threshold 0.5: {cold:.1f} images/s)")
    precision = str(dtype or torch.float32).removeprefix("torch.")
    print(f"(b) bare forward pass in memory, {precision}, torch {cores} threads: {forward:7.1f} images/s "
          f"(1 thread: {forward_1:.1f} images/s)")
    print(f"(c) naive serial loop (FITS -> normalize -> predict -> np.save), float32, torch {cores} threads: "
          f"{naive:7.1f} images/s")
    target = 0.8 if args.single_pass else 0.95
    print(f"RATIO a/b {rate / forward:.2f} (target >= {target}) | a/(2 x one-thread forward) "
          f"{rate / (cores * forward_1):.2f} | RATIO a/c {rate / naive:.2f} (target >= 2)")
    print(f"CPU time per image (insensitive to other load): cirrus reprocess {1000 * cpu:.1f} ms (workers), bare "
          f"forward {1000 * cpu_1:.1f} ms (1 thread): forward/reprocess {cpu_1 / cpu:.2f}, i.e. a/b on idle cores "
          "with perfect scaling of the forward pass")
    busy = max(load)
    print(f"1-min load average during the run: {', '.join(f'{x:.1f}' for x in load)} on {cores} cores"
          + (" -- other processes competed for the cores: the figures are disturbed" if busy > 1.5 * cores else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images of the throughput season")
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 640))
    parser.add_argument("--naive-images", type=int, default=300, help="files the naive loop processes")
    parser.add_argument("--repeat", type=int, default=3, help="runs of (a) and (b), interleaved; the median counts")
    parser.add_argument("--single-pass", action="store_true", help="a U-Net without the flip average")
    parser.add_argument("--memory", action="store_true", help="compare peak memory for --memory-images instead")
    parser.add_argument("--memory-images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    args.workdir = args.workdir.absolute()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    memory(args, cores) if args.memory else throughput(args, cores)


if __name__ == "__main__":
    main()
