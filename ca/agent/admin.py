"""The agent's admin HTTP endpoint (aiohttp): ``/healthz``, ``/readyz``, ``/livez``,
``/metrics``.

``/healthz`` is 200 while the agent can serve valid SVIDs, including when the CA is
unreachable but the cache still holds unexpired SVIDs for every entry (``"status":
"degraded"``): restarting an agent does not bring a CA back, so a liveness probe must not
kill it for that. It is 503 ``"starting"`` until the first sync with the CA has completed
(no entry is known yet, so there is nothing to serve: Workload API calls wait for the sync,
then get UNAVAILABLE), and 503 ``"unhealthy"`` when the agent's own SVID has expired or
entries lack SVIDs while the CA is unreachable. ``/readyz`` is 200 once the first sync with
the CA has completed, like ``"synced"`` in ``/healthz``. ``/livez`` is for a liveness
probe: 503 only when a restart is the cure (the agent's own SVID has expired, which only a
new attestation fixes), not for an unreachable CA or entries still without SVIDs, where a
restart would only throw the cache away.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ca.agent.rotator import Rotator

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(self, rotator: Rotator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.rotator = rotator
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        serving, details = self.rotator.health()
        return web.json_response(details, status=200 if serving else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self.rotator.synced.is_set()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _livez(self, request: web.Request) -> web.Response:
        live, why = self.rotator.live()
        return web.json_response({"live": live, "reason": why}, status=200 if live else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.rotator.metrics.registry)
        response = web.Response(body=body)
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
