"""Store integrity across commands: a late night stays aligned through prepare, settings are checked before a
store or a model exists, unreachable servers and OS errors are one-line errors."""

from __future__ import annotations

import errno
import shutil
import time

import numpy as np

from cirrus_batch import cli
from cirrus_batch.config import IngestConfig, PrepareConfig
from cirrus_batch.ingest import ingest
from cirrus_batch.prepare import UNPREPARED, prepare
from cirrus_batch.store import open_dataset
from cirrus_batch.synth import write_archive


def test_a_late_night_is_prepared_alone_and_stays_aligned(tmp_path, client):
    archive, url = tmp_path / "archive", str(tmp_path / "s.zarr")
    write_archive(archive, nights=3, per_night=8, cadence_min=10, shape=(96, 120), seed=3, progress=False)
    first = sorted((archive / "2026").iterdir())[0]
    shutil.move(first, tmp_path / "late")
    ingest(str(archive), url, client, IngestConfig(shard_size=8), progress=False)
    prepare(url, client, PrepareConfig(fit_images=16), progress=False)
    shutil.move(tmp_path / "late", first)  # the first night arrives after the others were prepared
    assert ingest(str(archive), url, client, IngestConfig(shard_size=8), progress=False).ingested == 8
    report = prepare(url, client, PrepareConfig(fit_images=16), progress=False)
    assert (report.prepared_now, report.images, report.fitted) == (8, 24, False)
    ds = open_dataset(url).load()
    assert (np.diff(ds["time"].values) > np.timedelta64(0)).all()
    assert all(s.startswith(f"2026/{first.name}/") for s in ds["source"].values[:8])
    assert (ds["quality"].values != UNPREPARED).all()
    assert "norm" not in ds  # written by older versions only: computed from raw where it is read
    sky = ds["sky"].values.astype(bool)
    np.testing.assert_allclose(ds["cloud_fraction"].values, ds["mask"].values[:, sky].mean(axis=1), atol=1e-6)


def test_invalid_settings_fail_before_a_store_or_a_model_exists(tmp_path, archive, capsys):
    store = tmp_path / "s.zarr"
    assert cli.main(["ingest", str(archive), str(store), "--shard-size", "-5", "--no-progress"]) == 1
    job = tmp_path / "job.toml"
    job.write_text("[ingest]\nshard_size = 0\n")
    assert cli.main(["ingest", str(archive), str(store), "--config", str(job), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cirrus: error: command line: ingest.shard_size must be in [1, 100000], got -5",
                   f"cirrus: error: {job}: ingest.shard_size must be in [1, 100000], got 0"]  # fmt: skip
    assert not store.exists() and not (tmp_path / "s.zarr.lock").exists()
    db = tmp_path / "mlflow.db"
    assert cli.main(["train", str(store), "--epochs", "-3", "--tracking-uri", f"sqlite:///{db}"]) == 1
    assert capsys.readouterr().err.strip() == "cirrus: error: command line: train.epochs must be >= 1, got -3"
    assert not db.exists()  # no run, no registered model


def test_an_unreachable_tracking_server_is_one_error_at_once(capsys):
    t0 = time.monotonic()
    for command in (["report", "s.zarr"], ["train", "s.zarr"], ["reprocess", "s.zarr"]):
        assert cli.main([*command, "--tracking-uri", "http://127.0.0.1:1"]) == 1
    assert time.monotonic() - t0 < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("tracking server http://127.0.0.1:1 does not answer" in line for line in err)


def test_os_errors_are_one_line_naming_the_path(tmp_path, store, monkeypatch, capsys):
    """A full disk (or a read-only store) while writing: one line with the path, no traceback."""
    import cirrus_batch.prepare

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f"{store}/norm/c/0/0/0")

    monkeypatch.setattr(cirrus_batch.prepare, "prepare", full)
    assert cli.main(["prepare", store, "--cluster", "local", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cirrus: error: No space left on device ({store}/norm/c/0/0/0); what was committed is kept"]


def test_report_hours_do_not_depend_on_the_store_order():
    from cirrus_batch.report import image_hours

    t = np.array(["2026-01-05T20:00", "2026-01-05T20:10", "2026-01-05T20:20", "2026-01-06T20:00",
                  "2026-01-06T20:10"], dtype="datetime64[us]")  # fmt: skip
    nights = t.astype("datetime64[D]")
    arrival = np.array([3, 4, 1, 0, 2])  # a late night first, then one image of a night after the others
    np.testing.assert_allclose(image_hours(t[arrival], nights[arrival]), image_hours(t, nights)[arrival])
