"""A throw-away standalone ``redis-server`` for development and tests.

Tests must not touch a shared Redis (they flush scripts, stop the server, fill
databases), so they start their own on a free port::

    with LocalRedis() as server:
        client = redis.Redis.from_url(server.url)

:meth:`LocalRedis.kill` and :meth:`LocalRedis.restart` (same port, empty data) serve
fault tests; ``python -m devtools.redis_server`` runs one until Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from devtools.processes import ChildProcess, NotReady, free_port
from devtools.redis_cluster import ClusterNotReady, LocalNode


@dataclass(eq=False)
class LocalRedis:
    host: str = "127.0.0.1"
    port: int = 0
    startup_timeout: float = 20.0
    redis_server: str = "redis-server"
    extra_args: Sequence[str] = ()
    node: LocalNode | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        assert self.node is not None, "not started"
        return self.node.url

    def start(self) -> LocalRedis:
        server = shutil.which(self.redis_server)
        if server is None:
            raise FileNotFoundError(f"{self.redis_server!r} not found; install redis-server")
        atexit.register(self.stop)
        self.node = LocalNode(0, self.host, self.port or free_port(self.host),
                              Path(tempfile.mkdtemp(prefix="devredis-")))
        self._launch(server)
        return self

    def _launch(self, server: str) -> None:
        assert self.node is not None
        node = self.node
        args = [server, "--port", str(node.port), "--bind", self.host,
                "--protected-mode", "no", "--daemonize", "no", "--dir", str(node.dir),
                "--logfile", "", "--save", "", "--appendonly", "no", *self.extra_args]
        node.child = ChildProcess(f"redis-server {node.address}", args, node.log_path,
                                  cwd=node.dir)

        def answers() -> bool:  # our process, not a stranger on the port
            try:
                with node.client(socket_timeout=0.5, socket_connect_timeout=0.5) as c:
                    return bool(c.info("server").get("process_id") == node.pid)
            except redis.RedisError:
                return False

        try:
            node.child.start(answers, self.startup_timeout)
        except NotReady as exc:
            raise ClusterNotReady(str(exc)) from None

    def kill(self) -> None:
        """SIGKILL the server (its data is gone: nothing is persisted)."""
        if self.node is not None and self.node.child is not None:
            self.node.child.kill()

    def pause(self) -> None:
        if self.node is not None and self.node.child is not None:
            self.node.child.pause()

    def resume(self) -> None:
        if self.node is not None and self.node.child is not None:
            self.node.child.resume()

    def restart(self) -> None:
        """Start again on the same port (after :meth:`kill`, or killing it now)."""
        self.kill()
        server = shutil.which(self.redis_server)
        assert server is not None
        self._launch(server)

    def stop(self) -> None:
        if self.node is None:
            return
        if self.node.child is not None:
            self.node.child.stop(timeout=5.0)
        shutil.rmtree(self.node.dir, ignore_errors=True)
        self.node = None
        atexit.unregister(self.stop)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.redis_server",
                                     description="run a throw-away redis-server until Ctrl-C")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    server = LocalRedis(port=args.port)
    try:
        server.start()
        print(server.url, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
