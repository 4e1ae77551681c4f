"""Synthetic long-wave infrared (8-14 µm) all-sky camera archive with true cloud masks.

The model (equidistant fisheye, horizon obstacles, zenith-angle clear-sky emissivity, advected fractal
cloud layers, bolometer-like sensor) is described in ``docs/synth.md``. Everything is deterministic
from ``seed``: the camera from ``(seed, 0)``, night *i* from ``(seed, 1, i)``, frame *k* of night *i*
from ``(seed, 2, i, k)``, so nights can be rendered in any order or in parallel.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import ndtri

if TYPE_CHECKING:
    import distributed

KINDS = ("clear", "broken", "cirrus", "overcast", "mixed")

ADU_MAX = 16383
"""14-bit sensor."""
T0 = 273.15
LAPSE = 6.5
"""Temperature lapse rate, K/km."""
H_WATER = 2.0
"""Water-vapour scale height (km): fraction of the clear-sky emission below height h is 1 - exp(-h/H)."""
PATH_SAT = 0.6
"""Effective path growth for the band: m_eff = 1 + PATH_SAT (m - 1) (line saturation)."""
THETA_PLANE_MAX = 85.0
"""Zenith angle (deg) at which the cloud-plane projection is clamped."""
NIGHT_START_H = 19.0
"""UTC hour of the first frame of a night."""
EXPTIME = 0.03


@dataclass
class SynthSummary:
    """What :func:`write_archive` wrote."""

    archive: Path
    truth: Path
    n_images: int
    nights: list[tuple[str, str, int]]
    """(YYYYMMDD, kind, n_images) per night."""


@dataclass(frozen=True)
class Camera:
    """Fixed camera geometry, obstacles and sensor defects (same for every night)."""

    shape: tuple[int, int]
    cy: float
    cx: float
    radius: float
    theta: np.ndarray
    """Zenith angle (deg) per pixel; > 90 outside the fisheye circle."""
    az: np.ndarray
    """Azimuth (rad) per pixel."""
    sky: np.ndarray
    """True sky pixels: inside the circle and above the horizon obstacles (bool)."""
    obstacle_idx: np.ndarray
    """Flat indices of lit non-sky pixels (ridge, buildings, mast, circle rim)."""
    obstacle_dt: np.ndarray
    """Obstacle temperature minus ambient (K) at ``obstacle_idx``."""
    gain: np.ndarray
    """ADU per unit radiance per pixel: global gain x pixel gain x vignetting (0 outside the circle)."""
    col_offset: np.ndarray
    """Fixed column offsets (ADU), shape (W,)."""
    offset: float
    read_noise: float
    hot_idx: np.ndarray
    hot_add: np.ndarray
    """ADU added to the hot pixels (some large enough to saturate)."""


@dataclass(frozen=True)
class Layer:
    """One cloud layer of a night."""

    height_km: float
    strength: float
    """a_layer: opacity of the layer's interior."""
    beta: float
    """Power-spectrum slope P(k) ~ k^-beta."""
    aniso: float
    """Elongation along the wind (1 = isotropic)."""
    edge: float
    """Half-width of the soft edge, in noise standard deviations."""
    texture: float
    """Relative opacity modulation by the texture field."""
    wind_ms: float
    wind_dir: float
    evol_s: float
    """Period (s) of the slow evolution (rotation between two independent fields)."""
    evol_phase: float
    cover: tuple[float, float, float, float]
    """Coverage c(t) = c0 + amp sin(2 pi t / period + phase)."""
    ramp: tuple[float, float] | None = None
    """Coverage ramps in over this span of night fraction (mixed nights)."""


@dataclass(frozen=True)
class Night:
    """Parameters of one night; ``t_s`` are frame times in seconds since ``start``."""

    index: int
    date: str
    kind: str
    start: np.datetime64
    t_s: np.ndarray
    t_amb0: float
    t_rate: float
    """Ambient temperature change, K/h (negative: cooling)."""
    eps_z: tuple[float, float, float, float]
    """Zenith emissivity e0 + amp sin(2 pi t / period + phase)."""
    drift: tuple[float, float, float]
    """Offset drift amplitude (ADU), FFC period (s), phase."""
    layers: tuple[Layer, ...] = field(default_factory=tuple)

    @property
    def times(self) -> np.ndarray:
        return self.start + np.round(self.t_s * 1000).astype("timedelta64[ms]")


# ---------------------------------------------------------------- physics helpers


def band_radiance(t_c: np.ndarray | float) -> np.ndarray | float:
    """8-14 µm band radiance relative to a 0 °C black body, ~ (T/273.15)^4.5."""
    return ((np.asarray(t_c, dtype=np.float32) + T0) / T0) ** 4.5


def air_mass(theta_deg: np.ndarray) -> np.ndarray:
    """Kasten-Young relative air mass (finite at the horizon)."""
    th = np.minimum(theta_deg, 90.0)
    return 1.0 / (np.cos(np.radians(th)) + 0.50572 * (96.07995 - th) ** -1.6364)


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Cubic smoothstep of x clipped to [0, 1]."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def fractal_noise(rng: np.random.Generator, n: int, beta: float, aniso: float = 1.0) -> np.ndarray:
    """Periodic (n, n) Gaussian field with power spectrum ~ k^-beta, unit variance.

    Axis 0 is stretched by ``aniso`` (structures elongated along axis 0).
    """
    ku = np.fft.fftfreq(n)[:, None] * n
    kv = np.fft.rfftfreq(n)[None, :] * n
    k2 = (ku / aniso) ** 2 + kv**2 + 2.0**2
    amp = k2 ** (-beta / 4)
    amp[0, 0] = 0.0
    spec = amp * (rng.standard_normal(amp.shape) + 1j * rng.standard_normal(amp.shape))
    f = np.fft.irfft2(spec, s=(n, n))
    return ((f - f.mean()) / f.std()).astype(np.float32)


def bilinear_wrap(fields: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample periodic fields (C, n, n) at fractional grid coordinates (u, v) -> (C, P)."""
    n = fields.shape[1]
    fu, fv = np.floor(u), np.floor(v)
    wu, wv = (u - fu).astype(np.float32), (v - fv).astype(np.float32)
    i0, j0 = fu.astype(np.intp) % n, fv.astype(np.intp) % n
    i1, j1 = (i0 + 1) % n * n, (j0 + 1) % n
    i0 *= n
    corners = [(i0 + j0, (1 - wu) * (1 - wv)), (i0 + j1, (1 - wu) * wv), (i1 + j0, wu * (1 - wv)), (i1 + j1, wu * wv)]
    out = np.empty((fields.shape[0], u.size), np.float32)
    for c, f in enumerate(fields.reshape(fields.shape[0], -1)):
        out[c] = sum(f.take(idx) * w for idx, w in corners)
    return out


# ---------------------------------------------------------------- camera


def horizon_profile(rng: np.random.Generator, n: int = 1440) -> np.ndarray:
    """Horizon elevation (deg) on an azimuth grid of n samples: ridge 2-12° plus 1-2 buildings/domes."""
    az = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ridge = np.zeros(n)
    for k in range(1, 12):
        ridge += k**-1.4 * np.cos(k * az + rng.uniform(0, 2 * np.pi))
    ridge = 2.0 + 10.0 * (ridge - ridge.min()) / np.ptp(ridge)
    h = ridge
    for _ in range(rng.integers(1, 3)):
        c, w, top = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(8, 18)), rng.uniform(10, 25)
        d = np.angle(np.exp(1j * (az - c))) / (w / 2)
        dome = rng.random() < 0.5
        roof = np.clip(1 - d**2, 0, 1) ** 0.2 if dome else 1.0
        h = np.maximum(h, np.where(np.abs(d) < 1, top * roof, 0))
    return h


def make_camera(shape: tuple[int, int], seed: int) -> Camera:
    """Geometry, obstacles and fixed sensor defects of the camera, from ``(seed, 0)``."""
    rng = np.random.default_rng([seed, 0])
    ny, nx = shape
    cy = (ny - 1) / 2 + rng.uniform(-0.02, 0.02) * ny
    cx = (nx - 1) / 2 + rng.uniform(-0.02, 0.02) * nx
    radius = 0.49 * min(ny, nx)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    theta = 90.0 * r / radius
    az = np.arctan2(dx, -dy) % (2 * np.pi)  # north up, east right (as seen from below: mirror ignored)

    prof = horizon_profile(rng)
    az_grid = np.linspace(0, 2 * np.pi, prof.size, endpoint=False)
    h_az = np.interp(az, az_grid, prof, period=2 * np.pi)
    elev = 90.0 - theta
    # mast: a radial segment of (perspective-widening) width from the horizon up to 30-50° elevation
    az_m, top_m = rng.uniform(0, 2 * np.pi), rng.uniform(30, 50)
    half_w = max(0.6, 0.004 * radius) * (1 + 1.5 * (r / radius) ** 2)
    dist = r * np.abs(np.sin(az - az_m))
    mast = (np.cos(az - az_m) > 0) & (dist < half_w) & (elev < top_m)
    sky = (r < radius) & (elev > h_az) & ~mast

    lit = r < radius + 1.5
    obstacle = lit & ~sky
    # ridge slightly colder (distant, hazy), buildings and mast slightly warmer, plus static texture
    dt_map = np.where(h_az > 12.5, 1.0, -1.5) + 0.4 * _smooth_noise(rng, shape, 4.0)
    dt_map = np.where(mast, 0.5, dt_map)
    obstacle_idx = np.flatnonzero(obstacle)

    vignette = np.clip((radius + 1.5 - r) / 3.0, 0, 1) * (1 - 0.12 * np.clip(r / radius, 0, 1) ** 4)
    gain0 = rng.uniform(8200, 8800)
    gain = (gain0 * vignette * (1 + 0.01 * rng.standard_normal(shape))).astype(np.float32)
    n_hot = max(1, round(2e-4 * ny * nx))
    hot_idx = rng.choice(ny * nx, n_hot, replace=False)
    hot_add = np.where(rng.random(n_hot) < 0.4, ADU_MAX, rng.uniform(1500, 8000, n_hot))
    return Camera(
        shape=(ny, nx), cy=cy, cx=cx, radius=radius,
        theta=theta.astype(np.float32), az=az.astype(np.float32), sky=sky,
        obstacle_idx=obstacle_idx, obstacle_dt=dt_map.ravel()[obstacle_idx].astype(np.float32),
        gain=gain, col_offset=(6.0 * rng.standard_normal(nx)).astype(np.float32),
        offset=float(rng.uniform(1500, 2200)), read_noise=float(rng.uniform(15, 25)),
        hot_idx=hot_idx, hot_add=hot_add.astype(np.float32),
    )  # fmt: skip


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float) -> np.ndarray:
    n = int(2 ** np.ceil(np.log2(max(shape))))
    return fractal_noise(rng, n, beta)[: shape[0], : shape[1]]


# ---------------------------------------------------------------- nights


def _layer(rng: np.random.Generator, kind: str) -> Layer:
    wind_dir = rng.uniform(0, 2 * np.pi)
    evol = rng.uniform(0, 2 * np.pi)
    if kind == "cirrus":
        return Layer(
            height_km=rng.uniform(8, 10), strength=rng.uniform(0.2, 0.45), beta=3.5, aniso=4.0,
            edge=0.12, texture=0.3, wind_ms=rng.uniform(6, 18), wind_dir=wind_dir,
            evol_s=rng.uniform(4, 8) * 3600, evol_phase=evol,
            cover=(rng.uniform(0.45, 0.65), 0.15, rng.uniform(3, 6) * 3600, rng.uniform(0, 2 * np.pi)),
        )  # fmt: skip
    if kind == "overcast":
        return Layer(
            height_km=rng.uniform(0.8, 2.0), strength=rng.uniform(0.95, 1.0), beta=3.0, aniso=1.3,
            edge=0.10, texture=0.1, wind_ms=rng.uniform(2, 8), wind_dir=wind_dir,
            evol_s=rng.uniform(3, 6) * 3600, evol_phase=evol,
            cover=(rng.uniform(0.92, 0.96), 0.03, rng.uniform(3, 6) * 3600, rng.uniform(0, 2 * np.pi)),
        )  # fmt: skip
    # broken low cumulus
    return Layer(
        height_km=rng.uniform(1.0, 3.0), strength=rng.uniform(0.9, 1.0), beta=3.4, aniso=1.2,
        edge=0.08, texture=0.15, wind_ms=rng.uniform(2, 8), wind_dir=wind_dir,
        evol_s=rng.uniform(2, 4) * 3600, evol_phase=evol,
        cover=(rng.uniform(0.25, 0.45), 0.1, rng.uniform(2, 5) * 3600, rng.uniform(0, 2 * np.pi)),
    )  # fmt: skip


def make_night(
    seed: int, index: int, kind: str, start: str, per_night: int, cadence_min: float
) -> Night:
    """Parameters of night ``index`` (evening date ``start`` + index days), from ``(seed, 1, index)``."""
    if kind not in KINDS:
        raise ValueError(f"unknown night kind {kind!r}; expected one of {KINDS}")
    rng = np.random.default_rng([seed, 1, index])
    day = np.datetime64(start, "D") + np.timedelta64(index, "D")
    t0 = day + np.timedelta64(int(NIGHT_START_H * 3600), "s")
    jitter = min(4.0, 0.2 * cadence_min * 60)
    t_s = np.arange(per_night) * cadence_min * 60 + rng.uniform(0, jitter, per_night)
    layers: tuple[Layer, ...] = ()
    if kind in ("broken", "cirrus", "overcast"):
        layers = (_layer(rng, kind),)
    elif kind == "mixed":
        hi = _layer(rng, "cirrus")
        lo = _layer(rng, "broken")
        layers = (
            Layer(**{**hi.__dict__, "ramp": (0.25, 0.55)}),
            Layer(**{**lo.__dict__, "ramp": (0.5, 0.8)}),
        )
    return Night(
        index=index, date=str(day).replace("-", ""), kind=kind, start=t0, t_s=np.round(t_s, 3),
        t_amb0=rng.uniform(0, 15), t_rate=-rng.uniform(0.2, 0.5),
        eps_z=(rng.uniform(0.2, 0.38), rng.uniform(0.01, 0.03), rng.uniform(4, 8) * 3600,
               rng.uniform(0, 2 * np.pi)),
        drift=(rng.uniform(15, 40), rng.uniform(10, 20) * 60, rng.uniform(0, 2 * np.pi)),
        layers=layers,
    )  # fmt: skip


# ---------------------------------------------------------------- rendering


@dataclass
class _LayerState:
    layer: Layer
    fields: np.ndarray
    """(3, n, n): two evolution fields and a texture field."""
    u: np.ndarray
    v: np.ndarray
    """Grid coordinates of the sky pixels (u along the wind)."""
    f_below: float
    t_cloud_offset: float
    """T_cloud - T_amb (K)."""
    cells_per_m: float


class NightRenderer:
    """Renders the frames of one night: raw ADU, true mask, noise-free clear-sky counts."""

    def __init__(self, cam: Camera, night: Night, seed: int):
        self.cam, self.night, self.seed = cam, night, seed
        self.sky_idx = np.flatnonzero(cam.sky)
        th = cam.theta.ravel()[self.sky_idx]
        self.m_eff = (1 + PATH_SAT * (air_mass(th) - 1)).astype(np.float32)
        self.m_geo = np.minimum(1 / np.cos(np.radians(np.minimum(th, 89.0))), 5.0).astype(np.float32)
        tan_t = np.tan(np.radians(np.minimum(th, THETA_PLANE_MAX)))
        az = cam.az.ravel()[self.sky_idx]
        rng = np.random.default_rng([seed, 3, night.index])
        n = 256 if max(cam.shape) <= 128 else 512
        self.layers = []
        for lay in night.layers:
            fields = np.stack(
                [fractal_noise(rng, n, lay.beta, lay.aniso) for _ in range(2)]
                + [fractal_noise(rng, n, 2.2, 3 * lay.aniso)]
            )
            domain_m = 16_000.0 * lay.height_km
            rho = lay.height_km * 1000 * tan_t
            x, y = rho * np.sin(az), rho * np.cos(az)
            c, s = np.cos(lay.wind_dir), np.sin(lay.wind_dir)
            cells = n / domain_m
            self.layers.append(
                _LayerState(
                    layer=lay, fields=fields, u=(x * c + y * s) * cells, v=(-x * s + y * c) * cells,
                    f_below=1 - np.exp(-lay.height_km / H_WATER), t_cloud_offset=-LAPSE * lay.height_km,
                    cells_per_m=cells,
                )  # fmt: skip
            )

    def conditions(self, k: int) -> tuple[float, float, float]:
        """(T_amb °C, zenith emissivity, offset drift ADU) of frame k."""
        nt, t = self.night, float(self.night.t_s[k])
        t_amb = nt.t_amb0 + nt.t_rate * t / 3600 + 0.2 * np.sin(t / 2400 + nt.index)
        e0, ea, ep, eph = nt.eps_z
        eps = e0 + ea * np.sin(2 * np.pi * t / ep + eph)
        amp, per, ph = nt.drift
        drift = amp * (2 * ((t / per + ph / (2 * np.pi)) % 1.0) - 1) * 0.5 + amp * 0.5 * np.sin(t / 900 + ph)
        return float(t_amb), float(eps), float(drift)

    def _coverage(self, lay: Layer, k: int) -> float:
        t = float(self.night.t_s[k])
        c0, amp, per, ph = lay.cover
        c = c0 + amp * np.sin(2 * np.pi * t / per + ph)
        if lay.ramp is not None:
            n = len(self.night.t_s)
            frac = k / max(n - 1, 1)
            c *= float(smoothstep(np.asarray((frac - lay.ramp[0]) / (lay.ramp[1] - lay.ramp[0]))))
        return float(np.clip(c, 0.0, 0.999))

    def clear_radiance(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Full-frame radiance without clouds (obstacles + clear sky) and the sky pixels' log transmittance."""
        t_amb, eps_z, _ = self.conditions(k)
        l_amb = float(band_radiance(t_amb))
        rad = np.zeros(self.cam.shape[0] * self.cam.shape[1], np.float32)
        rad[self.cam.obstacle_idx] = 0.95 * band_radiance(t_amb + self.cam.obstacle_dt)
        log_t = self.m_eff * np.float32(np.log1p(-eps_z))
        rad[self.sky_idx] = (1 - np.exp(log_t)) * l_amb
        return rad, log_t

    def render(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw uint16 image, true mask uint8) of frame k."""
        rad, log_t = self.clear_radiance(k)
        t_amb, _, drift = self.conditions(k)
        l_amb = float(band_radiance(t_amb))
        l_sky = rad[self.sky_idx]
        cloud = np.zeros(self.sky_idx.size, bool)
        t = float(self.night.t_s[k])
        for st in self.layers:  # highest layer first (layers are ordered high -> low)
            lay = st.layer
            cov = self._coverage(lay, k)
            if cov <= 0:
                continue
            thr = float(ndtri(1 - cov))
            shift = lay.wind_ms * t * st.cells_per_m
            f = bilinear_wrap(st.fields, st.u - shift, st.v)
            ph = 2 * np.pi * t / lay.evol_s + lay.evol_phase
            noise = np.float32(np.cos(ph)) * f[0] + np.float32(np.sin(ph)) * f[1]
            edge = smoothstep((noise - thr) / (2 * lay.edge) + 0.5)
            tex = 1 - lay.texture * smoothstep(0.5 + 0.3 * f[2])
            alpha = lay.strength * edge * tex
            alpha = 1 - (1 - alpha) ** self.m_geo  # slant path through the layer
            t_below = np.exp(st.f_below * log_t)
            l_cloud = (1 - t_below) * l_amb + t_below * float(band_radiance(t_amb + st.t_cloud_offset))
            l_sky = (1 - alpha) * l_sky + alpha * l_cloud
            cloud |= noise > thr
        rad[self.sky_idx] = l_sky
        rng = np.random.default_rng([self.seed, 2, self.night.index, k])
        adu = self.counts(rad, drift)
        adu += self.cam.read_noise * rng.standard_normal(adu.shape, dtype=np.float32)
        adu[self.cam.hot_idx] += self.cam.hot_add
        mask = np.zeros(rad.size, np.uint8)
        mask[self.sky_idx] = cloud
        shape = self.cam.shape
        return np.clip(np.rint(adu), 0, ADU_MAX).astype(np.uint16).reshape(shape), mask.reshape(shape)

    def counts(self, rad: np.ndarray, drift: float) -> np.ndarray:
        """Noise-free ADU (flat float32) of a flat radiance frame: offset + drift + column FPN + gain x L."""
        base = np.float32(self.cam.offset + drift) + np.tile(self.cam.col_offset, self.cam.shape[0])
        return base + self.cam.gain.ravel() * rad


# ---------------------------------------------------------------- files


def write_fits(path: str | Path, data: np.ndarray, header: dict[str, Any], compress: bool = False) -> None:
    """Write one image: plain FITS (uint16 as int16 + BZERO=32768) or RICE tile-compressed ``.fits.fz``.

    ``header`` values may be ``(value, comment)`` tuples.
    """
    from astropy.io import fits

    hdr = fits.Header()
    for key, value in header.items():
        hdr[key] = value
    if compress:
        hdul = fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, hdr, compression_type="RICE_1")])
    else:
        hdul = fits.HDUList([fits.PrimaryHDU(data, hdr)])
    hdul.writeto(path, overwrite=True)


def read_fits(path: str | Path) -> tuple[np.ndarray, Any]:
    """(data, header) of the first image HDU of a plain or compressed FITS file."""
    from astropy.io import fits

    with fits.open(path) as hdul:
        hdu = next(h for h in hdul if h.data is not None)
        return np.asarray(hdu.data), hdu.header


def default_truth_path(dest: str | Path) -> Path:
    """``DEST_truth.zarr`` beside the archive."""
    return Path(str(dest).rstrip("/") + "_truth.zarr")


def _relpath(night: Night, k: int, camera: str, compress: bool) -> str:
    stamp = night.times[k].astype("datetime64[s]").item().strftime("%Y%m%dT%H%M%S")
    ext = ".fits.fz" if compress else ".fits"
    return f"{night.date[:4]}/{night.date}/{camera}_{stamp}{ext}"


def _header(night: Night, k: int, t_amb: float, camera: str) -> dict[str, Any]:
    return {
        "DATE-OBS": (str(night.times[k]), "UTC start of exposure"),
        "EXPTIME": (EXPTIME, "[s] integration time"),
        "AMBTEMP": (round(t_amb, 2), "[deg C] ambient air temperature"),
        "INSTRUME": (camera, "LWIR 8-14 um all-sky camera"),
        "OBSERVAT": ("CIRRUS synthetic site", "cirrus_batch.synth"),
        "BUNIT": ("ADU", "14-bit counts"),
    }


def render_night(
    dest: str | Path, truth: str | Path, night: Night, offset: int, *, seed: int, shape: tuple[int, int],
    camera: str, compress: bool, bar: Any = None,
) -> tuple[str, str, int]:
    """Write the FITS files of one night and its region ``offset:offset+n`` of the truth store."""
    import xarray as xr

    dest = Path(dest)
    cam = make_camera(shape, seed)
    renderer = NightRenderer(cam, night, seed)
    n = len(night.t_s)
    masks = np.zeros((n, *shape), np.uint8)
    for k in range(n):
        raw, masks[k] = renderer.render(k)
        rel = _relpath(night, k, camera, compress)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        write_fits(dest / rel, raw, _header(night, k, renderer.conditions(k)[0], camera), compress)
        if bar is not None:
            bar.update(1)
    frac = (masks.reshape(n, -1)[:, cam.sky.ravel()].mean(axis=1)).astype(np.float32)
    region = xr.Dataset({"mask": (("time", "y", "x"), masks), "cloud_fraction": ("time", frac)})
    region.to_zarr(truth, region={"time": slice(offset, offset + n)}, zarr_format=3, consolidated=False)
    return night.date, night.kind, n


def _init_truth(truth: Path, nights: list[Night], cam: Camera, camera: str, compress: bool) -> None:
    import dask.array as da
    import xarray as xr

    times = np.concatenate([nt.times for nt in nights]).astype("datetime64[ns]")
    if np.any(np.diff(times) <= np.timedelta64(0)):
        raise ValueError("nights overlap: per_night x cadence_min must be shorter than a day")
    per = max(len(nights[0].t_s), 1)
    ny, nx = cam.shape
    n = times.size

    def per_frame(values: list[str]) -> tuple[str, np.ndarray]:
        return ("time", np.array(values, dtype=object))

    ds = xr.Dataset(
        {
            "mask": (("time", "y", "x"), da.zeros((n, ny, nx), dtype=np.uint8, chunks=(1, ny, nx))),
            "sky": (("y", "x"), cam.sky.astype(np.uint8)),
            "cloud_fraction": ("time", da.full(n, np.nan, dtype=np.float32, chunks=per)),
            "night_kind": per_frame([nt.kind for nt in nights for _ in nt.t_s]),
            "night": per_frame([nt.date for nt in nights for _ in nt.t_s]),
            "source": per_frame(
                [_relpath(nt, k, camera, compress) for nt in nights for k in range(len(nt.t_s))]
            ),
        },
        coords={"time": times},
        attrs={"description": "true cloud masks of a cirrus_batch.synth archive (1 = cloud)"},
    )
    ds["mask"].attrs["description"] = "1 = cloud (layer noise above the coverage threshold), 0 elsewhere"
    ds["sky"].attrs["description"] = "1 = valid sky: inside the fisheye circle and above obstacles"
    ds.to_zarr(
        truth, mode="w", compute=False, zarr_format=3, consolidated=False,
        encoding={"time": {"units": "microseconds since 1970-01-01", "dtype": "int64"},
                  "mask": {"chunks": (1, ny, nx), "_FillValue": None}, "sky": {"_FillValue": None},
                  "cloud_fraction": {"chunks": (per,)}},
    )  # fmt: skip


def write_archive(
    dest: str | Path, *, nights: int = 5, per_night: int = 60, cadence_min: float = 2.0,
    shape: tuple[int, int] = (512, 640), seed: int = 0, start: str = "2026-01-05",
    kinds: Sequence[str] | None = None, compress: bool = False, camera: str = "lwircam",
    truth: str | Path | None = None, client: distributed.Client | None = None, progress: bool = True,
) -> SynthSummary:  # fmt: skip
    """Write a synthetic archive ``DEST/YYYY/YYYYMMDD/<camera>_YYYYMMDDTHHMMSS.fits`` and its truth store.

    Night i has kind ``kinds[i]`` (default: ``KINDS[i % 5]``). With ``client``, nights render as
    parallel Dask tasks (one per night); the output is identical to the serial one.
    """
    from tqdm.auto import tqdm

    if nights < 1 or per_night < 1 or cadence_min <= 0:
        raise ValueError("nights and per_night must be >= 1 and cadence_min > 0")
    kinds = list(kinds) if kinds is not None else [KINDS[i % len(KINDS)] for i in range(nights)]
    if len(kinds) != nights:
        raise ValueError(f"kinds has {len(kinds)} entries for {nights} nights")
    dest = Path(dest).absolute()
    truth = Path(truth).absolute() if truth is not None else default_truth_path(dest)
    shape = (int(shape[0]), int(shape[1]))
    specs = [make_night(seed, i, kinds[i], start, per_night, cadence_min) for i in range(nights)]
    dest.mkdir(parents=True, exist_ok=True)
    _init_truth(truth, specs, make_camera(shape, seed), camera, compress)
    common = dict(seed=seed, shape=shape, camera=camera, compress=compress)
    offsets = [i * per_night for i in range(nights)]
    done: list[tuple[str, str, int]]
    if client is None:
        with tqdm(total=nights * per_night, unit="img", file=sys.stderr, disable=not progress) as bar:
            done = [render_night(dest, truth, nt, off, bar=bar, **common) for nt, off in zip(specs, offsets)]
    else:
        from distributed import as_completed

        futures = client.map(
            render_night, [dest] * nights, [truth] * nights, specs, offsets, pure=False, **common
        )
        with tqdm(total=nights, unit="night", file=sys.stderr, disable=not progress) as bar:
            for _ in as_completed(futures):
                bar.update(1)
        done = client.gather(futures)
    return SynthSummary(archive=dest, truth=truth, n_images=nights * per_night, nights=list(done))


# ---------------------------------------------------------------- montage


def _pick_frames(kinds: np.ndarray, fractions: np.ndarray, n: int) -> list[int]:
    """One frame per kind (the most representative), then extra frames from the cloudiest nights."""
    picks: list[int] = []
    for kind in KINDS:
        idx = np.flatnonzero(kinds == kind)
        if idx.size:
            if kind == "mixed":  # a frame late in the night when both layers are present
                picks.append(int(idx[int(0.85 * (idx.size - 1))]))
            else:
                picks.append(int(idx[idx.size // 2]))
    rest = [i for i in np.argsort(-np.abs(fractions - 0.5)) if i not in picks]
    mixed = np.flatnonzero(kinds == "mixed")
    extra = [int(mixed[int(0.45 * (mixed.size - 1))])] if mixed.size else []
    for i in extra + [int(i) for i in rest]:
        if len(picks) >= n:
            break
        if i not in picks:
            picks.append(i)
    return sorted(picks[:n])


def montage(dest: str | Path, out_png: str | Path, n: int = 6, truth: str | Path | None = None) -> Path:
    """PNG of n frames across night kinds: raw image (top, linear stretch) and true mask (bottom)."""
    from cirrus_batch.plots import new_figure, save
    import xarray as xr

    dest = Path(dest)
    truth = Path(truth) if truth is not None else default_truth_path(dest)
    ds = xr.open_zarr(truth, consolidated=False)
    kinds = np.array(ds["night_kind"].values.tolist())
    picks = _pick_frames(kinds, ds["cloud_fraction"].values, n)
    sky = ds["sky"].values.astype(bool)
    fig = new_figure(2.6 * len(picks), 5.0)
    axes = fig.subplots(2, len(picks), squeeze=False)
    for col, i in enumerate(picks):
        raw, _ = read_fits(dest / str(ds["source"].values[i]))
        raw = raw.astype(np.float32)
        lo, hi = np.percentile(raw[sky], 1), np.percentile(raw, 99.9)
        axes[0, col].imshow(raw, cmap="inferno", vmin=lo - 0.1 * (hi - lo), vmax=hi)
        mask = ds["mask"][i].values
        axes[1, col].imshow(np.where(sky, 1 + mask, 0), cmap="Blues_r", vmin=-0.5, vmax=2.2)
        stamp = np.datetime_as_string(ds["time"].values[i], unit="m").replace("T", " ")
        axes[0, col].set_title(f"{kinds[i]}\n{stamp}Z", fontsize=9)
        axes[1, col].set_title(f"true mask, cf={float(ds['cloud_fraction'].values[i]):.2f}", fontsize=8)
        for ax in axes[:, col]:
            ax.set_axis_off()
    fig.tight_layout()
    return save(fig, out_png, dpi=80)
