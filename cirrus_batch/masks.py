"""Ground-truth cloud masks from raw LWIR all-sky images: sky geometry, clear-sky model, astropy stretch.

Pure array functions (numpy in, numpy out); the only I/O is :func:`quality_panel` (a PNG) and reading an
optional horizon CSV in :func:`estimate_sky`. The method is described in ``docs/masks.md``:

1. :func:`estimate_sky` finds the fisheye circle (dark corners vs lit disc) and the obstacles (pixels whose
   brightness, relative to the horizon ring, never changes the way the sky does) -> :class:`SkyGeometry`.
2. :func:`fit_clear_sky` finds the clearest images of a sample and learns a low-dimensional family of
   clear-sky profiles in zenith angle (mean profile + principal components, scaled by the band radiance of
   the ambient temperature when known) -> :class:`ClearSkyModel`.
3. :func:`cloud_masks` fits each image's clear sky robustly (one-sided clipping: clouds only add brightness),
   divides the residual by the clear-sky noise, applies an ``astropy.visualization`` interval + stretch, then
   an Otsu threshold guarded by a minimum significance -> uint8 masks.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

NODATA = 65535
"""``raw`` value of no-data pixels (same as :data:`cirrus_batch.fitsio.NODATA`)."""
ADU_MAX = 16383
"""Saturation level of the 14-bit sensor."""

QUALITY_CONSTANT = 1
"""Bit flag: every pixel of the image has the same value (dead frame)."""
QUALITY_SATURATED = 2
"""Bit flag: more than ``saturated_fraction`` of the sky pixels are at ``ADU_MAX``."""
QUALITY_NODATA = 4
"""Bit flag: some sky pixels are no-data (``NODATA``)."""

T0 = 273.15


# ---------------------------------------------------------------- configuration


@dataclass
class SkyConfig:
    """Valid-sky geometry: given here, or estimated from a sample of the archive (``[prepare.sky]``)."""

    center: list[float] | None = None
    """[cy, cx] of the fisheye circle (px); None = estimate from the dark corners."""
    radius: float | None = None
    """Radius (px) of the 90° zenith-angle circle; None = estimate (edge of the lit disc)."""
    horizon_file: str | None = None
    """CSV ``azimuth_deg,elevation_deg`` horizon profile (header line optional); None = estimate the
    obstacles from the archive."""
    north_deg: float = 0.0
    """Azimuth (deg) of the image's "up" direction; azimuth grows towards +x (image right)."""
    dark_margin_px: float = 4.0
    """Pixels farther than radius + this from the centre are "dark" (sensor offset, used per image)."""
    obstacle_spread: float = 0.03
    """A pixel whose brightness relative to the horizon ring varies over the sample (10-90 % range) by less
    than this fraction, or by less than ``obstacle_noise`` times its noise, is an obstacle."""
    obstacle_noise: float = 8.0
    """See ``obstacle_spread``: spread threshold in units of the pixel's expected noise spread."""
    min_region_px: int = 30
    """Sky islands smaller than this (px) inside obstacles are dropped."""
    min_obstacle_px: int = 3
    """Obstacle islands smaller than this (px) inside the sky are taken for noise and dropped."""
    hot_sigma: float = 10.0
    """Pixels whose median over the sample departs from their 3x3 neighbourhood by more than this many robust
    sigmas are hot/dead and excluded from the sky."""
    max_zenith_deg: float = 90.0
    """Sky pixels must have a zenith angle below this (deg)."""


@dataclass
class MaskConfig:
    """Clear-sky model, astropy interval/stretch and threshold (``[prepare.mask]``)."""

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
    min_sigma: float = 5.0
    """Guard: a pixel is never cloud below this residual, in units of the clear-sky noise."""
    max_sigma: float = 6.0
    """An Otsu threshold above this many sigmas is lowered to it (keeps faint cirrus beside thick clouds)."""
    min_span_sigma: float = 40.0
    """The stretch interval spans at least [vmin, vmin + this] sigmas, so pure noise stays at the bottom."""
    max_clear_sigma: float = 3.0
    """If the mean of Otsu's lower class exceeds this (sigmas), Otsu split a cloud: use ``min_sigma``."""
    n_components: int = 3
    """Clear-sky basis profiles: the mean clear profile + (n_components - 1) principal components."""
    bin_deg: float = 1.0
    """Zenith-angle bin width (deg) of the clear-sky profiles."""
    smooth_bins: float = 1.0
    """Gaussian smoothing (bins) of the basis profiles."""
    use_temperature: bool = True
    """Scale the clear sky by the band radiance of the ambient temperature when the sample has it."""
    temp_exponent: float = 4.5
    """Band radiance ~ ((T + 273.15) / 273.15) ** temp_exponent (8-14 µm near 0 °C)."""
    clear_spread_factor: float = 1.5
    """First guess of clear images: within-bin spread <= this x the 5th percentile of the sample."""
    clear_max_cloud: float = 0.002
    """Refined clear images: at most this fraction of sky pixels above ``min_sigma``."""
    coef_margin: float = 0.5
    """Per-image coefficients are bounded to the clear images' range widened by this fraction of it."""
    fit_stride: int = 4
    """Per-image fit uses every fit_stride-th sky pixel."""
    fit_iter: int = 6
    """Iterations of the one-sided (clouds only add brightness) robust fit."""
    clip_sigma: float = 3.0
    """Pixels above the fit by more than this many sigmas are dropped from the next iteration."""
    saturated_fraction: float = 0.01
    """Fraction of sky pixels at ADU_MAX above which an image is flagged QUALITY_SATURATED."""
    max_nodata_fraction: float = 0.5
    """Images with more no-data sky pixels than this get an empty mask (fewer: those pixels get 0)."""


# ---------------------------------------------------------------- geometry


@dataclass
class SkyGeometry:
    """Fisheye geometry: circle, zenith angle per pixel (equidistant), valid-sky pixels."""

    center: tuple[float, float]
    radius: float
    zenith: np.ndarray
    """(y, x) float32 zenith angle (deg) = 90 r / radius; > 90 outside the circle."""
    sky: np.ndarray
    """(y, x) bool valid sky (inside the circle, not obstacles, not hot pixels)."""
    north_deg: float = 0.0
    dark_margin_px: float = 4.0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.sky.shape[0]), int(self.sky.shape[1]))

    @property
    def dark(self) -> np.ndarray:
        """(y, x) bool pixels outside the lit circle (sensor offset only)."""
        return self.zenith > 90.0 * (self.radius + self.dark_margin_px) / self.radius

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able description (the ``sky`` array itself is stored separately)."""
        return {
            "center": [float(self.center[0]), float(self.center[1])],
            "radius": float(self.radius),
            "north_deg": float(self.north_deg),
            "dark_margin_px": float(self.dark_margin_px),
            "projection": "equidistant",
            "n_sky": int(self.sky.sum()),
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], shape: tuple[int, int], sky: np.ndarray) -> SkyGeometry:
        """Rebuild from :meth:`to_attrs` output, the image shape and the stored sky mask."""
        center = (float(attrs["center"][0]), float(attrs["center"][1]))
        radius = float(attrs["radius"])
        return cls(
            center=center, radius=radius, zenith=zenith_map(shape, center, radius), sky=np.asarray(sky, bool),
            north_deg=float(attrs.get("north_deg", 0.0)),
            dark_margin_px=float(attrs.get("dark_margin_px", 4.0)),
        )  # fmt: skip


def zenith_map(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    """(y, x) float32 zenith angle (deg) of an equidistant fisheye: 90 r / radius."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return (90.0 * np.hypot(yy - center[0], xx - center[1]) / radius).astype(np.float32)


def azimuth_map(shape: tuple[int, int], center: tuple[float, float], north_deg: float = 0.0) -> np.ndarray:
    """(y, x) float32 azimuth (deg, 0..360): ``north_deg`` at image up, growing towards image right."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return ((np.degrees(np.arctan2(xx - center[1], -(yy - center[0]))) + north_deg) % 360).astype(np.float32)


def _usable(sample: np.ndarray) -> np.ndarray:
    """Images of a sample without no-data pixels and not constant."""
    flat = sample.reshape(sample.shape[0], -1)
    return ~(flat == NODATA).any(axis=1) & (flat.min(axis=1) != flat.max(axis=1))


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _estimate_circle(med: np.ndarray) -> tuple[tuple[float, float], float, float]:
    """(center, radius, dark level) of the lit disc of a median image."""
    ny, nx = med.shape
    c = max(2, min(ny, nx) // 20)
    corners = np.concatenate([med[:c, :c].ravel(), med[:c, -c:].ravel(), med[-c:, :c].ravel(),
                              med[-c:, -c:].ravel()])  # fmt: skip
    dark = float(np.median(corners))
    bright = float(np.percentile(med, 75))
    if bright <= dark:
        raise ValueError("cannot find the fisheye circle: the image is not brighter than its corners")
    yy, xx = np.mgrid[0:ny, 0:nx]
    thr = dark + 0.3 * (bright - dark)
    for _ in range(2):
        lit = ndimage.binary_fill_holes(_largest(ndimage.binary_opening(med > thr, iterations=2)))
        area = float(lit.sum())
        cy, cx = float(yy[lit].mean()), float(xx[lit].mean())
        radius = float(np.sqrt(area / np.pi))
        r = np.hypot(yy - cy, xx - cx)
        rim = float(np.median(med[(r > radius - 5) & (r < radius - 2)]))
        thr = dark + 0.5 * (rim - dark)  # half-maximum of the vignetted rim
    return (cy, cx), radius, dark


def _horizon_sky(
    cfg: SkyConfig, shape: tuple[int, int], center: tuple[float, float], zen: np.ndarray
) -> np.ndarray:
    rows = []
    with open(cfg.horizon_file) as fh:  # type: ignore[arg-type]
        for row in csv.reader(fh):
            try:
                rows.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                continue
    if not rows:
        raise ValueError(f"horizon file {cfg.horizon_file} has no 'azimuth_deg,elevation_deg' rows")
    prof = np.array(sorted(rows))
    az = azimuth_map(shape, center, cfg.north_deg)
    elev = np.interp(az, prof[:, 0], prof[:, 1], period=360.0)
    return (90.0 - zen) > elev


def estimate_sky(sample: np.ndarray, cfg: SkyConfig | None = None) -> SkyGeometry:
    """Sky geometry from config and/or a sample of raw images.

    ``sample``: (n, y, x) raw uint16 images spread over the archive (several nights and conditions; 50-200
    images). Images with no-data pixels or a constant value are ignored. Method:

    * circle (unless ``cfg.center``/``cfg.radius``): the per-pixel median image is thresholded at half the
      height between the dark corners and the vignetted rim; centre = centroid, radius = sqrt(area / pi)
      of the largest lit component. The edge of the lit disc is taken as the 90° circle.
    * obstacles (unless ``cfg.horizon_file``): each image is dark-subtracted and divided by the median of its
      horizon ring (zenith 87-90°, ~ blackbody at ambient temperature). Sky pixels change with humidity and
      clouds, obstacles do not: a pixel whose 10-90 % range over the sample is below ``obstacle_spread`` (or
      ``obstacle_noise`` times its noise) is an obstacle. Obstacle specks under ``min_obstacle_px`` and
      sky islands under ``min_region_px`` are dropped; only the largest sky component is kept.
    * hot pixels: median image departing from its 3x3 median by > ``hot_sigma`` robust sigmas.
    """
    cfg = cfg or SkyConfig()
    sample = np.asarray(sample)
    if sample.ndim == 2:
        sample = sample[None]
    shape = (int(sample.shape[1]), int(sample.shape[2]))
    good = sample[_usable(sample)] if sample.shape[0] else sample
    if good.shape[0] == 0:
        good = np.where(sample == NODATA, 0, sample)
    med = np.median(good, axis=0).astype(np.float32)
    if cfg.center is None or cfg.radius is None:
        center, radius, _ = _estimate_circle(med)
    if cfg.center is not None:
        center = (float(cfg.center[0]), float(cfg.center[1]))
    if cfg.radius is not None:
        radius = float(cfg.radius)
    zen = zenith_map(shape, center, radius)
    inside = zen < min(cfg.max_zenith_deg, 90.0)
    dark = zen > 90.0 * (radius + cfg.dark_margin_px) / radius

    # hot / dead pixels
    resid = med - ndimage.median_filter(med, size=3)
    mad = 1.4826 * float(np.median(np.abs(resid[inside]))) + 1e-3
    hot = np.abs(resid) > cfg.hot_sigma * mad

    if cfg.horizon_file is not None:
        sky = inside & _horizon_sky(cfg, shape, center, zen)
    elif good.shape[0] < 3:
        sky = inside.copy()
    else:
        ring = inside & (zen > 87.0)
        sub = good[:, inside].astype(np.float32)
        darkv = np.zeros(len(good), np.float32)
        if dark.any():
            darkv = np.median(good[:, dark], axis=1).astype(np.float32)
        ringv = np.median(good[:, ring], axis=1).astype(np.float32) - darkv
        norm = (sub - darkv[:, None]) / np.maximum(ringv, 1.0)[:, None]
        q10, q90 = np.percentile(norm, [10, 90], axis=0)
        spread = q90 - q10
        # expected noise spread: temporal pixel noise from successive-difference MAD of dark pixels
        if dark.any():
            dsub = good[:, dark][:, ::7].astype(np.float32)
            noise = 1.4826 * float(np.median(np.abs(np.diff(dsub, axis=0)))) / np.sqrt(2)
        else:
            noise = 0.0
        noise_spread = 2.56 * noise / float(np.median(np.maximum(ringv, 1.0)))
        static = spread < max(cfg.obstacle_spread, cfg.obstacle_noise * noise_spread)
        obst = np.zeros(shape, bool)
        obst[inside] = static
        sky = inside & ~obst
        obst = _drop_small(obst, cfg.min_obstacle_px)  # isolated noisy pixels are not obstacles
        sky = _drop_small(inside & ~obst, cfg.min_region_px)  # nor are small sky islands sky
    # keep the sky component around the zenith
    sky = _largest(sky) & ~hot
    return SkyGeometry(
        center=center, radius=radius, zenith=zen, sky=sky, north_deg=cfg.north_deg,
        dark_margin_px=cfg.dark_margin_px,
    )


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1:
        return mask
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    keep = np.concatenate([[False], sizes >= min_px])
    return keep[lab]


# ---------------------------------------------------------------- normalization


@dataclass
class Normalization:
    """raw ADU -> float32 network input: ``clip((raw - offset) / scale, lo, hi)``; NODATA -> ``fill``."""

    method: str
    params: dict[str, float]

    def to_attrs(self) -> dict[str, Any]:
        return {"method": self.method, "params": {k: float(v) for k, v in self.params.items()}}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Normalization:
        return cls(method=str(attrs["method"]), params={k: float(v) for k, v in attrs["params"].items()})


def fit_normalization(sample: np.ndarray, geom: SkyGeometry) -> Normalization:
    """Affine normalization from a sample: offset = median dark level, scale = 99.5th sky percentile - offset.

    The clear zenith then sits near 0.2-0.4 and warm clouds/obstacles near 0.8-1; values are clipped to
    [-0.5, 2] and no-data pixels become ``fill`` = 0 (the dark level).
    """
    sample = np.asarray(sample)
    if sample.ndim == 2:
        sample = sample[None]
    good = sample[_usable(sample)]
    if good.shape[0] == 0:
        raise ValueError("fit_normalization: no usable image in the sample")
    step = max(1, int(good[:, geom.sky].shape[1] // 20000))
    skyv = good[:, geom.sky][:, ::step].astype(np.float32)
    dark = geom.dark
    offset = float(np.median(good[:, dark])) if dark.any() else float(np.percentile(skyv, 0.5))
    hi = float(np.percentile(skyv, 99.5))
    scale = max(hi - offset, 1.0)
    return Normalization("affine", {"offset": offset, "scale": scale, "lo": -0.5, "hi": 2.0, "fill": 0.0})


def normalize(raw: np.ndarray, norm: Normalization) -> np.ndarray:
    """float32 ``clip((raw - offset) / scale, lo, hi)``, NODATA pixels -> ``fill`` (any shape)."""
    if norm.method != "affine":
        raise ValueError(f"unknown normalization method {norm.method!r}")
    p = norm.params
    raw = np.asarray(raw)
    out = (raw.astype(np.float32) - np.float32(p["offset"])) * np.float32(1.0 / p["scale"])
    np.clip(out, p["lo"], p["hi"], out=out)
    out[raw == NODATA] = p["fill"]
    return out


# ---------------------------------------------------------------- clear-sky model


@dataclass
class ClearSkyModel:
    """Clear-sky ADU = dark(image) + L(T) * sum_k c_k B_k(zenith); per-image c within [coef_lo, coef_hi].

    ``L(T) = ((T + 273.15) / 273.15) ** temp_exponent`` when ``use_temperature`` (else 1). ``B_k`` are
    profiles on the zenith grid ``theta`` (deg, bin centres): the mean clear profile and principal
    components of the clear profiles. ``sigma`` is the clear-sky noise (ADU) per bin.
    """

    theta: list[float]
    basis: list[list[float]]
    coef_lo: list[float]
    coef_hi: list[float]
    coef_typical: list[float]
    sigma: list[float]
    use_temperature: bool
    temp_exponent: float
    t_ref: float
    offset: float
    """Median dark level of the sample (ADU), used by :func:`clear_sky` without an image."""
    n_clear: int
    clear_index: list[int] = field(default_factory=list)
    """Indices (in the sample) of the images the model was fitted on."""

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> ClearSkyModel:
        return cls(**{k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs})

    def radiance(self, ambtemp: float | np.ndarray) -> np.ndarray:
        """L(T) per image (t_ref where T is NaN; 1 without temperature term)."""
        t = np.atleast_1d(np.asarray(ambtemp, dtype=np.float64))
        if not self.use_temperature:
            return np.ones(t.shape)
        t = np.where(np.isfinite(t), t, self.t_ref)
        return ((t + T0) / T0) ** self.temp_exponent


class _Frame:
    """Per-geometry precomputation shared by the per-image fits: sky pixels, basis and sigma images."""

    def __init__(self, geom: SkyGeometry, model: ClearSkyModel, stride: int):
        self.sky_idx = np.flatnonzero(geom.sky)
        zen = geom.zenith.ravel()[self.sky_idx]
        th = np.asarray(model.theta)
        self.basis = np.stack([np.interp(zen, th, b) for b in model.basis]).astype(np.float32)  # (K, P)
        self.sigma = np.interp(zen, th, model.sigma).astype(np.float32)
        self.inv_sigma = (1.0 / self.sigma).astype(np.float32)
        self.sub = np.arange(0, self.sky_idx.size, max(1, stride))
        self.basis_sub = np.ascontiguousarray(self.basis[:, self.sub].T.astype(np.float64))  # (S, K)
        self.isig_sub = self.inv_sigma[self.sub].astype(np.float64)
        dark = np.flatnonzero(geom.dark)
        self.dark_idx = dark[:: max(1, dark.size // 20000)] if dark.size else dark
        self.lo = np.asarray(model.coef_lo, np.float64)
        self.hi = np.asarray(model.coef_hi, np.float64)

    def dark_level(self, flat: np.ndarray, default: float) -> float:
        if self.dark_idx.size == 0:
            return default
        d = flat[self.dark_idx]
        d = d[d != NODATA]
        return float(np.median(d)) if d.size else default

    def fit(
        self, y_sub: np.ndarray, lrad: float, cfg: MaskConfig, valid: np.ndarray | None = None
    ) -> np.ndarray:
        """Coefficients of the clear sky under dark-subtracted sky pixels ``y_sub`` (one-sided robust fit)."""
        x = self.basis_sub * lrad
        w = self.isig_sub
        keep = np.ones(y_sub.size, bool) if valid is None else valid.copy()
        c = 0.5 * (self.lo + self.hi)
        for it in range(cfg.fit_iter):
            if keep.sum() < x.shape[1] * 4:
                break
            c = _bounded_lsq(x[keep] * w[keep, None], y_sub[keep] * w[keep], self.lo, self.hi)
            r = (y_sub - x @ c) * w
            new = (r < 0) if it == 0 else (r < cfg.clip_sigma)
            if valid is not None:
                new &= valid
            if np.array_equal(new, keep):
                break
            keep = new
        return c


def _bounded_lsq(a: np.ndarray, b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min ||a c - b|| with lo <= c <= hi, via the small normal-equation system."""
    ata = a.T @ a
    atb = a.T @ b
    try:
        c = np.linalg.solve(ata, atb)
    except np.linalg.LinAlgError:
        c = np.linalg.lstsq(ata, atb, rcond=None)[0]
    if np.all(c >= lo) and np.all(c <= hi):
        return c
    from scipy.optimize import lsq_linear

    r = np.linalg.cholesky(ata + 1e-12 * np.trace(ata) * np.eye(len(lo)))
    z = np.linalg.solve(r, atb)  # r z = atb -> ||r.T c - z||^2 = c'Ac - 2c'b + const
    return lsq_linear(r.T, z, bounds=(lo, hi), method="bvls").x


def _profiles(
    images: np.ndarray, darks: np.ndarray, lrad: np.ndarray, idx: np.ndarray, bins: np.ndarray, nb: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per-image, per-bin (q25, median, q75) of (raw - dark) / L over pixels ``idx`` -> 3 x (n, nb)."""
    order = np.argsort(bins, kind="stable")
    sb = bins[order]
    counts = np.bincount(sb, minlength=nb)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pix = idx[order]
    out = np.full((3, images.shape[0], nb), np.nan)
    ok = counts > 0
    for i, img in enumerate(images):
        v = (img.ravel()[pix].astype(np.float64) - darks[i]) / lrad[i]
        v = np.sort(v + sb * 1e6) - sb * 1e6
        for j, q in enumerate((0.25, 0.5, 0.75)):
            pos = starts + np.floor(q * (counts - 1)).astype(int)
            out[j, i, ok] = v[pos[ok]]
    return out[0], out[1], out[2]


def fit_clear_sky(
    sample: np.ndarray, ambtemp: np.ndarray, geom: SkyGeometry, cfg: MaskConfig | None = None
) -> ClearSkyModel:
    """Learn the clear-sky model from a sample of raw images (n, y, x) and their ambient temperatures (n,).

    ``ambtemp`` may be all NaN (no temperature term). The clearest images are found by the sample itself:
    first those with the smallest within-zenith-bin spread, then (twice) those whose robust per-image fit
    leaves fewer than ``clear_max_cloud`` of the pixels above ``min_sigma``. Their per-bin median profiles,
    dark-subtracted and divided by L(T), give the basis (mean + principal components), the coefficient bounds
    and the noise per bin. The sample must hold some clear images (≥ 5, ideally from several nights).
    """
    cfg = cfg or MaskConfig()
    sample = np.asarray(sample)
    ambtemp = np.asarray(ambtemp, dtype=np.float64).reshape(-1)
    if sample.ndim != 3 or ambtemp.size != sample.shape[0]:
        raise ValueError("fit_clear_sky: sample must be (n, y, x) and ambtemp (n,)")
    flags = quality_flags(sample, geom, cfg.saturated_fraction)
    use = np.flatnonzero(flags == 0)
    if use.size < 3:
        raise ValueError("fit_clear_sky: fewer than 3 good images in the sample")
    use_t = bool(cfg.use_temperature and np.all(np.isfinite(ambtemp[use])))
    t_ref = float(np.nanmedian(ambtemp[use])) if np.isfinite(ambtemp[use]).any() else 0.0
    imgs = sample[use]
    temps = ambtemp[use]
    lrad = ((temps + T0) / T0) ** cfg.temp_exponent if use_t else np.ones(use.size)

    sky_idx = np.flatnonzero(geom.sky)
    zen = geom.zenith.ravel()[sky_idx]
    nb = int(np.ceil(90.0 / cfg.bin_deg))
    bins = np.minimum((zen / cfg.bin_deg).astype(int), nb - 1)
    counts = np.bincount(bins, minlength=nb)
    dark = np.flatnonzero(geom.dark)
    darkv = np.array([float(np.median(im.ravel()[dark])) if dark.size else 0.0 for im in imgs])
    q25, q50, q75 = _profiles(imgs, darkv, lrad, sky_idx, bins, nb)
    okb = counts >= 3
    theta = (np.arange(nb) + 0.5) * cfg.bin_deg
    spread = np.nanmedian((q75 - q25)[:, okb] * lrad[:, None], axis=1)
    clear = spread <= cfg.clear_spread_factor * np.percentile(spread, 5)
    if clear.sum() < 3:
        clear = spread <= np.sort(spread)[min(2, spread.size - 1)]

    model = None
    for _ in range(3):
        prof = q50[clear][:, okb]
        mean = prof.mean(axis=0)
        k = max(1, min(cfg.n_components, int(clear.sum())))
        basis = [mean]
        if k > 1:
            _, _, vt = np.linalg.svd(prof - mean, full_matrices=False)
            basis += list(vt[: k - 1] * float(np.abs(mean).max()))
        basis_b = np.stack(basis)
        if cfg.smooth_bins > 0:
            basis_b = ndimage.gaussian_filter1d(basis_b, cfg.smooth_bins, axis=1, mode="nearest")
        coefs = np.linalg.lstsq(basis_b.T, prof.T, rcond=None)[0].T  # (n_clear, k)
        lo, hi = coefs.min(axis=0), coefs.max(axis=0)
        span = np.maximum(hi - lo, 0.02 * np.abs(coefs).max(axis=0) + 1e-6)
        lo, hi = lo - cfg.coef_margin * span, hi + cfg.coef_margin * span
        # noise per bin: robust spread of the clear images around their own profile
        sig = np.nanmedian(((q75 - q25) * lrad[:, None])[clear][:, okb], axis=0) / 1.349
        sig = ndimage.gaussian_filter1d(sig, 2.0, mode="nearest")
        full_basis = [np.interp(theta, theta[okb], b).tolist() for b in basis_b]
        model = ClearSkyModel(
            theta=theta.tolist(), basis=full_basis, coef_lo=lo.tolist(), coef_hi=hi.tolist(),
            coef_typical=np.median(coefs, axis=0).tolist(),
            sigma=np.interp(theta, theta[okb], np.maximum(sig, 1.0)).tolist(),
            use_temperature=use_t, temp_exponent=float(cfg.temp_exponent), t_ref=t_ref,
            offset=float(np.median(darkv)), n_clear=int(clear.sum()), clear_index=use[clear].tolist(),
        )  # fmt: skip
        # refine: which images are clear under this model?
        fr = _Frame(geom, model, cfg.fit_stride)
        cloud_frac = np.empty(use.size)
        for i, im in enumerate(imgs):
            flat = im.ravel()
            y = flat[fr.sky_idx[fr.sub]].astype(np.float64) - darkv[i]
            c = fr.fit(y, float(lrad[i]), cfg)
            r = (y - (fr.basis_sub * lrad[i]) @ c) * fr.isig_sub
            cloud_frac[i] = float(np.mean(r > cfg.min_sigma))
        new = cloud_frac <= cfg.clear_max_cloud
        if new.sum() < 3 or np.array_equal(new, clear):
            break
        clear = new
    assert model is not None
    return model


def clear_sky(
    model: ClearSkyModel, geom: SkyGeometry, ambtemp: float | np.ndarray, raw: np.ndarray | None = None,
    cfg: MaskConfig | None = None,
) -> np.ndarray:  # fmt: skip
    """Clear-sky ADU image(s): (y, x) for a scalar ``ambtemp``, (n, y, x) for an array.

    Without ``raw``: the typical clear sky (median coefficients, sample dark level) at that temperature.
    With ``raw`` ((y, x) or (n, y, x)): each image's own robust fit, as used by :func:`cloud_masks`.
    Pixels outside the sky hold the dark level.
    """
    cfg = cfg or MaskConfig()
    scalar = np.ndim(ambtemp) == 0
    temps = np.atleast_1d(np.asarray(ambtemp, dtype=np.float64))
    shape = geom.shape
    fr = _Frame(geom, model, cfg.fit_stride)
    if raw is not None:
        raw = np.asarray(raw)
        single = raw.ndim == 2
        raw3 = raw[None] if single else raw
        if temps.size == 1 and raw3.shape[0] > 1:
            temps = np.repeat(temps, raw3.shape[0])
        out = np.empty(raw3.shape, np.float32)
        for i, im in enumerate(raw3):
            _, clear_flat, dark = _fit_image(im, float(temps[i]), fr, model, cfg)
            out[i] = dark
            out[i].ravel()[fr.sky_idx] = clear_flat + dark
        return out[0] if single else out
    lr = model.radiance(temps)
    typ = np.asarray(model.coef_typical)
    out = np.full((temps.size, *shape), model.offset, np.float32)
    prof = typ @ fr.basis
    for i in range(temps.size):
        out[i].ravel()[fr.sky_idx] = model.offset + lr[i] * prof
    return out[0] if scalar else out


def _fit_image(
    im: np.ndarray, temp: float, fr: _Frame, model: ClearSkyModel, cfg: MaskConfig
) -> tuple[np.ndarray, np.ndarray, float]:
    """(sky values - dark, clear sky - dark on sky pixels, dark level) of one image."""
    flat = im.ravel()
    dark = fr.dark_level(flat, model.offset)
    vals = flat[fr.sky_idx]
    valid = vals != NODATA
    y = vals.astype(np.float32) - np.float32(dark)
    lrad = float(model.radiance(temp)[0])
    ysub = y[fr.sub].astype(np.float64)
    vsub = valid[fr.sub]
    c = fr.fit(ysub, lrad, cfg, None if vsub.all() else vsub)
    clear = (np.float32(lrad) * (c.astype(np.float32) @ fr.basis)).astype(np.float32)
    return y, clear, dark


# ---------------------------------------------------------------- masks


def _interval(cfg: MaskConfig) -> Any:
    from astropy.visualization import PercentileInterval, ZScaleInterval

    if cfg.interval == "zscale":
        return ZScaleInterval()
    if cfg.interval == "percentile":
        return PercentileInterval(cfg.percentile)
    raise ValueError(f"unknown interval {cfg.interval!r}; expected 'zscale' or 'percentile'")


def _stretch(cfg: MaskConfig) -> Any:
    from astropy.visualization import AsinhStretch, LinearStretch, LogStretch, SqrtStretch

    if cfg.stretch == "asinh":
        return AsinhStretch(cfg.asinh_a)
    if cfg.stretch == "log":
        return LogStretch(cfg.log_a)
    if cfg.stretch == "linear":
        return LinearStretch()
    if cfg.stretch == "sqrt":
        return SqrtStretch()
    raise ValueError(f"unknown stretch {cfg.stretch!r}; expected asinh, log, linear or sqrt")


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


def _threshold_sigma(z: np.ndarray, cfg: MaskConfig, interval: Any, stretch: Any) -> float:
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
        if lower.size == 0:
            return cfg.min_sigma
        # mean of the lower class back in sigmas (inverse stretch)
        low_mean = inv(float(lower.mean()))
        if low_mean > cfg.max_clear_sigma:
            return cfg.min_sigma
    t_sig = inv(min(max(t_s, 0.0), 1.0))
    return float(min(max(t_sig, cfg.min_sigma), max(cfg.max_sigma, cfg.min_sigma)))


RESIDUAL_SOFTENING = 4.0
"""``residual = asinh(z / RESIDUAL_SOFTENING) / 2`` of the clear-sky residual ``z`` in noise sigmas."""


def cloud_masks(
    raw: np.ndarray, ambtemp: np.ndarray, geom: SkyGeometry, model: ClearSkyModel,
    cfg: MaskConfig | None = None,
) -> np.ndarray:
    """(n, y, x) raw uint16 -> (n, y, x) uint8 cloud mask (1 = cloud, 0 = clear or not sky).

    Per image: dark level from the pixels outside the circle, robust clear-sky fit, residual / noise (sigmas),
    astropy interval + stretch on the sky pixels, threshold (Otsu guarded by ``min_sigma``/``max_sigma``).
    Images flagged CONSTANT or SATURATED, or with more than ``max_nodata_fraction`` no-data sky pixels, get an
    empty mask; no-data pixels of other images get 0. Processes the block frame by frame (~10 MB temporaries
    at 512x640). A 2-D ``raw`` gives a 2-D mask.
    """
    return masks_and_residuals(raw, ambtemp, geom, model, cfg)[0]


def masks_and_residuals(
    raw: np.ndarray, ambtemp: np.ndarray, geom: SkyGeometry, model: ClearSkyModel,
    cfg: MaskConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cloud_masks` and, from the same fits, the float32 clear-sky residual images:
    ``asinh(z / RESIDUAL_SOFTENING) / 2`` of the residual ``z`` in noise sigmas on sky pixels (about 0 on clear
    sky, 1 at the typical mask threshold of ~10 sigmas, 3 on thick cloud), 0 off the sky and on CONSTANT or
    SATURATED images; the networks' input."""
    cfg = cfg or MaskConfig()
    raw = np.asarray(raw)
    single = raw.ndim == 2
    raw3 = raw[None] if single else raw
    temps = np.broadcast_to(np.asarray(ambtemp, dtype=np.float64).reshape(-1), (raw3.shape[0],))
    flags = quality_flags(raw3, geom, cfg.saturated_fraction)
    fr = _Frame(geom, model, cfg.fit_stride)
    interval, stretch = _interval(cfg), _stretch(cfg)
    out = np.zeros(raw3.shape, np.uint8)
    residual = np.zeros(raw3.shape, np.float32)
    for i, im in enumerate(raw3):
        if flags[i] & (QUALITY_CONSTANT | QUALITY_SATURATED):
            continue
        y, clear, _ = _fit_image(im, float(temps[i]), fr, model, cfg)
        z = (y - clear) * fr.inv_sigma
        residual[i].ravel()[fr.sky_idx] = np.arcsinh(z / np.float32(RESIDUAL_SOFTENING)) / np.float32(2)
        if flags[i] & QUALITY_NODATA:
            valid = im.ravel()[fr.sky_idx] != NODATA
            if valid.mean() < 1 - cfg.max_nodata_fraction:
                continue
            t = _threshold_sigma(z[valid], cfg, interval, stretch)
            cloud = (z > t) & valid
        else:
            t = _threshold_sigma(z, cfg, interval, stretch)
            cloud = z > t
        out[i].ravel()[fr.sky_idx] = cloud
    return (out[0], residual[0]) if single else (out, residual)


def naive_masks(raw: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """Baseline without clear-sky model: per-image ZScale + Asinh on raw sky pixels, then Otsu."""
    from astropy.visualization import AsinhStretch, ZScaleInterval

    raw3 = np.asarray(raw)[None] if np.ndim(raw) == 2 else np.asarray(raw)
    out = np.zeros(raw3.shape, np.uint8)
    for i, im in enumerate(raw3):
        v = im[sky].astype(np.float32)
        lo, hi = ZScaleInterval().get_limits(v)
        s = AsinhStretch()(np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1), clip=True)
        out[i][sky] = s > otsu(s)
    return out


def cloud_fraction(mask: np.ndarray, sky: np.ndarray) -> np.ndarray:
    """(n,) float32 fraction of sky pixels marked cloud (mask (n, y, x) or (y, x))."""
    m = np.asarray(mask)
    m3 = m[None] if m.ndim == 2 else m
    sky = np.asarray(sky, bool)
    n = max(int(sky.sum()), 1)
    return (m3[:, sky].astype(bool).sum(axis=1) / n).astype(np.float32)


def quality_flags(raw: np.ndarray, geom: SkyGeometry, saturated_fraction: float = 0.01) -> np.ndarray:
    """(n,) uint8 bit flags per image: QUALITY_CONSTANT | QUALITY_SATURATED | QUALITY_NODATA; 0 = good.

    ``saturated_fraction``: fraction of sky pixels at ADU_MAX (16383) above which the image is SATURATED.
    """
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


# ---------------------------------------------------------------- evaluation


def _scores(tp: float, fp: float, fn: float) -> dict[str, float]:
    nan = float("nan")
    tp, fp, fn = float(tp), float(fp), float(fn)
    union = tp + fp + fn
    return {
        "iou": tp / union if union else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "recall": tp / (tp + fn) if tp + fn else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if union else nan,
    }


def confusion_counts(
    mask: np.ndarray, truth: np.ndarray, sky: np.ndarray, kinds: np.ndarray | None = None,
    cloudy_threshold: float = 0.05,
) -> dict[str, Any]:  # fmt: skip
    """Additive counts of masks (n, y, x) against true masks on sky pixels (combine with :func:`add_counts`).

    ``{"kinds": {kind: [tp, fp, fn, frames]}, "clear": [frames, cloud pixels, sky pixels],
    "labels": [correct, frames]}``; ``kinds=None`` pools every frame under ``"all"``.
    """
    sky = np.asarray(sky, bool)
    m = np.asarray(mask)
    t = np.asarray(truth)
    m = (m[None] if m.ndim == 2 else m)[:, sky].astype(bool)
    t = (t[None] if t.ndim == 2 else t)[:, sky].astype(bool)
    tp = (m & t).sum(axis=1)
    fp = (m & ~t).sum(axis=1)
    fn = (~m & t).sum(axis=1)
    npx = max(int(sky.sum()), 1)
    cf_m, cf_t = (tp + fp) / npx, (tp + fn) / npx
    clear = cf_t == 0
    kinds = np.asarray(kinds).astype(str) if kinds is not None else np.full(len(m), "all")
    per_kind = {}
    for k in dict.fromkeys(kinds.tolist()):
        sel = kinds == k
        per_kind[k] = [int(tp[sel].sum()), int(fp[sel].sum()), int(fn[sel].sum()), int(sel.sum())]
    return {
        "kinds": per_kind,
        "clear": [int(clear.sum()), int((tp + fp)[clear].sum()), int(clear.sum()) * npx],
        "labels": [int(((cf_m > cloudy_threshold) == (cf_t > cloudy_threshold)).sum()), len(m)],
    }


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum of two :func:`confusion_counts` results (``{}`` is the neutral element)."""
    if not a:
        return b
    kinds = dict(a["kinds"])
    for k, v in b["kinds"].items():
        kinds[k] = [x + y for x, y in zip(kinds.get(k, [0, 0, 0, 0]), v)]
    add = lambda key: [x + y for x, y in zip(a[key], b[key])]  # noqa: E731
    return {"kinds": kinds, "clear": add("clear"), "labels": add("labels")}


def scores_from_counts(counts: dict[str, Any]) -> dict[str, Any]:
    """Scores from :func:`confusion_counts`: see :func:`evaluate`."""
    per = counts["kinds"]
    tp, fp, fn, frames = (sum(v[i] for v in per.values()) for i in range(4))
    res: dict[str, Any] = _scores(tp, fp, fn)
    res["n_frames"] = int(frames)
    n_clear, cloud_px, sky_px = counts["clear"]
    res["clear_false_alarm"] = cloud_px / sky_px if sky_px else float("nan")
    res["n_clear_frames"] = int(n_clear)
    correct, total = counts["labels"]
    res["label_accuracy"] = correct / total if total else float("nan")
    res["per_kind"] = {k: {**_scores(*v[:3]), "n_frames": int(v[3])} for k, v in per.items() if k != "all"}
    return res


def evaluate(
    mask: np.ndarray, truth: np.ndarray, sky: np.ndarray, kinds: np.ndarray | None = None,
    cloudy_threshold: float = 0.05,
) -> dict[str, Any]:  # fmt: skip
    """Scores of masks (n, y, x) against true masks on sky pixels, pooled over frames.

    Returns plain floats: ``iou``, ``f1``, ``precision``, ``recall`` (NaN where undefined), ``n_frames``,
    ``clear_false_alarm`` (fraction of sky pixels marked cloud on frames whose true cloud fraction is 0),
    ``n_clear_frames``, ``label_accuracy`` (cf(mask) > thr vs cf(truth) > thr), and ``per_kind``:
    {kind: {iou, f1, precision, recall, n_frames}}.
    """
    return scores_from_counts(confusion_counts(mask, truth, sky, kinds, cloudy_threshold))


# ---------------------------------------------------------------- panel


def quality_panel(
    raw: np.ndarray, clear: np.ndarray, mask: np.ndarray, truth: np.ndarray | None, geom: SkyGeometry,
    titles: list[str] | None, out_png: str | Path,
) -> Path:  # fmt: skip
    """PNG with one row per frame: raw, clear-sky model, residual, mask, truth (truth None -> 4 columns)."""
    from cirrus_batch.plots import new_figure, save

    raw = np.asarray(raw)
    raw3 = raw[None] if raw.ndim == 2 else raw
    clear3 = np.asarray(clear).reshape(raw3.shape)
    mask3 = np.asarray(mask).reshape(raw3.shape)
    truth3 = None if truth is None else np.asarray(truth).reshape(raw3.shape)
    cols = ["raw", "clear-sky model", "residual", "mask"] + ([] if truth3 is None else ["truth"])
    n = raw3.shape[0]
    fig = new_figure(2.4 * len(cols), 2.2 * n)
    axes = fig.subplots(n, len(cols), squeeze=False)
    sky = geom.sky
    for i in range(n):
        r = raw3[i].astype(np.float32)
        valid = sky & (raw3[i] != NODATA)
        vals = r[valid] if valid.any() else r.ravel()
        lo, hi = np.percentile(vals, [1, 99.5])
        res = np.where(sky, r - clear3[i], 0)
        rhi = float(np.percentile(np.abs(res[valid]), 99)) if valid.any() else 1.0
        panels = [
            (r, dict(cmap="inferno", vmin=lo, vmax=hi)),
            (np.where(sky, clear3[i], np.nan), dict(cmap="inferno", vmin=lo, vmax=hi)),
            (np.where(sky, res, np.nan), dict(cmap="RdBu_r", vmin=-rhi, vmax=rhi)),
            (np.where(sky, 1 + mask3[i], 0), dict(cmap="Blues_r", vmin=-0.5, vmax=2.2)),
        ]
        if truth3 is not None:
            panels.append((np.where(sky, 1 + truth3[i], 0), dict(cmap="Blues_r", vmin=-0.5, vmax=2.2)))
        for j, (img, kw) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(img, **kw)
            ax.set_axis_off()
            title = cols[j] if i == 0 else ""
            if j == 0 and titles is not None and i < len(titles):
                title = (title + "\n" if title else "") + str(titles[i])
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save(fig, out_png, dpi=80)
