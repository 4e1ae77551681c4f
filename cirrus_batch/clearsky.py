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

    e_clear(θ; ε0) = h + T(θ) [1 - (1 - ε0) ** (m(θ) ** p) - h]

``m`` the Kasten-Young air mass; ``p`` (band saturation), ``T(θ)`` and ``h`` fitted once on the season's clear
frames, and ``ε0`` (zenith emissivity: humidity) the one parameter per image. ``T`` is the optics' transmission
relative to the zenith: where the lens vignettes or the housing enters the field, a pixel sees the sky through
``T`` and the camera's own parts, of brightness ``h`` (1 at ambient temperature, 0 a pure loss of signal), through
``1 - T``; with ``h = 1`` no clear sky, however humid, comes out brighter than the ambient black body.
It is fitted one-sided (clouds only add radiance) with the slant-path exponent, never above the most humid clear
sky that air of the ambient temperature can hold (:func:`eps_bound`), and is
trusted only where a good part of the sky matches the clear shape; it may not exceed the night's clear-sky trend:
a flat warm deck is cloud, never a humid clear sky. The season's clear frames are searched among up to ``search_images`` frames, so a season where
they are rare still has them; with none at all the physical shape alone is used, and said so.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from cirrus_batch.geometry import SkyGeometry
from cirrus_batch.radiometry import NODATA, air_mass, band_radiance, saturated_window_emissivity
from cirrus_batch.skyflat import SkyFlat

EPS_SOURCES = {"fit": 0, "night": 1, "season": 2}
"""Where an image's ε0 comes from: its own fit, the night's clear-sky trend, the season's typical value."""
P_RANGE = (0.35, 1.2)
"""Physical range of the slant-path exponent p (band saturation, vertical distribution of water vapour)."""


@dataclass
class ClearSkyConfig:
    """The clear-sky model (``[prepare.clear]``)."""

    use_temperature: bool = True
    """Tie the clear-sky level to the ambient temperature in the header (when there is no signal-free pixel)."""
    search_images: int = 600
    """Frames spread over the season searched for clear frames (only their profiles are kept)."""
    bin_deg: float = 1.0
    """Zenith-angle bin (deg) of the profiles."""
    eps_floor: float = 0.03
    """The driest clear zenith (ambient units) that the season's scale must allow; below it, an offset."""
    eps_cap: float = 0.65
    """Upper bound of the clear-sky zenith emissivity in 8-14 µm where the ambient temperature is not known (very
    humid air ~0.6)."""
    saturation_margin: float = 1.25
    """Where it is known (and the scale is not assumed), the bound is this times the window emissivity of air
    saturated at the ambient temperature (:func:`cirrus_batch.radiometry.saturated_window_emissivity`; 0.37 at
    -2 °C, 0.52 at 10 °C, 0.85 at 20 °C), at most ``eps_max``: a fog near ambient temperature on a cold night is
    brighter than any clear sky that air can hold. 0: ``eps_cap`` everywhere."""
    eps_max: float = 0.8
    """The bound at any temperature (tropical air at saturation)."""
    p_margin: float = 0.3
    """Each image's slant-path exponent may leave the range of the season's clear frames by this much."""
    sigma_floor: float = 0.005
    """Added in quadrature to the clear frames' scatter: what the one-parameter clear sky cannot follow (ambient
    units; 0.005 ~ 0.3 K near 0 °C)."""
    clear_sigma: float = 4.0
    """A pixel more than this many sigmas above the clear sky is cloud when judging frames clear."""
    clear_max_cloud: float = 0.01
    """Frames with at most this fraction of such pixels are clear (they set the night's trend)."""
    min_consistent: float = 0.25
    """An image's own ε0 is trusted when at least this fraction of its sky within 60° of the zenith lies within
    ``clear_sigma`` of the fitted clear sky (clear gaps); else (a deck, fog) it takes its night's trend."""
    pinned_consistent: float = 0.8
    """The same for an image whose slant-path exponent is pinned to the bounds of its range."""
    trend_hours: float = 1.5
    """Half-width (h) of the window of the night's clear-sky trend of ε0."""
    trend_tol: float = 0.03
    """An image's ε0 may exceed its night's trend by this much (more is cloud)."""
    night_gap_hours: float = 3.0
    """A gap this long between frames starts a new night."""
    min_clear: int = 3
    """Clear frames needed to fit T(θ) and p; fewer: the physical shape alone (low confidence)."""
    fit_stride: int = 4
    """Per-image fits use every fit_stride-th sky pixel."""
    flat_images: int = 200
    """Clear frames (of those the model was fitted on) that measure the sky flat (:mod:`cirrus_batch.skyflat`);
    0: no flat, the model's azimuthal scatter is the noise."""
    flat_min_span: float = 0.1
    """The clear frames must span this much of ε0 (dry and humid skies) for the flat's gain to be measured;
    narrower (one dry night): no flat."""
    flat_sigma_floor: float = 0.002
    """Added in quadrature to the noise left on the flattened clear frames (ambient units)."""
    flat_clip: float = 5.0
    """The flat's second pass leaves out pixels this many sigmas above the first (clouds in clear frames)."""
    flat_frame_spread: float = 2.5
    """... and frames whose residuals scatter more than this many times its noise (robust width; a clear frame
    keeps about 1): thin cloud's texture."""
    fit_iter: int = 6
    """Iterations of the one-sided robust fit."""
    clip_sigma: float = 3.0
    """Pixels above the fit by more than this many sigmas leave the next iteration."""

    def __post_init__(self) -> None:
        for key in ("search_images", "min_clear", "fit_stride", "fit_iter"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.flat_images < 0:
            raise ValueError(f"flat_images must be >= 0, got {self.flat_images}")
        for key in ("eps_cap", "eps_max"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in (0, 1), got {getattr(self, key)}")
        if self.saturation_margin < 0:
            raise ValueError(f"saturation_margin must be >= 0, got {self.saturation_margin}")
        if not 0.1 <= self.bin_deg <= 10:
            raise ValueError(f"bin_deg must be in [0.1, 10], got {self.bin_deg}")
        for key in ("eps_floor", "flat_min_span", "p_margin", "clear_max_cloud", "min_consistent", "pinned_consistent", "trend_tol"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        for key in ("sigma_floor", "flat_sigma_floor", "flat_clip", "flat_frame_spread", "clear_sigma", "trend_hours",
                    "night_gap_hours", "clip_sigma"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")


# ---------------------------------------------------------------- scale: ADU -> ambient units


@dataclass
class Scale:
    """How ``S_i`` (ADU of an ambient black body above zero radiance) is known."""

    source: str
    """``dark`` (A - D per image), ``temperature`` (G L(T), G from the ambient reference), ``shape`` (G L(T), G
    from the clear profiles' shape; a constant without temperatures) or ``assumed`` (a constant)."""
    gain: float = 0.0
    t_ref: float = 0.0

    def span(self, ambient: np.ndarray, dark: np.ndarray, temps: np.ndarray) -> np.ndarray:
        """(n,) S_i of images with ambient levels, dark levels and temperatures."""
        ambient = np.asarray(ambient, np.float64)
        if self.source == "dark":
            s = ambient - np.asarray(dark, np.float64)
            ok = np.isfinite(s) & (s > 0)
            return np.where(ok, s, np.median(s[ok]) if ok.any() else 1.0)
        if self.source in ("temperature", "shape") and np.isfinite(self.t_ref):
            t = np.asarray(temps, np.float64)
            return self.gain * band_radiance(np.where(np.isfinite(t), t, self.t_ref))
        return np.full(ambient.shape, self.gain)


def _bounded(source: str, cfg: ClearSkyConfig) -> bool:
    return cfg.use_temperature and cfg.saturation_margin > 0 and source != "assumed"


def eps_bound(temps: np.ndarray, source: str, cfg: ClearSkyConfig) -> np.ndarray:
    """(n,) the brightest clear zenith (ε0) physics allows per image of ambient temperatures ``temps`` (deg C, NaN
    unknown) under a scale from ``source``: ``saturation_margin`` times the window emissivity of air saturated
    at that temperature, at most ``eps_max``; ``eps_cap`` where the temperature is unknown or the scale assumed."""
    t = np.asarray(temps, np.float64)
    if not _bounded(source, cfg):
        return np.full(t.shape, cfg.eps_cap)
    with np.errstate(invalid="ignore"):
        bound = np.minimum(cfg.eps_max, cfg.saturation_margin * saturated_window_emissivity(t))
    return np.where(np.isfinite(t), bound, cfg.eps_cap)


def eps_ceiling(source: str, cfg: ClearSkyConfig) -> float:
    """The largest :func:`eps_bound` of a season under a scale from ``source`` (the top of every ε0 grid)."""
    return max(cfg.eps_cap, cfg.eps_max) if _bounded(source, cfg) else cfg.eps_cap


def _span_from_shape(deficit: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per-frame span S from the shape of its median deficit profile ``A - raw`` (n, nb): on a clear sky
    δ(θ) / δ(0) = (1 - ε0) ** (m(θ) ** p - 1) whatever S, so the shape gives ε0 and S = δ(0) / (1 - ε0). NaN
    where the profile does not have a clear sky's shape (within 0.03 rms)."""
    zen = theta < 15
    use = (theta >= 20) & (theta <= 80)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        d0 = np.nanmedian(deficit[:, zen], axis=1)
        y = deficit[:, use] / d0[:, None]
    ge, gp = _grid(0.01, 0.75, 75, 18)
    mp = air_mass(theta[use])[None, :] ** gp[:, None]
    model = (1 - ge[:, None]) ** (mp - 1)  # (g, nb)
    ok = np.isfinite(y)
    yy = np.nan_to_num(y)
    cost = (yy**2 * ok).sum(1)[:, None] - 2 * yy @ model.T + ok.astype(float) @ (model**2).T
    k = np.argmin(cost, axis=1)
    rms = np.sqrt(np.maximum(cost[np.arange(len(k)), k], 0) / np.maximum(ok.sum(1), 1))
    return np.where((rms < 0.03) & (d0 > 0), d0 / (1 - ge[k]), np.nan)


def fit_scale(ambient: np.ndarray, dark: np.ndarray, temps: np.ndarray, deficit: np.ndarray, theta: np.ndarray,
              cfg: ClearSkyConfig) -> Scale:  # fmt: skip
    """The season's :class:`Scale` from per-image ambient and dark levels, temperatures and median deficit
    profiles ``A_i - raw`` (n, n_bins) of the sample: signal-free pixels if there are; else the shape of the
    profiles that have a clear sky's shape (:func:`_span_from_shape`; a housing warmer than the air by a few K,
    varying between nights, does not bias it), scaled with the band radiance of the ambient temperature when
    known; else the ambient reference's regression on that radiance when it is tight (correlation 0.95)."""
    ambient, dark, temps = (np.asarray(a, np.float64) for a in (ambient, dark, temps))
    ok_t = np.isfinite(temps)
    t_ref = float(np.median(temps[ok_t])) if ok_t.any() else 0.0
    if np.isfinite(dark).mean() > 0.8 and np.median((ambient - dark)[np.isfinite(dark)]) > 0:
        return Scale("dark", 0.0, t_ref)
    with_t = cfg.use_temperature and ok_t.mean() >= 0.8
    lrad = band_radiance(np.where(ok_t, temps, t_ref)) if with_t else np.ones(ambient.size)
    span = _span_from_shape(np.asarray(deficit, np.float64), np.asarray(theta, np.float64))
    good = np.isfinite(span)
    if good.sum() >= 3:
        return Scale("shape", float(np.median(span[good] / lrad[good])), t_ref if with_t else np.nan)
    if with_t and np.ptp(lrad) / np.mean(lrad) > 0.03 and np.corrcoef(ambient, lrad)[0, 1] > 0.95:
        i, j = np.triu_indices(lrad.size, 1)
        pick = np.abs(lrad[i] - lrad[j]) > 0.01 * np.mean(lrad)
        if pick.sum() >= 3:
            gain = float(np.median((ambient[i] - ambient[j])[pick] / (lrad[i] - lrad[j])[pick]))  # Theil-Sen
            if gain > 0:
                return Scale("temperature", gain, t_ref)
    d0 = np.nanmedian(np.asarray(deficit)[:, np.asarray(theta) < 15], axis=1)
    d0 = d0[np.isfinite(d0)]
    gain = float(np.percentile(d0, 95)) / 0.8 if d0.size else 1.0  # the driest frames: ε0 ≈ 0.2
    return Scale("assumed", max(gain, 1.0), np.nan)


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


def _shape(theta: np.ndarray, eps: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    """(n, n_theta) physical clear-sky emissivity 1 - (1 - ε0) ** (m(θ) ** p) for ε0 (n,) and p (n,) or scalar."""
    eps = np.atleast_1d(np.asarray(eps, np.float64))
    p = np.broadcast_to(np.asarray(p, np.float64), eps.shape)
    mp = air_mass(theta)[None, :] ** p[:, None]
    return 1.0 - (1.0 - eps[:, None]) ** mp


def _seen(transmission: np.ndarray, sky: np.ndarray, housing: float) -> np.ndarray:
    """Brightness seen through optics of relative transmission T (per bin) whose vignetted part of each pixel
    sees brightness ``housing``."""
    return housing + np.asarray(transmission)[None, :] * (sky - housing)


def _grid(lo: float, hi: float, n_eps: int = 61, n_p: int = 18,
          p_range: tuple[float, float] = P_RANGE) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Flattened (ε0, p) grid over [lo, hi] x ``p_range``."""
    e, p = np.meshgrid(np.linspace(lo, hi, n_eps), np.linspace(*p_range, n_p), indexing="ij")
    return e.ravel(), p.ravel()


@dataclass
class ClearSkyModel:
    """e_clear(θ; ε0, p) = h + T(θ) [1 - (1 - ε0) ** (m(θ) ** p) - h]; per-bin noise ``sigma`` (ambient
    units)."""

    theta: list[float]
    transmission: list[float]
    """T(θ) per bin (1 near the zenith)."""
    sigma: list[float]
    exponent: float
    """Typical slant-path exponent p of the clear frames (each image fits its own within [p_lo, p_hi])."""
    p_lo: float
    p_hi: float
    eps_lo: float
    eps_hi: float
    eps_typical: float
    scale: dict[str, Any]
    n_clear: int
    housing: float = 1.0
    """Brightness of what the vignetted part of a pixel sees: 1 the camera's own parts at ambient temperature,
    0 nothing (a pure gain loss); fitted over the season's clear frames."""
    offset: float = 0.0
    """Added to every clear sky (ambient units; < 0 only where the scale came out too small, see
    ``eps_floor``)."""
    prior_only: bool = False
    """No clear frame was found: T = 1, p = 0.6, bounds from physics alone (low confidence)."""
    clear_eps: list[float] = field(default_factory=list)
    """ε0 of the clear frames the model was fitted on."""
    clear_p: list[float] = field(default_factory=list)
    """Their slant-path exponents."""
    clear_frames: list[int] = field(default_factory=list)
    """Their positions in the profile sample (the sky flat is measured on them)."""

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> ClearSkyModel:
        return cls(**{k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs})

    @property
    def scaler(self) -> Scale:
        return Scale(**self.scale)

    def profile(self, eps: float | np.ndarray, p: float | np.ndarray | None = None) -> np.ndarray:
        """Clear-sky brightness per bin: (n_bins,) for a scalar ε0, (n, n_bins) for an array; p defaults to the
        season's typical exponent."""
        e = np.atleast_1d(np.asarray(eps, np.float64))
        out = self.offset + _seen(np.asarray(self.transmission),
                                  _shape(np.asarray(self.theta), e, self.exponent if p is None else p), self.housing)
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


def _fit_eps(prof: np.ndarray, transmission: np.ndarray, housing: float, theta: np.ndarray, inv_sig: np.ndarray,
             lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Least-squares (ε0, p) of profiles (n, nb) (NaN bins ignored) on a grid of ε0 steps of 0.005 -> (ε0, p, rms
    in sigmas)."""
    ge, gp = _grid(lo, hi, int(np.ceil((hi - lo) / 0.005)) + 1)
    model = _seen(transmission, _shape(theta, ge, gp), housing)  # (g, nb)
    w = np.where(np.isfinite(prof), 1.0, 0.0) * inv_sig[None, :] ** 2
    y = np.nan_to_num(prof)
    # sum_b w (y - m)^2 = sum w y^2 - 2 y.(w m) + w.m^2
    cost = (w * y**2).sum(axis=1)[:, None] - 2 * (w * y) @ model.T + w @ (model**2).T  # (n, g)
    k = np.argmin(cost, axis=1)
    rms = np.sqrt(np.maximum(cost[np.arange(len(k)), k], 0) / np.maximum(w.sum(axis=1), 1e-9))
    return ge[k], gp[k], rms


HOUSING_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Brightness of the camera's vignetted view tried when fitting the optics (see ``ClearSkyModel.housing``)."""
ALIKE_COST = 0.25
"""Optics whose fit to the clear frames is worse by less than this (mean squared residual, sigmas²) fit them as
well: a frame clear under any of them is a clear frame."""


def _fit_optics(y: np.ndarray, housing: float, theta: np.ndarray, inv_sig: np.ndarray, sky_bins: np.ndarray,
                zen_bins: np.ndarray, eps_hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:  # fmt: skip
    """T(θ) and each clear profile's (ε0, p) by alternating least squares for one ``housing`` brightness ->
    (T, ε0, p, mean squared residual in sigmas)."""
    trans = np.ones(theta.size)
    for it in range(4):  # the sky first where the optics hardly matter (T ~ 1 within 60° of the zenith)
        eps_c, p_c, _ = _fit_eps(np.where(theta < 60, y, np.nan) if it == 0 else y, trans, housing, theta, inv_sig,
                                 0.01, eps_hi)  # fmt: skip
        x = _shape(theta, eps_c, p_c) - housing  # y - h = T (shape - h)
        trans = np.nansum((y - housing) * x, axis=0) / np.maximum(np.nansum(np.where(np.isfinite(y), x**2, 0),
                                                                            axis=0), 1e-9)  # fmt: skip
        trans = np.where(sky_bins, trans, 1.0)
        trans = ndimage.gaussian_filter1d(trans, 2.0, mode="nearest")
        trans /= np.mean(trans[zen_bins])
    eps_c, p_c, rms = _fit_eps(y, trans, housing, theta, inv_sig, 0.01, eps_hi)
    return trans, eps_c, p_c, float(np.mean(rms**2))


def fit_clear_sky(prof: Profiles, cfg: ClearSkyConfig | None = None) -> ClearSkyModel:
    """The season's clear-sky model from sample :class:`Profiles` (see the module docstring)."""
    cfg = cfg or ClearSkyConfig()
    theta = prof.theta
    sky_bins = np.isfinite(prof.deficit[1]).mean(axis=0) > 0.5
    zen_bins = sky_bins & (theta < 20)
    scale = fit_scale(prof.ambient, prof.dark, prof.temps, np.where(sky_bins[None, :], prof.deficit[1], np.nan),
                      theta, cfg)  # fmt: skip
    span = scale.span(prof.ambient, prof.dark, prof.temps)
    q10, q50, q75 = prof.brightness(span)
    use = np.isfinite(span) & np.isfinite(q50[:, zen_bins]).all(axis=1)
    # a clear zenith is never brighter than the most humid sky the air can hold (decks and fog can be); T(θ)
    # takes any vignetting
    eps_hi = eps_ceiling(scale.source, cfg)
    zenith = np.nanmedian(q50[:, zen_bins], axis=1)
    cand = use & (zenith <= eps_bound(prof.temps, scale.source, cfg))
    # a scale a little too small (a strongly vignetted lens distorts the shapes it comes from) puts the driest
    # frames below zero, which no sky can be: an offset lifts them to eps_floor
    offset = float(min(0.0, np.percentile(zenith[cand], 1) - cfg.eps_floor)) if cand.any() else 0.0
    q10, q50, q75 = q10 - offset, q50 - offset, q75 - offset
    spread = np.nanmedian((q75 - q10)[:, sky_bins & (theta < 70)], axis=1)
    clear = np.zeros(len(span), bool)
    if cand.any():
        clear = cand & (spread <= 1.5 * np.percentile(spread[cand], 5) + 1e-9)
    trans, housing = np.ones(theta.size), 1.0
    p, inv_sig = 0.6, np.full(theta.size, 1.0 / 0.01)
    eps_c = np.zeros(0)
    fitted = clear
    for _ in range(4):
        if clear.sum() < cfg.min_clear:
            break
        fitted = clear
        y = np.where(sky_bins[None, :], q50[clear], np.nan)
        fits = {h: _fit_optics(y, h, theta, inv_sig, sky_bins, zen_bins, eps_hi) for h in HOUSING_GRID}
        housing = min(fits, key=lambda h: fits[h][3])
        trans, eps_c, p_c, _ = fits[housing]
        p = float(np.median(p_c))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # bins no clear frame reaches (behind obstacles)
            sig = np.nanmedian((q75 - q10)[clear], axis=0) / 1.956  # the 10-75 % range of a normal: 1.956 sigma
        sig = np.where(np.isfinite(sig), sig, np.nanmax(sig[np.isfinite(sig)]) if np.isfinite(sig).any() else 0.02)
        sig = ndimage.gaussian_filter1d(np.hypot(sig, cfg.sigma_floor), 2.0, mode="nearest")
        inv_sig = 1.0 / sig
        # which frames are clear under this model or any that fits the clear frames as well (clear frames of
        # one kind of night leave the optics and p undetermined), for any physical ε0, not only the range seen so
        # far (a humid clear night is clear): the upper quartile of every bin within clear_sigma of it
        new = np.zeros_like(clear)
        for h, (trans_h, *_, cost) in fits.items():
            if cost > fits[housing][3] + ALIKE_COST:
                continue
            e_all, p_all, _ = _fit_eps(np.where(sky_bins[None, :], q10, np.nan), trans_h, h, theta, inv_sig,
                                       0.01, eps_hi)  # fmt: skip
            model = _seen(trans_h, _shape(theta, e_all, p_all), h)
            excess = ((q75 - model) * inv_sig[None, :])[:, sky_bins & (theta < 80)]
            new |= cand & (np.nanmax(excess, axis=1) < cfg.clear_sigma)
        if new.sum() < cfg.min_clear or np.array_equal(new, clear):
            break
        clear = new
    if eps_c.size < cfg.min_clear:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sig = np.nanmedian((q75 - q10)[use], axis=0) / 1.956 if use.any() else np.full(theta.size, 0.02)
        sig = np.where(np.isfinite(sig), sig, 0.02)
        return ClearSkyModel(theta=theta.tolist(), transmission=[1.0] * theta.size,
                             sigma=ndimage.gaussian_filter1d(np.hypot(sig, cfg.sigma_floor), 2.0,
                                                             mode="nearest").tolist(),
                             exponent=0.6, p_lo=P_RANGE[0], p_hi=P_RANGE[1], eps_lo=0.01,
                             eps_hi=eps_hi, eps_typical=0.3,
                             scale=asdict(scale), n_clear=int(eps_c.size), offset=offset,
                             prior_only=True)  # fmt: skip
    return ClearSkyModel(
        theta=theta.tolist(), transmission=np.asarray(trans).tolist(), housing=housing, sigma=(1.0 / inv_sig).tolist(), exponent=float(p),
        p_lo=float(max(P_RANGE[0], np.min(p_c) - cfg.p_margin)), p_hi=float(min(P_RANGE[1], np.max(p_c) + cfg.p_margin)),
        eps_lo=0.01, eps_hi=eps_hi, eps_typical=float(np.median(eps_c)), scale=asdict(scale),
        n_clear=int(eps_c.size), offset=offset,
        clear_eps=np.asarray(eps_c).tolist(), clear_p=np.asarray(p_c).tolist(),
        clear_frames=np.flatnonzero(fitted).tolist(),
    )  # fmt: skip


# ---------------------------------------------------------------- per image


class Frame:
    """Per-geometry precomputation for the per-image work: sky pixels, their bins, the subsample for fits, and
    the sky flat (:mod:`cirrus_batch.skyflat`) when there is one (its noise then replaces the model's)."""

    def __init__(self, geom: SkyGeometry, model: ClearSkyModel, cfg: ClearSkyConfig, flat: SkyFlat | None = None):
        self.geom, self.model, self.cfg = geom, model, cfg
        self.sky_idx = np.flatnonzero(geom.sky)
        self.zen = geom.zenith.ravel()[self.sky_idx].astype(np.float64)
        th = np.asarray(model.theta)
        self.bin_deg = float(th[1] - th[0]) if th.size > 1 else 1.0
        self.bins, self.nb = _bins(self.zen, self.bin_deg)
        self.sub = np.arange(0, self.sky_idx.size, max(1, cfg.fit_stride))
        self.flat = flat.on(self.sky_idx) if flat is not None else None
        sigma = np.asarray(flat.sigma if flat is not None else model.sigma)
        self.sigma_px = np.interp(self.zen, th, sigma).astype(np.float32)
        self.inv_sig_b = 1.0 / sigma
        self.transmission = np.asarray(model.transmission)
        self.theta = th

    def brightness(self, img: np.ndarray, ambient: float, span: float) -> tuple[np.ndarray, np.ndarray]:
        """(e on sky pixels float32, flattened when there is a flat; valid bool) of one raw image."""
        v = img.ravel()[self.sky_idx]
        valid = v != NODATA
        e = (1.0 - (np.float32(ambient) - v.astype(np.float32)) / np.float32(span)).astype(np.float32)
        if self.flat is not None:
            e = (e - self.flat[0]) * self.flat[1]
        return e, valid

    def inv_sigma(self, clear: np.ndarray, at: np.ndarray | slice = slice(None)) -> np.ndarray:
        """1 / noise of the sky pixels ``at`` whose clear sky is ``clear``: the noise per zenith bin and the flat's
        gain uncertainty for skies unlike the clear frames it was measured on (see :mod:`cirrus_batch.skyflat`)."""
        var = self.sigma_px[at] ** 2
        if self.flat is not None:
            dm = clear - self.flat[2][at]
            var = var + dm * dm * self.flat[3][at]
        return (1.0 / np.sqrt(var)).astype(np.float32)

    def clear(self, eps: float, p: float) -> np.ndarray:
        """Clear-sky brightness on the sky pixels (float32) for (ε0, p)."""
        return np.interp(self.zen, self.theta, self.model.profile(float(eps), float(p))).astype(np.float32)

    def fit(self, e: np.ndarray, valid: np.ndarray, eps_hi: float) -> tuple[float, float, float, float]:
        """One-sided robust (ε0 <= ``eps_hi``, p) of one image (clouds only add radiance) -> (ε0, p, fraction of
        the sky more than ``clear_sigma`` above the clear sky, fraction of the sky within 60° of the zenith within
        ``clear_sigma`` of it)."""
        cfg, m = self.cfg, self.model
        y = e[self.sub].astype(np.float64)
        b = self.bins[self.sub]
        ok = valid[self.sub]
        ge, gp = _grid(m.eps_lo, min(m.eps_hi, eps_hi), 241, 9, (m.p_lo, m.p_hi))
        table = m.offset + _seen(self.transmission, _shape(self.theta, ge, gp), m.housing)  # (g, nb)
        w_b = self.inv_sig_b**2
        t2 = w_b[None, :] * table**2
        tw = table * w_b[None, :]
        keep = ok.copy()
        k = int(np.argmin(np.abs(ge - m.eps_typical) + np.abs(gp - m.exponent)))
        for it in range(cfg.fit_iter):
            if keep.sum() < 10:
                break
            n_b = np.bincount(b[keep], minlength=self.nb)
            s_b = np.bincount(b[keep], weights=y[keep], minlength=self.nb)
            k = int(np.argmin(t2 @ n_b - 2 * tw @ s_b))
            r = (y - table[k][b]) * self.inv_sig_b[b]
            new = ((r < 0) if it == 0 else (r < cfg.clip_sigma)) & ok
            if np.array_equal(new, keep):
                break
            keep = new
        r = (y - table[k][b]) * self.inv_sigma(table[k][b], self.sub)
        inner = ok & (self.zen[self.sub] < 60)  # near the horizon every sky matches: not evidence
        if not inner.any():
            return float(ge[k]), float(gp[k]), 1.0, 0.0
        return (float(ge[k]), float(gp[k]), float(np.mean(r[ok] > cfg.clear_sigma)),
                float(np.mean(np.abs(r[inner]) <= cfg.clear_sigma)))


def night_index(times: np.ndarray, gap_hours: float) -> np.ndarray:
    """(n,) night number of sorted-or-not times: a gap of ``gap_hours`` starts a new night."""
    t = np.asarray(times).astype("datetime64[us]").astype(np.int64)
    order = np.argsort(t, kind="stable")
    new = np.concatenate([[True], np.diff(t[order]) > gap_hours * 3600e6])
    out = np.empty(t.size, np.int64)
    out[order] = np.cumsum(new) - 1
    return out


def _trend(t: np.ndarray, tr: np.ndarray, er: np.ndarray, hours: float) -> np.ndarray:
    """Local trend of ``er`` (at times ``tr``, sorted) at each ``t``: a straight line through the values within
    ``hours`` (so it follows a drift at the ends of a night, where a median lags), kept within their range;
    interpolated where none is."""
    out = np.empty(t.size)
    for j, ti in enumerate(t):
        near = np.abs(tr - ti) <= hours
        if not near.any():
            out[j] = np.interp(ti, tr, er)
            continue
        x, y = tr[near] - ti, er[near]
        value = float(np.median(y))
        if np.ptp(x) > 0 and x.size >= 3:
            value = np.polyfit(x, y, 1)[1]
        out[j] = np.clip(value, y.min(), y.max())
    return out


def choose_eps(times: np.ndarray, temps: np.ndarray, eps_fit: np.ndarray, p_fit: np.ndarray, excess: np.ndarray,
               consistent: np.ndarray, model: ClearSkyModel,
               cfg: ClearSkyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(ε0, p, source code of :data:`EPS_SOURCES`) to use per image, from the per-image fits and ambient
    temperatures (deg C, NaN unknown).

    A fit is anchored when at least ``min_consistent`` of the sky lies within ``clear_sigma`` of its clear sky
    (clear gaps between clouds) and ε0 is below its upper bound (:func:`eps_bound`); a frame is clear when also at most
    ``clear_max_cloud`` of its sky lies above. Each night's trend of (ε0, p) (a line through the values within
    ``trend_hours``, interpolated between frames) comes from its clear frames, else from its anchored ones. Anchored frames keep
    their fit while ε0 is at most ``trend_tol`` above the trend; the others (a deck, fog) take the trend. A night
    with no anchored frame (nothing in it looks like a clear sky) takes the driest clear sky of the season (10th
    percentile of the clear frames' ε0).
    """
    t = np.asarray(times).astype("datetime64[us]").astype(np.int64) / 3600e6
    eps_fit, p_fit = np.asarray(eps_fit, np.float64), np.asarray(p_fit, np.float64)
    excess, consistent = np.asarray(excess, np.float64), np.asarray(consistent, np.float64)
    # a fit pinned to the slant-path exponent's range (flatter or steeper than the clear skies seen) must match
    # most of the sky to be trusted: a flat fog or deck pinned there matches only in part; at the bound, never
    pinned = (p_fit <= model.p_lo + 1e-3) | (p_fit >= model.p_hi - 1e-3)
    cap = np.minimum(eps_bound(temps, model.scale["source"], cfg), model.eps_hi)
    free = np.isfinite(eps_fit) & (eps_fit < cap - 1e-3)
    anchored = free & (consistent >= np.where(pinned, cfg.pinned_consistent, cfg.min_consistent))
    clear = anchored & (excess <= cfg.clear_max_cloud)
    # no anchored frame in a night: nothing there looks like a clear sky, so the driest clear sky of the season
    use_e = np.full(t.size, float(np.percentile(eps_fit[clear], 10)) if clear.any() else model.eps_typical)
    use_p = np.full(t.size, float(np.median(p_fit[clear])) if clear.any() else model.exponent)
    source = np.full(t.size, EPS_SOURCES["season"], np.uint8)
    night = night_index(times, cfg.night_gap_hours)
    for k in np.unique(night):
        sel = np.flatnonzero(night == k)
        ref = sel[clear[sel]] if clear[sel].any() else sel[anchored[sel]]
        if not ref.size:
            continue
        ref = ref[np.argsort(t[ref])]
        trend_e = _trend(t[sel], t[ref], eps_fit[ref], cfg.trend_hours)
        trend_p = _trend(t[sel], t[ref], p_fit[ref], cfg.trend_hours)
        own = anchored[sel] & (eps_fit[sel] <= trend_e + cfg.trend_tol)
        use_e[sel] = np.where(own, eps_fit[sel], trend_e)
        use_p[sel] = np.where(own, p_fit[sel], trend_p)
        source[sel] = np.where(own, EPS_SOURCES["fit"], EPS_SOURCES["night"])
    return np.clip(use_e, model.eps_lo, model.eps_hi), np.clip(use_p, model.p_lo, model.p_hi), source
