"""Camera orientation: the pixel <-> alt/az model against the independent renderer, the Sun/Moon fit, the store and
the CLI (tiny frames)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import xarray as xr
from scipy import ndimage
from skycase import SITE, SITE_CFG, START, camera_of, true_lens_orientation, write_season

from cirrus_batch import cli, synth
from cirrus_batch.config import IngestConfig, OrientConfig, PrepareConfig
from cirrus_batch.errors import CirrusError
from cirrus_batch.ingest import ingest
from cirrus_batch.orientation import (
    Orientation,
    Sightings,
    altaz_to_pixel,
    fit_orientation,
    pixel_to_altaz,
    search,
    separation_deg,
    sky_coords,
)
from cirrus_batch.prepare import prepare
from cirrus_batch.store import json_attr, open_dataset


@pytest.mark.parametrize("kind", list(synth.CAMERA_KINDS))
@pytest.mark.parametrize("mirror", [False, True])
def test_pixel_model_matches_the_renderer(kind, mirror):
    cam = synth.make_camera((64, 80), 1, kind, synth.Pointing(north_deg=30, mirror=mirror, tilt_deg=2.0,
                                                               tilt_az_deg=60))  # fmt: skip
    lens, ori = true_lens_orientation(synth.geometry_attrs(cam))
    yy, xx = np.mgrid[0:64, 0:80]
    alt, az = pixel_to_altaz(yy[cam.sky], xx[cam.sky], lens, ori)
    d = separation_deg(alt, az, 90 - cam.theta[cam.sky], np.degrees(cam.az[cam.sky]))
    assert d.max() < 1e-3  # float32 maps of the renderer
    y, x = altaz_to_pixel(alt, az, lens, ori)
    assert np.abs(y - yy[cam.sky]).max() < 1e-4 and np.abs(x - xx[cam.sky]).max() < 1e-4


def _moon_frames(pointing: synth.Pointing, shape=(96, 120), nights: int = 8, per_night: int = 14):
    """Frames of clear nights rendered in memory with the Moon, their times and the true sky."""
    cam = synth.make_camera(shape, 4, "housing", pointing)
    images, times = [], []
    for i in range(nights):
        night = synth.make_night(4, i, "clear-dry" if i % 2 else "clear-humid", START, per_night, 15.0)
        r = synth.NightRenderer(cam, night, 4, SITE)
        images += [r.render(k)[0] for k in range(per_night)]
        times.append(night.times)
    return cam, np.stack(images), np.concatenate(times).astype("datetime64[ns]")


@pytest.fixture(scope="module")
def tilted():
    pointing = synth.Pointing(north_deg=-40.0, mirror=True, tilt_deg=1.5, tilt_az_deg=200.0)
    cam, images, times = _moon_frames(pointing)
    found = search(images, times, cam.sky, SITE_CFG, OrientConfig())
    return cam, found


def _tilt_error(a: Orientation, b: Orientation) -> float:
    def vec(o: Orientation) -> np.ndarray:
        t = np.radians(o.tilt_azimuth_deg)
        return o.tilt_deg * np.array([np.sin(t), np.cos(t)])

    return float(np.hypot(*(vec(a) - vec(b))))


def test_moon_found_where_astropy_puts_it(tilted):
    cam, found = tilted
    lens, ori = true_lens_orientation(synth.geometry_attrs(cam))
    y, x = altaz_to_pixel(found.alt, found.az, lens, ori)
    d = np.hypot(y - found.y, x - found.x)
    assert len(found) >= 40 and set(found.body) == {"moon"}
    assert np.median(d) < 0.3 and (d < 1.0).mean() > 0.9


def test_fit_recovers_north_mirror_and_tilt(tilted):
    cam, found = tilted
    lens, truth = true_lens_orientation(synth.geometry_attrs(cam))
    fit = fit_orientation(found, lens, OrientConfig(fit_center=False))
    o = fit.orientation
    assert o.mirror is True and not fit.forced and not fit.warning
    assert abs((o.north_deg - truth.north_deg + 180) % 360 - 180) < 0.5
    assert _tilt_error(o, truth) < 0.5 and abs(o.scale - 1) < 0.01
    assert fit.rms_px < 1.0 and fit.rms_deg < 1.0
    assert fit.other_mirror_px > 3 * fit.median_px
    d = separation_deg(*pixel_to_altaz(found.y, found.x, fit.lens, o), found.alt, found.az)
    assert np.median(d) < 0.5


def test_forced_wrong_mirror_is_named(tilted):
    cam, found = tilted
    lens, _ = true_lens_orientation(synth.geometry_attrs(cam))
    fit = fit_orientation(found, lens, OrientConfig(mirror="no"))
    assert fit.forced and fit.orientation.mirror is False
    assert "probably mirrored" in fit.warning and "mirror = \"auto\"" in fit.warning


def test_centre_off_by_pixels_is_fitted(tilted):
    cam, found = tilted
    lens, truth = true_lens_orientation(synth.geometry_attrs(cam))
    off = replace(lens, center=(lens.center[0] + 1.5, lens.center[1] - 1.0))
    fit = fit_orientation(found, off, OrientConfig())
    assert fit.rms_px < 1.0
    yy, xx = np.mgrid[0 : cam.shape[0], 0 : cam.shape[1]]
    sky = ndimage.binary_erosion(cam.sky, iterations=3)
    d = separation_deg(*pixel_to_altaz(yy[sky], xx[sky], fit.lens, fit.orientation),
                       *pixel_to_altaz(yy[sky], xx[sky], lens, truth))  # fmt: skip
    deg_per_px = 90.0 / (lens.radius * (90.0 / (lens.fov_deg / 2)))  # equidistant
    assert np.percentile(d, 95) < 0.75 * deg_per_px  # a pixel's centre off: the whole sky within a pixel


def test_too_few_sightings_is_an_error(tilted):
    cam, found = tilted
    lens, _ = true_lens_orientation(synth.geometry_attrs(cam))
    few = Sightings(*(getattr(found, f)[:3] for f in ("time", "body", "y", "x", "alt", "az", "snr")))
    with pytest.raises(CirrusError, match="at least 4"):
        fit_orientation(few, lens)


def test_the_sun_by_day():
    pointing = synth.Pointing(north_deg=10.0)
    cam = synth.make_camera((96, 120), 4, "housing", pointing)
    day = synth.Site(28.76, -110.0, 0.0)  # 19-23 UTC is 12-16 local time
    night = synth.make_night(4, 0, "clear-dry", START, 10, 20.0)
    r = synth.NightRenderer(cam, night, 4, day)
    images = np.stack([r.render(k)[0] for k in range(10)])
    site = replace(SITE_CFG, longitude_deg=-110.0, elevation_m=0.0)
    found = search(images, night.times.astype("datetime64[ns]"), cam.sky, site, OrientConfig())
    assert len(found) >= 8 and set(found.body) == {"sun"}
    lens, ori = true_lens_orientation(synth.geometry_attrs(cam))
    y, x = altaz_to_pixel(found.alt, found.az, lens, ori)
    assert np.median(np.hypot(y - found.y, x - found.x)) < 0.5


# ---------------------------------------------------------------- the store and the CLI


@pytest.fixture(scope="module")
def oriented(tmp_path_factory, client):
    tmp = tmp_path_factory.mktemp("orient")
    pointing = synth.Pointing(north_deg=25.0, tilt_deg=1.0, tilt_az_deg=60.0)
    summary = write_season(tmp / "archive", pointing)
    url = str(tmp / "s.zarr")
    ingest(str(summary.archive), url, client, IngestConfig(shard_size=20), progress=False)
    prepare(url, client, PrepareConfig(fit_images=60), progress=False)
    (tmp / "site.toml").write_text("[site]\nlatitude_deg = 28.76\nlongitude_deg = -17.88\nelevation_m = 2396\n")
    return tmp, url, summary, pointing


def test_orient_cli_writes_the_orientation(oriented, capsys):
    tmp, url, summary, pointing = oriented
    assert cli.main(["orient", url, "--config", str(tmp / "site.toml"), "--panel", str(tmp / "o.png")]) == 0
    out = capsys.readouterr().out
    assert "mirror no" in out and (tmp / "o.png").stat().st_size > 10_000
    ds = open_dataset(url)
    assert json_attr(ds.attrs, "site")["latitude_deg"] == 28.76
    o = json_attr(ds.attrs, "orientation")
    truth = xr.open_zarr(summary.truth, consolidated=False).attrs
    assert o["mirror"] is False and o["rms_px"] < 1.0 and o["n_used"] >= 20
    assert abs((o["north_deg"] - truth["up_azimuth_deg"] + 180) % 360 - 180) < 0.5
    # over the whole sky, the fitted camera points where the renderer's does
    zen, az = sky_coords(ds)
    alt = 90 - zen
    assert ds.assign_coords(zenith=zen, azimuth=az)["raw"].coords["zenith"].dims == ("y", "x")
    cam = camera_of(summary, pointing)
    sky = ndimage.binary_erosion(cam.sky, iterations=3)
    d = separation_deg(alt.values[sky], az.values[sky], 90 - cam.theta[sky], np.degrees(cam.az[sky]))
    assert np.median(d) < 0.5 and np.percentile(d, 95) < 1.0
    assert zen.dims == ("y", "x") and zen.attrs["units"] == "deg"


def test_orient_needs_a_site_and_a_prepared_store(oriented, tmp_path, capsys):
    tmp, url, _, _ = oriented
    bare = str(tmp_path / "bare.zarr")
    import shutil

    shutil.copytree(url, bare)
    from cirrus_batch.store import Store

    g = Store.open(bare).group
    g.attrs.pop("site", None)
    assert cli.main(["orient", bare, "--panel", str(tmp_path / "o.png")]) == 1
    assert "has no site" in capsys.readouterr().err
    del g.attrs["prepare"]
    assert cli.main(["orient", bare, "--config", str(tmp / "site.toml")]) == 1
    assert "cirrus prepare" in capsys.readouterr().err
