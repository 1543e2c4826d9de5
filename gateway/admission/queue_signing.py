"""Waiting-room tickets and passes: signed, so that checking one needs no Redis call.

Both are HMAC-SHA256 with keys derived from the gateway's token secret (one derived key
per kind: a ticket is never a pass). A mac covers the SKU, the sale's generation (a sale
deleted and created again refuses the old one's tickets and passes) and the user id,
none of which is in the text: a ticket or pass of another user or SKU fails its mac.

    ticket  <shard>.<rank or "p">.<mac>    rank: the place in the shard's queue, when it
                                           was final at the join; "p": joined before the
                                           start (the rank is learned after it)
    pass    <expiry, hex epoch seconds>.<mac>
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field

_TICKET = re.compile(r"(\d{1,4})\.(\d{1,15}|p)\.([A-Za-z0-9_-]{22})")
_PASS = re.compile(r"([0-9a-f]{1,12})\.([A-Za-z0-9_-]{22})")


@dataclass(frozen=True, slots=True)
class Ticket:
    shard: int
    rank: int | None  # None: joined before the start


@dataclass(frozen=True, slots=True)
class QueueSigner:
    secret: bytes
    pass_ttl: int
    _ticket_key: hmac.HMAC = field(init=False, repr=False, compare=False)
    _pass_key: hmac.HMAC = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, purpose in (("_ticket_key", b"seckill queue ticket"),
                              ("_pass_key", b"seckill queue pass")):
            derived = hmac.new(self.secret, purpose, hashlib.sha256).digest()
            object.__setattr__(self, name, hmac.new(derived, digestmod=hashlib.sha256))

    @staticmethod
    def _mac(keyed: hmac.HMAC, text: str) -> str:
        mac = keyed.copy()
        mac.update(text.encode())
        return base64.urlsafe_b64encode(mac.digest()[:16]).decode().rstrip("=")

    # -- tickets ----------------------------------------------------------------------

    def ticket(self, sku: str, generation: str, user_id: int, shard: int, rank: int | None) -> str:
        shown = "p" if rank is None else str(rank)
        mac = self._mac(self._ticket_key, f"{sku}|{generation}|{user_id}|{shard}|{shown}")
        return f"{shard}.{shown}.{mac}"

    def read_ticket(self, text: str, sku: str, generation: str, user_id: int) -> Ticket | None:
        """The ticket, when this gateway issued it to ``user_id`` for this sale; else None."""
        match = _TICKET.fullmatch(text)
        if match is None:
            return None
        shard, shown, mac = match.groups()
        expected = self._mac(self._ticket_key, f"{sku}|{generation}|{user_id}|{int(shard)}|{shown}")
        if not hmac.compare_digest(mac, expected):
            return None
        return Ticket(int(shard), None if shown == "p" else int(shown))

    # -- passes -----------------------------------------------------------------------

    def issue_pass(self, sku: str, generation: str, user_id: int, now: float | None = None) -> str:
        expires = format(int((now if now is not None else time.time()) + self.pass_ttl), "x")
        return f"{expires}.{self._mac(self._pass_key, f'{sku}|{generation}|{user_id}|{expires}')}"

    def valid_pass(self, text: str | None, sku: str, generation: str, user_id: int,
                   now: float | None = None) -> bool:
        """Issued for this user and sale, and not expired."""
        if not text:
            return False
        match = _PASS.fullmatch(text)
        if match is None:
            return False
        expires, mac = match.groups()
        if int(expires, 16) < (now if now is not None else time.time()):
            return False
        return hmac.compare_digest(
            mac, self._mac(self._pass_key, f"{sku}|{generation}|{user_id}|{expires}"))
