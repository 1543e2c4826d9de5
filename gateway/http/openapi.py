"""The gateway's OpenAPI 3.0 document, served at ``/openapi.json`` (and used to fuzz it)."""

from __future__ import annotations

from typing import Any

from gateway import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}


def _answer(description: str, schema: dict[str, Any] | None = None,
            headers: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"description": description,
                            "content": {"application/json": {"schema": schema or _ERROR}}}
    if headers:
        body["headers"] = headers
    return body


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
_RATE_LIMITED = _answer("RATE_LIMITED", headers=_RETRY_AFTER)
# Any route, when more requests are in flight than SECKILL_MAX_IN_FLIGHT.
_OVERLOADED = _answer("UNAVAILABLE: the gateway is overloaded", headers=_RETRY_AFTER)
_TOO_LARGE = _answer("PAYLOAD_TOO_LARGE: the body is over SECKILL_MAX_BODY_BYTES")
_KEY = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,128}$"}

# The bounds the handlers enforce (gateway.handlers uses these): documented so that
# generated valid input is valid.
MAX_STOCK = 10_000_000
MAX_PRICE = 2**40
MAX_LIMIT = 1_000
MAX_SHARDS = 1024
MAX_PAYMENT_TTL = 30 * 86_400
MAX_ADMIT_RATE = 1_000_000
_SKU = {"name": "sku", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"}}
_USER = {"name": "X-User-Id", "in": "header", "required": True,
         "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
         "description": "the caller, set by a trusted auth proxy (SECKILL_AUTH=header)"}
_ADMIN: list[dict[str, list[str]]] = [{"admin": []}]
_TICKET = {"name": "ticket", "in": "path", "required": True, "schema": {"type": "string"},
           "description": "the ticket a join answered"}
_QUEUE_PASS = {"name": "X-Queue-Pass", "in": "header", "required": False,
               "schema": {"type": "string"},
               "description": "the pass the waiting room gave this user for this sale "
                              "(required on a sale with a waiting room)"}


def _queue_answers(common: dict[str, Any]) -> dict[str, Any]:
    return {
        "200": _answer("ADMITTED: a pass for this user and sale",
                       {"$ref": "#/components/schemas/QueuePass"}),
        "202": _answer("QUEUED: poll the ticket again after Retry-After seconds",
                       {"$ref": "#/components/schemas/Queued"}, headers=_RETRY_AFTER),
        "404": _answer("SALE_NOT_FOUND or TICKET_NOT_FOUND"),
        "410": _answer("SOLD_OUT or SALE_ENDED"),
        "429": _RATE_LIMITED,
        **common,
    }


def build() -> dict[str, Any]:
    common = {
        "400": _answer("malformed request"),
        "401": _answer("no valid identity"),
        "503": _answer("Redis unreachable or overloaded; nothing admitted", headers=_RETRY_AFTER),
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "seckill-gateway", "version": __version__,
                 "description": "An idempotent flash-sale gateway."},
        "paths": {
            "/api/token": {
                "get": {"operationId": "getToken", "parameters": [_USER],
                        "responses": {"200": _answer("a one-time token", {"$ref": "#/components/schemas/Token"}),
                                      "429": _RATE_LIMITED, **common}},
                "post": {"operationId": "postToken", "parameters": [_USER],
                         "responses": {"200": _answer("a one-time token", {"$ref": "#/components/schemas/Token"}),
                                       "429": _RATE_LIMITED, **common}},
            },
            "/api/seckill/{sku}": {
                "post": {
                    "operationId": "buy",
                    "parameters": [
                        _SKU, _USER,
                        {"name": "X-Idempotency-Key", "in": "header", "required": False,
                         "schema": _KEY,
                         "description": "a token from /api/token (SECKILL_KEY_MODE=token) or a "
                                        "client-made key of 8-128 chars [A-Za-z0-9_-] (client); "
                                        "one of the two key headers is required"},
                        {"name": "Idempotency-Key", "in": "header", "required": False,
                         "schema": _KEY, "description": "read when X-Idempotency-Key is absent"},
                        _QUEUE_PASS,
                    ],
                    "requestBody": {"required": False, "content": {"application/json": {"schema": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"quantity": {"type": "integer", "minimum": 1,
                                                    "maximum": MAX_LIMIT}}}}}},
                    "responses": {
                        "200": _answer("admitted", {"$ref": "#/components/schemas/Admitted"}),
                        "403": _answer("SALE_NOT_STARTED, TOKEN_INVALID or QUEUE_PASS_REQUIRED"),
                        "404": _answer("SALE_NOT_FOUND"),
                        "409": _answer("IDEMPOTENT_CONFLICT or ALREADY_PURCHASED"),
                        "410": _answer("SOLD_OUT or SALE_ENDED"),
                        "413": _TOO_LARGE,
                        "422": _answer("IDEMPOTENCY_KEY_REUSED"),
                        "429": _RATE_LIMITED,
                        **common,
                    },
                },
            },
            "/api/queue/{sku}": {
                "post": {"operationId": "joinQueue", "parameters": [_SKU, _USER],
                         "responses": _queue_answers(common)},
            },
            "/api/queue/{sku}/{ticket}": {
                "get": {"operationId": "pollQueue", "parameters": [_SKU, _TICKET, _USER],
                        "responses": _queue_answers(common)},
            },
            "/api/orders/{order_no}": {
                "get": {"operationId": "getOrder",
                        "parameters": [{"name": "order_no", "in": "path", "required": True,
                                        "schema": {"type": "string"}}, _USER],
                        "responses": {"200": _answer("the order", {"$ref": "#/components/schemas/Order"}),
                                      "404": _answer("ORDER_NOT_FOUND"), **common}},
            },
            "/admin/sales/{sku}": {
                "put": {"operationId": "createSale", "security": _ADMIN, "parameters": [_SKU],
                        "requestBody": {"required": True, "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/NewSale"}}}},
                        "responses": {"201": _answer("created", {"type": "object"}),
                                      "403": _answer("admin API disabled"),
                                      "409": _answer("SALE_EXISTS"), "413": _TOO_LARGE,
                                      **common}},
                "get": {"operationId": "getSale", "security": _ADMIN, "parameters": [_SKU],
                        "responses": {"200": _answer("the sale", {"type": "object"}),
                                      "403": _answer("admin API disabled"),
                                      "404": _answer("SALE_NOT_FOUND"), **common}},
                "delete": {"operationId": "deleteSale", "security": _ADMIN, "parameters": [_SKU],
                           "responses": {"204": {"description": "deleted"},
                                         "403": _answer("admin API disabled"),
                                         "404": _answer("SALE_NOT_FOUND"), **common}},
            },
            "/healthz": {"get": {"operationId": "health", "responses": {
                "200": _answer("Redis answers", {"type": "object"}),
                "503": _answer("Redis unreachable", headers=_RETRY_AFTER)}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "503": _OVERLOADED}}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": {
                "200": _answer("this document", {"type": "object"}), "503": _OVERLOADED}}},
        },
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["code"],
                          "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
                "Token": {"type": "object", "required": ["code", "token", "expires_in"],
                          "properties": {"code": {"type": "string"}, "token": {"type": "string"},
                                         "expires_in": {"type": "integer"}}},
                "Admitted": {"type": "object", "required": ["code", "order_no", "sku", "user_id", "units"],
                             "properties": {"code": {"type": "string"}, "order_no": {"type": "string"},
                                            "sku": {"type": "string"}, "user_id": {"type": "integer"},
                                            "units": {"type": "array", "items": {"type": "integer"}}}},
                "QueuePass": {"type": "object", "required": ["code", "pass", "expires_in"],
                              "properties": {"code": {"type": "string", "enum": ["ADMITTED"]},
                                             "pass": {"type": "string"},
                                             "expires_in": {"type": "integer"},
                                             "units_left": {"type": "integer", "minimum": 0}}},
                "Queued": {"type": "object",
                           "required": ["code", "ticket", "position", "eta_s", "units_left"],
                           "properties": {"code": {"type": "string", "enum": ["QUEUED"]},
                                          "ticket": {"type": "string"},
                                          "position": {"type": "integer", "minimum": 1,
                                                       "nullable": True,
                                                       "description": "null before the start "
                                                                      "(the order is drawn then)"},
                                          "eta_s": {"type": "integer", "minimum": 0},
                                          "units_left": {"type": "integer", "minimum": 0}}},
                "Order": {"type": "object", "required": ["order_no", "sku", "user_id", "units", "status"],
                          "properties": {"order_no": {"type": "string"}, "sku": {"type": "string"},
                                         "user_id": {"type": "integer"},
                                         "units": {"type": "array", "items": {"type": "integer"}},
                                         "status": {"type": "string",
                                                    "enum": ["admitted", "delivered", "rejected"]}}},
                "NewSale": {"type": "object", "required": ["stock"], "additionalProperties": False,
                            "properties": {"stock": {"type": "integer", "minimum": 1, "maximum": MAX_STOCK},
                                           "price": {"type": "integer", "minimum": 0, "maximum": MAX_PRICE,
                                                     "description": "minor units"},
                                           "per_user_limit": {"type": "integer", "minimum": 1,
                                                              "maximum": MAX_LIMIT},
                                           "shards": {"type": "integer", "minimum": 1,
                                                      "maximum": MAX_SHARDS},
                                           "waiting_room": {
                                               "type": "object", "required": ["admit_rate"],
                                               "additionalProperties": False,
                                               "properties": {"admit_rate": {
                                                   "type": "number", "exclusiveMinimum": True,
                                                   "minimum": 0, "maximum": MAX_ADMIT_RATE}}}}},
            },
        },
    }
