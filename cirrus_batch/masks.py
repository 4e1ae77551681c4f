"""Ground-truth cloud masks: the clear-sky residual through an astropy interval + stretch, then a guarded threshold.

Per image (pure numpy; :mod:`cirrus_batch.geometry` gives the pixels, :mod:`cirrus_batch.clearsky` the clear sky):
brightness relative to the ambient black body ``e``, clear-sky brightness for the image's ε0, residual
``z = (e - e_clear) / sigma(θ)`` in noise sigmas, an ``astropy.visualization`` interval + stretch of ``z`` on the
sky pixels, and an Otsu threshold guarded by ``min_sigma``/``max_sigma``. Every mask carries a confidence and the
reasons that lowered it (:data:`MASK_FLAGS`). Where the clear-sky model is contradicted by the image (much of the
sky darker than a clear sky can be), the per-image stretch recipe (ZScale + Asinh + Otsu on the brightness) is
used for that image instead, and recorded as such.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cirrus_batch.clearsky import EPS_SOURCES, ClearSkyConfig, ClearSkyModel, Frame, eps_bound, levels
from cirrus_batch.geometry import SkyGeometry
from cirrus_batch.radiometry import ADU_MAX, NODATA
from cirrus_batch.robust import mad_sigma
from cirrus_batch.skyflat import FlatSums, SkyFlat, accumulate, fit_flat

QUALITY_CONSTANT = 1
"""Bit flag: every pixel of the image has the same value (dead frame)."""
QUALITY_SATURATED = 2
"""Bit flag: more than ``saturated_fraction`` of the sky pixels are at ``ADU_MAX``."""
QUALITY_NODATA = 4
"""Bit flag: some sky pixels are no-data (``NODATA``)."""

MASK_FLAGS = {
    "eps_from_night": 1,  # ε0 held to the night's clear-sky trend (a cloudy frame)
    "eps_from_season": 2,  # no clear frame that night: ε0 held to the season's typical value
    "scale_assumed": 4,  # no signal-free pixel and no ambient temperature: the ADU scale is assumed
    "prior_model": 8,  # no clear frame in the season sample: physical shape only
    "model_contradicted": 16,  # much of the sky below the clear sky: per-image stretch recipe used
    "nodata": 32,  # some sky pixels have no data
    "no_mask": 64,  # constant, saturated or mostly no-data: empty mask
}
"""Bits of ``mask_flags``: why a mask's confidence is below 1."""
FLAG_CONFIDENCE = {1: 0.9, 2: 0.7, 4: 0.7, 8: 0.6, 16: 0.4, 64: 0.0}
"""Confidence factor of each flag (``nodata`` scales by the valid fraction)."""

RESIDUAL_SOFTENING = 4.0
"""``residual = asinh(z / RESIDUAL_SOFTENING) / 2`` of the clear-sky residual ``z`` in noise sigmas."""


def residual_sigmas(residual: np.ndarray) -> np.ndarray:
    """``z`` (noise sigmas) of the stored ``residual`` = asinh(z / RESIDUAL_SOFTENING) / 2."""
    return np.float32(RESIDUAL_SOFTENING) * np.sinh(np.float32(2) * np.asarray(residual, np.float32))


@dataclass
class MaskConfig:
    """Astropy interval/stretch and threshold of the clear-sky residual (``[prepare.mask]``)."""

    interval: str = "zscale"
    """``"zscale"`` (astropy ZScaleInterval) or ``"percentile"`` (PercentileInterval(``percentile``))."""
    percentile: float = 99.5
    """Percentile kept by the ``"percentile"`` interval."""
    stretch: str = "asinh"
    """``"asinh"`` | ``"log"`` | ``"linear"`` | ``"sqrt"`` (astropy stretches)."""
    asinh_a: float = 0.1
    """``a`` of AsinhStretch."""
    log_a: float = 1000.0
    """``a`` of LogStretch."""
    threshold: str | float = "otsu"
    """``"otsu"`` (on the stretched sky pixels, guarded) or a float in stretched units (0..1)."""
    min_sigma: float = 4.5
    """Guard: a pixel is never cloud below this residual, in units of the clear-sky noise."""
    max_sigma: float = 5.5
    """An Otsu threshold above this many sigmas is lowered to it (keeps faint cirrus beside thick clouds)."""
    min_span_sigma: float = 40.0
    """The stretch interval spans at least [vmin, vmin + this] sigmas, so pure noise stays at the bottom."""
    max_clear_sigma: float = 3.0
    """If the mean of Otsu's lower class exceeds this (sigmas), Otsu split a cloud: use ``min_sigma``."""
    contradicted_fraction: float = 0.1
    """If more than this fraction of the sky lies ``min_sigma`` below the clear sky, the model does not describe
    the image: the per-image stretch recipe is used (flag ``model_contradicted``)."""
    saturated_fraction: float = 0.01
    """Fraction of sky pixels at ADU_MAX above which an image is flagged QUALITY_SATURATED."""
    max_nodata_fraction: float = 0.5
    """Images with more no-data sky pixels than this get an empty mask (fewer: those pixels get 0)."""

    def __post_init__(self) -> None:
        if self.interval not in ("zscale", "percentile"):
            raise ValueError(f"interval must be 'zscale' or 'percentile', got {self.interval!r}")
        if self.stretch not in ("asinh", "log", "linear", "sqrt"):
            raise ValueError(f"stretch must be asinh, log, linear or sqrt, got {self.stretch!r}")
        if isinstance(self.threshold, str) and self.threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number in [0, 1], got {self.threshold!r}")
        if not isinstance(self.threshold, str) and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be 'otsu' or a number in [0, 1], got {self.threshold!r}")
        if not 0.0 < self.min_sigma <= self.max_sigma:
            raise ValueError(f"need 0 < min_sigma <= max_sigma, got {self.min_sigma} and {self.max_sigma}")
        for key in ("contradicted_fraction", "saturated_fraction", "max_nodata_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 50.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must be in [50, 100], got {self.percentile}")


def _interval(cfg: MaskConfig) -> Any:
    from astropy.visualization import PercentileInterval, ZScaleInterval

    return ZScaleInterval() if cfg.interval == "zscale" else PercentileInterval(cfg.percentile)


def _stretch(cfg: MaskConfig) -> Any:
    from astropy.visualization import AsinhStretch, LinearStretch, LogStretch, SqrtStretch

    return {"asinh": lambda: AsinhStretch(cfg.asinh_a), "log": lambda: LogStretch(cfg.log_a),
            "linear": LinearStretch, "sqrt": SqrtStretch}[cfg.stretch]()  # fmt: skip


def otsu(values: np.ndarray, nbins: int = 256, vrange: tuple[float, float] = (0.0, 1.0)) -> float:
    """Otsu threshold of ``values`` (maximum between-class variance over a histogram)."""
    hist, edges = np.histogram(values, bins=nbins, range=vrange)
    hist = hist.astype(np.float64)
    centers = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    best = between.max()
    if best <= 0:
        return float(vrange[1])
    ties = np.flatnonzero(between >= best * (1 - 1e-9))  # empty bins between the classes: take the middle
    return float(0.5 * (edges[1 + ties[0]] + edges[1 + ties[-1]]))


def threshold_sigma(z: np.ndarray, cfg: MaskConfig, interval: Any, stretch: Any) -> float:
    """Threshold (in sigmas of the residual) for one image's normalized residual ``z`` (sky pixels)."""
    vmin, vmax = interval.get_limits(z)
    vmin = float(min(vmin, 0.0))
    vmax = float(max(vmax, vmin + cfg.min_span_sigma))
    span = vmax - vmin

    def fwd(v: np.ndarray) -> np.ndarray:
        return stretch(np.clip((np.asarray(v, np.float32) - vmin) / span, 0.0, 1.0), clip=True)

    def inv(s_val: float) -> float:
        return float(stretch.inverse(np.array([s_val], np.float32))[0]) * span + vmin

    if isinstance(cfg.threshold, (int, float)):
        t_s = float(cfg.threshold)
    else:
        s = fwd(z[:: max(1, z.size // 60000)])
        t_s = otsu(s)
        lower = s[s < t_s]
        if lower.size == 0 or inv(float(lower.mean())) > cfg.max_clear_sigma:
            return cfg.min_sigma
    t_sig = inv(min(max(t_s, 0.0), 1.0))
    return float(min(max(t_sig, cfg.min_sigma), cfg.max_sigma))


def stretch_mask(values: np.ndarray) -> np.ndarray:
    """The per-image stretch recipe (no clear-sky model): ZScale + Asinh of ``values`` (1-D), then Otsu."""
    from astropy.visualization import AsinhStretch, ZScaleInterval

    v = np.asarray(values, np.float32)
    lo, hi = ZScaleInterval().get_limits(v)
    s = AsinhStretch()(np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1), clip=True)
    return s > otsu(s)


def confidence(flags: np.ndarray, valid_fraction: np.ndarray) -> np.ndarray:
    """(n,) float32 mask confidence in [0, 1] from ``mask_flags`` and the fraction of valid sky pixels."""
    flags = np.asarray(flags, np.uint8)
    out = np.asarray(valid_fraction, np.float64).copy()
    for bit, factor in FLAG_CONFIDENCE.items():
        out = np.where(flags & bit, np.minimum(out, factor) if bit in (16, 64) else out * factor, out)
    return np.clip(out, 0, 1).astype(np.float32)


def quality_flags(raw: np.ndarray, geom: SkyGeometry, saturated_fraction: float = 0.01) -> np.ndarray:
    """(n,) uint8 bit flags per image: QUALITY_CONSTANT | QUALITY_SATURATED | QUALITY_NODATA; 0 = good."""
    raw = np.asarray(raw)
    raw3 = raw[None] if raw.ndim == 2 else raw
    out = np.zeros(raw3.shape[0], np.uint8)
    sky = geom.sky
    for i, im in enumerate(raw3):
        flat = im.ravel()
        if flat.size and flat.min() == flat.max():
            out[i] |= QUALITY_CONSTANT
        v = im[sky]
        nod = v == NODATA
        if nod.any():
            out[i] |= QUALITY_NODATA
        if v.size and np.mean((v >= ADU_MAX) & ~nod) > saturated_fraction:
            out[i] |= QUALITY_SATURATED
    return out


@dataclass
class Masks:
    """What :func:`make_masks` gives for a block of n images."""

    mask: np.ndarray
    """(n, y, x) uint8: 1 cloud, 0 clear or not sky."""
    residual: np.ndarray
    """(n, y, x) float16 (as stored) ``asinh(z / RESIDUAL_SOFTENING) / 2`` on sky pixels, 0 elsewhere (a network
    input)."""
    brightness: np.ndarray
    """(n, y, x) float16 (as stored) brightness relative to the ambient black body on sky pixels, 0 elsewhere (a
    network input: decks are near 1 whatever the clear sky)."""
    confidence: np.ndarray
    """(n,) float32 in [0, 1]."""
    flags: np.ndarray
    """(n,) uint8 :data:`MASK_FLAGS` bits."""
    quality: np.ndarray
    """(n,) uint8 QUALITY_* bits."""


def flat_block(raw: np.ndarray, temps: np.ndarray, eps: np.ndarray, p: np.ndarray, geom: SkyGeometry,
               model: ClearSkyModel, ccfg: ClearSkyConfig, prior: SkyFlat | None = None) -> FlatSums:  # fmt: skip
    """Sky-flat sums (:mod:`cirrus_batch.skyflat`) of clear raw images (n, y, x) with their clear skies (ε0, p);
    with a ``prior`` flat, pixels more than ``flat_clip`` sigmas above it (cloud) are left out, and frames whose
    residuals scatter more than ``flat_frame_spread`` times its noise (robust width: thin cloud's texture)."""
    raw3 = np.asarray(raw).reshape(-1, *geom.shape)
    fr = Frame(geom, model, ccfg)
    check = Frame(geom, model, ccfg, prior) if prior is not None else None
    a, d = levels(raw3, geom)
    span = model.scaler.span(a, d, np.broadcast_to(np.asarray(temps, np.float64).reshape(-1), a.shape))
    sums = FlatSums.zeros(fr.sky_idx.size)
    for i, im in enumerate(raw3):
        if not (np.isfinite(a[i]) and np.isfinite(span[i])):
            continue
        e, valid = fr.brightness(im, a[i], span[i])
        m = fr.clear(float(eps[i]), float(p[i]))
        if check is not None:
            ef, _ = check.brightness(im, a[i], span[i])
            z = (ef - m) * check.inv_sigma(m)
            zv = z[valid]
            if zv.size and mad_sigma(zv) > ccfg.flat_frame_spread:
                continue
            valid &= z <= ccfg.flat_clip  # clouds only add radiance
        accumulate(e, m, valid, sums)
    return sums


def fit_block(raw: np.ndarray, temps: np.ndarray, geom: SkyGeometry, model: ClearSkyModel, ccfg: ClearSkyConfig,
              flat: SkyFlat | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(ε0, p, fraction of sky above the clear sky, fraction consistent with it) per image of raw (n, y, x): the
    first pass of prepare (see :meth:`cirrus_batch.clearsky.Frame.fit`)."""
    raw3 = np.asarray(raw).reshape(-1, *geom.shape)
    fr = Frame(geom, model, ccfg, flat)
    a, d = levels(raw3, geom)
    span = model.scaler.span(a, d, temps)
    cap = eps_bound(temps, model.scale["source"], ccfg)
    out = np.full((4, raw3.shape[0]), np.nan)
    for i, im in enumerate(raw3):
        if not np.isfinite(a[i]) or im.min() == im.max():
            continue
        e, valid = fr.brightness(im, a[i], span[i])
        if valid.mean() < 0.5:
            continue
        out[:, i] = fr.fit(e, valid, cap[i])
    return out[0], out[1], out[2], out[3]


def make_masks(raw: np.ndarray, temps: np.ndarray, eps: np.ndarray, p: np.ndarray, eps_source: np.ndarray,
               geom: SkyGeometry, model: ClearSkyModel, cfg: MaskConfig, ccfg: ClearSkyConfig,
               flat: SkyFlat | None = None) -> Masks:  # fmt: skip
    """Masks, network inputs, confidence and flags of raw images (n, y, x) given each image's clear sky (ε0, p)
    and its source (:func:`cirrus_batch.clearsky.choose_eps`), flattened by the sky ``flat`` if there is one."""
    raw3 = np.asarray(raw).reshape(-1, *geom.shape)
    n = raw3.shape[0]
    fr = Frame(geom, model, ccfg, flat)
    a, d = levels(raw3, geom)
    span = model.scaler.span(a, d, np.broadcast_to(np.asarray(temps, np.float64).reshape(-1), (n,)))
    quality = quality_flags(raw3, geom, cfg.saturated_fraction)
    interval, stretch = _interval(cfg), _stretch(cfg)
    out = Masks(np.zeros(raw3.shape, np.uint8), np.zeros(raw3.shape, np.float16), np.zeros(raw3.shape, np.float16),
                np.zeros(n, np.float32), np.zeros(n, np.uint8), quality)  # fmt: skip
    base = 0
    if model.scale.get("source") == "assumed":
        base |= MASK_FLAGS["scale_assumed"]
    if model.prior_only:
        base |= MASK_FLAGS["prior_model"]
    valid_frac = np.ones(n)
    for i, im in enumerate(raw3):
        flags = base
        src = int(eps_source[i])
        flags |= MASK_FLAGS["eps_from_night"] if src == EPS_SOURCES["night"] else 0
        flags |= MASK_FLAGS["eps_from_season"] if src == EPS_SOURCES["season"] else 0
        if quality[i] & (QUALITY_CONSTANT | QUALITY_SATURATED) or not np.isfinite(a[i]):
            out.flags[i] = flags | MASK_FLAGS["no_mask"]
            continue
        e, valid = fr.brightness(im, a[i], span[i])
        valid_frac[i] = float(valid.mean())
        if not valid.all():
            flags |= MASK_FLAGS["nodata"]
        if valid_frac[i] < 1 - cfg.max_nodata_fraction:
            out.flags[i] = flags | MASK_FLAGS["no_mask"]
            continue
        clear = fr.clear(float(eps[i]), float(p[i]))
        z = (e - clear) * fr.inv_sigma(clear)
        zv = z[valid]
        if float(np.mean(zv < -cfg.min_sigma)) > cfg.contradicted_fraction:
            flags |= MASK_FLAGS["model_contradicted"]
            cloud = np.zeros(z.shape, bool)
            cloud[valid] = stretch_mask(e[valid])
        else:
            cloud = (z > threshold_sigma(zv, cfg, interval, stretch)) & valid
            inner = fr.zen < 60
            if (cloud & inner).sum() >= 0.8 * (valid & inner).sum() > 0:  # a deck: extend it to the horizon
                far = ~inner & ~cloud & (z > -cfg.min_sigma) & valid
                if far.any():
                    cloud |= _nearest_decided(cloud, far | ~valid, geom.sky) & far
        out.mask[i].ravel()[fr.sky_idx] = cloud
        res = np.arcsinh(z / np.float32(RESIDUAL_SOFTENING)) / np.float32(2)
        out.residual[i].ravel()[fr.sky_idx] = np.where(valid, res, 0)
        out.brightness[i].ravel()[fr.sky_idx] = np.where(valid, np.clip(e, -0.5, 1.5), 0)
        out.flags[i] = flags
    out.confidence = confidence(out.flags, valid_frac)
    return out


def _nearest_decided(cloud: np.ndarray, undecided: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """``cloud`` (on the ``sky`` pixels, row-major) with each undecided pixel given the class of the nearest
    decided sky pixel (computed on the sky's bounding box: every decided pixel lies in it)."""
    from scipy import ndimage

    rows, cols = np.flatnonzero(sky.any(axis=1)), np.flatnonzero(sky.any(axis=0))
    box = sky[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    box_idx = np.flatnonzero(box)  # the sky pixels in the same order as in the whole image
    decided = np.zeros(box.shape, bool)
    decided.ravel()[box_idx[~undecided]] = True
    values = np.zeros(box.size, bool)
    values[box_idx] = cloud
    iy, ix = ndimage.distance_transform_edt(~decided, return_distances=False, return_indices=True)
    at = box_idx[undecided]
    out = cloud.copy()
    out[undecided] = values[iy.ravel()[at] * box.shape[1] + ix.ravel()[at]]
    return out


def cloud_fraction(mask: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """(n,) float32 fraction of sky pixels marked cloud (mask (n, y, x) or (y, x))."""
    m = np.asarray(mask)
    m3 = m[None] if m.ndim == 2 else m
    sky = np.asarray(sky, bool)
    n = max(int(sky.sum()), 1)
    return (m3[:, sky].astype(bool).sum(axis=1) / n).astype(np.float32)


def describe_flags(flags: np.ndarray) -> dict[str, int]:
    """Number of images carrying each :data:`MASK_FLAGS` reason."""
    flags = np.asarray(flags, np.uint8)
    return {name: int(((flags & bit) > 0).sum()) for name, bit in MASK_FLAGS.items()}


def sky_flat(sums_of: Callable[[SkyFlat | None], FlatSums], geom: SkyGeometry, model: ClearSkyModel,
             ccfg: ClearSkyConfig) -> SkyFlat:  # fmt: skip
    """The sky flat in two passes of ``sums_of(prior)`` (the sums of :func:`flat_block` over the clear frames, in
    one process or as a map)."""
    fr = Frame(geom, model, ccfg)
    flat = None
    for _ in range(2):
        flat = fit_flat(sums_of(flat), geom, fr.bins, fr.nb, ccfg.flat_sigma_floor)
    return flat


def flat_frames(model: ClearSkyModel, ccfg: ClearSkyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clear frames that measure the sky flat, as (positions in the model's profile sample, their ε0, their p):
    up to ``flat_images`` of the model's clear frames, spread over them; none when there is no flat
    (``flat_images`` 0, fewer than ``min_clear`` clear frames, or clear skies spanning less than ``flat_min_span``
    of ε0)."""
    n = len(model.clear_frames)
    if ccfg.flat_images == 0 or model.prior_only or n < ccfg.min_clear or np.ptp(model.clear_eps) < ccfg.flat_min_span:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    pick = np.unique(np.linspace(0, n - 1, min(n, ccfg.flat_images)).round().astype(np.int64))
    return np.asarray(model.clear_frames)[pick], np.asarray(model.clear_eps)[pick], np.asarray(model.clear_p)[pick]
