"""Signed payment notifications: ``X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The signature is the HMAC-SHA256, with the payment secret, of ``"<t>.<raw body>"``, the
body exactly as sent (bytes, not a re-serialisation of its JSON). A notice is accepted
when its ``t`` is within ``TOLERANCE`` seconds of the receiver's clock (either way) and
one of its ``v1`` entries matches.

Key rotation works as Stripe's does: while a provider rotates its secret it signs each
notice with the old and the new one and sends both, ``t=…,v1=<new>,v1=<old>``; the
receiver, holding either secret, finds its match. Entries with another scheme
(``v0=…``) are ignored, so a provider may add schemes; a header without exactly one
``t`` or without a ``v1``, or with an item that is not ``key=value``, is malformed.

The service, its tests and ``seckill-gateway orders sign-notify`` use this module.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

HEADER = "X-Signature"
TOLERANCE = 300  # seconds
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def signature(secret: str, body: bytes, t: int) -> str:
    """The hex HMAC-SHA256 of ``"<t>.<body>"``."""
    return hmac.new(secret.encode(), b"%d." % t + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, t: int) -> str:
    """The header value for ``body`` sent at ``t`` (unix seconds)."""
    return f"t={t},v1={signature(secret, body, t)}"


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    t: int
    v1: tuple[str, ...]


def parse(header: str) -> SignatureHeader | None:
    """The header's timestamp and ``v1`` signatures; None when malformed."""
    t: int | None = None
    v1: list[str] = []
    for item in header.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            return None
        if key == "t":
            if t is not None or _TIMESTAMP.fullmatch(value) is None:
                return None
            t = int(value)
        elif key == "v1":
            v1.append(value)
    if t is None or not v1:
        return None
    return SignatureHeader(t, tuple(v1))


def verify(secret: str, header: str | None, body: bytes, now: float,
           tolerance: int = TOLERANCE) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a time within ``tolerance``
    seconds of ``now``. Every ``v1`` is compared in constant time."""
    parsed = parse(header) if header else None
    if parsed is None or abs(now - parsed.t) > tolerance:
        return False
    expected = signature(secret, body, parsed.t).encode()
    matches = [hmac.compare_digest(expected, candidate.lower().encode())
               for candidate in parsed.v1 if _HEX_SHA256.fullmatch(candidate)]
    return any(matches)
