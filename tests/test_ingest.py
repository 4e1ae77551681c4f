"""Ingest: round trip, idempotence, increments, bad input, kill -9 recovery, remote SOURCE; identity by content,
late nights, wrong clocks and removal."""

from __future__ import annotations

import functools
import gc
import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from astropy.io import fits
from conftest import SHAPE, frame, make_archive, write_fits

from cirrus_batch.config import IngestConfig
from cirrus_batch.errors import CirrusError
from cirrus_batch.fitsio import NODATA
from cirrus_batch.ingest import (NoImagesError, content_digest, discover, ingest, plan_groups, scan_files, write_group,
                                 write_vectors)  # fmt: skip
from cirrus_batch.remove import remove
from cirrus_batch.store import Store, open_dataset, open_rejections

CFG = IngestConfig(shard_size=4)


def run(source, store, client, **kw):
    return ingest(str(source), str(store), client, CFG, progress=False, **kw)


def assert_matches_files(store: Path, root: Path) -> None:
    """Every stored image equals its FITS file (read by astropy); no duplicates; sorted by time."""
    ds = open_dataset(str(store))
    sources = ds["source"].values.tolist()
    assert len(sources) == len(set(sources))
    times = ds["time"].values
    assert np.all(np.diff(times) >= np.timedelta64(0))
    raw = ds["raw"].values
    for i, src in enumerate(sources):
        with fits.open(root / src) as hdul:
            hdu = next(h for h in hdul if h.data is not None)
            np.testing.assert_array_equal(raw[i], hdu.data, err_msg=src)
            assert times[i] == np.datetime64(hdu.header["DATE-OBS"], "ns")


def test_plan_groups_fill_whole_shards():
    groups = plan_groups(6, list(range(11)), shard=4)
    assert [(start, len(entries)) for start, entries in groups] == [(6, 2), (8, 4), (12, 4), (16, 1)]
    assert sum((entries for _, entries in groups), []) == list(range(11))


def test_file_changed_after_the_scan_is_checked_again(tmp_path):
    """A file rewritten between scan and write is decoded and described as it is when written."""
    paths = make_archive(tmp_path / "a", nights=1, per_night=4)
    fs, entries = discover(str(tmp_path / "a"))
    items = scan_files(fs, entries, CFG.header_keys)
    cards = {"EXPTIME": 0.5, "AMBTEMP": -3.0, **{f"PAD{i}": i for i in range(40)}}  # a second header block
    write_fits(paths[2].with_name("new.fits"), frame(7), "2026-01-05T20:04:30", cards).replace(paths[2])
    store = Store.create(str(tmp_path / "s.zarr"), shape=SHAPE, shard_size=4, header_keys=CFG.header_keys)
    store.resize(4)
    write_vectors(store.group, 0, items)
    files = [(s.entry, s.layout) for s in items]
    rejections, changed, digests = write_group(fs, store.group["raw"], CFG.header_keys, files, 0)
    assert not rejections and list(changed) == [2]
    assert digests.tolist() == [content_digest(p.read_bytes()) for p in paths]
    assert changed[2].values == {"EXPTIME": 0.5, "AMBTEMP": -3.0}
    assert changed[2].time == np.datetime64("2026-01-05T20:04:30")
    np.testing.assert_array_equal(store.group["raw"][2], frame(7))
    np.testing.assert_array_equal(store.group["raw"][3], frame(503))


def test_round_trip_times_headers_and_schema(tmp_path, client):
    root = tmp_path / "archive"
    write_fits(root / "a.fits", frame(1), "2026-03-01T21:15:07.250", {"EXPTIME": 0.031, "AMBTEMP": -3.5})
    write_fits(root / "b.fits", frame(2), "2026-03-01T21:14:07.125Z", {"EXPTIME": 0.5})
    report = run(root, tmp_path / "s.zarr", client)
    assert report.ingested == 2 and not report.rejected
    assert gc.get_freeze_count() == 0  # objects kept from the collector during the run are given back
    ds = open_dataset(str(tmp_path / "s.zarr"))
    # sorted by DATE-OBS, not by name; sub-second times kept exactly
    assert ds["source"].values.tolist() == ["b.fits", "a.fits"]
    expected = np.array(["2026-03-01T21:14:07.125", "2026-03-01T21:15:07.250"], dtype="datetime64[ns]")
    np.testing.assert_array_equal(ds["time"].values, expected)
    np.testing.assert_allclose(ds["exptime"].values, [0.5, 0.031])
    assert np.isnan(ds["ambtemp"].values[0]) and ds["ambtemp"].values[1] == -3.5
    assert ds["raw"].dtype == np.uint16 and ds["raw"].dims == ("time", "y", "x")
    np.testing.assert_array_equal(ds["raw"].values[0], frame(2))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["raw"].chunks == (1, *SHAPE) and group["raw"].shards == (4, *SHAPE)
    assert group["time"].dtype == np.int64 and group["time"].attrs["units"].startswith("microseconds since")


def test_idempotent_and_incremental(tmp_path, client):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    make_archive(root, nights=2, per_night=5)
    assert run(root, store, client).ingested == 10
    before = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    again = run(root, store, client)
    assert (again.ingested, again.already, again.rejected) == (0, 10, [])
    assert sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file()) == before
    make_archive(root, nights=1, per_night=7, start_day=9)  # a new night arrives
    third = run(root, store, client)
    assert (third.ingested, third.already, third.total) == (7, 10, 17)
    assert_matches_files(store, root)


def test_compressed_and_scaled_files(tmp_path, client):
    root = tmp_path / "archive"
    make_archive(root, nights=1, per_night=3, compress=True)
    # BSCALE/BZERO-scaled int16 holding ADU = 2 * stored + 1000
    hdu = fits.PrimaryHDU(np.arange(SHAPE[0] * SHAPE[1], dtype=np.int16).reshape(SHAPE))
    hdu.header.update({"BSCALE": 2.0, "BZERO": 1000.0, "DATE-OBS": "2026-01-05T21:00:00"})
    hdu.writeto(root / "scaled.fits")
    # float image with a few NaN pixels: kept, NaN -> nodata
    partial = frame(7).astype(np.float32)
    partial[0, :3] = np.nan
    write_fits(root / "partial_nan.fits", partial, "2026-01-05T21:02:00")
    report = run(root, tmp_path / "s.zarr", client)
    assert report.ingested == 5 and not report.rejected
    ds = open_dataset(str(tmp_path / "s.zarr")).set_index(time="source").rename(time="source")
    np.testing.assert_array_equal(ds["raw"].sel(source="scaled.fits").values,
                                  2 * np.arange(SHAPE[0] * SHAPE[1]).reshape(SHAPE) + 1000)
    got = ds["raw"].sel(source="partial_nan.fits").values
    assert (got[0, :3] == NODATA).all()
    np.testing.assert_array_equal(got[1:], frame(7)[1:])
    fz = ds["raw"].sel(source="2026/20260105/cam_20260105T200200.fits.fz").values
    np.testing.assert_array_equal(fz, frame(100 * 5 + 1))


def test_bad_input_is_logged_and_nothing_valid_lost(tmp_path, client):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    good = make_archive(root, nights=2, per_night=6)
    bad = root / "2026" / "bad"
    bad.mkdir()
    whole = good[0].read_bytes()
    (bad / "truncated.fits").write_bytes(whole[: len(whole) // 2])
    (bad / "notes.fits").write_text("this is not a FITS file\n" * 10)
    (bad / "readme.txt").write_text("camera log")
    (bad / "empty.fits").write_bytes(b"")
    fits.HDUList([fits.PrimaryHDU(header=fits.Header({"DATE-OBS": "2026-01-05T20:01:00"})),
                  fits.BinTableHDU.from_columns([fits.Column("a", "J", array=[1, 2])])]).writeto(bad / "table.fits")
    write_fits(bad / "cube.fits", np.zeros((3, *SHAPE), np.uint16), "2026-01-05T20:03:00")
    write_fits(bad / "shape.fits", np.zeros((16, 16), np.uint16), "2026-01-05T20:05:00")
    write_fits(bad / "nan.fits", np.full(SHAPE, np.nan, np.float32), "2026-01-06T20:05:30")
    write_fits(bad / "nodate.fits", frame(3), None)
    (bad / ".partial.fits.tmp").write_bytes(b"hidden files are ignored")

    report = run(root, store, client)
    reasons = {Path(r.source).name: r.reason for r in report.rejected}
    assert set(reasons) == {"truncated.fits", "notes.fits", "readme.txt", "empty.fits", "table.fits",
                            "cube.fits", "shape.fits", "nan.fits", "nodate.fits"}
    assert "truncated" in reasons["truncated.fits"]
    assert "not a FITS file" in reasons["notes.fits"] and "not a FITS file" in reasons["readme.txt"]
    assert reasons["empty.fits"] == "empty file"
    assert "no image" in reasons["table.fits"]
    assert "3-D data cube" in reasons["cube.fits"]
    assert "shape (16, 16)" in reasons["shape.fits"]
    assert "NaN" in reasons["nan.fits"]
    assert "DATE-OBS" in reasons["nodate.fits"]
    # every valid image is there, in time order, with its exact pixels
    assert report.ingested == len(good) == report.total
    assert_matches_files(store, root)
    log = open_rejections(str(store))
    assert sorted(Path(s).name for s in log["source"].values) == sorted(reasons)
    # unchanged rejected files are not retried; a repaired one is
    again = run(root, store, client)
    assert again.previously_rejected == 9 and again.ingested == 0
    (bad / "nodate.fits").unlink()
    write_fits(bad / "nodate.fits", frame(3), "2026-01-06T23:00:00", {"EXPTIME": 1.0, "OBSERVER": "fixed"})
    fixed = run(root, store, client)
    assert fixed.ingested == 1 and fixed.total == len(good) + 1


def test_a_late_night_is_appended_and_readers_see_time_sorted(tmp_path, client):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    make_archive(root, nights=2, per_night=3, start_day=8)
    run(root, store, client)
    shard_files = sorted((store / "raw" / "c").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in shard_files[:-1]]
    make_archive(root, nights=1, per_night=5, start_day=5)  # a night copied late from the camera
    write_fits(root / "gap.fits", frame(1), "2026-01-08T23:00:00")  # and one image between two nights
    report = run(root, store, client)
    assert (report.ingested, report.rejected, report.total) == (6, [], 12)
    assert [p.stat().st_mtime_ns for p in shard_files[:-1]] == mtimes  # full shards before are not rewritten
    stored = zarr.open_group(str(store), mode="r")["time"][:]
    assert not (np.diff(stored) >= 0).all()  # appended in arrival order...
    assert_matches_files(store, root)  # ...read sorted, each image with its own file
    assert open_dataset(str(store))["source"].values[8] == "gap.fits"


def test_same_image_through_another_root_or_name_is_skipped(tmp_path, client):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    paths = make_archive(root, nights=2, per_night=5)
    run(root / "2026" / "20260105", store, client)  # one night first, then the whole archive
    report = run(root, store, client)
    assert (report.ingested, report.copies, report.rejected, report.total) == (5, 5, [], 10)
    (root / "renamed.fits").write_bytes(paths[7].read_bytes())
    again = run(root, store, client)  # copies under other paths are read again (and skipped) on every run
    assert (again.ingested, again.copies, again.already, again.rejected) == (0, 6, 5, [])
    ds = open_dataset(str(store))
    assert len(set(ds["time"].values.tolist())) == 10
    assert (ds["digest"].values != 0).all()


def test_two_contents_for_one_time_are_a_conflict_naming_both(tmp_path, client):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    make_archive(root, nights=1, per_night=3)
    write_fits(root / "a_twin.fits", frame(1), "2026-01-05T20:02:00")  # the time of the second image
    write_fits(root / "x1.fits", frame(2), "2026-01-05T23:00:00")
    write_fits(root / "x2.fits", frame(3), "2026-01-05T23:00:00")
    report = run(root, store, client)
    assert report.total == 4
    reasons = {Path(r.source).name: r.reason for r in report.rejected}
    assert set(reasons) == {"a_twin.fits", "x2.fits"}  # the first by source is kept
    assert "already taken by 2026/20260105/cam_20260105T200200.fits, with different content" in reasons["a_twin.fits"]
    assert "already taken by x1.fits" in reasons["x2.fits"]
    write_fits(root / "late" / "x3.fits", frame(4), "2026-01-05T23:00:00")  # against an image in the store
    later = run(root, store, client)
    assert later.ingested == 0 and "already taken by x1.fits" in later.rejected[0].reason


def test_wrong_clocks_are_rejected_and_later_nights_still_ingested(tmp_path, client):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    make_archive(root, nights=1, per_night=3)
    write_fits(root / "future.fits", frame(1), "2099-01-01T00:00:00")
    write_fits(root / "reset.fits", frame(2), "2000-01-01T00:00:00")
    report = run(root, store, client)
    reasons = {r.source: r.reason for r in report.rejected}
    assert report.total == 3 and "in the future" in reasons["future.fits"] and "wrong camera clock" in reasons["future.fits"]
    assert "days from the season's median" in reasons["reset.fits"]
    make_archive(root, nights=1, per_night=4, start_day=9)
    assert run(root, store, client).ingested == 4
    lax = ingest(str(root), str(tmp_path / "lax.zarr"), client, IngestConfig(shard_size=4, season_days=0),
                 progress=False)  # fmt: skip
    assert [r.source for r in lax.rejected] == ["future.fits"]


def test_remove_takes_images_and_derived_values_out_and_keeps_them_out(tmp_path, client, monkeypatch):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    make_archive(root, nights=2, per_night=5)
    run(root, store, client)
    s = Store.open(str(store))
    s.add_time_arrays(10, {}, {"derived": ("int64", -1)})
    s.group["derived"][:] = s.times()  # a derived vector that must stay aligned with raw
    monkeypatch.setattr(Store, "_apply_removal", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after the snapshot: the next writer finishes the removal
        remove(str(store), sources=["2026/20260105/*"], times=["2026-01-06T20:04"], reason="test")
    monkeypatch.undo()
    assert Store.open(str(store)).committed == 10
    Store.open(str(store)).repair()
    ds = open_dataset(str(store))
    assert ds.sizes["time"] == 4 and not any(s.startswith("2026/20260105") for s in ds["source"].values)
    np.testing.assert_array_equal(ds["derived"].values, ds["time"].values.astype("datetime64[us]").astype(np.int64))
    assert_matches_files(store, root)
    history = Store.open(str(store)).history()
    assert len(history) == 1 and history[0]["reason"] == "test" and len(history[0]["removed"]) == 6
    again = run(root, store, client)
    assert (again.ingested, again.previously_rejected) == (0, 6)  # removed files stay out while unchanged


def test_new_store_takes_the_most_common_shape_not_the_first_files(tmp_path, client):
    """The store is created while scanning, for the first good file's shape; the most common one replaces it."""
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    odd = [write_fits(root / f"a{i}.fits", np.zeros((16, 16), np.uint16), f"2026-01-05T20:0{i}:00") for i in range(4)]
    make_archive(root / "b", nights=1, per_night=6)  # sorted after a*.fits
    report = run(root, store, client)
    assert Store.open(str(store)).image_shape == SHAPE and report.ingested == 6
    assert sorted(Path(r.source).name for r in report.rejected) == sorted(p.name for p in odd)
    assert_matches_files(store, root)


def test_new_store_with_no_valid_image_fails_clearly(tmp_path, client):
    root = tmp_path / "archive"
    root.mkdir()
    (root / "x.fits").write_text("nope")
    with pytest.raises(NoImagesError, match="no valid image"):
        run(root, tmp_path / "s.zarr", client)
    assert not (tmp_path / "s.zarr").exists()


def test_missing_source_and_bad_store_are_clear_errors(tmp_path, client):
    with pytest.raises(CirrusError, match="does not exist"):
        run(tmp_path / "nowhere", tmp_path / "s.zarr", client)
    root = tmp_path / "archive"
    make_archive(root, nights=1, per_night=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CirrusError, match="exists and is not a zarr store"):
        run(root, tmp_path / "file", client)
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.attrs["x"] = 1
    with pytest.raises(CirrusError, match="not a cirrus store"):
        run(root, tmp_path / "other.zarr", client)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from distributed import Client, LocalCluster
    from cirrus_batch.config import IngestConfig
    from cirrus_batch.ingest import ingest

    def die(committed):
        if committed >= int(sys.argv[3]):
            os.killpg(0, signal.SIGKILL)  # kill -9 the whole job: client, scheduler and workers

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Client(c) as client:
            ingest(sys.argv[1], sys.argv[2], client, IngestConfig(shard_size=4), progress=False, on_commit=die)
    """
)


def test_kill_9_in_the_middle_then_rerun_completes(tmp_path, client):
    root, store = tmp_path / "archive", tmp_path / "s.zarr"
    paths = make_archive(root, nights=4, per_night=15)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(store), "20"], start_new_session=True)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    interrupted = Store.open(str(store), mode="r")
    assert 20 <= interrupted.committed < len(paths)
    report = run(root, store, client)
    assert report.total == len(paths) and report.already == interrupted.committed
    assert report.ingested == len(paths) - interrupted.committed
    assert_matches_files(store, root)
    group = zarr.open_group(str(store), mode="r")
    assert all(a.shape[0] == len(paths) for _, a in group.arrays())


@pytest.fixture
def http_archive(archive: Path):
    """The archive served over HTTP on loopback (python's http.server)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(archive)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_remote_http_source(tmp_path, archive, http_archive, client):
    store = tmp_path / "s.zarr"
    report = run(http_archive, store, client)
    assert report.ingested == 10 and not report.rejected
    assert_matches_files(store, archive)
    # the same archive seen through the local path is the same set of sources: nothing added
    assert run(archive, store, client).ingested == 0


def test_cli_ingest_summary_and_errors(tmp_path, archive):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    (archive / "junk.fits").write_text("junk")
    store = tmp_path / "s.zarr"
    cli = [sys.executable, "-m", "cirrus_batch.cli"]
    out = subprocess.run([*cli, "ingest", str(archive), str(store), "--no-progress", "--shard-size", "4"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ingested now" in out.stdout and "junk.fits" in out.stdout and "not a FITS file" in out.stdout
    bad = subprocess.run([*cli, "ingest", str(tmp_path / "missing"), str(store)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("cirrus: error: SOURCE")
    assert "Traceback" not in bad.stderr
