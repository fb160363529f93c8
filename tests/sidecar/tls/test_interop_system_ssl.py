"""Real peer: the interpreter's `ssl` module (system OpenSSL 3.0) through asyncio.

`asyncio.open_connection(ssl=...)` against our server and `asyncio.start_server(ssl=...)`
against our client, in the same event loop, mutual TLS with SVIDs from `ca`. The
server SVID carries the DNS SAN `localhost`, so the `ssl` client checks the hostname.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from sidecar.tls import AlertDescription, TLSError
from sidecar.tls.shell import PeerAlertError, open_tls_connection

from .test_interop_system_fixtures import (
    CLIENT_ID,
    SERVER_ID,
    Svid,
    client_svid,
    foreign_svid,
    run,
    server_svid,
    tls_echo_server,
)


def client_context(ident: Svid | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(server_svid().bundle)
    if ident is not None:
        ctx.load_cert_chain(ident.cert, ident.key_file)  # leaf and intermediate
    return ctx


def server_context() -> ssl.SSLContext:
    ident = server_svid()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ident.bundle)
    ctx.load_cert_chain(ident.cert, ident.key_file)
    return ctx


def test_ssl_client_with_hostname_check_talks_to_our_server() -> None:
    async def scenario() -> tuple[bytes, tuple[str, str, int], list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(client_svid()), server_hostname="localhost"
            )
            cipher = writer.get_extra_info("cipher")
            writer.write(b"ping\n")
            reply = await reader.readline()
            writer.close()
        return reply, cipher, seen

    reply, cipher, seen = run(scenario())
    assert reply == f"pong {CLIENT_ID} x25519\n".encode()
    assert cipher[1] == "TLSv1.3"
    assert str(seen[0].peer_spiffe_id) == CLIENT_ID  # type: ignore[attr-defined]


def test_ssl_client_without_a_certificate_reads_certificate_required() -> None:
    async def scenario() -> tuple[BaseException, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(None), server_hostname="localhost"
            )
            writer.write(b"ping\n")
            with pytest.raises(ssl.SSLError) as info:
                await reader.readline()
            writer.close()
        return info.value, seen

    error, seen = run(scenario())
    assert "CERTIFICATE_REQUIRED" in str(error)
    assert [e.alert for e in seen if isinstance(e, TLSError)] == [
        AlertDescription.certificate_required
    ]


def test_our_client_talks_to_an_ssl_server_that_requires_client_certificates() -> None:
    async def scenario() -> tuple[dict[str, object], bytes, object]:
        peer_certs: list[object] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer_certs.append(writer.get_extra_info("peercert"))
            line = await reader.readline()
            writer.write(b"pong " + line)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context())
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
            )
            info = {k: writer.get_extra_info(k) for k in ("tls_group", "spiffe_id", "cipher")}
            writer.write(b"ping\n")
            reply = await reader.readline()
            writer.close()
        return info, reply, peer_certs[0]

    info, reply, peercert = run(scenario())
    assert reply == b"pong ping\n"
    assert info["spiffe_id"] == SERVER_ID
    assert info["tls_group"] == "x25519"
    assert ("URI", CLIENT_ID) in peercert["subjectAltName"]  # type: ignore[index]


def _blocking_ssl_server(listener: socket.socket) -> BaseException | None:
    # A blocking SSLSocket writes OpenSSL's alert to the socket before raising
    # (asyncio's SSL transport drops the connection without flushing it).
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        try:
            with server_context().wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except ssl.SSLError as exc:
            return exc
    return None


def test_an_ssl_server_refuses_our_client_from_another_trust_domain() -> None:
    async def scenario() -> tuple[BaseException, BaseException | None]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(10)
            port = listener.getsockname()[1]
            server = asyncio.create_task(asyncio.to_thread(_blocking_ssl_server, listener))
            config = foreign_svid().config(trust_bundles={"example.org": list(server_svid().roots)})
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=config, server_name="localhost"
            )
            # TLS 1.3: our handshake is over before the server judges our certificate.
            with pytest.raises(PeerAlertError) as info:
                await reader.read()
            writer.close()
            server_error = await server
        return info.value, server_error

    error, server_error = run(scenario())
    assert isinstance(error, PeerAlertError)
    assert error.alert == AlertDescription.unknown_ca
    assert "certificate verify failed" in str(server_error)
