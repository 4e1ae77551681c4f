"""Season reprocessing: the trained classifier and U-Net applied to every image of the store as Dask tasks.

The client resolves both MLflow model URIs once to a concrete identity (registered name and version, run,
logged model, artifact location) and records the pair in ``pred_model.attrs["models"]``. Then one task per
shard-aligned block of images (on GPU workers where there are some; cloudiest blocks first) builds the network
inputs exactly as training did (from the prepared ``residual`` and ``brightness``, binned by prepare where it
stored them at the network's bin, or ``norm`` computed from ``raw``), classifies every image,
segments those classified cloudy, and writes ``p_cloudy``, ``cloudy_pred``, ``cloud_prob``,
``cloud_fraction_pred`` and, last, ``pred_model`` (the index of the model pair): an image is done once its
``pred_model`` is the current pair, so a killed run resumes where it stopped, a second run does nothing, a new
night is processed alone and a new model version (or a refitted normalization) reprocesses the season. Each
worker loads each model once. Images that ``cirrus prepare`` flagged (``quality``) are predicted like the
others; the season report leaves them out of the clear hours.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from distributed import Client, as_completed, get_worker
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from cirrus_batch.normalization import Normalization, normalize
from cirrus_batch.cluster import gpu_resources
from cirrus_batch.config import ReprocessConfig
from cirrus_batch.data import InputSpec, store_zenith
from cirrus_batch.errors import CirrusError, StoreError
from cirrus_batch.models import MEMORY_FORMAT, autocast_dtype, pick_device
from cirrus_batch.prepare import UNPREPARED, Models
from cirrus_batch.registry import CHAMPION
from cirrus_batch.shards import read_region
from cirrus_batch.store import (
    NOT_COMPUTED,
    PROB_SCALE,
    UNPROCESSED,
    Store,
    json_attr,
    set_json_attr,
    write_images,
)
from cirrus_batch.tracking import require_tracking_store, resolve_tracking_uri

log = logging.getLogger(__name__)

TASKS = {"classify": "classifier", "segment": "U-Net"}
PREDICTED = ("p_cloudy", "cloudy_pred", "cloud_fraction_pred")
IMAGE_VARS = {"cloud_prob": ("uint8", NOT_COMPUTED)}
VECTOR_VARS = {"p_cloudy": ("float32", np.nan), "cloudy_pred": ("bool", False),
               "cloud_fraction_pred": ("float32", np.nan), "pred_model": ("int16", UNPROCESSED)}  # fmt: skip
ATTRS = {
    "p_cloudy": {"long_name": "classifier probability that the image is cloudy", "units": "1",
                 "comment": "NaN: not reprocessed"},
    "cloudy_pred": {"long_name": "classified cloudy (p_cloudy >= threshold of the pred_model entry)"},
    "cloud_prob": {"long_name": "U-Net cloud probability", "units": "1", "scale_factor": 1 / PROB_SCALE,
                   "_FillValue": NOT_COMPUTED, "valid_range": [0, PROB_SCALE],
                   "comment": f"round(probability * {PROB_SCALE}) of the binned U-Net output, upsampled bilinearly "
                              f"to full resolution (rounded); {NOT_COMPUTED} (_FillValue, decoded to NaN): not sky, "
                              "image classified clear, or not reprocessed"},
    "cloud_fraction_pred": {"long_name": "U-Net cloud fraction", "units": "1", "standard_name": "cloud_area_fraction",
                            "comment": "fraction of sky pixels with cloud_prob > 0.5; 0 for images classified "
                                       "clear; NaN: not reprocessed"},
    "pred_model": {"long_name": "model pair of the predictions",
                   "comment": f"index into the JSON list attribute models; {UNPROCESSED}: not reprocessed"},
}  # fmt: skip


class ModelError(CirrusError):
    """A model URI that cannot be resolved, or a model that is not the cirrus model a step needs."""


@dataclass(frozen=True)
class ModelIdentity:
    """A model URI resolved on the client: what it is, where it is stored, and the inputs it reads."""

    uri: str
    spec: InputSpec
    """What the model reads (its MLflow metadata)."""
    run_id: str
    model_id: str
    source: str
    """The model's artifact location: what the workers load."""
    name: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        """``cirrus-unet v3`` for a registered version (``cirrus-unet v3 (@champion)`` through an alias), else
        the URI."""
        if not self.name:
            return self.uri
        alias = self.uri.partition("@")[2]
        return f"{self.name} v{self.version}" + (f" (@{alias})" if alias else "")

    def to_attrs(self) -> dict[str, Any]:
        """Its ``pred_model.attrs["models"]`` entry (docs/store.md)."""
        spec = self.spec
        return {"uri": self.uri, "task": spec.task, "run_id": self.run_id, "model_id": self.model_id,
                "source": self.source, "bin": spec.bin, "zenith": spec.zenith, "image": spec.image,
                "name": self.name, "version": self.version}  # fmt: skip


@dataclass
class ReprocessReport:
    """What one reprocess run did."""

    images: int
    processed: int
    skipped: int
    seconds: float
    classifier: ModelIdentity
    unet: ModelIdentity
    model_index: int
    cloudy: int = 0


@dataclass(frozen=True)
class Job:
    """Everything a block task needs (small: pickled with every task)."""

    store_url: str
    tracking_uri: str
    classifier: ModelIdentity
    unet: ModelIdentity
    index: int
    threshold: float
    batch_size: int
    amp: bool
    force: bool


# -- model resolution (client) --------------------------------------------------------------------
def _registered(uri: str, client: MlflowClient, tracking_uri: str) -> tuple[str | None, str | None]:
    """(name, version) of a ``models:/NAME/VERSION|latest`` or ``models:/NAME@ALIAS`` URI; (None, None) else."""
    if m := re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri):
        try:
            return m[1], str(client.get_model_version_by_alias(m[1], m[2]).version)
        except MlflowException:
            hint = (f"`cirrus promote STORE --task {'classify' if 'classif' in m[1] else 'segment'}` names one"
                    if m[2] == CHAMPION else "set it with MlflowClient().set_registered_model_alias")  # fmt: skip
            raise ModelError(f"{uri}: no version of {m[1]!r} has the alias {m[2]!r} in {tracking_uri} ({hint}; "
                             f"or give a version: models:/{m[1]}/latest)") from None  # fmt: skip
    m = re.fullmatch(r"models:/([^/@]+)/([^/]+)", uri)
    if not m:
        return None, None
    name, version = m[1], m[2]
    if version.isdigit():
        return name, version
    if version != "latest":
        raise ModelError(f"{uri}: use a version number, 'latest' or an alias (models:/{name}@ALIAS), not a stage")
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise ModelError(f"{uri}: the registered model {name!r} has no version in {tracking_uri}")
    return name, str(max(int(v.version) for v in versions))


def resolve_model(uri: str, tracking_uri: str, image_shape: tuple[int, int] | None = None) -> ModelIdentity:
    """The concrete model behind ``uri`` (``latest`` and aliases pinned to a version) and its input spec;
    with ``image_shape``, a clear error where the model was exported for other inputs than such images give."""
    require_tracking_store(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        name, version = _registered(uri, MlflowClient(tracking_uri), tracking_uri)
        info = mlflow.models.get_model_info(f"models:/{name}/{version}" if name else uri)
    except MlflowException as exc:
        raise ModelError(f"no model {uri} in {tracking_uri}: {str(exc).splitlines()[0]}") from None
    try:
        spec = InputSpec.from_metadata(info.metadata)
    except ValueError as exc:
        raise ModelError(f"{uri} is not a cirrus model: {exc}") from None
    if spec.task not in TASKS:
        raise ModelError(f"{uri} has the unknown task {spec.task!r} in its metadata")
    if image_shape is not None:
        _check_shape(uri, info.signature, spec, image_shape)
    return ModelIdentity(uri, spec, info.run_id, info.model_id, info.artifact_path, name, version)


def _check_shape(uri: str, signature: Any, spec: InputSpec, image_shape: tuple[int, int]) -> None:
    """Exported (pt2) models take one input size: the (c, h, w) of their signature."""
    inputs = signature.inputs.inputs if signature is not None else []
    if not inputs or getattr(inputs[0], "shape", None) is None:
        return
    expected = tuple(int(s) for s in inputs[0].shape[1:])
    ny, nx = image_shape
    got = (spec.in_channels, ny // spec.bin, nx // spec.bin)
    if expected != got:
        raise ModelError(f"{uri} takes inputs of {'x'.join(map(str, expected))} but this store's {ny}x{nx} "
                         f"images give {'x'.join(map(str, got))} (bin {spec.bin})")


def models_by_task(uris: list[str], tracking_uri: str) -> dict[str, str]:
    """``{"classify": uri, "segment": uri}`` for the given URIs, each by the task in its model metadata."""
    out: dict[str, str] = {}
    for uri in uris:
        task = resolve_model(uri, tracking_uri).spec.task
        if task in out:
            raise ModelError(f"--model {out[task]} and --model {uri} are both {TASKS[task]}s")
        out[task] = uri
    return out


def _expect(model: ModelIdentity, task: str) -> ModelIdentity:
    if model.spec.task != task:
        raise ModelError(f"{model.uri} is a {TASKS[model.spec.task]} ({model.spec.task} model), not a {TASKS[task]}")
    return model


# -- the block task (workers) ---------------------------------------------------------------------
_LOADED: dict[tuple[str, str], torch.nn.Module] = {}
"""Models loaded in this process, by (artifact location, device): each worker loads each model once."""


def load_model(model: ModelIdentity, tracking_uri: str, device: torch.device) -> torch.nn.Module:
    """The model as reprocess runs it: on ``device``, weights channels-last; loaded once per process."""
    key = (model.source, str(device))
    if key not in _LOADED:
        mlflow.set_tracking_uri(tracking_uri)
        _LOADED[key] = mlflow.pytorch.load_model(model.source).to(device, memory_format=MEMORY_FORMAT)
        log.info("loaded %s on %s", model.label, device)
    return _LOADED[key]


def _torch_threads() -> int:
    """Intra-op threads per task: the worker's threads shared by the tasks it runs at once (one per GPU)."""
    try:
        state = get_worker().state
    except ValueError:  # not in a worker
        return len(os.sched_getaffinity(0))
    at_once = min(state.nthreads, int(state.total_resources.get("GPU", 0)) or state.nthreads)
    return max(1, state.nthreads // at_once)


@torch.inference_mode()
def classify(model: torch.nn.Module, x: np.ndarray, device: torch.device,
             dtype: torch.dtype | None = None) -> np.ndarray:  # fmt: skip
    """(n,) float32 cloudy probability of the inputs ``x`` (n, c, h, w); ``dtype``: autocast to it."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(torch.from_numpy(x).to(device))
    return torch.sigmoid(logits.float()).cpu().numpy()


UPSAMPLE_DTYPE = {"cpu": torch.uint8}
"""Where the bilinear upsampling of ``cloud_prob`` runs on the uint8 codes: the CPU's kernel, 2.5x faster than
float (it rounds between its row and column passes: within one code of the float result, +0.12 on average);
elsewhere in float (CUDA has no uint8 kernel), rounded after."""


def upsample(q: torch.Tensor, bin: int, shape: tuple[int, int]) -> torch.Tensor:
    """(n, y, x) uint8: the uint8 images ``q`` (n, 1, h, w) upsampled bilinearly by ``bin`` and rounded, edge
    rows and columns repeated up to ``shape`` (the remainder that binning cut)."""
    dtype = UPSAMPLE_DTYPE.get(q.device.type, torch.float32)
    q = q.to(dtype)
    if bin > 1:
        q = F.interpolate(q, scale_factor=bin, mode="bilinear", align_corners=False)
    ny, nx = shape
    if q.shape[-2:] != shape:
        q = F.pad(q, (0, nx - q.shape[-1], 0, ny - q.shape[-2]), mode="replicate")
    return (q if dtype == torch.uint8 else q.round_().to(torch.uint8))[:, 0]


@torch.inference_mode()
def segment(model: torch.nn.Module, x: np.ndarray, sky: torch.Tensor, bin: int,
            dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``cloud_prob`` (n, y, x) uint8 at the full resolution of ``sky`` (:data:`NOT_COMPUTED` outside it) and the
    cloud fractions (sky pixels with ``cloud_prob`` > 0.5); ``dtype``: autocast the forward pass to it.

    The U-Net's binned probabilities are quantized (``PROB_SCALE``), then upsampled (:func:`upsample`): within
    1.5 codes (0.006) of upsampling the probabilities first, at a third of the cost on the CPU."""
    with torch.autocast(sky.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(torch.from_numpy(x).to(sky.device))
    q = torch.sigmoid(logits.float()).mul_(PROB_SCALE).round_().to(torch.uint8)
    outside = (~sky).to(torch.uint8) * NOT_COMPUTED  # OR-ing 255 is 4x faster than masked_fill_ here
    q = upsample(q, bin, tuple(sky.shape)).bitwise_or_(outside).cpu().numpy()
    n_sky = int(sky.sum())
    # every pixel outside the sky holds 255 > PROB_SCALE // 2: count all, subtract them (numpy: 6x torch's uint8)
    cloud = np.array([np.count_nonzero(image > PROB_SCALE // 2) for image in q]) - (sky.numel() - n_sky)
    return q, (cloud / max(n_sky, 1)).astype(np.float32)


def _images(arrays: dict[str, zarr.Array], positions: np.ndarray,
            normalization: Normalization | None) -> list[np.ndarray]:  # fmt: skip
    """The images ``arrays`` hold (:func:`_sources`), (n, y, x) each, at ``positions`` (increasing; read as one
    range: zarr's orthogonal indexing is ~15x slower); ``norm`` is ``raw`` normalized as prepare did."""
    rows = slice(int(positions[0]), int(positions[-1]) + 1)
    pick = slice(None) if len(positions) == rows.stop - rows.start else positions - positions[0]  # no copy
    return [normalize(read_region(array, rows)[pick], normalization) if name == "norm"  # type: ignore[arg-type]
            else read_region(array, rows)[pick] for name, array in arrays.items()]  # fmt: skip


def _sources(group: zarr.Group, spec: InputSpec, binned: tuple[str, ...]) -> dict[str, zarr.Array]:
    """The arrays the images ``spec`` reads come from (:meth:`InputSpec.source`), by image name (opening one reads
    its metadata: once per block)."""
    return {name: group[spec.source(name, binned)] for name in spec.images}


_ZENITH: dict[tuple[int, str, tuple[int, int]], np.ndarray] = {}
"""Zenith channels computed in this process, by (bin, geometry, image shape): once per worker, not per block
(0.14 ms per 512x640 image of a 100-image block)."""


def _zenith_input(group: zarr.Group, spec: InputSpec, shape: tuple[int, int]) -> np.ndarray:
    """``spec``'s zenith channel for the store ``group`` of images ``shape``."""
    key = (spec.bin, json.dumps(json_attr(group.attrs, "prepare")["geometry"], sort_keys=True), shape)
    if key not in _ZENITH:
        _ZENITH[key] = spec.zenith_input(store_zenith(group))
    return _ZENITH[key]


def reprocess_block(job: Job, start: int, stop: int) -> int:
    """Task: predict the images of block ``start:stop`` not yet done by the job's models; returns how many."""
    group = zarr.open_group(job.store_url, mode="r+", zarr_format=3)
    marker = group["pred_model"][start:stop]
    todo = np.arange(stop - start) if job.force else np.flatnonzero(marker != job.index)
    if not len(todo):
        return 0
    torch.set_num_threads(_torch_threads())
    device = pick_device()
    dtype = autocast_dtype(device) if job.amp else None
    classifier = load_model(job.classifier, job.tracking_uri, device)
    unet = load_model(job.unet, job.tracking_uri, device)
    normalization = Normalization.from_attrs(json_attr(group.attrs, "prepare")["normalization"])
    sky = torch.from_numpy(group["sky"][:].astype(bool)).to(device)
    same_inputs = job.classifier.spec.inputs_like(job.unet.spec)
    inputs = {}  # by task: (zenith channel, images stored binned, their arrays)
    for m in (job.classifier, job.unet) if not same_inputs else (job.classifier,):
        binned = m.spec.binned(group)
        zenith = _zenith_input(group, m.spec, tuple(sky.shape)) if m.spec.zenith else None
        inputs[m.spec.task] = (zenith, binned, _sources(group, m.spec, binned))
    if len(todo) == stop - start:  # every value is written below
        out = {name: np.empty(stop - start, VECTOR_VARS[name][0]) for name in PREDICTED}
        probs = np.empty((stop - start, *sky.shape), np.uint8)
    else:
        out = {name: group[name][start:stop] for name in PREDICTED}
        probs = group["cloud_prob"][start:stop]
    for batch in np.array_split(todo, -(-len(todo) // job.batch_size)):
        zenith, binned, arrays = inputs["classify"]
        x = job.classifier.spec.inputs(_images(arrays, start + batch, normalization), zenith_input=zenith,
                                       binned=binned)  # fmt: skip
        p = classify(classifier, x, device, dtype)
        cloudy = p >= job.threshold
        out["p_cloudy"][batch], out["cloudy_pred"][batch] = p, cloudy
        out["cloud_fraction_pred"][batch[~cloudy]], probs[batch[~cloudy]] = 0.0, NOT_COMPUTED
        if cloudy.any():
            done = batch[cloudy]
            if same_inputs:
                x = x[cloudy]
            else:
                zenith, binned, arrays = inputs["segment"]
                x = job.unet.spec.inputs(_images(arrays, start + done, normalization), zenith_input=zenith,
                                         binned=binned)  # fmt: skip
            probs[done], out["cloud_fraction_pred"][done] = segment(unet, x, sky, job.unet.spec.bin, dtype)
    region = slice(start, stop)
    write_images(group["cloud_prob"], region, probs)
    for name, values in out.items():
        group[name][region] = values
    marker[todo] = job.index
    group["pred_model"][region] = marker  # written last: marks the images as done
    return len(todo)


# -- the run (client) -----------------------------------------------------------------------------
def _check_prepared(group: zarr.Group, n: int, url: str) -> None:
    """A clear error when images lack the clear-sky residual the models read."""
    missing = n if "residual" not in group else int((group["quality"][:n] == UNPREPARED).sum())
    if missing:
        raise StoreError(f"{missing} images of {url} are not prepared (the models read their clear-sky "
                         f"residual): run `cirrus prepare {url}` first")  # fmt: skip


def _entry_key(entry: dict[str, Any]) -> tuple:
    """What makes two provenance entries the same predictions (not when or by which URI they were asked for)."""
    return (
        {k: v for k, v in entry["classifier"].items() if k != "uri"},
        {k: v for k, v in entry["unet"].items() if k != "uri"},
        entry["threshold"],
        entry["normalization"],
        entry.get("amp", False),
    )


def model_index(group: zarr.Group, classifier: ModelIdentity, unet: ModelIdentity, cfg: ReprocessConfig) -> int:
    """Index of this model pair (with ``cfg``'s threshold and precision) in ``pred_model.attrs["models"]``,
    appended when new."""
    entry = {
        "classifier": classifier.to_attrs(),
        "unet": unet.to_attrs(),
        "threshold": float(cfg.threshold),
        "amp": cfg.amp,
        "normalization": json_attr(group.attrs, "prepare")["normalization"],
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    entries = list(json_attr(group["pred_model"].attrs, "models", []))
    for i, old in enumerate(entries):
        if _entry_key(old) == _entry_key(entry):
            return i
    if len(entries) >= np.iinfo(np.int16).max:
        raise StoreError("pred_model: too many model pairs recorded")
    set_json_attr(group["pred_model"].attrs, "models", [*entries, entry])
    return len(entries)


def reprocess(
    store_url: str,
    client: Client,
    classifier_uri: str | None = None,
    unet_uri: str | None = None,
    cfg: ReprocessConfig | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    tracking_uri: str | None = None,
    on_block: Callable[[int], None] | None = None,
) -> ReprocessReport:
    """Predict every image of the store not yet predicted by these models (all of them with ``force``).

    URIs default to ``cfg.classifier`` / ``cfg.unet`` (the champions); ``tracking_uri`` to MLflow's current one,
    a relative sqlite path resolved against the store's folder (``cirrus_batch.tracking``).
    ``on_block`` is called with the number of images processed so far after each finished block.
    """
    cfg = cfg or ReprocessConfig()
    t0 = time.perf_counter()
    store = Store.open(store_url)
    group, n, shard = store.group, store.require_images(), store.shard_size
    Models.from_store(group)  # a clear error when the store is not prepared
    tracking = resolve_tracking_uri(tracking_uri or mlflow.get_tracking_uri(), store_url)
    classifier = _expect(resolve_model(classifier_uri or cfg.classifier, tracking, store.image_shape), "classify")
    unet = _expect(resolve_model(unet_uri or cfg.unet, tracking, store.image_shape), "segment")
    store.repair()
    if {"residual", "brightness"} & {*classifier.spec.images, *unet.spec.images}:
        _check_prepared(group, n, store.url)
    store.add_time_arrays(n, IMAGE_VARS, VECTOR_VARS, ATTRS)
    index = model_index(group, classifier, unet, cfg)
    job = Job(store.url, tracking, classifier, unet, index, cfg.threshold, cfg.batch_size, cfg.amp, force)
    marker = group["pred_model"][:n]
    counts = {(a, min(a + shard, n)): (min(shard, n - a) if force else int((marker[a : a + shard] != index).sum()))
              for a in range(0, n, shard)}  # fmt: skip
    cloudy = group["cloudy"][:n]  # prepare's labels: the U-Net's share of each block's work
    blocks = sorted((block for block, count in counts.items() if count), key=lambda b: -int(cloudy[b[0] : b[1]].sum()))
    report = ReprocessReport(n, 0, n - sum(counts.values()), 0.0, classifier, unet, index)
    log.info("reprocess %d of %d images with %s + %s (model pair %d)", n - report.skipped, n, classifier.label,
             unet.label, index)  # fmt: skip
    resources = gpu_resources(client)  # blocks submitted cloudiest first: the run does not end on a long one
    with tqdm(total=n - report.skipped, desc="reprocess", unit="img", disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:  # fmt: skip
        futures = [client.submit(reprocess_block, job, a, b, resources=resources, pure=False) for a, b in blocks]
        for fut in as_completed(futures):
            done = fut.result()
            bar.update(done)
            report.processed += done
            if on_block:
                on_block(report.processed)
    report.cloudy = int(group["cloudy_pred"][:n].sum())
    report.seconds = time.perf_counter() - t0
    return report
