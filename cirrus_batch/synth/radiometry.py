"""8-14 µm radiometry of the night sky: band Planck radiance, window optical depth, layered atmosphere.

Radiances are band-integrated (8-14 µm) in W m⁻² sr⁻¹. The clear sky is a stack of plane-parallel
spherical shells (water vapour with a scale height, well-mixed gases, ozone, optional fog) with the
night's temperature profile; a ray at zenith angle θ crosses each shell along its exact spherical path,
raised to the power ``SATURATION`` (band-line saturation). See docs/synth.md for the sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import numpy as np

H_PLANCK = 6.62607015e-34
C_LIGHT = 2.99792458e8
K_BOLTZ = 1.380649e-23
T0 = 273.15
R_EARTH_KM = 6371.0
BAND_UM = (8.0, 14.0)
SATURATION = 0.9
"""Slant-path exponent: a shell's optical depth along the ray is tau * m**SATURATION."""
TAU_DRY = 0.05
"""Zenith window optical depth of the well-mixed gases (CO2 band wing, N2/O2 continuum), scale height 8 km."""
TAU_O3 = 0.05
"""Zenith optical depth of the 9.6 µm ozone band, placed at 15-30 km."""
WV_LIN, WV_QUAD = 0.13, 0.035
"""Water-vapour window optical depth tau_wv = WV_LIN w + WV_QUAD w² (w: precipitable water, cm)."""
TROPOPAUSE_KM = 11.0
THETA_STEP = 0.05
"""Resolution (deg) of the per-frame zenith-angle profiles."""
LEVELS_KM = (0.0, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5,
             4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 14.0, 17.0, 20.0, 25.0, 30.0)  # fmt: skip


@lru_cache(maxsize=1)
def _planck_table() -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(120.0, 360.0, 0.02)
    lam = np.linspace(BAND_UM[0], BAND_UM[1], 241) * 1e-6
    x = H_PLANCK * C_LIGHT / (lam[None, :] * K_BOLTZ * t[:, None])
    spectral = 2 * H_PLANCK * C_LIGHT**2 / lam**5 / np.expm1(x)
    return t, np.trapezoid(spectral, lam, axis=1)


def band_radiance(t_k: np.ndarray | float) -> np.ndarray:
    """Planck radiance integrated over 8-14 µm (W m⁻² sr⁻¹) of a black body at ``t_k`` kelvin."""
    t, rad = _planck_table()
    return np.interp(t_k, t, rad)


def band_slope(t_k: float) -> float:
    """dL/dT of :func:`band_radiance` (W m⁻² sr⁻¹ K⁻¹)."""
    return float((band_radiance(t_k + 0.05) - band_radiance(t_k - 0.05)) / 0.1)


def air_mass(theta_deg: np.ndarray) -> np.ndarray:
    """Kasten-Young (1989) relative air mass, finite at the horizon (for reference and tests)."""
    th = np.minimum(theta_deg, 90.0)
    return 1.0 / (np.cos(np.radians(th)) + 0.50572 * (96.07995 - th) ** -1.6364)


def pwv_cm(dew_point_c: float) -> float:
    """Precipitable water (cm) from the surface dew point (°C), Reitan (1963): ln w = 0.1102 + 0.0614 Td."""
    return float(np.exp(0.1102 + 0.0614 * dew_point_c))


def tau_water(w_cm: float) -> float:
    """Zenith 8-14 µm water-vapour optical depth: foreign (linear) + self continuum (quadratic in w)."""
    return WV_LIN * w_cm + WV_QUAD * w_cm**2


def zenith_emissivity(w_cm: float) -> float:
    """Clear-sky zenith window emissivity 1 - exp(-tau0) for precipitable water ``w_cm``."""
    return float(1 - np.exp(-(TAU_DRY + TAU_O3 + tau_water(w_cm))))


def slant_factor(theta_deg: np.ndarray, z_lo: float, z_hi: float) -> np.ndarray:
    """Path length through the spherical shell [z_lo, z_hi] (km) over its thickness, for zenith angle θ."""
    s2 = (R_EARTH_KM * np.sin(np.radians(theta_deg))) ** 2
    path = np.sqrt((R_EARTH_KM + z_hi) ** 2 - s2) - np.sqrt(np.maximum((R_EARTH_KM + z_lo) ** 2 - s2, 0.0))
    return path / (z_hi - z_lo)


def layer_incidence(theta_deg: np.ndarray, h_km: float) -> tuple[np.ndarray, np.ndarray]:
    """(ground distance km, 1/cos of the local zenith angle) where the ray meets a layer at height h."""
    th = np.radians(theta_deg)
    sin_h = np.clip(R_EARTH_KM * np.sin(th) / (R_EARTH_KM + h_km), 0.0, 1.0)
    th_h = np.arcsin(sin_h)
    return (R_EARTH_KM + h_km) * (th - th_h), 1.0 / np.maximum(np.cos(th_h), 1e-3)


@dataclass(frozen=True)
class Profile:
    """Night-constant atmosphere: shell boundaries, slant factors on the θ grid, optical-depth shapes."""

    z: np.ndarray
    """Shell boundaries (km), including the cloud heights in ``splits``."""
    splits: tuple[int, ...]
    """Indices in ``z`` of the cloud heights (ascending)."""
    m_sat: np.ndarray
    """(n_theta, n_shell) slant factors ** SATURATION."""
    wv_frac: np.ndarray
    dry_tau: np.ndarray
    fog_frac: np.ndarray
    z_mid: np.ndarray


def make_profile(cloud_km: tuple[float, ...], h_water_km: float, fog_top_km: float) -> Profile:
    """Shells for a night with clouds at ``cloud_km`` (ascending), water-vapour scale height, fog top."""
    z = np.unique(np.concatenate([LEVELS_KM, cloud_km, [fog_top_km] if fog_top_km > 0 else []]))
    theta = np.arange(0.0, 90.0 + THETA_STEP / 2, THETA_STEP)
    m = np.stack([slant_factor(theta, a, b) for a, b in pairwise(z)], axis=1)
    lo, hi = z[:-1], z[1:]
    wv = np.exp(-lo / h_water_km) - np.exp(-hi / h_water_km)
    o3 = np.clip((np.minimum(hi, 30.0) - np.maximum(lo, 15.0)) / 15.0, 0.0, None)
    dry = TAU_DRY * (np.exp(-lo / 8.0) - np.exp(-hi / 8.0)) + TAU_O3 * o3
    fog = np.clip((np.minimum(hi, fog_top_km) - lo) / max(fog_top_km, 1e-9), 0.0, None)
    splits = tuple(int(np.searchsorted(z, h)) for h in cloud_km)
    return Profile(z=z, splits=splits, m_sat=(m**SATURATION).astype(np.float64), wv_frac=wv, dry_tau=dry,
                   fog_frac=fog, z_mid=(lo + hi) / 2)  # fmt: skip


def temperature_k(
    z_km: np.ndarray, t_amb_c: float, lapse: float, inversion: tuple[float, float]
) -> np.ndarray:
    """Air temperature (K) at heights z: surface inversion (ΔT over depth), lapse rate, tropopause."""
    d_t, depth = inversion
    z = np.asarray(z_km, dtype=np.float64)
    t = (
        t_amb_c
        + T0
        + d_t * np.minimum(z / depth, 1.0)
        - lapse * np.clip(z - depth, 0.0, TROPOPAUSE_KM - depth)
    )
    return t + 1.0 * np.clip(z - 20.0, 0.0, None)


def segments(
    prof: Profile, t_amb_c: float, w_cm: float, tau_fog: float, lapse: float, inversion: tuple[float, float]
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Per-frame profiles on the θ grid: emission S_i and transmittance T_i of each air segment between
    the ground, the cloud heights and space, and the shell temperatures (K).

    Looking up from the bottom of segment i, its own air adds S_i and lets T_i of what lies above through.
    """
    tau = tau_water(w_cm) * prof.wv_frac + prof.dry_tau + tau_fog * prof.fog_frac
    d = tau[None, :] * prof.m_sat
    t_shell = temperature_k(prof.z_mid, t_amb_c, lapse, inversion)
    trans = np.exp(-d)
    emis = band_radiance(t_shell)[None, :] * (1 - trans)
    bounds = (0, *prof.splits, len(prof.z) - 1)
    s_out, t_out = [], []
    for a, b in pairwise(bounds):
        cum = np.cumprod(trans[:, a:b], axis=1)
        before = np.concatenate([np.ones((cum.shape[0], 1)), cum[:, :-1]], axis=1)
        s_out.append((emis[:, a:b] * before).sum(axis=1).astype(np.float32))
        t_out.append(cum[:, -1].astype(np.float32))
    return s_out, t_out, t_shell


def cloud_temperature(h_km: float, t_amb_c: float, lapse: float, inversion: tuple[float, float]) -> float:
    """Cloud-base temperature (K) of a layer at ``h_km``."""
    return float(temperature_k(np.asarray(h_km), t_amb_c, lapse, inversion))
