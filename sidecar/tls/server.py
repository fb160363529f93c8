"""The server handshake (RFC 8446 §2, §4), one class per state.

ServerConnection()
  -> ExpectClientHello --no usable share--> HRR -> ExpectClientHello(retry)
     (sends ServerHello, EncryptedExtensions, CertificateRequest, Certificate,
      CertificateVerify, Finished)
  -> [ExpectClientCertificate -> ExpectClientCertificateVerify]  (PeerAuthenticated)
  -> ExpectClientFinished                                        (FinishedVerified)
  -> Traffic
"""

from __future__ import annotations

from dataclasses import dataclass

from .alerts import AlertDescription, TLSError
from .config import TLSConfig
from .connection import Connection, HandshakeState, Now, Traffic
from .events import HandshakeComplete, PeerCertificate
from .extensions import (
    ALLOWED_IN_CERTIFICATE_ENTRY,
    ClientHelloExtensions,
    ExtensionType,
    RawExtension,
    check_response_extensions,
    push_alpn,
    push_cookie,
    push_server_key_share,
    push_uint16_list,
)
from .groups import HYBRID_GROUPS, server_exchange
from .keylog import CLIENT_HANDSHAKE, CLIENT_TRAFFIC_0, EXPORTER, SERVER_HANDSHAKE, SERVER_TRAFFIC_0
from .keyschedule import EarlySecret, MasterSecret, Transcript, finished_verify_data, traffic_keys
from .limits import check_certificate_entries
from .messages import (
    HELLO_RETRY_REQUEST_RANDOM,
    TLS13,
    Certificate,
    CertificateEntry,
    CertificateRequest,
    CertificateVerify,
    ClientHello,
    EncryptedExtensions,
    Finished,
    HandshakeType,
    ServerHello,
    pull_certificate,
    pull_certificate_verify,
    pull_client_hello,
    pull_finished,
    push_certificate,
    push_certificate_request,
    push_certificate_verify,
    push_encrypted_extensions,
    push_finished,
    push_server_hello,
)
from .proofs import PeerAuthenticated, anonymous_peer, verify_certificate_verify, verify_finished
from .signatures import (
    CLIENT_CONTEXT,
    SERVER_CONTEXT,
    certificate_verify_input,
    choose_scheme,
    sign,
)
from .suites import SUITES, SuiteParams
from .verify import VerifiedPeer, insecure_peer


def _illegal(reason: str) -> TLSError:
    return TLSError(AlertDescription.illegal_parameter, reason)


class ServerConnection(Connection):
    """A TLS 1.3 server; mTLS (CertificateRequest) when require_client_certificate."""

    def __init__(self, config: TLSConfig, now: Now = None) -> None:
        if not config.certificate_chain or config.private_key is None:
            raise ValueError("a server needs certificate_chain and private_key")
        super().__init__(config, now)
        self._state = ExpectClientHello(None)


@dataclass(frozen=True, slots=True)
class _Retry:
    """What a HelloRetryRequest committed the server to (RFC 8446 §4.1.4)."""

    transcript: Transcript
    params: SuiteParams
    group: int
    cookie: bytes | None
    session_id: bytes


@dataclass(frozen=True, slots=True)
class _Choice:
    params: SuiteParams
    group: int
    client_share: bytes | None
    scheme: int
    alpn: str | None


def _negotiate(conn: Connection, ch: ClientHello, ext: ClientHelloExtensions) -> _Choice:
    config = conn.config
    if ext.supported_versions is None or TLS13 not in ext.supported_versions:
        # RFC 8446 §4.2.1 / Appendix D: we speak only TLS 1.3.
        raise TLSError(AlertDescription.protocol_version, "client does not offer TLS 1.3")
    if ch.legacy_compression_methods != b"\x00":
        # RFC 8446 §4.1.2: exactly one byte, null compression.
        raise _illegal("compression methods must be exactly [null]")
    params = next((SUITES[s] for s in config.cipher_suites if s in ch.cipher_suites), None)
    if params is None:
        raise TLSError(AlertDescription.handshake_failure, "no common cipher suite")
    if ext.signature_algorithms is None:
        # RFC 8446 §9.2: certificate authentication requires signature_algorithms.
        raise TLSError(AlertDescription.missing_extension, "no signature_algorithms")
    if not ext.supported_groups or ext.key_shares is None:
        raise TLSError(AlertDescription.missing_extension, "no supported_groups/key_share")
    shared = dict(ext.key_shares)
    # A set, not the client's list: a 64 KiB ClientHello holds thousands of shares and
    # groups, and one list scan per share was quadratic work before authentication.
    offered = frozenset(ext.supported_groups)
    for group in shared:
        if group not in offered:
            # RFC 8446 §4.2.8: every share must be for an offered group.
            raise _illegal("key share for a group not in supported_groups")
    mutual = [g for g in config.groups if g in offered]
    if not mutual:
        raise TLSError(AlertDescription.handshake_failure, "no common group")
    # Post-quantum first: when the client supports a hybrid group we prefer but sent
    # only classical shares, a HelloRetryRequest for the hybrid is worth the round trip.
    # Otherwise take our most preferred group that has a share, else retry for the best.
    group = mutual[0]
    if group not in shared and group not in HYBRID_GROUPS:
        group = next((g for g in mutual if g in shared), mutual[0])
    scheme = choose_scheme(config.own_signature_schemes, ext.signature_algorithms)
    alpn: str | None = None
    if config.alpn_protocols and ext.alpn is not None:
        for protocol in config.alpn_protocols:
            if protocol.encode("ascii") in ext.alpn:
                alpn = protocol
                break
        else:
            # RFC 7301 §3.2: no overlap is a no_application_protocol alert.
            raise TLSError(AlertDescription.no_application_protocol, "no common ALPN protocol")
    return _Choice(params, group, shared.get(group), scheme, alpn)


class ExpectClientHello(HandshakeState):
    __slots__ = ("retry",)

    def __init__(self, retry: _Retry | None) -> None:
        self.retry = retry

    @property
    def accepts_ccs(self) -> bool:
        return self.retry is not None

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.client_hello:
            return super().handle(conn, msg_type, body, raw)
        ch = pull_client_hello(body)
        ext = ClientHelloExtensions.parse(ch.extensions)
        conn._handshake_started = True
        choice = _negotiate(conn, ch, ext)
        retry = self.retry
        if retry is None:
            conn.client_random = ch.random
            transcript = Transcript()
            transcript.update(raw)
            if choice.client_share is None:
                return self._send_retry(conn, ch, choice, transcript, raw)
        else:
            # RFC 8446 §4.1.2: the second ClientHello must answer the HelloRetryRequest.
            if ext.cookie != retry.cookie:
                raise _illegal("cookie missing or altered in second ClientHello")
            if (
                ext.key_shares is None
                or len(ext.key_shares) != 1
                or choice.client_share is None
                or choice.group != retry.group
            ):
                raise _illegal("second ClientHello does not share the requested group")
            if choice.params is not retry.params or ch.legacy_session_id != retry.session_id:
                raise _illegal("second ClientHello changed its parameters")
            transcript = retry.transcript
            transcript.update(raw)
        return _send_server_flight(conn, ch, ext, choice, transcript)

    def _send_retry(
        self, conn: Connection, ch: ClientHello, choice: _Choice, transcript: Transcript, raw: bytes
    ) -> HandshakeState:
        config = conn.config
        cookie = config.rng(32) if config.send_hrr_cookie else None
        extensions: list[RawExtension] = [
            (ExtensionType.supported_versions, TLS13.to_bytes(2, "big")),
            (ExtensionType.key_share, choice.group.to_bytes(2, "big")),
        ]
        if cookie is not None:
            extensions.append((ExtensionType.cookie, push_cookie(cookie)))
        hrr = ServerHello(
            HELLO_RETRY_REQUEST_RANDOM, ch.legacy_session_id, choice.params.suite, tuple(extensions)
        )
        hrr_raw = push_server_hello(hrr)
        transcript.restart_after_retry(choice.params.hash_name, raw)
        transcript.update(hrr_raw)
        conn._send_handshake(hrr_raw)
        if ch.legacy_session_id:
            conn._send_ccs()  # Appendix D.4: right after our first handshake message
        return ExpectClientHello(
            _Retry(transcript, choice.params, choice.group, cookie, ch.legacy_session_id)
        )


def _send_server_flight(
    conn: Connection,
    ch: ClientHello,
    ext: ClientHelloExtensions,
    choice: _Choice,
    transcript: Transcript,
) -> HandshakeState:
    config = conn.config
    params = choice.params
    assert choice.client_share is not None
    server_share, shared = server_exchange(choice.group, choice.client_share, config.rng)
    sh = ServerHello(
        config.rng(32),
        ch.legacy_session_id,
        params.suite,
        (
            (ExtensionType.key_share, push_server_key_share(choice.group, server_share)),
            (ExtensionType.supported_versions, TLS13.to_bytes(2, "big")),
        ),
    )
    sh_raw = push_server_hello(sh)
    transcript.select_hash(params.hash_name)
    transcript.update(sh_raw)
    conn._send_handshake(sh_raw)
    if ch.legacy_session_id:
        conn._send_ccs()
    th = transcript.digest()
    hs = EarlySecret.start(params).handshake(shared)
    client_hs = hs.client_traffic_secret(th)
    server_hs = hs.server_traffic_secret(th)
    conn._log_secret(CLIENT_HANDSHAKE, client_hs)
    conn._log_secret(SERVER_HANDSHAKE, server_hs)
    conn._set_write_keys(params, traffic_keys(params, server_hs))
    conn._set_read_keys(params, traffic_keys(params, client_hs))

    ee_ext: list[RawExtension] = []
    if choice.alpn is not None:
        ee_ext.append(
            (
                ExtensionType.application_layer_protocol_negotiation,
                push_alpn([choice.alpn.encode("ascii")]),
            )
        )
    _send(conn, transcript, push_encrypted_extensions(EncryptedExtensions(tuple(ee_ext))))
    if config.require_client_certificate:
        cr_ext: tuple[RawExtension, ...] = (
            (ExtensionType.signature_algorithms, push_uint16_list(config.signature_schemes)),
            (
                ExtensionType.signature_algorithms_cert,
                push_uint16_list(config.certificate_signature_schemes),
            ),
        )
        _send(conn, transcript, push_certificate_request(CertificateRequest(b"", cr_ext)))
    entries = tuple(CertificateEntry(der) for der in config.chain_der)
    _send(conn, transcript, push_certificate(Certificate(b"", entries)))
    assert config.private_key is not None
    signature = sign(
        config.private_key,
        choice.scheme,
        certificate_verify_input(SERVER_CONTEXT, transcript.digest()),
    )
    _send(conn, transcript, push_certificate_verify(CertificateVerify(choice.scheme, signature)))
    _send(
        conn,
        transcript,
        push_finished(Finished(finished_verify_data(params, server_hs, transcript.digest()))),
    )

    th = transcript.digest()
    master = hs.master()
    client_ap = master.client_application_traffic_secret(th)
    server_ap = master.server_application_traffic_secret(th)
    conn._log_secret(SERVER_TRAFFIC_0, server_ap)
    conn._log_secret(CLIENT_TRAFFIC_0, client_ap)
    conn._log_secret(EXPORTER, master.exporter_master_secret(th))
    conn._set_write_keys(params, traffic_keys(params, server_ap))
    keys = _ServerKeys(params, master, client_hs, client_ap, server_ap, choice, ext.server_name)
    if config.require_client_certificate:
        return ExpectClientCertificate(transcript, keys)
    return ExpectClientFinished(transcript, keys, anonymous_peer())


def _send(conn: Connection, transcript: Transcript, message: bytes) -> None:
    transcript.update(message)
    conn._send_handshake(message)


@dataclass(frozen=True, slots=True)
class _ServerKeys:
    params: SuiteParams
    master: MasterSecret
    client_hs_secret: bytes
    client_ap_secret: bytes
    server_ap_secret: bytes
    choice: _Choice
    server_name: str | None


class ExpectClientCertificate(HandshakeState):
    __slots__ = ("keys", "transcript")

    def __init__(self, transcript: Transcript, keys: _ServerKeys) -> None:
        self.transcript = transcript
        self.keys = keys

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.certificate:
            return super().handle(conn, msg_type, body, raw)
        cert = pull_certificate(body)
        if cert.request_context:
            # RFC 8446 §4.4.2: must echo our (empty) certificate_request_context.
            raise _illegal("certificate_request_context mismatch")
        check_certificate_entries(len(cert.entries))
        for entry in cert.entries:
            check_response_extensions(entry.extensions, frozenset(), ALLOWED_IN_CERTIFICATE_ENTRY)
        if not cert.entries:
            # RFC 8446 §4.4.2.4: MAY abort with certificate_required; mTLS requires it.
            raise TLSError(AlertDescription.certificate_required, "client sent no certificate")
        chain = [entry.cert_data for entry in cert.entries]
        config = conn.config
        verifier = config.peer_verifier
        peer: VerifiedPeer
        if config.verify_peer and verifier is not None:
            peer = verifier.verify(chain, conn.now, False, config.certificate_signature_schemes)
        else:
            peer = insecure_peer(chain)
        self.transcript.update(raw)
        return ExpectClientCertificateVerify(self.transcript, self.keys, peer)


class ExpectClientCertificateVerify(HandshakeState):
    __slots__ = ("keys", "peer", "transcript")

    def __init__(self, transcript: Transcript, keys: _ServerKeys, peer: VerifiedPeer) -> None:
        self.transcript = transcript
        self.keys = keys
        self.peer = peer

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.certificate_verify:
            return super().handle(conn, msg_type, body, raw)
        authenticated = verify_certificate_verify(
            self.peer,
            pull_certificate_verify(body),
            conn.config.signature_schemes,
            CLIENT_CONTEXT,
            self.transcript.digest(),
        )
        self.transcript.update(raw)
        conn._emit(PeerCertificate(self.peer.spiffe_id, self.peer.chain))
        return ExpectClientFinished(self.transcript, self.keys, authenticated)


class ExpectClientFinished(HandshakeState):
    __slots__ = ("authenticated", "keys", "transcript")

    def __init__(
        self, transcript: Transcript, keys: _ServerKeys, authenticated: PeerAuthenticated
    ) -> None:
        self.transcript = transcript
        self.keys = keys
        self.authenticated = authenticated

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.finished:
            return super().handle(conn, msg_type, body, raw)
        keys = self.keys
        params = keys.params
        finished = verify_finished(
            params, keys.client_hs_secret, self.transcript.digest(), pull_finished(body).verify_data
        )
        self.transcript.update(raw)
        resumption = keys.master.resumption_master_secret(self.transcript.digest())
        conn._set_read_keys(params, traffic_keys(params, keys.client_ap_secret))
        peer = self.authenticated.peer
        info = HandshakeComplete(
            cipher_suite=params.suite,
            group=keys.choice.group,
            signature_scheme=self.authenticated.scheme,
            alpn_protocol=keys.choice.alpn,
            server_name=keys.server_name,
            peer_spiffe_id=peer.spiffe_id if peer is not None else None,
        )
        conn._emit(info)
        return Traffic(
            finished,
            self.authenticated,
            params,
            keys.client_ap_secret,
            keys.server_ap_secret,
            resumption,
            info,
        )
