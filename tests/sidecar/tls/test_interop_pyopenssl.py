"""Real peer: OpenSSL 4.0 (cryptography's, through pyOpenSSL) over memory BIOs.

Both directions, mutual TLS with SPIFFE-style chains (leaf + intermediate), the
negotiated group read back with SSL_get0_group_name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from functools import cache

import pytest
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from sidecar.tls import (
    AlertDescription,
    AlertReceived,
    ApplicationData,
    CipherSuite,
    ClientConnection,
    Connection,
    ConnectionClosed,
    HandshakeComplete,
    NamedGroup,
    ServerConnection,
    SessionTicket,
    TLSError,
)

from .pki import CLIENT_ID, SERVER_ID, Identity, authority, client_config, server_config

# OpenSSL checks validity against the real clock, so these chains are cut around it.
REAL_NOW = dt.datetime.now(dt.UTC)

OPENSSL_SUITES = {
    CipherSuite.AES_128_GCM_SHA256: b"TLS_AES_128_GCM_SHA256",
    CipherSuite.AES_256_GCM_SHA384: b"TLS_AES_256_GCM_SHA384",
    CipherSuite.CHACHA20_POLY1305_SHA256: b"TLS_CHACHA20_POLY1305_SHA256",
}


@cache
def _ident(role: str) -> Identity:
    return authority().leaf(
        SERVER_ID if role == "server" else CLIENT_ID,
        not_before=REAL_NOW - dt.timedelta(hours=1),
        not_after=REAL_NOW + dt.timedelta(hours=1),
    )


def _openssl_context(
    role: str, groups: bytes | None = None, suites: bytes | None = None, tls12_only: bool = False
) -> SSL.Context:
    ident = _ident(role)
    ctx = SSL.Context(SSL.TLS_METHOD)
    if tls12_only:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    else:
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(ident.chain[0])
    ctx.add_extra_chain_cert(ident.chain[1])
    ctx.use_privatekey(ident.key)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ident.root))  # type: ignore[union-attr]
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: args[-1])
    if groups is not None:
        assert lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1
    if suites is not None:
        assert lib.SSL_CTX_set_ciphersuites(ctx._context, suites) == 1
    if role == "server":
        ctx.set_alpn_select_callback(
            lambda conn, protos: b"h2" if b"h2" in protos else SSL.NO_OVERLAPPING_PROTOCOLS
        )
    else:
        ctx.set_alpn_protos([b"h2"])
    return ctx


def _bio_read(conn: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            chunk = conn.bio_read(65536)
        except SSL.WantReadError:
            return out
        if not chunk:
            return out
        out += chunk


def _step(conn: SSL.Connection) -> None:
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()


def _run(openssl: SSL.Connection, engine: Connection, rounds: int = 10) -> None:
    """Shuttle bytes until both sides are done with the handshake."""
    for _ in range(rounds):
        _step(openssl)
        out = _bio_read(openssl)
        if out:
            engine.receive_data(out, now=REAL_NOW)
        back = engine.data_to_send()
        if back:
            openssl.bio_write(back)
        _step(openssl)
        if engine.handshake_complete and not out and not back:
            return
    raise AssertionError("handshake did not finish")


def _group_name(conn: SSL.Connection) -> str:
    return ffi.string(lib.SSL_get0_group_name(conn._ssl)).decode()


def _exchange(openssl: SSL.Connection, engine: Connection) -> list[object]:
    openssl.send(b"from openssl")
    engine.receive_data(_bio_read(openssl), now=REAL_NOW)
    engine.send_application_data(b"from engine" * 2000)
    openssl.bio_write(engine.data_to_send())
    got = b""
    while len(got) < len(b"from engine") * 2000:
        got += openssl.recv(65536)
    assert got == b"from engine" * 2000
    events = list(engine.events())
    assert ApplicationData(b"from openssl") in events
    return events


def _engine_client(**overrides: object) -> ClientConnection:
    ident = _ident("client")
    return ClientConnection(
        client_config(ident, **overrides), server_name="x.example.org", now=REAL_NOW
    )


def _engine_server(**overrides: object) -> ServerConnection:
    return ServerConnection(server_config(_ident("server"), **overrides), now=REAL_NOW)


def _openssl_server(**kwargs: object) -> SSL.Connection:
    conn = SSL.Connection(_openssl_context("server", **kwargs), None)  # type: ignore[arg-type]
    conn.set_accept_state()
    return conn


def _openssl_client(**kwargs: object) -> SSL.Connection:
    conn = SSL.Connection(_openssl_context("client", **kwargs), None)  # type: ignore[arg-type]
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"x.example.org")
    return conn


def _done(events: list[object]) -> HandshakeComplete:
    return next(e for e in events if isinstance(e, HandshakeComplete))


def test_engine_client_and_openssl_server_negotiate_x25519mlkem768_with_mtls() -> None:
    server, client = _openssl_server(), _engine_client()
    _run(server, client)
    events = _exchange(server, client)
    done = _done(events)
    assert done.group == NamedGroup.X25519MLKEM768 and _group_name(server) == "X25519MLKEM768"
    assert done.peer_spiffe_id == SERVER_ID and done.alpn_protocol == "h2"
    assert server.get_peer_certificate() is not None
    # OpenSSL sends NewSessionTickets after the handshake: parsed into events.
    assert any(isinstance(e, SessionTicket) for e in events)


def test_openssl_client_and_engine_server_negotiate_x25519mlkem768_with_mtls() -> None:
    client, server = _openssl_client(), _engine_server()
    _run(client, server)
    done = _done(_exchange(client, server))
    assert done.group == NamedGroup.X25519MLKEM768 and _group_name(client) == "X25519MLKEM768"
    assert done.peer_spiffe_id == CLIENT_ID
    assert client.get_alpn_proto_negotiated() == b"h2"


def test_openssl_client_offering_only_x25519_gets_x25519() -> None:
    client, server = _openssl_client(groups=b"X25519"), _engine_server()
    _run(client, server)
    assert _done(_exchange(client, server)).group == NamedGroup.x25519
    assert _group_name(client) == "x25519"


def test_hello_retry_request_when_openssl_client_shares_only_p256() -> None:
    # OpenSSL sends a share for its first group only; we prefer the hybrid and retry.
    client, server = _openssl_client(groups=b"P-256:X25519MLKEM768"), _engine_server()
    _run(client, server)
    assert _done(_exchange(client, server)).group == NamedGroup.X25519MLKEM768


def test_hello_retry_request_when_openssl_client_offers_only_p256() -> None:
    client, server = _openssl_client(groups=b"P-256"), _engine_server()
    _run(client, server)
    assert _done(_exchange(client, server)).group == NamedGroup.secp256r1
    assert _group_name(client) == "secp256r1"


def test_engine_client_follows_openssl_server_hello_retry_to_p256() -> None:
    server, client = _openssl_server(groups=b"P-256"), _engine_client()
    _run(server, client)
    assert _done(_exchange(server, client)).group == NamedGroup.secp256r1


# OpenSSL's -groups name -> the name SSL_get0_group_name reports, for the groups a
# server must take as they come (issue 23): the shared secret both sides derive is the
# cross-check of each group's share layout and secret order.
_OPENSSL_GROUPS = {
    NamedGroup.x448: (b"X448", "x448"),
    NamedGroup.secp384r1: (b"P-384", "secp384r1"),
    NamedGroup.secp521r1: (b"P-521", "secp521r1"),
    NamedGroup.SecP256r1MLKEM768: (b"SecP256r1MLKEM768", "SecP256r1MLKEM768"),
    NamedGroup.SecP384r1MLKEM1024: (b"SecP384r1MLKEM1024", "SecP384r1MLKEM1024"),
}


@pytest.mark.parametrize("group", list(_OPENSSL_GROUPS), ids=lambda g: g.name)
def test_an_openssl_client_sharing_only_one_group_gets_it_from_a_default_engine_server(
    group: NamedGroup,
) -> None:
    name, reported = _OPENSSL_GROUPS[group]
    client, server = _openssl_client(groups=name), _engine_server()
    _run(client, server)
    assert _done(_exchange(client, server)).group == group
    assert _group_name(client) == reported


@pytest.mark.parametrize("group", list(_OPENSSL_GROUPS), ids=lambda g: g.name)
def test_the_engine_client_follows_an_openssl_server_retry_into_each_group(
    group: NamedGroup,
) -> None:
    name, reported = _OPENSSL_GROUPS[group]
    server, client = _openssl_server(groups=name), _engine_client()
    _run(server, client)
    assert _done(_exchange(server, client)).group == group
    assert _group_name(server) == reported


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_each_cipher_suite_interoperates_in_both_directions(suite: CipherSuite) -> None:
    server, client = _openssl_server(suites=OPENSSL_SUITES[suite]), _engine_client()
    _run(server, client)
    assert _done(_exchange(server, client)).cipher_suite == suite
    oclient, eserver = _openssl_client(suites=OPENSSL_SUITES[suite]), _engine_server()
    _run(oclient, eserver)
    assert _done(_exchange(oclient, eserver)).cipher_suite == suite


def test_key_update_in_both_directions_with_openssl() -> None:
    server, client = _openssl_server(), _engine_client()
    _run(server, client)
    client.update_key(request_peer_update=True)
    client.send_application_data(b"after update")
    server.bio_write(client.data_to_send())
    assert server.recv(100) == b"after update"
    server.send(b"reply")  # under OpenSSL's updated key
    client.receive_data(_bio_read(server), now=REAL_NOW)
    assert ApplicationData(b"reply") in list(client.events())


def test_tls12_only_openssl_client_gets_protocol_version() -> None:
    client, server = _openssl_client(tls12_only=True), _engine_server()
    _step(client)
    with pytest.raises(TLSError) as info:
        server.receive_data(_bio_read(client), now=REAL_NOW)
    assert info.value.alert == AlertDescription.protocol_version
    client.bio_write(server.data_to_send())
    with pytest.raises(SSL.Error, match=r"(?i)protocol version"):
        client.do_handshake()


def test_tls12_only_openssl_server_refuses_engine_client_with_protocol_version() -> None:
    server, client = _openssl_server(tls12_only=True), _engine_client()
    server.bio_write(client.data_to_send())
    with pytest.raises(SSL.Error, match=r"(?i)unsupported protocol"):
        server.do_handshake()
    client.receive_data(_bio_read(server), now=REAL_NOW)
    events = list(client.events())
    assert AlertReceived(2, AlertDescription.protocol_version) in events
    assert events[-1] == ConnectionClosed(clean=False)


@cache
def _ca_svids() -> tuple[Identity, Identity]:
    """SVIDs from the project's CA: the intermediate carries a URI name constraint."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from ca.authority import RootAuthority
    from ca.spiffeid import TrustDomain

    root = RootAuthority.create(TrustDomain("example.org"), now=REAL_NOW - dt.timedelta(hours=1))
    inter = root.issue_intermediate("interop", now=REAL_NOW - dt.timedelta(minutes=30))
    out = []
    for spiffe_id in (SERVER_ID, CLIENT_ID):
        key = ec.generate_private_key(ec.SECP256R1())
        svid = inter.issue_x509_svid(
            spiffe_id, key.public_key(), now=REAL_NOW - dt.timedelta(minutes=1)
        )
        out.append(Identity(tuple(svid.chain), key, root.certificate))
    return out[0], out[1]


def _ca_context(ident: Identity, role: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(ident.chain[0])
    ctx.add_extra_chain_cert(ident.chain[1])
    ctx.use_privatekey(ident.key)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ident.root))  # type: ignore[union-attr]
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: args[-1])
    if role == "server":
        ctx.set_alpn_select_callback(lambda conn, protos: b"h2")
    else:
        ctx.set_alpn_protos([b"h2"])
    return ctx


def test_ca_issued_name_constrained_svids_interoperate_with_openssl_both_ways() -> None:
    server_ident, client_ident = _ca_svids()
    oserver = SSL.Connection(_ca_context(server_ident, "server"), None)
    oserver.set_accept_state()
    eclient = ClientConnection(client_config(client_ident), server_name="x", now=REAL_NOW)
    _run(oserver, eclient)
    assert _done(_exchange(oserver, eclient)).peer_spiffe_id == SERVER_ID

    oclient = SSL.Connection(_ca_context(client_ident, "client"), None)
    oclient.set_connect_state()
    eserver = ServerConnection(server_config(server_ident), now=REAL_NOW)
    _run(oclient, eserver)
    assert _done(_exchange(oclient, eserver)).peer_spiffe_id == CLIENT_ID
