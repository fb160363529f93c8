"""The engine's limits hold over real loopback sockets, against the asyncio server shell.

The attacker is a plain blocking socket in a worker thread, sending its records one at
a time and looking for an answer after each, so the count it had sent when the server's
alert arrived is exact; every attack stops at a fixed number of records. Meanwhile a
real client on another connection must still complete its handshake.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading

from sidecar.tls import AlertDescription, AlertLevel, HandshakeComplete, TLSError
from sidecar.tls.limits import MAX_WARNING_ALERTS
from sidecar.tls.record import ContentType, plaintext_record
from sidecar.tls.shell import open_tls_connection

from .test_interop_system_fixtures import CLIENT_ID, client_svid, run, server_svid, tls_echo_server

ATTACK_RECORDS = 100_000
ANSWER_WAIT = 10.0  # seconds granted to the answer after the record that must draw it


def _send_until_answered(
    port: int, record: bytes, expected_at: int, started: threading.Event
) -> tuple[int, bytes]:
    """Send `record` up to ATTACK_RECORDS times, stopping as soon as the server says
    anything: (records sent by then, everything the server sent until it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WAIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = 0
        for sent in range(1, ATTACK_RECORDS + 1):
            try:
                sock.sendall(record)
            except OSError:
                break  # closed under us: what it sent before is still to be read
            started.set()
            wait = ANSWER_WAIT if sent == expected_at else 0.0
            if select.select([sock], [], [], wait)[0]:
                break
        answer = bytearray()
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except OSError:
            pass  # a reset after the alert still leaves the alert in `answer`
        return sent, bytes(answer)


async def _ping(port: int) -> bytes:
    reader, writer = await open_tls_connection(
        "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
    )
    writer.write(b"ping\n")
    reply = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return reply


def test_a_user_canceled_flood_is_cut_off_while_another_client_completes_its_handshake() -> None:
    alert = plaintext_record(
        ContentType.alert, bytes((AlertLevel.warning, AlertDescription.user_canceled))
    )

    async def scenario() -> tuple[int, bytes, bytes, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            started = threading.Event()
            attack = asyncio.ensure_future(
                asyncio.to_thread(
                    _send_until_answered, port, alert, MAX_WARNING_ALERTS + 1, started
                )
            )
            assert await asyncio.to_thread(started.wait, ANSWER_WAIT)
            reply = await _ping(port)
            sent, answer = await attack
        return sent, answer, reply, seen

    sent, answer, reply, seen = run(scenario(), timeout=60)
    # The fifth alert in a row is refused, in the clear (no keys yet), and the socket closes.
    assert sent == MAX_WARNING_ALERTS + 1
    assert answer == plaintext_record(
        ContentType.alert, bytes((AlertLevel.fatal, AlertDescription.unexpected_message))
    )
    assert reply == f"pong {CLIENT_ID} X25519MLKEM768\n".encode()
    refusals = [e for e in seen if isinstance(e, TLSError)]
    assert [e.alert for e in refusals] == [AlertDescription.unexpected_message]
    assert sum(isinstance(e, HandshakeComplete) for e in seen) == 1


def test_a_thousand_half_open_connections_do_not_stop_a_handshake_and_time_out_at_ten_seconds() -> (
    None
):
    # A ClientHello's first record header and a few bytes of it, never the rest.
    partial = plaintext_record(ContentType.handshake, bytes(100))[:12]

    async def scenario() -> tuple[bytes, list[bytes | None], list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            half_open = []
            for _ in range(1_000):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(partial)
                half_open.append((reader, writer))
            reply = await _ping(port)

            async def dropped(reader: asyncio.StreamReader) -> bytes | None:
                try:
                    return await asyncio.wait_for(reader.read(), 20)
                except ConnectionResetError:
                    return None

            outcomes = await asyncio.gather(*(dropped(r) for r, _ in half_open))
            for _, writer in half_open:
                writer.close()
        return reply, outcomes, seen

    reply, outcomes, seen = run(scenario(), timeout=90)
    assert reply == f"pong {CLIENT_ID} X25519MLKEM768\n".encode()
    # Each was closed without a byte from the server (b"", or a reset), by the timer.
    assert all(outcome in (b"", None) for outcome in outcomes)
    timeouts = [str(e) for e in seen if isinstance(e, TimeoutError)]
    assert timeouts == ["TLS handshake did not complete within 10s"] * 1_000


def test_user_canceled_then_close_notify_during_the_handshake_closes_before_the_timeout() -> None:
    # RFC 8446 §6.1: user_canceled is followed by close_notify; after it nothing more is
    # read, so the server must not hold the socket until its handshake timeout.
    goodbye = b"".join(
        plaintext_record(ContentType.alert, bytes((AlertLevel.warning, description)))
        for description in (AlertDescription.user_canceled, AlertDescription.close_notify)
    )

    def exchange(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WAIT) as sock:
            sock.sendall(goodbye)
            answer = bytearray()
            while chunk := sock.recv(4096):  # a socket timeout here fails the test
                answer += chunk
            return bytes(answer)

    async def scenario() -> tuple[bytes, list[object]]:
        async with tls_echo_server(server_svid().config(), handshake_timeout=60) as (port, seen):
            answer = await asyncio.to_thread(exchange, port)
        return answer, seen

    answer, seen = run(scenario(), timeout=60)
    assert answer == b""  # closed at once, with nothing to say before keys exist
    assert [type(e).__name__ for e in seen] == ["ConnectionResetError"]
