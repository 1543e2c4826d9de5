"""The record file of a load run: what the clients saw, one JSON object a line.

The Locust scenarios write it (``locustfile.py``); the verifier and the timeline read
it. Writer and readers share this module so that they cannot drift apart. Every line
carries an ``event`` (lines without one are ``admitted``: files written before events
existed) and ``ts``, the client's clock in unix seconds when it got the answer:

``admitted``  a ``200 OK`` (``status`` 200), or the 200 original carried in a
              ``409 IDEMPOTENT_CONFLICT`` (``status`` 409): ``sku``, ``order_no``,
              ``units``, ``user_id``, ``key``, ``replayed``, ``scenario``.
``payment``   a signed notice sent to the orders service: ``sku``, ``order_no``,
              ``notify_id``, ``amount``, ``late`` (sent after the payment deadline on
              purpose), the answer's ``status`` and ``code``, ``state`` (the order's
              state in the answer, if any), ``scenario``.
``cancel``    ``POST /orders/{no}/cancel`` at the orders service: ``sku``, ``order_no``,
              ``status``, ``code``, ``scenario``.
``sale``      the run created a sale, found it, or could not create it: ``sku``,
              ``scenario``, ``outcome`` (``created``, ``exists``, ``unsupported``,
              ``failed``), ``stock``, ``per_user_limit``, ``shards``, ``starts_at_ms``,
              ``payment_ttl``, ``admit_rate`` (its waiting room's, or null), ``message``.
``queue``     one answer of the waiting room (``POST /api/queue/{sku}``: ``step`` ``join``;
              ``GET /api/queue/{sku}/{ticket}``: ``step`` ``poll``): ``sku``, ``user_id``,
              ``status``, ``code``, ``ticket``, ``position``, ``eta_s``, ``units_left``,
              ``retry_after``, ``pass`` (an ``ADMITTED`` answer's), ``t0`` (the client's
              clock when it sent the request; ``ts`` is when the answer came),
              ``server_s`` (the answer's ``Date`` header, whole unix seconds, or null),
              ``scenario``.
``queue_buy`` a purchase on a waiting-room sale: ``sku``, ``user_id``, ``ticket``,
              ``pass_kind`` (``own``: the pass this user was admitted with; ``none``: no
              ``X-Queue-Pass``; ``forged``: a made-up one; ``other``: another user's),
              ``status``, ``code``, ``order_no``, ``t0``, ``scenario``.
``queue_stats`` the waiting room's counts as ``GET /admin/sales/{sku}`` gave them
              (``waiting_room``): ``sku``, ``admitted``, ``joined``, ``units_left``,
              ``sold_out`` (each null when not given), ``t0``, ``server_s``.

Nothing here does I/O but :func:`read_record` (and the writer's caller): the parsing is
pure so that it is tested without Locust.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import orjson

ADMITTED = "admitted"
PAYMENT = "payment"
CANCEL = "cancel"
SALE = "sale"
QUEUE = "queue"
QUEUE_BUY = "queue_buy"
QUEUE_STATS = "queue_stats"

# Queue answers' steps, and the passes a purchase on a waiting-room sale may carry.
JOIN, POLL = "join", "poll"
PASS_OWN, PASS_NONE, PASS_FORGED, PASS_OTHER = "own", "none", "forged", "other"
PASS_KINDS = (PASS_OWN, PASS_NONE, PASS_FORGED, PASS_OTHER)

#: Sale outcomes after which the sale exists and its invariants can be checked.
SALE_USABLE = ("created", "exists")


@dataclass(frozen=True, slots=True)
class Admission:
    """A ``200 OK`` seen by a client (or the 200 original of a 409). ``sku`` is None for
    lines of old files that did not name it: they belong to the sale being verified."""

    line: int
    sku: str | None
    order_no: str
    units: tuple[int, ...]
    user_id: int
    key: str | None = None
    status: int = 200
    scenario: str = ""
    ts: float | None = None
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class PaymentCall:
    """A payment notice a scenario sent, and what the orders service answered."""

    line: int
    sku: str | None
    order_no: str
    notify_id: str
    amount: int
    late: bool
    status: int
    code: str
    state: str = ""
    scenario: str = ""
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class CancelCall:
    line: int
    sku: str | None
    order_no: str
    status: int
    code: str
    scenario: str = ""
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class SaleNote:
    """A sale a scenario set up (or could not), with the settings it asked for."""

    line: int
    sku: str
    scenario: str
    outcome: str
    stock: int | None = None
    per_user_limit: int | None = None
    shards: int | None = None
    starts_at_ms: int | None = None
    payment_ttl: int | None = None
    message: str = ""
    ts: float | None = None
    admit_rate: float | None = None

    @property
    def usable(self) -> bool:
        return self.outcome in SALE_USABLE


@dataclass(frozen=True, slots=True)
class QueueAnswer:
    """One answer of the waiting room to one user: a join or a poll. ``t0`` and ``ts``
    are the client's clock when the request left and when the answer came (the
    gateway's moment lies between them); ``server_s`` the answer's ``Date`` (the
    gateway's clock, whole seconds: its moment lies in ``[server_s, server_s + 1)``)."""

    line: int
    sku: str
    user_id: int
    step: str
    status: int
    code: str
    ts: float
    t0: float
    ticket: str | None = None
    position: int | None = None
    eta_s: float | None = None
    units_left: int | None = None
    retry_after: float | None = None
    pass_: str | None = None
    server_s: int | None = None
    scenario: str = ""

    @property
    def admitted(self) -> bool:
        return self.status == 200 and self.code == "ADMITTED"

    @property
    def queued(self) -> bool:
        return self.status == 202 and self.code == "QUEUED"

    @property
    def gone(self) -> bool:
        """The sale is over for this ticket (410 SOLD_OUT or SALE_ENDED)."""
        return self.status == 410


@dataclass(frozen=True, slots=True)
class QueueBuy:
    """A purchase sent on a waiting-room sale, with the pass it carried (``pass_kind``)."""

    line: int
    sku: str
    user_id: int
    pass_kind: str
    status: int
    code: str
    ts: float
    t0: float | None = None
    ticket: str | None = None
    order_no: str | None = None
    scenario: str = ""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A sale's waiting-room counts as the gateway reported them, between ``t0`` and
    ``ts`` (the client's clock)."""

    line: int
    sku: str
    ts: float
    t0: float
    admitted: int | None = None
    joined: int | None = None
    units_left: int | None = None
    sold_out: bool | None = None
    server_s: int | None = None


@dataclass(slots=True)
class Record:
    """Everything a record file holds, for every SKU."""

    admissions: list[Admission] = field(default_factory=list)
    payments: list[PaymentCall] = field(default_factory=list)
    cancels: list[CancelCall] = field(default_factory=list)
    sales: list[SaleNote] = field(default_factory=list)
    queue: list[QueueAnswer] = field(default_factory=list)
    queue_buys: list[QueueBuy] = field(default_factory=list)
    queue_stats: list[QueueStats] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed lines, as messages

    def admissions_for(self, sku: str) -> list[Admission]:
        return [a for a in self.admissions if a.sku in (None, sku)]

    def payments_for(self, sku: str) -> list[PaymentCall]:
        return [p for p in self.payments if p.sku in (None, sku)]

    def cancels_for(self, sku: str) -> list[CancelCall]:
        return [c for c in self.cancels if c.sku in (None, sku)]

    def queue_for(self, sku: str) -> list[QueueAnswer]:
        return [q for q in self.queue if q.sku == sku]

    def queue_buys_for(self, sku: str) -> list[QueueBuy]:
        return [b for b in self.queue_buys if b.sku == sku]

    def queue_stats_for(self, sku: str) -> list[QueueStats]:
        return [q for q in self.queue_stats if q.sku == sku]

    def sale(self, sku: str) -> SaleNote | None:
        """The last note about ``sku`` (a run notes each sale once)."""
        notes = [s for s in self.sales if s.sku == sku]
        return notes[-1] if notes else None


# -- writing -------------------------------------------------------------------------------

def line(entry: dict[str, Any]) -> bytes:
    """One record line (compact JSON and a newline): written with a single ``write()``
    on an ``O_APPEND`` descriptor, lines from several processes never interleave."""
    return orjson.dumps(entry) + b"\n"


def admitted_entry(*, sku: str, order_no: str, units: Iterable[int], user_id: int, key: str | None,
                   status: int, replayed: bool, scenario: str, ts: float) -> dict[str, Any]:
    return {"event": ADMITTED, "ts": round(ts, 3), "sku": sku, "order_no": order_no,
            "units": list(units), "user_id": user_id, "key": key, "status": status,
            "replayed": replayed, "scenario": scenario}


def payment_entry(*, sku: str, order_no: str, notify_id: str, amount: int, late: bool, status: int,
                  code: str, state: str, scenario: str, ts: float) -> dict[str, Any]:
    return {"event": PAYMENT, "ts": round(ts, 3), "sku": sku, "order_no": order_no,
            "notify_id": notify_id, "amount": amount, "late": late, "status": status, "code": code,
            "state": state, "scenario": scenario}


def cancel_entry(*, sku: str, order_no: str, status: int, code: str, scenario: str,
                 ts: float) -> dict[str, Any]:
    return {"event": CANCEL, "ts": round(ts, 3), "sku": sku, "order_no": order_no,
            "status": status, "code": code, "scenario": scenario}


def sale_entry(*, sku: str, scenario: str, outcome: str, ts: float, stock: int | None = None,
               per_user_limit: int | None = None, shards: int | None = None,
               starts_at_ms: int | None = None, payment_ttl: int | None = None,
               message: str = "", admit_rate: float | None = None) -> dict[str, Any]:
    entry = {"event": SALE, "ts": round(ts, 3), "sku": sku, "scenario": scenario, "outcome": outcome,
             "stock": stock, "per_user_limit": per_user_limit, "shards": shards,
             "starts_at_ms": starts_at_ms, "payment_ttl": payment_ttl, "message": message}
    if admit_rate is not None:
        entry["admit_rate"] = admit_rate
    return entry


def queue_entry(*, sku: str, user_id: int, step: str, status: int, code: str, t0: float, ts: float,
                ticket: str | None = None, position: int | None = None, eta_s: float | None = None,
                units_left: int | None = None, retry_after: float | None = None, pass_: str | None = None,
                server_s: int | None = None, scenario: str = "") -> dict[str, Any]:
    return {"event": QUEUE, "ts": round(ts, 4), "t0": round(t0, 4), "sku": sku, "user_id": user_id,
            "step": step, "status": status, "code": code, "ticket": ticket, "position": position,
            "eta_s": eta_s, "units_left": units_left, "retry_after": retry_after, "pass": pass_,
            "server_s": server_s, "scenario": scenario}


def queue_buy_entry(*, sku: str, user_id: int, pass_kind: str, status: int, code: str, ts: float,
                    t0: float | None = None, ticket: str | None = None, order_no: str | None = None,
                    scenario: str = "") -> dict[str, Any]:
    return {"event": QUEUE_BUY, "ts": round(ts, 4), "t0": None if t0 is None else round(t0, 4), "sku": sku,
            "user_id": user_id, "ticket": ticket, "pass_kind": pass_kind, "status": status, "code": code,
            "order_no": order_no, "scenario": scenario}


def queue_stats_entry(*, sku: str, t0: float, ts: float, admitted: int | None, joined: int | None = None,
                      units_left: int | None = None, sold_out: bool | None = None,
                      server_s: int | None = None) -> dict[str, Any]:
    return {"event": QUEUE_STATS, "ts": round(ts, 4), "t0": round(t0, 4), "sku": sku, "admitted": admitted,
            "joined": joined, "units_left": units_left, "sold_out": sold_out, "server_s": server_s}


# -- reading -------------------------------------------------------------------------------

def _opt_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    return None if value is None else str(value)


def _opt_int(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    return None if value is None else int(value)


def _opt_float(data: dict[str, Any], name: str) -> float | None:
    value = data.get(name)
    return None if value is None else float(value)


def _admission(number: int, data: dict[str, Any]) -> Admission:
    return Admission(
        line=number, sku=_opt_str(data, "sku"), order_no=str(data["order_no"]),
        units=tuple(int(u) for u in data["units"]), user_id=int(data["user_id"]),
        key=_opt_str(data, "key"), status=int(data.get("status", 200)),
        scenario=str(data.get("scenario", "")), ts=_opt_float(data, "ts"),
        replayed=bool(data.get("replayed", False)))


def _payment(number: int, data: dict[str, Any]) -> PaymentCall:
    return PaymentCall(
        line=number, sku=_opt_str(data, "sku"), order_no=str(data["order_no"]),
        notify_id=str(data["notify_id"]), amount=int(data["amount"]), late=bool(data.get("late", False)),
        status=int(data["status"]), code=str(data.get("code", "")), state=str(data.get("state") or ""),
        scenario=str(data.get("scenario", "")), ts=_opt_float(data, "ts"))


def _cancel(number: int, data: dict[str, Any]) -> CancelCall:
    return CancelCall(
        line=number, sku=_opt_str(data, "sku"), order_no=str(data["order_no"]),
        status=int(data["status"]), code=str(data.get("code", "")),
        scenario=str(data.get("scenario", "")), ts=_opt_float(data, "ts"))


def _sale(number: int, data: dict[str, Any]) -> SaleNote:
    return SaleNote(
        line=number, sku=str(data["sku"]), scenario=str(data.get("scenario", "")),
        outcome=str(data["outcome"]), stock=_opt_int(data, "stock"),
        per_user_limit=_opt_int(data, "per_user_limit"), shards=_opt_int(data, "shards"),
        starts_at_ms=_opt_int(data, "starts_at_ms"), payment_ttl=_opt_int(data, "payment_ttl"),
        message=str(data.get("message") or ""), ts=_opt_float(data, "ts"),
        admit_rate=_opt_float(data, "admit_rate"))


def _queue(number: int, data: dict[str, Any]) -> QueueAnswer:
    step = str(data["step"])
    if step not in (JOIN, POLL):
        raise ValueError(f"unknown queue step {step!r}")
    ts = float(data["ts"])
    return QueueAnswer(
        line=number, sku=str(data["sku"]), user_id=int(data["user_id"]), step=step,
        status=int(data["status"]), code=str(data.get("code") or ""), ts=ts,
        t0=float(data["t0"]) if data.get("t0") is not None else ts,
        ticket=_opt_str(data, "ticket"), position=_opt_int(data, "position"), eta_s=_opt_float(data, "eta_s"),
        units_left=_opt_int(data, "units_left"), retry_after=_opt_float(data, "retry_after"),
        pass_=_opt_str(data, "pass"), server_s=_opt_int(data, "server_s"),
        scenario=str(data.get("scenario", "")))


def _queue_buy(number: int, data: dict[str, Any]) -> QueueBuy:
    kind = str(data["pass_kind"])
    if kind not in PASS_KINDS:
        raise ValueError(f"unknown pass_kind {kind!r}")
    return QueueBuy(
        line=number, sku=str(data["sku"]), user_id=int(data["user_id"]), pass_kind=kind,
        status=int(data["status"]), code=str(data.get("code") or ""), ts=float(data["ts"]),
        t0=_opt_float(data, "t0"), ticket=_opt_str(data, "ticket"), order_no=_opt_str(data, "order_no"),
        scenario=str(data.get("scenario", "")))


def _queue_stats(number: int, data: dict[str, Any]) -> QueueStats:
    sold_out = data.get("sold_out")
    return QueueStats(
        line=number, sku=str(data["sku"]), ts=float(data["ts"]), t0=float(data.get("t0", data["ts"])),
        admitted=_opt_int(data, "admitted"), joined=_opt_int(data, "joined"),
        units_left=_opt_int(data, "units_left"), sold_out=None if sold_out is None else bool(sold_out),
        server_s=_opt_int(data, "server_s"))


def parse_line(number: int, raw: bytes, into: Record) -> None:
    """Add one line to ``into`` (a malformed line becomes an error message)."""
    if not raw.strip():
        return
    try:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        event = data.get("event", ADMITTED)
        if event == ADMITTED:
            into.admissions.append(_admission(number, data))
        elif event == PAYMENT:
            into.payments.append(_payment(number, data))
        elif event == CANCEL:
            into.cancels.append(_cancel(number, data))
        elif event == SALE:
            into.sales.append(_sale(number, data))
        elif event == QUEUE:
            into.queue.append(_queue(number, data))
        elif event == QUEUE_BUY:
            into.queue_buys.append(_queue_buy(number, data))
        elif event == QUEUE_STATS:
            into.queue_stats.append(_queue_stats(number, data))
        else:
            raise ValueError(f"unknown event {event!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        into.errors.append(f"line {number}: {type(exc).__name__}: {raw[:120]!r}")


def parse_lines(lines: Iterable[bytes]) -> Record:
    record = Record()
    for number, raw in enumerate(lines, 1):
        parse_line(number, raw, record)
    return record


def read_record(path: str | Path | None) -> Record:
    """The record file's events (an empty record when there is no file)."""
    if path is None or not Path(path).exists():
        return Record()
    with open(path, "rb") as fh:
        return parse_lines(fh)


def epoch_ms(value: Any) -> int | None:
    """A moment as epoch milliseconds, from what a gateway may send or store: RFC 3339
    text (``2026-12-01T12:00:00Z``), or a number of seconds or milliseconds. None when
    absent or unreadable: callers treat an unknown moment as unknown, not as 0."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value if value > 10**11 else value * 1000)
    text = str(value).strip()
    if not text:
        return None
    try:
        return int(float(text) if float(text) > 10**11 else float(text) * 1000)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def rfc3339(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with whole seconds (``…T12:00:00Z``)."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def http_date_s(value: str | None) -> int | None:
    """An HTTP ``Date`` header (``Mon, 30 Nov 2026 06:00:00 GMT``) as whole unix seconds;
    None when absent or unreadable."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp())
