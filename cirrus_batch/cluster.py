"""Where Dask work runs: a local cluster (the embedded default), SLURM, or an existing scheduler.

Every command that runs Dask work takes ``--cluster``: ``local`` (a LocalCluster sized to the machine, listening
on 127.0.0.1 only, its dashboard too), ``slurm`` (dask-jobqueue workers as SLURM jobs), or a scheduler address
such as ``tcp://10.0.0.5:8786``.
Precedence: ``--cluster`` > the job config's ``[cluster]`` table > defaults.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.deploy import Cluster

from cirrus_batch.config import ClusterConfig, SlurmConfig
from cirrus_batch.errors import CirrusError

log = logging.getLogger(__name__)


WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": 256 * 2**20, "MALLOC_MMAP_THRESHOLD_": 64 * 2**20}
"""glibc settings (environment variables) for worker processes, set by their nanny (``pre-spawn-environ``). Dask's
default trim threshold (64 KiB) also switches off glibc's adaptive mmap threshold, so every image-sized array is
mapped and faulted in afresh: prepare ran at half speed."""


def worker_config(config: ClusterConfig) -> dict[str, Any]:
    """The dask config the project's worker processes start with (local and SLURM): :data:`WORKER_MALLOC` and the
    statistical profiler on or off (``[cluster] worker_profile``)."""
    return {**{f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in WORKER_MALLOC.items()},
            "distributed.worker.profile.enabled": config.worker_profile}


def worker_exports(config: ClusterConfig) -> list[str]:
    """:func:`worker_config` as ``export DASK_...`` lines of a worker job script: a SLURM job's nanny reads its
    dask config from the environment (the glibc settings as one dict value, whose keys keep their case)."""
    return [f"export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{json.dumps(WORKER_MALLOC)}'",
            f"export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED={config.worker_profile}"]  # fmt: skip


def _malloc_trim() -> bool:
    """Give the free memory of this process's glibc heaps back to the system; False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def trim_workers(client: Client) -> dict[str, bool]:
    """``malloc_trim`` on every worker between phases of a long job (by worker address: whether memory was given
    back): with :data:`WORKER_MALLOC`'s high trim threshold, the free memory one phase leaves behind would
    otherwise stay in the worker's heap and add to the next phase's peak."""
    return client.run(_malloc_trim)


def local_cluster(config: ClusterConfig) -> LocalCluster:
    """A LocalCluster with one single-threaded worker process per core unless configured otherwise."""
    n_workers = config.n_workers or os.cpu_count() or 1
    with dask.config.set(worker_config(config)):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=config.threads_per_worker,
            processes=True,
            memory_limit=config.memory_limit,
            dashboard_address=config.dashboard_address,
            silence_logs=logging.WARNING,
        )


def gpu_resources(client: Client) -> dict[str, float] | None:
    """``{"GPU": 1}`` when some worker advertises the ``GPU`` resource (GPU workers on SLURM), else ``None``.

    Pass it as ``resources=`` of ``client.submit``: one GPU task per GPU at a time there, any worker elsewhere.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers) else None


def slurm_kwargs(config: ClusterConfig) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments from the job config; unset keys are left to the dask config."""
    cfg = config.slurm
    keys = ("queue", "account", "cores", "memory", "processes", "walltime", "interface", "local_directory",
            "log_directory")
    kwargs: dict[str, Any] = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
    kwargs["python"] = cfg.python or sys.executable
    directives, worker_args = list(cfg.job_extra_directives), list(cfg.worker_extra_args)
    if cfg.gpus_per_job:
        directives.append(f"--gres=gpu:{cfg.gpus_per_job}")
        worker_args += ["--resources", f"GPU={cfg.gpus_per_job}"]
    # training may start DataLoader worker processes, which a daemonic Dask worker cannot
    prologue = ["export DASK_DISTRIBUTED__WORKER__DAEMON=False", *worker_exports(config), *cfg.job_script_prologue]
    for key, value in (("job_extra_directives", directives), ("worker_extra_args", worker_args),
                       ("job_script_prologue", prologue), ("job_directives_skip", cfg.job_directives_skip)):
        if value:
            kwargs[key] = value
    return kwargs


def slurm_cluster(config: ClusterConfig) -> Cluster:
    """A dask-jobqueue SLURMCluster (not yet scaled); a clear error where SLURM is not installed."""
    if shutil.which("sbatch") is None:
        raise CirrusError("--cluster slurm needs SLURM's sbatch on PATH (not found); use --cluster local")
    from dask_jobqueue import SLURMCluster

    check_slurm_job(config)
    return SLURMCluster(**slurm_kwargs(config), scheduler_options={"dashboard_address": config.dashboard_address})


SCHEDULER_PLACEHOLDER = "tcp://SCHEDULER:8786"


def job_script(config: ClusterConfig, scheduler: str = SCHEDULER_PLACEHOLDER) -> str:
    """The worker job script dask-jobqueue would submit for ``config`` (job config > ``jobqueue.slurm.*`` dask
    config).

    Needs neither SLURM nor a running scheduler: the scheduler address is a placeholder unless given, since the
    real one is known only once the cluster starts.
    """
    from dask_jobqueue.slurm import SLURMJob

    try:
        return SLURMJob(scheduler=scheduler, name="dummy-name", **slurm_kwargs(config)).job_script()
    except ValueError as exc:  # dask-jobqueue: no cores/memory anywhere
        if "cores and memory" not in str(exc):
            raise
        raise CirrusError("--cluster slurm needs cores and memory per job: set [cluster.slurm] cores and memory "
                          "(or jobqueue.slurm.cores/memory in the dask config)") from None


def _slurm_partition(cfg: SlurmConfig) -> str | None:
    return cfg.queue or dask.config.get("jobqueue.slurm.queue", None)


def check_slurm_job(config: ClusterConfig) -> None:
    """Fail early, with SLURM's own reason, where SLURM would reject the worker job (unknown partition,
    more CPUs, memory or GPUs than any node has, a bad directive) instead of waiting ``wait_timeout`` for
    workers that can never start. Uses ``sinfo`` and ``sbatch --test-only``; submits nothing."""
    partition = _slurm_partition(config.slurm)
    if partition and shutil.which("sinfo"):
        found = _run(["sinfo", "-h", "-p", partition, "-o", "%P"])
        if found is not None and found.returncode == 0 and not found.stdout.strip():
            listed = _run(["sinfo", "-h", "-o", "%P"])
            names = sorted({n.strip().rstrip("*") for n in (listed.stdout.split() if listed else []) if n.strip()})
            raise CirrusError(
                f"SLURM partition {partition!r} does not exist (partitions: {', '.join(names) or 'none'}); "
                "fix [cluster.slurm] queue or jobqueue.slurm.queue"
            )
    with tempfile.NamedTemporaryFile("w", prefix="cirrus-worker-", suffix=".sh", delete=False) as f:
        f.write(job_script(config))
    try:
        test = _run(["sbatch", "--test-only", f.name])
    finally:
        os.unlink(f.name)
    if test is not None and test.returncode != 0:
        reason = "; ".join(line.strip() for line in (test.stderr or test.stdout).splitlines() if line.strip())
        raise CirrusError(f"SLURM rejects the Dask worker job ({reason or f'sbatch exit {test.returncode}'}); "
                          "check [cluster.slurm] (cirrus cluster-script prints the job script)")


def _run(cmd: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess | None:
    """Run a SLURM client command; None where it cannot run at all (then the check is skipped)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s: %s", " ".join(cmd), exc)
        return None


def _slurm_job_states(cluster: Cluster) -> str:
    """``"12 PENDING (Resources), 13 PENDING (Resources)"`` for the cluster's worker jobs, or ``""``."""
    try:
        ids = [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]
        if not ids:
            return ""
        out = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T (%r)"], timeout=10)
        return ", ".join(out.stdout.split("\n")).strip(", ") if out is not None and out.returncode == 0 else ""
    except Exception:  # diagnostics only
        return ""


@contextmanager
def connect(spec: str | None = None, config: ClusterConfig | None = None) -> Iterator[Client]:
    """Start (or connect to) the cluster named by ``spec`` and yield a client; close both on exit."""
    config = config or ClusterConfig()
    kind = spec or config.kind
    if kind == "local":
        cluster = local_cluster(config)
    elif kind == "slurm":
        cluster = slurm_cluster(config)
    elif "://" in kind:
        cluster = None
    else:
        raise CirrusError(f"unknown cluster {kind!r}: use 'local', 'slurm' or a scheduler address like tcp://host:8786")
    try:
        client = Client(cluster if cluster is not None else kind, timeout=config.connect_timeout)
    except OSError as exc:
        if cluster is not None:
            cluster.close()
        raise CirrusError(f"cannot connect to the Dask scheduler at {kind}: {exc}") from None
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        if kind == "slurm":
            _start_slurm_workers(cluster, client, config.slurm)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _start_slurm_workers(cluster: Cluster, client: Client, cfg: SlurmConfig) -> None:
    """Submit the worker jobs and wait for the first worker; on timeout the jobs are cancelled."""
    cluster.scale(jobs=cfg.jobs)
    try:
        client.wait_for_workers(1, timeout=cfg.wait_timeout)
    except TimeoutError:
        states = _slurm_job_states(cluster)
        cluster.close()  # scancel the worker jobs now (connect() closes again, which is harmless)
        raise CirrusError(
            f"no SLURM worker started within {cfg.wait_timeout:.0f} s (wait_timeout; check squeue, the partition "
            "and the worker logs); the worker jobs were cancelled" + (f"; they were: {states}" if states else "")
        ) from None
