"""The cluster factory: local default, scheduler addresses, and clear errors."""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
import time

import dask
import psutil
import pytest
from distributed import Client, LocalCluster

from cirrus_batch.cluster import (
    WORKER_MALLOC,
    connect,
    gpu_resources,
    job_script,
    trim_workers,
    worker_config,
)
from cirrus_batch.config import ClusterConfig, IngestConfig, SlurmConfig
from cirrus_batch.errors import CirrusError
from cirrus_batch.ingest import ingest
from cirrus_batch.synth import write_archive


def test_local_cluster_runs_tasks_and_closes():
    with connect("local", ClusterConfig(n_workers=2)) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert client.status == "closed"


def test_scheduler_address_connects_to_running_cluster(client):
    with connect(client.scheduler.address) as other:
        assert other.submit(lambda: 41 + 1).result() == 42
    assert client.status == "running"  # the shared cluster stays up


def test_gpu_resources_only_where_a_worker_has_a_gpu(client):
    assert gpu_resources(client) is None  # plain local workers: GPU tasks may run anywhere
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=":0") as cluster, Client(cluster) as gpu_client:  # fmt: skip
        assert gpu_resources(gpu_client) == {"GPU": 1}
        assert gpu_client.submit(lambda: 7, resources=gpu_resources(gpu_client)).result() == 7


def test_unknown_kind_and_unreachable_scheduler():
    with pytest.raises(CirrusError, match="unknown cluster 'moon'"):
        with connect("moon"):
            pass
    with pytest.raises(CirrusError, match="cannot connect"):
        with connect("tcp://127.0.0.1:9", ClusterConfig(connect_timeout="2s")):
            pass


def test_slurm_job_script_from_config():
    from dask_jobqueue import SLURMCluster

    from cirrus_batch.cluster import slurm_kwargs

    cfg = SlurmConfig(queue="gpu", cores=4, memory="16GB", walltime="01:00:00", gpus_per_job=1,
                      python="/opt/venv/bin/python", job_script_prologue=["module load cuda"])
    with SLURMCluster(**slurm_kwargs(ClusterConfig(slurm=cfg)),
                      scheduler_options={"dashboard_address": ":0"}) as cluster:  # fmt: skip
        script = cluster.job_script()
    assert "#SBATCH -p gpu" in script and "#SBATCH --cpus-per-task=4" in script
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -t 01:00:00" in script
    assert "module load cuda" in script and "export DASK_DISTRIBUTED__WORKER__DAEMON=False" in script
    assert "/opt/venv/bin/python -m distributed.cli.dask_worker" in script and "--resources GPU=1" in script


def test_slurm_workers_get_the_local_workers_settings():
    """The job script's exports, read as the nanny reads its environment, give the local cluster's worker config."""
    for profile in (False, True):
        config = ClusterConfig(worker_profile=profile, slurm=SlurmConfig(cores=1, memory="1GB"))
        exports = [line for line in job_script(config).splitlines() if line.startswith("export DASK_")]
        environ = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in exports)
        # merged over the defaults as dask does at import: the glibc settings replace dask's, the others stay
        merged = dask.config.update(copy.deepcopy(dask.config.config), dask.config.collect_env(environ))
        for key, value in worker_config(config).items():
            assert dask.config.get(key, config=merged) == value, key
        assert dask.config.get("distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS", config=merged) == 1


def test_local_workers_run_with_the_worker_settings():
    config = ClusterConfig(n_workers=1)
    with connect("local", config) as client:
        (env, profile), = client.run(lambda: ({k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_",
                                                                            "MALLOC_MMAP_THRESHOLD_")},
                                              dask.config.get("distributed.worker.profile.enabled"))).values()
    assert env == {name: str(value) for name, value in WORKER_MALLOC.items()}
    assert profile is False


def test_slurm_without_sbatch_is_a_clear_error(monkeypatch):
    from cirrus_batch.config import ClusterConfig

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(CirrusError, match="needs SLURM's sbatch"):
        with connect("slurm", ClusterConfig()):
            pass


def _listeners(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process ``pid`` and its children."""
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for proc in procs:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN}  # fmt: skip
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_local_run_listens_on_loopback_only(tmp_path, client):
    """`cirrus prepare` on the default config: scheduler, workers, nannies and dashboard on 127.0.0.1 only."""
    write_archive(tmp_path / "a", nights=2, per_night=4, cadence_min=10, shape=(48, 60), seed=5, progress=False,
                  kinds=["arriving", "overcast"])
    ingest(str(tmp_path / "a"), str(tmp_path / "s.zarr"), client, IngestConfig(shard_size=4), progress=False)
    run = subprocess.Popen([sys.executable, "-m", "cirrus_batch.cli", "prepare", str(tmp_path / "s.zarr"),
                            "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    seen: set[tuple[str, int]] = set()
    while run.poll() is None:
        seen |= _listeners(run.pid)
        time.sleep(0.1)
    assert run.returncode == 0, run.stdout.read()
    assert len(seen) >= 3, seen  # the scheduler, its dashboard, a worker at least
    assert {ip for ip, _ in seen} <= {"127.0.0.1", "::1"}, seen


TRIM_SCRIPT = """
import psutil
from cirrus_batch.cluster import _malloc_trim
p = psutil.Process()
blocks = [bytearray(2**20) for _ in range(200)]  # 200 MiB on the heap: each is below the mmap threshold
held = p.memory_info().rss
del blocks
freed = p.memory_info().rss
assert _malloc_trim()
print(held >> 20, freed >> 20, p.memory_info().rss >> 20)
"""


def test_trim_gives_back_what_the_workers_malloc_settings_keep():
    env = {"MALLOC_TRIM_THRESHOLD_": str(256 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)}  # WORKER_MALLOC
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout
    held, freed, trimmed = map(int, out.split())
    assert freed > held - 50  # freed to the heap, kept by the high trim threshold
    assert trimmed < freed - 150  # given back by malloc_trim


def test_trim_workers_runs_on_every_worker(client):
    trimmed = trim_workers(client)
    assert set(trimmed) == set(client.scheduler_info()["workers"])
    assert all(isinstance(v, bool) for v in trimmed.values())
