"""Radiometry of the 8-14 µm band: the sensor's value conventions, black-body band radiance, air mass, the most
humid clear sky air of a given temperature can hold."""

from __future__ import annotations

import numpy as np

NODATA = 65535
"""``raw`` value of no-data pixels (same as :data:`cirrus_batch.fitsio.NODATA`)."""
ADU_MAX = 16383
"""Saturation level of the 14-bit sensor."""
T0 = 273.15
BAND_UM = (8.0, 14.0)

_H, _C, _K = 6.62607015e-34, 2.99792458e8, 1.380649e-23
_T_GRID = np.arange(-100.0, 80.01, 0.05)


def _planck_band(t_kelvin: np.ndarray) -> np.ndarray:
    lam = np.linspace(BAND_UM[0], BAND_UM[1], 241) * 1e-6
    x = _H * _C / (lam[None, :] * _K * t_kelvin[:, None])
    spectral = 2 * _H * _C**2 / lam[None, :] ** 5 / np.expm1(x)
    return np.trapezoid(spectral, lam, axis=1)


_L_GRID = _planck_band(_T_GRID + T0)
_L_GRID /= float(_planck_band(np.array([T0]))[0])


def band_radiance(t_c: float | np.ndarray) -> np.ndarray:
    """8-14 µm radiance of a black body at ``t_c`` (deg C), relative to one at 0 °C (Planck integral; ~ (T/273)^4.4
    near 0 °C)."""
    return np.interp(np.asarray(t_c, np.float64), _T_GRID, _L_GRID)


def air_mass(theta_deg: np.ndarray | float) -> np.ndarray:
    """Relative air mass (Kasten & Young 1989), finite at the horizon (~38 at 90°)."""
    th = np.minimum(np.asarray(theta_deg, np.float64), 90.0)
    return 1.0 / (np.cos(np.radians(th)) + 0.50572 * (96.07995 - th) ** -1.6364)


def saturation_vapour_pressure(t_c: float | np.ndarray) -> np.ndarray:
    """Saturation vapour pressure over water (hPa) at ``t_c`` (deg C), Magnus form (Alduchov & Eskridge 1996)."""
    t = np.asarray(t_c, np.float64)
    return 6.1094 * np.exp(17.625 * t / (t + 243.04))


def saturated_window_emissivity(t_c: float | np.ndarray) -> np.ndarray:
    """Clear-sky emissivity of the atmospheric window under air saturated with water vapour at ``t_c`` (deg C):
    Idso (1981, Water Resour. Res. 17, 295), 0.24 + 2.98e-8 e^2 exp(3000 / T) with e (hPa) the saturation vapour
    pressure. Air at that temperature holds no more water, so no clear sky is more humid: 0.29 at -2 °C, 0.43 at
    10 °C, 0.68 at 20 °C."""
    t = np.asarray(t_c, np.float64)
    e = saturation_vapour_pressure(t)
    return 0.24 + 2.98e-8 * e**2 * np.exp(3000.0 / (t + T0))
