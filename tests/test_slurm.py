"""Dask workers as real SLURM jobs on the local single-node SLURM (slurm/local-cluster.sh), and clean errors.

The ``slurm``-marked tests start the local SLURM once per session (root only; installs slurm-wlm + munge
with apt-get the first time). Where it cannot start they are skipped with the reason, unless
``CIRRUS_REQUIRE_SLURM=1`` turns that into a failure. ``make test`` starts it beforehand when run as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cirrus_batch.cli import main
from cirrus_batch.cluster import connect, job_script
from cirrus_batch.config import ClusterConfig, SlurmConfig, load_config
from cirrus_batch.errors import CirrusError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "slurm" / "local-cluster.sh"


def _sh(*cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _slurm_up() -> bool:
    return shutil.which("sinfo") is not None and _sh("bash", str(SCRIPT), "status").returncode == 0


@pytest.fixture(scope="session")
def local_slurm():
    """The local SLURM, started here if needed (and then stopped at the end of the session)."""
    started = False
    if not _slurm_up():
        reason = None
        if os.geteuid() != 0:
            reason = "the local SLURM is not running and starting it needs root (sudo slurm/local-cluster.sh start)"
        else:
            try:
                run = _sh("bash", str(SCRIPT), "start", timeout=300)
            except subprocess.TimeoutExpired:
                reason = "slurm/local-cluster.sh start took more than 300 s"
            else:
                if run.returncode != 0:
                    reason = f"slurm/local-cluster.sh start failed: {(run.stderr or run.stdout).strip()[-800:]}"
                started = run.returncode == 0
        if reason:
            if os.environ.get("CIRRUS_REQUIRE_SLURM") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
    yield
    if started:
        _sh("bash", str(SCRIPT), "stop", timeout=120)


def _squeue(job_ids: list[str] | None = None) -> list[list[str]]:
    """Rows ``[id, name, state, gres]`` of the jobs in squeue (only ``job_ids`` where given)."""
    cmd = ["squeue", "-h", "-o", "%i|%j|%T|%b"] + (["-j", ",".join(job_ids)] if job_ids else [])
    out = _sh(*cmd)
    if out.returncode != 0 and job_ids:  # squeue -j fails once every listed job has left slurmctld
        return []
    assert out.returncode == 0, out.stderr
    return [line.split("|") for line in out.stdout.splitlines() if line.strip()]


def _wait_gone(job_ids: list[str], timeout: float = 20.0) -> list[list[str]]:
    """Wait until none of ``job_ids`` is queued, running or completing; returns what is left."""
    deadline = time.monotonic() + timeout
    while (left := _squeue(job_ids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _our_jobs() -> list[str]:
    return [row[0] for row in _squeue() if row[1] == "dask-worker"]


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("slurm-logs"))


def _config(logs: str, **kwargs) -> ClusterConfig:
    base = dict(jobs=2, cores=1, memory="2GB", walltime="00:10:00", gpus_per_job=1, wait_timeout=120,
                log_directory=logs)
    return ClusterConfig(slurm=SlurmConfig(**{**base, **kwargs}))


# -- without SLURM -------------------------------------------------------------------------------
def test_cluster_script_prints_the_worker_job(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # printing the script needs no SLURM
    assert main(["cluster-script", "--cluster", "slurm", "--config", str(ROOT / "jobs" / "ci.toml")]) == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH -J dask-worker", "#SBATCH -e slurm/logs/dask-worker-%J.err",
                      "#SBATCH -o slurm/logs/dask-worker-%J.out", "#SBATCH -n 1", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=2G",
                      "#SBATCH -t 00:15:00", "#SBATCH --gres=gpu:1"]  # fmt: skip
    assert "-m distributed.cli.dask_worker tcp://SCHEDULER:8786" in script
    assert "--resources GPU=1" in script and "--nthreads 1" in script


def test_cluster_script_follows_dask_config_and_errors(capsys):
    import dask

    cfg = load_config(ROOT / "jobs" / "ci.toml").cluster.slurm
    cfg.cores = None  # falls back to the dask config
    with dask.config.set({"jobqueue.slurm.cores": 3, "jobqueue.slurm.queue": "gpu"}):
        script = job_script(cfg, scheduler="tcp://10.0.0.5:8786")
    assert "#SBATCH --cpus-per-task=3" in script and "#SBATCH -p gpu" in script
    assert "dask_worker tcp://10.0.0.5:8786" in script
    assert main(["cluster-script"]) == 1  # built-in defaults have no cores/memory
    assert "needs cores and memory" in capsys.readouterr().err
    assert main(["cluster-script", "--cluster", "local"]) == 1


# -- on the local SLURM ----------------------------------------------------------------------------
@pytest.mark.slurm
def test_dask_workers_are_slurm_jobs_with_gpus(local_slurm, worker_logs):
    with connect("slurm", _config(worker_logs)) as client:
        client.wait_for_workers(2, timeout=60)
        rows = [row for row in _squeue() if row[1] == "dask-worker"]
        assert len(rows) == 2, rows
        assert all(row[2] == "RUNNING" and "gpu:1" in row[3] for row in rows), rows
        env = client.run(lambda: (os.environ["SLURM_JOB_ID"], os.environ.get("CUDA_VISIBLE_DEVICES")))
        job_ids = sorted(job for job, _ in env.values())
        assert job_ids == sorted(row[0] for row in rows)  # 2 distinct jobs, each one worker
        assert sorted(gpu for _, gpu in env.values()) == ["0", "1"]  # one fake GPU each
        future = client.submit(lambda: os.environ["CUDA_VISIBLE_DEVICES"], resources={"GPU": 1})
        assert future.result(timeout=30) in ("0", "1")
    assert _wait_gone(job_ids) == []  # cancelled on exit


@pytest.mark.slurm
def test_unknown_partition_is_a_clear_error(local_slurm, worker_logs):
    before = _our_jobs()
    start = time.monotonic()
    with pytest.raises(CirrusError, match=r"SLURM partition 'nope' does not exist \(partitions: debug"):
        with connect("slurm", _config(worker_logs, queue="nope")):
            pass
    assert time.monotonic() - start < 10
    assert _our_jobs() == before


@pytest.mark.slurm
def test_job_slurm_rejects_is_a_clear_error(local_slurm, worker_logs):
    before = _our_jobs()
    with pytest.raises(CirrusError, match="SLURM rejects the Dask worker job .*Requested node configuration"):
        with connect("slurm", _config(worker_logs, gpus_per_job=3)):  # the node has 2 fake GPUs
            pass
    with pytest.raises(CirrusError, match="SLURM rejects the Dask worker job .*More processors requested"):
        with connect("slurm", _config(worker_logs, cores=64)):
            pass
    assert _our_jobs() == before


@pytest.mark.slurm
def test_workers_that_never_start_time_out_and_are_cancelled(local_slurm, worker_logs):
    before = _our_jobs()
    start = time.monotonic()
    pending = ["--begin=now+1hour"]  # the job pends (BeginTime)
    config = _config(worker_logs, jobs=1, wait_timeout=3, job_extra_directives=pending)
    with pytest.raises(CirrusError, match=r"no SLURM worker started within 3 s \(wait_timeout.*cancelled.*"
                                          r"PENDING \(BeginTime\)") as err:  # fmt: skip
        with connect("slurm", config):
            pass
    assert time.monotonic() - start < 20
    job_id = str(err.value).rsplit("they were: ", 1)[1].split()[0]
    assert _wait_gone([job_id]) == []
    assert _our_jobs() == before
