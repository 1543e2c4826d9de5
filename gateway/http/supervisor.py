"""``serve --workers N``: N forked worker processes, kept alive by a small supervisor.

The supervisor (the parent process) serves nothing and holds no connection: it forks the
workers (each one binds the port with SO_REUSEPORT and serves on its own event loop),
starts a new worker in the slot of one that died, and counts those restarts in memory
shared with every worker, so that ``/metrics`` of any worker reports the same count.

It exits

* 0 after SIGTERM or SIGINT, once every worker has drained (each worker answers the
  requests in flight, then stops) and exited cleanly;
* 1 when it cannot keep N workers alive: more than ``CrashLoop.deaths`` worker exits
  within ``CrashLoop.window`` seconds (a worker that cannot bind the port, or whose
  app cannot be built, dies at once, again and again), or when the workers did not stop
  cleanly after SIGTERM.

Why not gunicorn's aiohttp worker: it is as fast with ``--reuse-port`` (and slower
without), but it gives up only on a worker that fails while booting (with
``--reuse-port``, a port held by another program makes it restart workers forever) and
has no restart count its workers can report; making it do both means hooking into its
internals. The gateway still runs under gunicorn: ``gateway.http.server:gunicorn_app``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import RawValue
from types import FrameType

log = logging.getLogger("gateway.supervisor")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True, slots=True)
class CrashLoop:
    """When the supervisor gives up: more than ``deaths`` worker exits within the last
    ``window`` seconds. Workers that crash at start die within milliseconds of each
    other, so the limit is reached in about a second; a worker killed now and then
    (an OOM kill, an operator's SIGKILL) is restarted for as long as the gateway runs."""

    deaths: int = 6
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker knows about its place under the supervisor."""

    slot: int          # 0 .. N-1: which of the N workers this process is
    generation: int    # 0 for the first process in this slot, then 1, 2 ... after restarts
    restarts: Callable[[], int]  # restarts of all slots so far, read from shared memory


@dataclass(frozen=True, slots=True)
class WorkerExit:
    slot: int
    pid: int
    exitcode: int  # as multiprocessing reports it: -N when killed by signal N

    def describe(self) -> str:
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            return f"worker {self.slot} (pid {self.pid}) killed by {name}"
        return f"worker {self.slot} (pid {self.pid}) exited with status {self.exitcode}"


class GiveUp(Exception):
    """The workers keep dying: the supervisor cannot keep N of them alive."""


WorkerMain = Callable[[WorkerInfo], None]


@dataclass(eq=False)
class Supervisor:
    """Runs ``main(info)`` in ``workers`` forked processes until SIGTERM/SIGINT."""

    main: WorkerMain
    workers: int
    crash_loop: CrashLoop = field(default_factory=CrashLoop)
    stop_timeout: float = 45.0  # a worker's drain: HTTP (10 s) + the relay's (5 + 10 s)
    _procs: dict[int, BaseProcess] = field(default_factory=dict, init=False)  # slot -> process
    _generations: dict[int, int] = field(default_factory=dict, init=False)
    _deaths: deque[float] = field(default_factory=deque, init=False)
    _stop_signal: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        self._ctx = multiprocessing.get_context("fork")
        # One integer in anonymous shared memory: the supervisor writes it, every worker
        # (forked after it exists) reads it when scraped. No lock: one writer, and a
        # reader may see the count before or after a restart, never a torn value.
        self._restarts = RawValue(ctypes.c_long, 0)

    def restarts(self) -> int:
        """Workers started in place of dead ones so far (what every worker reports)."""
        return int(self._restarts.value)

    def run(self) -> int:
        """Start the workers, keep them alive, stop them on a signal; the exit status."""
        with self._signals() as wake:
            for slot in range(self.workers):
                self._spawn(slot)
            try:
                self._supervise(wake)
            except GiveUp as exc:
                log.error("giving up: cannot keep the workers alive", extra={"reason": str(exc)})
                self._stop_all(signal.SIGTERM)
                return 1
            return 0 if self._stop_all(signal.SIGTERM) else 1

    # -- the loop ---------------------------------------------------------------------------

    def _supervise(self, wake: int) -> None:
        """Until a stop signal: wait for a worker to die, then start another in its slot."""
        while not self._stopping():
            sentinels = {proc.sentinel: slot for slot, proc in self._procs.items()}
            ready = wait([wake, *sentinels])
            if wake in ready:
                _drain(wake)
            for slot in [sentinels[fd] for fd in ready if fd in sentinels]:
                if self._stopping():
                    break  # the exit is reaped by _stop_all
                self._replace(slot)
        stop_signal = signal.Signals(self._stop_signal or signal.SIGTERM)
        log.info("stopping the workers", extra={"signal": stop_signal.name})

    def _stopping(self) -> bool:
        return self._stop_signal is not None

    def _replace(self, slot: int) -> None:
        proc = self._procs.pop(slot)
        proc.join()
        died = WorkerExit(slot, proc.pid or 0, proc.exitcode or 0)  # joined: exitcode is set
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] < now - self.crash_loop.window:
            self._deaths.popleft()
        if len(self._deaths) > self.crash_loop.deaths:
            raise GiveUp(f"{len(self._deaths)} worker exits within {self.crash_loop.window:g} s; "
                         f"the last: {died.describe()}")
        self._restarts.value += 1
        log.warning("worker died, starting another",
                    extra={"worker": slot, "pid": died.pid, "exit": died.describe(),
                           "restarts": self.restarts()})
        self._spawn(slot)

    def _spawn(self, slot: int) -> None:
        generation = self._generations.get(slot, -1) + 1
        self._generations[slot] = generation
        info = WorkerInfo(slot, generation, self.restarts)
        proc = self._ctx.Process(target=_worker_entry, args=(self.main, info, os.getpid()),
                                 name=f"worker-{slot}", daemon=False)
        # Signals stay blocked across the fork: the child must not run the supervisor's
        # handlers before it has set its own (it resets them, then unblocks).
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._procs[slot] = proc
        log.info("worker started", extra={"worker": slot, "pid": proc.pid, "generation": generation})

    # -- stopping ---------------------------------------------------------------------------

    def _stop_all(self, signum: int) -> bool:
        """Ask every worker to stop (they drain), wait; True when all stopped cleanly."""
        for proc in self._procs.values():
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)
        deadline = time.monotonic() + self.stop_timeout
        clean = True
        for slot, proc in self._procs.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker did not stop in time, killing it",
                          extra={"worker": slot, "pid": proc.pid, "timeout": self.stop_timeout})
                proc.kill()
                proc.join()
                clean = False
            elif proc.exitcode not in (0, -signum):
                # -signum: a worker still starting (no handler yet) when it was asked to stop.
                log.error("worker stopped uncleanly", extra={
                    "exit": WorkerExit(slot, proc.pid or 0, proc.exitcode or 0).describe()})
                clean = False
        self._procs.clear()
        log.info("workers stopped", extra={"clean": clean, "restarts": self.restarts()})
        return clean

    @contextlib.contextmanager
    def _signals(self) -> Iterator[int]:
        """SIGTERM/SIGINT stop the supervisor; the signal wakes its wait through a pipe."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)

        def stop(signum: int, _frame: FrameType | None) -> None:
            # No logging here: the handler may run while the main code holds a log lock.
            self._stop_signal = signum
            with contextlib.suppress(BlockingIOError):
                os.write(wake_w, b"\0")

        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
        try:
            yield wake_r
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 4096)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _stop_with_supervisor(supervisor: int) -> None:
    """SIGTERM this worker when the supervisor dies (Linux), so that a supervisor killed
    with SIGKILL does not leave workers serving the port with nobody to restart them
    (a new gateway would even share the port with them, SO_REUSEPORT). They drain as on
    any SIGTERM. Elsewhere this does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != supervisor:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_entry(main: WorkerMain, info: WorkerInfo, supervisor: int) -> None:
    """In the forked worker: default signal handling (the supervisor's handlers and its
    blocked mask were inherited), then the worker's own code."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    _stop_with_supervisor(supervisor)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        main(info)
    except Exception:
        # One JSON log line, not multiprocessing's bare traceback on stderr.
        log.critical("worker failed", exc_info=True, extra={"worker": info.slot, "pid": os.getpid()})
        sys.exit(1)
