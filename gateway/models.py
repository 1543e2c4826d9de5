"""Values passed between the store, the handlers and the relay."""

from __future__ import annotations

from dataclasses import dataclass, field

from .codes import Purchase


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

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Units ``lo..hi`` the shard starts with (hi < lo: none). Stock S is units
        1..S, split as evenly as whole numbers allow."""
        lo = self.stock * shard // self.shards + 1
        hi = self.stock * (shard + 1) // self.shards
        return lo, hi


@dataclass(frozen=True, slots=True)
class PurchaseReply:
    """What ``purchase.lua`` answered, decoded."""

    code: Purchase
    order_no: str = ""
    units: tuple[int, ...] = ()
    amount: int = 0
    missing: int = 0
    # For DUPLICATE: the stored outcome of the first call with the key.
    status: int = 0
    outcome_code: str = ""
    order_status: str = ""
    same_attempt: bool = False  # DUPLICATE caused by a resend of this very call


@dataclass(frozen=True, slots=True)
class ShardState:
    shard: int
    remaining: int
    sold: int
    version: int
    transfers_out: dict[str, str] = field(default_factory=dict)


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
    def parse(cls, transfer_id: str, donor: int, record: str) -> "Transfer":
        receiver, ranges, count, started = record.split("|")
        return cls(transfer_id, donor, int(receiver), ranges, int(count), int(started))


@dataclass(frozen=True, slots=True)
class Order:
    order_no: str
    sku: str
    user_id: int
    units: tuple[int, ...]
    quantity: int
    amount: int
    status: str
    admitted_at: int
    idempotency_key: str = ""
    reason: str = ""

    def public(self) -> dict:
        return {
            "order_no": self.order_no,
            "sku": self.sku,
            "user_id": self.user_id,
            "units": list(self.units),
            "quantity": self.quantity,
            "amount": self.amount,
            "status": self.status,
            "admitted_at": self.admitted_at,
        }


def parse_units(csv: str) -> tuple[int, ...]:
    return tuple(int(u) for u in csv.split(",")) if csv else ()
