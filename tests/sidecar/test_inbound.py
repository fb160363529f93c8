"""The inbound side in this process: what the configuration check cannot cover (a
`SidecarConfig` built in code, here by `load_yaml` alone, skipping `check_consistency`,
that names the sidecar's own ports as targets still never gets a stream into them), and
which address the app is dialled at. 127.0.0.2 and 127.0.0.3 stand in for the pod IP and
another host: every 127/8 address is this host's own, so an app can bind one alone, as an
app in a pod binds $(POD_IP)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from sidecar.config import load_yaml
from sidecar.dataplane import Sidecar

from .dataplane.conftest import CLIENT, ECHO
from .dataplane.harness import Pki, RawClient, free_port


def _statuses(
    port: int, svid_dir: Path, authorities: list[str], host: str = "127.0.0.1"
) -> list[int]:
    client = RawClient(port, svid_dir, host)
    try:
        return [client.request([(":method", "CONNECT"), (":authority", a)]) for a in authorities]
    finally:
        client.close()


def test_inbound_never_dials_the_sidecars_own_listeners_even_when_a_target_names_them() -> None:
    pki = Pki()
    workdir = Path(tempfile.mkdtemp())
    admin, inbound, upstream = free_port(), free_port(), free_port()
    config = load_yaml(
        f"""
svid_dir: {pki.write(workdir / "server", ECHO)}
admin: 127.0.0.1:{admin}
inbound:
  listen: 127.0.0.1:{inbound}
  targets: {{{admin}: {{}}, {upstream}: {{}}}}
upstreams:
  - {{name: loop, listen: "127.0.0.1:{upstream}", target: "echo:8080",
      endpoints: ["127.0.0.1:{free_port()}"]}}
"""
    )
    client_dir = pki.write(workdir / "client", CLIENT)

    async def scenario() -> tuple[list[int], Sidecar]:
        sidecar = Sidecar(config)
        await sidecar.start()
        try:
            statuses = await asyncio.to_thread(
                _statuses, inbound, client_dir, [f"x:{admin}", f"x:{upstream}"]
            )
        finally:
            await sidecar.drain()
        return statuses, sidecar

    statuses, sidecar = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert statuses == [404, 404]
    metrics = sidecar.metrics
    # Neither the admin port nor the upstream listener saw a connection from the sidecar.
    for direction in ("inbound", "outbound"):
        assert metrics.app_connections.labels(direction=direction)._value.get() == 0
    assert metrics.connect_errors.labels(status="404")._value.get() == 2


POD_IP = "127.0.0.2"


async def _accepting(host: str, port: int, seen: list[str]) -> asyncio.Server:
    """An app bound to ``host`` alone that notes each connection the sidecar makes."""

    async def accept(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(host)
        writer.close()

    return await asyncio.start_server(accept, host, port)


def _streams_to_app(
    app_host: str, authority_host: str, *, listen: str = "0.0.0.0", dial: str = POD_IP
) -> tuple[list[int], list[str]]:
    """A sidecar on ``listen`` (0.0.0.0 as in a pod), a peer that dials it at ``dial`` (the
    pod IP) and opens a CONNECT to ``authority_host``:app port, and an app bound to
    ``app_host`` alone: the stream statuses and where the app saw connections."""
    pki = Pki()
    workdir = Path(tempfile.mkdtemp())
    inbound, app_port = free_port(), free_port()
    config = load_yaml(
        f"""
svid_dir: {pki.write(workdir / "server", ECHO)}
admin: 127.0.0.1:{free_port()}
inbound:
  listen: "{listen}:{inbound}"
  targets: {{{app_port}: {{}}}}
"""
    )
    client_dir = pki.write(workdir / "client", CLIENT)
    seen: list[str] = []

    async def scenario() -> list[int]:
        app = await _accepting(app_host, app_port, seen)
        sidecar = Sidecar(config)
        await sidecar.start()
        try:
            return await asyncio.to_thread(
                _statuses, inbound, client_dir, [f"{authority_host}:{app_port}"] * 2, dial
            )
        finally:
            await sidecar.drain()
            app.close()
            await app.wait_closed()

    return asyncio.run(asyncio.wait_for(scenario(), 30)), seen


def test_inbound_reaches_an_app_bound_only_to_the_pod_address_the_peer_dialled() -> None:
    """Before the fix the sidecar dialled 127.0.0.1 alone, refused: 503 (istio/istio#25177)."""
    statuses, seen = _streams_to_app(POD_IP, POD_IP)
    assert statuses == [200, 200]
    assert seen == [POD_IP, POD_IP]


def test_inbound_falls_back_to_loopback_for_an_app_bound_only_to_127_0_0_1() -> None:
    statuses, seen = _streams_to_app("127.0.0.1", POD_IP)
    assert statuses == [200, 200]
    assert seen == ["127.0.0.1", "127.0.0.1"]


def test_inbound_never_dials_the_host_a_connect_authority_names() -> None:
    """The authority is the caller's word: an app listening on another address (127.0.0.3)
    that the CONNECT names is never reached; the pod address and loopback both refuse."""
    statuses, seen = _streams_to_app("127.0.0.3", "127.0.0.3")
    assert statuses == [503, 503]
    assert seen == []


def test_an_ipv6_pod_address_is_dialled_in_its_own_family() -> None:
    """::1 stands in for an IPv6 pod IP (the one IPv6 address every host has): the sidecar
    listens on [::], the peer dials ::1, the app listens on ::1 alone. Before the fix the
    sidecar dialled 127.0.0.1 and answered 503."""
    statuses, seen = _streams_to_app("::1", "[::1]", listen="[::]", dial="::1")
    assert statuses == [200, 200]
    assert seen == ["::1", "::1"]


def test_a_dual_stack_listener_reports_an_ipv4_caller_as_ipv4() -> None:
    """A [::] listener sees an IPv4 connection as ::ffff:a.b.c.d; the app is dialled at
    the IPv4 address (an app bound to an IPv4 pod IP does not listen on the mapped form)."""
    import socket

    from sidecar.appaddress import app_hosts, local_host

    async def scenario() -> str | None:
        arrived: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        class Note(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                arrived.set_result(local_host(transport))
                transport.close()

        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 0))
        listener.listen()
        server = await asyncio.get_running_loop().create_server(Note, sock=listener)
        try:
            port = listener.getsockname()[1]
            _reader, writer = await asyncio.open_connection(POD_IP, port)
            writer.close()
            return await asyncio.wait_for(arrived, 10)
        finally:
            server.close()
            await server.wait_closed()

    arrived_on = asyncio.run(scenario())
    assert arrived_on == POD_IP
    assert app_hosts(arrived_on, "127.0.0.1") == (POD_IP, "127.0.0.1")
    # An explicit app address other than loopback is used as configured, whatever arrived.
    assert app_hosts(arrived_on, "10.1.2.3") == ("10.1.2.3",)
