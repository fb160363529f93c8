"""The sidecar's `/app-health/...` endpoints run the app's original probes against real apps.

Every app here is real and on loopback: an aiohttp HTTP server, an asyncio TCP listener and
a grpcio server answering `grpc.health.v1.Health/Check` (the `grpcio-health-checking`
package is not installed, so the tiny service is a generic handler encoding the two
one-field messages by hand). The health listener is the sidecar's own (`start_admin` on a
`Sidecar` built from the injector's command line) on a real port, asked over HTTP as the
kubelet asks it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from aiohttp import ClientSession, ClientTimeout, web
from grpc import aio

from sidecar.admin import start_admin
from sidecar.cli import build_config
from sidecar.dataplane import Sidecar
from tests.ca.server.test_psat import _self_signed
from tests.support import free_port
from trellis.cli import build_parser

SERVING, NOT_SERVING = 1, 2


async def _ask(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    async with (
        ClientSession(timeout=ClientTimeout(total=10)) as http,
        http.get(f"http://{host}:{port}{path}") as response,
    ):
        return response.status, await response.text()


async def _with_health(
    probes_json: str, body: Callable[[int], Awaitable[None]], listen_host: str = "127.0.0.1"
) -> None:
    """A sidecar built from the command line the injector writes, with only its health
    listener started (on loopback): the routes are the ones a running sidecar serves."""
    port = free_port()
    argv = ["sidecar", f"--listen-host={listen_host}", f"--health-port={port}", "--admin-port=off"]
    config = build_config(build_parser().parse_args([*argv, f"--app-probes={probes_json}"]))
    servers = await start_admin(Sidecar(config), None, config.health)
    try:
        await body(port)
    finally:
        await servers.cleanup()


def test_an_http_probe_passes_and_fails_as_the_app_does_and_carries_its_headers() -> None:
    app_port = free_port()
    state = {"healthy": True, "seen": ""}

    async def ready(request: web.Request) -> web.Response:
        state["seen"] = request.headers.get("X-Probe", "")
        return web.Response(status=200 if state["healthy"] else 500, text="app")

    probes = json.dumps(
        {
            "web/readyz": {
                "httpGet": {
                    "path": "/ready",
                    "port": app_port,
                    "scheme": "HTTP",
                    "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}],
                },
                "timeoutSeconds": 2,
            }
        }
    )

    async def scenario(health: int) -> None:
        app = web.Application()
        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", app_port).start()
        try:
            status, text = await _ask(health, "/app-health/web/readyz")
            assert (status, state["seen"]) == (200, "kubelet"), text
            state["healthy"] = False
            status, text = await _ask(health, "/app-health/web/readyz")
            assert status == 503 and "HTTP 500" in text
        finally:
            await runner.cleanup()
        # The app is gone: the probe fails with the reason, not a traceback.
        status, text = await _ask(health, "/app-health/web/readyz")
        assert status == 503 and str(app_port) in text

    asyncio.run(_with_health(probes, scenario))


def test_a_tcp_probe_passes_while_the_app_listens_and_fails_once_it_stops() -> None:
    app_port = free_port()
    probes = json.dumps({"db/livez": {"tcpSocket": {"port": app_port}}})

    async def scenario(health: int) -> None:
        async def accept(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", app_port)
        try:
            assert (await _ask(health, "/app-health/db/livez"))[0] == 200
        finally:
            server.close()
            await server.wait_closed()
        status, text = await _ask(health, "/app-health/db/livez")
        assert status == 503 and f"127.0.0.1:{app_port}" in text

    asyncio.run(_with_health(probes, scenario))


def _health_server(statuses: dict[str, int]) -> aio.Server:
    """`grpc.health.v1.Health/Check` answering ``statuses[service]``, SERVICE_UNKNOWN (3)
    otherwise, as grpc_health's servicer does."""

    def check(request: bytes, _context: aio.ServicerContext[bytes, bytes]) -> bytes:
        service = request[2:].decode() if request[:1] == b"\x0a" else ""
        return bytes([0x08, statuses.get(service, 3)])

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(check)},
    )
    return aio.server(handlers=[handler])


def test_a_grpc_probe_asks_the_named_service_and_fails_when_it_is_not_serving() -> None:
    app_port = free_port()
    statuses = {"orders": SERVING}
    probes = json.dumps(
        {
            "api/startupz": {"grpc": {"port": app_port, "service": "orders"}},
            "api/livez": {"grpc": {"port": app_port}},  # "" is not registered here
        }
    )

    async def scenario(health: int) -> None:
        server = _health_server(statuses)
        server.add_insecure_port(f"127.0.0.1:{app_port}")
        await server.start()
        try:
            status, text = await _ask(health, "/app-health/api/startupz")
            assert status == 200 and "SERVING" in text
            assert (await _ask(health, "/app-health/api/livez"))[0] == 503
            statuses["orders"] = NOT_SERVING
            status, text = await _ask(health, "/app-health/api/startupz")
            assert status == 503 and "NOT_SERVING" in text
        finally:
            await server.stop(None)
        status, text = await _ask(health, "/app-health/api/startupz")
        assert status == 503 and "UNAVAILABLE" in text

    asyncio.run(_with_health(probes, scenario))


def test_a_probe_path_that_was_not_injected_is_not_found() -> None:
    probes = json.dumps({"web/readyz": {"tcpSocket": {"port": free_port()}}})

    async def scenario(health: int) -> None:
        for path in ("/app-health/web/livez", "/app-health/other/readyz", "/app-health/web"):
            assert (await _ask(health, path))[0] == 404

    asyncio.run(_with_health(probes, scenario))


def test_malformed_app_probes_are_refused_in_one_line() -> None:
    for bad, words in (
        ("{", "not JSON"),
        ('{"web/ready": {"tcpSocket": {"port": 80}}}', "<container>/<livez|readyz|startupz>"),
        ('{"web/livez": {"tcpSocket": {"port": "http"}}}', "web/livez.tcpSocket.port"),
        ('{"web/livez": {"exec": {"command": ["true"]}}}', "exactly one of"),
        ('{"web/livez": {"httpGet": {"port": 80, "scheme": "FTP"}}}', "HTTP or HTTPS"),
        ("[" * 100_000, "at most"),
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "trellis",
                "sidecar",
                "--health-port=15020",
                "--app-probes",
                bad,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--app-probes" in lines[0] and words in lines[0], result.stderr


def test_an_https_probe_skips_certificate_verification_as_the_kubelet_does(tmp_path: Path) -> None:
    """The app serves a self-signed certificate no trust store holds; the kubelet's HTTPS
    probe sets InsecureSkipVerify, so the probe passes on the app's answer alone."""
    cert, key, _pem = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    app_port = free_port()
    probes = json.dumps(
        {"web/livez": {"httpGet": {"path": "/live", "port": app_port, "scheme": "HTTPS"}}}
    )

    async def scenario(health: int) -> None:
        app = web.Application()
        app.router.add_get("/live", _no_content)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", app_port, ssl_context=tls).start()
        try:
            status, text = await _ask(health, "/app-health/web/livez")
            assert status == 200 and f"https://127.0.0.1:{app_port}/live: HTTP 204" in text
        finally:
            await runner.cleanup()

    asyncio.run(_with_health(probes, scenario))


async def _no_content(_request: web.Request) -> web.Response:
    return web.Response(status=204)


def test_an_app_answering_garbage_fails_every_probe_kind_with_a_reason_not_a_server_error() -> None:
    app_port = free_port()
    probes = json.dumps(
        {
            "web/livez": {"httpGet": {"port": app_port}},
            "web/readyz": {"grpc": {"port": app_port}},
        }
    )

    async def scenario(health: int) -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            writer.write(b"\xff\x00 not a protocol\r\n\r\n" * 4)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", app_port)
        try:
            for path in ("/app-health/web/livez", "/app-health/web/readyz"):
                status, text = await _ask(health, path)
                assert status == 503 and text.strip(), (path, text)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(_with_health(probes, scenario))


def test_an_http_probe_follows_a_same_host_redirect_and_judges_where_it_leads() -> None:
    """k8s pkg/probe/http RedirectChecker: a redirect to the probe's own host (any port)
    is followed, so an app redirecting /healthz to a failing page fails its probe."""
    app_port, other_port = free_port(), free_port()
    state = {"healthy": True}

    async def moved(_request: web.Request) -> web.Response:
        # Another port of the same host: the kubelet compares host names only.
        raise web.HTTPFound(f"http://127.0.0.1:{other_port}/real-health")

    async def real(_request: web.Request) -> web.Response:
        return web.Response(status=200 if state["healthy"] else 500)

    probes = json.dumps({"web/readyz": {"httpGet": {"path": "/healthz", "port": app_port}}})

    async def scenario(health: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", moved)
        app.router.add_get("/real-health", real)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", app_port).start()
        await web.TCPSite(runner, "127.0.0.1", other_port).start()
        try:
            status, text = await _ask(health, "/app-health/web/readyz")
            assert status == 200 and f"{other_port}/real-health: HTTP 200" in text, text
            state["healthy"] = False
            status, text = await _ask(health, "/app-health/web/readyz")
            assert status == 503 and "HTTP 500" in text, text
        finally:
            await runner.cleanup()

    asyncio.run(_with_health(probes, scenario))


def test_a_redirect_to_another_host_passes_unfollowed_and_a_loop_fails_after_ten_requests() -> None:
    """A 3xx to another host is the answer itself (a success the kubelet reports as a
    warning); nothing is ever sent to that host (203.0.113.1 is TEST-NET-3, never routed
    to). A redirect loop on the same host fails after ten requests, as the kubelet's
    "stopped after 10 redirects"."""
    app_port = free_port()
    seen = {"loop": 0}

    async def away(_request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("http://203.0.113.1/elsewhere")

    async def loop(_request: web.Request) -> web.Response:
        seen["loop"] += 1
        raise web.HTTPTemporaryRedirect("/loop")  # relative: resolved against the probe URL

    probes = json.dumps(
        {
            "web/livez": {"httpGet": {"path": "/away", "port": app_port}},
            "web/readyz": {"httpGet": {"path": "/loop", "port": app_port}},
        }
    )

    async def scenario(health: int) -> None:
        app = web.Application()
        app.router.add_get("/away", away)
        app.router.add_get("/loop", loop)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", app_port).start()
        try:
            status, text = await _ask(health, "/app-health/web/livez")
            assert status == 200 and "HTTP 301" in text and "not followed" in text, text
            status, text = await _ask(health, "/app-health/web/readyz")
            assert status == 503 and "stopped after 10 redirects" in text, text
            assert seen["loop"] == 10
        finally:
            await runner.cleanup()

    asyncio.run(_with_health(probes, scenario))


# 127.0.0.2 stands in for the pod IP: every 127/8 address is the host's own, so an app can
# bind it alone, as an app in a pod binds $(POD_IP), and 127.0.0.1 then refuses.
POD_IP = "127.0.0.2"


def test_every_probe_kind_reaches_an_app_bound_only_to_the_address_the_kubelet_probed() -> None:
    """The kubelet's probe arrives on the pod IP (the health listener is on 0.0.0.0, as in
    the pod); the app listens there alone (istio/istio#25177). Before the fix each probe
    was sent to 127.0.0.1 and refused."""
    http_port, tcp_port, grpc_port = free_port(), free_port(), free_port()
    probes = json.dumps(
        {
            "app/readyz": {"httpGet": {"path": "/ready", "port": http_port}},
            "app/livez": {"tcpSocket": {"port": tcp_port}},
            "app/startupz": {"grpc": {"port": grpc_port}},
        }
    )

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="ready")

    async def accept(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def scenario(health: int) -> None:
        app = web.Application()
        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, POD_IP, http_port).start()
        tcp = await asyncio.start_server(accept, POD_IP, tcp_port)
        grpc_server = _health_server({"": SERVING})
        grpc_server.add_insecure_port(f"{POD_IP}:{grpc_port}")
        await grpc_server.start()
        try:
            for kind, words in (
                ("readyz", "HTTP 200"),
                ("livez", "accepted"),
                ("startupz", "SERVING"),
            ):
                status, text = await _ask(health, f"/app-health/app/{kind}", POD_IP)
                assert status == 200 and POD_IP in text and words in text, (kind, text)
        finally:
            await grpc_server.stop(None)
            tcp.close()
            await tcp.wait_closed()
            await runner.cleanup()

    asyncio.run(_with_health(probes, scenario, listen_host="0.0.0.0"))


def test_a_probe_falls_back_to_loopback_for_an_app_bound_only_to_127_0_0_1() -> None:
    """The same probe arriving on the pod IP, for an app bound to 127.0.0.1 alone: the pod
    address refuses, the probe is run on 127.0.0.1 as before and passes; once the app is
    gone both refuse and the reason names the loopback attempt."""
    http_port, grpc_port = free_port(), free_port()
    probes = json.dumps(
        {
            "app/readyz": {"httpGet": {"path": "/ready", "port": http_port}},
            "app/startupz": {"grpc": {"port": grpc_port}},
        }
    )

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="ready")

    async def scenario(health: int) -> None:
        app = web.Application()
        app.router.add_get("/ready", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", http_port).start()
        grpc_server = _health_server({"": SERVING})
        grpc_server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await grpc_server.start()
        try:
            for kind in ("readyz", "startupz"):
                status, text = await _ask(health, f"/app-health/app/{kind}", POD_IP)
                assert status == 200 and "127.0.0.1" in text, (kind, text)
        finally:
            await grpc_server.stop(None)
            await runner.cleanup()
        status, text = await _ask(health, "/app-health/app/readyz", POD_IP)
        assert status == 503 and f"127.0.0.1:{http_port}" in text, text

    asyncio.run(_with_health(probes, scenario, listen_host="0.0.0.0"))
