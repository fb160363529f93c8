"""The client handshake (RFC 8446 §2, §4), one class per state.

ClientConnection() sends ClientHello
  -> ExpectServerHello --HRR--> (ClientHello2) ExpectServerHello(retried)
  -> ExpectEncryptedExtensions
  -> ExpectCertificateOrRequest -> [ExpectServerCertificate]
  -> ExpectServerCertificateVerify   (creates PeerAuthenticated)
  -> ExpectServerFinished            (creates FinishedVerified; sends our flight)
  -> Traffic
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from .alerts import AlertDescription, TLSError
from .config import TLSConfig
from .connection import Connection, HandshakeState, Now, Traffic
from .events import HandshakeComplete, PeerCertificate
from .extensions import (
    ALLOWED_IN_CERTIFICATE_ENTRY,
    ALLOWED_IN_ENCRYPTED_EXTENSIONS,
    ALLOWED_IN_HELLO_RETRY_REQUEST,
    ALLOWED_IN_SERVER_HELLO,
    ExtensionType,
    RawExtension,
    check_response_extensions,
    find,
    pull_alpn,
    pull_cookie,
    pull_server_key_share,
    pull_uint16_list,
    pull_uint16_value,
    push_alpn,
    push_client_key_shares,
    push_client_versions,
    push_cookie,
    push_server_name,
    push_uint16_list,
)
from .groups import ClientKeyShare, NamedGroup
from .keylog import CLIENT_HANDSHAKE, CLIENT_TRAFFIC_0, EXPORTER, SERVER_HANDSHAKE, SERVER_TRAFFIC_0
from .keyschedule import (
    EarlySecret,
    HandshakeSecret,
    Transcript,
    finished_verify_data,
    traffic_keys,
)
from .limits import check_certificate_entries
from .messages import (
    DOWNGRADE_TLS11,
    DOWNGRADE_TLS12,
    TLS12,
    TLS13,
    Certificate,
    CertificateEntry,
    CertificateVerify,
    ClientHello,
    Finished,
    HandshakeType,
    ServerHello,
    pull_certificate,
    pull_certificate_request,
    pull_certificate_verify,
    pull_encrypted_extensions,
    pull_finished,
    pull_server_hello,
    push_certificate,
    push_certificate_verify,
    push_client_hello,
    push_finished,
)
from .proofs import PeerAuthenticated, verify_certificate_verify, verify_finished
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


def build_client_hello(
    config: TLSConfig, server_name: str | None, shares: list[ClientKeyShare]
) -> ClientHello:
    """The ClientHello for `config` (extension order follows common practice)."""
    extensions: list[RawExtension] = []
    if server_name is not None:
        extensions.append((ExtensionType.server_name, push_server_name(server_name)))
    extensions += [
        (ExtensionType.supported_versions, push_client_versions([TLS13])),
        (ExtensionType.supported_groups, push_uint16_list(config.groups)),
        (ExtensionType.key_share, push_client_key_shares((s.group, s.public) for s in shares)),
        (ExtensionType.signature_algorithms, push_uint16_list(config.signature_schemes)),
        (
            ExtensionType.signature_algorithms_cert,
            push_uint16_list(config.certificate_signature_schemes),
        ),
    ]
    if config.alpn_protocols:
        extensions.append(
            (
                ExtensionType.application_layer_protocol_negotiation,
                push_alpn(p.encode("ascii") for p in config.alpn_protocols),
            )
        )
    # psk_dhe_ke: lets servers issue tickets (resumption is a later issue).
    extensions.append((ExtensionType.psk_key_exchange_modes, b"\x01\x01"))
    rng = config.rng
    random = rng(32)
    # Appendix D.4: a non-empty legacy_session_id turns on middlebox compatibility.
    session_id = rng(32) if config.middlebox_compatibility else b""
    return ClientHello(random, session_id, tuple(config.cipher_suites), b"\x00", tuple(extensions))


def second_client_hello(
    hello: ClientHello, shares: list[ClientKeyShare], cookie: bytes | None
) -> ClientHello:
    """RFC 8446 §4.1.2: ClientHello1 with the new key_share and the cookie echoed."""
    extensions: list[RawExtension] = []
    for ext_type, data in hello.extensions:
        if ext_type == ExtensionType.key_share:
            data = push_client_key_shares((s.group, s.public) for s in shares)
        extensions.append((ext_type, data))
    if cookie is not None:
        # RFC 8446 §4.2.2: the client MUST copy the cookie into the new ClientHello.
        extensions.append((ExtensionType.cookie, push_cookie(cookie)))
    return replace(hello, extensions=tuple(extensions))


@dataclass(slots=True)
class _Negotiation:
    """What the client learns as the handshake proceeds (filled in order)."""

    server_name: str | None
    hello: ClientHello
    offered: frozenset[int]
    transcript: Transcript
    params: SuiteParams | None = None
    group: int = 0
    handshake_secret: HandshakeSecret | None = None
    client_hs_secret: bytes = b""
    server_hs_secret: bytes = b""
    alpn: str | None = None


class ClientConnection(Connection):
    """A TLS 1.3 client. The ClientHello is queued in data_to_send() at construction."""

    is_client = True

    def __init__(self, config: TLSConfig, server_name: str | None = None, now: Now = None) -> None:
        super().__init__(config, now)
        sni = server_name
        if sni is not None:
            try:
                ipaddress.ip_address(sni)
                sni = None  # RFC 6066 §3: literal IP addresses are not sent in SNI
            except ValueError:
                pass
        shares = [ClientKeyShare(g, config.rng) for g in config.key_shares]
        hello = build_client_hello(config, sni, shares)
        self._start(hello, shares, server_name)

    def _start(
        self, hello: ClientHello, shares: list[ClientKeyShare], server_name: str | None
    ) -> None:
        transcript = Transcript()
        raw = push_client_hello(hello)
        transcript.update(raw)
        self.client_random = hello.random
        self._handshake_started = True
        self._send_initial_client_hello(raw)
        offered = frozenset(t for t, _ in hello.extensions)
        self._state = ExpectServerHello(
            _Negotiation(server_name, hello, offered, transcript), shares, None
        )


class ExpectServerHello(HandshakeState):
    __slots__ = ("hrr", "neg", "shares")

    def __init__(
        self, neg: _Negotiation, shares: list[ClientKeyShare], hrr: ServerHello | None
    ) -> None:
        self.neg = neg
        self.shares = shares
        self.hrr = hrr

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.server_hello:
            return super().handle(conn, msg_type, body, raw)
        sh = pull_server_hello(body)
        neg = self.neg
        versions = find(sh.extensions, ExtensionType.supported_versions)
        if versions is None:
            # A TLS 1.2 (or older) server: we only speak 1.3 (RFC 8446 §4.2.1).
            raise TLSError(AlertDescription.protocol_version, "server does not speak TLS 1.3")
        if pull_uint16_value(versions) != TLS13 or sh.legacy_version != TLS12:
            raise _illegal("server selected a version we did not offer")
        if sh.random[-8:] in (DOWNGRADE_TLS12, DOWNGRADE_TLS11) and not sh.is_hello_retry_request:
            raise _illegal("downgrade sentinel in a TLS 1.3 ServerHello")
        if sh.legacy_session_id_echo != neg.hello.legacy_session_id:
            raise _illegal("legacy_session_id_echo mismatch")
        if sh.cipher_suite not in neg.hello.cipher_suites or sh.cipher_suite not in SUITES:
            raise _illegal("server chose a cipher suite we did not offer")
        if sh.legacy_compression_method != 0:
            raise _illegal("non-null compression")
        if sh.is_hello_retry_request:
            return self._retry(conn, sh, raw)
        return self._server_hello(conn, sh, raw)

    def _retry(self, conn: Connection, hrr: ServerHello, raw: bytes) -> HandshakeState:
        neg = self.neg
        if self.hrr is not None:
            # RFC 8446 §4.1.4: a second HelloRetryRequest is unexpected_message.
            raise TLSError(AlertDescription.unexpected_message, "second HelloRetryRequest")
        check_response_extensions(
            hrr.extensions, neg.offered | {ExtensionType.cookie}, ALLOWED_IN_HELLO_RETRY_REQUEST
        )
        key_share = find(hrr.extensions, ExtensionType.key_share)
        cookie = find(hrr.extensions, ExtensionType.cookie)
        shares = self.shares
        if key_share is not None:
            group = pull_uint16_value(key_share)
            # RFC 8446 §4.1.4: the group must be offered and not already shared.
            if group not in conn.config.groups or any(s.group == group for s in shares):
                raise _illegal("HelloRetryRequest selected an unusable group")
            shares = [ClientKeyShare(NamedGroup(group), conn.config.rng)]
        elif cookie is None:
            raise _illegal("HelloRetryRequest would not change the ClientHello")
        params = SUITES[hrr.cipher_suite]
        neg.transcript.restart_after_retry(params.hash_name, push_client_hello(neg.hello))
        neg.transcript.update(raw)
        hello2 = second_client_hello(
            neg.hello, shares, pull_cookie(cookie) if cookie is not None else None
        )
        neg.hello = hello2
        neg.offered = frozenset(t for t, _ in hello2.extensions)
        neg.params = params
        hello2_raw = push_client_hello(hello2)
        neg.transcript.update(hello2_raw)
        if hello2.legacy_session_id:
            conn._send_ccs()  # Appendix D.4: before the second flight
        conn._send_handshake(hello2_raw)
        return ExpectServerHello(neg, shares, hrr)

    def _server_hello(self, conn: Connection, sh: ServerHello, raw: bytes) -> HandshakeState:
        neg = self.neg
        check_response_extensions(sh.extensions, neg.offered, ALLOWED_IN_SERVER_HELLO)
        key_share = find(sh.extensions, ExtensionType.key_share)
        if key_share is None:
            raise TLSError(AlertDescription.missing_extension, "ServerHello without key_share")
        group, server_share = pull_server_key_share(key_share)
        share = next((s for s in self.shares if s.group == group), None)
        if share is None:
            raise _illegal("server key_share for a group we did not share")
        if self.hrr is not None and sh.cipher_suite != self.hrr.cipher_suite:
            # RFC 8446 §4.1.4: ServerHello must keep the HelloRetryRequest's suite.
            raise _illegal("cipher suite changed after HelloRetryRequest")
        params = SUITES[sh.cipher_suite]
        shared = share.complete(server_share)
        neg.transcript.select_hash(params.hash_name)
        neg.transcript.update(raw)
        th = neg.transcript.digest()
        hs = EarlySecret.start(params).handshake(shared)
        neg.params = params
        neg.group = group
        neg.handshake_secret = hs
        neg.client_hs_secret = hs.client_traffic_secret(th)
        neg.server_hs_secret = hs.server_traffic_secret(th)
        conn._log_secret(CLIENT_HANDSHAKE, neg.client_hs_secret)
        conn._log_secret(SERVER_HANDSHAKE, neg.server_hs_secret)
        conn._set_read_keys(params, traffic_keys(params, neg.server_hs_secret))
        return ExpectEncryptedExtensions(neg)


class ExpectEncryptedExtensions(HandshakeState):
    __slots__ = ("neg",)

    def __init__(self, neg: _Negotiation) -> None:
        self.neg = neg

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.encrypted_extensions:
            return super().handle(conn, msg_type, body, raw)
        ee = pull_encrypted_extensions(body)
        neg = self.neg
        check_response_extensions(ee.extensions, neg.offered, ALLOWED_IN_ENCRYPTED_EXTENSIONS)
        alpn = find(ee.extensions, ExtensionType.application_layer_protocol_negotiation)
        if alpn is not None:
            names = pull_alpn(alpn)
            # RFC 7301 §3.1: exactly one protocol, one that the client offered.
            offered = [p.encode("ascii") for p in conn.config.alpn_protocols]
            if len(names) != 1 or names[0] not in offered:
                raise _illegal("server selected an ALPN protocol we did not offer")
            neg.alpn = names[0].decode("ascii")
        neg.transcript.update(raw)
        return ExpectCertificateOrRequest(neg)


@dataclass(frozen=True, slots=True)
class _ServerRequest:
    context: bytes
    signature_algorithms: tuple[int, ...]


class ExpectCertificateOrRequest(HandshakeState):
    __slots__ = ("neg",)

    def __init__(self, neg: _Negotiation) -> None:
        self.neg = neg

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type == HandshakeType.certificate_request:
            cr = pull_certificate_request(body)
            if cr.request_context:
                # RFC 8446 §4.3.2: zero length in the main handshake.
                raise _illegal("non-empty certificate_request_context")
            algorithms = find(cr.extensions, ExtensionType.signature_algorithms)
            if algorithms is None:
                raise TLSError(
                    AlertDescription.missing_extension,
                    "CertificateRequest without signature_algorithms",
                )
            request = _ServerRequest(cr.request_context, pull_uint16_list(algorithms))
            self.neg.transcript.update(raw)
            return ExpectServerCertificate(self.neg, request)
        if msg_type == HandshakeType.certificate:
            return ExpectServerCertificate(self.neg, None).handle(conn, msg_type, body, raw)
        return super().handle(conn, msg_type, body, raw)


def _peer_from_certificate(
    conn: Connection, body: bytes, peer_is_server: bool
) -> tuple[Certificate, VerifiedPeer | None]:
    """Parse a Certificate message and verify the chain it carries (None if empty)."""
    cert = pull_certificate(body)
    if cert.request_context:
        raise _illegal("unexpected certificate_request_context")
    check_certificate_entries(len(cert.entries))
    for entry in cert.entries:
        check_response_extensions(entry.extensions, frozenset(), ALLOWED_IN_CERTIFICATE_ENTRY)
    if not cert.entries:
        return cert, None
    chain = [entry.cert_data for entry in cert.entries]
    config = conn.config
    verifier = config.peer_verifier
    if not config.verify_peer or verifier is None:
        return cert, insecure_peer(chain)
    return cert, verifier.verify(
        chain, conn.now, peer_is_server, config.certificate_signature_schemes
    )


class ExpectServerCertificate(HandshakeState):
    __slots__ = ("neg", "request")

    def __init__(self, neg: _Negotiation, request: _ServerRequest | None) -> None:
        self.neg = neg
        self.request = request

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.certificate:
            return super().handle(conn, msg_type, body, raw)
        _, peer = _peer_from_certificate(conn, body, peer_is_server=True)
        if peer is None:
            # RFC 8446 §4.4.2.4: a server's Certificate is never empty.
            raise TLSError(AlertDescription.decode_error, "server sent no certificate")
        self.neg.transcript.update(raw)
        return ExpectServerCertificateVerify(self.neg, self.request, peer)


class ExpectServerCertificateVerify(HandshakeState):
    __slots__ = ("neg", "peer", "request")

    def __init__(
        self, neg: _Negotiation, request: _ServerRequest | None, peer: VerifiedPeer
    ) -> None:
        self.neg = neg
        self.request = request
        self.peer = peer

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.certificate_verify:
            return super().handle(conn, msg_type, body, raw)
        neg = self.neg
        authenticated = verify_certificate_verify(
            self.peer,
            pull_certificate_verify(body),
            conn.config.signature_schemes,
            SERVER_CONTEXT,
            neg.transcript.digest(),
        )
        neg.transcript.update(raw)
        conn._emit(PeerCertificate(self.peer.spiffe_id, self.peer.chain))
        return ExpectServerFinished(neg, self.request, authenticated)


class ExpectServerFinished(HandshakeState):
    __slots__ = ("authenticated", "neg", "request")

    def __init__(
        self, neg: _Negotiation, request: _ServerRequest | None, authenticated: PeerAuthenticated
    ) -> None:
        self.neg = neg
        self.request = request
        self.authenticated = authenticated

    def handle(self, conn: Connection, msg_type: int, body: bytes, raw: bytes) -> HandshakeState:
        if msg_type != HandshakeType.finished:
            return super().handle(conn, msg_type, body, raw)
        neg = self.neg
        params, hs = neg.params, neg.handshake_secret
        assert params is not None and hs is not None
        transcript = neg.transcript
        finished = verify_finished(
            params, neg.server_hs_secret, transcript.digest(), pull_finished(body).verify_data
        )
        transcript.update(raw)
        th = transcript.digest()
        master = hs.master()
        client_ap = master.client_application_traffic_secret(th)
        server_ap = master.server_application_traffic_secret(th)
        conn._log_secret(SERVER_TRAFFIC_0, server_ap)
        conn._log_secret(CLIENT_TRAFFIC_0, client_ap)
        conn._log_secret(EXPORTER, master.exporter_master_secret(th))
        conn._set_read_keys(params, traffic_keys(params, server_ap))

        # Our second flight: [CCS] [Certificate CertificateVerify] Finished.
        if neg.hello.legacy_session_id:
            conn._send_ccs()
        conn._set_write_keys(params, traffic_keys(params, neg.client_hs_secret))
        config = conn.config
        if self.request is not None:
            entries = tuple(CertificateEntry(der) for der in config.chain_der)
            cert_raw = push_certificate(Certificate(self.request.context, entries))
            transcript.update(cert_raw)
            conn._send_handshake(cert_raw)
            if entries:
                assert config.private_key is not None
                scheme = choose_scheme(
                    config.own_signature_schemes, self.request.signature_algorithms
                )
                signature = sign(
                    config.private_key,
                    scheme,
                    certificate_verify_input(CLIENT_CONTEXT, transcript.digest()),
                )
                cv_raw = push_certificate_verify(CertificateVerify(scheme, signature))
                transcript.update(cv_raw)
                conn._send_handshake(cv_raw)
        fin_raw = push_finished(
            Finished(finished_verify_data(params, neg.client_hs_secret, transcript.digest()))
        )
        transcript.update(fin_raw)
        conn._send_handshake(fin_raw)
        resumption = master.resumption_master_secret(transcript.digest())
        conn._set_write_keys(params, traffic_keys(params, client_ap))
        info = HandshakeComplete(
            cipher_suite=params.suite,
            group=neg.group,
            signature_scheme=self.authenticated.scheme,
            alpn_protocol=neg.alpn,
            server_name=neg.server_name,
            peer_spiffe_id=self.authenticated.peer.spiffe_id if self.authenticated.peer else None,
        )
        conn._emit(info)
        return Traffic(finished, self.authenticated, params, server_ap, client_ap, resumption, info)
