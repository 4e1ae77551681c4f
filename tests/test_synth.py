"""Tests of the synthetic LWIR archive generator (tiny images, a few frames)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cirrus_batch import synth
from cirrus_batch.synth import radiometry as rad

SHAPE = (48, 64)
NAME = re.compile(r"^(\d{4})/(\d{8})/lwircam_(\d{8})T(\d{6})\.fits(\.fz)?$")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.fits*"))


def _stack(root: Path, truth: xr.Dataset) -> np.ndarray:
    return np.stack([synth.read_fits(root / str(s))[0] for s in truth["source"].values]).astype(np.float64)


def _renderer(
    camera: str,
    kind: str,
    shape=SHAPE,
    per_night: int = 6,
    seed: int = 1,
    cadence: float = 10.0,
    **night_changes,
):
    cam = synth.make_camera(shape, seed, camera)
    night = synth.make_night(seed, 0, kind, "2026-01-05", per_night, cadence)
    return synth.NightRenderer(cam, replace(night, **night_changes), seed)


def _sky_radiance(r: synth.NightRenderer, k: int) -> np.ndarray:
    """Scene radiance of frame k on the full frame (NaN outside the scene pixels)."""
    out = np.full(r.cam.shape[0] * r.cam.shape[1], np.nan)
    out[r.cam.scene_idx] = r.scene(k)[0]
    return out.reshape(r.cam.shape)


@pytest.fixture(scope="module")
def season(tmp_path_factory: pytest.TempPathFactory) -> tuple[synth.SynthSummary, xr.Dataset]:
    dest = tmp_path_factory.mktemp("season") / "archive"
    summary = synth.write_archive(dest, nights=8, per_night=4, shape=SHAPE, seed=3, progress=False)
    return summary, xr.open_zarr(summary.truth, consolidated=False).load()


def test_layout_headers_and_range(season):
    summary, truth = season
    files = _files(summary.archive)
    assert len(files) == summary.n_images == 32
    assert [n[1] for n in summary.nights] == list(synth.KINDS)
    for i, rel in enumerate(truth["source"].values):
        m = NAME.match(rel)
        assert m and m.group(2).startswith(m.group(1)) and m.group(5) is None
        data, hdr = synth.read_fits(summary.archive / rel)
        assert data.dtype == np.uint16 and data.shape == SHAPE and data.max() <= synth.ADU_MAX
        assert {"DATE-OBS", "EXPTIME", "AMBTEMP", "INSTRUME", "BUNIT"} <= set(hdr)
        stamp = np.datetime64(hdr["DATE-OBS"]).astype("datetime64[s]").item().strftime("%Y%m%dT%H%M%S")
        assert rel.endswith(f"lwircam_{stamp}.fits")
        assert isinstance(hdr["EXPTIME"], float) and hdr["AMBTEMP"] == pytest.approx(
            truth["ambtemp"].values[i], abs=0.01
        )
    assert files[0].startswith("2026/20260105/lwircam_20260105T1900")


def test_truth_store_and_geometry(season):
    summary, truth = season
    assert sorted(truth["source"].values.tolist()) == _files(summary.archive)
    assert np.all(np.diff(truth["time"].values) > np.timedelta64(0))
    assert truth["mask"].dtype == np.uint8 and truth["mask"].shape == (32, *SHAPE)
    assert set(truth["night_kind"].values.tolist()) == set(synth.KINDS)
    cam = synth.make_camera(SHAPE, 3, synth.DEFAULT_CAMERA)
    attrs = truth.attrs
    assert (
        attrs["camera_kind"] == "housing" and attrs["projection"] == "equidistant" and attrs["fov_deg"] == 180
    )
    np.testing.assert_allclose(attrs["center"], [cam.cy, cam.cx], atol=1e-3)
    np.testing.assert_array_equal(truth["sky"].values.astype(bool), cam.sky)
    assert not (truth["mask"].values.astype(bool) & ~cam.sky).any()
    frac = truth["mask"].values[:, cam.sky].mean(axis=1)
    np.testing.assert_allclose(truth["cloud_fraction"].values, frac, rtol=1e-6)
    # a pixel at the stated radius from the stated centre looks at the horizon
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    r = np.hypot(yy - attrs["center"][0], xx - attrs["center"][1])
    ring = np.abs(r - attrs["radius_px"]) < 0.5
    assert ring.any() and np.all(np.abs(cam.theta[ring] - 90) < 90 / attrs["radius_px"])
    assert not cam.sky[r > attrs["radius_px"]].any()


@pytest.mark.parametrize("camera", list(synth.CAMERA_KINDS))
def test_every_camera_and_sky_kind_renders(camera):
    cam = synth.make_camera((48, 60), 2, camera)
    assert 0.3 < cam.sky.mean() < 0.9 and (cam.radius > cam.circle_px) == (cam.kind.fov_deg < 180)
    for i, kind in enumerate(synth.KINDS):
        r = synth.NightRenderer(cam, synth.make_night(2, i, kind, "2026-01-05", 3, 10.0), 2)
        for k in range(3):
            raw, mask = r.render(k)
            assert (
                raw.dtype == np.uint16 and raw.shape == (48, 60) and not (mask.astype(bool) & ~cam.sky).any()
            )
            assert np.all(raw[:, cam.dead_col] < r.frame(k).offset + 40)  # dead column: offset only
            assert np.all(np.isfinite(r.scene(k)[0]))


def test_warm_housing_brighter_than_clear_sky():
    for kind in ("clear-dry", "clear-humid"):
        r = _renderer("housing", kind)
        raw = r.render(0)[0].astype(float)
        cam = r.cam
        housing = raw.ravel()[cam.gain_house > 0.98]
        zenith = raw[cam.sky & (cam.theta < 20)]
        assert housing.size > 50 and np.median(housing) > np.median(zenith) + 300


def test_signal_free_rim_is_offset():
    r = _renderer("darkrim", "overcast")
    raw = r.render(2)[0].astype(float)
    cam = r.cam
    outside = (cam.gain_house == 0) & (cam.gain_scene == 0)
    outside[np.arange(outside.size) % cam.shape[1] == cam.dead_col] = False
    assert outside.sum() > 200
    assert abs(np.median(raw.ravel()[outside]) - r.frame(2).offset) < 10
    assert np.median(raw[cam.sky]) > r.frame(2).offset + 1000


def test_clipped_circle_touches_top_and_bottom():
    r = _renderer("clipped", "clear-dry", shape=(48, 60))
    cam = r.cam
    inside = cam.gain_scene.reshape(cam.shape) > 0  # the image circle (sky and obstacles)
    assert inside[0].sum() > 5 and inside[-1].sum() > 5 and not inside[:, 0].any() and not inside[:, -1].any()
    rows = np.flatnonzero(cam.sky.any(axis=1))
    assert rows[0] <= 2 and rows[-1] >= cam.shape[0] - 3  # the sky nearly fills the short side
    raw = r.render(0)[0].astype(float)
    corners = raw[[0, 0, -1, -1], [1, -2, 1, -2]]
    assert np.all(corners > np.median(raw[cam.sky & (cam.theta < 30)]) + 300)  # housing in the corners


def test_humid_zenith_brighter_than_dry_at_equal_ambient():
    zen, t_amb = {}, []
    for kind, dep in (("clear-dry", 20.0), ("clear-humid", 1.0)):
        r = _renderer("housing", kind, t_amb0=12.0, t_rate=0.0, dew_dep=(dep, 0.0, 0.0))
        zen[kind] = np.nanmedian(_sky_radiance(r, 0)[r.cam.theta < 15])
        t_amb.append(r.frame(0).t_amb)
    assert t_amb[0] == t_amb[1]
    l_amb = float(rad.band_radiance(12.0 + rad.T0))
    dry, humid = zen["clear-dry"] / l_amb, zen["clear-humid"] / l_amb
    assert 0.05 < dry < 0.25 and 0.3 < humid < 0.8 and humid > 2 * dry, (zen, l_amb)
    assert 0.1 < rad.zenith_emissivity(0.5) < 0.25 and 0.4 < rad.zenith_emissivity(3.0) < 0.65


def test_clear_horizon_brighter_than_zenith():
    for camera in ("housing", "clipped"):
        r = _renderer(camera, "clear-dry", shape=(96, 120))
        cam, radiance = r.cam, _sky_radiance(r, 1)
        bands = [
            np.nanmean(radiance[cam.sky & (cam.theta >= lo) & (cam.theta < lo + 20)])
            for lo in (0, 20, 40, 60)
        ]
        assert np.all(np.diff(bands) > 0) and bands[-1] > 2 * bands[0]
        raw = r.render(1)[0].astype(float)
        assert raw[cam.sky & (cam.theta > 70)].mean() > raw[cam.sky & (cam.theta < 20)].mean() + 100


def test_overcast_flat_near_ambient_and_cloud():
    r = _renderer("housing", "overcast", shape=(96, 120))
    cam, radiance = r.cam, _sky_radiance(r, 3)
    zen = np.nanmedian(radiance[cam.sky & (cam.theta < 30)])
    low = np.nanmedian(radiance[cam.sky & (cam.theta > 60)])
    l_amb = float(rad.band_radiance(r.frame(3).t_amb + rad.T0))
    assert abs(low / zen - 1) < 0.15 and 0.75 < zen / l_amb < 1.05, (zen, low, l_amb)
    assert r.render(3)[1][cam.sky].mean() > 0.9


def test_cirrus_faint_positive_and_masked():
    r = _renderer("housing", "cirrus", shape=(96, 120))
    clear = synth.NightRenderer(r.cam, replace(r.night, layers=()), r.seed)
    mask = r.render(2)[1].astype(bool)
    diff = _sky_radiance(r, 2) - _sky_radiance(clear, 2)
    assert 0.05 < mask[r.cam.sky].mean() < 0.95
    assert np.all(diff[r.cam.sky] >= -1e-4) and np.median(diff[mask]) > 0.3
    l_amb = float(rad.band_radiance(r.frame(2).t_amb + rad.T0))
    assert np.median(diff[mask & (r.cam.theta < 45)]) < 0.35 * l_amb  # thin and cold: a small addition


def test_arriving_clear_then_overcast():
    r = _renderer("ortho", "arriving", per_night=10)
    sky = r.cam.sky
    cf = [r.render(k)[1][sky].mean() for k in range(10)]
    assert cf[0] == cf[1] == cf[2] == 0 and min(cf[-3:]) > 0.9 and 0 < cf[5] < 1, cf


def test_fog_is_cloud_everywhere():
    r = _renderer("darkrim", "fog")
    assert r.render(0)[1][r.cam.sky].all()


def test_ffc_jump_changes_offset():
    r = _renderer("darkrim", "clear-dry", per_night=12)
    k = r.night.ffc[0]
    cam = r.cam
    outside = ((cam.gain_house == 0) & (cam.gain_scene == 0)).reshape(cam.shape)
    outside[:, cam.dead_col] = False
    a, b = (r.render(j)[0][outside].astype(float).mean() for j in (k - 1, k))
    expected = r.frame(k).offset - r.frame(k - 1).offset
    assert abs(expected) > 8 and abs((b - a) - expected) < 2
    assert abs(r.night.ffc_step[0]) >= 10


def test_ambtemp_can_be_omitted(tmp_path):
    s = synth.write_archive(tmp_path / "a", nights=1, per_night=1, shape=SHAPE, ambtemp=False, progress=False)
    hdr = synth.read_fits(next(s.archive.rglob("*.fits")))[1]
    assert "AMBTEMP" not in hdr and "DATE-OBS" in hdr


def test_compressed_matches_plain(tmp_path):
    kw = {"nights": 2, "per_night": 2, "shape": SHAPE, "seed": 5, "progress": False}
    plain = synth.write_archive(tmp_path / "plain", **kw)
    packed = synth.write_archive(tmp_path / "packed", compress=True, **kw)
    fp, fz = _files(plain.archive), _files(packed.archive)
    assert all(f.endswith(".fits.fz") for f in fz) and [f + ".fz" for f in fp] == fz
    for a, b in zip(fp, fz):
        np.testing.assert_array_equal(
            synth.read_fits(plain.archive / a)[0], synth.read_fits(packed.archive / b)[0]
        )


def test_determinism(tmp_path):
    kw = {"nights": 2, "per_night": 3, "shape": SHAPE, "kinds": ["broken", "mixed"], "progress": False}
    kw["camera_kind"] = "clipped"
    a = synth.write_archive(tmp_path / "a", seed=7, **kw)
    b = synth.write_archive(tmp_path / "b", seed=7, **kw)
    c = synth.write_archive(tmp_path / "c", seed=8, **kw)
    ta, tb, tc = (xr.open_zarr(s.truth, consolidated=False).load() for s in (a, b, c))
    for f in _files(a.archive):
        assert (a.archive / f).read_bytes() == (b.archive / f).read_bytes()
    np.testing.assert_array_equal(ta["mask"].values, tb["mask"].values)
    assert not np.array_equal(_stack(a.archive, ta), _stack(c.archive, tc))


def test_consecutive_frames_alike():
    r = _renderer("housing", "broken", shape=(64, 80), per_night=4, cadence=0.5)
    other = _renderer("housing", "broken", shape=(64, 80), per_night=4, cadence=0.5, seed=9)
    m = [r.render(k)[1].astype(bool) for k in range(2)]
    o = other.render(0)[1].astype(bool)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / max((a | b).sum(), 1)

    assert iou(m[0], m[1]) > 0.5 and iou(m[0], m[1]) > iou(m[0], o) + 0.2


def test_parallel_matches_serial(tmp_path):
    distributed = pytest.importorskip("distributed")
    kw = {"nights": 2, "per_night": 2, "shape": (32, 40), "seed": 11, "kinds": ["mixed", "arriving"]}
    kw["progress"] = False
    serial = synth.write_archive(tmp_path / "s", **kw)
    with distributed.Client(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as client:
        par = synth.write_archive(tmp_path / "p", client=client, **kw)
    assert par.nights == serial.nights
    for f in _files(serial.archive):
        assert (serial.archive / f).read_bytes() == (par.archive / f).read_bytes()
    ts, tp = (xr.open_zarr(s.truth, consolidated=False).load() for s in (serial, par))
    xr.testing.assert_identical(ts, tp)


def test_montages(season, tmp_path):
    summary, _ = season
    out = synth.montage(summary.archive, tmp_path / "m.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    grid = synth.matrix(
        tmp_path / "x.png", cameras=["housing", "ortho"], kinds=["fog", "cirrus"], shape=(32, 40)
    )
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_kinds_rejected(tmp_path):
    with pytest.raises(ValueError, match="camera kind"):
        synth.write_archive(tmp_path / "a", nights=1, per_night=1, shape=SHAPE, camera_kind="pinhole")
    with pytest.raises(ValueError, match="sky kind"):
        synth.write_archive(tmp_path / "a", nights=1, per_night=1, shape=SHAPE, kinds=["clear"])


def test_default_truth_path():
    assert synth.default_truth_path("/x/archive/") == Path("/x/archive_truth.zarr")
