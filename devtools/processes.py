"""Child processes of the dev tools, the tests and the load tools: one way to start one.

A :class:`ChildProcess` appends its output to a log file, runs in a session of its own
(so a signal reaches its own children too: a gateway's workers), is ready when a probe
says so, and is always stopped: SIGTERM, SIGKILL after a timeout, also at interpreter
exit. Fault tests pause (SIGSTOP), resume, kill and restart it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

Probe = Callable[[], bool]


class NotReady(RuntimeError):
    """The process exited at start, or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_answers(url: str, *, ok_only: bool = False) -> Probe:
    """A probe: ``url`` answers HTTP (any status; with ``ok_only``, a 2xx)."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except urllib.error.HTTPError:
            return not ok_only
        except OSError:
            return False

    return probe


@dataclass(eq=False)
class ChildProcess:
    name: str
    argv: Sequence[str]
    log_path: Path | None  # None: the output goes where this process's goes
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    cpus: set[int] | None = None  # CPU affinity, for benchmarks
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    paused: bool = field(default=False, init=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """The process exists (also while paused)."""
        return self.process is not None and self.process.poll() is None

    @property
    def alive(self) -> bool:
        """The process runs and is not paused: it can answer."""
        return self.running and not self.paused

    def start(self, ready: Probe | None = None, timeout: float = 30.0) -> ChildProcess:
        """Start the process; with ``ready``, return once the probe holds."""
        if self.running:
            raise RuntimeError(f"{self.name} is running")
        cpus = self.cpus
        with contextlib.ExitStack() as stack:
            log: IO[bytes] | None = None
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                log = stack.enter_context(open(self.log_path, "ab"))
                log.write(f"--- {self.name} started {time.strftime('%H:%M:%S')}\n".encode())
                log.flush()
            self.process = subprocess.Popen(
                list(self.argv), env=dict(self.env) if self.env is not None else None,
                cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT if log is not None else None, start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.paused = False
        atexit.register(self.stop)
        if ready is not None:
            self.wait_until(ready, timeout)
        return self

    def wait_until(self, ready: Probe, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running:
                raise NotReady(f"{self.name} exited with {self.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise NotReady(f"{self.name} not ready within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process and its children (its session's group)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)  # type: ignore[union-attr]

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = self.running

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL (the children too), and reap."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()
        self.paused = False

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM to the process alone (as an operator's ``kill PID``: it stops its own
        children) and its exit status; still running after ``timeout`` raises
        ``subprocess.TimeoutExpired``, for tests of a clean stop."""
        assert self.process is not None, "not started"
        self.resume()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (a gateway drains), SIGKILL after ``timeout``; always reaped."""
        if self.process is None:
            return
        atexit.unregister(self.stop)
        if self.running:
            self.resume()
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def restart(self, ready: Probe | None = None, timeout: float = 30.0) -> ChildProcess:
        self.kill()
        return self.start(ready, timeout)

    def log_text(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> ChildProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaped (for a Popen made elsewhere)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
