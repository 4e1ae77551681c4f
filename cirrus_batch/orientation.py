"""Camera orientation on the sky, fitted to the Sun and the Moon: pixel <-> (altitude, azimuth).

The lens (image-circle centre, radius at ``fov_deg / 2``, projection) comes from the sky geometry of ``prepare``;
the orientation adds the azimuth seen at image up (``north_deg``), an east-west ``mirror``, a tilt of the optical
axis (``tilt_deg`` towards ``tilt_azimuth_deg``) and a radial ``scale`` of the projection. Unmirrored, the image is
the sky seen from below: east counterclockwise of north (``geometry.azimuth_map`` draws the mirrored case).

The fit (``cirrus orient``): in frames where the Sun or the Moon is up and the sky is clear, the body is the
brightest compact source of the frame's high-pass (the static pattern of hot pixels removed); astropy predicts its
altitude and azimuth; both mirrors are fitted by least squares (north from a grid, then north, tilt and scale
together, outliers dropped) and the better one kept. Method and figures: ``docs/sightline.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from cirrus_batch.config import OrientConfig, SiteConfig
from cirrus_batch.errors import CirrusError
from cirrus_batch.geometry import SKY, radius_of
from cirrus_batch.robust import MAD_TO_SIGMA, mad_sigma

ORIENTATION_ATTR = "orientation"
"""Root attribute of the store written by ``cirrus orient``."""
BODIES = ("sun", "moon")


@dataclass(frozen=True)
class Lens:
    """Image circle and projection (from the sky geometry of ``prepare``)."""

    center: tuple[float, float]
    radius: float
    """Radius (px) of the image circle's edge, at zenith angle ``fov_deg / 2``."""
    projection: str
    fov_deg: float

    @classmethod
    def from_attrs(cls, geometry: dict[str, Any]) -> Lens:
        return cls((float(geometry["center"][0]), float(geometry["center"][1])), float(geometry["radius"]),
                   str(geometry.get("projection", "equidistant")), float(geometry.get("fov_deg", 180.0)))  # fmt: skip


@dataclass(frozen=True)
class Orientation:
    """How the lens sits on the sky."""

    north_deg: float = 0.0
    """Azimuth (deg, from north through east) seen straight up from the circle centre in the image."""
    mirror: bool = False
    """True: east clockwise of north in the image (an east-west mirrored image)."""
    tilt_deg: float = 0.0
    """Angle between the optical axis (the circle centre) and the zenith."""
    tilt_azimuth_deg: float = 0.0
    """Azimuth towards which the optical axis leans."""
    scale: float = 1.0
    """Radial scale of the projection (image radius = scale x the lens's)."""

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Orientation:
        return cls(float(attrs["north_deg"]), bool(attrs["mirror"]), float(attrs.get("tilt_deg", 0.0)),
                   float(attrs.get("tilt_azimuth_deg", 0.0)), float(attrs.get("scale", 1.0)))  # fmt: skip

    def rotation(self) -> Rotation:
        """Camera frame -> world (east, north, up): the rotation taking the zenith onto the optical axis."""
        t, a = np.radians(self.tilt_deg), np.radians(self.tilt_azimuth_deg)
        return Rotation.from_rotvec(t * np.array([-np.cos(a), np.sin(a), 0.0]))


def unit_vectors(alt_deg: np.ndarray, az_deg: np.ndarray) -> np.ndarray:
    """(..., 3) unit vectors (east, north, up) of directions in degrees."""
    alt, az = np.radians(alt_deg), np.radians(az_deg)
    return np.stack([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1)


def altaz_to_pixel(alt_deg: np.ndarray, az_deg: np.ndarray, lens: Lens, ori: Orientation) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) pixel coordinates (float, pixel centres at integers) of directions ``(alt_deg, az_deg)``."""
    alt, az = np.broadcast_arrays(np.asarray(alt_deg, np.float64), np.asarray(az_deg, np.float64))
    v = ori.rotation().inv().apply(unit_vectors(alt, az).reshape(-1, 3))
    theta = np.degrees(np.arccos(np.clip(v[:, 2], -1, 1)))
    psi = np.arctan2(v[:, 0], v[:, 1]) - np.radians(ori.north_deg)
    r = ori.scale * radius_of(np.minimum(theta, 179.0), lens.radius, lens.projection, lens.fov_deg)
    side = 1.0 if ori.mirror else -1.0
    y = lens.center[0] - r * np.cos(psi)
    x = lens.center[1] + side * r * np.sin(psi)
    return y.reshape(alt.shape), x.reshape(alt.shape)


def pixel_to_altaz(y: np.ndarray, x: np.ndarray, lens: Lens, ori: Orientation) -> tuple[np.ndarray, np.ndarray]:
    """(altitude, azimuth) in degrees of pixel coordinates ``(y, x)`` (beyond the image circle: extrapolated)."""
    y, x = np.broadcast_arrays(np.asarray(y, np.float64), np.asarray(x, np.float64))
    dy, dx = y - lens.center[0], x - lens.center[1]
    r = np.hypot(dy, dx) / ori.scale
    grid = np.linspace(0.0, min(lens.fov_deg / 2, 90.0 if lens.projection == "orthographic" else 179.0), 4001)
    r_grid = radius_of(grid, lens.radius, lens.projection, lens.fov_deg)
    slope = (grid[-1] - grid[-2]) / (r_grid[-1] - r_grid[-2])
    theta = np.where(r <= r_grid[-1], np.interp(r, r_grid, grid), grid[-1] + (r - r_grid[-1]) * slope)
    side = 1.0 if ori.mirror else -1.0
    psi = np.arctan2(side * dx, -dy)
    a = psi + np.radians(ori.north_deg)
    th = np.radians(np.minimum(theta, 179.0))
    v = np.stack([np.sin(th) * np.sin(a), np.sin(th) * np.cos(a), np.cos(th)], axis=-1).reshape(-1, 3)
    w = ori.rotation().apply(v)
    alt = np.degrees(np.arcsin(np.clip(w[:, 2], -1, 1)))
    az = np.degrees(np.arctan2(w[:, 0], w[:, 1])) % 360
    return alt.reshape(y.shape), az.reshape(y.shape)


def separation_deg(alt1: np.ndarray, az1: np.ndarray, alt2: np.ndarray, az2: np.ndarray) -> np.ndarray:
    """Angle (deg) between two directions."""
    f = np.float64
    u, v = unit_vectors(np.asarray(alt1, f), np.asarray(az1, f)), unit_vectors(np.asarray(alt2, f), np.asarray(az2, f))
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(u, v), axis=-1), (u * v).sum(axis=-1)))


# ---------------------------------------------------------------- finding the bodies


def static_pattern(frames: np.ndarray, size: int = 7) -> np.ndarray:
    """Per-pixel median over ``frames`` (n, y, x) of their high-pass: hot pixels and other fixed structure."""
    return np.median(np.stack([_highpass(f, size) for f in frames]), axis=0)


def _highpass(image: np.ndarray, size: int = 7) -> np.ndarray:
    im = image.astype(np.float32)
    return im - ndimage.median_filter(im, size=size)


def find_source(image: np.ndarray, sky: np.ndarray, static: np.ndarray, min_snr: float) -> tuple[float, float, float] | None:
    """(y, x, snr) of the brightest compact warm source on the ``sky`` pixels of ``image``, or None when none
    stands ``min_snr`` robust sigmas above the frame's high-pass or the brightest is extended (a cloud edge)."""
    hp = _highpass(image) - static
    vals = hp[sky]
    sigma = mad_sigma(vals) + 1e-6
    flat = np.where(sky, hp, -np.inf)
    py, px = np.unravel_index(int(np.argmax(flat)), hp.shape)
    peak = float(hp[py, px])
    if peak < min_snr * sigma:
        return None
    y0, y1, x0, x1 = max(py - 2, 0), min(py + 3, hp.shape[0]), max(px - 2, 0), min(px + 3, hp.shape[1])
    box = np.clip(hp[y0:y1, x0:x1], 0, None)
    inner = box[max(py - 1 - y0, 0) : py + 2 - y0, max(px - 1 - x0, 0) : px + 2 - x0]
    ring = (box.sum() - inner.sum()) / max(box.size - inner.size, 1)
    if ring > 0.25 * peak:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    w = box.sum()
    return float((box * yy).sum() / w), float((box * xx).sum() / w), peak / sigma


@dataclass
class Sightings:
    """Where the bodies were found and where astropy puts them."""

    time: np.ndarray
    body: np.ndarray
    y: np.ndarray
    x: np.ndarray
    alt: np.ndarray
    az: np.ndarray
    snr: np.ndarray

    def __len__(self) -> int:
        return int(self.time.size)


def _sessions(times: np.ndarray, gap_h: float = 3.0) -> np.ndarray:
    """Run number of each frame: runs of frames less than ``gap_h`` apart (a night, a day)."""
    order = np.argsort(times)
    breaks = np.diff(times[order]) > np.timedelta64(int(gap_h * 3600), "s")
    out = np.empty(times.size, np.intp)
    out[order] = np.concatenate([[0], np.cumsum(breaks)])
    return out


def search(images: np.ndarray, times: np.ndarray, sky: np.ndarray, site: SiteConfig,
           cfg: OrientConfig) -> Sightings:  # fmt: skip
    """Find the Sun (when up) or else the Moon in each of ``images`` (n, y, x) taken at ``times``. The static
    high-pass of each run of frames (a night) is removed first, and the pixels where it is strong (hot pixels,
    a dead column: they drift with the temperature) are not searched; the body moves."""
    from cirrus_batch.site import body_altaz

    pos = {b: body_altaz(b, times, site) for b in BODIES}
    inner = ndimage.binary_erosion(sky, iterations=2)  # not the horizon's or an obstacle's edge
    groups = _sessions(np.asarray(times, "datetime64[ns]"))
    season = static_pattern(images[:: max(1, len(images) // 50)])
    rows = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        static = static_pattern(images[members[:: max(1, members.size // 50)]]) if members.size >= 5 else season
        steady = static[inner]
        spread = mad_sigma(steady) + 1e-6
        fixed = ndimage.binary_dilation(np.abs(static) > 5 * spread)  # hot pixels, a dead column: they drift
        for i in members:
            body = next((b for b in BODIES if pos[b][0][i] >= cfg.min_altitude_deg), None)
            if body is None or (body == "moon" and pos["sun"][0][i] > 0):
                continue
            found = find_source(images[i], inner & ~fixed, static, cfg.min_snr)
            if found is not None:
                rows.append((times[i], body, *found[:2], pos[body][0][i], pos[body][1][i], found[2]))
    if not rows:
        return Sightings(np.array([], "datetime64[ns]"), *(np.array([]) for _ in range(6)))
    cols = list(zip(*rows))
    return Sightings(np.array(cols[0], "datetime64[ns]"), np.array(cols[1]),
                     *(np.array(c, np.float64) for c in cols[2:]))  # fmt: skip


# ---------------------------------------------------------------- the fit


@dataclass
class OrientationFit:
    """A fitted orientation and how well it fits."""

    orientation: Orientation
    lens: Lens
    n_used: int
    n_found: int
    rms_px: float
    median_px: float
    rms_deg: float
    max_deg: float
    other_mirror_px: float
    """Median residual (px) of the best fit with the other mirror."""
    forced: bool
    warning: str = ""
    used: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def to_attrs(self) -> dict[str, Any]:
        return {**asdict(self.orientation), "lens": {"center": list(self.lens.center), "radius": self.lens.radius,
                "projection": self.lens.projection, "fov_deg": self.lens.fov_deg},
                "n_used": self.n_used, "n_found": self.n_found, "rms_px": self.rms_px, "median_px": self.median_px,
                "rms_deg": self.rms_deg, "max_deg": self.max_deg, "other_mirror_px": self.other_mirror_px,
                "mirror_forced": self.forced, "warning": self.warning}  # fmt: skip

    def summary(self) -> str:
        o = self.orientation
        return (f"north (azimuth at image up) {o.north_deg:.2f} deg, mirror {'yes' if o.mirror else 'no'}"
                f"{' (forced)' if self.forced else ''}, tilt {o.tilt_deg:.2f} deg towards {o.tilt_azimuth_deg:.0f} "
                f"deg, scale {o.scale:.4f}; {self.n_used} of {self.n_found} sightings, residual rms "
                f"{self.rms_px:.2f} px / {self.rms_deg:.2f} deg (max {self.max_deg:.2f} deg); the other mirror: "
                f"median {self.other_mirror_px:.1f} px")  # fmt: skip


def _orientation(p: np.ndarray, mirror: bool) -> Orientation:
    w = np.array([p[1], p[2]])
    tilt = float(np.hypot(*w))
    taz = float(np.degrees(np.arctan2(w[1], -w[0]))) % 360 if tilt > 0 else 0.0
    return Orientation(float(p[0]) % 360, mirror, float(np.degrees(tilt)), taz, float(np.exp(p[3])))


def _lens(p: np.ndarray, lens: Lens) -> Lens:
    return replace(lens, center=(lens.center[0] + float(p[4]), lens.center[1] + float(p[5])))


def _residuals(p: np.ndarray, mirror: bool, s: Sightings, lens: Lens) -> np.ndarray:
    y, x = altaz_to_pixel(s.alt, s.az, _lens(p, lens), _orientation(p, mirror))
    return np.concatenate([y - s.y, x - s.x])


def _fit_mirror(s: Sightings, lens: Lens, mirror: bool, cfg: OrientConfig) -> tuple[np.ndarray, np.ndarray]:
    """(parameters [north deg, tilt rotvec x, y (rad), log scale, centre dy, dx (px)], kept sightings) for one
    mirror."""
    grid = np.arange(0.0, 360.0, 2.0)
    cost = [np.median(np.hypot(*_residuals(np.array([g, 0, 0, 0, 0, 0]), mirror, s, lens).reshape(2, -1)))
            for g in grid]  # fmt: skip
    p = np.array([grid[int(np.argmin(cost))], 0.0, 0.0, 0.0, 0.0, 0.0])
    free = np.array([True, cfg.fit_tilt, cfg.fit_tilt, cfg.fit_scale, cfg.fit_center, cfg.fit_center])
    t, c = np.radians(cfg.max_tilt_deg), 0.1 * lens.radius
    lo = np.array([-np.inf, -t, -t, np.log(0.8), -c, -c])
    hi = np.array([np.inf, t, t, np.log(1.25), c, c])
    keep = np.ones(len(s), bool)
    for _ in range(3):
        sub = Sightings(*(getattr(s, f)[keep] for f in ("time", "body", "y", "x", "alt", "az", "snr")))

        def fun(q: np.ndarray) -> np.ndarray:
            full = p.copy()
            full[free] = q
            return _residuals(full, mirror, sub, lens)

        res = least_squares(fun, np.clip(p[free], lo[free] + 1e-9, hi[free] - 1e-9), bounds=(lo[free], hi[free]),
                            loss="soft_l1", f_scale=1.0, x_scale=np.array([1.0, 0.01, 0.01, 0.01, 1.0, 1.0])[free])
        p[free] = res.x
        d = np.hypot(*_residuals(p, mirror, s, lens).reshape(2, -1))
        keep = d <= max(3.0 * MAD_TO_SIGMA * float(np.median(d[keep])), 1.5)
    return p, keep


def fit_orientation(s: Sightings, lens: Lens, cfg: OrientConfig | None = None) -> OrientationFit:
    """Least-squares orientation from ``s``; both mirrors unless ``cfg.mirror`` forces one (then ``warning`` says
    when the other fits clearly better)."""
    cfg = cfg or OrientConfig()
    if len(s) < 4:
        raise CirrusError(f"only {len(s)} Sun/Moon sightings in clear frames: the orientation needs at least 4 "
                          "(more nights with the Moon up, or a lower [orient] min_snr)")  # fmt: skip
    fits = {m: _fit_mirror(s, lens, m, cfg) for m in (False, True)}
    med = {m: float(np.median(np.hypot(*_residuals(p, m, s, lens).reshape(2, -1))[keep]))
           for m, (p, keep) in fits.items()}  # fmt: skip
    forced = cfg.mirror != "auto"
    mirror = (cfg.mirror == "yes") if forced else min(med, key=med.get)  # type: ignore[arg-type]
    p, keep = fits[mirror]
    ori = _orientation(p, mirror)
    d_px = np.hypot(*_residuals(p, mirror, s, lens).reshape(2, -1))
    lens = _lens(p, lens)
    alt, az = pixel_to_altaz(s.y, s.x, lens, ori)
    d_deg = separation_deg(alt, az, s.alt, s.az)
    warning = ""
    if forced and med[mirror] > max(3 * med[not mirror], 1.0):
        warning = (f"the forced mirror ({cfg.mirror}) fits worse than the other: median residual {med[mirror]:.1f} px "
                   f"against {med[not mirror]:.1f} px; the image is probably {'not ' if mirror else ''}mirrored "
                   "(set [orient] mirror = \"auto\")")  # fmt: skip
    return OrientationFit(ori, lens, int(keep.sum()), len(s), float(np.sqrt(np.mean(d_px[keep] ** 2))),
                          float(np.median(d_px[keep])), float(np.sqrt(np.mean(d_deg[keep] ** 2))),
                          float(d_deg[keep].max()), med[not mirror], forced, warning, keep)  # fmt: skip


# ---------------------------------------------------------------- the store


def lens_of(attrs: dict[str, Any], url: str = "the store") -> Lens:
    """The lens of a prepared store's attributes; a :class:`CirrusError` when it is not prepared."""
    from cirrus_batch.store import json_attr

    prep = json_attr(attrs, "prepare", {})
    if "geometry" not in prep:
        raise CirrusError(f"{url} has no sky geometry yet: run cirrus prepare first")
    return Lens.from_attrs(prep["geometry"])


def orientation_of(attrs: dict[str, Any], url: str = "the store") -> Orientation:
    """The orientation recorded by ``cirrus orient``; a :class:`CirrusError` when there is none."""
    from cirrus_batch.store import json_attr

    value = json_attr(attrs, ORIENTATION_ATTR)
    if not value:
        raise CirrusError(f"{url} has no camera orientation: run cirrus orient {url} first")
    return Orientation.from_attrs(value)


def camera_model(attrs: dict[str, Any], url: str = "the store") -> tuple[Lens, Orientation]:
    """The lens (as fitted with the orientation: its centre and radius may differ from ``prepare``'s) and the
    orientation of a store; a :class:`CirrusError` when it has not been oriented."""
    ori = orientation_of(attrs, url)
    from cirrus_batch.store import json_attr

    fitted = json_attr(attrs, ORIENTATION_ATTR).get("lens")
    return (Lens.from_attrs(fitted) if fitted else lens_of(attrs, url)), ori


def sky_coords(ds: Any) -> tuple[Any, Any]:
    """Per-pixel ``zenith`` angle and ``azimuth`` (deg) DataArrays (y, x) of an oriented store's dataset
    (``open_dataset``): ``ds.assign_coords(dict(zip(("zenith", "azimuth"), sky_coords(ds))))``."""
    import xarray as xr

    lens, ori = camera_model(ds.attrs)
    yy, xx = np.mgrid[0 : ds.sizes["y"], 0 : ds.sizes["x"]]
    alt, az = pixel_to_altaz(yy, xx, lens, ori)
    return (xr.DataArray((90.0 - alt).astype(np.float32), dims=("y", "x"), name="zenith",
                         attrs={"units": "deg", "long_name": "zenith angle"}),
            xr.DataArray(az.astype(np.float32), dims=("y", "x"), name="azimuth",
                         attrs={"units": "deg", "long_name": "azimuth from north through east"}))  # fmt: skip


def orient_store(url: str, site: SiteConfig | None = None, cfg: OrientConfig | None = None,
                 panel: str | Path | None = None) -> OrientationFit:  # fmt: skip
    """Fit the orientation of the store at ``url`` from its clear frames and record it (and ``site`` when given)
    in its attributes; the caller holds the writer lock. ``panel``: PNG of predicted vs found positions."""
    from cirrus_batch.site import SITE_ATTR, site_attrs, site_from_attrs
    from cirrus_batch.store import Store, open_dataset, set_json_attr

    cfg = cfg or OrientConfig()
    store = Store.open(url)
    if site is not None and site.latitude_deg is not None:
        set_json_attr(store.group.attrs, SITE_ATTR, site_attrs(site))
    ds = open_dataset(url)
    site = site_from_attrs(ds.attrs, url)
    lens = lens_of(ds.attrs, url)
    if "pixel_class" not in ds:
        raise CirrusError(f"{url} has no pixel classes: run cirrus prepare first")
    sky = ds["pixel_class"].values == SKY
    times = ds["time"].values
    pick = np.ones(times.size, bool)
    if "cloudy" in ds and "quality" in ds:
        pick = ~ds["cloudy"].values.astype(bool) & (ds["quality"].values == 0)
    from cirrus_batch.site import body_altaz

    up = np.zeros(times.size, bool)
    for b in BODIES:
        up |= body_altaz(b, times, site)[0] >= cfg.min_altitude_deg
    idx = np.flatnonzero(pick & up)
    if idx.size > cfg.max_frames:
        idx = idx[np.linspace(0, idx.size - 1, cfg.max_frames).round().astype(int)]
    if idx.size == 0:
        raise CirrusError(f"{url}: no clear frame with the Sun or the Moon above {cfg.min_altitude_deg:g} deg")
    images = ds["raw"].isel(time=idx).values
    found = search(images, times[idx], sky, site, cfg)
    fit = fit_orientation(found, lens, cfg)
    set_json_attr(store.group.attrs, ORIENTATION_ATTR, fit.to_attrs())
    if panel is not None:
        orientation_panel(np.median(images, axis=0), found, fit, panel)
    return fit


def orientation_panel(image: np.ndarray, s: Sightings, fit: OrientationFit, out_png: str | Path) -> Path:
    """PNG: found (crosses) and predicted (circles) positions over an image, the azimuth ring; residuals vs zenith
    angle."""
    from cirrus_batch.plots import new_figure, save

    fig = new_figure(11.0, 4.8)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    lo, hi = np.percentile(image, [1, 99.5])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    py, px = altaz_to_pixel(s.alt, s.az, fit.lens, fit.orientation)
    colors = {"sun": "orange", "moon": "deepskyblue"}
    for b in BODIES:
        sel = s.body == b
        if sel.any():
            ax.plot(s.x[sel], s.y[sel], "x", color=colors[b], ms=5, label=f"{b}: found ({sel.sum()})")
            ax.plot(px[sel], py[sel], "o", mfc="none", color="red", ms=6)
    ax.plot([], [], "o", mfc="none", color="red", label="predicted (fit)")
    for az, name in ((0, "N"), (90, "E"), (180, "S"), (270, "W")):
        ty, tx = altaz_to_pixel(np.array(5.0), np.array(float(az)), fit.lens, fit.orientation)
        ax.text(float(tx), float(ty), name, color="yellow", ha="center", va="center", fontsize=10, weight="bold")
    ring = np.linspace(0, 360, 361)
    for alt in (0.0, 30.0, 60.0):
        ry, rx = altaz_to_pixel(np.full(ring.shape, alt), ring, fit.lens, fit.orientation)
        ax.plot(rx, ry, color="yellow", lw=0.5, alpha=0.6)
    ax.set_xlim(0, image.shape[1] - 1)
    ax.set_ylim(image.shape[0] - 1, 0)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"north {fit.orientation.north_deg:.1f}°, mirror {'yes' if fit.orientation.mirror else 'no'}, "
                 f"tilt {fit.orientation.tilt_deg:.2f}°", fontsize=9)  # fmt: skip
    d = np.hypot(py - s.y, px - s.x)
    ax2.scatter(90 - s.alt, d, s=8, c=np.where(fit.used, "k", "r"))
    ax2.set_xlabel("zenith angle (deg)")
    ax2.set_ylabel("|predicted - found| (px)")
    ax2.set_title(f"rms {fit.rms_px:.2f} px = {fit.rms_deg:.2f}° ({fit.n_used} used, red: dropped)", fontsize=9)
    fig.tight_layout()
    return save(fig, out_png)
