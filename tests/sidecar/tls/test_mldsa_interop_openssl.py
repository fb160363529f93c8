"""Real peers for ML-DSA: OpenSSL 4.0 through pyOpenSSL, and the system OpenSSL 3.0.

OpenSSL 4.0 is held to `mldsa65` alone (`SSL_CTX_set1_sigalgs_list`), so it can neither
sign nor accept anything else, and a message callback reads the scheme of each
CertificateVerify as OpenSSL itself sent and received it: the check is made on the
peer's side, not the engine's. pyOpenSSL has no binding for
`SSL_get_peer_signature_type_nid`; the callback sees the same bytes OpenSSL parsed.
Every chain is an SVID from the project's CA (root, name-constrained intermediate and
leaf of one algorithm).

The system OpenSSL 3.0 (`openssl s_client`) knows no ML-DSA at all: it is the classical
client that a server with only an ML-DSA chain must refuse, and that a server with
both chains must serve its ECDSA one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi, lib

from sidecar.tls import (
    ClientConnection,
    Connection,
    HandshakeComplete,
    NamedGroup,
    ServerConnection,
    SignatureScheme,
    TLSError,
)
from sidecar.tls.credentials import Credential

from .pki import (
    TRUST_DOMAIN,
    Identity,
    ca_live_identity,
    client_config,
    server_config,
)
from .test_interop_system_fixtures import openssl_args, peer_process, run, tls_echo_server

CERTIFICATE_VERIFY = 15
HANDSHAKE = 22


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _bundles(*idents: Identity) -> dict[str, list[x509.Certificate]]:
    return {TRUST_DOMAIN: [ident.root for ident in idents]}


class _OpenSSLPeer:
    """An OpenSSL 4.0 endpoint over memory BIOs that records CertificateVerify schemes."""

    def __init__(self, role: str, ident: Identity, peer_root: x509.Certificate) -> None:
        self.sent: list[int] = []
        self.received: list[int] = []
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        # Both signature_algorithms and what OpenSSL will sign with: ML-DSA-65 only.
        assert lib.SSL_CTX_set1_sigalgs_list(ctx._context, b"mldsa65") == 1
        assert lib.SSL_CTX_set1_curves_list(ctx._context, b"X25519MLKEM768") == 1
        self._callback = ffi.callback(
            "void(int, int, int, const void *, size_t, SSL *, void *)", self._on_message
        )
        lib.SSL_CTX_set_msg_callback(ctx._context, self._callback)
        ctx.use_certificate(ident.chain[0])
        ctx.add_extra_chain_cert(ident.chain[1])
        # pyOpenSSL's from_cryptography_key knows no ML-DSA: hand OpenSSL the PKCS#8.
        pem = ident.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, pem))
        ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(peer_root))  # type: ignore[union-attr]
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: args[-1])
        self.conn = SSL.Connection(ctx, None)
        if role == "server":
            self.conn.set_accept_state()
        else:
            self.conn.set_connect_state()

    def _on_message(
        self, write_p: int, _version: int, content_type: int, buf: object, size: int, *_: object
    ) -> None:
        data = bytes(ffi.buffer(buf, size))  # type: ignore[call-overload]
        if content_type == HANDSHAKE and data[:1] == bytes([CERTIFICATE_VERIFY]):
            (self.sent if write_p else self.received).append(int.from_bytes(data[4:6], "big"))

    def group(self) -> str:
        return ffi.string(lib.SSL_get0_group_name(self.conn._ssl)).decode()  # type: ignore[no-any-return]

    def read(self) -> bytes:
        out = b""
        for _ in range(64):
            try:
                chunk = self.conn.bio_read(65536)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out += chunk
        return out

    def step(self) -> None:
        with contextlib.suppress(SSL.WantReadError):
            self.conn.do_handshake()


def _handshake(peer: _OpenSSLPeer, engine: Connection) -> HandshakeComplete:
    for _ in range(10):
        peer.step()
        out = peer.read()
        if out:
            engine.receive_data(out, now=_now())
        back = engine.data_to_send()
        if back:
            peer.conn.bio_write(back)
        peer.step()
        if engine.handshake_complete and not out and not back:
            break
    done = [e for e in engine.events() if isinstance(e, HandshakeComplete)]
    assert len(done) == 1
    return done[0]


def test_openssl_4_server_and_engine_client_do_mldsa65_mtls_over_x25519mlkem768() -> None:
    server_ident, client_ident = ca_live_identity("server"), ca_live_identity("client")
    peer = _OpenSSLPeer("server", server_ident, client_ident.root)
    engine = ClientConnection(
        client_config(client_ident, rng=os.urandom, trust_bundles=_bundles(server_ident)),
        server_name="x.example.org",
        now=_now(),
    )
    done = _handshake(peer, engine)
    # OpenSSL's own view: it signed with mldsa65 and verified our mldsa65 signature.
    assert peer.sent == [SignatureScheme.mldsa65] and peer.received == [SignatureScheme.mldsa65]
    assert peer.group() == "X25519MLKEM768" and done.group == NamedGroup.X25519MLKEM768
    assert done.signature_scheme == SignatureScheme.mldsa65


def test_openssl_4_client_and_engine_server_do_mldsa65_mtls_over_x25519mlkem768() -> None:
    server_ident, client_ident = ca_live_identity("server"), ca_live_identity("client")
    peer = _OpenSSLPeer("client", client_ident, server_ident.root)
    engine = ServerConnection(
        server_config(server_ident, rng=os.urandom, trust_bundles=_bundles(client_ident)),
        now=_now(),
    )
    done = _handshake(peer, engine)
    assert peer.received == [SignatureScheme.mldsa65] and peer.sent == [SignatureScheme.mldsa65]
    assert peer.group() == "X25519MLKEM768" and done.group == NamedGroup.X25519MLKEM768
    assert peer.conn.get_peer_certificate() is not None


def test_a_server_holding_both_serves_openssl_4_held_to_mldsa65_its_mldsa_chain() -> None:
    # The ECDSA credential comes first, but OpenSSL 4.0 offers only mldsa65.
    pq, classical = ca_live_identity("server"), ca_live_identity("server", "p256")
    client_ident = ca_live_identity("client")
    peer = _OpenSSLPeer("client", client_ident, pq.root)
    engine = ServerConnection(
        server_config(
            classical,
            rng=os.urandom,
            credentials=(Credential(pq.chain, pq.key),),
            trust_bundles=_bundles(client_ident),
        ),
        now=_now(),
    )
    _handshake(peer, engine)
    assert peer.received == [SignatureScheme.mldsa65]
    served = peer.conn.get_peer_cert_chain(as_cryptography=True)
    assert served is not None and list(served) == list(pq.chain)


# --- the system OpenSSL 3.0: a classical client ---------------------------------------


@contextlib.contextmanager
def _client_files(directory: Path, ident: Identity) -> Iterator[tuple[str, str, str]]:
    cert = directory / "client.pem"
    chain = directory / "chain.pem"
    key = directory / "client.key"
    cert.write_bytes(ident.chain[0].public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(ident.chain[1].public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        ident.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    yield str(cert), str(chain), str(key)


def _s_client(
    tmp_path: Path, server_cfg_credentials: tuple[Identity, ...]
) -> tuple[int, str, list[object]]:
    classical_client = ca_live_identity("client", "p256")
    first, *rest = server_cfg_credentials
    server_cfg = server_config(
        first,
        rng=os.urandom,
        credentials=tuple(Credential(i.chain, i.key) for i in rest),
        trust_bundles=_bundles(classical_client),
    )
    roots = tmp_path / "roots.pem"
    roots.write_bytes(
        b"".join(i.root.public_bytes(serialization.Encoding.PEM) for i in server_cfg_credentials)
    )

    async def scenario() -> tuple[int, str, list[object]]:
        with _client_files(tmp_path, classical_client) as (cert, chain, key):
            async with tls_echo_server(server_cfg) as (port, seen):
                argv = openssl_args(
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-tls1_3",
                    "-cert",
                    cert,
                    "-cert_chain",
                    chain,
                    "-key",
                    key,
                    "-CAfile",
                    str(roots),
                    "-verify_return_error",
                    "-ign_eof",
                )
                async with peer_process(*argv) as client:
                    client.send(b"ping\n")
                    # A refused handshake ends s_client before any "pong".
                    with contextlib.suppress(AssertionError, TimeoutError):
                        await client.wait_for_line(b"pong", timeout=10)
                    client.close_stdin()
                    status, output = await client.finish()
                await asyncio.sleep(0.05)
        return status, output, seen

    return run(scenario())


def test_system_openssl_3_is_refused_by_an_mldsa_only_server_with_handshake_failure(
    tmp_path: Path,
) -> None:
    status, output, seen = _s_client(tmp_path, (ca_live_identity("server"),))
    errors = [e for e in seen if isinstance(e, TLSError)]
    # RFC 8446 §4.4.2.2: no certificate the client can verify; OpenSSL 3.0 reads the alert.
    assert [e.alert.name for e in errors] == ["handshake_failure"], seen
    assert status != 0 and "handshake failure" in output, output


def test_system_openssl_3_gets_the_ecdsa_chain_from_a_server_holding_both(
    tmp_path: Path,
) -> None:
    _status, output, seen = _s_client(
        tmp_path, (ca_live_identity("server"), ca_live_identity("server", "p256"))
    )
    done = [e for e in seen if isinstance(e, HandshakeComplete)]
    assert len(done) == 1, seen
    assert done[0].peer_spiffe_id is not None  # mTLS: the ECDSA client authenticated
    assert "Peer signature type: ECDSA" in output, output
    assert "Verification: OK" in output or "Verify return code: 0 (ok)" in output, output
    assert "pong" in output, output
