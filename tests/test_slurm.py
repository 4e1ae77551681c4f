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

import dask
import optuna
import pytest

from cirrus_batch.cli import main
from cirrus_batch.cluster import connect, job_script
from cirrus_batch.config import ClusterConfig, SlurmConfig, load_config
from cirrus_batch.errors import CirrusError
from cirrus_batch.store import json_attr

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
    cfg = load_config(ROOT / "jobs" / "ci.toml").cluster
    cfg.slurm.cores = None  # falls back to the dask config
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
        settings = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                                       dask.config.get("distributed.worker.profile.enabled")))
        assert set(settings.values()) == {(str(256 * 2**20), str(64 * 2**20), False)}  # as local workers (WORKER_MALLOC)
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


# -- the driver job and a worker lost mid-run ---------------------------------------------------------
def _toml(data: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    """TOML lines for nested dicts of strings, numbers, booleans and lists (JSON literals are TOML here)."""
    import json

    scalars = [(k, v) for k, v in data.items() if not isinstance(v, dict)]
    lines = ([f"[{'.'.join(prefix)}]"] if prefix and scalars else []) + [f"{k} = {json.dumps(v)}" for k, v in scalars]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += _toml(value, prefix + (key,))
    return lines


def _job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as a dict (kept by slurmctld for MinJobAge=60 s after the job ends)."""
    out = _sh("scontrol", "show", "job", "-o", job_id)
    assert out.returncode == 0, out.stderr
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


@pytest.mark.slurm
def test_train_sh_driver_job_runs_ingest_prepare_train(local_slurm, tmp_path):
    """``sbatch slurm/train.sh`` with jobs/ci.toml (only its output paths moved into tmp_path): the driver job
    completes, ingest and prepare ran on Dask workers that were separate SLURM jobs with a fake GPU each, and
    both models are registered in MLflow, trained on those worker jobs. Then ``slurm/reprocess.sh`` predicts
    every image with them and writes the report, and ``slurm/tune.sh`` runs a 2-trial study on worker jobs."""
    import tomllib

    import zarr
    from mlflow.tracking import MlflowClient

    from cirrus_batch.prepare import UNPREPARED
    from cirrus_batch.synth import write_archive

    write_archive(tmp_path / "archive", nights=6, per_night=6, cadence_min=10, shape=(64, 80), seed=11,
                  progress=False)  # fmt: skip
    logs, uri = tmp_path / "logs", f"sqlite:///{tmp_path}/mlflow.db"
    data = tomllib.loads((ROOT / "jobs" / "ci.toml").read_text())
    data["train"].update(tracking_uri=uri, checkpoint_dir=str(tmp_path / "checkpoints"))
    data["tune"]["storage"] = f"sqlite:///{tmp_path}/optuna.db"
    data["cluster"]["slurm"]["log_directory"] = str(logs)
    # each worker job writes its SLURM job id and the GPU SLURM gave it into its log
    data["cluster"]["slurm"]["job_script_prologue"] = [
        'echo "cirrus-worker job=$SLURM_JOB_ID gpus=${CUDA_VISIBLE_DEVICES:-none}"']
    config = tmp_path / "ci.toml"
    config.write_text("\n".join(_toml(data)) + "\n")
    # artifacts next to the tracking database, not in ./mlruns of the repository the job runs in
    MlflowClient(uri).create_experiment(data["train"].get("experiment", "cirrus"),
                                        artifact_location=str(tmp_path / "artifacts"))  # fmt: skip
    store = tmp_path / "season.zarr"
    env = {**os.environ, "SOURCE": str(tmp_path / "archive"), "STORE": str(store), "CLUSTER": "slurm", "TASK": "both"}
    start = time.monotonic()
    submit = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/driver-%j.out", "slurm/train.sh",
                             str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    driver = submit.stdout.strip().split(";")[0]
    seen: dict[str, list[str]] = {}  # this run's dask-worker jobs (by log path) in squeue while the driver ran
    fields = "JobID:16,Name:16,State:16,tres-per-node:32,StdOut:1000"
    try:
        while time.monotonic() - start < 300:
            rows = [line.split() for line in _sh("squeue", "-h", "-O", fields).stdout.splitlines()]
            if not any(row and row[0] == driver for row in rows):
                break
            seen.update({row[0]: row for row in rows if len(row) == 5 and row[1] == "dask-worker"
                         and row[4].startswith(f"{logs}/")})  # fmt: skip
            time.sleep(0.3)
        else:
            pytest.fail(f"driver job {driver} still queued or running after 300 s")
    finally:
        if any(row[0] == driver for row in _squeue()):
            _sh("scancel", driver)
    elapsed = time.monotonic() - start
    info = _job_info(driver)
    out = tmp_path / f"driver-{driver}.out"
    log = out.read_text() if out.exists() else "(no driver log)"
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "train.sh: " in log and "done (exit 0)" in log

    # the Dask work ran on worker jobs: job ids from the worker logs, each with a GPU and a connected worker
    workers = {}
    for path in sorted(logs.glob("dask-worker-*.out")):
        job = path.name.removeprefix("dask-worker-").removesuffix(".out")
        err = logs / f"dask-worker-{job}.err"
        if err.exists() and "Registered to:" in err.read_text():
            workers[job] = path.read_text()
    assert len(workers) >= 2, f"expected ingest and prepare workers, got {sorted(workers)}:\n{log[-3000:]}"
    assert driver not in workers
    for job, text in workers.items():
        assert f"cirrus-worker job={job} gpus=" in text, text
        assert text.split(f"cirrus-worker job={job} gpus=")[1].split()[0] in ("0", "1"), text
    assert set(workers) & set(seen), (sorted(workers), seen)  # seen in squeue while the driver ran
    assert seen and all(row[3] == "gres:gpu:1" for row in seen.values()), seen  # squeue: each asked for a GPU
    assert _wait_gone(list(seen)) == []  # every worker job (started or still pending) is cancelled

    # the store is ingested and prepared, and both models are registered
    group = zarr.open_group(str(store), mode="r")
    assert group.attrs["committed"] == 36
    assert (group["quality"][:] != UNPREPARED).all()
    client = MlflowClient(uri)
    for name in ("cirrus-classifier", "cirrus-unet"):
        versions = client.search_model_versions(f"name='{name}'")
        assert [(str(v.version), v.status) for v in versions] == [("1", "READY")], (name, versions)
        run = client.get_run(versions[0].run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["slurm_job_id"] in workers, (name, run.data.tags)  # trained on a GPU worker job
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["classify.pt", "segment.pt"]
    print(f"train.sh driver job {driver}: {elapsed:.0f} s, worker jobs {sorted(workers)}")

    # slurm/reprocess.sh on the same store: predictions for every image from the registered models, the report
    report = tmp_path / "report"
    info, log = _driver("slurm/reprocess.sh", config, {**env, "SOURCE": "", "REPORT": str(report)}, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    group = zarr.open_group(str(store), mode="r")
    assert (group["pred_model"][:] == 0).all() and json_attr(group["pred_model"].attrs, "models")[0]["unet"]["version"] == "1"
    assert (report / "report.md").exists() and (report / "clear_hours.csv").exists()

    # slurm/tune.sh: a 2-trial study whose trials ran on the Dask worker jobs
    info, log = _driver("slurm/tune.sh", config, {**env, "TASK": "segment", "TRIALS": "2"}, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    study = optuna.load_study(study_name="cirrus-segment", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"], log[-3000:]
    assert all(t.user_attrs["worker"].startswith("tcp://") for t in study.trials)


def _driver(script: str, config: Path, env: dict[str, str], tmp_path: Path, timeout: float = 300) -> tuple[dict, str]:
    """Submit a driver job script from the repository root, wait for it to leave the queue; (job info, its log)."""
    submit = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/driver-%j.out", script, str(config)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while any(row[0] == job for row in _squeue()):
        if time.monotonic() > deadline:
            _sh("scancel", job)
            pytest.fail(f"{script} job {job} still queued or running after {timeout:.0f} s")
        time.sleep(0.5)
    out = tmp_path / f"driver-{job}.out"
    return _job_info(job), out.read_text() if out.exists() else "(no driver log)"


class _Transitions:
    """Scheduler plugin that records every task transition (the story survives the tasks being forgotten)."""

    name = "cirrus-test-transitions"

    def __init__(self):
        self.log: list[tuple[str, str, str, str | None]] = []

    def transition(self, key, start, finish, *args, **kwargs):
        self.log.append((str(key), start, finish, kwargs.get("worker")))


@pytest.mark.slurm
def test_prepare_survives_a_worker_job_killed_mid_run(local_slurm, worker_logs, tmp_path, client):
    """scancel one of two worker jobs while prepare runs: the tasks it held are rescheduled on the other
    worker, and the result equals a prepare of the same store on a LocalCluster."""
    import numpy as np
    import zarr
    from distributed.diagnostics.plugin import SchedulerPlugin

    from cirrus_batch.config import IngestConfig, PrepareConfig
    from cirrus_batch.ingest import ingest
    from cirrus_batch.prepare import UNPREPARED, prepare
    from cirrus_batch.synth import write_archive

    # 8 blocks of 16 images, large enough (~0.5 s a block) that the killed worker still holds work
    write_archive(tmp_path / "archive", nights=8, per_night=16, cadence_min=5, shape=(480, 640), seed=21,
                  progress=False)  # fmt: skip
    store, reference = str(tmp_path / "s.zarr"), str(tmp_path / "ref.zarr")
    ingest(str(tmp_path / "archive"), store, client, IngestConfig(shard_size=16), progress=False)
    shutil.copytree(store, reference)
    cfg = PrepareConfig(fit_images=30)
    prepare(reference, client, cfg, progress=False)  # on the LocalCluster

    killed: dict = {}
    with connect("slurm", _config(worker_logs)) as slurm:
        slurm.wait_for_workers(2, timeout=120)
        jobs = slurm.run(lambda: os.environ["SLURM_JOB_ID"])  # worker address -> SLURM job id
        assert len(set(jobs.values())) == 2 and set(jobs.values()) <= set(_our_jobs())
        recorder = type("Recorder", (_Transitions, SchedulerPlugin), {})()
        slurm.run_on_scheduler(lambda dask_scheduler: dask_scheduler.add_plugin(recorder))  # gets a copy

        def on_block(done: int) -> None:
            if killed:
                return
            processing = slurm.processing()
            victim = max(jobs, key=lambda addr: len(processing.get(addr, ())))
            killed.update(job=jobs[victim], address=victim, keys={str(k) for k in processing.get(victim, ())},
                          done=done)  # fmt: skip
            assert _sh("scancel", jobs[victim]).returncode == 0

        report = prepare(store, slurm, cfg, progress=False, on_block=on_block)
        assert _wait_gone([killed["job"]]) == []
        assert killed["address"] not in slurm.scheduler_info()["workers"]
        log = slurm.run_on_scheduler(lambda dask_scheduler: dask_scheduler.plugins[_Transitions.name].log)
    survivor = next(job for job in jobs.values() if job != killed["job"])
    assert _wait_gone([survivor]) == []

    n = 8 * 16
    assert killed["done"] < n and killed["keys"], killed  # the kill came while the victim held blocks
    assert report.prepared_now == n and report.fitted
    # a block the victim held was taken back (processing -> released) and then finished on the survivor
    rescheduled = {key for key, start, finish, _ in log if key in killed["keys"] and start == "processing"
                   and finish not in ("memory", "erred")}  # fmt: skip
    assert rescheduled, (killed, [entry for entry in log if entry[0] in killed["keys"]])
    finished_on = {key: worker for key, start, finish, worker in log if finish == "memory" and worker}
    assert all(finished_on.get(key) not in (None, killed["address"]) for key in rescheduled), finished_on

    got, want = zarr.open_group(store, mode="r"), zarr.open_group(reference, mode="r")
    assert (got["quality"][:] != UNPREPARED).all()
    assert got.attrs["prepare"] == want.attrs["prepare"]
    for name in ("sky", "mask", "residual", "cloud_fraction", "quality", "cloudy"):
        np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=name)
    survivors = {finished_on[key] for key in rescheduled}
    print(f"scancel {killed['job']} after {killed['done']}/{n} images; rescheduled {len(rescheduled)} blocks "
          f"on {survivors}; prepare {report.seconds:.1f} s")
