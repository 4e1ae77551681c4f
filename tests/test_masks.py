"""Mask generation on a tiny synthetic archive: sky geometry, normalization, clear-sky model, masks, flags."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cirrus_batch import masks as M
from cirrus_batch import synth

SHAPE = (96, 128)


@dataclass
class Tiny:
    raw: np.ndarray
    temps: np.ndarray
    truth: np.ndarray
    sky: np.ndarray
    kinds: np.ndarray
    geom: M.SkyGeometry
    model: M.ClearSkyModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    dest = tmp_path_factory.mktemp("masks") / "archive"
    summary = synth.write_archive(
        dest, nights=5, per_night=16, cadence_min=5, shape=SHAPE, seed=2, progress=False
    )
    ds = xr.open_zarr(summary.truth, consolidated=False)
    raws, temps = [], []
    for src in ds["source"].values:
        data, hdr = synth.read_fits(dest / str(src))
        raws.append(data.astype(np.uint16))
        temps.append(float(hdr["AMBTEMP"]))
    raw = np.stack(raws)
    temps_a = np.array(temps)
    geom = M.estimate_sky(raw[::2])
    model = M.fit_clear_sky(raw[::2], temps_a[::2], geom)
    return Tiny(
        raw=raw, temps=temps_a, truth=ds["mask"].values, sky=ds["sky"].values.astype(bool),
        kinds=np.array(ds["night_kind"].values.tolist()), geom=geom, model=model,
    )  # fmt: skip


def test_sky_geometry_matches_truth(tiny: Tiny) -> None:
    g, sky = tiny.geom, tiny.sky
    iou = (g.sky & sky).sum() / (g.sky | sky).sum()
    assert iou > 0.95
    cam = synth.make_camera(SHAPE, 2)
    assert abs(g.center[0] - cam.cy) < 1.5 and abs(g.center[1] - cam.cx) < 1.5
    assert abs(g.radius - cam.radius) < 1.5
    assert g.zenith.dtype == np.float32 and g.zenith[g.sky].max() < 90


def test_geometry_attrs_roundtrip_and_config(tiny: Tiny) -> None:
    attrs = json.loads(json.dumps(tiny.geom.to_attrs()))
    g2 = M.SkyGeometry.from_attrs(attrs, SHAPE, tiny.geom.sky.astype(np.uint8))
    np.testing.assert_allclose(g2.zenith, tiny.geom.zenith, atol=1e-4)
    assert g2.sky.dtype == bool and np.array_equal(g2.sky, tiny.geom.sky)
    # geometry given in the config: no estimation of the circle
    cfg = M.SkyConfig(center=[48.0, 64.0], radius=40.0)
    g3 = M.estimate_sky(tiny.raw[:6], cfg)
    assert g3.center == (48.0, 64.0) and g3.radius == 40.0
    assert not g3.sky[g3.zenith >= 90].any()


def test_horizon_file(tiny: Tiny, tmp_path: Path) -> None:
    csv = tmp_path / "horizon.csv"
    csv.write_text("azimuth_deg,elevation_deg\n0,30\n180,30\n")
    g = M.estimate_sky(tiny.raw[:4], M.SkyConfig(horizon_file=str(csv)))
    assert g.sky.any() and g.zenith[g.sky].max() < 60.5


def test_normalization_deterministic_roundtrip(tiny: Tiny) -> None:
    norm = M.fit_normalization(tiny.raw[::3], tiny.geom)
    assert norm.to_attrs() == M.fit_normalization(tiny.raw[::3], tiny.geom).to_attrs()
    norm2 = M.Normalization.from_attrs(json.loads(json.dumps(norm.to_attrs())))
    a = M.normalize(tiny.raw[:3], norm)
    b = M.normalize(tiny.raw[:3], norm2)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    sky_vals = a[:, tiny.geom.sky]
    assert 0.0 < np.median(sky_vals) < 1.0
    bad = tiny.raw[0].copy()
    bad[10, 10] = M.NODATA
    assert M.normalize(bad, norm)[10, 10] == norm.params["fill"]


def test_clear_sky_model(tiny: Tiny) -> None:
    model, geom = tiny.model, tiny.geom
    attrs = json.loads(json.dumps(model.to_attrs()))
    assert M.ClearSkyModel.from_attrs(attrs) == model
    assert model.use_temperature and model.n_clear >= 3
    # the model picked clear frames
    truth_cf = tiny.truth[::2][:, tiny.sky].mean(axis=1)
    assert truth_cf[model.clear_index].max() < 0.01
    typical = M.clear_sky(model, geom, 5.0)
    zen = geom.zenith
    assert typical.shape == SHAPE
    horizon, zenith = typical[geom.sky & (zen > 75)].mean(), typical[geom.sky & (zen < 15)].mean()
    assert horizon > zenith + 500  # the horizon is brighter than the zenith
    assert M.clear_sky(model, geom, np.array([0.0, 10.0])).shape == (2, *SHAPE)
    # residual of truly clear frames ~ 0 (noise only, no bias)
    clear = np.flatnonzero(tiny.truth[:, tiny.sky].sum(axis=1) == 0)[:6]
    fit = M.clear_sky(model, geom, tiny.temps[clear], raw=tiny.raw[clear])
    res = (tiny.raw[clear].astype(np.float32) - fit)[:, geom.sky]
    assert abs(float(np.median(res))) < 10
    assert float(np.std(res)) < 60


def test_masks_match_truth(tiny: Tiny) -> None:
    m = M.cloud_masks(tiny.raw, tiny.temps, tiny.geom, tiny.model)
    assert m.shape == tiny.raw.shape and m.dtype == np.uint8
    assert not m[:, ~tiny.geom.sky].any()
    r = M.evaluate(m, tiny.truth, tiny.sky, tiny.kinds, 0.05)
    assert r["iou"] > 0.85
    assert r["per_kind"]["cirrus"]["iou"] > 0.6
    assert r["clear_false_alarm"] < 0.01
    assert r["label_accuracy"] > 0.9
    # the naive per-image stretch fails on clear frames
    naive = M.evaluate(M.naive_masks(tiny.raw, tiny.sky), tiny.truth, tiny.sky, tiny.kinds, 0.05)
    assert naive["clear_false_alarm"] > 0.1
    cf = M.cloud_fraction(m, tiny.geom.sky)
    assert cf.dtype == np.float32 and cf.shape == (len(m),) and np.all((cf >= 0) & (cf <= 1))


def test_residuals_come_from_the_same_fits_as_the_masks(tiny: Tiny) -> None:
    m, r = M.masks_and_residuals(tiny.raw, tiny.temps, tiny.geom, tiny.model)
    np.testing.assert_array_equal(m, M.cloud_masks(tiny.raw, tiny.temps, tiny.geom, tiny.model))
    assert r.shape == tiny.raw.shape and r.dtype == np.float32 and not r[:, ~tiny.geom.sky].any()
    truth = tiny.truth.astype(bool) & tiny.geom.sky
    clear = ~tiny.truth.astype(bool) & tiny.geom.sky
    assert abs(float(np.median(r[clear]))) < 0.05  # ~0 sigma on clear sky
    assert float(np.median(r[truth])) > 1.0  # clouds stand out (asinh(z / 4) / 2 > 1: z > 4.7 sigma)
    assert float(np.median(r[truth & m.astype(bool)])) > float(np.median(r[truth & ~m.astype(bool)]))


def test_clear_frames_not_cloudy(tiny: Tiny) -> None:
    clear = tiny.kinds == "clear"
    m = M.cloud_masks(tiny.raw[clear], tiny.temps[clear], tiny.geom, tiny.model)
    assert M.cloud_fraction(m, tiny.geom.sky).max() < 0.01
    # no temperature in the header: the model goes without its temperature term
    nan = np.full(tiny.temps.shape, np.nan)
    model = M.fit_clear_sky(tiny.raw[::2], nan[::2], tiny.geom)
    assert not model.use_temperature
    m2 = M.cloud_masks(tiny.raw[clear], nan[clear], tiny.geom, model)
    assert M.cloud_fraction(m2, tiny.geom.sky).max() < 0.01


def test_quality_flags_and_robustness(tiny: Tiny) -> None:
    good = tiny.raw[0]
    const = np.full(SHAPE, 1234, np.uint16)
    sat = good.copy()
    sat[tiny.geom.sky] = M.ADU_MAX
    nod = good.copy()
    nod[tiny.geom.sky & (tiny.geom.zenith < 30)] = M.NODATA
    allnod = np.full(SHAPE, M.NODATA, np.uint16)
    stack = np.stack([good, const, sat, nod, allnod])
    flags = M.quality_flags(stack, tiny.geom)
    assert flags.dtype == np.uint8
    assert flags[0] == 0
    assert flags[1] & M.QUALITY_CONSTANT
    assert flags[2] & M.QUALITY_SATURATED and not flags[2] & M.QUALITY_CONSTANT
    assert flags[3] == M.QUALITY_NODATA
    assert flags[4] & M.QUALITY_NODATA and flags[4] & M.QUALITY_CONSTANT
    temps = np.array([tiny.temps[0], np.nan, 5.0, tiny.temps[0], 5.0])
    m = M.cloud_masks(stack, temps, tiny.geom, tiny.model)
    assert m.shape == stack.shape
    assert not m[1].any() and not m[2].any() and not m[4].any()
    assert not m[3][nod == M.NODATA].any()
    # a partial no-data frame still gets a mask elsewhere, equal to the full frame's outside the hole
    full = M.cloud_masks(good, tiny.temps[0], tiny.geom, tiny.model)
    hole = nod == M.NODATA
    assert np.mean(m[3][~hole] == full[~hole]) > 0.98


def test_evaluate_hand_made() -> None:
    sky = np.ones((2, 2), bool)
    sky[1, 1] = False  # ignored pixel
    truth = np.array([[[1, 1], [0, 1]], [[0, 0], [0, 0]]], np.uint8)
    mask = np.array([[[1, 0], [1, 0]], [[1, 0], [0, 1]]], np.uint8)
    r = M.evaluate(mask, truth, sky, np.array(["a", "b"]), cloudy_threshold=0.5)
    # frame 0: tp=1 fp=1 fn=1; frame 1: tp=0 fp=1 fn=0
    assert r["iou"] == pytest.approx(1 / 4)
    assert r["precision"] == pytest.approx(1 / 3)
    assert r["recall"] == pytest.approx(1 / 2)
    assert r["f1"] == pytest.approx(2 / 5)
    assert r["per_kind"]["a"]["iou"] == pytest.approx(1 / 3)
    assert r["per_kind"]["b"]["iou"] == 0.0
    assert r["clear_false_alarm"] == pytest.approx(1 / 3) and r["n_clear_frames"] == 1
    # cf(mask) = [2/3, 1/3] vs cf(truth) = [2/3, 0] at threshold 0.5: both right
    assert r["label_accuracy"] == 1.0
    assert all(isinstance(v, float) for k, v in r.items() if k in ("iou", "f1", "precision", "recall"))
    assert np.allclose(M.cloud_fraction(mask, sky), [2 / 3, 1 / 3])


def test_otsu_and_stretch_options(tiny: Tiny) -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.2, 0.02, 1000), rng.normal(0.8, 0.02, 1000)])
    assert 0.3 < M.otsu(v) < 0.7
    frames = tiny.raw[tiny.kinds == "broken"][:3]
    temps = tiny.temps[tiny.kinds == "broken"][:3]
    base = M.cloud_masks(frames, temps, tiny.geom, tiny.model)
    for cfg in (M.MaskConfig(interval="percentile", stretch="log"), M.MaskConfig(stretch="sqrt"),
                M.MaskConfig(stretch="linear", threshold=0.3)):  # fmt: skip
        m = M.cloud_masks(frames, temps, tiny.geom, tiny.model, cfg)
        assert np.mean(m == base) > 0.9
    with pytest.raises(ValueError):
        M.cloud_masks(frames, temps, tiny.geom, tiny.model, M.MaskConfig(stretch="nope"))


def test_quality_panel(tiny: Tiny, tmp_path: Path) -> None:
    idx = [0, 20, 40]
    raw = tiny.raw[idx]
    clear = M.clear_sky(tiny.model, tiny.geom, tiny.temps[idx], raw=raw)
    m = M.cloud_masks(raw, tiny.temps[idx], tiny.geom, tiny.model)
    out = M.quality_panel(raw, clear, m, tiny.truth[idx], tiny.geom, ["a", "b", "c"], tmp_path / "p.png")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = M.quality_panel(raw[0], clear[0], m[0], None, tiny.geom, None, tmp_path / "q.png")
    assert out2.stat().st_size > 1000
