"""kTLS on a real Linux 6.1 kernel (run inside the QEMU guest, `tests/kernel/guest_vm.py`).

The engine does every handshake over a real loopback TCP connection; then the kernel
takes the record layer over (`sidecar.ktls`) and talks to another kTLS socket, to the
engine's own user-space record layer, or to OpenSSL 4.0 through pyOpenSSL, for each of
the three TLS 1.3 suites. Nothing here is faked.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import time

import pytest

from sidecar import ktls
from sidecar.tls.alerts import AlertDescription
from sidecar.tls.events import ApplicationData, ConnectionClosed, SessionTicket
from sidecar.tls.messages import NewSessionTicket, push_new_session_ticket
from sidecar.tls.record import ContentType

from .peers import (
    SUITES,
    TIMEOUT,
    Background,
    EngineRecv,
    client_engine,
    digest_exactly,
    handshake_one,
    handshake_pair,
    openssl_echo,
    payload,
    read_exactly,
    server_engine,
    tcp_pair,
    to_kernel,
)

SIZES = (1, 16384, 16385, 1 << 18)
SUITE_IDS = [suite.name for suite in SUITES]


def test_the_guest_kernel_offers_the_tls_ulp() -> None:
    ktls._reset_probe()
    assert ktls.probe().available
    assert not ktls.can_rekey(), "these tests prove the Linux < 6.14 KeyUpdate path"


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_two_ktls_sockets_carry_data_both_ways_after_the_engine_handshake(suite: int) -> None:
    client, server = handshake_pair(suite)
    kclient, kserver = to_kernel(client), to_kernel(server)
    for size in SIZES:
        data = payload(size)
        sender = Background(lambda d=data: kclient.sendall(d))  # type: ignore[misc]
        assert read_exactly(kserver.recv, size) == data
        sender.result()
        back = payload(size)
        sender = Background(lambda d=back: kserver.sendall(d))  # type: ignore[misc]
        assert read_exactly(kclient.recv, size) == back
        sender.result()
    # The server's two NewSessionTickets were on the wire before the client switched
    # (one handshake record: the engine flushes a flight's messages together); they
    # come through the kernel as a control record and reach the engine.
    tickets = [e for e in kclient.events if isinstance(e, SessionTicket)]
    assert len(tickets) == 2
    assert kclient.control_records == {ContentType.handshake: 1}
    kclient.close()
    assert kserver.recv(10) == b""
    kserver.close()
    assert kclient.recv(10) == b""


def test_sixty_four_megabytes_arrive_intact_through_two_ktls_sockets() -> None:
    client, server = handshake_pair(suite=SUITES[0])
    kclient, kserver = to_kernel(client), to_kernel(server)
    size = 64 << 20
    block = payload(1 << 20)
    expected = hashlib.sha256(block * 64).hexdigest()

    def send() -> None:
        for _ in range(64):
            kclient.sendall(block)

    sender = Background(send)
    assert digest_exactly(kserver.recv, size) == (size, expected)
    sender.result()
    kclient.close()
    assert kserver.recv(1) == b""


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
@pytest.mark.parametrize("ktls_side", ["client", "server"])
def test_a_ktls_side_talks_to_the_user_space_record_layer(suite: int, ktls_side: str) -> None:
    client, server = handshake_pair(suite)
    kernel_side, user_side = (client, server) if ktls_side == "client" else (server, client)
    ksock = to_kernel(kernel_side)
    user = EngineRecv(user_side)
    for size in SIZES:
        data = payload(size)
        sender = Background(lambda d=data: ksock.sendall(d))  # type: ignore[misc]
        assert read_exactly(user, size) == data
        sender.result()
        back = payload(size)
        sender = Background(lambda d=back: user.send(d))  # type: ignore[misc]
        assert read_exactly(ksock.recv, size) == back
        sender.result()
    ksock.close()
    assert user(1) == b""
    assert user.closed == ConnectionClosed(clean=True)


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
@pytest.mark.parametrize("ktls_side", ["client", "server"])
def test_a_ktls_side_talks_to_openssl(suite: int, ktls_side: str) -> None:
    csock, ssock = tcp_pair()
    if ktls_side == "client":
        peer = Background(lambda: openssl_echo(ssock, server=True))
        side = handshake_one(client_engine(suite), csock)
    else:
        peer = Background(lambda: openssl_echo(csock, server=False))
        side = handshake_one(server_engine(suite), ssock)
    ksock = to_kernel(side)
    sent = 0
    for size in SIZES:
        data = payload(size)
        sender = Background(lambda d=data: ksock.sendall(d))  # type: ignore[misc]
        assert read_exactly(ksock.recv, size) == data
        sender.result()
        sent += size
    ksock.close()
    assert ksock.recv(1) == b""  # OpenSSL answered our close_notify with its own
    assert peer.result() == sent
    if ktls_side == "client":
        # OpenSSL sends two tickets after the handshake; both came through the kernel.
        assert len([e for e in ksock.events if isinstance(e, SessionTicket)]) == 2


def test_a_new_session_ticket_sent_through_the_kernel_reaches_the_engine_client() -> None:
    client, server = handshake_pair(SUITES[0])
    kserver = to_kernel(server)
    user = EngineRecv(client)
    message = NewSessionTicket(3600, 7, b"\x09", b"opaque-ticket-sent-after-the-switch", ())
    kserver.send_control(ContentType.handshake, push_new_session_ticket(message))
    kserver.sendall(b"after")
    assert read_exactly(user, 5) == b"after"
    # Two from the handshake, one sent by the kernel.
    assert [t.ticket for t in user.tickets][-1] == b"opaque-ticket-sent-after-the-switch"
    assert len(user.tickets) == 3


def test_a_new_session_ticket_received_after_the_switch_reaches_the_engine() -> None:
    client, server = handshake_pair(SUITES[1])
    kclient = to_kernel(client)
    kserver = to_kernel(server)
    message = NewSessionTicket(60, 1, b"\x05", b"second-generation", ())
    kserver.send_control(ContentType.handshake, push_new_session_ticket(message))
    kserver.sendall(b"x")
    assert kclient.recv(10) == b"x"
    tickets = [e.ticket for e in kclient.events if isinstance(e, SessionTicket)]
    assert tickets[-1] == b"second-generation"
    assert len(tickets) == 3


@pytest.mark.parametrize("requested", [True, False])
def test_a_key_update_received_on_linux_6_1_closes_cleanly_and_is_counted(
    requested: bool,
) -> None:
    client, server = handshake_pair(SUITES[2])
    kclient = to_kernel(client)
    user = EngineRecv(server)
    before = ktls.STATS.key_update_closes
    user.send(b"before")
    assert read_exactly(kclient.recv, 6) == b"before"
    server.conn.update_key(request_peer_update=requested)
    server.sock.sendall(server.conn.data_to_send())
    assert kclient.recv(10) == b""
    assert ktls.STATS.key_update_closes == before + 1
    assert kclient.write_closed
    # The peer sees close_notify under the key it still reads with.
    assert user(1) == b""
    assert user.closed == ConnectionClosed(clean=True)


def test_linux_6_1_refuses_a_second_receive_key() -> None:
    """Why the KeyUpdate path closes: 6.1 has no TLS 1.3 rekeying (it came in 6.14)."""
    client, server = handshake_pair(SUITES[0])
    kclient = to_kernel(client)
    to_kernel(server)
    secrets = client.conn.traffic_secrets()
    info = ktls.crypto_info(secrets.cipher_suite, secrets.read)
    with pytest.raises(OSError) as refused:
        kclient.sock.setsockopt(ktls.SOL_TLS, ktls.TLS_RX, info)
    assert refused.value.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL)


def test_close_notify_from_the_peer_ends_a_ktls_read_and_a_fatal_alert_raises() -> None:
    client, server = handshake_pair(SUITES[0])
    kclient = to_kernel(client)
    user = EngineRecv(server)
    server.conn.close()
    server.sock.sendall(server.conn.data_to_send())
    assert kclient.recv(10) == b""
    assert kclient.read_closed

    client2, server2 = handshake_pair(SUITES[0])
    kserver = to_kernel(server2)
    kclient2 = to_kernel(client2)
    kserver.send_alert(AlertDescription.internal_error, fatal=True)
    with pytest.raises(ktls.KtlsClosed):
        kclient2.recv(10)
    del user


@pytest.mark.parametrize("suite", SUITES, ids=SUITE_IDS)
def test_the_kernel_writes_real_tls_records_the_engine_can_open(suite: int) -> None:
    client, server = handshake_pair(suite)
    kclient = to_kernel(client)
    message = payload(20000)  # more than one record: 16384 + 3616
    kclient.sendall(message)
    raw = b""
    deadline = time.monotonic() + TIMEOUT
    while len(raw) < 2 * 5 + 20000 + 2 * 17 and time.monotonic() < deadline:
        raw += server.sock.recv(1 << 16)
    # Parse the records by hand: opaque type 23, legacy version 0x0303, and lengths of
    # plaintext + content type byte + 16-byte tag (RFC 8446 §5.2).
    lengths = []
    pos = 0
    while pos < len(raw):
        assert raw[pos : pos + 3] == b"\x17\x03\x03"
        length = int.from_bytes(raw[pos + 3 : pos + 5], "big")
        lengths.append(length)
        pos += 5 + length
    assert pos == len(raw)
    assert lengths == [16384 + 1 + 16, 3616 + 1 + 16]
    # The engine's record layer, at the sequence number the kernel continued from.
    server.conn.receive_data(raw)
    opened = b"".join(e.data for e in server.conn.take_events() if isinstance(e, ApplicationData))
    assert opened == message


def test_a_ktls_socket_serves_asyncio_reads_and_writes() -> None:
    import asyncio

    client, server = handshake_pair(SUITES[0])
    kclient, kserver = to_kernel(client), to_kernel(server)

    async def exchange() -> bytes:
        a, b = ktls.KtlsStream(kclient), ktls.KtlsStream(kserver)
        data = payload(300_000)
        writer = asyncio.create_task(a.write(data))
        got = bytearray()
        for _ in range(10_000):
            if len(got) >= len(data):
                break
            got += await b.read(1 << 16)
        await writer
        await a.close()
        assert await b.read(1) == b""
        return bytes(got) if bytes(got) == data else b"mismatch"

    assert asyncio.run(asyncio.wait_for(exchange(), TIMEOUT)) != b"mismatch"


def test_a_record_the_engine_read_in_part_is_finished_and_delivered_before_the_kernel_reads() -> (
    None
):
    client, server = handshake_pair(SUITES[0])
    user = EngineRecv(server)
    first = payload(20000)
    user.send(first)  # two records after the server's ticket record
    sock = client.sock
    header = sock.recv(5, socket.MSG_PEEK | socket.MSG_WAITALL)
    ticket_record = 5 + int.from_bytes(header[3:5], "big")
    # The engine reads the ticket record and 10 bytes of the first data record.
    client.conn.receive_data(read_exactly(sock.recv, ticket_record + 10))
    assert client.conn.record_bytes_awaited() > 0
    kclient = ktls.attach(sock, client.conn)
    assert read_exactly(kclient.recv, len(first)) == first
    assert [type(e).__name__ for e in kclient.events] == ["SessionTicket", "SessionTicket"]
    user.send(b"then the kernel")
    assert read_exactly(kclient.recv, 15) == b"then the kernel"
