"""Command line: ``seckill-gateway serve | sale ... | orders serve | relay | verify``."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

import orjson
import uvloop

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import setup_logging


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def _print(data: object) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.http.server import serve_gateway

    settings = _settings(args)
    if args.no_relay:
        settings = settings.replace(relay=False)
    return serve_gateway(settings, args.host, args.port, args.workers)


def cmd_relay(args: argparse.Namespace) -> int:
    from gateway.delivery.relay import RelayConfig
    from gateway.delivery.runner import MetricsAddress, run_relay

    settings = _settings(args)
    if not settings.upstream_url:
        print("the relay needs SECKILL_UPSTREAM_URL", file=sys.stderr)
        return 2
    config = RelayConfig.from_settings(settings, consumer=args.consumer,
                                       concurrency=args.concurrency)
    uvloop.run(run_relay(settings, config, MetricsAddress(args.metrics_host, args.metrics_port)))
    return 0


def cmd_sale(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.http.admin import parse_sale, sale_settings
    from gateway.http.errors import ApiError
    from gateway.store.keys import valid_sku

    settings = _settings(args)
    if not valid_sku(args.sku):
        print("invalid SKU: 1-64 chars of [A-Za-z0-9_.:-]", file=sys.stderr)
        return 2
    sale = None
    if args.action == "create":
        body = {name: value for name, value in (
            ("stock", args.stock), ("price", args.price), ("per_user_limit", args.per_user_limit),
            ("shards", args.shards), ("starts_at", args.starts_at), ("ends_at", args.ends_at),
            ("payment_ttl", args.payment_ttl)) if value is not None}
        if args.admit_rate is not None:
            body["waiting_room"] = {"admit_rate": args.admit_rate}
        try:
            sale = parse_sale(args.sku, body, settings.shards)
        except ApiError as exc:
            print(exc.message, file=sys.stderr)
            return 2

    async def run() -> int:
        gw = Gateway.build(settings)
        try:
            if sale is not None:
                if not await gw.create_sale(sale):
                    print(f"sale {args.sku} exists", file=sys.stderr)
                    return 1
                _print({"code": "CREATED", **sale_settings(sale)})
                return 0
            if args.action == "delete":
                if not await gw.delete_sale(args.sku):
                    print(f"no sale {args.sku}", file=sys.stderr)
                    return 1
                return 0
            status = await gw.sale_status(args.sku)
            if status is None:
                print(f"no sale {args.sku}", file=sys.stderr)
                return 1
            _print(status)
            return 0
        finally:
            await gw.close()

    return uvloop.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seckill-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    serve.add_argument("--config", help="TOML file with settings")
    serve.add_argument("--no-relay", action="store_true", help="do not run the delivery relay")
    serve.set_defaults(func=cmd_serve)

    sale = sub.add_parser("sale", help="create, show or delete a sale")
    sale_sub = sale.add_subparsers(dest="action", required=True)
    create = sale_sub.add_parser("create")
    create.add_argument("sku")
    create.add_argument("--stock", type=int, required=True)
    create.add_argument("--price", type=int, default=0, help="minor units")
    create.add_argument("--per-user-limit", type=int, default=1)
    create.add_argument("--shards", type=int, default=None, help="default: SECKILL_SHARDS")
    create.add_argument("--starts-at", help="RFC 3339, e.g. 2026-12-01T12:00:00Z (default: now)")
    create.add_argument("--ends-at", help="RFC 3339 (default: no end)")
    create.add_argument("--payment-ttl", type=int, default=None,
                        help="seconds an order may stay unpaid (default: no deadline)")
    create.add_argument("--admit-rate", type=float, default=None,
                        help="a waiting room letting this many buyers through per second")
    for name in ("show", "delete"):
        p = sale_sub.add_parser(name)
        p.add_argument("sku")
    for p in (create, *[sale_sub.choices[n] for n in ("show", "delete")]):
        p.add_argument("--config")
        p.set_defaults(func=cmd_sale)

    from gateway.orders.cli import add_orders_commands

    add_orders_commands(sub)

    relay = sub.add_parser("relay", help="deliver admitted purchases to SECKILL_UPSTREAM_URL")
    relay.add_argument("--consumer", default=socket.gethostname(),
                       help="consumer name; a restart under the same name re-reads its own "
                            "pending entries at once (default: the host name)")
    relay.add_argument("--concurrency", type=int, default=64, help="deliveries in flight")
    relay.add_argument("--metrics-host", default="127.0.0.1", help="where /metrics and /healthz listen")
    relay.add_argument("--metrics-port", type=int, default=9108,
                       help="port of /metrics and /healthz (default: 9108; 0: none)")
    relay.add_argument("--config", help="TOML file with settings")
    relay.set_defaults(func=cmd_relay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
