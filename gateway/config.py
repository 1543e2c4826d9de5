"""Configuration: `SECKILL_*` environment variables, optionally a TOML file.

A TOML file given with ``--config`` may set the same names in lower case without the
prefix (``redis_url = "..."``); the environment wins over the file, the file over the
defaults.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "SECKILL_"

_CHOICES: dict[str, tuple[str, ...]] = {
    "redis_mode": ("standalone", "cluster"),
    "key_mode": ("token", "client"),
    "duplicate_response": ("conflict", "replay"),
    "auth": ("header", "jwt"),
    "replica_ack_policy": ("adaptive", "strict"),
}


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range."""


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_mode: str = "standalone"
    shards: int = 16
    idempotency_ttl: int = 300
    key_mode: str = "token"
    duplicate_response: str = "conflict"
    auth: str = "header"
    jwt_secret: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    upstream_url: str | None = None
    database_url: str = "sqlite:///./orders.db"
    # Who may call whom (see the README's "Security"): the bundled orders service's
    # callers, the relay's credential at the endpoint, payment notices, releases.
    gateway_url: str | None = None
    upstream_token: str | None = field(default=None, repr=False)
    orders_token: str | None = field(default=None, repr=False)
    payment_secret: str | None = field(default=None, repr=False)
    # Beyond the contract: what an operator of a shared Redis needs.
    key_prefix: str = "seckill"
    token_secret: str | None = field(default=None, repr=False)
    redis_timeout: float = 1.0
    request_timeout: float = 2.0
    max_in_flight: int = 4096
    relay: bool = True
    rate_limit_user: float = 0.0
    rate_limit_ip: float = 0.0
    max_body_bytes: int = 4096
    # Replicas that must hold a purchase before its 200 is answered (WAIT after each
    # pipeline of purchases; see gateway.batcher). -1: 1 on a Redis Cluster whose
    # primaries have replicas, else 0; 0: off (Redis replication is asynchronous, so a
    # failover may then lose purchases already answered 200).
    replica_acks: int = -1
    replica_ack_timeout_ms: int = 200
    # adaptive: a primary with fewer replicas than replica_acks waits for those it has
    # (none: it answers without WAIT, counted and shown by /healthz); strict: refuse such
    # purchases before running them (503, nothing admitted).
    replica_ack_policy: str = "adaptive"
    # The relay claims purchase-stream entries another (dead) relay left pending this long.
    relay_claim_idle_ms: int = 60_000
    # Refusals in a row (same status, distinct orders) after which delivery pauses instead
    # of giving more units back: a wrong endpoint must not empty a sale.
    relay_pause_after: int = 5
    # Waiting room: seconds a pass (X-Queue-Pass) lets its user buy once admitted.
    queue_pass_ttl: int = 120

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be one of {', '.join(allowed)}")
        if not 1 <= self.shards <= 1024:
            raise ConfigError(f"{ENV_PREFIX}SHARDS must be between 1 and 1024")
        if not 5 <= self.idempotency_ttl <= 86400:
            raise ConfigError(f"{ENV_PREFIX}IDEMPOTENCY_TTL must be between 5 and 86400 seconds")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,32}", self.key_prefix):
            # A brace in the prefix would become the hash tag of every key.
            raise ConfigError(f"{ENV_PREFIX}KEY_PREFIX must be 1-32 chars of [A-Za-z0-9_.:-]")
        if self.auth == "jwt" and not self.jwt_secret:
            raise ConfigError(f"{ENV_PREFIX}AUTH=jwt needs {ENV_PREFIX}JWT_SECRET")
        if self.redis_timeout <= 0 or self.request_timeout <= 0:
            raise ConfigError(f"{ENV_PREFIX}REDIS_TIMEOUT and REQUEST_TIMEOUT must be positive")
        if not -1 <= self.replica_acks <= 16:
            raise ConfigError(f"{ENV_PREFIX}REPLICA_ACKS must be -1 (auto) or between 0 and 16")
        if not 1 <= self.replica_ack_timeout_ms <= 10_000:
            raise ConfigError(f"{ENV_PREFIX}REPLICA_ACK_TIMEOUT_MS must be between 1 and 10000")
        if not 1 <= self.relay_pause_after <= 10_000:
            raise ConfigError(f"{ENV_PREFIX}RELAY_PAUSE_AFTER must be between 1 and 10000")
        if not 1 <= self.queue_pass_ttl <= 86_400:
            raise ConfigError(f"{ENV_PREFIX}QUEUE_PASS_TTL must be between 1 and 86400 seconds")
        if not 100 <= self.relay_claim_idle_ms <= 86_400_000:
            raise ConfigError(f"{ENV_PREFIX}RELAY_CLAIM_IDLE_MS must be between 100 and 86400000")

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def _coerce(name: str, raw: Any, default: Any) -> Any:
    kind: type = type(default) if default is not None else str
    if isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
        return raw
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: cannot read {text!r} as {kind.__name__}") from None
    return text


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Defaults, then the TOML file, then the environment, then explicit overrides."""
    environ = os.environ if environ is None else environ
    defaults = Settings()
    known = {f.name: getattr(defaults, f.name) for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file is not None:
        with open(config_file, "rb") as fh:
            data = tomllib.load(fh)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{config_file}: unknown settings {', '.join(unknown)}")
        values.update(data)
    for name in known:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None and env_value != "":
            values[name] = env_value
    values.update({k: v for k, v in overrides.items() if v is not None})
    coerced = {name: _coerce(name, raw, known[name]) for name, raw in values.items()}
    return Settings(**coerced)
