"""The cluster factory: local default, scheduler addresses, and clear errors."""

from __future__ import annotations

import pytest

from cirrus_batch.cluster import connect
from cirrus_batch.config import ClusterConfig
from cirrus_batch.errors import CirrusError


def test_local_cluster_runs_tasks_and_closes():
    with connect("local", ClusterConfig(n_workers=2)) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert client.status == "closed"


def test_scheduler_address_connects_to_running_cluster(client):
    with connect(client.scheduler.address) as other:
        assert other.submit(lambda: 41 + 1).result() == 42
    assert client.status == "running"  # the shared cluster stays up


def test_unknown_kind_and_unreachable_scheduler():
    with pytest.raises(CirrusError, match="unknown cluster 'moon'"):
        with connect("moon"):
            pass
    with pytest.raises(CirrusError, match="cannot connect"):
        with connect("tcp://127.0.0.1:9", ClusterConfig(connect_timeout="2s")):
            pass
