"""The data path in one event loop, where a peer can be made to misbehave on cue:
a pooled connection that dies before any byte of a stream was sent is retried on a fresh
one; a peer that stops answering PINGs is declared dead; rotation reaches new handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from sidecar.config import Address, InboundConfig, InboundTarget, PoolConfig, load_yaml
from sidecar.dataplane import Sidecar
from sidecar.identity import Identity, load_svid_dir
from sidecar.inbound import Inbound
from sidecar.metrics import Metrics
from sidecar.policy import Authorizer
from sidecar.pool import Pool
from sidecar.session import Session

from .dataplane.conftest import CLIENT, ECHO
from .dataplane.harness import Pki, free_port

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.transport.write_eof()  # type: ignore[attr-defined]
        return True


class _FlakyInbound(Inbound):
    """Kills the TLS connection carrying the first CONNECT it sees, before answering."""

    killed = 0

    def _request(
        self, session: Session, stream_id: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if not self.killed:
            self.killed += 1
            assert session._transport is not None
            session._transport.abort()
            return
        super()._request(session, stream_id, headers)


@contextlib.asynccontextmanager
async def _server(
    pki: Pki, workdir: Path, inbound_cls: type[Inbound] = Inbound
) -> AsyncIterator[Inbound]:
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    identity = Identity()
    identity.update(*load_svid_dir(pki.write(workdir / "server", ECHO)))
    config = InboundConfig(
        listen=Address("127.0.0.1", free_port()),
        targets={8080: InboundTarget(8080, Address("127.0.0.1", echo_port), None)},
    )
    inbound = inbound_cls(config, identity, Metrics(), lambda: Authorizer())
    await inbound.start()
    try:
        yield inbound
    finally:
        inbound.drain()
        echo.close()


async def _client_sidecar(pki: Pki, workdir: Path, server_port: int) -> tuple[Sidecar, int]:
    upstream = free_port()
    config = load_yaml(
        f"""
svid_dir: {pki.write(workdir / "client", CLIENT)}
admin: "off"
inbound: {{listen: "127.0.0.1:{free_port()}"}}
upstreams:
  - {{name: echo, listen: "127.0.0.1:{upstream}", target: "echo:8080",
      endpoints: ["127.0.0.1:{server_port}"], spiffe_ids: ["{ECHO}"]}}
"""
    )
    sidecar = Sidecar(config)
    await sidecar.start()
    return sidecar, upstream


async def _exchange(port: int, payload: bytes, delay: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.sleep(delay)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def test_a_stream_whose_connection_dies_before_its_first_byte_is_retried_on_a_fresh_one() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir, _FlakyInbound) as inbound:
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            try:
                # The app waits before writing, so the stream has sent nothing when its
                # connection is killed: the sidecar must retry, the app must not notice.
                assert await _exchange(upstream, b"hello", delay=0.3) == b"hello"
                assert isinstance(inbound, _FlakyInbound) and inbound.killed == 1
                metrics = sidecar.metrics
                retried = metrics.streams.labels(direction="outbound", outcome="retried")
                assert retried._value.get() == 1
                handshakes = metrics.handshakes.labels(direction="outbound")._value.get()
                assert handshakes == 2
            finally:
                await sidecar.drain()

    run(scenario())


def test_a_peer_that_stops_answering_pings_is_declared_dead_and_left() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            identity = Identity()
            identity.update(*load_svid_dir(pki.write(workdir / "client", CLIENT)))
            config = PoolConfig(keepalive_interval=0.2, keepalive_timeout=0.3)
            pool = Pool(inbound.config.listen, (), identity, Metrics(), config)
            await pool._dial()
            (session,) = pool.sessions
            # An answering peer keeps the connection through several PING rounds.
            await asyncio.sleep(1.0)
            assert not session.dead
            # Freeze the server side: nothing it receives is read, so no PING ACK.
            for peer in inbound.sessions:
                assert peer._transport is not None
                peer._transport.pause_reading()
            await asyncio.wait_for(asyncio.shield(session.closed), 3)
            assert session.dead and pool.sessions == []

    run(scenario())


def test_a_peer_flooding_pings_without_reading_the_answers_is_cut_off() -> None:
    """Each PING makes us queue an ACK; a peer that never reads them would grow our
    output without bound. Past `max_write_buffer` the connection is aborted."""
    import socket
    import struct
    import time

    from .dataplane.harness import RawClient

    pki = Pki()
    ping = struct.pack(">BHBBL", 0, 8, 6, 0, 0) + b"12345678"
    record = ping * ((1 << 14) // len(ping))

    def flood(port: int, svid_dir: Path) -> tuple[int, bool]:
        raw = RawClient(port, svid_dir)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deadline = time.monotonic() + 20
        sent = 0
        try:
            while sent < 5000 and time.monotonic() < deadline:
                raw.send_plaintext(record)  # and never read a byte
                sent += 1
        except OSError:
            return sent, True
        finally:
            raw.close()
        return sent, False

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            inbound._settings.max_write_buffer = 256 << 10
            svid_dir = pki.write(workdir / "client", CLIENT)
            sent, cut_off = await asyncio.to_thread(flood, inbound.config.listen.port, svid_dir)
            assert cut_off, f"{sent} records of PINGs and the connection is still open"
            closed = inbound.metrics.connections_closed.labels(reason="peer_not_reading")
            assert closed._value.get() == 1
            # The listener still serves a well-behaved client.
            good = await asyncio.to_thread(RawClient, inbound.config.listen.port, svid_dir)
            try:
                status = await asyncio.to_thread(
                    good.request, [(":method", "CONNECT"), (":authority", "echo:8080")]
                )
                assert status == 200
            finally:
                good.close()

    run(scenario(), timeout=60)


def test_a_new_svid_is_used_by_the_next_handshake_and_old_connections_keep_running() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
                writer.write(b"before")
                assert await reader.readexactly(6) == b"before"
                old = sidecar.identity.svid
                assert old is not None
                sidecar.identity.update(*load_svid_dir(pki.write(workdir / "client2", CLIENT)))
                new = sidecar.identity.svid
                assert new is not None and new.serial != old.serial
                # Force the next stream onto a new connection: close the pooled one's
                # admission (as GOAWAY would) without touching its open stream.
                (pool,) = sidecar.pools.pools.values()
                (first,) = pool.sessions
                first.goaway_received = True
                assert await _exchange(upstream, b"after") == b"after"
                second = [s for s in pool.sessions if s is not first]
                assert len(second) == 1
                peers = {str(s.peer_id) for s in inbound.sessions}
                assert peers == {CLIENT}
                # The stream on the first connection still works.
                writer.write(b"still")
                assert await reader.readexactly(5) == b"still"
                writer.close()
                # The server saw the old leaf on the first connection, the new on the second.
                seen = {
                    s._channel._tls._state.peer.chain[0].serial_number  # type: ignore[attr-defined]
                    for s in inbound.sessions
                }
                assert seen == {old.serial, new.serial}
            finally:
                await sidecar.drain()

    run(scenario())


def test_the_operator_policy_file_and_pod_labels_decide_and_are_reloaded_on_change(
    tmp_path: Path,
) -> None:
    import json
    import os

    from ca.spiffeid import SpiffeId

    policy = tmp_path / "policy.json"
    labels = tmp_path / "labels"
    labels.write_text('app="api"\n')

    def document(allow: list[dict[str, str]]) -> str:
        return json.dumps(
            {
                "kind": "SidecarPolicy",
                "policies": [
                    {
                        "name": "p",
                        "selector": {"matchLabels": {"app": "api"}},
                        "ports": [8080],
                        "allow": allow,
                    }
                ],
            }
        )  # fmt: skip

    policy.write_text(document([{"exact": CLIENT}]))
    config = load_yaml(f"policy_file: {policy}\npod_labels_file: {labels}\nadmin: 'off'\n")
    sidecar = Sidecar(config)
    client = SpiffeId(CLIENT)
    assert sidecar._authorizer.decide(client, 8080, None).allowed
    assert not sidecar._authorizer.decide(SpiffeId(ECHO), 8080, None).allowed
    policy.write_text(document([]))
    stat = policy.stat()
    os.utime(policy, (stat.st_atime + 5, stat.st_mtime + 5))
    sidecar._reload_policy()
    assert not sidecar._authorizer.decide(client, 8080, None).allowed


def test_without_an_svid_the_sidecar_is_alive_but_not_ready() -> None:
    from aiohttp import ClientSession

    async def scenario() -> None:
        admin = free_port()
        workdir = Path(tempfile.mkdtemp())
        config = load_yaml(
            f"workload_api_socket: unix://{workdir}/absent.sock\n"
            f"admin: 127.0.0.1:{admin}\ninbound: {{listen: '127.0.0.1:{free_port()}'}}\n"
        )
        sidecar = Sidecar(config)
        await sidecar.start()
        try:
            async with ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{admin}/healthz") as response:
                    assert response.status == 200
                await asyncio.sleep(0.5)
                async with http.get(f"http://127.0.0.1:{admin}/readyz") as response:
                    assert response.status == 503
                    assert "no valid SVID" in await response.text()
                async with http.get(f"http://127.0.0.1:{admin}/config") as response:
                    body = await response.json()
                    assert body["identity"]["spiffe_id"] is None
                    assert body["workload_api"]["last_error"]
        finally:
            await sidecar.drain()

    run(scenario())


class _SlowFailingInbound(Inbound):
    """Dials port 9999's app slowly and fails: stream data piles up meanwhile."""

    async def _dial(
        self, session: Session, stream_id: int, bridge: Any, host: str, port: int
    ) -> None:
        if port == 9999:
            await asyncio.sleep(0.3)
            port = free_port()  # nothing listens there: refused
        await super()._dial(session, stream_id, bridge, host, port)


def test_bytes_for_a_stream_that_failed_still_give_the_connection_its_window_back() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir, _SlowFailingInbound) as inbound:
            inbound.config = InboundConfig(
                listen=inbound.config.listen,
                targets={
                    **inbound.config.targets,
                    9999: InboundTarget(9999, Address("127.0.0.1", 9999), None),
                },
            )
            doomed, good = free_port(), free_port()
            server = inbound.config.listen.port
            config = load_yaml(
                f"""
svid_dir: {pki.write(workdir / "client", CLIENT)}
admin: "off"
inbound: {{listen: "127.0.0.1:{free_port()}"}}
upstreams:
  - {{name: doomed, listen: "127.0.0.1:{doomed}", target: "x:9999",
      endpoints: ["127.0.0.1:{server}"], spiffe_ids: ["{ECHO}"]}}
  - {{name: good, listen: "127.0.0.1:{good}", target: "echo:8080",
      endpoints: ["127.0.0.1:{server}"], spiffe_ids: ["{ECHO}"]}}
"""
            )
            sidecar = Sidecar(config)
            await sidecar.start()
            try:
                chunk = b"z" * (900 << 10)

                async def doomed_stream() -> None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", doomed)
                    writer.write(chunk)
                    with contextlib.suppress(ConnectionError):
                        await reader.read()
                    writer.close()

                # 20 x 900 KiB > the 16 MiB connection window: leaked, it would be gone.
                await asyncio.gather(*(doomed_stream() for _ in range(20)))
                payload = b"y" * (2 << 20)
                assert await asyncio.wait_for(_exchange(good, payload), 10) == payload
                (pool,) = sidecar.pools.pools.values()
                assert len(pool.sessions) == 1  # the same connection carried it all
            finally:
                await sidecar.drain()

    run(scenario(), timeout=60)
