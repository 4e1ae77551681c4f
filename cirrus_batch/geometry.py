"""Sky geometry of a fisheye all-sky camera: image circle, lens projection, zenith and azimuth maps, pixel classes.

What is sky is found from what the pixels do over a season, not from the sign of a brightness step: a sky pixel
changes with the weather (clouds, humidity), while the lens housing, the ground and obstacles follow the ambient
temperature, and pixels outside a signal-free image circle follow only the sensor offset. Each pixel's series is
regressed on the ambient temperature's band radiance (or, without a temperature, on the brightest steady pixels)
plus a per-image offset (drift, flat-field-correction jumps); the spread of what is left is the pixel's weather
variability. The sky is the variable region around the centre; the image circle is the outer envelope of its
edge (sensor edges excluded, so a circle clipped by the sensor is found too); the lens projection and field of
view come from ``[prepare.sky]``. The method is described in ``docs/masks.md``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from cirrus_batch.radiometry import NODATA, band_radiance
from cirrus_batch.robust import MAD_TO_SIGMA, mad_sigma

PROJECTIONS = ("equidistant", "equisolid", "stereographic", "orthographic")
"""Radial lens models r(θ) ∝ θ, 2 sin(θ/2), 2 tan(θ/2), sin θ."""

OTHER, SKY, AMBIENT, DARK, DEFECT = 0, 1, 2, 3, 4
"""Pixel classes: ignored (edge, ground below the horizon, hot pixels off the sky), sky, ambient reference
(housing, obstacles: about ambient temperature), dark reference (signal-free outside the image circle: sensor
offset), defect (a hot or dead pixel among the sky: sky behind it, no measurement of it)."""
CLASS_NAMES = {OTHER: "other", SKY: "sky", AMBIENT: "ambient", DARK: "dark", DEFECT: "defect"}


@dataclass
class SkyConfig:
    """Sky geometry: given here, or estimated from a sample of the archive (``[prepare.sky]``)."""

    center: list[float] | None = None
    """[cy, cx] of the image circle (px); None = estimate."""
    radius: float | None = None
    """Radius (px) of the image circle's edge, where the zenith angle is ``fov_deg / 2`` (may exceed the sensor);
    None = estimate."""
    projection: str = "equidistant"
    """Lens projection: equidistant | equisolid | stereographic | orthographic."""
    fov_deg: float = 180.0
    """Full field of view of the lens (deg); the image circle's edge is at zenith angle fov_deg / 2."""
    horizon_file: str | None = None
    """CSV ``azimuth_deg,elevation_deg`` horizon profile (header optional); None = obstacles from the archive."""
    north_deg: float = 0.0
    """Azimuth (deg) of the image's "up" direction; azimuth grows towards +x (image right)."""
    max_zenith_deg: float = 90.0
    """Sky pixels must have a zenith angle below this (deg)."""
    min_region_px: int = 30
    """Sky islands smaller than this (px) are dropped."""
    min_obstacle_px: int = 3
    """Steady islands smaller than this (px) inside the sky are taken for noise and kept as sky."""
    hot_sigma: float = 10.0
    """Pixels whose median departs from their 3x3 neighbourhood by more than this many robust sigmas, or that
    never change, are hot/dead and excluded."""

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        if not 60.0 <= self.fov_deg <= 240.0:
            raise ValueError(f"fov_deg must be in [60, 240], got {self.fov_deg}")
        if self.radius is not None and self.radius <= 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        if not 0.0 < self.max_zenith_deg <= 90.0:
            raise ValueError(f"max_zenith_deg must be in (0, 90], got {self.max_zenith_deg}")


# ---------------------------------------------------------------- projections


def _forward(theta_rad: np.ndarray, projection: str) -> np.ndarray:
    if projection == "equidistant":
        return theta_rad
    if projection == "equisolid":
        return 2 * np.sin(theta_rad / 2)
    if projection == "stereographic":
        return 2 * np.tan(theta_rad / 2)
    if projection == "orthographic":
        return np.sin(np.minimum(theta_rad, np.pi / 2))
    raise ValueError(f"unknown projection {projection!r}; expected one of {', '.join(PROJECTIONS)}")


def _inverse(u: np.ndarray, projection: str) -> np.ndarray:
    if projection == "equidistant":
        return u
    if projection == "equisolid":
        return 2 * np.arcsin(np.clip(u / 2, 0, 1))
    if projection == "stereographic":
        return 2 * np.arctan(u / 2)
    if projection == "orthographic":
        return np.arcsin(np.clip(u, 0, 1))
    raise ValueError(f"unknown projection {projection!r}; expected one of {', '.join(PROJECTIONS)}")


def radius_of(theta_deg: float | np.ndarray, radius: float, projection: str, fov_deg: float) -> np.ndarray:
    """Distance (px) from the circle centre of zenith angle ``theta_deg``, for an edge ``radius`` at fov/2."""
    edge = _forward(np.radians(fov_deg / 2), projection)
    return radius * _forward(np.radians(np.asarray(theta_deg, np.float64)), projection) / edge


def zenith_map(
    shape: tuple[int, int], center: tuple[float, float], radius: float, projection: str = "equidistant",
    fov_deg: float = 180.0,
) -> np.ndarray:  # fmt: skip
    """(y, x) float32 zenith angle (deg). Outside the image circle it grows linearly beyond max(fov/2, 90)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    r = np.hypot(yy - center[0], xx - center[1]) / radius
    half = np.radians(fov_deg / 2)
    theta = np.degrees(_inverse(r * _forward(half, projection), projection))
    out = np.where(r <= 1.0, theta, max(fov_deg / 2, 90.0) * np.maximum(r, 1.0) + 1e-3)
    return out.astype(np.float32)


def azimuth_map(shape: tuple[int, int], center: tuple[float, float], north_deg: float = 0.0) -> np.ndarray:
    """(y, x) float32 azimuth (deg, 0..360): ``north_deg`` at image up, growing towards image right."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    return ((np.degrees(np.arctan2(xx - center[1], -(yy - center[0]))) + north_deg) % 360).astype(np.float32)


# ---------------------------------------------------------------- geometry


@dataclass
class SkyGeometry:
    """Image circle, projection, zenith angle per pixel and pixel classes (sky / ambient / dark / other)."""

    center: tuple[float, float]
    radius: float
    projection: str
    fov_deg: float
    classes: np.ndarray
    """(y, x) uint8 pixel class: OTHER, SKY, AMBIENT, DARK, DEFECT."""
    north_deg: float = 0.0
    outside: str = "dark"
    """What lies outside the image circle: ``dark`` (signal-free), ``warm`` (housing), ``none`` (no pixel)."""
    ambient_source: str = "obstacles"
    """Where the ambient reference comes from: ``obstacles`` (housing, ground, obstacles) or ``horizon``."""

    def __post_init__(self) -> None:
        self.classes = np.asarray(self.classes, np.uint8)
        self.zenith = zenith_map(self.shape, self.center, self.radius, self.projection, self.fov_deg)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.classes.shape[0]), int(self.classes.shape[1]))

    @property
    def sky(self) -> np.ndarray:
        """(y, x) bool valid sky."""
        return self.classes == SKY

    @property
    def ambient(self) -> np.ndarray:
        """(y, x) bool pixels at about ambient temperature (the per-image ambient reference)."""
        return self.classes == AMBIENT

    @property
    def dark(self) -> np.ndarray:
        """(y, x) bool signal-free pixels (the per-image sensor offset); empty for a warm housing."""
        return self.classes == DARK

    def to_attrs(self) -> dict[str, Any]:
        """JSON-able description (the ``classes`` array is stored separately)."""
        return {
            "center": [float(self.center[0]), float(self.center[1])], "radius": float(self.radius),
            "projection": self.projection, "fov_deg": float(self.fov_deg), "north_deg": float(self.north_deg),
            "outside": self.outside, "ambient_source": self.ambient_source,
            "n_sky": int(self.sky.sum()), "n_ambient": int(self.ambient.sum()), "n_dark": int(self.dark.sum()),
        }  # fmt: skip

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], classes: np.ndarray) -> SkyGeometry:
        """Rebuild from :meth:`to_attrs` output and the stored class map."""
        return cls(
            center=(float(attrs["center"][0]), float(attrs["center"][1])), radius=float(attrs["radius"]),
            projection=str(attrs.get("projection", "equidistant")), fov_deg=float(attrs.get("fov_deg", 180.0)),
            classes=classes, north_deg=float(attrs.get("north_deg", 0.0)),
            outside=str(attrs.get("outside", "dark")), ambient_source=str(attrs.get("ambient_source", "obstacles")),
        )  # fmt: skip

    def config_block(self) -> str:
        """The ``[prepare.sky]`` TOML block that reproduces this circle and projection."""
        return (
            "[prepare.sky]\n"
            f"center = [{self.center[0]:.1f}, {self.center[1]:.1f}]\n"
            f"radius = {self.radius:.1f}\n"
            f'projection = "{self.projection}"\n'
            f"fov_deg = {self.fov_deg:g}\n"
            f"north_deg = {self.north_deg:g}\n"
        )


def usable(sample: np.ndarray) -> np.ndarray:
    """Images of a sample without no-data pixels and not constant."""
    flat = sample.reshape(sample.shape[0], -1)
    return ~(flat == NODATA).any(axis=1) & (flat.min(axis=1) != flat.max(axis=1))


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1:
        return mask
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return np.concatenate([[False], sizes >= min_px])[lab]


def variability(images: np.ndarray, driver: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel weather variability and ambient slope of ``images`` (n, y, x).

    Each pixel's series is fitted as ``a + b * driver + o_i`` (``o_i`` an offset shared by all pixels of image
    i: drift, flat-field-correction jumps). Returns the robust spread (16-84 % half-range, ADU) of what is
    left, and ``b`` (ADU per unit of driver), both (y, x) float32.
    """
    n = images.shape[0]
    x = images.reshape(n, -1).astype(np.float32)
    d = np.asarray(driver, np.float64)
    dc = (d - d.mean()).astype(np.float32)
    ddot = float(dc @ dc)
    offset = np.zeros(n, np.float32)
    for _ in range(3):
        y = x - offset[:, None]
        y -= y.mean(axis=0)
        slope = (dc @ y) / ddot if ddot > 0 else np.zeros(y.shape[1], np.float32)
        y -= np.outer(dc, slope)
        lo, hi = np.percentile(y, [16, 84], axis=0)
        spread = 0.5 * (hi - lo)
        steady = spread <= np.percentile(spread, 20)
        offset += np.median(y[:, steady], axis=1)
    shape = images.shape[1:]
    return spread.reshape(shape).astype(np.float32), slope.reshape(shape).astype(np.float32)


def _driver(images: np.ndarray, ambtemp: np.ndarray | None, med: np.ndarray, hot: np.ndarray) -> np.ndarray:
    """What the housing and obstacles follow: the band radiance of the ambient temperature, else the mean of
    the brightest steady pixels of the median image."""
    if ambtemp is not None:
        t = np.asarray(ambtemp, np.float64)
        if t.size == images.shape[0] and np.isfinite(t).mean() >= 0.8 and np.nanstd(t) > 0.05:
            t = np.where(np.isfinite(t), t, np.nanmedian(t))
            return np.asarray(band_radiance(t), np.float64)
    bright = (med >= np.percentile(med[~hot], 95)) & ~hot
    return images[:, bright].astype(np.float64).mean(axis=1)


def _envelope_circle(points: np.ndarray, shape: tuple[int, int]) -> tuple[float, float, float]:
    """(cy, cx, r) of the outer envelope of boundary ``points`` (k, 2): per 10° of azimuth the farthest point,
    a least-squares (Kasa) circle through them with the bins far inside (tall obstacles) dropped, four rounds;
    r is the 90th percentile of the envelope's distances."""
    cy, cx = points.mean(axis=0)
    keep_pts = points
    for _ in range(4):
        dy, dx = points[:, 0] - cy, points[:, 1] - cx
        d = np.hypot(dy, dx)
        b = ((np.degrees(np.arctan2(dx, -dy)) // 10) % 36).astype(int)  # (-1e-15 % 360) // 10 would be 36
        far = np.full(36, -1)
        best = np.full(36, -1.0)
        for i in range(points.shape[0]):  # small: boundary points only
            if d[i] > best[b[i]]:
                best[b[i]], far[b[i]] = d[i], i
        env = far[far >= 0]
        de = d[env]
        med, mad = np.median(de), mad_sigma(de) + 0.5
        keep = de > med - 2.5 * mad
        keep_pts = points[env[keep]]
        if keep_pts.shape[0] < 5:
            raise ValueError("too few edge points")
        y, x = keep_pts[:, 0].astype(np.float64), keep_pts[:, 1].astype(np.float64)
        a = np.column_stack([x, y, np.ones_like(x)])
        sol = np.linalg.lstsq(a, x * x + y * y, rcond=None)[0]
        cx, cy = sol[0] / 2, sol[1] / 2
    # the horizon's lowest parts lie nearest the circle: a high quantile of the envelope, not its mean
    d = np.hypot(keep_pts[:, 0] - cy, keep_pts[:, 1] - cx)
    return float(cy), float(cx), float(np.percentile(d, 90))


def _horizon_above(cfg: SkyConfig, geom_shape: tuple[int, int], center: tuple[float, float],
                   zen: np.ndarray) -> np.ndarray:  # fmt: skip
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
    az = azimuth_map(geom_shape, center, cfg.north_deg)
    return (90.0 - zen) > np.interp(az, prof[:, 0], prof[:, 1], period=360.0)


GEOMETRY_KEYS = "[prepare.sky] center, radius, projection, fov_deg"


def estimate_sky(sample: np.ndarray, ambtemp: np.ndarray | None = None, cfg: SkyConfig | None = None) -> SkyGeometry:
    """Sky geometry from ``[prepare.sky]`` and/or a sample of raw images (n, y, x) spread over the archive
    (several nights and kinds of weather, 40-200 images) with their ambient temperatures (deg C, NaN/None when
    unknown). See the module docstring; raises ValueError naming the ``[prepare.sky]`` keys when the sky cannot
    be told from the rest.
    """
    cfg = cfg or SkyConfig()
    sample = np.asarray(sample)
    if sample.ndim == 2:
        sample = sample[None]
    shape = (int(sample.shape[1]), int(sample.shape[2]))
    keep = usable(sample)
    good = sample[keep]
    temps = None if ambtemp is None else np.asarray(ambtemp, np.float64).reshape(-1)[keep]
    if good.shape[0] == 0:
        good = np.where(sample == NODATA, 0, sample)[:1]
    med = np.median(good, axis=0).astype(np.float32)
    resid = np.abs(med - ndimage.median_filter(med, size=3))
    local = MAD_TO_SIGMA * ndimage.median_filter(resid, size=9)
    hot = resid > cfg.hot_sigma * np.maximum(local, MAD_TO_SIGMA * float(np.median(resid)) + 1e-3)
    given = cfg.center is not None and cfg.radius is not None
    if good.shape[0] >= 3:
        spread, _ = variability(good, _driver(good, temps, med, hot))
        hot |= spread == 0  # dead pixels never change
        try:
            varied = _weather_region(spread, hot, shape, cfg.min_obstacle_px)
        except ValueError:
            if not given:
                raise
            varied = None  # the circle is given: its inside is the sky (less obstacles)
    elif given:
        varied = None
    else:
        raise ValueError(f"cannot find the sky in fewer than 3 usable images: set {GEOMETRY_KEYS}")
    if given:
        center, radius = (float(cfg.center[0]), float(cfg.center[1])), float(cfg.radius)  # type: ignore[index]
    else:
        assert varied is not None
        center, radius = _circle(varied, shape, cfg)
        center = _symmetric_center(med, varied & ~hot, center, radius)
        if cfg.center is not None:
            center = (float(cfg.center[0]), float(cfg.center[1]))
        if cfg.radius is not None:
            radius = float(cfg.radius)
    zen = zenith_map(shape, center, radius, cfg.projection, cfg.fov_deg)
    inside = zen < cfg.fov_deg / 2
    sky = inside & (zen < min(cfg.max_zenith_deg, 90.0))
    ground = np.zeros(shape, bool)  # ground the weather barely moves: a distant ridge
    if cfg.horizon_file is not None:
        sky &= _horizon_above(cfg, shape, center, zen)
    elif varied is not None:
        sky &= varied & ~_obstacles(np.percentile(good, 10, axis=0), sky & ~hot, zen, center)
        ground = _steady_ground(spread, sky & ~hot, zen, center)
        sky &= ~ground
    sky = _drop_small(sky, cfg.min_region_px)
    sky = (_largest(sky) if sky.any() else sky) & ~hot  # hot pixels (a dead column) leave after the connectivity
    # the one-pixel rim against obstacles and the housing mixes both (optics): not sky
    sky &= ndimage.binary_erosion(sky | hot, iterations=1, border_value=1)
    if not sky.any():
        raise ValueError(f"no sky pixel found inside the image circle: check {GEOMETRY_KEYS}")
    classes = np.zeros(shape, np.uint8)
    classes[sky] = SKY
    classes[hot & ndimage.binary_dilation(sky, iterations=2)] = DEFECT
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = np.hypot(yy - center[0], xx - center[1])
    outside_px = (r > radius + 3) & ~hot
    outside = "none"
    sky_lo, sky_hi = np.percentile(med[sky], [2, 98])
    if outside_px.sum() >= 20:
        level = float(np.median(med[outside_px]))
        outside = "dark" if level < sky_lo - 0.5 * (sky_hi - sky_lo) else "warm"
    if outside == "dark":
        classes[outside_px] = DARK
    lit = (r < radius - 2) | ((r > radius + 3) if outside == "warm" else False)
    steady = lit & ~sky & ~hot
    if varied is not None:
        steady &= ~varied | ground  # a ridge follows the ambient temperature too
    ambient = steady & (med >= sky_lo + 0.5 * (sky_hi - sky_lo))
    ambient_source = "obstacles"
    if ambient.sum() < 20:  # no obstacle, no housing: the horizon ring (nearly a black body) is the reference
        ambient = sky & (zen > 85)
        ambient_source = "horizon"
        classes[ambient] = AMBIENT
    classes[ambient & (classes == OTHER)] = AMBIENT
    return SkyGeometry(center=center, radius=radius, projection=cfg.projection, fov_deg=cfg.fov_deg,
                       classes=classes, north_deg=cfg.north_deg, outside=outside,
                       ambient_source=ambient_source)  # fmt: skip


def _cells(values: np.ndarray, sky: np.ndarray, zen: np.ndarray, center: tuple[float, float]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Mean of ``values`` over the ``sky`` pixels per (azimuth 1°, zenith angle 1°) cell, (360, 90) with NaN where
    empty, and the flat indices, zenith and azimuth cells of those pixels."""
    idx = np.flatnonzero(sky)
    tb = np.minimum(zen.ravel()[idx].astype(int), 89)
    ab = azimuth_map(values.shape, center).ravel()[idx].astype(int) % 360
    cell = ab * 90 + tb
    n = np.bincount(cell, minlength=360 * 90)
    mean = (np.bincount(cell, values.ravel()[idx].astype(np.float64), minlength=360 * 90) / np.maximum(n, 1))
    mean = mean.reshape(360, 90)
    mean[n.reshape(360, 90) == 0] = np.nan
    return mean, idx, tb, ab


def _from_first(flag: np.ndarray, mean: np.ndarray, idx: np.ndarray, tb: np.ndarray, ab: np.ndarray,
                shape: tuple[int, int]) -> np.ndarray:  # fmt: skip
    """Along each azimuth, the first flagged cell seen from the zenith (two rings in a row, empty rings
    bridged) and everything beyond it, as a (y, x) bool map: ridges, buildings and masts stand on the ground."""
    flag = flag & (np.roll(flag, -1, axis=1) | ~np.isfinite(np.roll(mean, -1, axis=1)))
    first = np.where(flag.any(axis=1), np.argmax(flag, axis=1), 99)
    out = np.zeros(shape, bool)
    out.ravel()[idx] = tb >= first[ab]
    return out


def _obstacles(low: np.ndarray, sky: np.ndarray, zen: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    """(y, x) bool obstacles among the ``sky`` candidates. On its clearest frames (``low``: a low percentile over
    the sample) an obstacle is far warmer than the sky at its zenith angle (near ambient temperature even on the
    coldest nights): by 8 sigmas of the ring's cold side and 15 % of the step from the ring to the warmest horizon.
    Along each azimuth (1°) the first such step seen from the zenith (two 1° rings in a row) and everything
    beyond it is obstacle."""
    mean, idx, tb, ab = _cells(low, sky, zen, center)
    with np.errstate(all="ignore"):
        ref, p5, top = np.nanpercentile(mean, [25, 5, 95], axis=0)
        scale = (ref - p5) / 0.97
        horizon = np.nanmax(top[80:]) if np.isfinite(top[80:]).any() else np.nanmax(top)
        thr = np.maximum(8 * scale, 0.15 * (horizon - ref))
        warm = (mean - ref[None, :]) > thr[None, :]
    warm[:, :15] = False
    return _from_first(warm, mean, idx, tb, ab, low.shape)


STEADY_FRACTION = 0.4
"""A cell whose weather variability is below this fraction of its ring's sky is ground (:func:`_steady_ground`)."""


def _steady_ground(spread: np.ndarray, sky: np.ndarray, zen: np.ndarray, center: tuple[float, float]) -> np.ndarray:
    """(y, x) bool ground among the ``sky`` candidates that no brightness step gives away: a distant ridge seen
    through the air is about as warm as the sky near the horizon and changes a little with the air in front of
    it, but far less than the sky at the same zenith angle (the sky's own variability falls towards the horizon
    as the slant path saturates, so the comparison is per 1° ring). The ring's sky level is the 90th percentile of
    its cells' variability (the sky needs only a tenth of the ring); cells below ``STEADY_FRACTION`` of it, from
    80° zenith angle on, two rings in a row, and everything beyond them along the azimuth, are ground. (From 60°
    on, a 4-night season of clear skies and cirrus lost its horizon band, whose sky barely changes without low
    cloud, and the clear-sky model then took its humid clear night for a deck.)"""
    mean, idx, tb, ab = _cells(spread, sky, zen, center)
    with np.errstate(all="ignore"):
        ref = np.nanpercentile(mean, 90, axis=0)
        steady = mean < STEADY_FRACTION * ref[None, :]
    steady[:, :80] = False
    return _from_first(steady, mean, idx, tb, ab, spread.shape)


def _weather_region(spread: np.ndarray, hot: np.ndarray, shape: tuple[int, int], min_obstacle_px: int) -> np.ndarray:
    """(y, x) bool pixels that change with the weather: variability above the geometric mean of the centre's
    (sky) and the corners' (never sky on an all-sky camera); steady specks under ``min_obstacle_px`` are sky."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    centre = np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2) < 0.12 * min(ny, nx)
    c = max(2, min(ny, nx) // 12)
    corner = np.zeros(shape, bool)
    corner[:c, :c] = corner[:c, -c:] = corner[-c:, :c] = corner[-c:, -c:] = True
    v_sky = float(np.median(spread[centre & ~hot]))
    v_steady = float(np.median(spread[corner & ~hot]))
    if not v_sky > 4.0 * max(v_steady, 1e-3):
        raise ValueError(
            f"cannot tell the sky from the rest: the centre of the image changes as little over the sample as its "
            f"corners ({v_sky:.1f} vs {v_steady:.1f} ADU); use a sample with several kinds of weather, or set "
            f"{GEOMETRY_KEYS}"
        )
    # hot and dead pixels (a dead column) must not cut the sky in two: they count as sky for connectivity
    varied = (spread > np.sqrt(v_sky * max(v_steady, 1e-3))) | hot
    varied = ndimage.binary_opening(varied, iterations=1) | (hot & ndimage.binary_dilation(varied, iterations=2))
    varied = _largest(varied)
    holes = ndimage.binary_fill_holes(varied) & ~varied
    return varied | (holes & ~_drop_small(holes, min_obstacle_px))


def _symmetric_center(med: np.ndarray, sky: np.ndarray, center: tuple[float, float],
                      radius: float) -> tuple[float, float]:  # fmt: skip
    """The zenith: the centre about which the season's median sky is most nearly constant on circles (the clear
    sky depends on the zenith angle only). Starts from the edge fit's centre, moves at most radius / 8."""
    from scipy.optimize import minimize

    yy, xx = np.nonzero(sky)
    step = max(1, yy.size // 40000)
    yy, xx = yy[::step].astype(np.float64), xx[::step].astype(np.float64)
    v = med[yy.astype(int), xx.astype(int)].astype(np.float64)
    v = (v - v.mean()) / (v.std() + 1e-9)
    width = radius / 90.0

    def cost(c: np.ndarray) -> float:
        r = np.hypot(yy - c[0], xx - c[1])
        use = (r > 0.3 * radius) & (r < 0.97 * radius)
        b = (r[use] / width).astype(int)
        n = np.bincount(b)
        s1 = np.bincount(b, v[use])
        s2 = np.bincount(b, v[use] ** 2)
        ok = n > 3
        return float((s2[ok] - s1[ok] ** 2 / n[ok]).sum() / max(n[ok].sum(), 1))

    c0 = np.array(center, np.float64)
    res = minimize(cost, c0, method="Nelder-Mead", options={"xatol": 0.05, "fatol": 1e-7, "initial_simplex":
                   [c0, c0 + [radius / 30, 0], c0 + [0, radius / 30]]})  # fmt: skip
    if not res.success or np.hypot(*(res.x - c0)) > radius / 8:
        return center
    return (float(res.x[0]), float(res.x[1]))


def _circle(varied: np.ndarray, shape: tuple[int, int], cfg: SkyConfig) -> tuple[tuple[float, float], float]:
    """Centre and edge radius (at fov/2) of the image circle from the outer envelope of the sky region."""
    ny, nx = shape
    filled = ndimage.binary_fill_holes(varied)
    edge = filled & ~ndimage.binary_erosion(filled)
    edge[:2, :] = edge[-2:, :] = edge[:, :2] = edge[:, -2:] = False
    pts = np.argwhere(edge)
    try:
        cy, cx, r_env = _envelope_circle(pts, shape)
    except (ValueError, np.linalg.LinAlgError):
        raise ValueError(f"cannot fit the image circle to the edge of the sky: set {GEOMETRY_KEYS}") from None
    if not (0 < r_env < 2 * max(ny, nx)) or not (-0.25 * ny < cy < 1.25 * ny and -0.25 * nx < cx < 1.25 * nx):
        raise ValueError(f"the fitted image circle (centre {cy:.0f},{cx:.0f}, radius {r_env:.0f} px) is not plausible: "
                         f"set {GEOMETRY_KEYS}")  # fmt: skip
    # the sky ends at the horizon (90°) or at the lens edge (fov/2), whichever comes first
    theta_env = min(90.0, cfg.fov_deg / 2)
    radius = float(r_env * radius_of(cfg.fov_deg / 2, 1.0, cfg.projection, cfg.fov_deg)
                   / radius_of(theta_env, 1.0, cfg.projection, cfg.fov_deg))  # fmt: skip
    return (cy, cx), radius
