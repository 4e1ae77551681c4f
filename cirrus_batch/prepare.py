"""Preprocessing as distributed map operations over the store's shards.

``prepare`` fits the archive-wide models once (valid-sky mask, normalization, clear-sky model) on a sample of
images spread over the season, stores them in the store (``sky`` and the ``prepare`` attribute), then maps one
Dask task over every shard-aligned block of images that is not prepared yet. Each task reads ``raw`` and the
ambient temperature of its block and writes ``norm``, ``mask``, ``cloud_fraction`` and, last, ``quality``:
an image is prepared once its ``quality`` is not :data:`UNPREPARED`, so a killed run resumes where it stopped
and a second run does nothing. ``cloudy`` (threshold plus optional human labels) is cheap and recomputed over
the whole season on every run.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from distributed import Client, as_completed
from tqdm.auto import tqdm

from cirrus_batch import humanmasks, masks
from cirrus_batch.config import PrepareConfig, to_dict
from cirrus_batch.errors import CirrusError, StoreError
from cirrus_batch.store import Store, header_var, write_images

log = logging.getLogger(__name__)

UNPREPARED = 255
"""``quality`` fill value: the image has not been prepared yet."""
QUALITY_BITS = {"constant": masks.QUALITY_CONSTANT, "saturated": masks.QUALITY_SATURATED,
                "nodata": masks.QUALITY_NODATA}
IMAGE_VARS = {"norm": ("float32", 0.0), "residual": ("float16", 0.0), "mask": ("uint8", 0)}
VECTOR_VARS = {"cloud_fraction": ("float32", np.nan), "cloudy": ("bool", False), "quality": ("uint8", UNPREPARED)}


@dataclass
class Models:
    """Everything fitted once per archive; JSON-able attrs plus the ``sky`` mask."""

    geometry: masks.SkyGeometry
    normalization: masks.Normalization
    clear_sky: masks.ClearSkyModel
    mask_config: masks.MaskConfig
    ambient_key: str

    def to_attrs(self) -> dict[str, Any]:
        return {
            "ambient_key": self.ambient_key,
            "geometry": self.geometry.to_attrs(),
            "normalization": self.normalization.to_attrs(),
            "clear_sky": self.clear_sky.to_attrs(),
            "mask_config": to_dict(self.mask_config),
        }

    @classmethod
    def from_store(cls, group: zarr.Group) -> Models:
        attrs = group.attrs.get("prepare")
        if not attrs or "sky" not in group:
            raise StoreError("the store is not prepared yet: run `cirrus prepare STORE` first")
        shape = group["raw"].shape[1:]
        return cls(
            masks.SkyGeometry.from_attrs(attrs["geometry"], shape, group["sky"][:].astype(bool)),
            masks.Normalization.from_attrs(attrs["normalization"]),
            masks.ClearSkyModel.from_attrs(attrs["clear_sky"]),
            masks.MaskConfig(**attrs["mask_config"]),
            attrs["ambient_key"],
        )


@dataclass
class PrepareReport:
    """What one prepare run did."""

    images: int = 0
    prepared_now: int = 0
    fitted: bool = False
    flagged: dict[str, int] = field(default_factory=dict)
    cloudy: int = 0
    labelled: int = 0
    human_masks: int = 0
    seconds: float = 0.0


def _ambient(group: zarr.Group, key: str, index: slice | np.ndarray) -> np.ndarray:
    name = header_var(key)
    if name not in group:
        n = len(range(*index.indices(group["raw"].shape[0]))) if isinstance(index, slice) else len(index)
        return np.full(n, np.nan)
    return np.asarray(group[name][index], dtype=np.float64)


def read_images(array: zarr.Array, index: np.ndarray) -> np.ndarray:
    """Images at ``index``, read one by one (an orthogonal selection over shards decodes far more memory)."""
    return np.stack([array[int(i)] for i in index])


def fit_models(store_url: str, n: int, cfg: PrepareConfig) -> Models:
    """Task: fit sky geometry, normalization and clear-sky model on ``cfg.fit_images`` images spread over time."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    index = np.unique(np.linspace(0, n - 1, min(cfg.fit_images, n)).round().astype(int))
    sample = read_images(group["raw"], index)
    ambient = _ambient(group, cfg.ambient_key, index)
    geometry = masks.estimate_sky(sample, cfg.sky)
    normalization = masks.fit_normalization(sample, geometry)
    try:
        clear = masks.fit_clear_sky(sample, ambient, geometry, cfg.mask)
    except ValueError as exc:
        raise CirrusError(f"cannot fit the clear-sky model on {len(index)} images: {exc}") from None
    return Models(geometry, normalization, clear, cfg.mask, cfg.ambient_key)


def _create_arrays(store: Store, n: int, models: Models) -> None:
    store.add_time_arrays(n, IMAGE_VARS, VECTOR_VARS)
    group = store.group
    group["norm"].attrs.update({"long_name": "normalized raw", **models.normalization.to_attrs()})
    group["residual"].attrs.update({"long_name": f"clear-sky residual: asinh(z / {masks.RESIDUAL_SOFTENING:g}) / 2 "
                                                 "of the residual z in noise sigmas (sky pixels; 0 elsewhere)",
                                    "units": "1"})  # fmt: skip
    group["mask"].attrs.update({"long_name": "cloud mask (clear-sky model + astropy stretch + threshold)",
                                "flag_values": [0, 1], "flag_meanings": "clear cloud"})
    group["cloud_fraction"].attrs.update({"long_name": "cloud fraction over sky pixels", "units": "1"})
    group["quality"].attrs.update({
        "long_name": "quality flags", "flag_masks": list(QUALITY_BITS.values()),
        "flag_meanings": " ".join(QUALITY_BITS), "unprepared": UNPREPARED,
    })  # fmt: skip
    group["cloudy"].attrs.update({"long_name": "cloudy label (threshold or human label)"})


def prepare_block(store_url: str, start: int, stop: int) -> int:
    """Task: prepare images ``start:stop`` (one shard-aligned block); returns the number of images."""
    group = zarr.open_group(store_url, mode="r+", zarr_format=3)
    models = Models.from_store(group)
    region = slice(start, stop)
    raw = group["raw"][region]
    ambient = _ambient(group, models.ambient_key, region)
    quality = masks.quality_flags(raw, models.geometry, models.mask_config.saturated_fraction)
    mask, residual = masks.masks_and_residuals(raw, ambient, models.geometry, models.clear_sky, models.mask_config)
    write_images(group["norm"], region, masks.normalize(raw, models.normalization))
    write_images(group["residual"], region, residual.astype(np.float16))
    write_images(group["mask"], region, mask)
    group["cloud_fraction"][region] = masks.cloud_fraction(mask, models.geometry.sky)
    group["quality"][region] = quality  # written last: marks the block as prepared
    return stop - start


def read_labels(path: str | Path) -> dict[str, bool]:
    """Human labels: CSV with columns ``source,label``; label is cloudy/clear, 1/0, true/false, yes/no."""
    words = {"cloudy": True, "1": True, "true": True, "yes": True, "clear": False, "0": False, "false": False,
             "no": False}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise CirrusError(f"label file {path} does not exist") from None
    if rows and not {"source", "label"} <= set(rows[0]):
        raise CirrusError(f"label file {path} needs the columns source,label (has {', '.join(rows[0])})")
    labels = {}
    for i, row in enumerate(rows, start=2):
        word = (row["label"] or "").strip().lower()
        if word not in words:
            raise CirrusError(f"{path}:{i}: label {row['label']!r} is not one of {', '.join(words)}")
        labels[row["source"].strip()] = words[word]
    return labels


def todo_blocks(quality: np.ndarray, shard: int) -> list[tuple[int, int]]:
    """Shard-aligned ``(start, stop)`` blocks that hold at least one unprepared image."""
    n = len(quality)
    return [(a, min(a + shard, n)) for a in range(0, n, shard) if (quality[a : a + shard] == UNPREPARED).any()]


def prepare(
    store_url: str,
    client: Client,
    cfg: PrepareConfig | None = None,
    refit: bool = False,
    progress: bool = True,
    on_block: Callable[[int], None] | None = None,
) -> PrepareReport:
    """Prepare every image of the store that is not prepared yet (all of them with ``refit``).

    ``on_block`` is called with the number of images prepared so far after each finished block.
    """
    cfg = cfg or PrepareConfig()
    t0 = time.perf_counter()
    store = Store.open(store_url)
    group, n, shard = store.group, store.require_images(), store.shard_size
    store.repair()
    report = PrepareReport(images=n)
    labels = read_labels(cfg.labels) if cfg.labels else {}  # fail early on a bad label file
    if cfg.human.source:  # hand-drawn masks: imported first, so they are kept when the astropy fit fails
        report.human_masks = humanmasks.import_masks(store, cfg.human).masks
    if refit or "prepare" not in group.attrs:
        models = client.submit(fit_models, store_url, n, cfg, pure=False).result()
        log.info("fitted the models on %d images (%d judged clear)", min(n, cfg.fit_images), models.clear_sky.n_clear)
        sky = group.require_array("sky", shape=models.geometry.sky.shape, dtype="uint8", fill_value=0,
                                  dimension_names=("y", "x"))  # fmt: skip
        sky[:] = models.geometry.sky.astype(np.uint8)
        sky.attrs.update({"long_name": "valid sky pixels", "flag_values": [0, 1], "flag_meanings": "not_sky sky"})
        _create_arrays(store, n, models)
        if refit:
            group["quality"][:] = np.full(n, UNPREPARED, np.uint8)
        group.attrs["prepare"] = models.to_attrs()
        report.fitted = True
    elif "residual" not in group:  # prepared by a version without the residual: prepare every image again
        _create_arrays(store, n, Models.from_store(group))
        group["quality"][:] = np.full(n, UNPREPARED, np.uint8)
    blocks = todo_blocks(group["quality"][:n], shard)
    with tqdm(total=sum(b - a for a, b in blocks), desc="prepare", unit="img", disable=not progress,
              dynamic_ncols=True, mininterval=0.5) as bar:  # fmt: skip
        futures = [client.submit(prepare_block, store_url, a, b, pure=False) for a, b in blocks]
        for fut in as_completed(futures):
            done = fut.result()
            bar.update(done)
            report.prepared_now += done
            if on_block:
                on_block(report.prepared_now)
    quality = group["quality"][:n]
    report.flagged = {name: int(((quality & bit) > 0).sum()) for name, bit in QUALITY_BITS.items()}

    fraction = group["cloud_fraction"][:n]
    cloudy = humanmasks.human_cloudy(group, fraction > cfg.cloudy_fraction, cfg.cloudy_fraction)
    if labels:
        sources = group["source"][:n].tolist()
        for i, src in enumerate(sources):
            if src in labels:
                cloudy[i] = labels[src]
                report.labelled += 1
        unknown = len(labels) - report.labelled
        if unknown:
            log.warning("%d labelled sources are not in the store", unknown)
    group["cloudy"][:n] = cloudy
    group["cloudy"].attrs.update({"threshold": cfg.cloudy_fraction, "labels": str(cfg.labels or "")})
    report.cloudy = int(cloudy.sum())
    report.seconds = time.perf_counter() - t0
    return report


# -- evaluation against true masks ------------------------------------------------------------------
def truth_index(store_sources: list[str], truth_url: str) -> np.ndarray:
    """Position in the truth store of every store image (-1 where the truth has none)."""
    try:
        truth = zarr.open_group(truth_url, mode="r", zarr_format=3)
        positions = {s: i for i, s in enumerate(truth["source"][:].tolist())}
    except (FileNotFoundError, KeyError, zarr.errors.BaseZarrError):
        raise CirrusError(f"{truth_url} is not a true-mask store (needs source, mask, sky, night_kind)") from None
    return np.array([positions.get(s, -1) for s in store_sources], dtype=np.int64)


def evaluate_block(store_url: str, truth_url: str, start: int, index: np.ndarray, threshold: float) -> dict:
    """Task: confusion counts of the masks of images ``start:start+len(index)`` against their truth
    (``{}`` where none of them is in the truth)."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    truth = zarr.open_group(truth_url, mode="r", zarr_format=3)
    keep = index >= 0
    if not keep.any():
        return {}
    mask = group["mask"][start : start + len(index)][keep]
    true = read_images(truth["mask"], index[keep])
    kinds = np.asarray(truth["night_kind"].get_orthogonal_selection(index[keep]), dtype=object)
    return masks.confusion_counts(mask, true, truth["sky"][:].astype(bool), kinds, threshold)


def evaluate_store(
    store_url: str,
    truth_url: str,
    client: Client,
    cfg: PrepareConfig | None = None,
    panel: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Scores of the store's masks against true masks (IoU, F1, precision, recall, overall and per night kind,
    clear-frame false alarms, cloudy-label accuracy); optionally a PNG panel of one frame per kind.

    ``truth_url``: a true-mask store (``cirrus synth``) or a store with human masks (``prepare --masks``, this
    store itself too), scored on its labelled pixels (:func:`cirrus_batch.humanmasks.evaluate_store`)."""
    cfg = cfg or PrepareConfig()
    store = Store.open(store_url, mode="r")
    group, n, shard = store.group, store.committed, store.shard_size
    if "mask" not in group:
        raise StoreError(f"{store_url} has no masks: run `cirrus prepare {store_url}` first")
    index = truth_index(group["source"][:n].tolist(), truth_url)
    if not (index >= 0).any():
        raise CirrusError(f"no image of {store_url} is in the truth store {truth_url}")
    if humanmasks.has_masks(truth_url):  # a store with hand-drawn masks (this one or another): no panel
        return humanmasks.evaluate_store(store_url, truth_url, index, client, cfg.cloudy_fraction, shard)
    starts = range(0, n, shard)
    futures = [client.submit(evaluate_block, store_url, truth_url, a, index[a : a + shard], cfg.cloudy_fraction,
                             pure=False) for a in starts]  # fmt: skip
    total: dict = {}
    for fut in tqdm(as_completed(futures), total=len(futures), desc="evaluate", unit="shard", disable=not progress):
        total = masks.add_counts(total, fut.result())
    scores = masks.scores_from_counts(total)
    if panel:
        _panel(group, truth_url, index, panel)
    return scores


def _panel(group: zarr.Group, truth_url: str, index: np.ndarray, out_png: str | Path) -> Path:
    """Raw / clear-sky model / residual / mask / truth for the middle frame of each kind of night."""
    truth = zarr.open_group(truth_url, mode="r", zarr_format=3)
    kinds = np.asarray(truth["night_kind"][:], dtype=object)
    picks, titles = [], []
    for kind in dict.fromkeys(kinds[index[index >= 0]]):
        mine = np.flatnonzero((index >= 0) & (kinds[np.maximum(index, 0)] == kind))
        i = int(mine[len(mine) // 2])
        picks.append(i)
        titles.append(f"{kind} {str(np.datetime64(int(group['time'][i]), 'us'))[:16]}")
    models = Models.from_store(group)
    raw = read_images(group["raw"], picks)
    ambient = _ambient(group, models.ambient_key, np.array(picks))
    clear = masks.clear_sky(models.clear_sky, models.geometry, ambient, raw=raw, cfg=models.mask_config)
    mask = read_images(group["mask"], picks)
    true = read_images(truth["mask"], index[picks])
    return masks.quality_panel(raw, clear, mask, true, models.geometry, titles, out_png)
