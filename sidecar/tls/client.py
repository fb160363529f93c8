"""The client handshake (RFC 8446 §2, §4), one class per state.

ClientConnection() sends ClientHello                                   (_Hello)
  -> ExpectServerHello --HRR--> (ClientHello2) ExpectServerHello(retried)
     (ServerHello: [CCS], then we write under the client handshake key)
  -> ExpectEncryptedExtensions                                         (_Chosen)
  -> ExpectCertificateOrRequest                                        (_ClientKeys)
  -> peerauth.ExpectPeerCertificate        (the server's chain: VerifiedPeer)
  -> peerauth.ExpectPeerCertificateVerify  (creates PeerAuthenticated)
  -> peerauth.ExpectPeerFinished           (creates FinishedVerified)
  -> _finish: our flight [Certificate CertificateVerify] Finished -> Traffic

Each state holds frozen values with only what is known at its point (in parentheses,
what the state after it adds), plus the running transcript hash.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, replace

from ca.spiffeid import SpiffeId

from .alerts import AlertDescription, TLSError
from .config import TLSConfig
from .connection import Connection, Now, Traffic
from .credentials import select_credential
from .ech import (
    EXT_ENCRYPTED_CLIENT_HELLO,
    INNER_EXTENSION,
    ECHConfig,
    ECHRejected,
    pull_config_list,
)
from .ech_client import (
    ClientOfferECH,
    PublicNameVerifier,
    client_ech_accepted,
    grease_extension,
    offer_client_ech,
    retry_client_ech,
)
from .events import HandshakeComplete, PeerCertificate
from .extensions import (
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
from .grease import Grease, grease_client_hello
from .groups import ClientKeyShare, NamedGroup
from .keylog import (
    CLIENT_EARLY,
    CLIENT_HANDSHAKE,
    CLIENT_TRAFFIC_0,
    EXPORTER,
    SERVER_HANDSHAKE,
    SERVER_TRAFFIC_0,
)
from .keyschedule import (
    EarlySecret,
    HandshakeSecret,
    Transcript,
    finished_verify_data,
    traffic_keys,
)
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
    frame,
    pull_certificate_request,
    pull_encrypted_extensions,
    pull_server_hello,
    push_certificate,
    push_certificate_verify,
    push_client_hello,
    push_finished,
)
from .peerauth import ExpectPeerCertificate, ExpectPeerFinished, PeerSide
from .proofs import FinishedVerified, PeerAuthenticated, psk_server
from .record import MAX_PLAINTEXT, ContentType
from .resumption import ClientOffer, bind_psk_encoded, take_offer
from .signatures import (
    CLIENT_CONTEXT,
    SERVER_CONTEXT,
    certificate_verify_input,
    sign,
)
from .state import HandshakeContext, HandshakeState
from .suites import SUITES, SuiteParams
from .verify import PeerVerifier, VerifiedPeer


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
    # RFC 8446 §4.2.9: psk_dhe_ke only, so a resumption always runs a fresh key exchange.
    extensions.append((ExtensionType.psk_key_exchange_modes, b"\x01\x01"))
    rng = config.rng
    random = rng(32)
    # Appendix D.4: a non-empty legacy_session_id turns on middlebox compatibility.
    session_id = rng(32) if config.middlebox_compatibility else b""
    hello = ClientHello(random, session_id, tuple(config.cipher_suites), b"\x00", tuple(extensions))
    if config.grease:
        hello = grease_client_hello(hello, Grease.draw(rng))  # RFC 8701 §3.1
    return hello


def second_client_hello(
    hello: ClientHello, shares: list[ClientKeyShare], cookie: bytes | None
) -> ClientHello:
    """RFC 8446 §4.1.2: ClientHello1 with the new key_share and the cookie echoed."""
    extensions: list[RawExtension] = []
    for ext_type, data in hello.extensions:
        if ext_type == ExtensionType.key_share:
            data = push_client_key_shares((s.group, s.public) for s in shares)
        extensions.append((ext_type, data))
    psk = [e for e in extensions if e[0] == ExtensionType.pre_shared_key]
    # RFC 8446 §4.2.10: no early_data after a HelloRetryRequest; pre_shared_key stays
    # last (§4.2.11), its binder recomputed by the caller.
    extensions = [
        e
        for e in extensions
        if e[0] not in (ExtensionType.early_data, ExtensionType.pre_shared_key)
    ]
    if cookie is not None:
        # RFC 8446 §4.2.2: the client MUST copy the cookie into the new ClientHello.
        extensions.append((ExtensionType.cookie, push_cookie(cookie)))
    return replace(hello, extensions=(*extensions, *psk))


@dataclass(frozen=True, slots=True)
class _Hello:
    """What the client committed to in its (latest) ClientHello."""

    server_name: str | None
    hello: ClientHello
    offered: frozenset[int]
    shares: tuple[ClientKeyShare, ...]
    retry: ServerHello | None  # the HelloRetryRequest answered, if any
    offer: ClientOffer | None = None  # the ticket offered in pre_shared_key
    early_sent: bool = False  # 0-RTT data went out and may still be accepted
    early_offered: bool = False  # 0-RTT data went out (a HelloRetryRequest rejects it)
    ech: ClientOfferECH | None = None  # RFC 9849: `hello` is the inner, sealed ClientHello
    ech_outcome: str = "none"  # HandshakeComplete.ech once ServerHello settled it


@dataclass(frozen=True, slots=True)
class _ServerRequest:
    """A CertificateRequest (RFC 8446 §4.3.2): the client owes a Certificate."""

    context: bytes
    signature_algorithms: tuple[int, ...]
    signature_algorithms_cert: tuple[int, ...] | None


@dataclass(frozen=True, slots=True)
class _Chosen:
    """What ServerHello settled: the suite, the group and the handshake secrets."""

    params: SuiteParams
    group: int
    handshake_secret: HandshakeSecret
    client_hs_secret: bytes
    server_hs_secret: bytes
    resumed: VerifiedPeer | None = None  # the server accepted our ticket: its peer
    early_sent: bool = False


@dataclass(frozen=True, slots=True)
class _ClientKeys:
    """Everything the rest of the handshake needs, once EncryptedExtensions is in
    (`request` once a CertificateRequest came)."""

    chosen: _Chosen
    server_name: str | None
    alpn: str | None
    request: _ServerRequest | None
    early_data: str = "none"
    ech: str = "none"
    ech_retry_configs: bytes | None = None  # ECH rejected: the server's retry_configs
    ech_public_name: str | None = None  # ECH rejected: the name the outer handshake proves

    @property
    def params(self) -> SuiteParams:
        return self.chosen.params

    @property
    def peer_handshake_secret(self) -> bytes:
        return self.chosen.server_hs_secret


class ClientConnection(Connection):
    """A TLS 1.3 client. The ClientHello is queued in data_to_send() at construction."""

    is_client = True

    def __init__(
        self,
        config: TLSConfig,
        server_name: str | None = None,
        now: Now = None,
        *,
        endpoint: str | None = None,
        expected_peer: SpiffeId | str | None = None,
        early_data: bytes = b"",
        replay_safe: bool = False,
    ) -> None:
        """`endpoint` and `expected_peer` (the SPIFFE ID the caller will accept) name the
        `config.ticket_store` slot whose ticket this connection offers and where the
        server's new tickets go. `early_data` is sent as 0-RTT (RFC 8446 §2.3) only if
        `replay_safe` (the caller vouches that a replay does no harm), a ticket is
        offered and it fits the ticket's max_early_data_size; `HandshakeComplete.early_data`
        then says whether the server took it ("rejected": send it again)."""
        super().__init__(config, now)
        sni = server_name
        if sni is not None:
            try:
                ipaddress.ip_address(sni)
                sni = None  # RFC 6066 §3: literal IP addresses are not sent in SNI
            except ValueError:
                pass
        offer: ClientOffer | None = None
        if endpoint is not None and config.ticket_store is not None and self._now is not None:
            self._ticket_key = (endpoint, str(expected_peer) if expected_peer else "")
            offer = take_offer(config, self._ticket_key, self._now)
        shares = [ClientKeyShare(g, config.rng) for g in config.key_shares]
        hello = build_client_hello(config, sni, shares)
        ech_config = config.ech_configs[0] if config.ech_configs else None
        if ech_config is not None:
            # RFC 9849 §5: the inner hello says it is one. Early data, if any, is keyed
            # from the inner hello; the outer one also says early_data, so a server
            # that rejects ECH skips the records it cannot read (RFC 8446 §4.2.10).
            hello = replace(hello, extensions=(*hello.extensions, INNER_EXTENSION))
        elif config.ech_grease:
            grease = (EXT_ENCRYPTED_CLIENT_HELLO, grease_extension(config.rng))
            hello = replace(hello, extensions=(*hello.extensions, grease))  # §6.2
        early = b""
        if offer is not None:
            ticket = offer.stored.ticket
            if (
                early_data
                and replay_safe
                and len(early_data) <= ticket.max_early_data_size
                and ticket.alpn_protocol in (config.alpn_protocols[:1] or (None,))
            ):
                # RFC 8446 §4.2.10: the ALPN early data is for must be the one the
                # server will pick again: our first choice, as last time.
                early = early_data
                extensions = (*hello.extensions, (ExtensionType.early_data, b""))
                hello = replace(hello, extensions=extensions)
            assert self._now is not None
            hello, raw = bind_psk_encoded(hello, offer, self._now.timestamp(), None)
            self._start(hello, shares, server_name, offer, early, raw, ech_config)
            return
        self._start(hello, shares, server_name, ech_config=ech_config)

    def _start(
        self,
        hello: ClientHello,
        shares: list[ClientKeyShare],
        server_name: str | None,
        offer: ClientOffer | None = None,
        early_data: bytes = b"",
        raw: bytes | None = None,
        ech_config: ECHConfig | None = None,
    ) -> None:
        transcript = Transcript()
        if raw is None:
            raw = push_client_hello(hello)
        transcript.update(raw)
        ech: ClientOfferECH | None = None
        wire = raw
        if ech_config is not None:
            # RFC 9849 §6.1: the outer hello goes on the wire; both are hashed, each in
            # its own transcript, until ServerHello says which one the server used.
            outer, ech = offer_client_ech(ech_config, hello, server_name, self._config.rng)
            wire = push_client_hello(outer)
            ech.outer_transcript.update(wire)
        self.client_random = hello.random
        self._handshake_started = True
        self._send_initial_client_hello(wire)
        if offer is not None and early_data:
            self._send_early_data(offer, raw, early_data)
        offered = frozenset(t for t, _ in hello.extensions)
        self._state = ExpectServerHello(
            _Hello(
                server_name,
                hello,
                offered,
                tuple(shares),
                None,
                offer,
                bool(early_data),
                bool(early_data),
                ech,
                "grease" if ech is None and EXT_ENCRYPTED_CLIENT_HELLO in offered else "none",
            ),
            transcript,
        )

    def _send_early_data(self, offer: ClientOffer, raw_hello: bytes, data: bytes) -> None:
        params = offer.params
        early = EarlySecret.start(params, offer.stored.ticket.psk)
        secret = early.client_early_traffic_secret(
            hashlib.new(params.hash_name, raw_hello).digest()
        )
        self._log_secret(CLIENT_EARLY, secret)
        # Appendix D.4: with early data the dummy change_cipher_spec follows the
        # ClientHello at once.
        self._send_ccs()
        self._set_write_keys(params, traffic_keys(params, secret))
        for start in range(0, len(data), MAX_PLAINTEXT):
            self._seal(ContentType.application_data, data[start : start + MAX_PLAINTEXT])


class ExpectServerHello(HandshakeState):
    __slots__ = ("sent", "transcript")

    def __init__(self, sent: _Hello, transcript: Transcript) -> None:
        self.sent = sent
        self.transcript = transcript

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        if msg_type != HandshakeType.server_hello:
            return super().handle(ctx, msg_type, body, raw)
        sh = pull_server_hello(body)
        hello = self.sent.hello
        versions = find(sh.extensions, ExtensionType.supported_versions)
        if versions is None:
            # A TLS 1.2 (or older) server: we only speak 1.3 (RFC 8446 §4.2.1).
            raise TLSError(AlertDescription.protocol_version, "server does not speak TLS 1.3")
        if pull_uint16_value(versions) != TLS13 or sh.legacy_version != TLS12:
            raise _illegal("server selected a version we did not offer")
        if sh.random[-8:] in (DOWNGRADE_TLS12, DOWNGRADE_TLS11) and not sh.is_hello_retry_request:
            raise _illegal("downgrade sentinel in a TLS 1.3 ServerHello")
        if sh.legacy_session_id_echo != hello.legacy_session_id:
            raise _illegal("legacy_session_id_echo mismatch")
        if sh.cipher_suite not in hello.cipher_suites or sh.cipher_suite not in SUITES:
            raise _illegal("server chose a cipher suite we did not offer")
        if sh.legacy_compression_method != 0:
            raise _illegal("non-null compression")
        if sh.is_hello_retry_request:
            return self._retry(ctx, sh, raw)
        return self._server_hello(ctx, sh, raw)

    def _retry(self, ctx: HandshakeContext, hrr: ServerHello, raw: bytes) -> HandshakeState:
        sent = self.sent
        if sent.retry is not None:
            # RFC 8446 §4.1.4: a second HelloRetryRequest is unexpected_message.
            raise TLSError(AlertDescription.unexpected_message, "second HelloRetryRequest")
        check_response_extensions(
            hrr.extensions, sent.offered | {ExtensionType.cookie}, ALLOWED_IN_HELLO_RETRY_REQUEST
        )
        key_share = find(hrr.extensions, ExtensionType.key_share)
        cookie = find(hrr.extensions, ExtensionType.cookie)
        shares = list(sent.shares)
        if key_share is not None:
            group = pull_uint16_value(key_share)
            # RFC 8446 §4.1.4: the group must be offered and not already shared.
            if group not in ctx.config.groups or any(s.group == group for s in shares):
                raise _illegal("HelloRetryRequest selected an unusable group")
            shares = [ClientKeyShare(NamedGroup(group), ctx.config.rng)]
        elif cookie is None:
            raise _illegal("HelloRetryRequest would not change the ClientHello")
        params = SUITES[hrr.cipher_suite]
        transcript = self.transcript
        transcript.restart_after_retry(params.hash_name, push_client_hello(sent.hello))
        transcript.update(raw)
        hello2 = second_client_hello(
            sent.hello, shares, pull_cookie(cookie) if cookie is not None else None
        )
        offer = sent.offer
        if offer is not None:
            if offer.params.hash_name != params.hash_name:
                # RFC 8446 §4.1.4: a PSK whose hash is not the suite's cannot be kept.
                offer = None
                hello2 = replace(
                    hello2,
                    extensions=tuple(
                        e for e in hello2.extensions if e[0] != ExtensionType.pre_shared_key
                    ),
                )
            else:
                # RFC 8446 §4.2.11.2: the new binder covers ClientHello1's hash and the
                # HelloRetryRequest too.
                hello2 = bind_psk_encoded(hello2, offer, ctx.now.timestamp(), transcript)[0]
        if sent.early_sent:
            ctx.discard_write_keys()  # the 0-RTT key is dead; ClientHello2 is plaintext
        if hello2.legacy_session_id:
            ctx.send_ccs()  # Appendix D.4: before the second flight
        ech = sent.ech
        if ech is None:
            ctx.send(transcript, push_client_hello(hello2))
        else:
            # RFC 9849 §6.1.5: the second inner hello, sealed in the same HPKE context.
            outer2, ech = retry_client_ech(
                ech,
                params,
                sent.hello,
                hello2,
                hrr,
                raw,
                sent.server_name,
                ctx.config.rng,
            )
            ctx.send(ech.outer_transcript, push_client_hello(outer2))
            transcript.update(push_client_hello(hello2))
        offered = frozenset(t for t, _ in hello2.extensions)
        retried = _Hello(
            sent.server_name,
            hello2,
            offered,
            tuple(shares),
            hrr,
            offer,
            False,
            sent.early_offered,
            ech,
            sent.ech_outcome,
        )
        return ExpectServerHello(retried, transcript)

    def _server_hello(self, ctx: HandshakeContext, sh: ServerHello, raw: bytes) -> HandshakeState:
        sent = self.sent
        transcript = self.transcript
        if sent.ech is not None:
            ech = sent.ech
            if client_ech_accepted(ech, SUITES[sh.cipher_suite], sent.hello, transcript, sh):
                sent = replace(sent, ech=None, ech_outcome="accepted")
            else:
                # RFC 9849 §6.1.6: the server used the outer hello (which offered no
                # ticket); the handshake goes on to authenticate the public name.
                sent = replace(
                    sent,
                    hello=ech.outer,
                    server_name=ech.public_name,
                    offer=None,
                    early_sent=False,
                    ech_outcome="rejected",
                )
                transcript = ech.outer_transcript
        check_response_extensions(sh.extensions, sent.offered, ALLOWED_IN_SERVER_HELLO)
        key_share = find(sh.extensions, ExtensionType.key_share)
        if key_share is None:
            raise TLSError(AlertDescription.missing_extension, "ServerHello without key_share")
        group, server_share = pull_server_key_share(key_share)
        share = next((s for s in sent.shares if s.group == group), None)
        if share is None:
            raise _illegal("server key_share for a group we did not share")
        if sent.retry is not None and sh.cipher_suite != sent.retry.cipher_suite:
            # RFC 8446 §4.1.4: ServerHello must keep the HelloRetryRequest's suite.
            raise _illegal("cipher suite changed after HelloRetryRequest")
        params = SUITES[sh.cipher_suite]
        psk: bytes | None = None
        resumed: VerifiedPeer | None = None
        selected = find(sh.extensions, ExtensionType.pre_shared_key)
        if selected is not None:
            offer = sent.offer
            # RFC 8446 §4.2.11: the identity must be one we offered (we offer one) and
            # the suite's hash the PSK's.
            if offer is None or pull_uint16_value(selected) != 0:
                raise _illegal("server selected a PSK identity we did not offer")
            if offer.params.hash_name != params.hash_name:
                raise _illegal("server selected a suite whose hash is not the PSK's")
            psk = offer.stored.ticket.psk
            resumed = offer.peer
        shared = share.complete(server_share)
        transcript.select_hash(params.hash_name)
        transcript.update(raw)
        th = transcript.digest()
        hs = EarlySecret.start(params, psk).handshake(shared)
        client_hs = hs.client_traffic_secret(th)
        server_hs = hs.server_traffic_secret(th)
        ctx.log_secret(CLIENT_HANDSHAKE, client_hs)
        ctx.log_secret(SERVER_HANDSHAKE, server_hs)
        ctx.install_read_keys(params, server_hs)
        # From here on the server reads with our handshake key (RFC 8446 Appendix A.2:
        # K_recv = handshake once it sent ServerHello without accepting 0-RTT), so
        # anything we send, a fatal alert included, goes under it: §6 encrypts alerts
        # under the current write state, and Appendix A.1 defers the client's switch to
        # EndOfEarlyData only for 0-RTT, which this client never sends. Go, BoringSSL
        # and OpenSSL switch here too. The Appendix D.4 dummy change_cipher_spec, when
        # due, goes first: "before its encrypted handshake flight".
        if sent.hello.legacy_session_id:
            ctx.send_ccs()
        if not sent.early_sent or resumed is None:
            ctx.install_write_keys(params, client_hs)
        # else RFC 8446 §4.2.10: we write under the 0-RTT key until EncryptedExtensions
        # says whether the server took our early data.
        early_pending = sent.early_sent and resumed is not None
        chosen = _Chosen(params, group, hs, client_hs, server_hs, resumed, early_pending)
        return ExpectEncryptedExtensions(sent, chosen, transcript)


class ExpectEncryptedExtensions(HandshakeState):
    __slots__ = ("chosen", "sent", "transcript")

    def __init__(self, sent: _Hello, chosen: _Chosen, transcript: Transcript) -> None:
        self.sent = sent
        self.chosen = chosen
        self.transcript = transcript

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        if msg_type != HandshakeType.encrypted_extensions:
            return super().handle(ctx, msg_type, body, raw)
        ee = pull_encrypted_extensions(body)
        sent = self.sent
        check_response_extensions(ee.extensions, sent.offered, ALLOWED_IN_ENCRYPTED_EXTENSIONS)
        alpn = find(ee.extensions, ExtensionType.application_layer_protocol_negotiation)
        selected: str | None = None
        if alpn is not None:
            names = pull_alpn(alpn)
            # RFC 7301 §3.1: exactly one protocol, one that the client offered.
            offered = [p.encode("ascii") for p in ctx.config.alpn_protocols]
            if len(names) != 1 or names[0] not in offered:
                raise _illegal("server selected an ALPN protocol we did not offer")
            selected = names[0].decode("ascii")
        chosen = self.chosen
        early = "rejected" if sent.early_offered else "none"
        retry_configs = find(ee.extensions, ExtensionType.encrypted_client_hello)
        if retry_configs is not None and sent.ech_outcome == "accepted":
            # RFC 9849 §6.1.4: retry_configs only come with a rejection.
            raise TLSError(AlertDescription.unsupported_extension, "retry_configs after accept")
        if retry_configs is not None and sent.ech_outcome == "rejected":
            pull_config_list(retry_configs)  # §6.1.6: one that does not parse is decode_error
        if find(ee.extensions, ExtensionType.early_data) is not None:
            if not chosen.early_sent:
                # RFC 8446 §4.2.10: early_data only answers early data that was sent.
                raise _illegal("server accepted early data we did not send")
            if find(ee.extensions, ExtensionType.early_data) != b"":
                raise TLSError(AlertDescription.decode_error, "early_data with a body in EE")
            early = "accepted"
        elif chosen.early_sent:
            ctx.install_write_keys(chosen.params, chosen.client_hs_secret)
        self.transcript.update(raw)
        keys = _ClientKeys(
            chosen=chosen,
            server_name=sent.server_name,
            alpn=selected,
            request=None,
            early_data=early,
            ech=sent.ech_outcome,
            ech_retry_configs=retry_configs if sent.ech_outcome == "rejected" else None,
            ech_public_name=sent.server_name if sent.ech_outcome == "rejected" else None,
        )
        if chosen.resumed is not None:
            # RFC 8446 §2.2: resumed, the server authenticates with the PSK alone.
            ctx.emit(PeerCertificate(chosen.resumed.spiffe_id, chosen.resumed.chain))
            return ExpectPeerFinished(
                SERVER_PEER, self.transcript, keys, psk_server(chosen.resumed)
            )
        return ExpectCertificateOrRequest(self.transcript, keys)


class ExpectCertificateOrRequest(HandshakeState):
    __slots__ = ("keys", "transcript")

    def __init__(self, transcript: Transcript, keys: _ClientKeys) -> None:
        self.transcript = transcript
        self.keys = keys

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
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
            cert_algorithms = find(cr.extensions, ExtensionType.signature_algorithms_cert)
            request = _ServerRequest(
                cr.request_context,
                pull_uint16_list(algorithms),
                pull_uint16_list(cert_algorithms) if cert_algorithms is not None else None,
            )
            self.transcript.update(raw)
            keys = replace(self.keys, request=request)
            return ExpectPeerCertificate(_server_side(ctx, keys), self.transcript, keys)
        if msg_type == HandshakeType.certificate:
            side = _server_side(ctx, self.keys)
            state = ExpectPeerCertificate(side, self.transcript, self.keys)
            return state.handle(ctx, msg_type, body, raw)
        return super().handle(ctx, msg_type, body, raw)


def _finish(
    ctx: HandshakeContext,
    transcript: Transcript,
    keys: _ClientKeys,
    authenticated: PeerAuthenticated,
    finished: FinishedVerified,
) -> Traffic:
    """The server's Finished verified: application secrets, then our second flight."""
    chosen = keys.chosen
    params = chosen.params
    th = transcript.digest()
    master = chosen.handshake_secret.master()
    client_ap = master.client_application_traffic_secret(th)
    server_ap = master.server_application_traffic_secret(th)
    ctx.log_secret(SERVER_TRAFFIC_0, server_ap)
    ctx.log_secret(CLIENT_TRAFFIC_0, client_ap)
    ctx.log_secret(EXPORTER, master.exporter_master_secret(th))
    ctx.install_read_keys(params, server_ap)

    # Our second flight, under the handshake key installed at ServerHello (after the
    # dummy change_cipher_spec, if due): [Certificate CertificateVerify] Finished.
    config = ctx.config
    if keys.early_data == "accepted":
        # RFC 8446 §4.5: EndOfEarlyData closes 0-RTT under the early key, then the
        # handshake key takes over.
        ctx.send(transcript, frame(HandshakeType.end_of_early_data, b""))
        ctx.install_write_keys(params, chosen.client_hs_secret)
    request = keys.request
    if request is not None:
        # RFC 8446 §4.4.2.3: the chain the server can verify; with none whose key signs
        # an offered scheme, an empty Certificate (the server decides what that means).
        selected = select_credential(
            config.all_credentials,
            request.signature_algorithms,
            request.signature_algorithms_cert,
        )
        entries = tuple(CertificateEntry(der) for der in selected[0].chain_der) if selected else ()
        ctx.send(transcript, push_certificate(Certificate(request.context, entries)))
        if selected is not None:
            credential, scheme = selected
            signature = sign(
                credential.private_key,
                scheme,
                certificate_verify_input(CLIENT_CONTEXT, transcript.digest()),
            )
            ctx.send(transcript, push_certificate_verify(CertificateVerify(scheme, signature)))
    verify_data = finished_verify_data(params, chosen.client_hs_secret, transcript.digest())
    ctx.send(transcript, push_finished(Finished(verify_data)))
    resumption = master.resumption_master_secret(transcript.digest())
    ctx.install_write_keys(params, client_ap)
    peer = authenticated.peer
    info = HandshakeComplete(
        cipher_suite=params.suite,
        group=chosen.group,
        signature_scheme=authenticated.scheme,
        alpn_protocol=keys.alpn,
        server_name=keys.server_name,
        peer_spiffe_id=peer.spiffe_id if peer is not None else None,
        session_resumed=chosen.resumed is not None,
        early_data=keys.early_data,
        ech=keys.ech,
    )
    ctx.emit(info)
    return Traffic(finished, authenticated, params, server_ap, client_ap, resumption, info)


# The client authenticates a server: RFC 8446 §4.4.2.4 says a server's Certificate is
# never empty (decode_error).
SERVER_PEER: PeerSide[_ClientKeys] = PeerSide(
    peer_is_server=True,
    signature_context=SERVER_CONTEXT,
    context_error="unexpected certificate_request_context",
    empty_alert=AlertDescription.decode_error,
    empty_reason="server sent no certificate",
    finish=_finish,
)


def _ech_rejected(
    ctx: HandshakeContext,
    transcript: Transcript,
    keys: _ClientKeys,
    authenticated: PeerAuthenticated,
    finished: FinishedVerified,
) -> HandshakeState:
    """RFC 9849 §6.1.6: the outer handshake verified as the public name, so its
    retry_configs are authentic; the connection ends with ech_required, never used."""
    raise ECHRejected(keys.ech_retry_configs)


def _server_side(ctx: HandshakeContext, keys: _ClientKeys) -> PeerSide[_ClientKeys]:
    if keys.ech_public_name is None:
        return SERVER_PEER
    verifier: PeerVerifier = ctx.config.ech_public_name_verifier or PublicNameVerifier(
        keys.ech_public_name, ctx.config.ech_public_name_roots
    )
    return replace(SERVER_PEER, verifier=verifier, finish=_ech_rejected)
