"""Clear-sky model: what a cloudless sky gives at every zenith angle, in units of the ambient black body.

Per image *i*, with ``A_i`` the ambient reference (median of the pixels that see housing, ground or obstacles at
about air temperature; see :mod:`cirrus_batch.geometry`) and ``S_i`` the ADU span of a black body at ambient
temperature above zero radiance, every sky pixel's brightness relative to the ambient black body is

    e = 1 - (A_i - raw) / S_i                                  (≈ effective emissivity; 1 = ambient)

``S_i = A_i - D_i`` where signal-free pixels outside the image circle give the offset ``D_i``; else
``S_i = G L(T_i)``, with ``L`` the 8-14 µm band radiance of the ambient temperature ``T_i`` (header) and the gain
``G`` fitted over the season (``A_i = Z + G L(T_i)``); per-image differences ``A_i - raw`` cancel offset drifts
and flat-field-correction jumps. The clear sky is a grey body whose emissivity grows with the slant path
(Aebi et al. 2018, AMT 11, 5549; Wang et al. 2021, Remote Sens. 13, 1852):

    e_clear(θ; ε0) = W(θ) [1 - (1 - ε0) ** (m(θ) ** p)]

``m`` the Kasten-Young air mass, ``p`` (band saturation) and ``W(θ)`` (vignetting, ``W = 1`` near the zenith)
fitted once on the season's clear frames, and ``ε0`` (zenith emissivity: humidity) the one parameter per image.
It is bounded by the range the season's clear frames show (never above ``eps_cap``), fitted one-sided (clouds
only add radiance), and may not exceed the night's clear-sky trend: a flat warm deck is cloud, never a humid
clear sky. The season's clear frames are searched among up to ``search_images`` frames, so a season where
they are rare still has them; with none at all the physical shape alone is used, and said so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from cirrus_batch.geometry import SkyGeometry
from cirrus_batch.radiometry import NODATA, air_mass, band_radiance

EPS_SOURCES = {"fit": 0, "night": 1, "season": 2}
"""Where an image's ε0 comes from: its own fit, the night's clear-sky trend, the season's typical value."""
EXPONENTS = np.round(np.arange(0.35, 1.051, 0.05), 3)


@dataclass
class ClearSkyConfig:
    """The clear-sky model (``[prepare.clear]``)."""

    use_temperature: bool = True
    """Tie the clear-sky level to the ambient temperature in the header (when there is no signal-free pixel)."""
    search_images: int = 600
    """Frames spread over the season searched for clear frames (only their profiles are kept)."""
    bin_deg: float = 1.0
    """Zenith-angle bin (deg) of the profiles."""
    eps_cap: float = 0.75
    """Physical upper bound of the clear-sky zenith emissivity in 8-14 µm (very humid air ~0.6)."""
    eps_margin: float = 0.04
    """The per-image ε0 may leave the range of the season's clear frames by this much."""
    min_rise: float = 0.05
    """A clear frame's brightness rises at least this much (ambient units) from the zenith to 65°."""
    clear_sigma: float = 4.0
    """A pixel more than this many sigmas above the clear sky is cloud when judging frames clear."""
    clear_max_cloud: float = 0.01
    """Frames with at most this fraction of such pixels are clear (they set the night's trend)."""
    trend_hours: float = 1.5
    """Half-width (h) of the window of the night's clear-sky trend of ε0."""
    trend_tol: float = 0.03
    """An image's ε0 may exceed its night's trend by this much (more is cloud)."""
    season_tol: float = 0.05
    """The same against the season's typical ε0, for nights without a clear frame."""
    night_gap_hours: float = 3.0
    """A gap this long between frames starts a new night."""
    min_clear: int = 3
    """Clear frames needed to fit W(θ) and p; fewer: the physical shape alone (low confidence)."""
    fit_stride: int = 4
    """Per-image fits use every fit_stride-th sky pixel."""
    fit_iter: int = 6
    """Iterations of the one-sided robust fit."""
    clip_sigma: float = 3.0
    """Pixels above the fit by more than this many sigmas leave the next iteration."""

    def __post_init__(self) -> None:
        for key in ("search_images", "min_clear", "fit_stride", "fit_iter"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 < self.eps_cap < 1.0:
            raise ValueError(f"eps_cap must be in (0, 1), got {self.eps_cap}")
        if not 0.1 <= self.bin_deg <= 10:
            raise ValueError(f"bin_deg must be in [0.1, 10], got {self.bin_deg}")
        for key in ("eps_margin", "min_rise", "clear_max_cloud", "trend_tol", "season_tol"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("clear_sigma", "trend_hours", "night_gap_hours", "clip_sigma"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")


# ---------------------------------------------------------------- scale: ADU -> ambient units


@dataclass
class Scale:
    """How ``S_i`` (ADU of an ambient black body above zero radiance) is known."""

    source: str
    """``dark`` (A - D per image), ``temperature`` (G L(T)) or ``assumed`` (a constant: no offset, no temperature)."""
    gain: float = 0.0
    t_ref: float = 0.0

    def span(self, ambient: np.ndarray, dark: np.ndarray, temps: np.ndarray) -> np.ndarray:
        """(n,) S_i of images with ambient levels, dark levels and temperatures."""
        ambient = np.asarray(ambient, np.float64)
        if self.source == "dark":
            s = ambient - np.asarray(dark, np.float64)
            ok = np.isfinite(s) & (s > 0)
            return np.where(ok, s, np.median(s[ok]) if ok.any() else 1.0)
        if self.source == "temperature":
            t = np.asarray(temps, np.float64)
            return self.gain * band_radiance(np.where(np.isfinite(t), t, self.t_ref))
        return np.full(ambient.shape, self.gain)


def fit_scale(ambient: np.ndarray, dark: np.ndarray, temps: np.ndarray, zenith_deficit: np.ndarray,
              cfg: ClearSkyConfig) -> Scale:  # fmt: skip
    """The season's :class:`Scale` from per-image ambient and dark levels, temperatures and the zenith deficits
    ``A_i - raw`` (ADU) of the sample."""
    ambient, dark, temps = (np.asarray(a, np.float64) for a in (ambient, dark, temps))
    ok_t = np.isfinite(temps)
    t_ref = float(np.median(temps[ok_t])) if ok_t.any() else 0.0
    if np.isfinite(dark).mean() > 0.8 and np.median((ambient - dark)[np.isfinite(dark)]) > 0:
        return Scale("dark", 0.0, t_ref)
    if cfg.use_temperature and ok_t.mean() >= 0.8:
        lrad = band_radiance(temps[ok_t])
        if np.ptp(lrad) / np.mean(lrad) > 0.03:
            a = ambient[ok_t]
            i, j = np.triu_indices(lrad.size, 1)
            pick = np.abs(lrad[i] - lrad[j]) > 0.01 * np.mean(lrad)
            if pick.sum() >= 3:
                gain = float(np.median((a[i] - a[j])[pick] / (lrad[i] - lrad[j])[pick]))  # Theil-Sen slope
                if gain > 0:
                    return Scale("temperature", gain, t_ref)
    deficit = np.asarray(zenith_deficit, np.float64)
    deficit = deficit[np.isfinite(deficit)]
    gain = float(np.percentile(deficit, 95)) / 0.8 if deficit.size else 1.0  # the driest frames: ε0 ≈ 0.2
    return Scale("assumed", max(gain, 1.0), t_ref)


def levels(raw: np.ndarray, geom: SkyGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(n,) ambient reference A_i and dark level D_i (NaN without dark pixels) of raw images (n, y, x)."""
    raw3 = np.asarray(raw).reshape(-1, raw.shape[-2] * raw.shape[-1])
    amb = np.flatnonzero(geom.ambient)
    amb = amb[:: max(1, amb.size // 20000)]
    drk = np.flatnonzero(geom.dark)
    drk = drk[:: max(1, drk.size // 20000)]
    a = np.empty(raw3.shape[0])
    d = np.full(raw3.shape[0], np.nan)
    for i, flat in enumerate(raw3):
        v = flat[amb]
        v = v[v != NODATA]
        a[i] = float(np.median(v)) if v.size else np.nan
        if drk.size:
            w = flat[drk]
            w = w[w != NODATA]
            d[i] = float(np.median(w)) if w.size else np.nan
    return a, d


# ---------------------------------------------------------------- the model


def _shape(theta: np.ndarray, eps: np.ndarray, p: float) -> np.ndarray:
    """(n_eps, n_theta) physical clear-sky emissivity 1 - (1 - ε0) ** (m(θ) ** p)."""
    mp = air_mass(theta) ** p
    return 1.0 - (1.0 - np.asarray(eps, np.float64)[:, None]) ** mp[None, :]


@dataclass
class ClearSkyModel:
    """e_clear(θ; ε0) = W(θ) [1 - (1 - ε0) ** (m(θ) ** p)]; per-bin noise ``sigma`` (ambient units)."""

    theta: list[float]
    weight: list[float]
    """W(θ) per bin (1 near the zenith)."""
    sigma: list[float]
    exponent: float
    eps_lo: float
    eps_hi: float
    eps_typical: float
    scale: dict[str, Any]
    n_clear: int
    prior_only: bool = False
    """No clear frame was found: W = 1, p = 0.6, bounds from physics alone (low confidence)."""
    clear_eps: list[float] = field(default_factory=list)
    """ε0 of the clear frames the model was fitted on."""

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> ClearSkyModel:
        return cls(**{k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs})

    @property
    def scaler(self) -> Scale:
        return Scale(**self.scale)

    def profile(self, eps: float | np.ndarray) -> np.ndarray:
        """Clear-sky brightness per bin: (n_bins,) for a scalar ε0, (n, n_bins) for an array."""
        e = np.atleast_1d(np.asarray(eps, np.float64))
        out = np.asarray(self.weight)[None, :] * _shape(np.asarray(self.theta), e, self.exponent)
        return out[0] if np.ndim(eps) == 0 else out


def _bins(theta: np.ndarray, bin_deg: float) -> tuple[np.ndarray, int]:
    nb = int(np.ceil(90.0 / bin_deg))
    return np.minimum((theta / bin_deg).astype(int), nb - 1), nb


@dataclass
class Profiles:
    """Per-image reference levels and per-bin quantiles of the deficit ``A_i - raw`` (ADU) of a sample."""

    ambient: np.ndarray
    dark: np.ndarray
    temps: np.ndarray
    deficit: np.ndarray
    """(3, n, n_bins) deficit quantiles 90 %, 50 %, 25 % (= brightness quantiles 10 %, 50 %, 75 %)."""
    theta: np.ndarray

    def brightness(self, span: np.ndarray) -> np.ndarray:
        """(3, n, n_bins) brightness quantiles 10 %, 50 %, 75 % for spans S_i."""
        return 1.0 - self.deficit / np.asarray(span)[None, :, None]


def profiles(raw: np.ndarray, temps: np.ndarray, geom: SkyGeometry, cfg: ClearSkyConfig) -> Profiles:
    """:class:`Profiles` of raw images (n, y, x); concatenate blocks with :func:`concat_profiles`."""
    raw3 = np.asarray(raw).reshape(-1, *geom.shape)
    a, d = levels(raw3, geom)
    sky_idx = np.flatnonzero(geom.sky)
    b, nb = _bins(geom.zenith.ravel()[sky_idx], cfg.bin_deg)
    order = np.argsort(b, kind="stable")
    sb, pix = b[order], sky_idx[order]
    counts = np.bincount(sb, minlength=nb)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ok = counts > 0
    out = np.full((3, raw3.shape[0], nb), np.nan)
    for i, img in enumerate(raw3):
        v = img.ravel()[pix]
        bad = v == NODATA
        dv = a[i] - v.astype(np.float64)
        dv[bad] = np.nan
        dv = np.sort(dv + sb * 1e7) - sb * 1e7  # sorted within bins (NaN last)
        for j, q in enumerate((0.9, 0.5, 0.25)):
            pos = starts + np.floor(q * (counts - 1)).astype(int)
            out[j, i, ok] = dv[pos[ok]]
    theta = (np.arange(nb) + 0.5) * cfg.bin_deg
    return Profiles(a, d, np.asarray(temps, np.float64).reshape(-1), out, theta)


def concat_profiles(parts: list[Profiles]) -> Profiles:
    return Profiles(
        np.concatenate([p.ambient for p in parts]), np.concatenate([p.dark for p in parts]),
        np.concatenate([p.temps for p in parts]), np.concatenate([p.deficit for p in parts], axis=1),
        parts[0].theta,
    )  # fmt: skip


def _fit_eps(prof: np.ndarray, weight: np.ndarray, theta: np.ndarray, p: float, inv_sig: np.ndarray,
             lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Least-squares ε0 of profiles (n, nb) (NaN bins ignored) on a grid in [lo, hi] -> (ε0, rms)."""
    grid = np.linspace(lo, hi, 121)
    model = weight[None, :] * _shape(theta, grid, p)  # (g, nb)
    w = np.where(np.isfinite(prof), 1.0, 0.0) * inv_sig[None, :] ** 2
    y = np.nan_to_num(prof)
    cost = (w[:, None, :] * (y[:, None, :] - model[None, :, :]) ** 2).sum(axis=2)  # (n, g)
    k = np.argmin(cost, axis=1)
    return grid[k], np.sqrt(cost[np.arange(len(k)), k] / np.maximum(w.sum(axis=1), 1e-9))


def fit_clear_sky(prof: Profiles, cfg: ClearSkyConfig | None = None) -> ClearSkyModel:
    """The season's clear-sky model from sample :class:`Profiles` (see the module docstring)."""
    cfg = cfg or ClearSkyConfig()
    theta = prof.theta
    sky_bins = np.isfinite(prof.deficit[1]).mean(axis=0) > 0.5
    zen_bins = sky_bins & (theta < 20)
    scale = fit_scale(prof.ambient, prof.dark, prof.temps, np.nanmedian(prof.deficit[1][:, zen_bins], axis=1), cfg)
    span = scale.span(prof.ambient, prof.dark, prof.temps)
    q10, q50, q75 = prof.brightness(span)
    use = np.isfinite(span) & np.isfinite(q50[:, zen_bins]).all(axis=1)
    mid = sky_bins & (theta >= 60) & (theta < 70)
    rise = np.nanmedian(q50[:, mid], axis=1) - np.nanmedian(q50[:, zen_bins], axis=1)
    spread = np.nanmedian((q75 - q10)[:, sky_bins & (theta < 70)], axis=1)
    cand = use & (rise >= cfg.min_rise)
    clear = np.zeros(len(span), bool)
    if cand.any():
        clear = cand & (spread <= 1.5 * np.percentile(spread[cand], 5) + 1e-9)
    weight = np.ones(theta.size)
    p, inv_sig = 0.6, np.ones(theta.size)
    lo, hi = 0.02, cfg.eps_cap
    eps_c = np.zeros(0)
    for _ in range(4):
        if clear.sum() < cfg.min_clear:
            break
        y = np.where(sky_bins[None, :], q50[clear], np.nan)
        best = None
        for pe in EXPONENTS:  # exponent and W(θ) by alternating least squares
            w_b = np.ones(theta.size)
            for _ in range(3):
                eps, _ = _fit_eps(y, w_b, theta, pe, inv_sig, 0.01, cfg.eps_cap)
                phys = _shape(theta, eps, pe)
                w_b = np.nansum(y * phys, axis=0) / np.maximum(np.nansum(np.where(np.isfinite(y), phys**2, 0), axis=0),
                                                              1e-9)  # fmt: skip
                w_b = np.where(sky_bins, w_b, 1.0)
                w_b = ndimage.gaussian_filter1d(w_b, 2.0, mode="nearest")
                w_b /= np.mean(w_b[zen_bins])
            eps, rms = _fit_eps(y, w_b, theta, pe, inv_sig, 0.01, cfg.eps_cap)
            if best is None or np.mean(rms) < best[0]:
                best = (float(np.mean(rms)), float(pe), w_b, eps)
        assert best is not None
        _, p, weight, eps_c = best
        sig = np.nanmedian((q75 - q10)[clear], axis=0) / 1.956  # the 10-75 % range of a normal is 1.956 sigma
        sig = np.where(np.isfinite(sig), sig, np.nanmax(sig[np.isfinite(sig)]) if np.isfinite(sig).any() else 0.02)
        sig = ndimage.gaussian_filter1d(np.maximum(sig, 2e-3), 2.0, mode="nearest")
        inv_sig = 1.0 / sig
        lo = float(max(0.005, eps_c.min() - cfg.eps_margin))
        hi = float(min(cfg.eps_cap, eps_c.max() + cfg.eps_margin))
        # which frames are clear under this model: the upper quartile of every bin within clear_sigma of it
        e_all, _ = _fit_eps(np.where(sky_bins[None, :], q10, np.nan), weight, theta, p, inv_sig, lo, hi)
        model = weight[None, :] * _shape(theta, e_all, p)
        excess = ((q75 - model) * inv_sig[None, :])[:, sky_bins & (theta < 80)]
        new = use & (rise >= cfg.min_rise) & (np.nanmax(excess, axis=1) < cfg.clear_sigma)
        if new.sum() < cfg.min_clear or np.array_equal(new, clear):
            break
        clear = new
    if eps_c.size < cfg.min_clear:
        sig = np.nanmedian((q75 - q10)[use], axis=0) / 1.956 if use.any() else np.full(theta.size, 0.02)
        sig = np.where(np.isfinite(sig), sig, 0.02)
        return ClearSkyModel(theta=theta.tolist(), weight=[1.0] * theta.size,
                             sigma=ndimage.gaussian_filter1d(np.maximum(sig, 5e-3), 2.0, mode="nearest").tolist(),
                             exponent=0.6, eps_lo=0.02, eps_hi=float(cfg.eps_cap) - 0.15, eps_typical=0.3,
                             scale=asdict(scale), n_clear=int(eps_c.size), prior_only=True)  # fmt: skip
    return ClearSkyModel(
        theta=theta.tolist(), weight=np.asarray(weight).tolist(), sigma=(1.0 / inv_sig).tolist(), exponent=float(p),
        eps_lo=lo, eps_hi=hi, eps_typical=float(np.median(eps_c)), scale=asdict(scale), n_clear=int(eps_c.size),
        clear_eps=np.asarray(eps_c).tolist(),
    )  # fmt: skip


# ---------------------------------------------------------------- per image


class Frame:
    """Per-geometry precomputation for the per-image work: sky pixels, their bins, the subsample for fits."""

    def __init__(self, geom: SkyGeometry, model: ClearSkyModel, cfg: ClearSkyConfig):
        self.geom, self.model, self.cfg = geom, model, cfg
        self.sky_idx = np.flatnonzero(geom.sky)
        self.zen = geom.zenith.ravel()[self.sky_idx].astype(np.float64)
        th = np.asarray(model.theta)
        self.bin_deg = float(th[1] - th[0]) if th.size > 1 else 1.0
        self.bins, self.nb = _bins(self.zen, self.bin_deg)
        self.sub = np.arange(0, self.sky_idx.size, max(1, cfg.fit_stride))
        self.sigma_px = np.interp(self.zen, th, model.sigma).astype(np.float32)
        self.inv_sigma_px = (1.0 / self.sigma_px).astype(np.float32)
        self.inv_sig_b = 1.0 / np.asarray(model.sigma)
        self.weight = np.asarray(model.weight)
        self.theta = th

    def brightness(self, img: np.ndarray, ambient: float, span: float) -> tuple[np.ndarray, np.ndarray]:
        """(e on sky pixels float32, valid bool) of one raw image."""
        v = img.ravel()[self.sky_idx]
        valid = v != NODATA
        e = (1.0 - (np.float32(ambient) - v.astype(np.float32)) / np.float32(span)).astype(np.float32)
        return e, valid

    def clear(self, eps: float) -> np.ndarray:
        """Clear-sky brightness on the sky pixels (float32) for ``eps``."""
        return np.interp(self.zen, self.theta, self.model.profile(float(eps))).astype(np.float32)

    def fit(self, e: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
        """One-sided robust ε0 of one image (clouds only add radiance) -> (ε0, fraction of sky above
        ``clear_sigma``)."""
        cfg, m = self.cfg, self.model
        y = e[self.sub].astype(np.float64)
        b = self.bins[self.sub]
        ok = valid[self.sub]
        grid = np.linspace(m.eps_lo, m.eps_hi, 81)
        table = self.weight[None, :] * _shape(self.theta, grid, m.exponent)  # (g, nb)
        w_b = self.inv_sig_b**2
        keep = ok.copy()
        k = len(grid) // 2
        for it in range(cfg.fit_iter):
            if keep.sum() < 10:
                break
            n_b = np.bincount(b[keep], minlength=self.nb)
            s_b = np.bincount(b[keep], weights=y[keep], minlength=self.nb)
            cost = (w_b[None, :] * (n_b[None, :] * table**2 - 2 * table * s_b[None, :])).sum(axis=1)
            k = int(np.argmin(cost))
            r = (y - table[k][b]) * self.inv_sig_b[b]
            new = ((r < 0) if it == 0 else (r < cfg.clip_sigma)) & ok
            if np.array_equal(new, keep):
                break
            keep = new
        r = (y - table[k][b]) * self.inv_sig_b[b]
        cloudy = float(np.mean(r[ok] > cfg.clear_sigma)) if ok.any() else 1.0
        return float(grid[k]), cloudy


def night_index(times: np.ndarray, gap_hours: float) -> np.ndarray:
    """(n,) night number of sorted-or-not times: a gap of ``gap_hours`` starts a new night."""
    t = np.asarray(times).astype("datetime64[us]").astype(np.int64)
    order = np.argsort(t, kind="stable")
    new = np.concatenate([[True], np.diff(t[order]) > gap_hours * 3600e6])
    out = np.empty(t.size, np.int64)
    out[order] = np.cumsum(new) - 1
    return out


def choose_eps(times: np.ndarray, eps_fit: np.ndarray, cloudy: np.ndarray, model: ClearSkyModel,
               cfg: ClearSkyConfig) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(ε0 to use, source code of :data:`EPS_SOURCES`) per image from the per-image fits.

    Clear frames (``cloudy <= clear_max_cloud``, ε0 not at its upper bound) make each night's trend (median
    within ``trend_hours``, interpolated between clear frames). An image's ε0 may not exceed its night's trend by
    more than ``trend_tol``, or, in a night without a clear frame, the season's typical ε0 by ``season_tol``.
    """
    t = np.asarray(times).astype("datetime64[us]").astype(np.int64) / 3600e6
    eps_fit = np.asarray(eps_fit, np.float64)
    cloudy = np.asarray(cloudy, np.float64)
    reliable = np.isfinite(eps_fit) & (cloudy <= cfg.clear_max_cloud) & (eps_fit < model.eps_hi - 1e-3)
    season = float(np.median(eps_fit[reliable])) if reliable.any() else model.eps_typical
    night = night_index(times, cfg.night_gap_hours)
    use = np.where(np.isfinite(eps_fit), eps_fit, season)
    source = np.zeros(t.size, np.uint8)
    for k in np.unique(night):
        sel = np.flatnonzero(night == k)
        rel = sel[reliable[sel]]
        if rel.size:
            tr, er = t[rel], eps_fit[rel]
            order = np.argsort(tr)
            tr, er = tr[order], er[order]
            trend = np.empty(sel.size)
            for j, i in enumerate(sel):
                near = np.abs(tr - t[i]) <= cfg.trend_hours
                trend[j] = np.median(er[near]) if near.any() else np.interp(t[i], tr, er)
            limit, code = trend + cfg.trend_tol, EPS_SOURCES["night"]
        else:
            limit, code = np.full(sel.size, season + cfg.season_tol), EPS_SOURCES["season"]
        over = use[sel] > limit
        use[sel] = np.where(over, limit, use[sel])
        source[sel] = np.where(over, code, EPS_SOURCES["fit"])
    return np.clip(use, model.eps_lo, model.eps_hi), source
