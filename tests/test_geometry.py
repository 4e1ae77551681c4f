"""Sky geometry from what pixels do over a season: any outside (dark, warm housing, clipped by the sensor), every
projection, obstacles, hot pixels; attrs, config block, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cirrus_batch import geometry as G
from cirrus_batch.radiometry import band_radiance


@pytest.mark.parametrize("projection", G.PROJECTIONS)
@pytest.mark.parametrize("fov", [150.0, 180.0, 190.0])
def test_projection_round_trip(projection: str, fov: float) -> None:
    if projection == "orthographic" and fov > 180:
        pytest.skip("an orthographic lens cannot see beyond 90°")
    shape, center, radius = (101, 121), (50.0, 60.0), 48.0
    zen = G.zenith_map(shape, center, radius, projection, fov)
    for theta in (10.0, 45.0, 70.0, min(fov / 2, 89.0)):
        r = float(G.radius_of(theta, radius, projection, fov))
        assert zen[50, int(round(60 + r))] == pytest.approx(theta, abs=1.5)
    assert zen[50, 60] < 2 and zen[0, 0] > fov / 2  # centre at the zenith; corners outside the circle
    az = G.azimuth_map(shape, center, north_deg=30.0)
    assert az[10, 60] == pytest.approx(30.0, abs=1) and az[50, 110] == pytest.approx(120.0, abs=1)


def camera_sample(outside: str, n: int = 40, shape=(90, 112), radius: float = 40.0, seed: int = 0,
                  center=(44.0, 57.0), obstacle: bool = True):  # fmt: skip
    """Hand-made season: weather (smooth random fields) inside the circle, a wall that follows the ambient
    temperature, and outside either signal-free offset, a warm housing, or nothing special (clipped circle)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = np.hypot(yy - center[0], xx - center[1])
    inside = r < radius
    wall = inside & (r > 0.85 * radius) & (xx < center[1] - 0.5 * radius) if obstacle else np.zeros(shape, bool)
    temps = rng.uniform(-5, 20, n)
    lrad = band_radiance(temps)
    gain, off = 8000.0, 1500.0
    out = np.empty((n, *shape), np.float32)
    for i in range(n):
        drift = rng.normal(0, 30)
        weather = ndimage.gaussian_filter(rng.normal(0, 1, shape), 6)
        weather = 0.3 + 0.1 * (r / radius) ** 2 + rng.uniform(0, 0.4) * (weather > rng.normal(0.0, 0.05))
        img = off + drift + gain * lrad[i] * np.where(inside, weather, 1.02 if outside == "warm" else 0.0)
        img = np.where(wall, off + drift + gain * lrad[i] * 0.98, img)
        out[i] = img + rng.normal(0, 15, shape)
    raw = np.clip(out, 0, 16383).astype(np.uint16)
    raw[:, 20, 30] = 16383  # a hot pixel
    return raw, temps, inside & ~wall


@pytest.mark.parametrize("outside", ["dark", "warm"])
def test_circle_found_whatever_lies_outside(outside: str) -> None:
    raw, temps, true_sky = camera_sample(outside)
    g = G.estimate_sky(raw, temps)
    assert g.outside == outside
    assert abs(g.center[0] - 44) < 1.5 and abs(g.center[1] - 57) < 1.5
    assert abs(g.radius - 40) < 3
    iou = (g.sky & true_sky).sum() / (g.sky | true_sky).sum()
    assert iou > 0.9
    assert not g.sky[20, 30]  # the hot pixel
    assert g.ambient.sum() > 20  # the wall (and a warm housing) give the ambient reference
    assert g.dark.any() == (outside == "dark")


def test_circle_clipped_by_the_sensor() -> None:
    shape = (80, 130)
    raw, temps, true_sky = camera_sample("warm", shape=shape, radius=48.0, center=(40.0, 64.0))
    g = G.estimate_sky(raw, temps)
    assert abs(g.center[0] - 40) < 2 and abs(g.center[1] - 64) < 2 and abs(g.radius - 48) < 3.5
    assert g.sky[0].any() and g.sky[-1].any()  # the sky touches the top and bottom rows


def test_without_temperatures_the_brightest_steady_pixels_drive() -> None:
    raw, _, true_sky = camera_sample("warm", seed=4)
    g = G.estimate_sky(raw, None)
    assert (g.sky & true_sky).sum() / (g.sky | true_sky).sum() > 0.85


def test_geometry_from_the_config_and_attrs_round_trip(tmp_path: Path) -> None:
    raw, temps, _ = camera_sample("dark")
    cfg = G.SkyConfig(center=[44.0, 57.0], radius=40.0, projection="equisolid", fov_deg=180.0, north_deg=15.0)
    g = G.estimate_sky(raw, temps, cfg)
    assert g.center == (44.0, 57.0) and g.radius == 40.0 and g.projection == "equisolid"
    assert not g.sky[g.zenith >= 90].any()
    attrs = json.loads(json.dumps(g.to_attrs()))
    g2 = G.SkyGeometry.from_attrs(attrs, g.classes)
    np.testing.assert_array_equal(g2.zenith, g.zenith)
    assert np.array_equal(g2.classes, g.classes) and g2.outside == g.outside
    block = g.config_block()
    assert 'projection = "equisolid"' in block and "radius = 40.0" in block
    horizon = tmp_path / "horizon.csv"
    horizon.write_text("azimuth_deg,elevation_deg\n0,30\n180,30\n")
    g3 = G.estimate_sky(raw, temps, G.SkyConfig(center=[44.0, 57.0], radius=40.0, horizon_file=str(horizon)))
    assert g3.sky.any() and g3.zenith[g3.sky].max() < 60.5


def test_clear_errors_name_the_keys_and_a_given_circle_needs_no_weather() -> None:
    flat = np.full((5, 40, 50), 1000, np.uint16) + np.arange(5, dtype=np.uint16)[:, None, None]
    with pytest.raises(ValueError, match=r"\[prepare.sky\] center, radius"):
        G.estimate_sky(flat, np.arange(5.0))
    # a circle given in the config: its inside is the sky; with a dark outside and no obstacle the horizon ring
    # is the ambient reference
    yy, xx = np.mgrid[0:40, 0:50]
    flat[:, np.hypot(yy - 20, xx - 25) > 19] = 100
    g = G.estimate_sky(flat, np.arange(5.0), G.SkyConfig(center=[20.0, 25.0], radius=18.0))
    assert g.sky.any() and not g.sky[g.zenith >= 90].any() and g.ambient_source == "horizon"
    assert g.ambient.any() and (g.zenith[g.ambient] > 85).all()
    with pytest.raises(ValueError, match="projection must be one of"):
        G.SkyConfig(projection="fisheye")
    with pytest.raises(ValueError, match="fov_deg"):
        G.SkyConfig(fov_deg=20)


def test_a_distant_ridge_is_ground_and_a_dead_column_a_defect() -> None:
    """A ridge near the horizon as warm as the clear sky there (no brightness step) that follows the weather only
    a fifth as much as the sky: ground, not sky; a dead column across the sky: ``defect``, with sky beside it."""
    shape, center, radius = (90, 112), (44.0, 57.0), 40.0
    raw, temps, inside = camera_sample("warm", shape=shape, radius=radius, center=center, obstacle=False, n=60)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = np.hypot(yy - center[0], xx - center[1])
    az = np.degrees(np.arctan2(xx - center[1], -(yy - center[0]))) % 360
    ridge = inside & (r > 0.9 * radius) & (az > 200) & (az < 320)
    gain, off = 8000.0, 1500.0
    steady = off + gain * band_radiance(temps)[:, None] * (0.3 + 0.1 * 0.95**2)  # the clear sky at the rim
    raw = raw.astype(np.float32)
    raw[:, ridge] = 0.2 * raw[:, ridge] + 0.8 * steady
    raw = raw.astype(np.uint16)
    raw[:, :, 70] = 0  # a dead column
    g = G.estimate_sky(raw, temps)
    assert g.sky[ridge].mean() < 0.2, g.sky[ridge].mean()
    away = inside & ~ridge & (np.abs(xx - 70) > 2) & (r < 0.85 * radius)
    assert g.sky[away].mean() > 0.97
    column = inside[:, 70] & (r[:, 70] < 0.85 * radius)
    assert (g.classes[column, 70] == G.DEFECT).all() and g.sky[column, 69].all() and g.sky[column, 71].all()


def test_a_hot_pixel_in_the_sky_casts_no_obstacle_beyond_it() -> None:
    """A hot pixel at 25° zenith angle is far warmer than the clear sky there, like an obstacle's first cell; but
    it is a defect of the sensor, not something standing on the ground: the sky beyond it along its azimuth stays
    sky (it cut a 1°-wide line of 'ground' out to the rim)."""
    shape, center, radius = (90, 112), (44.0, 57.0), 40.0
    raw, temps, inside = camera_sample("warm", shape=shape, radius=radius, center=center, obstacle=False, n=60)
    raw[:, 36, 49] = 16383  # 11 px from the centre, up and left
    g = G.estimate_sky(raw, temps)
    assert not g.sky[36, 49] and g.classes[36, 49] == G.DEFECT
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    r = np.hypot(yy - center[0], xx - center[1])
    az = np.degrees(np.arctan2(xx - center[1], -(yy - center[0]))) % 360
    beyond = inside & (np.abs(az - az[36, 49]) < 3) & (r > 14) & (r < 0.9 * radius)
    assert g.sky[beyond].mean() > 0.97, g.sky[beyond].mean()
