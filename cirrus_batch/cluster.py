"""Where Dask work runs: a local cluster (the embedded default), SLURM, or an existing scheduler.

Every command takes ``--cluster``: ``local`` (a LocalCluster sized to the machine), ``slurm``
(dask-jobqueue workers as SLURM jobs), or a scheduler address such as ``tcp://10.0.0.5:8786``.
Precedence: ``--cluster`` > the job config's ``[cluster]`` table > defaults.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.deploy import Cluster

from cirrus_batch.config import ClusterConfig, SlurmConfig
from cirrus_batch.errors import CirrusError

log = logging.getLogger(__name__)


WORKER_MALLOC = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 256 * 2**20,
    "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 64 * 2**20,
}
"""glibc settings for worker processes. Dask's default trim threshold (64 KiB) also switches off glibc's adaptive
mmap threshold, so every image-sized array is mapped and faulted in afresh: prepare ran at half speed."""


def local_cluster(config: ClusterConfig) -> LocalCluster:
    """A LocalCluster with one single-threaded worker process per core unless configured otherwise."""
    n_workers = config.n_workers or os.cpu_count() or 1
    with dask.config.set(WORKER_MALLOC):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=config.threads_per_worker,
            processes=True,
            memory_limit=config.memory_limit,
            dashboard_address=config.dashboard_address,
            silence_logs=logging.WARNING,
        )


def slurm_kwargs(cfg: SlurmConfig) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments from the job config; unset keys are left to the dask config."""
    keys = ("queue", "account", "cores", "memory", "processes", "walltime", "interface", "local_directory",
            "log_directory")
    kwargs: dict[str, Any] = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
    kwargs["python"] = cfg.python or sys.executable
    directives, worker_args = list(cfg.job_extra_directives), list(cfg.worker_extra_args)
    if cfg.gpus_per_job:
        directives.append(f"--gres=gpu:{cfg.gpus_per_job}")
        worker_args += ["--resources", f"GPU={cfg.gpus_per_job}"]
    for key, value in (("job_extra_directives", directives), ("worker_extra_args", worker_args),
                       ("job_script_prologue", cfg.job_script_prologue), ("job_directives_skip", cfg.job_directives_skip)):
        if value:
            kwargs[key] = value
    return kwargs


def slurm_cluster(cfg: SlurmConfig) -> Cluster:
    """A dask-jobqueue SLURMCluster (not yet scaled); a clear error where SLURM is not installed."""
    if shutil.which("sbatch") is None:
        raise CirrusError("--cluster slurm needs SLURM's sbatch on PATH (not found); use --cluster local")
    from dask_jobqueue import SLURMCluster

    return SLURMCluster(**slurm_kwargs(cfg))


@contextmanager
def connect(spec: str | None = None, config: ClusterConfig | None = None) -> Iterator[Client]:
    """Start (or connect to) the cluster named by ``spec`` and yield a client; close both on exit."""
    config = config or ClusterConfig()
    kind = spec or config.kind
    if kind == "local":
        cluster = local_cluster(config)
    elif kind == "slurm":
        cluster = slurm_cluster(config.slurm)
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
        raise CirrusError(
            f"no SLURM worker started within {cfg.wait_timeout:.0f} s (check squeue, the partition and the "
            "worker logs); the worker jobs were cancelled"
        ) from None
