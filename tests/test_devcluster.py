"""The local Redis Cluster helper: start, route keys, fail over, stop."""

from __future__ import annotations

import os

import pytest
from redis.crc import key_slot

from devtools.redis_cluster import LocalCluster, LocalNode

pytestmark = pytest.mark.cluster


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _key_on(cluster: LocalCluster, primary: LocalNode) -> str:
    """Some key whose slot the given primary serves."""
    for i in range(100_000):
        key = f"devcluster:{i}"
        if cluster.primary_for_key(key) is primary:
            return key
    raise AssertionError(f"no key found for {primary.address}")


def test_start_failover_and_stop() -> None:
    cluster = LocalCluster(primaries=3, replicas_per_primary=1, node_timeout_ms=1000)
    with cluster:
        assert len(cluster.nodes) == 6
        assert cluster.url == f"redis://127.0.0.1:{cluster.nodes[0].port}/0"
        primaries = cluster.primary_nodes()
        assert len(primaries) == 3
        assert len(cluster.replica_nodes()) == 3
        for primary in primaries:
            assert len(cluster.replicas_of(primary)) == 1
        pids = [node.pid for node in cluster.nodes]
        dirs = [node.dir for node in cluster.nodes]

        client = cluster.cluster_client()
        try:
            assert client.cluster_info()["cluster_state"] == "ok"
            keys = {primary.port: _key_on(cluster, primary) for primary in primaries}
            for port, key in keys.items():
                client.set(key, f"value-{port}")
            for port, key in keys.items():
                assert client.get(key) == f"value-{port}"
        finally:
            client.close()

        # SIGKILL one primary: its replica must take over its slots.
        victim = primaries[0]
        (heir,) = cluster.replicas_of(victim)
        victim_key = keys[victim.port]
        cluster.wait_for_replication()
        cluster.kill(victim)
        assert not victim.running
        cluster.wait_until_healthy(timeout=30)
        assert cluster.primary_for_slot(key_slot(victim_key.encode())) is heir
        assert victim not in cluster.primary_nodes()

        client = cluster.cluster_client()
        try:
            assert client.cluster_info()["cluster_state"] == "ok"
            for port, key in keys.items():
                assert client.get(key) == f"value-{port}"
            client.set(victim_key, "after-failover")
            assert client.get(victim_key) == "after-failover"
        finally:
            client.close()

        # The killed primary comes back (same node id) as the heir's replica.
        cluster.restart(victim)
        cluster.wait_until_healthy(timeout=30)
        assert cluster.replicas_of(heir) == [victim]
        pids.append(victim.pid)

    assert cluster.nodes == []
    assert not any(_pid_exists(pid) for pid in pids if pid is not None)
    assert not any(path.exists() for path in dirs)
    cluster.stop()  # idempotent
