"""Time as the gateway speaks it: epoch milliseconds inside, RFC 3339 (UTC) outside."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def now_ms() -> int:
    return int(time.time() * 1000)


def to_rfc3339(ms: int) -> str:
    """``2026-12-01T12:00:00Z`` (milliseconds shown only when there are some)."""
    when = datetime.fromtimestamp(ms / 1000, UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += f".{ms % 1000:03d}"
    return text + "Z"


def parse_rfc3339(text: str) -> int:
    """Epoch ms of an RFC 3339 date-time with a zone (``Z`` or ``+hh:mm``); ValueError
    for anything else (a date alone, no zone: a naive time means nothing here)."""
    if not isinstance(text, str) or _RFC3339.fullmatch(text) is None:
        raise ValueError(text)
    when = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(text)
    return int(when.timestamp() * 1000)
