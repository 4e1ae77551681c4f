"""The sky flat: a camera's fixed per-pixel response measured on clear frames, and what it buys (faint cirrus)."""

from __future__ import annotations

import numpy as np
import pytest

from cirrus_batch import clearsky as C
from cirrus_batch import geometry as G
from cirrus_batch import masks as M
from cirrus_batch.skyflat import GAIN_PRIOR

SHAPE = (90, 110)
NOISE = 0.002  # white noise, ambient units


def camera() -> tuple[G.SkyGeometry, C.ClearSkyModel, np.ndarray, np.ndarray]:
    """Geometry, clear-sky model, and the camera's true flat: a gradient across the image (a tilt, vignetting on
    one side: offset) and a gain pattern, both several times the noise."""
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    r = np.hypot(yy - 45, xx - 55)
    classes = np.where(r < 40, G.SKY, np.where(r > 43, G.DARK, G.OTHER)).astype(np.uint8)
    classes[(r > 43) & (yy > 80)] = G.AMBIENT  # the housing at the bottom of the frame
    geom = G.SkyGeometry(center=(45.0, 55.0), radius=41.0, projection="equidistant", fov_deg=180.0, classes=classes)
    theta = (np.arange(90) + 0.5).tolist()
    model = C.ClearSkyModel(theta=theta, transmission=[1.0] * 90, sigma=[0.012] * 90, exponent=0.6, p_lo=0.5,
                            p_hi=0.7, eps_lo=0.01, eps_hi=0.65, eps_typical=0.3, scale={"source": "dark"},
                            n_clear=10)  # fmt: skip
    offset = (0.012 * (xx - 55) / 40 + 0.01 * ((xx < 30) & (r > 30))).astype(np.float32)
    gain = (0.06 * (yy - 45) / 40).astype(np.float32)
    return geom, model, offset, gain


def render(geom, model, offset, gain, eps: float, cloud: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """raw ADU: dark 1000, ambient 9000, sky = dark + 8000 * (a + (1 + b) e_clear (+ cloud) + noise)."""
    fr = C.Frame(geom, model, C.ClearSkyConfig())
    rng = np.random.default_rng(seed)
    e = np.zeros(SHAPE)
    e.ravel()[fr.sky_idx] = fr.clear(eps, 0.6)
    e = offset + (1 + gain) * e + (0 if cloud is None else cloud) + rng.normal(0, NOISE, SHAPE)
    img = np.where(geom.sky, 1000 + 8000 * e, np.where(geom.ambient, 9000.0, 1000.0))
    return np.clip(img, 0, 16383).astype(np.uint16)


def measure(geom, model, raws: list[np.ndarray], eps: list[float]):
    cfg = C.ClearSkyConfig()
    raw = np.stack(raws)
    n = len(raws)
    return M.sky_flat(lambda prior: M.flat_block(raw, np.full(n, 5.0), np.array(eps), np.full(n, 0.6), geom, model,
                                                 cfg, prior), geom, model, cfg)  # fmt: skip


def residual(geom, model, flat, raw: np.ndarray, eps: float) -> np.ndarray:
    """Brightness minus the clear sky on the sky pixels (flattened when ``flat`` is given)."""
    fr = C.Frame(geom, model, C.ClearSkyConfig(), flat)
    a, d = C.levels(raw[None], geom)
    e, _ = fr.brightness(raw, a[0], float(model.scaler.span(a, d, np.array([5.0]))[0]))
    return e - fr.clear(eps, 0.6)


def test_the_flat_takes_the_camera_out_and_leaves_the_noise() -> None:
    geom, model, offset, gain = camera()
    eps = list(np.linspace(0.1, 0.5, 12))
    raws = [render(geom, model, offset, gain, e, seed=i) for i, e in enumerate(eps)]
    # a cloud in one clear frame is left out by the second pass
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    blob = np.hypot(yy - 45, xx - 70) < 8
    raws[3] = render(geom, model, offset, gain, eps[3], cloud=0.3 * blob, seed=3)
    flat = measure(geom, model, raws, eps)
    new = render(geom, model, offset, gain, 0.25, seed=77)  # a clear frame the flat has not seen
    before, after = residual(geom, model, None, new, 0.25), residual(geom, model, flat, new, 0.25)
    assert np.std(before) > 4 * NOISE and np.std(after) < 1.3 * NOISE
    assert np.abs(after[blob[geom.sky]]).mean() < 2 * NOISE  # the cloud did not leak into the flat
    assert np.abs(flat.gain - gain)[geom.sky & ~blob].mean() < 0.01
    # the noise left is the white noise (plus the floor), not the camera's pattern
    assert np.median(flat.sigma) == pytest.approx(np.hypot(NOISE, 0.002), rel=0.25)
    assert flat.frames == 12 and (flat.gain_var[geom.sky] < (0.3 * GAIN_PRIOR) ** 2).all()


def test_a_frame_of_thin_cirrus_among_the_clear_ones_does_not_raise_the_noise() -> None:
    """A frame of thin cirrus taken for clear (a texture of 6x the white noise) is left out of the flat as a whole
    frame: every mask's threshold rests on the noise the flat keeps."""
    from scipy import ndimage

    geom, model, offset, gain = camera()
    eps = list(np.linspace(0.1, 0.5, 12)) + [0.3]
    raws = [render(geom, model, offset, gain, e, seed=i) for i, e in enumerate(eps[:12])]
    texture = ndimage.gaussian_filter(np.random.default_rng(5).normal(0, 1, SHAPE), 1.5)
    raws.append(render(geom, model, offset, gain, 0.3, cloud=6 * NOISE * texture / texture.std(), seed=12))
    flat = measure(geom, model, raws, eps)
    assert flat.frames == 12
    assert np.median(flat.sigma) == pytest.approx(np.hypot(NOISE, 0.002), rel=0.25)


def test_faint_cirrus_is_found_with_the_flat_and_missed_without() -> None:
    geom, model, offset, gain = camera()
    eps = list(np.linspace(0.1, 0.5, 12))
    flat = measure(geom, model, [render(geom, model, offset, gain, e, seed=i) for i, e in enumerate(eps)], eps)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    cirrus = (0.02 * (yy < 45)).astype(np.float64)  # a thin sheet over half the sky, 10x the noise
    raw = render(geom, model, offset, gain, 0.3, cloud=cirrus, seed=99)[None]
    truth = (yy < 45)[geom.sky]
    args = (raw, np.array([5.0]), np.array([0.3]), np.array([0.6]), np.array([0]), geom, model, M.MaskConfig(),
            C.ClearSkyConfig())  # fmt: skip
    with_flat = M.make_masks(*args, flat).mask[0][geom.sky].astype(bool)
    without = M.make_masks(*args).mask[0][geom.sky].astype(bool)
    assert np.mean(with_flat == truth) > 0.95
    assert np.mean(without == truth) < 0.8


def test_skies_unlike_the_flat_frames_get_the_gain_uncertainty() -> None:
    """Clear frames of one dry night only: the gain stays unknown, so a humid clear sky's noise grows with its
    distance from theirs (a wrong gain is not taken for cloud)."""
    geom, model, offset, gain = camera()
    eps = [0.1] * 8
    flat = measure(geom, model, [render(geom, model, offset, gain, e, seed=i) for i, e in enumerate(eps)], eps)
    sky = geom.sky
    assert (flat.gain_var[sky] > (0.8 * GAIN_PRIOR) ** 2).all()
    fr = C.Frame(geom, model, C.ClearSkyConfig(), flat)
    assert (fr.inv_sigma(fr.clear(0.5, 0.6)) < 0.6 * fr.inv_sigma(fr.clear(0.1, 0.6))).all()
    humid = render(geom, model, offset, gain, 0.5, seed=50)[None]
    out = M.make_masks(humid, np.array([5.0]), np.array([0.5]), np.array([0.6]), np.array([0]), geom, model,
                       M.MaskConfig(), C.ClearSkyConfig(), flat)  # fmt: skip
    assert out.mask[0][sky].mean() < 0.01


def test_no_flat_without_clear_frames_of_several_kinds_or_when_turned_off() -> None:
    geom, model, _, _ = camera()
    assert M.flat_frames(model, C.ClearSkyConfig())[0].size == 0  # the model names no clear frame
    model.clear_frames, model.clear_p = list(range(500)), [0.6] * 500
    model.clear_eps = list(np.linspace(0.1, 0.4, 500))
    assert M.flat_frames(model, C.ClearSkyConfig())[0].size == 200
    assert M.flat_frames(model, C.ClearSkyConfig(flat_images=0))[0].size == 0
    model.clear_eps = [0.2] * 500  # one kind of clear sky: the gain cannot be measured
    assert M.flat_frames(model, C.ClearSkyConfig())[0].size == 0
    with pytest.raises(ValueError, match="flat_images"):
        C.ClearSkyConfig(flat_images=-1)


def test_prepare_measures_the_flat_over_the_store_as_in_memory(tmp_path, client, monkeypatch) -> None:
    """The distributed prepare stores the same flat as ``prepare_arrays`` and masks with it, its clear frames
    split into tasks of at most ``FLAT_TASK_FRAMES`` (5 here, so more tasks than the 4 of two workers)."""
    import xarray as xr
    import zarr

    from cirrus_batch import prepare as P
    from cirrus_batch import synth
    from cirrus_batch.config import IngestConfig, PrepareConfig
    from cirrus_batch.ingest import ingest
    from cirrus_batch.prepare import Models, prepare, prepare_arrays

    monkeypatch.setattr(P, "FLAT_TASK_FRAMES", 5)

    summary = synth.write_archive(tmp_path / "a", nights=4, per_night=8, cadence_min=10, shape=(96, 120), seed=4,
                                  kinds=["clear-dry", "clear-humid", "clear-dry", "cirrus"], camera_kind="housing",
                                  progress=False)  # fmt: skip
    store = tmp_path / "s.zarr"
    ingest(str(summary.archive), str(store), client, IngestConfig(shard_size=8), progress=False)
    cfg = PrepareConfig(fit_images=32)
    report = prepare(str(store), client, cfg, progress=False)
    stored = Models.from_store(zarr.open_group(str(store), mode="r"))
    ds = xr.open_zarr(summary.truth, consolidated=False)
    raw = np.stack([synth.read_fits(summary.archive / str(s))[0] for s in ds["source"].values]).astype(np.uint16)
    temps = zarr.open_group(str(store), mode="r")["ambtemp"][:]  # as the headers give them (float32)
    models, out = prepare_arrays(raw, temps, ds["time"].values, cfg)
    assert stored.flat is not None and report.clear_sky["sky flat frames"] == stored.flat.frames > 4 * 5
    for key in stored.flat.ARRAYS:
        np.testing.assert_allclose(getattr(stored.flat, key), getattr(models.flat, key), atol=5e-4)  # float32 headers
    np.testing.assert_allclose(stored.flat.sigma, models.flat.sigma, rtol=1e-2)
    assert np.median(stored.flat.sigma) < np.median(stored.clear_sky.sigma)
    assert np.mean(zarr.open_group(str(store), mode="r")["mask"][:] == out.mask) > 0.995  # pixels at the threshold
