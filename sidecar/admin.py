"""The sidecar's HTTP endpoints (aiohttp), on two listeners.

* admin (loopback only): `/metrics`, `/healthz`, `/readyz`, `/config`. `/config` tells
  the workload's identity, policy and peers to whoever asks, so nothing off the host may.
* health (the pod's address): `/metrics`, `/healthz`, `/readyz` and nothing else, for the
  kubelet's probes and Prometheus (Istio splits its 15000 and 15020 the same way), plus
  `/app-health/<container>/<livez|readyz|startupz>` for each app probe the injector moved
  here (``sidecar.probes``): the original probe is run against the app at the address the
  kubelet's probe arrived on, the pod IP, falling back to 127.0.0.1 when nothing listens
  there (``sidecar.appaddress``), and its result answered, 200 or 503 with the reason.
  Any other path is 404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .appaddress import app_hosts, local_host
from .config import Address
from .probes import AppProbe, run_probe_on

if TYPE_CHECKING:
    from .dataplane import Sidecar

__all__ = ["AdminServers", "app_probe_routes", "start_admin"]

Handler = Callable[[web.Request], Awaitable[web.Response]]


class AdminServers:
    """The running admin and health listeners; `cleanup` stops both."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []

    async def add(self, routes: dict[str, Handler], address: Address) -> None:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.runners.append(runner)
        site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
        await site.start()

    async def cleanup(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()


def app_probe_routes(probes: Mapping[str, AppProbe]) -> dict[str, Handler]:
    """One GET route per injected probe path; a path not in ``probes`` stays a 404."""

    def route(probe: AppProbe) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            transport = request.transport
            arrived_on = local_host(transport) if transport is not None else None
            result = await run_probe_on(probe, app_hosts(arrived_on, "127.0.0.1"))
            return web.Response(text=result.reason + "\n", status=200 if result.ok else 503)

        return handler

    return {path: route(probe) for path, probe in probes.items()}


async def start_admin(
    sidecar: Sidecar, admin: Address | None, health: Address | None
) -> AdminServers:
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

    probes: dict[str, Handler] = {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz}
    servers = AdminServers()
    try:
        if admin is not None:
            await servers.add({**probes, "/config": config}, admin)
        if health is not None:
            await servers.add({**probes, **app_probe_routes(sidecar.config.app_probes)}, health)
    except BaseException:
        await servers.cleanup()
        raise
    return servers
