"""GREASE (RFC 8701) against real OpenSSL peers over loopback, both directions:
OpenSSL 4.0 through pyOpenSSL and the system OpenSSL 3.0 (`openssl s_server/s_client`).

Our greasing client goes through a recording relay, so each test also shows that the
ClientHello the peer accepted carried a GREASE value in every position (RFC 8701 §3.1).
Our greasing server sends GREASE in CertificateRequest and NewSessionTicket (§4); those
are encrypted, so a spy on the engine's outgoing handshake messages shows them, while the
peer's completed handshake (and its reading of the tickets) shows it ignored them.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from OpenSSL import SSL

from sidecar.tls import AlertDescription, TLSError
from sidecar.tls.extensions import pull_extensions
from sidecar.tls.grease import is_grease
from sidecar.tls.keyschedule import Transcript
from sidecar.tls.messages import HandshakeType
from sidecar.tls.shell import open_tls_connection
from sidecar.tls.tickets import Stek, StekRing

from .grease_support import ALL_POSITIONS, first_client_hello, grease_positions, recording_relay
from .test_interop_system_fixtures import (
    CLIENT_ID,
    SERVER_ID,
    client_svid,
    peer_process,
    run,
    server_svid,
    tls_echo_server,
)
from .test_interop_system_openssl import s_client, s_server
from .test_interop_system_pyopenssl_socket import (
    TIMEOUT,
    _blocking,
    _context,
    _pyopenssl_client,
)


def _ring() -> StekRing:
    """A STEK ring valid around the real clock (OpenSSL peers live on it)."""
    now = time.time()
    ring = StekRing()
    ring.install(Stek(os.urandom(16), os.urandom(32), now - 60, now + 3600), (), None)
    return ring


def _greasing_server_config() -> object:
    return server_svid().config(grease=True, ticket_ring=_ring())


def _spy_sent(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[bytes]]:
    """Handshake messages our engine sends, by type, before they are encrypted."""
    import sidecar.tls.connection as connection

    sent: dict[int, list[bytes]] = {}
    real = connection._Context.send

    def spy(self: connection._Context, transcript: Transcript, message: bytes) -> None:
        sent.setdefault(message[0], []).append(message[4:])
        real(self, transcript, message)

    monkeypatch.setattr(connection._Context, "send", spy)
    return sent


def _assert_server_greased(sent: dict[int, list[bytes]]) -> None:
    (request,) = sent[HandshakeType.certificate_request]
    # CertificateRequest: context<0..255>, then the extensions block.
    extensions = _extensions_after(request, 1 + request[0])
    assert any(is_grease(t) for t, _ in extensions)
    assert sent[HandshakeType.new_session_ticket]
    for ticket in sent[HandshakeType.new_session_ticket]:
        nonce_at = 8
        ticket_at = nonce_at + 1 + ticket[nonce_at]
        ext_at = ticket_at + 2 + int.from_bytes(ticket[ticket_at : ticket_at + 2], "big")
        assert any(is_grease(t) for t, _ in _extensions_after(ticket, ext_at))


def _extensions_after(body: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    from sidecar.tls.codec import Buffer

    buf = Buffer(body[offset:])
    return pull_extensions(buf)


# --- OpenSSL 4.0 (pyOpenSSL) ------------------------------------------------------------


def _alpn_server(listener: socket.socket, pick: str) -> bytes:
    """One pyOpenSSL server connection whose ALPN callback picks `pick`: "h2", or
    "grease" (the client's reserved id, which no server may select)."""
    sock, _ = listener.accept()
    _blocking(sock)
    ctx = _context(server_svid(), server=True)
    offered: list[bytes] = []

    def select(_conn: SSL.Connection, protos: list[bytes]) -> bytes:
        offered.extend(protos)
        if pick == "grease":
            return next(p for p in protos if len(p) == 2 and is_grease(int.from_bytes(p, "big")))
        return b"h2"

    ctx.set_alpn_select_callback(select)
    conn = SSL.Connection(ctx, sock)
    conn.set_accept_state()
    try:
        conn.do_handshake()
        conn.sendall(b"pong from openssl\n")
        conn.shutdown()
    except SSL.Error:
        pass
    finally:
        conn.close()
    return b",".join(offered)


async def _us_through_relay_to(
    port: int, config_overrides: dict[str, object]
) -> tuple[bytes, bytes | TLSError]:
    async with recording_relay(port) as (relay_port, recordings):
        config = client_svid().config(grease=True, alpn_protocols=("h2",), **config_overrides)
        try:
            reader, writer = await open_tls_connection(
                "127.0.0.1", relay_port, config=config, server_name="localhost"
            )
        except TLSError as exc:
            return bytes(recordings[0].to_server), exc
        reply = await asyncio.wait_for(reader.readline(), TIMEOUT)
        assert writer.get_extra_info("spiffe_id") == SERVER_ID
        assert writer.get_extra_info("alpn_protocol") in ("h2", None)
        writer.close()
    return bytes(recordings[0].to_server), reply


def test_an_openssl4_server_accepts_our_client_hello_with_grease_in_every_position() -> None:
    async def scenario() -> tuple[bytes, bytes | TLSError, bytes]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(TIMEOUT)
            server = asyncio.create_task(asyncio.to_thread(_alpn_server, listener, "h2"))
            wire, reply = await _us_through_relay_to(listener.getsockname()[1], {})
            return wire, reply, await server

    wire, reply, offered = run(scenario())
    assert reply == b"pong from openssl\n"
    assert grease_positions(first_client_hello(wire)) == ALL_POSITIONS
    assert offered.startswith(b"h2,")  # OpenSSL saw our GREASE ALPN id and passed it over


def test_an_openssl4_server_selecting_our_grease_alpn_id_is_refused() -> None:
    async def scenario() -> bytes | TLSError:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(TIMEOUT)
            server = asyncio.create_task(asyncio.to_thread(_alpn_server, listener, "grease"))
            _, outcome = await _us_through_relay_to(listener.getsockname()[1], {})
            await server
            return outcome

    outcome = run(scenario())
    assert isinstance(outcome, TLSError), outcome
    assert outcome.alert == AlertDescription.illegal_parameter


def test_an_openssl4_client_ignores_the_grease_our_server_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = _spy_sent(monkeypatch)

    async def scenario() -> object:
        async with tls_echo_server(_greasing_server_config()) as (port, seen):  # type: ignore[arg-type]
            view = await asyncio.to_thread(_pyopenssl_client, port, None)
        assert str(seen[0].peer_spiffe_id) == CLIENT_ID  # type: ignore[attr-defined]
        return view

    view = run(scenario())
    assert view.received.startswith(f"pong {CLIENT_ID} ".encode())  # type: ignore[attr-defined]
    _assert_server_greased(sent)


# --- the system OpenSSL 3.0 (openssl s_server / s_client) ------------------------------


def test_openssl3_s_server_accepts_our_client_hello_with_grease_in_every_position() -> None:
    async def scenario() -> tuple[bytes, bytes | TLSError, str]:
        async with peer_process(*s_server("-tls1_3", "-alpn", "h2")) as server:
            line = await server.wait_for_line(b"ACCEPT")
            port = int(line.rsplit(b":", 1)[1])
            async with recording_relay(port) as (relay_port, recordings):
                config = client_svid().config(grease=True, alpn_protocols=("h2",))
                reader, writer = await open_tls_connection(
                    "127.0.0.1", relay_port, config=config, server_name="localhost"
                )
                alpn = writer.get_extra_info("alpn_protocol")
                writer.write(b"GET / HTTP/1.0\r\n\r\n")
                page = await asyncio.wait_for(reader.read(), TIMEOUT)
                writer.close()
            server.process.kill()
            _, output = await server.finish()
            assert alpn == "h2", output
        return bytes(recordings[0].to_server), page, output

    wire, page, output = run(scenario())
    assert isinstance(page, bytes) and b"Protocol  : TLSv1.3" in page, output
    assert grease_positions(first_client_hello(wire)) == ALL_POSITIONS


def test_openssl3_s_client_ignores_the_grease_our_server_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = _spy_sent(monkeypatch)

    async def scenario() -> tuple[int, str]:
        async with tls_echo_server(_greasing_server_config()) as (port, _):  # type: ignore[arg-type]
            argv = s_client(port, client_svid(), "-tls1_3")
            async with peer_process(*argv) as peer:
                peer.send(b"ping\n")
                peer.close_stdin()
                return await peer.finish()

    code, output = run(scenario())
    assert code == 0, output
    assert f"pong {CLIENT_ID}" in output
    assert "NewSessionTicket" in output  # s_client read our tickets (with their GREASE)
    assert "Verify return code: 0 (ok)" in output
    _assert_server_greased(sent)


def test_openssl3_s_server_asking_for_p256_takes_our_second_greased_client_hello() -> None:
    """After a HelloRetryRequest the second ClientHello keeps every GREASE value except
    the GREASE key share: RFC 8446 §4.1.2 wants exactly one share, for the asked group."""

    async def scenario() -> tuple[bytes, str]:
        async with peer_process(*s_server("-tls1_3", "-groups", "P-256")) as server:
            line = await server.wait_for_line(b"ACCEPT")
            port = int(line.rsplit(b":", 1)[1])
            async with recording_relay(port) as (relay_port, recordings):
                config = client_svid().config(grease=True, alpn_protocols=("h2",))
                reader, writer = await open_tls_connection(
                    "127.0.0.1", relay_port, config=config, server_name="localhost"
                )
                assert writer.get_extra_info("tls_group") == "secp256r1"
                writer.write(b"GET / HTTP/1.0\r\n\r\n")
                page = await asyncio.wait_for(reader.read(), TIMEOUT)
                writer.close()
            server.process.kill()
            _, output = await server.finish()
        assert b"Shared groups: secp256r1" in page, output
        return bytes(recordings[0].to_server), output

    wire, output = run(scenario())
    assert output.count("ClientHello") >= 2, output
    first = first_client_hello(wire)
    # The second ClientHello follows the first record (and a change_cipher_spec record).
    rest = wire[5 + int.from_bytes(wire[3:5], "big") :]
    while rest[:1] == b"\x14":
        rest = rest[5 + int.from_bytes(rest[3:5], "big") :]
    second = first_client_hello(rest)
    positions = grease_positions(second)
    assert positions == {**ALL_POSITIONS, "key_share": False}, positions
    assert second.cipher_suites == first.cipher_suites  # the same GREASE suite again
