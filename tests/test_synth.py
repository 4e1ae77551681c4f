"""Tests of the synthetic LWIR archive generator (tiny images, a few frames)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cirrus_batch import synth

SHAPE = (48, 64)
NAME = re.compile(r"^(\d{4})/(\d{8})/lwircam_(\d{8})T(\d{6})\.fits(\.fz)?$")


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.fits*"))


def _stack(root: Path, truth: xr.Dataset) -> np.ndarray:
    return np.stack([synth.read_fits(root / str(s))[0] for s in truth["source"].values]).astype(np.float64)


@pytest.fixture(scope="module")
def season(tmp_path_factory: pytest.TempPathFactory) -> tuple[synth.SynthSummary, xr.Dataset]:
    dest = tmp_path_factory.mktemp("season") / "archive"
    summary = synth.write_archive(dest, nights=5, per_night=6, shape=SHAPE, seed=3, progress=False)
    return summary, xr.open_zarr(summary.truth, consolidated=False).load()


def test_layout_headers_and_range(season):
    summary, _ = season
    files = _files(summary.archive)
    assert len(files) == summary.n_images == 30
    assert [n[:2] for n in summary.nights] == [
        ("20260105", "clear"), ("20260106", "broken"), ("20260107", "cirrus"),
        ("20260108", "overcast"), ("20260109", "mixed"),
    ]  # fmt: skip
    for rel in files:
        m = NAME.match(rel)
        assert m and m.group(2).startswith(m.group(1)) and m.group(5) is None
        data, hdr = synth.read_fits(summary.archive / rel)
        assert data.dtype == np.uint16 and data.shape == SHAPE and data.max() <= 16383
        assert {"DATE-OBS", "EXPTIME", "AMBTEMP", "INSTRUME", "BUNIT"} <= set(hdr)
        stamp = np.datetime64(hdr["DATE-OBS"]).astype("datetime64[s]").item().strftime("%Y%m%dT%H%M%S")
        assert rel.endswith(f"lwircam_{stamp}.fits")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", hdr["DATE-OBS"])
        assert isinstance(hdr["EXPTIME"], float) and -10 < hdr["AMBTEMP"] < 20
    assert files[0] == "2026/20260105/lwircam_20260105T190000.fits" or "T19000" in files[0]


def test_compressed_matches_plain(tmp_path):
    kw = dict(nights=2, per_night=3, shape=SHAPE, seed=5, progress=False)
    plain = synth.write_archive(tmp_path / "plain", **kw)
    packed = synth.write_archive(tmp_path / "packed", compress=True, **kw)
    fp, fz = _files(plain.archive), _files(packed.archive)
    assert all(f.endswith(".fits.fz") for f in fz) and [f + ".fz" for f in fp] == fz
    for a, b in zip(fp, fz):
        np.testing.assert_array_equal(synth.read_fits(plain.archive / a)[0], synth.read_fits(packed.archive / b)[0])
    truth = xr.open_zarr(packed.truth, consolidated=False)
    assert list(truth["source"].values) == fz


def test_determinism(tmp_path):
    kw = dict(nights=2, per_night=3, shape=SHAPE, kinds=["broken", "cirrus"], progress=False)
    a = synth.write_archive(tmp_path / "a", seed=7, **kw)
    b = synth.write_archive(tmp_path / "b", seed=7, **kw)
    c = synth.write_archive(tmp_path / "c", seed=8, **kw)
    ta, tb = (xr.open_zarr(s.truth, consolidated=False).load() for s in (a, b))
    np.testing.assert_array_equal(_stack(a.archive, ta), _stack(b.archive, tb))
    np.testing.assert_array_equal(ta["mask"].values, tb["mask"].values)
    tc = xr.open_zarr(c.truth, consolidated=False).load()
    assert not np.array_equal(_stack(a.archive, ta), _stack(c.archive, tc))


def test_truth_store(season):
    summary, truth = season
    assert sorted(truth["source"].values.tolist()) == _files(summary.archive)
    times = truth["time"].values
    assert np.all(np.diff(times) > np.timedelta64(0)) and times.dtype.kind == "M"
    assert truth["mask"].dtype == np.uint8 and truth["mask"].shape == (30, *SHAPE)
    assert set(truth["night_kind"].values.tolist()) == set(synth.KINDS)
    assert truth["night"].values[0] == "20260105" and truth["night"].values[-1] == "20260109"
    cam = synth.make_camera(SHAPE, 3)
    sky = truth["sky"].values.astype(bool)
    np.testing.assert_array_equal(sky, cam.sky)
    assert not sky[cam.theta >= 90].any()  # outside the circle
    assert not sky.ravel()[cam.obstacle_idx].any()  # obstacles
    assert 0.4 < sky.sum() / (np.pi * cam.radius**2) < 0.95
    assert not (truth["mask"].values.astype(bool) & ~sky).any()
    frac = truth["mask"].values[:, sky].mean(axis=1)
    np.testing.assert_allclose(truth["cloud_fraction"].values, frac, rtol=1e-6)


def test_cloud_fractions_by_kind(season):
    _, truth = season
    cf, kind = truth["cloud_fraction"].values, truth["night_kind"].values
    assert np.all(cf[kind == "clear"] == 0)
    assert cf[kind == "overcast"].mean() > 0.8
    assert 0.05 < cf[kind == "broken"].mean() < 0.8 and cf[kind == "cirrus"].mean() > 0.05
    mixed = cf[kind == "mixed"]
    assert (mixed == 0).any() and (mixed > 0.05).any() and mixed[0] == 0


def test_clear_sky_brightens_towards_horizon(season):
    summary, truth = season
    raw = _stack(summary.archive, truth)[truth["night_kind"].values == "clear"].mean(axis=0)
    cam = synth.make_camera(SHAPE, 3)
    sky = cam.sky
    bands = [raw[sky & (cam.theta >= lo) & (cam.theta < lo + 20)].mean() for lo in (0, 20, 40, 60)]
    assert np.all(np.diff(bands) > 0) and bands[-1] - bands[0] > 1000
    obstacles = raw.ravel()[cam.obstacle_idx[cam.theta.ravel()[cam.obstacle_idx] < 89]]
    assert np.median(obstacles) > bands[-1]  # warm obstacles brighter than the sky above them
    assert raw[cam.theta > 95].mean() < bands[0] - 1000  # dark outside the circle


def test_clouds_brighter_than_clear_sky(season):
    summary, truth = season
    raw = _stack(summary.archive, truth)
    mask = truth["mask"].values.astype(bool)
    cam = synth.make_camera(SHAPE, 3)
    for kind in ("broken", "cirrus"):
        sel = truth["night_kind"].values == kind
        band = cam.sky & (cam.theta < 50)
        cloudy = raw[sel][mask[sel] & band]
        clear = raw[sel][~mask[sel] & band]
        assert cloudy.size > 20 and clear.size > 20
        assert np.median(cloudy) > np.median(clear) + 100


def test_consecutive_frames_alike(season):
    _, truth = season
    mask = truth["mask"].values.astype(bool)
    kind = truth["night_kind"].values

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / max((a | b).sum(), 1)

    idx = np.flatnonzero(kind == "cirrus")
    within = np.mean([iou(mask[i], mask[i + 1]) for i in idx[:-1]])
    other = np.flatnonzero(kind == "broken")
    across = np.mean([iou(mask[i], mask[j]) for i, j in zip(idx, other)])
    assert within > 0.5 and within > across + 0.2, (within, across)


def test_parallel_matches_serial(tmp_path):
    distributed = pytest.importorskip("distributed")
    kw = dict(nights=2, per_night=2, shape=(32, 40), seed=11, progress=False)
    serial = synth.write_archive(tmp_path / "s", **kw)
    with distributed.Client(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as client:
        par = synth.write_archive(tmp_path / "p", client=client, **kw)
    assert par.nights == serial.nights
    ts, tp = (xr.open_zarr(s.truth, consolidated=False).load() for s in (serial, par))
    np.testing.assert_array_equal(_stack(serial.archive, ts), _stack(par.archive, tp))
    np.testing.assert_array_equal(ts["mask"].values, tp["mask"].values)


def test_montage(season, tmp_path):
    summary, _ = season
    out = synth.montage(summary.archive, tmp_path / "m.png", n=6)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_default_truth_path():
    assert synth.default_truth_path("/x/archive/") == Path("/x/archive_truth.zarr")
