"""Resumption and 0-RTT against a real peer: OpenSSL 4.0 through pyOpenSSL.

pyOpenSSL 26 has no early-data API of its own, but its bindings (`OpenSSL._util.lib`)
carry `SSL_write_early_data`, `SSL_read_early_data`, `SSL_CTX_set_max_early_data` and
`SSL_SESSION_get_max_early_data`, which is what these tests call (there is no
`SSL_get_early_data_status`: acceptance is read from our engine's side and from what
OpenSSL's `SSL_read_early_data` returned). Session reuse is `Connection.get_session()`
/ `set_session()` and `SSL_session_reused`. The harness is test_interop_pyopenssl's:
memory BIOs, the real clock, mutual TLS with SPIFFE chains.
"""

from __future__ import annotations

import contextlib

from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from sidecar.tls import (
    ApplicationData,
    ClientConnection,
    HandshakeComplete,
    NamedGroup,
    ServerConnection,
    TLSConfig,
)
from sidecar.tls.replay import ReplayCache
from sidecar.tls.tickets import StekRing
from sidecar.tls.ticketstore import TicketStore

from .pki import SERVER_ID, client_config, server_config
from .resumption_support import stek
from .test_interop_pyopenssl import (
    REAL_NOW,
    _bio_read,
    _exchange,
    _group_name,
    _ident,
    _openssl_context,
    _run,
)

NOW_S = REAL_NOW.timestamp()
ENDPOINT = "openssl:443"
EARLY = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
# OpenSSL's SSL_read_early_data results (ssl.h).
READ_EARLY_DATA_ERROR, READ_EARLY_DATA_SUCCESS, READ_EARLY_DATA_FINISH = 0, 1, 2


def _reused(conn: SSL.Connection) -> bool:
    return bool(lib.SSL_session_reused(conn._ssl))


def _done(conn: ServerConnection | ClientConnection) -> HandshakeComplete:
    info = conn.negotiated
    assert info is not None
    return info


def _server_config(**overrides: object) -> TLSConfig:
    fields: dict[str, object] = dict(
        ticket_ring=_ring(),
        replica_id=b"replica-a",
        max_early_data=16384,
        replay_cache=ReplayCache(),
    )
    fields.update(overrides)
    return server_config(_ident("server"), **fields)


def _ring() -> StekRing:
    """A ring whose active key is valid around the real clock."""
    ring = StekRing()
    ring.install(stek(0, start=NOW_S - 60), [], None)
    return ring


def _openssl_client(ctx: SSL.Context, session: SSL.Session | None = None) -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"x.example.org")
    if session is not None:
        conn.set_session(session)
    return conn


def _openssl_session_from(server_cfg: TLSConfig) -> tuple[SSL.Context, SSL.Session]:
    """A full handshake of an OpenSSL client with our server; OpenSSL keeps the ticket."""
    ctx = _openssl_context("client")
    client = _openssl_client(ctx)
    server = ServerConnection(server_cfg, now=REAL_NOW)
    _run(client, server)
    _exchange(client, server)  # OpenSSL reads our NewSessionTickets with the data
    assert not _done(server).session_resumed
    session = client.get_session()
    assert session is not None
    # A clean close: OpenSSL marks the session of an SSL freed without one unresumable.
    client.shutdown()
    return ctx, session


def test_openssl_client_resumes_against_our_server() -> None:
    config = _server_config()
    ctx, session = _openssl_session_from(config)
    client = _openssl_client(ctx, session)
    server = ServerConnection(config, now=REAL_NOW)
    _run(client, server)
    _exchange(client, server)
    assert _reused(client)
    assert _done(server).session_resumed and _done(server).early_data == "none"
    # psk_dhe_ke: the resumption ran a fresh X25519MLKEM768 exchange.
    assert _group_name(client) == "X25519MLKEM768"


def test_openssl_client_sends_early_data_that_our_server_accepts_as_early() -> None:
    config = _server_config()
    ctx, session = _openssl_session_from(config)
    assert lib.SSL_SESSION_get_max_early_data(session._session) == 16384
    client = _openssl_client(ctx, session)
    written = ffi.new("size_t *")
    assert lib.SSL_write_early_data(client._ssl, EARLY, len(EARLY), written) == 1
    assert written[0] == len(EARLY)
    server = ServerConnection(config, now=REAL_NOW)
    server.receive_data(_bio_read(client), now=REAL_NOW)
    events = list(server.events())
    assert ApplicationData(EARLY, early=True) in events
    client.bio_write(server.data_to_send())
    _run(client, server)
    assert _reused(client)
    assert _done(server).early_data == "accepted"


def test_openssl_client_early_data_replayed_is_rejected_and_the_handshake_completes() -> None:
    config = _server_config()
    ctx, session = _openssl_session_from(config)
    client = _openssl_client(ctx, session)
    written = ffi.new("size_t *")
    assert lib.SSL_write_early_data(client._ssl, EARLY, len(EARLY), written) == 1
    first_flight = _bio_read(client)
    first = ServerConnection(config, now=REAL_NOW)
    first.receive_data(first_flight, now=REAL_NOW)
    assert ApplicationData(EARLY, early=True) in list(first.events())
    # The same bytes again (an attacker's replay) reach a second connection: the
    # single-use cache turns the early data away and OpenSSL's client, the real one
    # now talking to this connection, finishes in 1-RTT.
    second = ServerConnection(config, now=REAL_NOW)
    second.receive_data(first_flight, now=REAL_NOW)
    assert not [e for e in second.events() if isinstance(e, ApplicationData)]
    client.bio_write(second.data_to_send())
    _run(client, second)
    assert _done(second).session_resumed and _done(second).early_data == "rejected"


def _openssl_server_ctx(max_early_data: int = 0) -> SSL.Context:
    ctx = _openssl_context("server")
    ctx.set_session_id(b"trellis-resumption")  # OpenSSL caches sessions per context id
    if max_early_data:
        assert lib.SSL_CTX_set_max_early_data(ctx._context, max_early_data) == 1
    return ctx


def _engine_client(store: TicketStore, early: bytes = b"") -> ClientConnection:
    return ClientConnection(
        client_config(_ident("client"), ticket_store=store),
        "x.example.org",
        REAL_NOW,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
        early_data=early,
        replay_safe=bool(early),
    )


def _openssl_server(ctx: SSL.Context) -> SSL.Connection:
    conn = SSL.Connection(ctx, None)
    conn.set_accept_state()
    return conn


def test_our_client_resumes_against_openssl() -> None:
    ctx, store = _openssl_server_ctx(), TicketStore()
    server, client = _openssl_server(ctx), _engine_client(store)
    _run(server, client)
    _exchange(server, client)
    assert len(store) >= 1  # OpenSSL's tickets, filed under (endpoint, SPIFFE ID)
    server, client = _openssl_server(ctx), _engine_client(store)
    _run(server, client)
    _exchange(server, client)
    assert _reused(server)
    assert _done(client).session_resumed and _done(client).peer_spiffe_id == SERVER_ID
    assert _done(client).group == NamedGroup.X25519MLKEM768


def test_our_client_sends_early_data_that_openssl_reads_as_early() -> None:
    ctx, store = _openssl_server_ctx(16384), TicketStore()
    server, client = _openssl_server(ctx), _engine_client(store)
    _run(server, client)
    _exchange(server, client)
    server.shutdown()  # else OpenSSL drops the session its single-use check looks up
    server, client = _openssl_server(ctx), _engine_client(store, EARLY)
    server.bio_write(client.data_to_send())
    buf = ffi.new("unsigned char[]", 65536)
    got = ffi.new("size_t *")
    early = b""
    for _ in range(8):  # bounded: one record of early data, then the end of it
        with contextlib.suppress(SSL.WantReadError, SSL.Error):
            result = lib.SSL_read_early_data(server._ssl, buf, 65536, got)
            if result == READ_EARLY_DATA_SUCCESS:
                early += bytes(ffi.buffer(buf, got[0]))
                continue
        out = _bio_read(server)
        if out:
            client.receive_data(out, now=REAL_NOW)
        back = client.data_to_send()
        if back:
            server.bio_write(back)
        if client.handshake_complete and not out and not back:
            break
    assert early == EARLY
    assert _done(client).early_data == "accepted" and _done(client).session_resumed
    assert _reused(server)
