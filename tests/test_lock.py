"""The store's writer lock: exclusion, waiting, stale locks, and concurrent writers as real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_archive

from cirrus_batch import cli
from cirrus_batch.config import IngestConfig, LockConfig
from cirrus_batch.errors import StoreError
from cirrus_batch.ingest import ingest
from cirrus_batch.lock import StoreLock, StoreLockedError, lock_path, read_holder
from cirrus_batch.store import Store, open_dataset

FAST = LockConfig(wait=0.0, stale_after=5.0, heartbeat=0.2)
CLI = [sys.executable, "-m", "cirrus_batch.cli"]


def test_one_holder_a_second_is_refused_naming_the_first(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    with StoreLock(str(store), "ingest", FAST, create=True):
        holder = read_holder(lock_path(str(store)))
        assert (holder.command, holder.pid) == ("ingest", os.getpid())
        with pytest.raises(StoreLockedError, match=rf"being written by `ingest` of .*pid {os.getpid()}.*prepare "
                                                    r"changed nothing \(waited 0 s"):  # fmt: skip
            StoreLock(str(store), "prepare", FAST).acquire()
    assert not lock_path(str(store)).exists()  # released
    with StoreLock(str(store), "prepare", FAST):
        pass


def test_a_second_writer_waits_for_the_first(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    first = StoreLock(str(store), "ingest", FAST)
    first.acquire()
    threading.Timer(1.0, first.release).start()
    told = []
    t0 = time.monotonic()
    with StoreLock(str(store), "prepare", LockConfig(wait=30, stale_after=60, heartbeat=1), on_wait=told.append):
        assert time.monotonic() - t0 >= 0.9
    assert len(told) == 1 and "being written by `ingest`" in told[0] and "waiting up to 30 s" in told[0]


def test_stale_locks_are_broken(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    path = lock_path(str(store))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"user": "x", "host": os.uname().nodename, "pid": dead.pid, "command": "ingest", "since": "-", "token": "a"}
    path.write_text(json.dumps(info))  # its process on this host is gone
    with StoreLock(str(store), "prepare", FAST):
        assert read_holder(path).command == "prepare"
    path.write_text(json.dumps({**info, "host": "elsewhere", "pid": 1}))  # another host, no heartbeat for 10 s
    os.utime(path, (time.time() - 10, time.time() - 10))
    with StoreLock(str(store), "prepare", FAST):
        assert read_holder(path).command == "prepare"
    path.write_text(json.dumps({**info, "host": "elsewhere", "pid": 1}))  # another host, fresh: kept
    with pytest.raises(StoreLockedError, match="elsewhere"):
        StoreLock(str(store), "prepare", FAST).acquire()


def test_the_holder_renews_its_heartbeat(tmp_path):
    store = tmp_path / "s.zarr"
    with StoreLock(str(store), "ingest", FAST, create=True):
        path = lock_path(str(store))
        os.utime(path, (time.time() - 4, time.time() - 4))
        time.sleep(0.6)
        assert time.time() - path.stat().st_mtime < 1


def test_no_store_is_an_error_before_any_lock(tmp_path):
    with pytest.raises(StoreError, match="no zarr store"):
        StoreLock(str(tmp_path / "missing.zarr"), "prepare", FAST).acquire()
    assert not (tmp_path / "missing.zarr.lock").exists()


def _nights(root: Path, days: list[int]) -> None:
    for day in days:
        make_archive(root, nights=1, per_night=6, start_day=day)


def test_concurrent_ingests_of_different_nights_keep_every_image_once(tmp_path, client):
    """Ingest night A; then A+B and A+C at once, as two processes: every image once (5 rounds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    address = client.scheduler.address
    _nights(tmp_path / "ab", [5, 6])
    _nights(tmp_path / "ac", [5, 7])
    waited = 0
    for round_ in range(5):
        store = tmp_path / f"s{round_}.zarr"
        ingest(str(tmp_path / "ab" / "2026" / "20260105"), str(store), client, IngestConfig(shard_size=4),
               progress=False)  # fmt: skip
        procs = [subprocess.Popen([*CLI, "ingest", str(tmp_path / src), str(store), "--no-progress",
                                   "--cluster", address], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for src in ("ab", "ac")]  # fmt: skip
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        waited += sum("waiting up to" in err for _, err in outs)
        ds = open_dataset(str(store))
        times = ds["time"].values
        assert ds.sizes["time"] == 18 and len(set(times.tolist())) == 18, round_
        assert (np.diff(times) > np.timedelta64(0)).all()
        assert sorted({str(t)[:10] for t in times}) == ["2026-01-05", "2026-01-06", "2026-01-07"]
        assert not (tmp_path / f"s{round_}.zarr.lock").exists()
        shutil.rmtree(store)
    assert waited  # the two runs did overlap: one waited for the other


def test_cli_prepare_refuses_or_waits_while_another_writes(tmp_path, store, capsys):
    """A second writer gives up with one line naming the holder (the store unchanged), or waits its turn."""
    holder = StoreLock(store, "prepare", FAST)
    holder.acquire()
    before = dict(Store.open(store, mode="r").group.attrs)
    try:
        assert cli.main(["prepare", store, "--wait", "0.5", "--no-progress", "--cluster", "local"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"cirrus: error: {store} is being written by `prepare` of")
        assert "waiting up to 0.5 s" in err[0] and "Traceback" not in "".join(err)
        assert dict(Store.open(store, mode="r").group.attrs) == before
        assert cli.main(["remove", store, "--time", "2000-01-01", "--wait", "0"]) == 1
    finally:
        threading.Timer(1.0, holder.release).start()
    assert cli.main(["remove", store, "--time", "2000-01-01", "--wait", "30"]) == 0  # waits, then finds nothing
    out = capsys.readouterr()
    assert "waiting up to 30 s" in out.err and "removed 0 images" in out.out
