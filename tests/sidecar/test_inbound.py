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


def _streams_to_app(app_host: str, authority_host: str) -> tuple[list[int], list[str]]:
    """A sidecar on 0.0.0.0 (as in a pod), a peer that dials it at the pod IP and opens a
    CONNECT to ``authority_host``:app port, and an app bound to ``app_host`` alone: the
    stream statuses and where the app saw connections."""
    pki = Pki()
    workdir = Path(tempfile.mkdtemp())
    inbound, app_port = free_port(), free_port()
    config = load_yaml(
        f"""
svid_dir: {pki.write(workdir / "server", ECHO)}
admin: 127.0.0.1:{free_port()}
inbound:
  listen: 0.0.0.0:{inbound}
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
                _statuses, inbound, client_dir, [f"{authority_host}:{app_port}"] * 2, POD_IP
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
