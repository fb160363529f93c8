"""Real peer: tlslite-ng 0.9 (pure Python, with `kyber-py` for ML-KEM) over loopback.

The one classical-stack-independent peer that speaks X25519MLKEM768: its client and
server both negotiate the hybrid with ours, including the HelloRetryRequest our server
sends when a client that supports the hybrid shared only X25519. tlslite is blocking,
so it runs in a worker thread with socket timeouts.
"""

from __future__ import annotations

import asyncio
import socket
import warnings
from dataclasses import dataclass

with warnings.catch_warnings():
    # tlslite/__init__ imports its asyncore integration (deprecated since Python 3.6).
    warnings.simplefilter("ignore", DeprecationWarning)
    from tlslite.constants import GroupName
    from tlslite.handshakesettings import HandshakeSettings
    from tlslite.tlsconnection import TLSConnection
    from tlslite.utils.keyfactory import parsePEMKey
    from tlslite.x509certchain import X509CertChain

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


@dataclass(frozen=True)
class TlsliteResult:
    version: tuple[int, int]
    cipher: str
    group: str
    peer_chain_length: int
    reply: bytes


def _credentials(ident: Svid) -> tuple[X509CertChain, object]:
    chain = X509CertChain()
    with open(ident.cert) as f:
        chain.parsePemList(f.read())  # leaf and intermediate: both are sent
    with open(ident.key_file) as f:
        key = parsePEMKey(f.read(), private=True)
    return chain, key


def _settings(groups: list[str], shares: list[str]) -> HandshakeSettings:
    settings = HandshakeSettings()
    settings.minVersion = (3, 4)
    settings.eccCurves = groups
    settings.keyShares = shares
    return settings


def _read_line(conn: TLSConnection) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.read()
        if not chunk:
            break
        data += chunk
    return data


def _tlslite_client(port: int, groups: list[str], shares: list[str]) -> TlsliteResult:
    chain, key = _credentials(client_svid())
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    conn = TLSConnection(sock)
    try:
        conn.handshakeClientCert(
            chain, key, settings=_settings(groups, shares), serverName="localhost"
        )
        conn.write(b"ping\n")
        reply = _read_line(conn)
        return TlsliteResult(
            conn.version,
            conn.getCipherName(),
            GroupName.toRepr(conn.ecdhCurve),
            conn.session.serverCertChain.getNumCerts(),
            reply,
        )
    finally:
        conn.close()


def _client_run(groups: list[str], shares: list[str]) -> tuple[TlsliteResult, list[object]]:
    async def scenario() -> tuple[TlsliteResult, list[object]]:
        async with tls_echo_server(server_svid().config()) as (port, seen):
            result = await asyncio.to_thread(_tlslite_client, port, groups, shares)
        return result, seen

    return run(scenario())


def test_tlslite_client_negotiates_x25519mlkem768_with_our_server() -> None:
    result, seen = _client_run(["x25519mlkem768", "x25519"], ["x25519mlkem768"])
    assert result.version == (3, 4)
    assert result.group == "x25519mlkem768"
    assert result.peer_chain_length == 2  # we send leaf and intermediate
    assert result.reply == f"pong {CLIENT_ID} X25519MLKEM768\n".encode()
    assert len(seen) == 1


def test_tlslite_client_sharing_only_x25519_is_asked_to_retry_for_the_hybrid() -> None:
    # Our server prefers the hybrid when the client supports it: worth a round trip.
    result, _ = _client_run(["x25519mlkem768", "x25519"], ["x25519"])
    assert result.group == "x25519mlkem768"
    assert result.reply.endswith(b" X25519MLKEM768\n")


def test_tlslite_client_without_ml_kem_gets_x25519() -> None:
    result, _ = _client_run(["x25519", "secp256r1"], ["x25519"])
    assert result.group == "x25519"


@dataclass(frozen=True)
class TlsliteServerView:
    group: str
    client_chain_length: int
    request: bytes


def _tlslite_server(listener: socket.socket) -> TlsliteServerView:
    chain, key = _credentials(server_svid())
    sock, _ = listener.accept()
    sock.settimeout(TIMEOUT)
    conn = TLSConnection(sock)
    try:
        conn.handshakeServer(
            certChain=chain,
            privateKey=key,
            reqCert=True,
            settings=_settings(["x25519mlkem768", "x25519", "secp256r1"], []),
        )
        request = _read_line(conn)
        conn.write(b"pong from tlslite\n")
        view = TlsliteServerView(
            GroupName.toRepr(conn.ecdhCurve), conn.session.clientCertChain.getNumCerts(), request
        )
    finally:
        conn.close()
    return view


def test_our_client_negotiates_x25519mlkem768_with_a_tlslite_server() -> None:
    async def scenario() -> tuple[dict[str, object], bytes, TlsliteServerView]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(TIMEOUT)
            port = listener.getsockname()[1]
            server = asyncio.create_task(asyncio.to_thread(_tlslite_server, listener))
            reader, writer = await open_tls_connection(
                "127.0.0.1", port, config=client_svid().config(), server_name="localhost"
            )
            info = {k: writer.get_extra_info(k) for k in ("tls_group", "spiffe_id", "cipher")}
            writer.write(b"ping\n")
            reply = await reader.readline()
            writer.close()
            view = await server
        return info, reply, view

    info, reply, view = run(scenario())
    assert info["tls_group"] == "X25519MLKEM768"
    assert info["spiffe_id"] == SERVER_ID
    assert reply == b"pong from tlslite\n"
    assert view.group == "x25519mlkem768"
    assert view.client_chain_length == 2
    assert view.request == b"ping\n"
