"""Where Dask work runs: a local cluster (the embedded default), SLURM, or an existing scheduler.

Every command takes ``--cluster``: ``local`` (a LocalCluster sized to the machine), ``slurm``
(dask-jobqueue workers as SLURM jobs), or a scheduler address such as ``tcp://10.0.0.5:8786``.
Precedence: ``--cluster`` > the job config's ``[cluster]`` table > defaults.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from cirrus_batch.config import ClusterConfig
from cirrus_batch.errors import CirrusError

log = logging.getLogger(__name__)


def local_cluster(config: ClusterConfig) -> LocalCluster:
    """A LocalCluster with one single-threaded worker process per core unless configured otherwise."""
    n_workers = config.n_workers or os.cpu_count() or 1
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=config.threads_per_worker,
        processes=True,
        memory_limit=config.memory_limit,
        dashboard_address=config.dashboard_address,
        silence_logs=logging.WARNING,
    )


@contextmanager
def connect(spec: str | None = None, config: ClusterConfig | None = None) -> Iterator[Client]:
    """Start (or connect to) the cluster named by ``spec`` and yield a client; close both on exit."""
    config = config or ClusterConfig()
    kind = spec or config.kind
    if kind == "local":
        cluster = local_cluster(config)
    elif "://" in kind:
        cluster = None
    else:
        raise CirrusError(f"unknown cluster {kind!r}: use 'local' or a scheduler address like tcp://host:8786")
    try:
        client = Client(cluster if cluster is not None else kind, timeout=config.connect_timeout)
    except OSError as exc:
        if cluster is not None:
            cluster.close()
        raise CirrusError(f"cannot connect to the Dask scheduler at {kind}: {exc}") from None
    log.info("Dask dashboard: %s", client.dashboard_link)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
