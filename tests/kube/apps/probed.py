"""An app with the three kinds of network probe a kubelet sends: an HTTP ``/ready`` page,
a TCP listener and a ``grpc.health.v1.Health`` server.

Usage: ``python -m tests.kube.apps.probed HTTP_PORT TCP_PORT GRPC_PORT CONTROL_DIR``.

The test makes the app unhealthy from outside by creating ``CONTROL_DIR/fail`` (an
``emptyDir`` the pod mounts): then ``/ready`` answers 500, the TCP listener is closed and
the gRPC health service answers NOT_SERVING. The health messages are encoded by hand
(``grpcio-health-checking`` is not installed): ``HealthCheckResponse{status = 1}``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
from aiohttp import web
from grpc import aio

SERVING, NOT_SERVING = 1, 2


async def main(http_port: int, tcp_port: int, grpc_port: int, control: Path) -> None:
    def failing() -> bool:
        return (control / "fail").exists()

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(status=500 if failing() else 200, text="app\n")

    app = web.Application()
    app.router.add_get("/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", http_port).start()

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    tcp = await asyncio.start_server(accept, "0.0.0.0", tcp_port)

    def check(_request: bytes, _context: aio.ServicerContext[bytes, bytes]) -> bytes:
        return bytes([0x08, NOT_SERVING if failing() else SERVING])

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    health = aio.server(handlers=[handler])
    health.add_insecure_port(f"0.0.0.0:{grpc_port}")
    await health.start()
    print("ready", flush=True)
    while not failing():  # the app's own loop: it stops listening on TCP once told to fail
        await asyncio.sleep(0.1)
    tcp.close()
    await tcp.wait_closed()
    print("failing: TCP listener closed", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ports = [int(p) for p in sys.argv[1:4]]
    asyncio.run(main(ports[0], ports[1], ports[2], Path(sys.argv[4])))
