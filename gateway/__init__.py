"""An idempotent flash-sale (seckill) gateway in front of a shop's seckill endpoint."""

__version__ = "0.2.0"
