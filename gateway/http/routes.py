"""Every route of the gateway, in one table."""

from __future__ import annotations

from aiohttp import web

from gateway.http import admin, ops, public, queue


def add_routes(app: web.Application) -> None:
    app.router.add_route("GET", "/api/token", public.token, name="token")
    app.router.add_route("POST", "/api/token", public.token)
    app.router.add_route("POST", r"/api/seckill/{sku:[^/]+}", public.seckill, name="seckill")
    app.router.add_route("GET", r"/api/orders/{order_no:[^/]+}", public.order, name="order")
    app.router.add_route("POST", r"/api/queue/{sku:[^/]+}", queue.join, name="queue_join")
    app.router.add_route("GET", r"/api/queue/{sku:[^/]+}/{ticket:[^/]+}", queue.poll,
                         name="queue_poll")
    app.router.add_route("PUT", r"/admin/sales/{sku:[^/]+}", admin.put_sale, name="admin_sale")
    app.router.add_route("GET", r"/admin/sales/{sku:[^/]+}", admin.get_sale)
    app.router.add_route("DELETE", r"/admin/sales/{sku:[^/]+}", admin.delete_sale)
    app.router.add_route("POST", r"/admin/orders/{order_no:[^/]+}/release", admin.release_order,
                         name="admin_release")
    app.router.add_route("POST", "/admin/delivery/resume", admin.resume_delivery,
                         name="admin_resume")
    app.router.add_route("GET", "/healthz", ops.healthz, name="healthz")
    app.router.add_route("GET", "/metrics", ops.metrics, name="metrics")
    app.router.add_route("GET", "/openapi.json", ops.openapi, name="openapi")
