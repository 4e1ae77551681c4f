"""Preprocessing as distributed map operations over the store's shards.

``prepare`` fits the archive-wide models once: the sky geometry (:mod:`cirrus_batch.geometry`) and the
normalization on ``fit_images`` images spread over the season, then the clear-sky model
(:mod:`cirrus_batch.clearsky`) on the profiles of up to ``[prepare.clear] search_images`` frames (a map over
blocks), and stores them (``sky``, ``pixel_class`` and the ``prepare`` attribute). Then two maps over every
shard-aligned block that holds unprepared images: the first fits each image's clear-sky ε0 (``eps_fit``,
``sky_excess``); the client holds each ε0 to its night's clear-sky trend (``clear_eps``, ``clear_eps_source``);
the second (cloudiest blocks first) writes ``residual``, ``brightness``, ``mask``, ``cloud_fraction``,
``mask_confidence``, ``mask_flags`` and, last, ``quality``: an image is prepared once its ``quality`` is not
:data:`UNPREPARED`, so a killed run resumes where it stopped and a second run does nothing. ``cloudy``
(threshold plus optional human labels) is cheap and recomputed over the whole season on every run.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from distributed import Client, as_completed
from tqdm.auto import tqdm

from cirrus_batch import clearsky, geometry, humanmasks, masks, panels, provenance, scoring
from cirrus_batch.cluster import trim_workers
from cirrus_batch.config import PrepareConfig, to_dict
from cirrus_batch.data import bin_image
from cirrus_batch.errors import CirrusError, ConfigError, StoreError
from cirrus_batch.normalization import Normalization, fit_normalization
from cirrus_batch.shards import read_region
from cirrus_batch.skyflat import FlatSums, SkyFlat
from cirrus_batch.store import Store, binned_var, header_var, json_attr, set_json_attr, write_images

log = logging.getLogger(__name__)

UNPREPARED = 255
"""``quality`` fill value: the image has not been prepared yet."""
QUALITY_BITS = {"constant": masks.QUALITY_CONSTANT, "saturated": masks.QUALITY_SATURATED,
                "nodata": masks.QUALITY_NODATA}
IMAGE_VARS = {"residual": ("float16", 0.0), "brightness": ("float16", 0.0), "mask": ("uint8", 0)}
"""Images prepare writes; ``norm`` (the normalized raw) is not stored but computed from ``raw`` where it is read
(``normalization.normalize`` with the ``prepare`` attribute's ``normalization``): as float32 it was half the
store."""
VECTOR_VARS = {"cloud_fraction": ("float32", np.nan), "cloudy": ("bool", False), "quality": ("uint8", UNPREPARED),
               "eps_fit": ("float32", np.nan), "p_fit": ("float32", np.nan), "sky_excess": ("float32", np.nan),
               "sky_clear": ("float32", np.nan), "clear_eps": ("float32", np.nan), "clear_p": ("float32", np.nan),
               "clear_eps_source": ("uint8", 0), "mask_confidence": ("float32", np.nan),
               "mask_flags": ("uint8", 0)}  # fmt: skip
BINNED = ("residual", "brightness")
"""Images prepare also stores binned by ``[prepare] input_bin`` (:func:`~cirrus_batch.store.binned_var`), for
the networks (:meth:`cirrus_batch.data.InputSpec.binned`)."""
FITTED_VARS = ("sky", "pixel_class", *IMAGE_VARS, *(v for v in VECTOR_VARS if v != "cloudy"))
"""Arrays made with the fitted models (``cloudy`` is relabelled over the whole season on every run)."""


def fit_settings(cfg: PrepareConfig) -> dict[str, Any]:
    """The ``[prepare]`` settings of the recipe of :data:`FITTED_VARS` (``fit_images`` only sizes the fitting
    sample of a refit: not part of it)."""
    return {"sky": to_dict(cfg.sky), "clear": to_dict(cfg.clear), "mask": to_dict(cfg.mask),
            "ambient_key": cfg.ambient_key}


CURRENT_KEYS = {"clear_config", "flat"}
"""Keys of the ``prepare`` attribute that this version writes: a store without them is fitted again."""


@dataclass
class Models:
    """Everything fitted once per archive; JSON-able attrs plus the pixel classes."""

    geometry: geometry.SkyGeometry
    normalization: Normalization
    clear_sky: clearsky.ClearSkyModel
    mask_config: masks.MaskConfig
    clear_config: clearsky.ClearSkyConfig
    ambient_key: str
    flat: SkyFlat | None = None
    """The sky flat (arrays ``flat_offset``, ``flat_gain``); None: none could be measured or ``flat_images`` 0."""

    def to_attrs(self) -> dict[str, Any]:
        return {
            "ambient_key": self.ambient_key,
            "flat": {"sigma": self.flat.sigma, "frames": self.flat.frames} if self.flat is not None else None,
            "geometry": self.geometry.to_attrs(),
            "normalization": self.normalization.to_attrs(),
            "clear_sky": self.clear_sky.to_attrs(),
            "mask_config": to_dict(self.mask_config),
            "clear_config": to_dict(self.clear_config),
        }

    @classmethod
    def from_store(cls, group: zarr.Group) -> Models:
        attrs = json_attr(group.attrs, "prepare")
        if not attrs or "pixel_class" not in group or not CURRENT_KEYS <= attrs.keys():
            raise StoreError("the store is not prepared (or was prepared by an older version): run "
                             "`cirrus prepare STORE --refit`")  # fmt: skip
        return cls(
            geometry.SkyGeometry.from_attrs(attrs["geometry"], group["pixel_class"][:]),
            Normalization.from_attrs(attrs["normalization"]),
            clearsky.ClearSkyModel.from_attrs(attrs["clear_sky"]),
            masks.MaskConfig(**attrs["mask_config"]),
            clearsky.ClearSkyConfig(**attrs["clear_config"]),
            attrs["ambient_key"],
            SkyFlat(*(group[f"flat_{k}"][:] for k in SkyFlat.ARRAYS), **attrs["flat"]) if attrs["flat"] else None,
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
    low_confidence: int = 0
    """Images whose mask confidence is below ``[prepare] low_confidence``."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Images carrying each :data:`cirrus_batch.masks.MASK_FLAGS` reason."""
    clear_sky: dict[str, Any] = field(default_factory=dict)
    """How the clear-sky model was fitted: clear frames found, scale source, geometry."""
    human_masks: int = 0
    seconds: float = 0.0


def ambient_temps(group: zarr.Group, key: str, index: slice | np.ndarray) -> np.ndarray:
    """Ambient temperatures (deg C) of a store's images ``index`` from header ``key``; NaN where none."""
    name = header_var(key)
    if name not in group:
        n = len(range(*index.indices(group["raw"].shape[0]))) if isinstance(index, slice) else len(index)
        return np.full(n, np.nan)
    return np.asarray(group[name][index], dtype=np.float64)


def read_images(array: zarr.Array, index: np.ndarray) -> np.ndarray:
    """Images at ``index``, read one by one (an orthogonal selection over shards decodes far more memory)."""
    return np.stack([array[int(i)] for i in index])


def spread_index(n: int, k: int) -> np.ndarray:
    """Up to ``k`` positions spread evenly over ``n`` images."""
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))


def fit_geometry(store_url: str, n: int, cfg: PrepareConfig) -> tuple[geometry.SkyGeometry, Normalization]:
    """Task: sky geometry and normalization on ``cfg.fit_images`` images spread over time."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    index = spread_index(n, cfg.fit_images)
    sample = read_images(group["raw"], index)
    try:
        geom = geometry.estimate_sky(sample, ambient_temps(group, cfg.ambient_key, index), cfg.sky)
        return geom, fit_normalization(sample, geom)
    except ValueError as exc:
        raise CirrusError(f"{store_url}: {exc}") from None


def calibrate(store_url: str, client: Client, cfg: PrepareConfig, panel: str | Path) -> geometry.SkyGeometry:
    """The sky geometry of a store (as ``prepare`` fits it; the store is not changed) and its panel PNG."""
    store = Store.open(store_url, mode="r")
    n = store.require_images()
    geom, _ = client.submit(fit_geometry, store_url, n, cfg, pure=False).result()
    index = spread_index(n, cfg.fit_images)
    median = np.median(read_images(store.group["raw"], index), axis=0)
    panels.geometry_panel(median, geom, panel, title=f"{store_url}: {len(index)} frames")
    return geom


def profile_block(store_url: str, index: np.ndarray, geom: geometry.SkyGeometry, ambient_key: str,
                  cfg: clearsky.ClearSkyConfig) -> clearsky.Profiles:  # fmt: skip
    """Task: clear-sky :class:`~cirrus_batch.clearsky.Profiles` of the images at ``index``."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    return clearsky.profiles(read_images(group["raw"], index), ambient_temps(group, ambient_key, index), geom, cfg)


FLAT_NAMES = {"offset": "offset a of e = a + (1 + b) e_clear", "gain": "gain b of e = a + (1 + b) e_clear",
              "mean_clear": "mean clear sky of the frames it was measured on", "gain_var": "variance of the gain b"}


FLAT_TASK_FRAMES = 16
"""At most this many clear frames per sky-flat task (their raw images are read at once): a worker's memory for
the flat does not grow with the number of clear frames the season has."""


def flat_sums_block(store_url: str, index: np.ndarray, eps: np.ndarray, p: np.ndarray, geom: geometry.SkyGeometry,
                    model: clearsky.ClearSkyModel, ambient_key: str, cfg: clearsky.ClearSkyConfig,
                    prior: SkyFlat | None) -> FlatSums:  # fmt: skip
    """Task: sky-flat sums of the clear images at ``index`` (see :func:`cirrus_batch.masks.flat_block`)."""
    group = zarr.open_group(store_url, mode="r", zarr_format=3)
    return masks.flat_block(read_images(group["raw"], index), ambient_temps(group, ambient_key, index), eps, p, geom,
                            model, cfg, prior)  # fmt: skip


def fit_models(store_url: str, n: int, client: Client, cfg: PrepareConfig, shard: int) -> Models:
    """Fit geometry and normalization in one task, the clear-sky model from profiles computed by a map, the sky
    flat from two maps over the model's clear frames."""
    geom, norm = client.submit(fit_geometry, store_url, n, cfg, pure=False).result()
    # sent to each worker once, not with every task: a task's arguments stay in its worker until the client
    # releases the task, and ~460 tasks of a 46 000-frame season each holding a 1.6 MB geometry added ~300 MiB
    shared = client.scatter(geom, broadcast=True, hash=False)
    index = spread_index(n, cfg.clear.search_images)
    parts = [p for a in range(0, n, shard) if (p := index[(index >= a) & (index < a + shard)]).size]
    futures = client.map(profile_block, [store_url] * len(parts), parts, geom=shared, ambient_key=cfg.ambient_key,
                         cfg=cfg.clear, pure=False)  # fmt: skip
    prof = clearsky.concat_profiles(client.gather(futures))
    model = clearsky.fit_clear_sky(prof, cfg.clear)
    pos, eps, p = masks.flat_frames(model, cfg.clear)
    flat = None
    if pos.size:
        at = index[pos]
        n_tasks = max(min(pos.size, 2 * len(client.nthreads()) or 1), math.ceil(pos.size / FLAT_TASK_FRAMES))
        tasks = np.array_split(np.arange(pos.size), n_tasks)

        def sums_of(prior: SkyFlat | None) -> FlatSums:
            flat_prior = client.scatter(prior, broadcast=True, hash=False) if prior is not None else None
            futures = [client.submit(flat_sums_block, store_url, at[t], eps[t], p[t], shared, model, cfg.ambient_key,
                                     cfg.clear, flat_prior, pure=False) for t in tasks if t.size]  # fmt: skip
            return sum(client.gather(futures), FlatSums.zeros(int(geom.sky.sum())))

        flat = masks.sky_flat(sums_of, geom, model, cfg.clear)
    return Models(geom, norm, model, cfg.mask, cfg.clear, cfg.ambient_key, flat)


def _create_binned(store: Store, n: int, input_bin: int) -> None:
    """The :data:`BINNED` arrays binned by ``input_bin`` (none for 0); those of another bin (attribute ``bin``, as
    ``cirrus export`` tells them) are deleted."""
    group = store.group
    for name in [name for name, array in group.arrays() if array.attrs.get("bin", input_bin) != input_bin]:
        del group[name]
    if not input_bin:
        return
    store.add_time_arrays(n, {binned_var(name, input_bin): IMAGE_VARS[name] for name in BINNED}, {}, bin=input_bin)
    for name in BINNED:
        group[binned_var(name, input_bin)].attrs.update({
            "long_name": f"{name} binned {input_bin}x{input_bin} (block means)", "units": "1", "bin": input_bin,
            "comment": f"the float16 mean of each {input_bin}x{input_bin} block of {name} (what the networks "
                       "read; the remainder rows and columns are cut)"})  # fmt: skip


def _create_arrays(store: Store, n: int, input_bin: int) -> None:
    group = store.group
    store.add_time_arrays(n, IMAGE_VARS, VECTOR_VARS)
    _create_binned(store, n, input_bin)
    group["residual"].attrs.update({"long_name": "clear-sky residual", "units": "1",
                                    "description": f"asinh(z / {masks.RESIDUAL_SOFTENING:g}) / 2 of the residual z "
                                                   "from the clear sky in noise sigmas (sky pixels; 0 elsewhere)"})
    group["brightness"].attrs.update({"long_name": "brightness relative to the ambient black body", "units": "1",
                                      "description": "1 - (ambient reference - raw) / span: about the effective "
                                                     "emissivity (sky pixels; 0 elsewhere)"})  # fmt: skip
    group["mask"].attrs.update({"long_name": "cloud mask", "standard_name": "cloud_binary_mask",
                                "flag_values": [0, 1], "flag_meanings": "clear cloud",
                                "comment": "clear-sky model + astropy stretch + threshold; 0 also off the sky"})
    group["cloud_fraction"].attrs.update({"long_name": "cloud fraction over sky pixels", "units": "1",
                                          "standard_name": "cloud_area_fraction"})
    group["quality"].attrs.update({
        "long_name": "quality flags", "flag_masks": list(QUALITY_BITS.values()),
        "flag_meanings": " ".join(QUALITY_BITS), "unprepared": UNPREPARED,
    })  # fmt: skip
    group["cloudy"].attrs.update({"long_name": "cloudy label (threshold or human label)"})
    group["eps_fit"].attrs.update({"long_name": "clear-sky zenith emissivity fitted to the image", "units": "1"})
    group["sky_excess"].attrs.update({"long_name": "fraction of sky above the clear sky at the fitted emissivity",
                                      "units": "1"})  # fmt: skip
    group["sky_clear"].attrs.update({"long_name": "fraction of sky within noise of the clear sky at the fitted "
                                                  "emissivity", "units": "1"})  # fmt: skip
    group["clear_eps"].attrs.update({"long_name": "clear-sky zenith emissivity used for the mask", "units": "1"})
    group["p_fit"].attrs.update({"long_name": "clear-sky slant-path exponent fitted to the image", "units": "1"})
    group["clear_p"].attrs.update({"long_name": "clear-sky slant-path exponent used for the mask", "units": "1"})
    group["clear_eps_source"].attrs.update({"long_name": "where clear_eps comes from",
                                            "flag_values": list(clearsky.EPS_SOURCES.values()),
                                            "flag_meanings": " ".join(clearsky.EPS_SOURCES)})  # fmt: skip
    group["mask_confidence"].attrs.update({"long_name": "confidence of the mask (0-1)", "units": "1"})
    group["mask_flags"].attrs.update({"long_name": "why the mask's confidence is below 1",
                                      "flag_masks": list(masks.MASK_FLAGS.values()),
                                      "flag_meanings": " ".join(masks.MASK_FLAGS)})  # fmt: skip


def fit_block(store_url: str, start: int, stop: int) -> tuple[np.ndarray, ...]:
    """Task, first pass: each image's clear-sky (ε0, p), sky excess and clear fraction for images ``start:stop``."""
    group = zarr.open_group(store_url, mode="r+", zarr_format=3)
    models = Models.from_store(group)
    region = slice(start, stop)
    fits = masks.fit_block(read_region(group["raw"], region), ambient_temps(group, models.ambient_key, region),
                           models.geometry, models.clear_sky, models.clear_config, models.flat)  # fmt: skip
    for name, values in zip(("eps_fit", "p_fit", "sky_excess", "sky_clear"), fits):
        group[name][region] = values.astype(np.float32)
    return fits


def _write_binned(group: zarr.Group, region: slice, images: dict[str, np.ndarray], input_bin: int) -> None:
    """Write the :data:`BINNED` images of ``region`` binned by ``input_bin`` (none for 0)."""
    for name in BINNED if input_bin else ():  # float16 means of float16 values: bin_image's, exactly
        write_images(group[binned_var(name, input_bin)], region, bin_image(images[name], input_bin).astype(np.float16))


def bin_block(store_url: str, start: int, stop: int, input_bin: int) -> int:
    """Task: write the :data:`BINNED` images of ``start:stop`` binned by ``input_bin`` from the stored ones (a
    store prepared before they were stored); returns the number of images."""
    group = zarr.open_group(store_url, mode="r+", zarr_format=3)
    region = slice(start, stop)
    _write_binned(group, region, {name: read_region(group[name], region) for name in BINNED}, input_bin)
    return stop - start


def prepare_block(store_url: str, start: int, stop: int) -> int:
    """Task, second pass: prepare images ``start:stop`` (one shard-aligned block); returns the number of images."""
    group = zarr.open_group(store_url, mode="r+", zarr_format=3)
    models = Models.from_store(group)
    region = slice(start, stop)
    raw = read_region(group["raw"], region)
    ambient = ambient_temps(group, models.ambient_key, region)
    out = masks.make_masks(raw, ambient, group["clear_eps"][region], group["clear_p"][region],
                           group["clear_eps_source"][region], models.geometry, models.clear_sky, models.mask_config,
                           models.clear_config, models.flat)  # fmt: skip
    write_images(group["residual"], region, out.residual)
    write_images(group["brightness"], region, out.brightness)
    write_images(group["mask"], region, out.mask)
    _write_binned(group, region, {name: getattr(out, name) for name in BINNED},
                  json_attr(group.attrs, "prepare").get("input_bin", 0))  # fmt: skip
    group["cloud_fraction"][region] = masks.cloud_fraction(out.mask, models.geometry.sky)
    group["mask_confidence"][region] = out.confidence
    group["mask_flags"][region] = out.flags
    group["quality"][region] = out.quality  # written last: marks the block as prepared
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


def cloudiest_first(blocks: list[tuple[int, int]], sky_clear: np.ndarray) -> list[tuple[int, int]]:
    """``blocks`` ordered by their images' mean clear-sky fraction, lowest first: an overcast block's masks cost
    up to twice a clear one's (the deck is extended to the horizon), so a map started with them does not end on
    one while the other workers idle. Blocks without a fitted image (cost unknown) go last."""

    def clear(block: tuple[int, int]) -> float:
        values = sky_clear[block[0] : block[1]]
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else np.inf

    return sorted(blocks, key=clear)


def _bin_prepared(store: Store, n: int, input_bin: int, client: Client, progress: bool) -> None:
    """A store prepared before binned inputs were stored: bin the prepared images' :data:`BINNED` by
    ``input_bin``, then record it (last: until then the networks bin the full images)."""
    group, shard = store.group, store.shard_size
    _create_binned(store, n, input_bin)
    if input_bin:
        quality = group["quality"][:n]
        blocks = [(a, min(a + shard, n)) for a in range(0, n, shard) if (quality[a : a + shard] != UNPREPARED).any()]
        with tqdm(total=sum(b - a for a, b in blocks), desc=f"bin {input_bin}x{input_bin}", unit="img",
                  disable=not progress, dynamic_ncols=True, mininterval=0.5) as bar:  # fmt: skip
            futures = [client.submit(bin_block, store.url, a, b, input_bin, pure=False) for a, b in blocks]
            for fut in as_completed(futures):
                bar.update(fut.result())
    set_json_attr(group.attrs, "prepare", {**json_attr(group.attrs, "prepare"), "input_bin": input_bin})


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
    if "norm" in group:  # written by older versions: computed from raw where it is read
        log.info("removing %s/norm: no longer stored (normalized from raw where it is read)", store_url)
        del group["norm"]
    current = CURRENT_KEYS <= json_attr(group.attrs, "prepare", {}).keys() and "pixel_class" in group
    if "prepare" in group.attrs and not current:
        log.warning("%s was prepared by an older version of cirrus: fitting the models again", store_url)
    if current and not refit:
        provenance.require_current(group, FITTED_VARS, fit_settings(cfg), "prepare", "--refit")
        stored = json_attr(group.attrs, "prepare").get("input_bin")  # None: prepared before binned inputs
        if stored is not None and stored != cfg.input_bin:
            raise ConfigError(f"{store_url} stores residual and brightness binned by {stored} ([prepare] input_bin "
                              f"when it was fitted), not {cfg.input_bin}: give --refit to rebuild them for the "
                              "whole season, or restore the setting")  # fmt: skip
    if refit or not current:
        models = fit_models(store_url, n, client, cfg, shard)
        for name, values, meanings in (
            ("sky", models.geometry.sky.astype(np.uint8), {0: "not_sky", 1: "sky"}),
            ("pixel_class", models.geometry.classes, geometry.CLASS_NAMES),
        ):
            arr = group.require_array(name, shape=values.shape, dtype="uint8", fill_value=0, dimension_names=("y", "x"))
            arr[:] = values
            arr.attrs.update({"flag_values": list(meanings), "flag_meanings": " ".join(meanings.values())})
        zero = np.zeros(models.geometry.shape, np.float32)
        flat = models.flat or SkyFlat(zero, zero, zero, zero, [], 0)
        for key in SkyFlat.ARRAYS:
            arr = group.require_array(f"flat_{key}", shape=zero.shape, dtype="float32", fill_value=0.0,
                                      dimension_names=("y", "x"))  # fmt: skip
            arr[:] = getattr(flat, key)
            arr.attrs.update({"long_name": f"sky flat: {FLAT_NAMES[key]}", "units": "1"})
        group["sky"].attrs["long_name"] = "valid sky pixels"
        group["pixel_class"].attrs["long_name"] = "sky geometry: sky, ambient reference, dark reference, defect, other"
        _create_arrays(store, n, cfg.input_bin)
        group["quality"][:] = np.full(n, UNPREPARED, np.uint8)
        set_json_attr(group.attrs, "prepare", {**models.to_attrs(), "input_bin": cfg.input_bin})
        provenance.record(group, FITTED_VARS, fit_settings(cfg))
        report.fitted = True
    if json_attr(group.attrs, "prepare").get("input_bin") is None:  # prepared before binned inputs were stored
        _bin_prepared(store, n, cfg.input_bin, client, progress)
    models = Models.from_store(group)
    report.clear_sky = _model_summary(models)
    if models.clear_sky.prior_only:
        log.warning("no clear frame among %d searched: the clear-sky model is the physical shape alone and every "
                    "mask has a low confidence", min(n, cfg.clear.search_images))  # fmt: skip
    blocks = todo_blocks(group["quality"][:n], shard)
    todo = sum(b - a for a, b in blocks)
    trim_workers(client)  # the fit's images are freed: each pass below starts from its own working set
    with tqdm(total=2 * todo, desc="prepare", unit="img", disable=not progress, dynamic_ncols=True,
              mininterval=0.5) as bar:  # fmt: skip
        for fut in as_completed([client.submit(fit_block, store_url, a, b, pure=False) for a, b in blocks]):
            bar.update(len(fut.result()[0]))
        sky_clear = group["sky_clear"][:n]
        eps, p, source = clearsky.choose_eps(
            group["time"][:n].astype("datetime64[us]"), ambient_temps(group, models.ambient_key, slice(0, n)),
            group["eps_fit"][:n], group["p_fit"][:n],
            group["sky_excess"][:n], sky_clear, models.clear_sky, models.clear_config)
        for a, b in blocks:  # only the images about to be prepared: the others keep the clear sky of their masks
            group["clear_eps"][a:b] = eps[a:b].astype(np.float32)
            group["clear_p"][a:b] = p[a:b].astype(np.float32)
            group["clear_eps_source"][a:b] = source[a:b]
        trim_workers(client)
        futures = [client.submit(prepare_block, store_url, a, b, pure=False)
                   for a, b in cloudiest_first(blocks, sky_clear)]  # fmt: skip
        for fut in as_completed(futures):
            done = fut.result()
            bar.update(done)
            report.prepared_now += done
            if on_block:
                on_block(report.prepared_now)
    report.low_confidence = int((group["mask_confidence"][:n] < cfg.low_confidence).sum())
    report.reasons = masks.describe_flags(group["mask_flags"][:n])
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


def prepare_arrays(raw: np.ndarray, ambtemp: np.ndarray, times: np.ndarray,
                   cfg: PrepareConfig | None = None) -> tuple[Models, masks.Masks]:  # fmt: skip
    """What ``prepare`` computes, in memory and in one process, for raw images (n, y, x) with their ambient
    temperatures (deg C, NaN unknown) and times: the fitted models and the masks (for notebooks, tests and
    benchmarks; ``prepare`` does the same over a store's shards)."""
    cfg = cfg or PrepareConfig()
    raw = np.asarray(raw)
    ambtemp = np.asarray(ambtemp, np.float64)
    index = spread_index(len(raw), cfg.fit_images)
    geom = geometry.estimate_sky(raw[index], ambtemp[index], cfg.sky)
    search = spread_index(len(raw), cfg.clear.search_images)
    model = clearsky.fit_clear_sky(clearsky.profiles(raw[search], ambtemp[search], geom, cfg.clear), cfg.clear)
    pos, eps, p = masks.flat_frames(model, cfg.clear)
    flat = None
    if pos.size:
        at = search[pos]
        flat = masks.sky_flat(lambda prior: masks.flat_block(raw[at], ambtemp[at], eps, p, geom, model, cfg.clear,
                                                             prior), geom, model, cfg.clear)  # fmt: skip
    eps, p, source = clearsky.choose_eps(times, ambtemp, *masks.fit_block(raw, ambtemp, geom, model, cfg.clear, flat),
                                         model, cfg.clear)  # fmt: skip
    out = masks.make_masks(raw, ambtemp, eps, p, source, geom, model, cfg.mask, cfg.clear, flat)
    models = Models(geom, fit_normalization(raw[index], geom), model, cfg.mask, cfg.clear, cfg.ambient_key, flat)
    return models, out


def _model_summary(models: Models) -> dict[str, Any]:
    m, g = models.clear_sky, models.geometry
    return {"clear frames found": m.n_clear, "scale from": m.scale["source"], "prior only": m.prior_only,
            "eps range": [round(m.eps_lo, 3), round(m.eps_hi, 3)], "outside the circle": g.outside,
            "ambient reference": g.ambient_source, "sky flat frames": models.flat.frames if models.flat else 0,
            "noise after the flat": round(float(np.median(models.flat.sigma)), 4) if models.flat else None}  # fmt: skip


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
    return scoring.confusion_counts(mask, true, truth["sky"][:].astype(bool), kinds, threshold)


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
        total = scoring.add_counts(total, fut.result())
    scores = scoring.scores_from_counts(total)
    if panel:
        _panel(group, truth_url, index, panel)
    return scores


def _panel(group: zarr.Group, truth_url: str, index: np.ndarray, out_png: str | Path) -> Path:
    """Raw / brightness / clear sky / residual / mask / truth for the middle frame of each kind of night."""
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
    ambient = ambient_temps(group, models.ambient_key, np.array(picks))
    eps, p, source = (group[k].get_orthogonal_selection(np.array(picks)) for k in ("clear_eps", "clear_p",
                                                                                     "clear_eps_source"))
    out = masks.make_masks(raw, ambient, eps, p, source, models.geometry, models.clear_sky, models.mask_config,
                           models.clear_config, models.flat)  # fmt: skip
    fr = clearsky.Frame(models.geometry, models.clear_sky, models.clear_config)
    clear = np.zeros(out.brightness.shape, np.float32)
    for k, (e, pk) in enumerate(zip(eps, p)):
        clear[k].ravel()[fr.sky_idx] = fr.clear(float(e), float(pk))
    true = read_images(truth["mask"], index[picks])
    return panels.quality_panel(raw, out.brightness, clear, out.mask, true, models.geometry, titles, out_png)
