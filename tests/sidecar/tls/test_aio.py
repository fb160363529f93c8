"""The asyncio shell, our client against our server over loopback TCP.

Streams, the Transport contract (extra info, half-close, flow control both ways, key
update), an `h2` protocol and aiohttp (server and client) running over it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import aiohttp
import h2.config
import h2.connection
import h2.events
import pytest
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from cryptography import x509

from sidecar.tls import AlertDescription, TLSConfig, TLSError, TrafficSecrets
from sidecar.tls.shell import (
    TLSClientProtocol,
    TLSTransport,
    create_tls_connection,
    create_tls_server,
    open_tls_connection,
    start_tls_server,
)

from .pki import NOW, client_config, server_config
from .test_interop_system_fixtures import (
    CLIENT_ID,
    SERVER_ID,
    client_svid,
    run,
    server_svid,
    tls_echo_server,
)


def test_streams_round_trip_with_the_negotiated_parameters_in_extra_info() -> None:
    async def scenario() -> tuple[dict[str, Any], bytes]:
        async with tls_echo_server(server_svid().config(alpn_protocols=("h2",))) as (port, _):
            reader, writer = await open_tls_connection(
                "127.0.0.1",
                port,
                config=client_svid().config(alpn_protocols=("h2",)),
                server_name="localhost",
            )
            names = ("peercert", "spiffe_id", "cipher", "tls_group", "alpn_protocol")
            info = {name: writer.get_extra_info(name) for name in names}
            info["peername"] = writer.get_extra_info("peername")
            writer.write(b"ping\n")
            reply = await reader.readline()
            writer.close()
            await writer.wait_closed()
        return info, reply

    info, reply = run(scenario())
    assert reply == f"pong {CLIENT_ID} X25519MLKEM768\n".encode()
    assert isinstance(info["peercert"], x509.Certificate)
    assert info["spiffe_id"] == SERVER_ID
    assert info["cipher"] == ("TLS_AES_128_GCM_SHA256", "TLSv1.3", 128)
    assert info["tls_group"] == "X25519MLKEM768"
    assert info["alpn_protocol"] == "h2"
    assert info["peername"][0] == "127.0.0.1"


def test_the_clock_comes_from_the_shell() -> None:
    # The test PKI's certificates are valid for an hour around NOW, in the past.
    async def scenario(clock: Callable[[], float]) -> object:
        server = await start_tls_server(
            lambda r, w: w.close(), "127.0.0.1", 0, config=server_config(), clock=clock
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            try:
                _, writer = await open_tls_connection(
                    "127.0.0.1", port, config=client_config(), clock=clock
                )
            except TLSError as exc:
                return exc.alert
            spiffe_id = writer.get_extra_info("spiffe_id")
            writer.close()
            return spiffe_id

    assert run(scenario(NOW.timestamp)) == "spiffe://example.org/ns/default/sa/x"
    a_day_later = (NOW + dt.timedelta(days=1)).timestamp()
    assert run(scenario(lambda: a_day_later)) == AlertDescription.certificate_expired


def test_write_eof_sends_close_notify_and_the_other_direction_stays_open() -> None:
    async def scenario() -> tuple[bytes, bytes, bool | None]:
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await reader.read()  # until the client's close_notify
            writer.write(b"after eof: " + request)
            await writer.drain()
            done.set_result(request)
            writer.close()

        server = await start_tls_server(handle, "127.0.0.1", 0, config=server_svid().config())
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
            )
            assert writer.can_write_eof()
            writer.write(b"request")
            writer.write_eof()
            response = await reader.read()
            clean = writer.get_extra_info("tls_clean_close")
            writer.close()
            return await done, response, clean

    request, response, clean = run(scenario())
    assert request == b"request"
    assert response == b"after eof: request"
    assert clean is True  # the server's close() sent close_notify


class _Collector(asyncio.Protocol):
    """An application protocol recording what the shell calls."""

    def __init__(self) -> None:
        self.transport: TLSTransport | None = None
        self.data = bytearray()
        self.calls: list[str] = []
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.received = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport
        self.calls.append("connection_made")

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.received.set()

    def eof_received(self) -> bool:
        self.calls.append("eof_received")
        return False

    def pause_writing(self) -> None:
        self.calls.append("pause_writing")

    def resume_writing(self) -> None:
        self.calls.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("connection_lost")
        if not self.lost.done():
            self.lost.set_result(exc)


async def _protocol_pair(
    server_cfg: TLSConfig | None = None, client_cfg: TLSConfig | None = None
) -> tuple[asyncio.Server, _Collector, _Collector]:
    accepted: asyncio.Future[_Collector] = asyncio.get_running_loop().create_future()

    def factory() -> asyncio.BaseProtocol:
        protocol = _Collector()
        accepted.set_result(protocol)
        return protocol

    server = await create_tls_server(
        factory, "127.0.0.1", 0, config=server_cfg or server_svid().config()
    )
    port = server.sockets[0].getsockname()[1]
    _, client = await create_tls_connection(
        _Collector,
        "127.0.0.1",
        port,
        config=client_cfg or client_svid().config(),
        server_name="localhost",
    )
    assert isinstance(client, _Collector)
    server_side = await accepted
    while server_side.transport is None:
        await asyncio.sleep(0.01)
    return server, client, server_side


def test_paused_reading_holds_data_back_and_resuming_delivers_it_in_order() -> None:
    async def scenario() -> tuple[int, bytes, bytes]:
        server, client, peer = await _protocol_pair()
        async with server:
            assert peer.transport is not None and client.transport is not None
            peer.transport.pause_reading()
            assert not peer.transport.is_reading()
            payload = bytes(range(256)) * 4096  # 1 MiB: many records
            client.transport.write(payload)
            await asyncio.sleep(0.2)
            held = len(peer.data)
            peer.transport.resume_reading()
            while len(peer.data) < len(payload):
                peer.received.clear()
                await asyncio.wait_for(peer.received.wait(), 5)
            client.transport.close()
            await asyncio.wait_for(peer.lost, 5)
            return held, bytes(peer.data), payload

    held, received, payload = run(scenario())
    assert held < len(payload) // 2  # at most what was decrypted before the pause took hold
    assert received == payload


def test_a_full_tcp_buffer_pauses_the_writer_and_draining_resumes_it() -> None:
    async def scenario() -> tuple[list[str], int]:
        server, client, peer = await _protocol_pair()
        async with server:
            assert peer.transport is not None and client.transport is not None
            peer.transport.pause_reading()
            client.transport.set_write_buffer_limits(high=64 * 1024)
            assert client.transport.get_write_buffer_limits()[1] == 64 * 1024
            chunk = b"x" * 16384
            for _ in range(2000):  # 32 MiB: far beyond what the kernel buffers
                client.transport.write(chunk)
                if "pause_writing" in client.calls:
                    break
            assert client.transport.get_write_buffer_size() > 0
            peer.transport.resume_reading()
            for _ in range(500):
                if "resume_writing" in client.calls:
                    break
                await asyncio.sleep(0.01)
            client.transport.close()
            return client.calls, len(peer.data)

    calls, _ = run(scenario())
    assert calls[:3] == ["connection_made", "pause_writing", "resume_writing"]


def test_key_update_rotates_the_traffic_secrets_and_data_keeps_flowing() -> None:
    async def scenario() -> tuple[TrafficSecrets, TrafficSecrets, TrafficSecrets, bytes]:
        server, client, peer = await _protocol_pair()
        async with server:
            assert peer.transport is not None and client.transport is not None
            before = client.transport.get_extra_info("traffic_secrets")
            client.transport.update_key(request_peer_update=True)
            client.transport.write(b"after update")
            await asyncio.wait_for(peer.received.wait(), 5)
            peer.received.clear()
            peer.transport.write(b"reply")
            await asyncio.wait_for(client.received.wait(), 5)
            after = client.transport.get_extra_info("traffic_secrets")
            server_view = peer.transport.get_extra_info("traffic_secrets")
            client.transport.close()
            return before, after, server_view, bytes(peer.data) + bytes(client.data)

    before, after, server_view, data = run(scenario())
    assert data == b"after updatereply"
    assert after.write.secret != before.write.secret
    assert after.read.secret != before.read.secret  # the server answered the request
    assert after.write.secret == server_view.read.secret
    assert after.read.key == server_view.write.key


def test_abort_is_a_bare_eof_to_the_peer_and_close_is_a_clean_one() -> None:
    async def scenario(abort: bool) -> tuple[list[str], bool | None]:
        server, client, peer = await _protocol_pair()
        async with server:
            assert peer.transport is not None and client.transport is not None
            if abort:
                client.transport.abort()
            else:
                client.transport.close()
            await asyncio.wait_for(peer.lost, 5)
            return peer.calls, peer.transport.get_extra_info("tls_clean_close")

    calls, clean = run(scenario(abort=True))
    assert calls == ["connection_made", "eof_received", "connection_lost"]
    assert clean is False
    calls, clean = run(scenario(abort=False))
    assert calls == ["connection_made", "eof_received", "connection_lost"]
    assert clean is True


def test_loop_create_connection_with_the_client_protocol_directly() -> None:
    async def scenario() -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        async with tls_echo_server(server_svid().config()) as (port, _):
            app = _Collector()
            _, shell = await loop.create_connection(
                lambda: TLSClientProtocol(app, client_svid().config(), server_name="localhost"),
                "127.0.0.1",
                port,
            )
            transport = await shell.handshake_done()
            assert transport is app.transport
            transport.write(b"ping\n")
            await asyncio.wait_for(app.received.wait(), 5)
            await asyncio.wait_for(app.lost, 5)  # the echo server closes after one line
            return bytes(app.data), transport.is_closing()

    data, closing = run(scenario())
    assert data == f"pong {CLIENT_ID} X25519MLKEM768\n".encode()
    assert closing


class _Buffered(asyncio.BufferedProtocol):
    """Hands out a small buffer so one record's plaintext takes several buffer_updated."""

    def __init__(self) -> None:
        self.buffer = bytearray(1000)
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buffer[:nbytes]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def test_a_buffered_protocol_receives_through_get_buffer() -> None:
    async def scenario() -> bytes:
        server = await start_tls_server(
            _send_and_close, "127.0.0.1", 0, config=server_svid().config()
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, app = await create_tls_connection(
                _Buffered, "127.0.0.1", port, config=client_svid().config()
            )
            assert isinstance(app, _Buffered)
            await asyncio.wait_for(app.lost, 5)
            return bytes(app.data)

    assert run(scenario()) == PAYLOAD


PAYLOAD = bytes(range(256)) * 100


async def _send_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(PAYLOAD)
    await writer.drain()
    writer.close()


# --- h2 over the transport --------------------------------------------------------------


class H2Server(asyncio.Protocol):
    """A minimal h2 server: answers every request with 200 and the peer's SPIFFE ID."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        assert transport.get_extra_info("alpn_protocol") == "h2"
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                body = str(self.transport.get_extra_info("spiffe_id")).encode()
                self.conn.send_headers(
                    event.stream_id, [(":status", "200"), ("content-length", str(len(body)))]
                )
                self.conn.send_data(event.stream_id, body, end_stream=True)
        self.transport.write(self.conn.data_to_send())


class H2Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.transport: asyncio.Transport | None = None
        self.status: str | None = None
        self.body = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.initiate_connection()
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(
            stream,
            [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")],
            end_stream=True,
        )
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.status = dict(event.headers)[b":status"].decode()
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and not self.done.done():
                self.done.set_result(None)
        self.transport.write(self.conn.data_to_send())


def test_an_h2_client_and_server_run_over_the_transport() -> None:
    async def scenario() -> tuple[str | None, bytes]:
        server = await create_tls_server(
            H2Server, "127.0.0.1", 0, config=server_svid().config(alpn_protocols=("h2",))
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            transport, client = await create_tls_connection(
                H2Client,
                "127.0.0.1",
                port,
                config=client_svid().config(alpn_protocols=("h2",)),
                server_name="localhost",
            )
            assert isinstance(client, H2Client)
            await asyncio.wait_for(client.done, 5)
            transport.close()
            return client.status, bytes(client.body)

    status, body = run(scenario())
    assert status == "200"
    assert body == CLIENT_ID.encode()


# --- aiohttp ----------------------------------------------------------------------------


class TrellisConnector(aiohttp.BaseConnector):
    """An aiohttp connector whose connections are Trellis TLS (the URL's scheme is https;
    aiohttp's own ssl machinery is never involved)."""

    def __init__(self, config: TLSConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._config = config

    async def _create_connection(
        self, req: aiohttp.ClientRequest, traces: Any, timeout: aiohttp.ClientTimeout
    ) -> ResponseHandler:
        assert req.url.host is not None and req.url.port is not None
        _, protocol = await create_tls_connection(
            lambda: ResponseHandler(self._loop),
            req.url.host,
            req.url.port,
            config=self._config,
            server_name=req.url.host,
        )
        assert isinstance(protocol, ResponseHandler)
        return protocol


async def _whoami(request: web.Request) -> web.Response:
    transport = request.transport
    assert transport is not None
    return web.json_response(
        {
            "peer": transport.get_extra_info("spiffe_id"),
            "group": transport.get_extra_info("tls_group"),
            "path": request.path,
        }
    )


def test_aiohttp_client_and_web_server_over_the_shell() -> None:
    async def scenario() -> list[Any]:
        app = web.Application()
        app.router.add_get("/{tail:.*}", _whoami)
        runner = web.AppRunner(app)
        await runner.setup()
        server = await create_tls_server(
            runner.server, "127.0.0.1", 0, config=server_svid().config()
        )
        results = []
        try:
            port = server.sockets[0].getsockname()[1]
            connector = TrellisConnector(client_svid().config())
            async with aiohttp.ClientSession(connector=connector) as session:
                for path in ("/one", "/two"):  # the second reuses the pooled connection
                    async with session.get(f"https://localhost:{port}{path}") as response:
                        assert response.status == 200
                        results.append(await response.json())
        finally:
            server.close()
            await server.wait_closed()
            await runner.cleanup()
        return results

    results = run(scenario())
    assert results == [
        {"peer": CLIENT_ID, "group": "X25519MLKEM768", "path": "/one"},
        {"peer": CLIENT_ID, "group": "X25519MLKEM768", "path": "/two"},
    ]


@pytest.mark.parametrize("name", ["sslcontext", "ssl_object"])
def test_ssl_module_extra_info_stays_absent(name: str) -> None:
    async def scenario() -> object:
        server, client, _ = await _protocol_pair()
        async with server:
            assert client.transport is not None
            value = client.transport.get_extra_info(name, "absent")
            client.transport.close()
            return value

    assert run(scenario()) == "absent"
