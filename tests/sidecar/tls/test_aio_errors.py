"""Failure paths of the asyncio shell over real loopback sockets.

Garbage, a TLS 1.2-only peer, a missing client certificate, a foreign trust domain, a
policy refusal, a stalled handshake, a reset mid-stream and a tampered record. In each
case the side that detects the problem sends its alert before closing, and the caller
gets an exception that names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

import pytest

from sidecar.tls import AlertDescription, AlertLevel, AlertReceived, ApplicationData, TLSError
from sidecar.tls.shell import PeerAlertError, open_tls_connection, start_tls_server

from .test_interop_system_fixtures import (
    CLIENT_ID,
    client_svid,
    foreign_svid,
    openssl_args,
    peer_process,
    run,
    server_svid,
    tls_echo_server,
)

ALERT_RECORD = 0x15


def _alerts(seen: list[object]) -> list[object]:
    return [e.alert if isinstance(e, TLSError) else type(e).__name__ for e in seen if e]


async def _raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return response


def test_a_plaintext_http_request_gets_an_alert_before_the_close() -> None:
    async def scenario() -> tuple[bytes, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            response = await _raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.05)
        return response, seen

    response, seen = run(scenario())
    # A plaintext fatal alert record: type 21, version 0x0303, length 2, level 2.
    assert response[:1] == bytes([ALERT_RECORD]) and response[5] == 2, response
    assert len(seen) == 1 and isinstance(seen[0], TLSError)
    assert response[6] == seen[0].alert


def test_our_client_against_a_garbage_server_raises_and_sends_its_alert() -> None:
    async def scenario() -> tuple[BaseException, bytes]:
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(5)  # the ClientHello's record header
            writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            received.set_result(await asyncio.wait_for(reader.read(), 5))
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(TLSError) as info:
                await open_tls_connection("127.0.0.1", port, config=client_svid().config())
            rest = await received
        return info.value, rest

    error, rest = run(scenario())
    assert isinstance(error, TLSError)
    assert bytes([ALERT_RECORD, 3, 3, 0, 2, 2, error.alert]) in rest


def test_a_tls12_only_server_refuses_our_client_with_protocol_version() -> None:
    # We offer only TLS 1.3 (supported_versions), so OpenSSL limited to 1.2 ends it.
    async def scenario() -> tuple[BaseException, str]:
        ident = server_svid()
        argv = openssl_args(
            "s_server",
            "-accept",
            "127.0.0.1:0",
            "-tls1_2",
            "-cert",
            ident.leaf_file,
            "-key",
            ident.key_file,
            "-msg",
        )
        async with peer_process(*argv) as server:
            line = await server.wait_for_line(b"ACCEPT")
            port = int(line.rsplit(b":", 1)[1])
            with pytest.raises(PeerAlertError) as info:
                await open_tls_connection("127.0.0.1", port, config=client_svid().config())
            await asyncio.sleep(0.2)
            server.process.kill()
            _, output = await server.finish()
        return info.value, output

    error, output = run(scenario())
    assert isinstance(error, PeerAlertError)
    assert error.alert == AlertDescription.protocol_version
    assert "unsupported protocol" in output, output


def test_our_client_without_a_certificate_reads_certificate_required() -> None:
    async def scenario() -> tuple[BaseException, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            config = client_svid().config(certificate_chain=(), private_key=None)
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=config, server_name="localhost"
            )
            # TLS 1.3: the client is done before the server judges the (empty) Certificate.
            with pytest.raises(PeerAlertError) as info:
                await reader.read()
            writer.close()
            await asyncio.sleep(0.05)
        return info.value, seen

    error, seen = run(scenario())
    assert isinstance(error, PeerAlertError)
    assert error.alert == AlertDescription.certificate_required
    assert _alerts(seen) == [AlertDescription.certificate_required]


def test_a_client_from_another_trust_domain_is_refused_with_unknown_ca() -> None:
    async def scenario() -> tuple[BaseException, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            config = foreign_svid().config(trust_bundles={"example.org": server_svid().roots})
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=config, server_name="localhost"
            )
            with pytest.raises(PeerAlertError) as info:
                await reader.read()
            writer.close()
            await asyncio.sleep(0.05)
        return info.value, seen

    error, seen = run(scenario())
    assert getattr(error, "alert", None) == AlertDescription.unknown_ca
    assert _alerts(seen) == [AlertDescription.unknown_ca]


def test_a_server_the_policy_refuses_is_access_denied_at_the_client() -> None:
    async def scenario() -> tuple[BaseException, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            config = client_svid().config(peer_policy=lambda spiffe_id: str(spiffe_id) == CLIENT_ID)
            with pytest.raises(TLSError) as info:
                await open_tls_connection("127.0.0.1", port, config=config)
            await asyncio.sleep(0.05)
        return info.value, seen

    error, seen = run(scenario())
    assert isinstance(error, TLSError) and error.alert == AlertDescription.access_denied
    assert [getattr(e, "alert", None) for e in seen] == [AlertDescription.access_denied]
    assert isinstance(seen[0], PeerAlertError)  # the server heard about it


def test_a_silent_client_is_dropped_after_the_handshake_timeout() -> None:
    async def scenario() -> tuple[bytes, float, list[object]]:
        loop = asyncio.get_running_loop()
        async with tls_echo_server(server_svid().config(), handshake_timeout=0.3) as (port, seen):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = loop.time()
            data = await asyncio.wait_for(reader.read(), 5)
            elapsed = loop.time() - started
            writer.close()
        return data, elapsed, seen

    data, elapsed, seen = run(scenario())
    assert data == b""
    assert 0.25 < elapsed < 3
    assert _alerts(seen) == ["TimeoutError"]


def test_our_client_gives_up_on_a_silent_server_after_the_handshake_timeout() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            started = loop.time()
            with pytest.raises(TimeoutError, match="TLS handshake did not complete"):
                await open_tls_connection(
                    "127.0.0.1", port, config=client_svid().config(), handshake_timeout=0.3
                )
            return loop.time() - started

    assert 0.25 < run(scenario()) < 3


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_a_client_reset_mid_stream_is_a_connection_reset_for_the_server() -> None:
    async def scenario() -> tuple[bytes, BaseException | None]:
        got_first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got_first.set_result(await reader.readexactly(5))
            try:
                await reader.read()
                outcome.set_result(None)
            except ConnectionError as exc:
                outcome.set_result(exc)
            writer.close()

        server = await start_tls_server(handle, "127.0.0.1", 0, config=server_svid().config())
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await open_tls_connection(
                "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
            )
            writer.write(b"first")
            first = await asyncio.wait_for(got_first, 5)
            _reset(writer)
            return first, await asyncio.wait_for(outcome, 5)

    first, error = run(scenario())
    assert first == b"first"
    assert isinstance(error, ConnectionResetError)


def test_a_server_reset_mid_stream_is_a_connection_reset_for_the_client() -> None:
    async def scenario() -> BaseException:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"partial")
            await writer.drain()
            await asyncio.sleep(0.1)
            _reset(writer)

        server = await start_tls_server(handle, "127.0.0.1", 0, config=server_svid().config())
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
            )
            assert await reader.readexactly(7) == b"partial"
            with pytest.raises(ConnectionResetError) as info:
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return info.value

    assert isinstance(run(scenario()), ConnectionResetError)


def test_a_record_tampered_with_in_transit_is_bad_record_mac_on_both_sides() -> None:
    """A proxy flips one bit in the first application-data record after the handshake."""

    async def scenario() -> tuple[BaseException, list[object]]:
        async def pipe(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tamper: bool
        ) -> None:
            buffered = b""
            app_records = 0
            while data := await reader.read(65536):
                buffered += data
                out = bytearray()
                while len(buffered) >= 5 and len(buffered) >= 5 + (
                    n := int.from_bytes(buffered[3:5])
                ):
                    record, buffered = bytearray(buffered[: 5 + n]), buffered[5 + n :]
                    if tamper and record[0] == 0x17:
                        app_records += 1
                        if app_records == 2:  # the client's flight, then its first data
                            record[-1] ^= 1
                    out += record
                writer.write(bytes(out))
            writer.close()

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
            await asyncio.gather(
                pipe(reader, up_writer, tamper=True),
                pipe(up_reader, writer, tamper=False),
                return_exceptions=True,
            )

        async with tls_echo_server(server_svid().config()) as (upstream, seen):
            proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
            async with proxy:
                port = proxy.sockets[0].getsockname()[1]
                reader, writer = await open_tls_connection(
                    "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
                )
                writer.write(b"ping\n")
                with pytest.raises(PeerAlertError) as info:
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()
            await asyncio.sleep(0.05)
        return info.value, seen

    error, seen = run(scenario())
    assert getattr(error, "alert", None) == AlertDescription.bad_record_mac
    assert [getattr(e, "alert", None) for e in seen[1:]] == [AlertDescription.bad_record_mac]


# --- closing after a fatal alert (issue 23, deviation 6) --------------------------------

BACKLOG = 1 << 20  # what the server writes before the peer reads anything
JUNK_AFTER_ATTACK = 32 * 1024  # what the peer keeps writing after its bad record
JUNK_PAUSE = 0.01
PEER_WAIT = 10.0
FLOOD = 16 << 20


def _peer_that_keeps_writing(
    port: int, junk: int = JUNK_AFTER_ATTACK, pause: float = JUNK_PAUSE
) -> tuple[list[object], int]:
    """An engine client on a blocking socket with a small receive buffer: it completes
    the handshake, reads nothing of what the server then sends, sends one tampered
    record and 32 KiB more in 1 KiB writes 10 ms apart, then reads until EOF or reset. Returns the
    engine events it decrypted after the handshake and the bytes of junk it got out."""
    from sidecar.tls import ClientConnection

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.settimeout(PEER_WAIT)
    sock.connect(("127.0.0.1", port))
    with sock:
        tls = ClientConnection(client_svid().config(), server_name="localhost", now=time.time())
        sock.sendall(tls.data_to_send())
        for _ in range(100):
            if tls.handshake_complete:
                break
            tls.receive_data(sock.recv(65536), now=time.time())
            sock.sendall(tls.data_to_send())
        assert tls.handshake_complete
        list(tls.events())
        tls.send_application_data(b"ping\n")
        record = bytearray(tls.data_to_send())
        record[-1] ^= 1  # RFC 8446 §5.2: the server must answer bad_record_mac
        sent = 0
        try:
            sock.sendall(bytes(record))
            for _ in range(junk // 1024):
                # Spread out, so most of it arrives after the server read the bad record.
                if pause:
                    time.sleep(pause)
                sock.sendall(b"\x17\x03\x03\x04\x00" + bytes(1019))
                sent += 1024
        except OSError:
            pass  # reset under us: what the server sent before is still to be read
        events: list[object] = []
        received = 0
        try:
            while received <= 4 * BACKLOG and (chunk := sock.recv(65536)):
                received += len(chunk)
                tls.receive_data(chunk)
                events.extend(tls.events())
        except (OSError, TLSError) as exc:
            events.append(exc)
        return events, sent


def test_a_peer_that_keeps_writing_after_its_bad_record_still_reads_the_fatal_alert() -> None:
    """The server half-closes after its alert and drains the peer's bytes for a bounded
    time, so unread bytes never make its kernel reset the connection and drop the alert
    still queued behind 1 MiB the peer had not read yet."""

    async def scenario() -> tuple[list[object], int, list[object]]:
        seen: list[object] = []

        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"x" * BACKLOG)
            try:
                await asyncio.wait_for(reader.read(), PEER_WAIT)
            except (ConnectionError, TLSError) as exc:
                seen.append(exc)
            finally:
                writer.close()

        server = await start_tls_server(
            flood, "127.0.0.1", 0, config=server_svid().config(), handshake_timeout=PEER_WAIT
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            events, sent = await asyncio.to_thread(_peer_that_keeps_writing, port)
        return events, sent, seen

    events, sent, seen = run(scenario())
    assert [getattr(e, "alert", None) for e in seen] == [AlertDescription.bad_record_mac]
    alerts = [e for e in events if isinstance(e, AlertReceived)]
    assert alerts == [AlertReceived(AlertLevel.fatal, AlertDescription.bad_record_mac)], [
        type(e).__name__ if isinstance(e, Exception) else e for e in events[-3:]
    ]
    assert sum(len(e.data) for e in events if isinstance(e, ApplicationData)) == BACKLOG
    assert sent == JUNK_AFTER_ATTACK  # the server kept reading while the peer wrote


def test_a_peer_flooding_after_the_fatal_alert_is_cut_off_after_64_kib() -> None:
    """The drain is bounded: a peer that writes 16 MiB at full speed after its bad record
    is reset once the server has dropped 64 KiB of it, not read for a whole second."""

    async def scenario() -> tuple[list[object], int]:
        async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, TLSError, TimeoutError):
                await asyncio.wait_for(reader.read(), PEER_WAIT)
            writer.close()

        server = await start_tls_server(
            idle, "127.0.0.1", 0, config=server_svid().config(), handshake_timeout=PEER_WAIT
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.to_thread(_peer_that_keeps_writing, port, FLOOD, 0.0)

    events, sent = run(scenario())
    assert sent < FLOOD, "the server read the whole flood"
    alerts = [e for e in events if isinstance(e, AlertReceived)]
    assert alerts == [AlertReceived(AlertLevel.fatal, AlertDescription.bad_record_mac)]
