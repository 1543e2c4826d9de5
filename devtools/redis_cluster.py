"""Throw-away local Redis Cluster for development and tests.

Starts ``primaries * (1 + replicas_per_primary)`` ``redis-server`` processes in
cluster mode on free ports of 127.0.0.1, joins them with
``redis-cli --cluster create`` and waits until the cluster is healthy::

    with LocalCluster(primaries=3, replicas_per_primary=1) as cluster:
        client = redis.cluster.RedisCluster(startup_nodes=cluster.startup_nodes)
        ...

The servers are plain child processes (not daemonized), so fault tests can
:meth:`LocalCluster.kill`, :meth:`~LocalCluster.pause`,
:meth:`~LocalCluster.resume` or :meth:`~LocalCluster.restart` single nodes.
Each node lives in its own temporary directory (``nodes.conf`` and
``redis.log``), removed again by :meth:`LocalCluster.stop`.

Run ``python -m devtools.redis_cluster --help`` for the command-line entry point.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from devtools.processes import ChildProcess

__all__ = ["ClusterNotReady", "LocalCluster", "LocalNode", "main"]

HASH_SLOTS = 16384
_BUS_PORT_OFFSET = 10000  # Redis' default cluster bus port is port + 10000.
_MAX_PORT = 65535
_LOG_NAME = "redis.log"
_POLL_INTERVAL = 0.1


class ClusterNotReady(RuntimeError):
    """The cluster did not start, or did not become healthy in time."""


@dataclass(eq=False)
class LocalNode:
    """One ``redis-server`` process of a :class:`LocalCluster`.

    ``node_id`` is the cluster node id; it survives :meth:`LocalCluster.restart`
    because the node keeps its directory and ``nodes.conf``. Roles are not
    stored here since they change on failover: ask the cluster
    (:meth:`LocalCluster.primary_nodes`, :meth:`LocalCluster.replicas_of`).
    """

    index: int
    host: str
    port: int
    dir: Path
    child: ChildProcess | None = field(default=None, repr=False)
    node_id: str = ""
    # Port the node tells clients (cluster-announce-port), e.g. a fault proxy's in
    # front of it; 0: its own. Passed again at restart, which forgets CONFIG SET.
    announce_port: int = 0

    @property
    def pid(self) -> int | None:
        """PID of the current process, or ``None`` if never started."""
        return self.child.pid if self.child is not None else None

    @property
    def address(self) -> str:
        """``host:port``, as used by ``redis-cli``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``redis://host:port/0`` URL of this node."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout and stderr."""
        return self.dir / _LOG_NAME

    @property
    def running(self) -> bool:
        """True while the process exists (including while paused)."""
        return self.child is not None and self.child.running

    @property
    def paused(self) -> bool:
        return self.child is not None and self.child.paused

    @property
    def alive(self) -> bool:
        """True if the process runs and is not paused, i.e. it can answer."""
        return self.child is not None and self.child.alive

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain (non-cluster) client for this node; the caller closes it.

        Defaults suit probing: decoded responses, 2 s timeouts, no retries.
        """
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(kwargs)
        return redis.Redis(host=self.host, port=self.port, **options)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the node's log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(eq=False)
class LocalCluster:
    """A Redis Cluster of local ``redis-server`` processes.

    Use as a context manager or call :meth:`start` and :meth:`stop`.
    :meth:`stop` is idempotent and also runs at interpreter exit.
    """

    primaries: int = 3
    replicas_per_primary: int = 1
    node_timeout_ms: int = 2000
    startup_timeout: float = 60.0
    host: str = "127.0.0.1"
    redis_server: str = "redis-server"
    redis_cli: str = "redis-cli"
    extra_args: Sequence[str] = ()
    nodes: list[LocalNode] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.primaries < 3:
            raise ValueError("Redis Cluster needs at least 3 primaries")
        if self.replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must be >= 0")

    # ------------------------------------------------------------------ life

    def start(self) -> LocalCluster:
        """Start the processes, create the cluster and wait until healthy."""
        if self.nodes:
            raise RuntimeError("cluster already started")
        server = _which(self.redis_server)
        cli = _which(self.redis_cli)
        atexit.register(self.stop)
        try:
            count = self.primaries * (1 + self.replicas_per_primary)
            for index in range(count):
                node = LocalNode(
                    index=index,
                    host=self.host,
                    port=0,
                    dir=Path(tempfile.mkdtemp(prefix=f"devcluster-{index}-")),
                )
                self.nodes.append(node)
                self._launch_on_free_port(node, server)
            self._create(cli)
            _wait_for(self._startup_problem, self.startup_timeout)
            for node in self.nodes:
                with node.client() as client:
                    node.node_id = client.execute_command("CLUSTER", "MYID")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate all processes (SIGTERM, then SIGKILL) and remove dirs."""
        for node in self.nodes:  # all at once: each gets its SIGTERM before any waits
            if node.child is not None and node.child.running:
                node.child.resume()  # a stopped process ignores TERM
                node.child.signal(signal.SIGTERM)
        for node in self.nodes:
            if node.child is not None:
                node.child.stop(timeout=5.0)
        for node in self.nodes:
            shutil.rmtree(node.dir, ignore_errors=True)
        self.nodes = []
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """``redis://host:port/0`` of the first node (a primary at creation)."""
        return self._started_nodes()[0].url

    @property
    def startup_nodes(self) -> list[redis.cluster.ClusterNode]:
        """All nodes, ready for ``RedisCluster(startup_nodes=...)``."""
        return [
            redis.cluster.ClusterNode(n.host, n.port)  # type: ignore[no-untyped-call]
            for n in self._started_nodes()
        ]

    def cluster_client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A ``RedisCluster`` client for this cluster; the caller closes it."""
        options: dict[str, Any] = {"decode_responses": True}
        options.update(kwargs)
        return redis.cluster.RedisCluster(startup_nodes=self.startup_nodes, **options)

    # ------------------------------------------------------------- topology

    def topology(self) -> dict[str, dict[str, Any]]:
        """``CLUSTER NODES`` as seen by the first answering node.

        Maps node id to ``{"address": "host:port", "port": int, "flags": set,
        "primary_id": str | None, "slots": list[tuple[int, int]]}``; ``flags``
        include ``master`` or ``slave`` and failure markers such as ``fail``.
        """
        for node in self._started_nodes():
            if not node.alive:
                continue
            try:
                with node.client() as client:
                    return _parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
            except redis.RedisError:
                continue
        raise ClusterNotReady("no node answers CLUSTER NODES")

    def primary_nodes(self) -> list[LocalNode]:
        """Nodes that currently own slots, in the order of :attr:`nodes`."""
        topology = self.topology()
        return [n for n in self.nodes if topology.get(n.node_id, {}).get("slots")]

    def replica_nodes(self) -> list[LocalNode]:
        """Nodes currently flagged as replicas."""
        topology = self.topology()
        return [n for n in self.nodes if "slave" in topology.get(n.node_id, {}).get("flags", ())]

    def replicas_of(self, primary: LocalNode) -> list[LocalNode]:
        """Nodes currently replicating from ``primary``."""
        topology = self.topology()
        return [
            n
            for n in self.nodes
            if topology.get(n.node_id, {}).get("primary_id") == primary.node_id
            and "slave" in topology[n.node_id]["flags"]
        ]

    def primary_for_slot(self, slot: int) -> LocalNode:
        """The node currently serving ``slot``."""
        if not 0 <= slot < HASH_SLOTS:
            raise ValueError(f"slot out of range: {slot}")
        for node_id, info in self.topology().items():
            if any(lo <= slot <= hi for lo, hi in info["slots"]):
                return self.node_by_id(node_id)
        raise ClusterNotReady(f"slot {slot} is not assigned")

    def primary_for_key(self, key: str | bytes) -> LocalNode:
        """The node currently serving ``key`` (hash tags respected)."""
        return self.primary_for_slot(key_slot(_to_bytes(key)))

    def node_by_id(self, node_id: str) -> LocalNode:
        """The node with the given cluster node id."""
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    # ---------------------------------------------------------------- faults

    def kill(self, node: LocalNode) -> None:
        """SIGKILL ``node`` and reap it. Its directory is kept for restart."""
        if node.child is not None:
            node.child.kill()

    def pause(self, node: LocalNode) -> None:
        """Freeze ``node`` with SIGSTOP (it stops answering, sockets stay)."""
        if node.child is not None:
            node.child.pause()

    def resume(self, node: LocalNode) -> None:
        """Undo :meth:`pause` with SIGCONT."""
        if node.child is not None:
            node.child.resume()

    def restart(self, node: LocalNode) -> None:
        """Kill ``node`` if running and start it again on the same port.

        It rejoins with its old node id (from ``nodes.conf``); a former
        primary comes back as a replica if it was failed over. Returns once
        the process answers PING; call :meth:`wait_until_healthy` to wait for
        the cluster to settle.
        """
        self.kill(node)
        self._launch(node, _which(self.redis_server))
        self._wait_for_ping(node, self.startup_timeout)

    # ---------------------------------------------------------------- health

    def wait_until_healthy(self, timeout: float | None = None) -> None:
        """Wait until the cluster is healthy, see :meth:`health_problem`.

        Raises :class:`ClusterNotReady` with the last problem on timeout.
        """
        _wait_for(
            self.health_problem,
            self.startup_timeout if timeout is None else timeout,
        )

    def health_problem(self) -> str | None:
        """Why the cluster is not healthy, or ``None`` if it is.

        Healthy means: every alive node (running and not paused) reports
        ``cluster_state:ok``, all 16384 slots assigned and all nodes known;
        all alive nodes agree on slot ownership and replica assignment; every
        slot is owned by an alive node; every alive replica reports
        ``master_link_status:up``.
        """
        alive = [n for n in self.nodes if n.alive]
        if not alive:
            return "no alive nodes"
        alive_ports = {n.port for n in alive} | {n.announce_port for n in alive if n.announce_port}
        views: dict[int, tuple[Any, Any]] = {}
        for node in alive:
            try:
                with node.client() as client:
                    info = _parse_info_text(client.execute_command("CLUSTER", "INFO"))
                    topology = _parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
                    replication = client.info("replication")
            except redis.RedisError as exc:
                return f"{node.address}: {exc!r}"
            if info.get("cluster_state") != "ok":
                return f"{node.address}: cluster_state:{info.get('cluster_state')}"
            if info.get("cluster_slots_assigned") != str(HASH_SLOTS):
                return f"{node.address}: slots assigned {info.get('cluster_slots_assigned')}"
            if info.get("cluster_known_nodes") != str(len(self.nodes)):
                return f"{node.address}: knows {info.get('cluster_known_nodes')} nodes"
            if replication.get("role") == "slave" and (
                replication.get("master_link_status") != "up"
            ):
                return f"{node.address}: master_link_status:{replication.get('master_link_status')}"
            owners = sorted(
                (lo, hi, node_id)
                for node_id, entry in topology.items()
                for lo, hi in entry["slots"]
            )
            replica_of = sorted(
                (node_id, entry["primary_id"])
                for node_id, entry in topology.items()
                if "slave" in entry["flags"] and entry["port"] in alive_ports
            )
            views[node.port] = (owners, replica_of)
            own_id = next(i for i, e in topology.items() if "myself" in e["flags"])
            is_replica = "slave" in topology[own_id]["flags"]
            if is_replica != (replication.get("role") == "slave"):
                return f"{node.address}: role change in progress"
        first, *others = views.values()
        if any(view != first for view in others):
            return "nodes disagree on the cluster configuration"
        for entry in topology.values():  # all views agree; use the last one
            if entry["slots"] and entry["port"] not in alive_ports:
                return f"slots owned by unavailable node {entry['address']}"
        return None

    def wait_for_replication(self, timeout: float = 10.0) -> None:
        """Wait until every alive replica has caught up with its primary.

        Useful before killing a primary, so no acknowledged write is lost.
        """
        _wait_for(self._replication_problem, timeout)

    # ------------------------------------------------------------- internals

    def _started_nodes(self) -> list[LocalNode]:
        if not self.nodes:
            raise RuntimeError("cluster is not running; call start() first")
        return self.nodes

    def _startup_problem(self) -> str | None:
        """:meth:`health_problem`, plus the topology that was asked for."""
        problem = self.health_problem()
        if problem is not None:
            return problem
        topology = self.topology()
        primaries = sum(1 for entry in topology.values() if entry["slots"])
        replicas = sum(1 for entry in topology.values() if "slave" in entry["flags"])
        if (primaries, replicas) != (
            self.primaries,
            self.primaries * self.replicas_per_primary,
        ):
            return f"{primaries} primaries and {replicas} replicas so far"
        return None

    def _replication_problem(self) -> str | None:
        offsets: dict[int, int] = {}
        replicas: list[tuple[LocalNode, int, int]] = []
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                with node.client() as client:
                    info = client.info("replication")
            except redis.RedisError as exc:
                return f"{node.address}: {exc!r}"
            offsets[node.port] = int(info.get("master_repl_offset", 0))
            if node.announce_port:  # replicas of an announced node connect there
                offsets[node.announce_port] = offsets[node.port]
            if info.get("role") == "slave":
                replicas.append(
                    (node, int(info["master_port"]), int(info.get("slave_repl_offset", -1)))
                )
        lagging = [
            node.address
            for node, primary_port, offset in replicas
            if primary_port in offsets and offset < offsets[primary_port]
        ]
        return f"replicas lagging: {', '.join(lagging)}" if lagging else None

    def _launch_on_free_port(self, node: LocalNode, server: str) -> None:
        """Pick a free port pair and start ``node``; retry on collisions."""
        taken = {n.port for n in self.nodes if n is not node}
        last_error = ""
        for _ in range(20):
            node.port = _free_port_pair(self.host, taken)
            self._launch(node, server)
            try:
                self._wait_for_ping(node, self.startup_timeout)
                return
            except ClusterNotReady as exc:
                last_error = str(exc)
                self.kill(node)
                if "in use" not in node.log_tail():
                    raise
        raise ClusterNotReady(f"no free port found: {last_error}")

    def _launch(self, node: LocalNode, server: str) -> None:
        args = [
            server,
            "--port", str(node.port),
            "--bind", node.host,
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(node.dir),
            "--logfile", "",  # log to stdout, which goes to redis.log
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # Any replica may fail over, however long it was disconnected.
            "--cluster-replica-validity-factor", "0",
            "--appendonly", "no",
            "--save", "",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
            "--enable-debug-command", "local",
            *self.extra_args,
        ]  # fmt: skip
        if node.announce_port:
            args += [
                "--cluster-announce-port", str(node.announce_port),
                "--cluster-announce-bus-port", str(node.port + _BUS_PORT_OFFSET),
            ]  # fmt: skip
        node.child = ChildProcess(f"redis-server {node.address}", args, node.log_path,
                                  cwd=node.dir).start()

    def _wait_for_ping(self, node: LocalNode, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not node.running:
                raise ClusterNotReady(f"redis-server on {node.address} exited:\n{node.log_tail()}")
            try:
                with node.client(socket_timeout=0.5, socket_connect_timeout=0.5) as c:
                    # Make sure it is our process, not a stranger on the port.
                    if c.info("server").get("process_id") == node.pid:
                        return
            except redis.RedisError:
                pass
            if time.monotonic() >= deadline:
                raise ClusterNotReady(f"redis-server on {node.address} not answering")
            time.sleep(0.05)

    def _create(self, cli: str) -> None:
        args = [
            cli,
            "--cluster", "create",
            *(n.address for n in self.nodes),
            "--cluster-replicas", str(self.replicas_per_primary),
            "--cluster-yes",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.startup_timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterNotReady(f"redis-cli --cluster create timed out: {exc}") from exc
        if result.returncode != 0:
            raise ClusterNotReady(
                "redis-cli --cluster create failed:\n" + result.stdout + result.stderr
            )


# ---------------------------------------------------------------- helpers


def _which(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise FileNotFoundError(f"{program!r} not found; install redis-server")
    return path


def _wait_for(problem: Callable[[], str | None], timeout: float) -> None:
    """Poll ``problem`` until it returns ``None``; raise ClusterNotReady."""
    deadline = time.monotonic() + timeout
    while True:
        found = problem()
        if found is None:
            return
        if time.monotonic() >= deadline:
            raise ClusterNotReady(f"not ready after {timeout:g}s: {found}")
        time.sleep(_POLL_INTERVAL)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port_pair(host: str, taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free as well."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        bus = port + _BUS_PORT_OFFSET
        if (
            bus <= _MAX_PORT
            and port not in taken
            and not ({bus, port - _BUS_PORT_OFFSET} & taken)
            and _port_free(host, bus)
        ):
            return port
    raise ClusterNotReady("could not find a free port pair")


def _to_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _parse_info_text(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _parse_cluster_nodes(text: str) -> dict[str, dict[str, Any]]:
    """Parse ``CLUSTER NODES`` output (slot ranges only; migrations ignored)."""
    nodes: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, address, flags, primary_id = parts[:4]
        host_port = address.split("@", 1)[0]
        slots = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # slot being imported/migrated
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        nodes[node_id] = {
            "address": host_port,
            "port": int(host_port.rsplit(":", 1)[1] or 0),
            "flags": set(flags.split(",")),
            "primary_id": None if primary_id == "-" else primary_id,
            "slots": slots,
        }
    return nodes


def _describe(cluster: LocalCluster) -> Iterator[str]:
    topology = cluster.topology()
    for node in cluster.nodes:
        entry = topology.get(node.node_id, {})
        if entry.get("slots"):
            ranges = ",".join(f"{lo}-{hi}" for lo, hi in entry["slots"])
            role = f"primary slots={ranges}"
        else:
            primary = entry.get("primary_id")
            role = f"replica of {cluster.node_by_id(primary).address}" if primary else "?"
        yield f"{node.address} pid={node.pid} id={node.node_id[:8]} {role} dir={node.dir}"


def main(argv: Sequence[str] | None = None) -> int:
    """Start a cluster, print its URL and nodes, run until Ctrl-C/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m devtools.redis_cluster", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--primaries", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1, help="replicas per primary")
    parser.add_argument("--node-timeout", type=int, default=2000, help="in ms")
    args = parser.parse_args(argv)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Set both explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    cluster = LocalCluster(
        primaries=args.primaries,
        replicas_per_primary=args.replicas,
        node_timeout_ms=args.node_timeout,
    )
    try:
        started = time.monotonic()
        cluster.start()
        print(cluster.url)
        for line in _describe(cluster):
            print(line)
        sys.stdout.flush()
        print(
            f"ready in {time.monotonic() - started:.1f}s; Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        reported: set[int] = set()
        while any(node.running for node in cluster.nodes):
            for node in cluster.nodes:
                if not node.running and node.index not in reported:
                    reported.add(node.index)
                    print(
                        f"{node.address} exited, see {node.log_path}",
                        file=sys.stderr,
                        flush=True,
                    )
            time.sleep(1.0)
        print("all nodes exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
