"""prepare: distributed masks on a tiny synthetic season; idempotence, increments, kill -9, bad images,
labels, evaluation against the true masks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import write_fits

from cirrus_batch import masks, synth
from cirrus_batch.config import IngestConfig, PrepareConfig
from cirrus_batch.errors import CirrusError, ConfigError, StoreError
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import UNPREPARED, Models, cloudiest_first, evaluate_store, prepare, read_labels
from cirrus_batch.data import InputSpec, StoreSamples, bin_image
from cirrus_batch.normalization import Normalization, normalize
from cirrus_batch.store import json_attr, open_dataset, set_json_attr
from cirrus_batch.synth import write_archive

SHAPE = (120, 150)
SHARD = 6


def make_store(tmp: Path, client, nights: int = 5, per_night: int = 6, start: str = "2026-01-05") -> tuple[Path, Path]:
    archive, store = tmp / "archive", tmp / "s.zarr"
    write_archive(archive, nights=nights, per_night=per_night, cadence_min=10, shape=SHAPE, seed=3, start=start,
                  progress=False, truth=tmp / f"truth-{start}.zarr")  # fmt: skip
    ingest(str(archive), str(store), client, IngestConfig(shard_size=SHARD), progress=False)
    return archive, store


@pytest.fixture(scope="module")
def season(tmp_path_factory, client):
    """A prepared 5-night store (one night of each kind) and its truth."""
    tmp = tmp_path_factory.mktemp("season")
    _, store = make_store(tmp, client)
    report = prepare(str(store), client, PrepareConfig(fit_images=30), progress=False)
    return store, tmp / "truth-2026-01-05.zarr", report


def test_prepare_writes_the_schema(season):
    store, truth, report = season
    assert report.fitted and report.prepared_now == report.images == 30
    ds = open_dataset(str(store))
    assert ds["sky"].dims == ("y", "x") and ds["sky"].dtype == np.uint8
    assert "norm" not in ds  # computed from raw where a network reads it
    assert ds["mask"].dtype == np.uint8 and set(np.unique(ds["mask"].values)) <= {0, 1}
    assert ds["cloud_fraction"].dtype == np.float32 and ds["cloudy"].dtype == bool
    assert (ds["quality"].values == 0).all()
    assert "normalization" in json_attr(ds.attrs, "prepare") and "clear_sky" in json_attr(ds.attrs, "prepare")
    true_sky = xr.open_zarr(truth, consolidated=False)["sky"].values.astype(bool)
    sky = ds["sky"].values.astype(bool)
    assert (sky & true_sky).sum() / (sky | true_sky).sum() > 0.95
    assert (ds["mask"].values[:, ~sky] == 0).all()
    # a network reading norm gets the documented deterministic transform of raw
    models = json_attr(ds.attrs, "prepare")
    expect = normalize(ds["raw"].values[2], Normalization.from_attrs(models["normalization"]))
    x, _, _ = StoreSamples(str(store), np.arange(3), InputSpec("classify", bin=1, zenith=False, image="norm"))[2]
    np.testing.assert_array_equal(x[0].numpy(), expect)
    # the residual: float16, 0 off the sky, about 0 on clear sky and high under the mask
    residual, mask = ds["residual"].values.astype(np.float32), ds["mask"].values.astype(bool)
    assert ds["residual"].dtype == np.float16 and (residual[:, ~sky] == 0).all()
    clear_sky = ~mask & sky
    assert abs(float(np.median(residual[clear_sky]))) < 0.2 and float(np.median(residual[mask])) > 1.0
    # brightness relative to the ambient black body: decks near 1, clear zenith far below
    bright = ds["brightness"].values.astype(np.float32)
    assert ds["brightness"].dtype == np.float16 and (bright[:, ~sky] == 0).all()
    assert 0.0 < float(np.median(bright[clear_sky])) < float(np.median(bright[mask])) < 1.2
    # residual and brightness binned by input_bin (4): the float16 means the networks read, exactly
    assert json_attr(ds.attrs, "prepare")["input_bin"] == 4
    for name in ("residual", "brightness"):
        binned = ds[f"{name}_bin4"]
        assert binned.dims == ("time", "y_bin4", "x_bin4") and binned.shape == (30, 30, 37)
        assert binned.dtype == np.float16 and binned.attrs["bin"] == 4
        np.testing.assert_array_equal(binned.values.astype(np.float32), bin_image(ds[name].values, 4))
    # every image has a confidence, flags and the clear sky its mask was made with
    assert np.isfinite(ds["mask_confidence"].values).all() and (ds["mask_confidence"].values <= 1).all()
    assert np.isfinite(ds["clear_eps"].values).all() and np.isfinite(ds["clear_p"].values).all()
    assert set(np.unique(ds["pixel_class"].values)) <= {0, 1, 2, 3, 4} and (ds["pixel_class"].values == 2).any()
    # the stored masks are what make_masks gives for the stored clear sky
    m = Models.from_store(zarr.open_group(str(store), mode="r"))
    again = masks.make_masks(ds["raw"].values[:3], ds["ambtemp"].values[:3], ds["clear_eps"].values[:3],
                             ds["clear_p"].values[:3], ds["clear_eps_source"].values[:3], m.geometry, m.clear_sky,
                             m.mask_config, m.clear_config, m.flat)  # fmt: skip
    np.testing.assert_array_equal(again.mask, ds["mask"].values[:3])
    np.testing.assert_allclose(residual[:3], again.residual, atol=4e-3, rtol=2e-3)  # float16
    assert report.clear_sky["clear frames found"] >= 3 and report.reasons.keys() == masks.MASK_FLAGS.keys()
    # one kind of clear night only: no sky flat (its gain could not be measured), and the summary says so
    assert m.flat is None and report.clear_sky["sky flat frames"] == 0


def test_masks_match_the_truth(season, client):
    store, truth, _ = season
    scores = evaluate_store(str(store), str(truth), client, progress=False)
    assert scores["n_frames"] == 30 and set(scores["per_kind"]) == set(masks_kinds())
    assert scores["iou"] > 0.72  # 30 frames of 120x150, one clear night (no sky flat); bench_masks.py: real sizes
    assert scores["per_kind"]["overcast"]["iou"] > 0.9
    assert scores["clear_false_alarm"] < 0.01
    assert scores["label_accuracy"] >= 0.9
    ds = open_dataset(str(store))
    t = xr.open_zarr(truth, consolidated=False)
    clear_nights = t["night_kind"].values.astype(object) == "clear-dry"
    assert not ds["cloudy"].values[clear_nights].any()
    assert ds["cloudy"].values[t["night_kind"].values.astype(object) == "overcast"].all()


def masks_kinds() -> list[str]:
    return list(synth.KINDS[:5])


def test_panel_png(season, client, tmp_path):
    store, truth, _ = season
    out = tmp_path / "panel.png"
    evaluate_store(str(store), str(truth), client, panel=out, progress=False)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_second_run_does_nothing(season, client):
    store, _, _ = season
    before = zarr.open_group(str(store), mode="r")["mask"][:]
    report = prepare(str(store), client, PrepareConfig(fit_images=30), progress=False)
    assert report.prepared_now == 0 and not report.fitted
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["mask"][:], before)


def test_new_night_prepares_only_new_blocks(tmp_path, client):
    archive, store = make_store(tmp_path, client, nights=2, per_night=4)
    prepare(str(store), client, PrepareConfig(fit_images=8), progress=False)
    first = zarr.open_group(str(store), mode="r")["mask"][:8]
    write_archive(archive, nights=1, per_night=5, cadence_min=10, shape=SHAPE, seed=4, start="2026-01-09",
                  progress=False, truth=tmp_path / "t2.zarr")  # fmt: skip
    ingest(str(archive), str(store), client, IngestConfig(shard_size=SHARD), progress=False)
    quality = zarr.open_group(str(store), mode="r")["quality"][:]
    assert (quality[:8] == 0).all() and (quality[8:] == UNPREPARED).all()
    report = prepare(str(store), client, PrepareConfig(fit_images=8), progress=False)
    assert report.prepared_now == 7  # the partial shard 6..11 and the new shard 12
    group = zarr.open_group(str(store), mode="r")
    assert (group["quality"][:] == 0).all()
    np.testing.assert_array_equal(group["mask"][:8], first)  # same models, same masks


def test_binned_inputs_follow_input_bin_and_older_stores_get_them(tmp_path, client):
    archive, store = make_store(tmp_path, client, nights=2, per_night=4)
    prepare(str(store), client, PrepareConfig(fit_images=8, input_bin=2), progress=False)
    group = zarr.open_group(str(store), mode="r")
    assert {"residual_bin2", "brightness_bin2"} <= set(group.array_keys()) and "residual_bin4" not in group
    np.testing.assert_array_equal(group["brightness_bin2"][:].astype(np.float32), bin_image(group["brightness"][:], 2))
    with pytest.raises(ConfigError, match="binned by 2.*--refit"):
        prepare(str(store), client, PrepareConfig(fit_images=8), progress=False)
    prepare(str(store), client, PrepareConfig(fit_images=8), refit=True, progress=False)
    group = zarr.open_group(str(store), mode="r")
    assert "residual_bin2" not in group and group["residual_bin4"].shape == (8, 30, 37)
    np.testing.assert_array_equal(group["residual_bin4"][:].astype(np.float32), bin_image(group["residual"][:], 4))
    prepare(str(store), client, PrepareConfig(fit_images=8, input_bin=0), refit=True, progress=False)
    group = zarr.open_group(str(store), mode="r+")
    assert not [name for name in group.array_keys() if "_bin" in name]
    spec = InputSpec("segment", bin=4, image="residual+brightness")
    assert spec.binned(group) == ()
    # a store prepared before binned inputs (no input_bin recorded): its prepared images are binned, then the new
    attrs = json_attr(group.attrs, "prepare")
    del attrs["input_bin"]
    set_json_attr(group.attrs, "prepare", attrs)
    write_archive(archive, nights=1, per_night=5, cadence_min=10, shape=SHAPE, seed=4, start="2026-01-09",
                  progress=False, truth=tmp_path / "t2.zarr")  # fmt: skip
    ingest(str(archive), str(store), client, IngestConfig(shard_size=SHARD), progress=False)
    report = prepare(str(store), client, PrepareConfig(fit_images=8), progress=False)
    assert report.prepared_now == 7  # the partial shard 6..11 and shard 12
    group = zarr.open_group(str(store), mode="r")
    assert json_attr(group.attrs, "prepare")["input_bin"] == 4 and spec.binned(group) == ("residual", "brightness")
    for name in ("residual", "brightness"):
        assert group[f"{name}_bin4"].shape == (13, 30, 37)
        np.testing.assert_array_equal(group[f"{name}_bin4"][:].astype(np.float32), bin_image(group[name][:], 4))
    with pytest.raises(ValueError, match="input_bin = 1"):
        PrepareConfig(input_bin=1)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from distributed import Client, LocalCluster
    from cirrus_batch.config import PrepareConfig
    from cirrus_batch.prepare import prepare

    def die(done):
        if done >= int(sys.argv[2]):
            os.killpg(0, signal.SIGKILL)

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Client(c) as client:
            prepare(sys.argv[1], client, PrepareConfig(fit_images=12), progress=False, on_block=die)
    """
)


def test_kill_9_then_rerun_completes_and_matches(tmp_path, client):
    _, store = make_store(tmp_path, client, nights=3, per_night=8)  # 24 images = 4 shards
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.Popen([sys.executable, str(script), str(store), "6"], start_new_session=True)
    assert proc.wait(timeout=180) == -signal.SIGKILL
    quality = zarr.open_group(str(store), mode="r")["quality"][:]
    done = int((quality != UNPREPARED).sum())
    assert 6 <= done < 24
    report = prepare(str(store), client, PrepareConfig(fit_images=12), progress=False)
    assert not report.fitted and report.prepared_now == 24 - done
    group = zarr.open_group(str(store), mode="r")
    after = group["mask"][:]
    # the same as preparing everything again in one go with the same models
    group = zarr.open_group(str(store), mode="r+")
    group["quality"][:] = UNPREPARED
    prepare(str(store), client, PrepareConfig(fit_images=12), progress=False)
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["mask"][:], after)


def test_bad_images_are_flagged_not_fatal(tmp_path, client):
    archive, _ = make_store(tmp_path, client, nights=5, per_night=3)
    bad = archive / "2026" / "20260110"
    write_fits(bad / "constant.fits", np.full(SHAPE, 5000, np.uint16), "2026-01-10T20:00:00")
    write_fits(bad / "saturated.fits", np.full(SHAPE, 16383, np.uint16), "2026-01-10T20:10:00")
    holes = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["raw"].values[-1].astype(np.float32)
    holes[40:60, 50:70] = np.nan
    write_fits(bad / "nan.fits", holes, "2026-01-10T20:20:00")
    ingest(str(archive), str(tmp_path / "s.zarr"), client, IngestConfig(shard_size=SHARD), progress=False)
    report = prepare(str(tmp_path / "s.zarr"), client, PrepareConfig(fit_images=15), progress=False)
    assert report.images == 18
    assert report.flagged == {"constant": 2, "saturated": 1, "nodata": 1}  # all-16383 is constant too
    ds = open_dataset(str(tmp_path / "s.zarr")).set_index(time="source")
    q = ds["quality"].values
    assert q[-3] & masks.QUALITY_CONSTANT and q[-2] & masks.QUALITY_SATURATED and q[-1] & masks.QUALITY_NODATA
    assert ds["mask"].values[-3:-1].sum() == 0  # no cloud invented on unusable frames


def test_human_labels_override(tmp_path, season, client):
    store, _, _ = season
    ds = open_dataset(str(store))
    sources = ds["source"].values.astype(object)
    cloudy = ds["cloudy"].values
    path = tmp_path / "labels.csv"
    path.write_text(f"source,label\n{sources[0]},{'clear' if cloudy[0] else 'cloudy'}\n{sources[1]},1\n")
    report = prepare(str(store), client, PrepareConfig(labels=str(path)), progress=False)
    assert report.labelled == 2
    relabelled = open_dataset(str(store))["cloudy"].values
    assert relabelled[0] == (not cloudy[0]) and relabelled[1]
    prepare(str(store), client, PrepareConfig(), progress=False)  # labels gone: back to the threshold
    np.testing.assert_array_equal(open_dataset(str(store))["cloudy"].values, cloudy)


def test_mask_pass_starts_with_the_cloudiest_blocks():
    sky_clear = np.array([1.0, 1.0, 0.1, 0.0, np.nan, np.nan, 0.5, np.nan])
    blocks = [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert cloudiest_first(blocks, sky_clear) == [(2, 4), (6, 8), (0, 2), (4, 6)]


def test_label_file_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na,cloudy\n")
    with pytest.raises(CirrusError, match="needs the columns source,label"):
        read_labels(bad)
    bad.write_text("source,label\na,maybe\n")
    with pytest.raises(CirrusError, match="bad.csv:2: label 'maybe'"):
        read_labels(bad)
    with pytest.raises(CirrusError, match="does not exist"):
        read_labels(tmp_path / "none.csv")


def test_evaluate_needs_masks_and_a_truth_store(tmp_path, client, season):
    _, store = make_store(tmp_path, client, nights=1, per_night=2)
    with pytest.raises(StoreError, match="has no masks"):
        evaluate_store(str(store), str(season[1]), client, progress=False)
    with pytest.raises(CirrusError, match="not a true-mask store"):
        evaluate_store(str(season[0]), str(tmp_path / "nothing.zarr"), client, progress=False)


def test_cli_prepare_evaluate(tmp_path, season):
    store, truth, _ = season
    out = subprocess.run(
        [sys.executable, "-m", "cirrus_batch.cli", "prepare", str(store), "--evaluate", str(truth), "--no-progress",
         "--panel", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "prepared now" in out.stdout and "cirrus" in out.stdout and "cloudy-label accuracy" in out.stdout
    assert (tmp_path / "p.png").exists()


def test_a_store_prepared_by_an_older_version_is_fitted_again(tmp_path, client):
    _, store = make_store(tmp_path, client)
    prepare(str(store), client, PrepareConfig(fit_images=30), progress=False)
    group = zarr.open_group(str(store), mode="r+")
    before = group["mask"][:]
    attrs = json_attr(group.attrs, "prepare")
    del attrs["flat"]  # as an older version left it
    set_json_attr(group.attrs, "prepare", attrs)
    with pytest.raises(StoreError, match="--refit"):
        Models.from_store(group)
    report = prepare(str(store), client, PrepareConfig(fit_images=30), progress=False)
    assert report.fitted and report.prepared_now == report.images
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["mask"][:], before)
