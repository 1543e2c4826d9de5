"""The bundled orders service as its callers see it: over HTTP, with the bearer token,
payment notices signed."""

from __future__ import annotations

import time
import uuid

import orjson
from aiohttp import ClientSession

from gateway.orders import signing
from tests.support.delivery import PAYMENT_SECRET, OrdersService


class Client:
    """Calls the orders service over HTTP, as the relay, the shop and a payment provider
    do: with the bearer token (unless ``auth=False``), notices signed."""

    def __init__(self, service: OrdersService, session: ClientSession) -> None:
        self.service = service
        self.session = session

    async def call(self, method: str, path: str, body: dict | list | None = None,
                   headers: dict | None = None, *, data: bytes | None = None,
                   auth: bool = True) -> tuple[int, dict]:
        headers = {**(self.service.auth if auth else {}), **(headers or {})}
        async with self.session.request(method, self.service.url(path), json=body, data=data,
                                        headers=headers) as resp:
            answer = await resp.json(content_type=None)
            assert isinstance(answer, dict) and answer.get("code"), answer
            return resp.status, answer

    async def post_order(self, order_no: str, units: list[int], *, sku: str = "sku-1",
                         amount: int = 500, pay_by: int | None = None,
                         headers: dict | None = None) -> tuple[int, dict]:
        body = {"order_no": order_no, "sku": sku, "user_id": 42, "units": units,
                "quantity": len(units), "amount": amount, "admitted_at": 1700000000000}
        if pay_by is not None:
            body["pay_by"] = pay_by
        return await self.call("POST", "/orders", body,
                               {"Idempotency-Key": order_no, **(headers or {})})

    async def notify(self, notify_id: str, order_no: str, amount: int = 500,
                     status: str = "SUCCESS") -> tuple[int, dict]:
        return await self.notify_raw(orjson.dumps({
            "notify_id": notify_id, "order_no": order_no, "amount": amount, "status": status}))

    async def notify_raw(self, body: bytes, signature: str | None = None) -> tuple[int, dict]:
        """POST ``body`` as a notice, signed now with the service's secret unless
        ``signature`` (the X-Signature header) is given."""
        if signature is None:
            signature = signing.sign(PAYMENT_SECRET, body, int(time.time()))
        return await self.call("POST", "/payments/notify", data=body, auth=False,
                               headers={"Content-Type": "application/json",
                                        signing.HEADER: signature})

    async def cancel(self, order_no: str) -> tuple[int, dict]:
        return await self.call("POST", f"/orders/{order_no}/cancel")

    async def refunds(self) -> list[dict]:
        status, body = await self.call("GET", "/refunds")
        assert status == 200, body
        return body["refunds"]

    async def releases_pending(self) -> int:
        status, body = await self.call("GET", "/healthz", auth=False)
        assert status == 200, body
        return body["releases_pending"]

    async def ship(self, order_no: str, version: int | str | None) -> tuple[int, dict]:
        headers = {} if version is None else {"If-Match": str(version)}
        return await self.call("POST", f"/orders/{order_no}/ship", headers=headers)

    async def get(self, order_no: str) -> tuple[int, dict]:
        return await self.call("GET", f"/orders/{order_no}")


def new_no() -> str:
    return f"0-{uuid.uuid4().hex}"
