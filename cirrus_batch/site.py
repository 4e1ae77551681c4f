"""The camera's site on the Earth and where things are on its sky: the Sun, the Moon and ICRS targets in alt/az.

astropy does the astronomy without the network: its built-in ephemeris and the IERS table shipped with it
(``auto_download`` off; times beyond that table get the predicted Earth orientation, a few arcseconds, far below
a pixel). No refraction (pressure 0): 8-14 µm refraction is a few arcminutes above 10° of altitude.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any

import numpy as np

from cirrus_batch.config import SiteConfig
from cirrus_batch.errors import CirrusError

SITE_ATTR = "site"
"""Root attribute of the store: ``{"latitude_deg", "longitude_deg", "elevation_m"}``."""


@lru_cache(maxsize=1)
def _offline() -> None:
    from astropy.utils import iers

    iers.conf.auto_download = False
    iers.conf.auto_max_age = None
    iers.conf.iers_degraded_accuracy = "warn"


def location(site: SiteConfig) -> Any:
    """The astropy ``EarthLocation`` of ``site``; a :class:`CirrusError` when it is not set."""
    import astropy.units as u
    from astropy.coordinates import EarthLocation

    if site.latitude_deg is None or site.longitude_deg is None:
        raise CirrusError("the site is unknown: set [site] latitude_deg and longitude_deg (and elevation_m)")
    return EarthLocation.from_geodetic(site.longitude_deg * u.deg, site.latitude_deg * u.deg, site.elevation_m * u.m)


def _times(times: np.ndarray) -> Any:
    from astropy.time import Time

    _offline()
    return Time(np.asarray(times, "datetime64[ns]"), scale="utc")


def _altaz(coord: Any, times: np.ndarray, site: SiteConfig) -> tuple[np.ndarray, np.ndarray]:
    from astropy.coordinates import AltAz

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degraded IERS accuracy beyond the shipped table: arcseconds
        aa = coord.transform_to(AltAz(obstime=_times(times), location=location(site)))
    return np.asarray(aa.alt.deg, np.float64), np.asarray(aa.az.deg, np.float64)


def body_altaz(body: str, times: np.ndarray, site: SiteConfig) -> tuple[np.ndarray, np.ndarray]:
    """(altitude, azimuth) in degrees of ``"sun"`` or ``"moon"`` at ``times`` (datetime64, UTC) from ``site``
    (topocentric, azimuth from north through east)."""
    from astropy.coordinates import get_body

    t = _times(times)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coord = get_body(body, t, location(site))
    return _altaz(coord, times, site)


def radec_altaz(ra_deg: np.ndarray, dec_deg: np.ndarray, times: np.ndarray,
                site: SiteConfig) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(altitude, azimuth) in degrees of ICRS positions ``(ra_deg, dec_deg)`` at ``times`` (broadcast together)."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    ra, dec, t = np.broadcast_arrays(np.asarray(ra_deg, np.float64), np.asarray(dec_deg, np.float64),
                                     np.asarray(times, "datetime64[ns]"))  # fmt: skip
    coord = SkyCoord(ra=ra.ravel() * u.deg, dec=dec.ravel() * u.deg, frame="icrs")
    alt, az = _altaz(coord, t.ravel(), site)
    return alt.reshape(ra.shape), az.reshape(ra.shape)


def site_attrs(site: SiteConfig) -> dict[str, float]:
    """The store attribute of ``site`` (checked: a CirrusError when it is not set)."""
    location(site)
    return {"latitude_deg": float(site.latitude_deg), "longitude_deg": float(site.longitude_deg),  # type: ignore[arg-type]
            "elevation_m": float(site.elevation_m)}  # fmt: skip


def site_from_attrs(attrs: dict[str, Any], url: str = "the store") -> SiteConfig:
    """The site recorded in a store's root attributes; a :class:`CirrusError` naming ``[site]`` when absent."""
    from cirrus_batch.store import json_attr

    value = json_attr(attrs, SITE_ATTR)
    if not value:
        raise CirrusError(f"{url} has no site: give [site] latitude_deg, longitude_deg, elevation_m in --config "
                          "(cirrus ingest or cirrus orient stores it)")  # fmt: skip
    return SiteConfig(float(value["latitude_deg"]), float(value["longitude_deg"]), float(value["elevation_m"]))


def store_site(url: str, site: SiteConfig) -> dict[str, float]:
    """Record ``site`` in the store's root attributes (the caller holds the writer lock)."""
    from cirrus_batch.store import Store, set_json_attr

    attrs = site_attrs(site)
    set_json_attr(Store.open(url).group.attrs, SITE_ATTR, attrs)
    return attrs
