"""report: the season report of a reprocessed tiny store (files, clear hours, flags, MLflow run) and the CLI."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from mlflow.tracking import MlflowClient

from cirrus_batch.errors import StoreError
from cirrus_batch.masks import QUALITY_CONSTANT
from cirrus_batch.report import image_hours, report
from cirrus_batch.store import set_json_attr
from cirrus_batch.sampling import block_keys
from cirrus_batch.reprocess import UNPROCESSED, reprocess
from cirrus_batch.store import Rejection, Store

PNG = b"\x89PNG\r\n\x1a\n"
FILES = {"report.md", "clear_hours.csv", "cloud_fraction.png", "examples.png", "rejected.csv", "flagged.csv"}


@pytest.fixture(scope="module")
def season(trained, tmp_path_factory, client) -> str:
    """A reprocessed copy of the store."""
    store = trained.copy(tmp_path_factory.mktemp("report"))
    reprocess(store, client, cfg=trained.cfg(), progress=False, tracking_uri=trained.tracking)
    return store


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_image_hours_use_the_cadence_and_skip_gaps():
    t = np.datetime64("2026-01-05T20:00", "us") + np.array([0, 10, 20, 30, 90, 100], "timedelta64[m]")
    t = np.append(t, np.datetime64("2026-01-06T21:00", "us"))  # a night of one image
    nights = block_keys(t, "night")
    assert [str(n) for n in np.unique(nights)] == ["2026-01-05", "2026-01-06"]
    np.testing.assert_allclose(image_hours(t, nights) * 60, [10, 10, 10, 20, 10, 10, 10])
    assert str(block_keys(np.array(["2026-01-06T05:00"], "datetime64[us]"), "night")[0]) == "2026-01-05"  # after midnight


def test_report_writes_the_files_and_logs_an_mlflow_run(season, trained, tmp_path):
    result = report(season, tmp_path / "out", tracking_uri=trained.tracking)
    assert {p.name for p in result.files} == FILES and all(p.exists() for p in result.files)
    for name in ("cloud_fraction.png", "examples.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
    group = zarr.open_group(season, mode="r")
    cloudy = group["cloudy_pred"][:]
    rows = read_csv(tmp_path / "out" / "clear_hours.csv")
    assert list(rows[0]) == ["night", "images", "clear_images", "clear_hours", "observed_hours", "mean_cloud_fraction"]
    assert [r["night"] for r in rows] == ["2026-01-05", "2026-01-06", "2026-01-07", "2026-01-08"]
    assert [int(r["images"]) for r in rows] == [8] * 4 and sum(int(r["clear_images"]) for r in rows) == (~cloudy).sum()
    for r in rows:  # 10-minute cadence: 8 images stand for 80 minutes, the clear ones for 10 minutes each
        assert float(r["observed_hours"]) == pytest.approx(8 / 6, abs=0.01)
        assert float(r["clear_hours"]) == pytest.approx(int(r["clear_images"]) / 6, abs=0.01)
    assert result.clear_hours == pytest.approx((~cloudy).sum() / 6, abs=0.02)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "![Cloud fraction per night](cloud_fraction.png)" in md and "cirrus-unet v1" in md
    assert "not reprocessed" not in md and "| all | 32 |" in md

    client = MlflowClient(trained.tracking)
    run = client.get_run(result.run_id)
    assert run.info.run_name.startswith("report-") and run.data.tags["store"] == season
    assert run.data.metrics["images"] == 32 and run.data.metrics["clear_hours"] == pytest.approx(result.clear_hours)
    assert client.get_experiment(run.info.experiment_id).name == "cirrus-reports"  # not the trainings'
    assert run.data.tags["classifier"] == "cirrus-classifier v1" and run.data.tags["unet"] == "cirrus-unet v1"
    assert run.data.tags["unet.run_id"] and "cirrus-unet v1" in run.data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(result.run_id)} == FILES


def test_flagged_rejected_and_unprocessed_images_are_reported(season, trained, tmp_path):
    store = str(tmp_path / "s.zarr")
    shutil.copytree(season, store)
    group = zarr.open_group(store, mode="r+")
    cloudy = group["cloudy_pred"][:]
    quality, marker = group["quality"][:], group["pred_model"][:]
    flagged = int(np.flatnonzero(~cloudy)[0])
    quality[flagged] = QUALITY_CONSTANT
    marker[-2:] = UNPROCESSED  # e.g. a new night not reprocessed yet
    group["quality"][:], group["pred_model"][:] = quality, marker
    Store.open(store).add_rejections([Rejection("2026/x.fits", "empty file", 0)])
    result = report(store, tmp_path / "out", tracking_uri=trained.tracking)
    assert result.processed == 30
    clear = (marker != UNPROCESSED) & ~cloudy & (quality == 0)
    assert sum(r.clear_images for r in result.nights) == clear.sum()
    (row,) = read_csv(tmp_path / "out" / "flagged.csv")
    assert row["source"] == group["source"][flagged] and row["flags"] == "constant"
    rejected = read_csv(tmp_path / "out" / "rejected.csv")
    assert rejected == [{"source": "2026/x.fits", "reason": "empty file", "size": "0"}]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**2 images not reprocessed yet**" in md and "| constant | 1 |" in md and "| empty file | 1 |" in md


def test_report_needs_predictions(trained, tmp_path):
    with pytest.raises(StoreError, match="has no predictions yet: run `cirrus reprocess"):
        report(trained.copy(tmp_path), tmp_path / "out", tracking_uri=trained.tracking)


def test_cli_report(season, trained, tmp_path):
    store = str(tmp_path / "season.zarr")
    shutil.copytree(season, store)
    cli = [sys.executable, "-m", "cirrus_batch.cli", "report", store, "--tracking-uri", trained.tracking]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "clear hours" in out.stdout and "2026-01-08" in out.stdout and "MLflow run" in out.stdout
    assert {p.name for p in (tmp_path / "season-report").iterdir()} == FILES


def test_an_oriented_store_gets_the_observers_nights(season, trained, tmp_path):
    store = str(tmp_path / "s.zarr")
    shutil.copytree(season, store)
    group = Store.open(store).group
    set_json_attr(group.attrs, "site", {"latitude_deg": 28.76, "longitude_deg": -17.88, "elevation_m": 2396.0})
    set_json_attr(group.attrs, "orientation", {"north_deg": 0.0, "mirror": False})  # the lens of prepare's geometry
    result = report(store, tmp_path / "out", tracking_uri=trained.tracking)
    assert "observer_nights.csv" in {p.name for p in result.files}
    rows = read_csv(tmp_path / "out" / "observer_nights.csv")
    assert [r["night"] for r in rows] == [r.night for r in result.nights]
    for r, n in zip(rows, result.nights):  # a frame classified clear is clear above air mass 2 too
        assert n.clear_hours - 1e-6 <= float(r["clear_sightline_hours"]) <= float(r["observed_hours"]) + 1e-6
        assert 0 <= float(r["clear_sky_fraction"]) <= 1
    assert "## Line of sight above air mass 2" in (tmp_path / "out" / "report.md").read_text()
