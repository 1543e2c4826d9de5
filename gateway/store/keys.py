"""Key layout and sharding: which Redis keys one purchase touches, and where they sit.

Every key of one shard starts with the shard's hash tag, ``{<prefix>:<shard>}``. The
tag is built from the configured prefix and the shard number only; user-supplied text
(SKUs, idempotency keys, user ids) comes after it. Redis hashes the first ``{...}`` of
a key, so a ``{`` or ``}`` in user text can neither move a key to another slot nor
split one purchase over two slots.

A user belongs to shard ``user_id % shards``; the shard count is fixed per sale when
the sale is created. An idempotency key's record lives in the slot of
``user_id % KEY_SHARDS`` (16, fixed for every deployment: changing it would forget every
key in use), whatever the sale's shard count, so a key used for one sale is seen when it
is sent for another. When a purchase's shard is that slot (every sale of 16 shards) the
purchase script reads and writes the record in the same atomic call; otherwise the key
is bound to its request there first (``claim_key.lua``) and the purchase keeps its
outcome in its own slot.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

SKU_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
CLIENT_KEY_RE = re.compile(r"[A-Za-z0-9_-]{8,128}")
ORDER_NO_RE = re.compile(r"(\d{1,4})-[0-9a-f]{32}")
MAX_USER_ID = 2**63
KEY_SHARDS = 16


def valid_sku(sku: str) -> bool:
    return SKU_RE.fullmatch(sku) is not None


def shard_of(user_id: int, shards: int) -> int:
    return user_id % shards


def key_shard(user_id: int) -> int:
    """The shard (slot) of a user's idempotency records, for every sale."""
    return user_id % KEY_SHARDS


def new_order_no(shard: int) -> str:
    """An order number that names its shard (so a lookup finds its slot) and is
    random, so a Redis failover that loses a counter can never issue one twice."""
    return f"{shard}-{secrets.token_hex(16)}"


def shard_of_order(order_no: str) -> int | None:
    match = ORDER_NO_RE.fullmatch(order_no)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class ShardKeys:
    """The keys of one sale in one shard."""

    tag: str
    sku: str
    shard: int

    @property
    def stock(self) -> str:
        return f"{self.tag}:stock:{self.sku}"

    @property
    def units(self) -> str:
        return f"{self.tag}:units:{self.sku}"

    @property
    def buyers(self) -> str:
        return f"{self.tag}:buyers:{self.sku}"

    @property
    def closed(self) -> str:
        """The generation of this shard closed last (expires): none comes back."""
        return f"{self.tag}:closed:{self.sku}"

    @property
    def touched(self) -> str:
        """Users with an outcome other than SOLD_OUT recorded in this shard."""
        return f"{self.tag}:touched:{self.sku}"

    @property
    def order_index(self) -> str:
        return f"{self.tag}:orders:{self.sku}"

    @property
    def transfers_out(self) -> str:
        return f"{self.tag}:transfers-out:{self.sku}"

    @property
    def transfers_done(self) -> str:
        return f"{self.tag}:transfers-done:{self.sku}"

    @property
    def transfers_in(self) -> str:
        return f"{self.tag}:transfers-in:{self.sku}"

    @property
    def stream(self) -> str:
        return f"{self.tag}:purchases"

    @property
    def queue(self) -> str:
        """Waiting room: sorted set of the shard's tickets, user id -> join score."""
        return f"{self.tag}:queue:{self.sku}"

    @property
    def queue_meta(self) -> str:
        """Waiting room: hash ``sealed``, ``last`` (latest join score), ``generation``."""
        return f"{self.tag}:queue-meta:{self.sku}"

    def order(self, order_no: str) -> str:
        return f"{self.tag}:order:{order_no}"

    def idempotency(self, user_id: int, key: str) -> str:
        return f"{self.tag}:idem:{user_id}:{key}"

    def closing_keys(self) -> tuple[str, ...]:
        """What ``close_shard.lua`` takes: every per-sale key of this shard (orders and
        idempotency records aside), the order index last."""
        return (self.stock, self.units, self.buyers, self.transfers_out, self.transfers_done,
                self.transfers_in, self.touched, self.order_index, self.closed)


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str

    def tag(self, shard: int) -> str:
        return f"{{{self.prefix}:{shard}}}"

    def shard(self, sku: str, shard: int) -> ShardKeys:
        return ShardKeys(self.tag(shard), sku, shard)

    def stream(self, shard: int) -> str:
        return f"{self.tag(shard)}:purchases"

    def order(self, order_no: str, shard: int) -> str:
        return f"{self.tag(shard)}:order:{order_no}"

    def key_record(self, user_id: int, key: str) -> str:
        """Where an idempotency key is bound to its request, for every sale."""
        return self.shard("", key_shard(user_id)).idempotency(user_id, key)

    def sale(self, sku: str) -> str:
        """The sale's registry record (one key, never used with others in a script)."""
        return f"{self.prefix}:sale:{sku}"

    def queue_state(self, sku: str) -> str:
        """Waiting room: the sale's admission state (hash: per-shard cursors, the rate's
        bucket, the counts the admitter publishes). One small key, read by each process at
        most every few tenths of a second, never per poll."""
        return f"{self.prefix}:queue-state:{sku}"

    def queue_lease(self, sku: str) -> str:
        """Waiting room: who admits for the sale now (string, expires)."""
        return f"{self.prefix}:queue-lease:{sku}"

    @property
    def relay_shards(self) -> str:
        """Sorted set: the largest shard count of any sale ever created (or being
        created), so that the relay reads every stream that can hold a purchase."""
        return f"{self.prefix}:relay:shards"

    @property
    def sales(self) -> str:
        """Hash: sku -> shard count, of every sale (the relay finds its streams here)."""
        return f"{self.prefix}:sales"

    @property
    def token_secret(self) -> str:
        return f"{self.prefix}:token-secret"
