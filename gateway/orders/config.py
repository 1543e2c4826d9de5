"""What the orders service needs to run: its secrets, where releases go, its timers.

The service never runs open by accident: without ``SECKILL_ORDERS_TOKEN`` and
``SECKILL_PAYMENT_SECRET`` it refuses to start, unless it is told plainly that this is
a development run (``orders serve --dev``), which makes random ones and prints them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from gateway.config import ENV_PREFIX, ConfigError, Settings
from gateway.orders.signing import TOLERANCE

#: The settings a development run makes up when they are missing.
DEV_SECRETS = ("orders_token", "payment_secret")


@dataclass(frozen=True, slots=True)
class ReleaseConfig:
    """How queued releases are sent to the gateway."""

    poll_every: float = 1.0      # seconds between looks at the queue when nothing woke us
    batch: int = 50              # releases claimed (and sent concurrently) at once
    lease: float = 30.0          # seconds a claimed release is ours; > timeout
    timeout: float = 10.0        # seconds for one POST to the gateway
    backoff_base: float = 0.5    # seconds before the second attempt ...
    backoff_cap: float = 60.0    # ... doubling up to this

    def __post_init__(self) -> None:
        if not (0 < self.poll_every and 0 < self.timeout < self.lease
                and 0 < self.backoff_base <= self.backoff_cap and self.batch >= 1):
            raise ConfigError(f"invalid release settings: {self}")


@dataclass(frozen=True, slots=True)
class OrdersConfig:
    orders_token: str = field(repr=False)
    payment_secret: str = field(repr=False)
    gateway_url: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    expire_every: float = 1.0    # seconds between looks for orders past their pay_by
    expire_batch: int = 500      # orders expired per transaction
    signature_tolerance: int = TOLERANCE  # seconds a notice's t may be off our clock
    releases: ReleaseConfig = ReleaseConfig()

    def __post_init__(self) -> None:
        missing = [name for name in DEV_SECRETS if not getattr(self, name)]
        if missing:
            names = " and ".join(ENV_PREFIX + name.upper() for name in missing)
            raise ConfigError(f"the orders service needs {names} (or, for a development run, "
                              "--dev: random secrets, printed at start)")
        if self.gateway_url and not self.admin_token:
            raise ConfigError(f"{ENV_PREFIX}GATEWAY_URL needs {ENV_PREFIX}ADMIN_TOKEN: releases "
                              "are sent to the gateway's admin API")
        if self.expire_every <= 0 or self.expire_batch < 1:
            raise ConfigError("expire_every must be positive and expire_batch at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> OrdersConfig:
        """The timers keep their defaults (tests change them with ``dataclasses.replace``)."""
        return cls(orders_token=settings.orders_token or "",
                   payment_secret=settings.payment_secret or "",
                   gateway_url=settings.gateway_url, admin_token=settings.admin_token)


def with_dev_secrets(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """``settings`` with a random value for each missing secret of ``DEV_SECRETS``, and
    those values by environment variable name (to print them)."""
    made = {name: secrets.token_urlsafe(32) for name in DEV_SECRETS if not getattr(settings, name)}
    return settings.replace(**made), {ENV_PREFIX + name.upper(): value
                                      for name, value in made.items()}
