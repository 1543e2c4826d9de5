"""``seckill-gateway relay``: the relay as a process of its own."""

from __future__ import annotations

import asyncio
import signal

from gateway.config import Settings
from gateway.delivery.relay import Relay, RelayConfig


async def run_relay(settings: Settings, config: RelayConfig | None = None) -> None:
    """``seckill-gateway relay``: deliver until SIGTERM/SIGINT, then drain and stop."""
    relay = Relay.from_settings(settings, config=config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay.start()
    try:
        await stop.wait()
    finally:
        await relay.stop()
