"""One-time purchase tokens: a uuid4 bound to the user by an HMAC.

A token is ``<uuid4 hex>.<expiry, hex seconds>.<mac>``; the mac covers the uuid, the
expiry and the user id. Checking one needs no Redis call. Its single use is the
purchase script's record of the key, written in the same atomic call that takes the
units, in the slot of the purchase (a token record kept elsewhere could not be
consumed atomically with the purchase on Cluster).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field


def uuid4_hex() -> str:
    """``uuid.uuid4().hex`` without building a UUID object (1.4 of a token's 3.8 µs)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


@dataclass(frozen=True, slots=True)
class TokenIssuer:
    secret: bytes
    ttl: int
    # The HMAC keyed once; each mac copies it (a fresh hmac.new per token cost 1.2 µs).
    _keyed: hmac.HMAC = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_keyed", hmac.new(self.secret, digestmod=hashlib.sha256))

    def _mac(self, nonce: str, expires: str, user_id: int) -> str:
        keyed = self._keyed.copy()
        keyed.update(f"{nonce}.{expires}.{user_id}".encode())
        return base64.urlsafe_b64encode(keyed.digest()[:18]).decode()

    def issue(self, user_id: int, now: float | None = None) -> str:
        nonce = uuid4_hex()
        expires = format(int((now or time.time()) + self.ttl), "x")
        return f"{nonce}.{expires}.{self._mac(nonce, expires, user_id)}"

    def verify(self, token: str, user_id: int, now: float | None = None) -> bool:
        """True when the gateway issued ``token`` to ``user_id`` and it has not expired."""
        parts = token.split(".")
        if len(parts) != 3 or len(parts[0]) != 32 or len(parts[1]) > 12:
            return False
        nonce, expires, mac = parts
        try:
            expiry = int(expires, 16)
        except ValueError:
            return False
        if expiry < (now or time.time()):
            return False
        return hmac.compare_digest(mac, self._mac(nonce, expires, user_id))
