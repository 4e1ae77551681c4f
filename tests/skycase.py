"""Tiny synthetic seasons with the Moon in the sky, a known site and a known camera orientation (orientation and
sightline tests): the renderer's truth next to what the detector side computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from cirrus_batch import synth
from cirrus_batch.config import SiteConfig
from cirrus_batch.orientation import Lens, Orientation

SITE = synth.Site(28.76, -17.88, 2396.0)
"""La Palma: 19-23 UTC is night in January; the waxing Moon is up in the evenings from Jan 22."""
SITE_CFG = SiteConfig(SITE.latitude_deg, SITE.longitude_deg, SITE.elevation_m)
START = "2026-01-22"
KINDS = ["clear-dry", "clear-humid", "broken", "clear-dry", "cirrus", "arriving"]


def write_season(dest: Path, pointing: synth.Pointing, shape=(96, 120), nights: int = 10, per_night: int = 14,
                 cadence_min: float = 15.0, seed: int = 3, camera_kind: str = "housing") -> synth.SynthSummary:  # fmt: skip
    return synth.write_archive(dest, nights=nights, per_night=per_night, cadence_min=cadence_min, shape=shape,
                               seed=seed, start=START, kinds=[KINDS[i % len(KINDS)] for i in range(nights)],
                               site=SITE, pointing=pointing, camera_kind=camera_kind, progress=False)  # fmt: skip


def true_lens_orientation(attrs: dict) -> tuple[Lens, Orientation]:
    """The renderer's camera (truth-store attributes) in the detector side's terms."""
    lens = Lens(tuple(attrs["center"]), attrs["image_circle_px"], attrs["projection"], attrs["fov_deg"])
    ori = Orientation(attrs["up_azimuth_deg"], attrs["mirror"], attrs["tilt_deg"], attrs["tilt_azimuth_deg"])
    return lens, ori


def truth_dataset(summary: synth.SynthSummary) -> xr.Dataset:
    """A store-like dataset whose cloud map is the true mask, with the true geometry and orientation."""
    truth = xr.open_zarr(summary.truth, consolidated=False).load()
    a = truth.attrs
    ds = xr.Dataset({"mask": truth["mask"], "pixel_class": truth["sky"].astype(np.uint8),
                     "cloud_fraction": truth["cloud_fraction"]}, coords={"time": truth["time"]})  # fmt: skip
    ds.attrs = {
        "prepare": {"geometry": {"center": a["center"], "radius": a["image_circle_px"], "projection": a["projection"],
                                 "fov_deg": a["fov_deg"]}},
        "orientation": {"north_deg": a["up_azimuth_deg"], "mirror": a["mirror"], "tilt_deg": a["tilt_deg"],
                        "tilt_azimuth_deg": a["tilt_azimuth_deg"], "scale": 1.0},
        "site": a["site"],
    }  # fmt: skip
    return ds


def camera_of(summary: synth.SynthSummary, pointing: synth.Pointing, seed: int = 3) -> synth.Camera:
    truth = xr.open_zarr(summary.truth, consolidated=False)
    return synth.make_camera(tuple(truth.sizes[d] for d in ("y", "x")), seed, truth.attrs["camera_kind"], pointing)


def true_state(cam: synth.Camera, mask: np.ndarray, alt: float, az: float, radius_deg: float) -> str:
    """The renderer's line-of-sight state within ``radius_deg`` of (alt, az): clear, cloudy, hidden (the target's
    own pixel is not sky and neither is anything within the radius: below the horizon or behind an obstacle), or
    ambiguous (cloud and clear, or sky and not sky, within the radius)."""
    th, a = np.radians(cam.theta.astype(np.float64)), cam.az.astype(np.float64)
    v = np.stack([np.sin(th) * np.sin(a), np.sin(th) * np.cos(a), np.cos(th)], axis=-1)
    t = np.array([np.cos(np.radians(alt)) * np.sin(np.radians(az)), np.cos(np.radians(alt)) * np.cos(np.radians(az)),
                  np.sin(np.radians(alt))])  # fmt: skip
    cosd = v @ t
    near = cosd >= np.cos(np.radians(radius_deg))
    sky = cam.sky
    if not near.any():
        return "ambiguous"
    if not sky[near].any():
        return "hidden" if not sky.ravel()[int(np.argmax(cosd))] else "ambiguous"
    if not sky[near].all():
        return "ambiguous"
    cloud = mask[near].astype(bool)
    return "cloudy" if cloud.all() else "clear" if not cloud.any() else "ambiguous"
