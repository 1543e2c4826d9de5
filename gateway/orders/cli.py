"""``seckill-gateway orders serve | sign-notify``: the bundled orders service's commands.

    orders serve [--host H] [--port P] [--config FILE] [--dev]
    orders sign-notify --notify-id ID --order-no NO --amount N [--status SUCCESS]
                       [--secret S] [--url URL] [--format curl|header]

``sign-notify`` plays the payment provider: it prints a curl command (or the header and
the body) for a notification signed with ``SECKILL_PAYMENT_SECRET``, valid for five
minutes, e.g. ``seckill-gateway orders sign-notify --notify-id n-1 --order-no $ORDER
--amount 0 | sh``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import orjson

from gateway.config import ConfigError, load_settings
from gateway.orders.signing import HEADER, sign

DEFAULT_PORT = 8081


def add_orders_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``orders`` and its sub-commands to the top-level command line."""
    orders = subparsers.add_parser("orders", help="the bundled orders service")
    sub = orders.add_subparsers(dest="action", required=True)

    serve = sub.add_parser("serve", help="run the orders service (SECKILL_DATABASE_URL)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--config", help="TOML file with settings")
    serve.add_argument("--dev", action="store_true",
                       help="development run: without SECKILL_ORDERS_TOKEN or "
                            "SECKILL_PAYMENT_SECRET, make random ones and print them")
    serve.set_defaults(func=cmd_serve)

    notify = sub.add_parser("sign-notify", help="print a signed payment notification "
                                                "(a curl command, or the header and body)")
    notify.add_argument("--notify-id", required=True)
    notify.add_argument("--order-no", required=True)
    notify.add_argument("--amount", type=int, required=True, help="minor units")
    notify.add_argument("--status", default="SUCCESS")
    notify.add_argument("--secret", help="default: SECKILL_PAYMENT_SECRET (better: a command "
                                         "line is visible to other users of the machine)")
    notify.add_argument("--url", default=f"http://127.0.0.1:{DEFAULT_PORT}",
                        help="the orders service")
    notify.add_argument("--format", choices=("curl", "header"), default="curl")
    notify.add_argument("--config", help="TOML file with settings")
    notify.set_defaults(func=cmd_sign_notify)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.orders.app import serve_orders

    serve_orders(load_settings(args.config), args.host, args.port, dev=args.dev)
    return 0


def cmd_sign_notify(args: argparse.Namespace) -> int:
    secret = args.secret or load_settings(args.config).payment_secret
    if not secret:
        raise ConfigError("sign-notify needs --secret or SECKILL_PAYMENT_SECRET")
    body = orjson.dumps({"notify_id": args.notify_id, "order_no": args.order_no,
                         "amount": args.amount, "status": args.status})
    header = sign(secret, body, int(time.time()))
    if args.format == "header":
        sys.stdout.write(f"{HEADER}: {header}\n{body.decode()}\n")
        return 0
    command = ["curl", "-s", "-X", "POST", args.url.rstrip("/") + "/payments/notify",
               "-H", "Content-Type: application/json", "-H", f"{HEADER}: {header}",
               "--data-binary", body.decode()]
    sys.stdout.write(shlex.join(command) + "\n")
    return 0
