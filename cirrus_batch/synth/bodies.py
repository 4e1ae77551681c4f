"""The Sun and the Moon as warm compact sources of the 8-14 µm sky, where astropy puts them for the camera's site.

Each body is a disk of its true angular size (from its distance) and band radiance, blurred by the optics into a
Gaussian of ``PSF_PX`` pixels (at the optical axis) and added above the atmosphere: the air and the clouds below
attenuate it like the rest of the scene. The Moon's disk radiance is that of its lit fraction at ``MOON_LIT_K``
plus the dark rest at ``MOON_DARK_K`` (the lit fraction from the Sun-Moon elongation); the Sun is a 5772 K black
body. Positions: astropy ``get_body`` → topocentric ``AltAz`` at the frame time (built-in ephemeris, no network,
no refraction).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cirrus_batch.synth.camera import Camera
from cirrus_batch.synth.radiometry import BAND_UM, C_LIGHT, H_PLANCK, K_BOLTZ

PSF_PX = 0.8
"""Gaussian sigma (px at the optical axis) of the optics' blur of a point source."""
MOON_LIT_K, MOON_DARK_K = 360.0, 110.0
"""Disk-averaged 8-14 µm brightness temperatures of the Moon's sunlit and night sides."""
SUN_K = 5772.0
R_MOON_KM, R_SUN_KM = 1737.4, 695700.0


@dataclass(frozen=True)
class Site:
    """Where the synthetic camera stands."""

    latitude_deg: float
    longitude_deg: float
    elevation_m: float = 0.0


@dataclass(frozen=True)
class Bodies:
    """Per frame: unit vectors (east, north, up) of the Sun and the Moon, and their radiance x solid angle."""

    names: tuple[str, ...]
    vec: np.ndarray
    """(n_bodies, n_frames, 3)."""
    flux: np.ndarray
    """(n_bodies, n_frames) band radiance x disk solid angle (W m⁻² sr⁻¹ x sr); 0 below the horizon."""
    alt_deg: np.ndarray
    az_deg: np.ndarray


def planck_band(t_k: float) -> float:
    """8-14 µm band radiance (W m⁻² sr⁻¹) of a black body at ``t_k`` (any temperature, direct integral)."""
    lam = np.linspace(BAND_UM[0], BAND_UM[1], 601) * 1e-6
    spectral = 2 * H_PLANCK * C_LIGHT**2 / lam**5 / np.expm1(H_PLANCK * C_LIGHT / (lam * K_BOLTZ * t_k))
    return float(np.trapezoid(spectral, lam))


def locate(times: np.ndarray, site: Site) -> Bodies:
    """Sun and Moon seen from ``site`` at ``times`` (datetime64, UTC)."""
    import astropy.units as u
    from astropy.coordinates import AltAz, EarthLocation, get_body
    from astropy.time import Time
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    loc = EarthLocation.from_geodetic(site.longitude_deg * u.deg, site.latitude_deg * u.deg, site.elevation_m * u.m)
    t = Time(np.asarray(times, "datetime64[ns]"), scale="utc")
    frame = AltAz(obstime=t, location=loc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degraded IERS accuracy beyond the shipped table: arcseconds
        sun, moon = get_body("sun", t, loc), get_body("moon", t, loc)
        elong = sun.separation(moon).rad
        sun_aa, moon_aa = sun.transform_to(frame), moon.transform_to(frame)
    lit = (1 - np.cos(elong)) / 2  # phase angle ~ pi - elongation
    moon_l = lit * planck_band(MOON_LIT_K) + (1 - lit) * planck_band(MOON_DARK_K)
    vecs, fluxes, alts, azs = [], [], [], []
    for aa, radius_km, radiance in ((sun_aa, R_SUN_KM, np.full(len(t), planck_band(SUN_K))),
                                    (moon_aa, R_MOON_KM, moon_l)):  # fmt: skip
        alt, az = np.radians(aa.alt.deg), np.radians(aa.az.deg)
        omega = np.pi * (radius_km / aa.distance.to(u.km).value) ** 2
        vecs.append(np.stack([np.cos(alt) * np.sin(az), np.cos(alt) * np.cos(az), np.sin(alt)], axis=-1))
        fluxes.append(np.where(alt > 0, radiance * omega, 0.0))
        alts.append(aa.alt.deg)
        azs.append(aa.az.deg)
    return Bodies(("sun", "moon"), np.stack(vecs), np.stack(fluxes), np.stack(alts), np.stack(azs))


def scene_vectors(cam: Camera) -> np.ndarray:
    """(n_scene, 3) unit vectors (east, north, up) of the camera's scene pixels."""
    th = np.radians(cam.theta.ravel()[cam.scene_idx].astype(np.float64))
    az = cam.az.ravel()[cam.scene_idx].astype(np.float64)
    return np.stack([np.sin(th) * np.sin(az), np.sin(th) * np.cos(az), np.cos(th)], axis=1)


def radiance(vectors: np.ndarray, bodies: Bodies, k: int, focal_px: float) -> np.ndarray | None:
    """Top-of-atmosphere radiance (W m⁻² sr⁻¹) the bodies add to the scene pixels of unit ``vectors`` in frame k;
    None when none is up."""
    sigma = PSF_PX / focal_px  # rad
    out = None
    for b in range(len(bodies.names)):
        flux = float(bodies.flux[b, k])
        if flux <= 0:
            continue
        cosd = np.clip(vectors @ bodies.vec[b, k], -1.0, 1.0)
        near = cosd > np.cos(6 * sigma)
        if not near.any():
            continue
        d = np.arccos(cosd[near])
        add = np.zeros(vectors.shape[0], np.float32)
        add[near] = flux * np.exp(-0.5 * (d / sigma) ** 2) / (2 * np.pi * sigma**2)
        out = add if out is None else out + add
    return out
