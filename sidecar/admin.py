"""The admin HTTP server (aiohttp): /metrics, /healthz, /readyz, /config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from .runtime import Sidecar

__all__ = ["start_admin"]


async def start_admin(sidecar: Sidecar, host: str, port: int) -> web.AppRunner:
    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(sidecar.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        ready, why = sidecar.readiness()
        return web.Response(text=why + "\n", status=200 if ready else 503)

    async def config(_request: web.Request) -> web.Response:
        return web.json_response(sidecar.describe())

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner
