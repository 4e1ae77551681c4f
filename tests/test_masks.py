"""The mask recipe on hand-made frames (clear, a cloud, a deck, a contradicted model, bad frames), the scores,
and the whole method on a small season of every camera kind of the independent renderer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cirrus_batch import clearsky as C
from cirrus_batch import geometry as G
from cirrus_batch import masks as M
from cirrus_batch import scoring, synth
from cirrus_batch.config import PrepareConfig
from cirrus_batch.prepare import prepare_arrays

SHAPE = (80, 100)


def hand_made() -> tuple[G.SkyGeometry, C.ClearSkyModel, C.Frame]:
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    r = np.hypot(yy - 40, xx - 50)
    classes = np.where(r < 36, G.SKY, np.where(r > 39, G.DARK, G.OTHER)).astype(np.uint8)
    classes[(r < 36) & (r > 33) & (xx < 25)] = G.AMBIENT  # a wall at the horizon
    geom = G.SkyGeometry(center=(40.0, 50.0), radius=37.0, projection="equidistant", fov_deg=180.0, classes=classes)
    theta = (np.arange(90) + 0.5).tolist()
    model = C.ClearSkyModel(theta=theta, transmission=[1.0] * 90, sigma=[0.01] * 90, exponent=0.6, p_lo=0.5, p_hi=0.7,
                            eps_lo=0.01, eps_hi=0.75, eps_typical=0.3, scale={"source": "dark"}, n_clear=10)  # fmt: skip
    return geom, model, C.Frame(geom, model, C.ClearSkyConfig())


def render(geom: G.SkyGeometry, fr: C.Frame, eps: float, extra: np.ndarray | None = None, seed: int = 0):
    """raw ADU: dark 1000, ambient 1000 + 8000, sky = dark + 8000 * brightness (+ noise)."""
    rng = np.random.default_rng(seed)
    img = np.full(SHAPE, 1000.0)
    img[geom.ambient] = 9000.0
    e = fr.clear(eps, 0.6).astype(np.float64)
    if extra is not None:
        e = np.maximum(e, extra.ravel()[fr.sky_idx])
    img.ravel()[fr.sky_idx] = 1000 + 8000 * e
    return np.clip(img + rng.normal(0, 8, SHAPE), 0, 16383).astype(np.uint16)


def run(raw: np.ndarray, eps: float, source: int = 0, cfg: M.MaskConfig | None = None) -> M.Masks:
    geom, model, _ = hand_made()
    raw3 = raw.reshape(-1, *SHAPE)
    n = len(raw3)
    return M.make_masks(raw3, np.full(n, 5.0), np.full(n, eps), np.full(n, 0.6), np.full(n, source), geom, model,
                        cfg or M.MaskConfig(), C.ClearSkyConfig())  # fmt: skip


def test_clear_frame_empty_mask_full_confidence() -> None:
    geom, model, fr = hand_made()
    out = run(render(geom, fr, 0.3), 0.3)
    assert out.mask.sum() == 0 and out.confidence[0] == 1.0 and out.flags[0] == 0
    assert abs(float(np.median(out.residual[0][geom.sky]))) < 0.1
    assert 0.25 < float(np.median(out.brightness[0][geom.sky & (geom.zenith < 20)])) < 0.35


def test_a_cloud_is_found_and_a_deck_covers_the_sky() -> None:
    geom, model, fr = hand_made()
    blob = np.where(np.hypot(*(np.mgrid[0:80, 0:100] - np.array([30, 45])[:, None, None])) < 10, 0.9, 0.0)
    out = run(render(geom, fr, 0.3, blob), 0.3)
    truth = (blob > 0) & geom.sky
    assert (out.mask[0].astype(bool) & truth).sum() / (out.mask[0].astype(bool) | truth).sum() > 0.9
    deck = np.full(SHAPE, 0.93)
    out = run(render(geom, fr, 0.3, deck), 0.3, source=C.EPS_SOURCES["night"])
    assert M.cloud_fraction(out.mask, geom.sky)[0] > 0.97  # horizon included: the deck is extended there
    assert out.flags[0] & M.MASK_FLAGS["eps_from_night"] and out.confidence[0] == pytest.approx(0.9)


def test_nearest_decided_matches_brute_force_on_an_off_centre_sky() -> None:
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:40, 0:60]
    sky = np.hypot(yy - 25, xx - 38) < 14  # its bounding box is not the image
    n = int(sky.sum())
    cloud, undecided = rng.random(n) < 0.5, rng.random(n) < 0.7
    out = M._nearest_decided(cloud, undecided, sky)
    assert (out[~undecided] == cloud[~undecided]).all()
    pts = np.column_stack([yy[sky], xx[sky]])
    d2 = ((pts[undecided][:, None, :] - pts[~undecided][None, :, :]) ** 2).sum(-1)
    nearest = d2 == d2.min(axis=1, keepdims=True)  # ties: any decided pixel at the least distance will do
    chosen = out[undecided][:, None] == cloud[~undecided][None, :]
    assert (nearest & chosen).any(axis=1).all()


def test_contradicted_model_falls_back_to_the_stretch_recipe() -> None:
    geom, model, fr = hand_made()
    raw = render(geom, fr, 0.3)
    raw[geom.sky] = (raw[geom.sky] - 1500).astype(np.uint16)  # far darker than any clear sky
    out = run(raw, 0.3)
    assert out.flags[0] & M.MASK_FLAGS["model_contradicted"] and out.confidence[0] <= 0.4
    assert M.describe_flags(out.flags)["model_contradicted"] == 1


def test_bad_frames_are_flagged_never_fatal() -> None:
    geom, model, fr = hand_made()
    good = render(geom, fr, 0.3)
    const = np.full(SHAPE, 1234, np.uint16)
    sat = good.copy()
    sat[geom.sky] = M.ADU_MAX
    hole = good.copy()
    hole[geom.sky & (geom.zenith < 30)] = M.NODATA
    out = run(np.stack([good, const, sat, hole]), 0.3)
    assert out.quality[1] & M.QUALITY_CONSTANT and out.quality[2] & M.QUALITY_SATURATED
    assert out.quality[3] == M.QUALITY_NODATA and out.flags[3] & M.MASK_FLAGS["nodata"]
    assert not out.mask[1:3].any() and (out.confidence[1:3] == 0).all()
    assert 0 < out.confidence[3] < 1 and not out.mask[3][hole == M.NODATA].any()


def test_stretch_options_and_otsu() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.2, 0.02, 1000), rng.normal(0.8, 0.02, 1000)])
    assert 0.3 < M.otsu(v) < 0.7
    geom, model, fr = hand_made()
    blob = np.where(np.mgrid[0:80, 0:100][1] > 55, 0.6, 0.0)
    raw = render(geom, fr, 0.3, blob)
    base = run(raw, 0.3).mask
    for cfg in (M.MaskConfig(interval="percentile", stretch="log"), M.MaskConfig(stretch="sqrt"),
                M.MaskConfig(stretch="linear", threshold=0.3)):  # fmt: skip
        assert np.mean(run(raw, 0.3, cfg=cfg).mask == base) > 0.95
    with pytest.raises(ValueError, match="stretch"):
        M.MaskConfig(stretch="nope")


def test_scores_hand_made_with_unlabelled_pixels() -> None:
    sky = np.ones((2, 2), bool)
    sky[1, 1] = False
    truth = np.array([[[1, 1], [0, 1]], [[0, 0], [255, 0]]], np.uint8)
    mask = np.array([[[1, 0], [1, 0]], [[1, 0], [1, 1]]], np.uint8)
    r = scoring.evaluate(mask, truth, sky, np.array(["a", "b"]), cloudy_threshold=0.4)
    # frame 0: tp=1 fp=1 fn=1; frame 1: tp=0 fp=1 fn=0 (the unlabelled pixel and the non-sky one are left out)
    assert r["iou"] == pytest.approx(1 / 4) and r["precision"] == pytest.approx(1 / 3)
    assert r["per_kind"]["a"]["iou"] == pytest.approx(1 / 3) and r["per_kind"]["b"]["iou"] == 0.0
    assert r["n_clear_frames"] == 1 and r["clear_false_alarm"] == pytest.approx(1 / 2)
    assert r["clear_label_accuracy"] == 0.0 and r["cloudy_label_accuracy"] == 1.0  # frame 1: cf 1/2 > 0.4


@pytest.mark.parametrize("camera", list(synth.CAMERA_KINDS))
def test_every_camera_of_the_independent_renderer(camera: str, tmp_path: Path) -> None:
    """A small season of each camera kind with clear, broken and overcast nights (plus a humid clear one)."""
    kinds = ["clear-dry", "broken", "overcast", "clear-humid"]
    summary = synth.write_archive(tmp_path / "a", nights=4, per_night=8, cadence_min=8, shape=(120, 150), seed=5,
                                  kinds=kinds, camera_kind=camera, progress=False)  # fmt: skip
    ds = xr.open_zarr(summary.truth, consolidated=False)
    raw = np.stack([synth.read_fits(summary.archive / str(s))[0] for s in ds["source"].values]).astype(np.uint16)
    models, out = prepare_arrays(raw, ds["ambtemp"].values, ds["time"].values, PrepareConfig(fit_images=32))
    sky = ds["sky"].values.astype(bool)
    night = np.array(ds["night_kind"].values.tolist())
    r = scoring.evaluate(out.mask, ds["mask"].values, sky, night)
    assert (models.geometry.sky & sky).sum() / (models.geometry.sky | sky).sum() > 0.8
    assert r["per_kind"]["overcast"]["iou"] > 0.85, r
    assert r["per_kind"]["clear-dry"]["label_accuracy"] == 1.0 and r["cloudy_label_accuracy"] >= 0.9, r
    humid = M.cloud_fraction(out.mask[night == "clear-humid"], models.geometry.sky)
    assert humid.mean() < 0.1  # a humid clear night is not a deck (on this tiny season a few % of false cloud)


def test_clear_frames_of_dry_nights_that_leave_the_optics_open_still_find_the_humid_clear_night(
        tmp_path: Path) -> None:  # fmt: skip
    """Dry clear frames alone fit the housing's optics and the slant-path exponent equally well over a wide range
    (0.35-1.2); a pick among them rejected the humid clear night (ε0 0.63) as not clear. Every frame clear under an
    optics that fits as well is a clear frame: both dry nights and the humid one, no cirrus frame."""
    summary = synth.write_archive(tmp_path / "a", nights=4, per_night=8, cadence_min=10, shape=(96, 120), seed=4,
                                  kinds=["clear-dry", "clear-humid", "clear-dry", "cirrus"], camera_kind="housing",
                                  progress=False)  # fmt: skip
    ds = xr.open_zarr(summary.truth, consolidated=False)
    raw = np.stack([synth.read_fits(summary.archive / str(s))[0] for s in ds["source"].values]).astype(np.uint16)
    models, out = prepare_arrays(raw, ds["ambtemp"].values, ds["time"].values, PrepareConfig(fit_images=32))
    assert models.clear_sky.clear_frames == list(range(24))
    assert max(models.clear_sky.clear_eps) > 0.55 and models.flat is not None and models.flat.frames == 24
    assert M.cloud_fraction(out.mask[8:16], models.geometry.sky).max() < 0.02
