"""The gateway's one middleware: every answer JSON with a code, Redis failing a 503
(never a 500), a deadline on every request, a cap on requests in flight, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.admission.purchase import Progress
from gateway.http.context import PURCHASE_PROGRESS
from gateway.http.errors import HTTP_CODES, ApiError, json_response, unavailable
from gateway.store.connection import is_redis_failure

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

current_task = asyncio.current_task


@dataclass(slots=True, eq=False)
class Deadlines:
    """Every request ends within ``timeout`` seconds, at one timer for all of them.

    ``asyncio.timeout`` costs a context manager, a timer armed and cancelled, and task
    bookkeeping per request: 4.5 µs on uvloop, about a tenth of a token's CPU. Here a
    request costs a dict insert and a pop. Every request has the same timeout, so the
    requests in flight, in the order they started, are in the order of their deadlines:
    one timer, set for the oldest, cancels every task whose deadline has come (up to
    ``early`` seconds before it, never after) and is set again for the next oldest.
    A cancelled request's task is told apart from one cancelled by anyone else the way
    ``asyncio.timeout`` does it (``leave`` says whether it was ours; ``uncancel``)."""

    timeout: float
    early: float = 0.0  # default: timeout / 20, at most 50 ms
    _running: dict[asyncio.Task[Any], float] = field(default_factory=dict)  # task -> deadline
    _expired: set[asyncio.Task[Any]] = field(default_factory=set)
    _loop: asyncio.AbstractEventLoop | None = None
    _timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        if self.early <= 0:
            self.early = min(0.05, self.timeout / 20)

    def enter(self, task: asyncio.Task[Any]) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._running[task] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline - self.early, self._expire)

    def leave(self, task: asyncio.Task[Any]) -> bool:
        """The request of ``task`` is over; True when its deadline cancelled it."""
        if self._running.pop(task, None) is not None:
            return False
        self._expired.discard(task)
        return True

    def _expire(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        running = self._running
        due = []
        for task, deadline in running.items():  # oldest first
            if deadline > now + self.early:
                break
            due.append(task)
        for task in due:
            del running[task]
            self._expired.add(task)
            task.cancel()
        self._timer = None
        if running:
            oldest = next(iter(running.values()))
            self._timer = loop.call_at(max(oldest - self.early, now + self.early), self._expire)


@dataclass(slots=True, eq=False)
class GuardState:
    """What the middleware keeps per app (the gateway too: one lookup on the app, not
    two, per request)."""

    gateway: Gateway
    deadlines: Deadlines


GUARD: web.AppKey[GuardState] = web.AppKey("guard")


def guard_state(gateway: Gateway) -> GuardState:
    return GuardState(gateway, Deadlines(gateway.settings.request_timeout))


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[GUARD]
    gw = state.gateway
    started = time.perf_counter()
    gw.in_flight += 1
    try:
        if gw.in_flight > gw.settings.max_in_flight:
            gw.metrics.shed.labels("in_flight").inc()
            response: web.StreamResponse = unavailable("the gateway is overloaded").response()
        else:
            # A bound on every request: a slow or unreachable Redis (or a cluster client
            # busy rediscovering its nodes) must not hold callers for long.
            deadlines = state.deadlines
            task = current_task()
            assert task is not None
            deadlines.enter(task)
            expired = False
            try:
                try:
                    response = await handler(request)
                finally:
                    # No await between the handler's end and this: the deadline cannot
                    # cancel the task outside the handler.
                    if deadlines.leave(task):
                        expired = task.uncancel() == 0  # else someone else cancelled it too
            except asyncio.CancelledError:
                if not expired:
                    raise
                response = _failure(gw, request, asyncio.TimeoutError(
                    f"the request took longer than {deadlines.timeout} s"))
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                code = HTTP_CODES.get(exc.status, "HTTP_ERROR")
                response = json_response(exc.status, {"code": code, "message": exc.reason})
            except Exception as exc:
                response = _failure(gw, request, exc)
    finally:
        gw.in_flight -= 1
    gw.metrics.answers.observe(_route_name(request),
                               getattr(response, "api_code", None) or str(response.status),
                               time.perf_counter() - started)
    return response


def _failure(gw: Gateway, request: web.Request, exc: Exception) -> web.Response:
    """A handler failed: Redis (a 503, logged once in a while) or a bug (a JSON 500 with
    the traceback in the log only)."""
    if not is_redis_failure(exc):
        log.exception("unhandled error", extra={"route": _route_name(request)}, exc_info=exc)
        return json_response(500, {"code": "INTERNAL", "message": "internal error"})
    kind = type(exc).__name__
    gw.metrics.redis_errors.labels(kind).inc()
    if gw.log_throttle.allow(kind):
        log.warning("redis failure", extra={"route": _route_name(request), "error": kind,
                                            "detail": str(exc)[:200]})
    return _unavailable_for(exc, request.get(PURCHASE_PROGRESS)).response()


def _unavailable_for(exc: BaseException, progress: Progress | None) -> ApiError:
    """A timeout while a purchase script call is unanswered is not "nothing admitted":
    the script may have run after we stopped waiting. Say so; the same key, sent again,
    returns what happened. Anywhere else, nothing was admitted, and the 503 says so."""
    if progress is not None and progress.unanswered \
            and isinstance(exc, (asyncio.TimeoutError, RedisTimeoutError)):
        error = unavailable("Redis did not answer in time; the purchase may have been made: "
                            "retry with the same key to learn its outcome")
        error.extra["outcome_unknown"] = True
        return error
    return unavailable()
