"""Real peer: OpenSSL 4.0 (cryptography's, through pyOpenSSL) over a loopback socket.

The in-memory pairs live in test_interop_pyopenssl.py; these run the same peer through
the asyncio shell on a real TCP socket, both directions, where OpenSSL 4.0 negotiates
X25519MLKEM768 by default (read back with SSL_get0_group_name).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from sidecar.tls.shell import open_tls_connection

from .test_interop_system_fixtures import (
    CLIENT_ID,
    SERVER_ID,
    Svid,
    client_svid,
    run,
    server_svid,
    tls_echo_server,
)

TIMEOUT = 10.0


def _blocking(sock: socket.socket) -> socket.socket:
    """pyOpenSSL needs a blocking socket (a Python timeout makes it non-blocking); the
    kernel's own timeouts keep a stuck peer bounded."""
    sock.settimeout(None)
    timeval = struct.pack("ll", int(TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    return sock


def _context(ident: Svid, server: bool, groups: bytes | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD if server else SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(ident.cert)  # leaf, then the intermediate it sends
    ctx.use_privatekey_file(ident.key_file)
    ctx.load_verify_locations(ident.bundle)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: args[-1])
    if groups is not None:
        assert lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1
    return ctx


def _group(conn: SSL.Connection) -> str:
    return ffi.string(lib.SSL_get0_group_name(conn._ssl)).decode()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class OpenSSLView:
    group: str
    peer_uri: str
    received: bytes


def _peer_uri(conn: SSL.Connection) -> str:
    cert = conn.get_peer_certificate(as_cryptography=True)
    assert cert is not None
    from cryptography import x509

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _readline(conn: SSL.Connection) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = conn.recv(4096)
        except SSL.ZeroReturnError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _pyopenssl_client(port: int, groups: bytes | None) -> OpenSSLView:
    sock = _blocking(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
    conn = SSL.Connection(_context(client_svid(), server=False, groups=groups), sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    try:
        conn.do_handshake()
        conn.sendall(b"ping\n")
        reply = _readline(conn)
        return OpenSSLView(_group(conn), _peer_uri(conn), reply)
    finally:
        conn.close()


def _pyopenssl_server(listener: socket.socket) -> OpenSSLView:
    sock, _ = listener.accept()
    _blocking(sock)
    conn = SSL.Connection(_context(server_svid(), server=True), sock)
    conn.set_accept_state()
    try:
        conn.do_handshake()
        request = _readline(conn)
        conn.sendall(b"pong from openssl\n")
        conn.shutdown()
        return OpenSSLView(_group(conn), _peer_uri(conn), request)
    finally:
        conn.close()


def _client_run(groups: bytes | None) -> tuple[OpenSSLView, list[object]]:
    async def scenario() -> tuple[OpenSSLView, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            view = await asyncio.to_thread(_pyopenssl_client, port, groups)
        return view, seen

    return run(scenario())


def test_openssl4_client_negotiates_x25519mlkem768_with_our_server_over_tcp() -> None:
    view, seen = _client_run(None)
    assert view.group == "X25519MLKEM768"
    assert view.peer_uri == SERVER_ID
    assert view.received == f"pong {CLIENT_ID} X25519MLKEM768\n".encode()
    assert str(seen[0].peer_spiffe_id) == CLIENT_ID  # type: ignore[attr-defined]


def test_openssl4_client_with_x25519_only_negotiates_x25519_over_tcp() -> None:
    view, _ = _client_run(b"X25519")
    assert view.group == "x25519"
    assert view.received.endswith(b" x25519\n")


def test_our_client_negotiates_x25519mlkem768_with_an_openssl4_server_over_tcp() -> None:
    async def scenario() -> tuple[dict[str, object], bytes, OpenSSLView]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(TIMEOUT)
            port = listener.getsockname()[1]
            server = asyncio.create_task(asyncio.to_thread(_pyopenssl_server, listener))
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
            )
            info = {k: writer.get_extra_info(k) for k in ("tls_group", "spiffe_id")}
            writer.write(b"ping\n")
            reply = await reader.readline()
            eof = await reader.read()  # the server's close_notify
            info["tickets"] = len(writer.get_extra_info("tls_session_tickets"))
            writer.close()
            view = await server
        return info, reply + eof, view

    info, reply, view = run(scenario())
    assert info == {"tls_group": "X25519MLKEM768", "spiffe_id": SERVER_ID, "tickets": 2}
    assert reply == b"pong from openssl\n"
    assert view.group == "X25519MLKEM768"
    assert view.peer_uri == CLIENT_ID
    assert view.received == b"ping\n"
