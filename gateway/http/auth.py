"""Who is calling: the user id (from a trusted proxy's header or a JWT) and the admin."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import jwt
from aiohttp import web

from gateway.http.errors import ApiError, unauthenticated
from gateway.store.keys import MAX_USER_ID

USER_HEADER = "X-User-Id"


def parse_user_id(text: str | None) -> int | None:
    """A decimal integer 0 <= id < 2**63, written plainly (no sign, spaces or '_')."""
    if not text or len(text) > 19 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value < MAX_USER_ID else None


def _raw(text: str) -> bytes:
    """Header text back to the bytes sent: aiohttp decodes headers as UTF-8 with
    surrogate escapes, so a non-UTF-8 byte arrives as a lone surrogate, which a plain
    ``encode()`` refuses (that was a 500 for ``Authorization: Bearer \xe9``)."""
    return text.encode("utf-8", "surrogateescape")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@dataclass(frozen=True, slots=True)
class Authenticator:
    mode: str
    jwt_secret: str | None = None
    admin_token: str | None = None

    def user_id(self, request: web.Request) -> int:
        if self.mode == "jwt":
            return self._from_jwt(request)
        user_id = parse_user_id(request.headers.get(USER_HEADER))
        if user_id is None:
            raise unauthenticated(f"{USER_HEADER} must be a decimal user id below 2^63")
        return user_id

    def _from_jwt(self, request: web.Request) -> int:
        token = _bearer(request)
        if token is None:
            raise unauthenticated("a bearer token is required")
        try:
            # Header text is decoded with surrogate escapes: hand PyJWT the bytes as sent
            # (a str it cannot encode would raise UnicodeEncodeError, not a PyJWTError).
            claims = jwt.decode(_raw(token), self.jwt_secret, algorithms=["HS256"],
                                options={"require": ["exp", "sub"]})
        except jwt.PyJWTError:
            raise unauthenticated("the bearer token is invalid or expired") from None
        user_id = parse_user_id(str(claims.get("sub")))
        if user_id is None:
            raise unauthenticated("the token's sub is not a user id")
        return user_id

    def require_admin(self, request: web.Request) -> None:
        if not self.admin_token:
            raise ApiError(403, "FORBIDDEN", "admin API disabled: no SECKILL_ADMIN_TOKEN set")
        token = _bearer(request) or ""
        if not hmac.compare_digest(_raw(token), self.admin_token.encode()):
            raise ApiError(401, "UNAUTHENTICATED", "admin bearer token required")
