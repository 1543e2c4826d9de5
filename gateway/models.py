"""Values passed between the layers: a sale, a shard's state, a unit move, and an
admitted purchase (one type from the purchase script to the orders store)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Sale:
    sku: str
    stock: int
    price: int = 0
    per_user_limit: int = 1
    shards: int = 16
    created_at: int = 0
    # Set when the sale is created; a unit move of a deleted sale must not land in a
    # new sale of the same SKU (the shards' keys are the same).
    generation: str = ""
    starts_at: int = 0     # epoch ms; 0: open from its creation
    ends_at: int = 0       # epoch ms; 0: no end
    payment_ttl: int = 0   # seconds an admitted order may stay unpaid; 0: no deadline
    admit_rate: float = 0.0  # waiting room: buyers let through per second; 0: none

    @property
    def params(self) -> str:
        """What makes two creations of a SKU the same sale (its generation aside)."""
        return "|".join(str(v) for v in (self.stock, self.price, self.per_user_limit,
                                         self.shards, self.starts_at, self.ends_at,
                                         self.payment_ttl, self.admit_rate))

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Units ``lo..hi`` the shard starts with (hi < lo: none). Stock S is units
        1..S, split as evenly as whole numbers allow."""
        lo = self.stock * shard // self.shards + 1
        hi = self.stock * (shard + 1) // self.shards
        return lo, hi


@dataclass(frozen=True, slots=True)
class ShardState:
    shard: int
    remaining: int
    sold: int
    version: int
    transfers_out: dict[str, str] = field(default_factory=dict)
    returned: int = 0  # units given back to this shard (refused, expired, cancelled orders)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A transfer record left by ``transfer_out.lua`` in the donor shard."""

    transfer_id: str
    donor: int
    receiver: int
    ranges: str
    count: int
    started_ms: int

    @classmethod
    def parse(cls, transfer_id: str, donor: int, record: str) -> Transfer:
        receiver, ranges, count, started = record.split("|")
        return cls(transfer_id, donor, int(receiver), ranges, int(count), int(started))


@dataclass(frozen=True, slots=True)
class Purchase:
    """One admitted purchase, as the purchase script records it, the relay delivers it
    and the seckill endpoint stores it. ``payload()`` is the delivery body of the
    contract; the stream entry and the order record carry the same fields."""

    order_no: str
    sku: str
    user_id: int
    units: tuple[int, ...]
    quantity: int
    amount: int
    admitted_at: int
    pay_by: int | None = None  # epoch ms; None: no payment deadline

    def payload(self) -> dict[str, Any]:
        return {"order_no": self.order_no, "sku": self.sku, "user_id": self.user_id,
                "units": list(self.units), "quantity": self.quantity, "amount": self.amount,
                "admitted_at": self.admitted_at, "pay_by": self.pay_by}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Purchase | None:
        """From a stream entry or an order record (Redis strings); None if malformed."""
        try:
            pay_by = fields.get("pay_by") or ""
            return cls(fields["order_no"], fields["sku"], int(fields["user_id"]),
                       parse_units(fields["units"]), int(fields["quantity"]),
                       int(fields["amount"]), int(fields["admitted_at"]),
                       int(pay_by) if pay_by else None)
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class Order:
    """The gateway's record of an admitted purchase and what became of it:
    ``admitted`` -> ``delivered`` | ``rejected``."""

    purchase: Purchase
    status: str
    idempotency_key: str = ""  # the Redis key of the purchase's idempotency record
    reason: str = ""
    generation: str = ""       # of the sale it was bought in

    @property
    def order_no(self) -> str:
        return self.purchase.order_no

    @property
    def sku(self) -> str:
        return self.purchase.sku

    @property
    def user_id(self) -> int:
        return self.purchase.user_id

    @property
    def units(self) -> tuple[int, ...]:
        return self.purchase.units

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> Order:
        purchase = Purchase.from_fields(record)
        if purchase is None:
            raise ValueError(f"malformed order record: {dict(record)!r}")
        return cls(purchase, record["status"], record.get("idempotency_key", ""),
                   record.get("reason", ""), record.get("generation", ""))

    def public(self) -> dict[str, Any]:
        body = self.purchase.payload()
        body["status"] = self.status
        if self.status == "released":
            body["release_reason"] = self.reason
        return body


def parse_units(csv: str) -> tuple[int, ...]:
    return tuple(int(u) for u in csv.split(",")) if csv else ()
