"""Redis behind fault-injecting proxies (``devtools.faultproxy``), as a test backend:
every client of the gateway (in-process or a subprocess) reaches Redis through them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from devtools.faultproxy import ProxiedCluster, ProxyFleet, ProxyHandle
from devtools.redis_cluster import LocalCluster
from devtools.redis_server import LocalRedis
from tests.support.api import Backend


@dataclass
class Proxied:
    backend: Backend                      # its URL goes through the proxies
    proxies: list[ProxyHandle]
    cluster: ProxiedCluster | None = None

    def proxy_for_key(self, key: str) -> ProxyHandle:
        """The proxy in front of the node that owns ``key``'s slot."""
        if self.cluster is None:
            return self.proxies[0]
        return self.cluster.proxy_for_key(key)

    def clear(self) -> None:
        for proxy in self.proxies:
            proxy.clear()


@contextlib.contextmanager
def proxied_standalone(server: LocalRedis) -> Iterator[Proxied]:
    assert server.node is not None
    with ProxyFleet() as fleet:
        proxy = fleet.add(server.node.host, server.node.port)
        yield Proxied(Backend("standalone", proxy.url, server), [proxy])


@contextlib.contextmanager
def proxied_cluster(cluster: LocalCluster) -> Iterator[Proxied]:
    with ProxiedCluster(cluster) as proxied:
        yield Proxied(Backend("cluster", proxied.url, cluster), list(proxied.proxies), proxied)
