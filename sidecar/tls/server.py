"""The server handshake (RFC 8446 §2, §4), one class per state.

ServerConnection()
  -> ExpectClientHello --no usable share--> HRR -> ExpectClientHello(retry)
     (sends ServerHello, EncryptedExtensions, CertificateRequest, Certificate,
      CertificateVerify, Finished)
  -> [peerauth.ExpectPeerCertificate -> peerauth.ExpectPeerCertificateVerify]
                                                  (PeerAuthenticated, or anonymous_peer)
  -> peerauth.ExpectPeerFinished                  (FinishedVerified)
  -> _finish -> Traffic

A resumption skips the certificates: ExpectClientHello -> [ExpectEndOfEarlyData] ->
peerauth.ExpectPeerFinished. From its Finished on, the server may already send
application data there (0.5-RTT, `ServerConnection._half_rtt_params`), never in a full
handshake.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .alerts import AlertDescription, TLSError
from .config import TLSConfig
from .connection import Connection, Now, Traffic
from .credentials import Credential, require_credential, select_credential
from .ech import push_config_list, server_hello_confirmation
from .ech import retry_request_confirmation as ech_retry_confirmation
from .ech_server import ServerOutcome, server_receive_ech
from .events import HandshakeComplete, PeerCertificate
from .extensions import (
    ClientHelloExtensions,
    ExtensionType,
    RawExtension,
    push_alpn,
    push_cookie,
    push_server_key_share,
    push_uint16_list,
)
from .grease import Grease, grease_certificate_request
from .groups import HYBRID_GROUPS, server_exchange
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
    MasterSecret,
    Transcript,
    finished_verify_data,
)
from .limits import EARLY_DATA_SKIP
from .messages import (
    HELLO_RETRY_REQUEST_RANDOM,
    TLS12,
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
    pull_client_hello,
    push_certificate,
    push_certificate_request,
    push_certificate_verify,
    push_client_hello,
    push_encrypted_extensions,
    push_finished,
    push_server_hello,
)
from .peerauth import ExpectPeerCertificate, ExpectPeerFinished, PeerSide
from .proofs import FinishedVerified, PeerAuthenticated, anonymous_peer
from .resumption import Resumed, accept_psk, issue_tickets
from .signatures import (
    CLIENT_CONTEXT,
    SERVER_CONTEXT,
    PrivateKey,
    certificate_verify_input,
    sign,
)
from .state import HandshakeContext, HandshakeState
from .suites import SUITES, SuiteParams


def _illegal(reason: str) -> TLSError:
    return TLSError(AlertDescription.illegal_parameter, reason)


class ServerConnection(Connection):
    """A TLS 1.3 server; mTLS (CertificateRequest) when require_client_certificate."""

    def __init__(self, config: TLSConfig, now: Now = None) -> None:
        credentials = config.all_credentials
        if not credentials:
            raise ValueError("a server needs certificate_chain and private_key")
        key = credentials[0].private_key
        super().__init__(config, now)
        self._state = ExpectClientHello(None, key)

    def _half_rtt_params(self) -> SuiteParams | None:
        # RFC 8446 §4.4.4 / §2.3: a server may send data after its Finished and before
        # the client's ("0.5-RTT data"), to a peer it has not yet authenticated in
        # general. We send it only in a resumption, where the client is already
        # authenticated: the binder proved it holds the ticket's PSK (§4.2.11), the
        # ticket names the identity that earned it, and accept_psk checked that
        # identity's chain again against today's bundles and policy. With psk_dhe_ke
        # only, the keys also need the ClientHello's fresh key share, so even a replayed
        # ClientHello (§8) gets answers that only the client which made it can read; the
        # client's Finished adds liveness, which the replay defences and RFC 8470 cover
        # for what the answer was to. In a full handshake the client's Certificate and
        # Finished are still to come, so nothing goes out before them: the §4.4.4 note.
        state = self._state
        if isinstance(state, ExpectEndOfEarlyData):
            return state.keys.params
        if isinstance(state, ExpectPeerFinished):
            keys = state.keys
            if isinstance(keys, _ServerKeys) and keys.resumed:
                return keys.params
        return None


@dataclass(frozen=True, slots=True)
class _Retry:
    """What a HelloRetryRequest committed the server to (RFC 8446 §4.1.4)."""

    transcript: Transcript
    params: SuiteParams
    group: int
    cookie: bytes | None
    first_hello: ClientHello
    ech: ServerOutcome | None = None


@dataclass(frozen=True, slots=True)
class _Choice:
    params: SuiteParams
    group: int
    client_share: bytes | None
    scheme: int
    alpn: str | None
    credential: Credential
    ech: ServerOutcome | None = None  # RFC 9849: what became of the client's ECH


def _negotiate(ctx: HandshakeContext, ch: ClientHello, ext: ClientHelloExtensions) -> _Choice:
    config = ctx.config
    if ch.legacy_version < TLS12:
        # RFC 8446 §4.1.2: legacy_version MUST be 0x0303; Appendix D.5: 0x0300 or less
        # MUST be refused with protocol_version (an SSL 3.0 hello is an SSL 3.0 client).
        raise TLSError(
            AlertDescription.protocol_version, f"legacy_version 0x{ch.legacy_version:04x}"
        )
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
    # The chain and scheme this client can verify (RFC 8446 §4.4.2.2).
    credential, scheme = require_credential(
        config.all_credentials, ext.signature_algorithms, ext.signature_algorithms_cert
    )
    alpn: str | None = None
    if config.alpn_protocols and ext.alpn is not None:
        for protocol in config.alpn_protocols:
            if protocol.encode("ascii") in ext.alpn:
                alpn = protocol
                break
        else:
            # RFC 7301 §3.2: no overlap is a no_application_protocol alert.
            raise TLSError(AlertDescription.no_application_protocol, "no common ALPN protocol")
    return _Choice(params, group, shared.get(group), scheme, alpn, credential)


class ExpectClientHello(HandshakeState):
    __slots__ = ("key", "retry")

    def __init__(self, retry: _Retry | None, key: PrivateKey) -> None:
        self.retry = retry
        # The first credential's key; the chain and key actually presented are chosen
        # per ClientHello (`_Choice.credential`).
        self.key = key

    @property
    def accepts_ccs(self) -> bool:
        return self.retry is not None

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        if msg_type != HandshakeType.client_hello:
            return super().handle(ctx, msg_type, body, raw)
        ch = pull_client_hello(body)
        retry = self.retry
        if retry is None:
            ctx.begin(ch.random)
        # RFC 9849 §7.1: with ECH accepted, the handshake goes on with the inner hello.
        ech_before = retry.ech if retry is not None else None
        opened, ech = server_receive_ech(ctx.config.ech_keys, ch, ech_before, retry is not None)
        if opened is not ch:
            ch, raw = opened, push_client_hello(opened)
        ext = ClientHelloExtensions.parse(ch.extensions)
        if retry is not None:
            _check_second_hello(retry.first_hello, ch)
        choice = _ech_choice(ctx, ext, _negotiate(ctx, ch, ext), ech)
        share = choice.client_share
        if retry is None:
            if share is None:
                if ext.has_early_data:
                    ctx.skip_early_data(EARLY_DATA_SKIP)  # RFC 8446 §4.2.10
                transcript = Transcript()
                transcript.update(raw)
                return self._send_retry(ctx, ch, choice, transcript, raw)
            resumed = _resume(ctx, ext, choice, raw, None)
            transcript = Transcript()
            transcript.update(raw)
        else:
            # RFC 8446 §4.1.2: the second ClientHello must answer the HelloRetryRequest.
            if ext.cookie != retry.cookie:
                raise _illegal("cookie missing or altered in second ClientHello")
            if (
                ext.key_shares is None
                or len(ext.key_shares) != 1
                or share is None
                or choice.group != retry.group
            ):
                raise _illegal("second ClientHello does not share the requested group")
            if choice.params is not retry.params:
                raise _illegal("second ClientHello changed its parameters")
            transcript = retry.transcript
            resumed = _resume(ctx, ext, choice, raw, transcript)
            transcript.update(raw)
        if ext.has_early_data and (resumed is None or not resumed.early_data):
            # RFC 8446 §4.2.10: rejected 0-RTT is skipped, and the handshake goes on.
            ctx.skip_early_data(EARLY_DATA_SKIP)
        # Offered now or before a HelloRetryRequest (which rejects it): for the outcome.
        early_offered = ext.has_early_data or (
            retry is not None
            and any(t == ExtensionType.early_data for t, _ in retry.first_hello.extensions)
        )
        return _send_server_flight(
            ctx, ch, ext, choice, share, self.key, transcript, resumed, early_offered
        )

    def _send_retry(
        self,
        ctx: HandshakeContext,
        ch: ClientHello,
        choice: _Choice,
        transcript: Transcript,
        raw: bytes,
    ) -> HandshakeState:
        config = ctx.config
        cookie = config.rng(32) if config.send_hrr_cookie else None
        extensions: list[RawExtension] = [
            (ExtensionType.supported_versions, TLS13.to_bytes(2, "big")),
            (ExtensionType.key_share, choice.group.to_bytes(2, "big")),
        ]
        if cookie is not None:
            extensions.append((ExtensionType.cookie, push_cookie(cookie)))
        ech = choice.ech
        if ech is not None and ech.accepted is not None:
            extensions.append((ExtensionType.encrypted_client_hello, bytes(8)))
        hrr = ServerHello(
            HELLO_RETRY_REQUEST_RANDOM, ch.legacy_session_id, choice.params.suite, tuple(extensions)
        )
        params = choice.params
        transcript.restart_after_retry(params.hash_name, raw)
        if ech is not None and ech.accepted is not None:
            # RFC 9849 §7.2.1: the HRR confirms acceptance in its ECH extension.
            confirmation = ech_retry_confirmation(
                params, ch.random, lambda m: transcript.digest_with(params.hash_name, m), hrr
            )
            hrr = replace(hrr, extensions=(*extensions[:-1], (extensions[-1][0], confirmation)))
        ctx.send(transcript, push_server_hello(hrr))
        if ch.legacy_session_id:
            ctx.send_ccs()  # Appendix D.4: right after our first handshake message
        return ExpectClientHello(
            _Retry(transcript, choice.params, choice.group, cookie, ch, ech),
            self.key,
        )


def _ech_choice(
    ctx: HandshakeContext, ext: ClientHelloExtensions, choice: _Choice, ech: ServerOutcome | None
) -> _Choice:
    """RFC 9849 §7.1: a rejected ECH is completed as the public name, with its
    certificate, so the client can trust the retry_configs that come with it."""
    if ech is None:
        return choice
    config = ctx.config
    credential = config.ech_public_credential
    # A GREASE hello (§6.2) names the real server in clear: only a hello for the
    # public name gets the public name's certificate.
    public_names = {key.config.public_name for key in config.ech_keys}
    if (
        ech.accepted is None
        and credential is not None
        and ext.server_name in public_names
        and ext.signature_algorithms
    ):
        selected = select_credential(
            [credential], ext.signature_algorithms, ext.signature_algorithms_cert
        )
        if selected is not None:
            return replace(choice, credential=selected[0], scheme=selected[1], ech=ech)
    return replace(choice, ech=ech)


def _resume(
    ctx: HandshakeContext,
    ext: ClientHelloExtensions,
    choice: _Choice,
    raw: bytes,
    before: Transcript | None,
) -> Resumed | None:
    if ext.pre_shared_key is None:
        return None
    return accept_psk(
        ctx,
        ext.pre_shared_key,
        ext.psk_key_exchange_modes,
        choice.params,
        choice.alpn,
        raw,
        before,
        ext.has_early_data,
    )


# RFC 8446 §4.1.2: what the second ClientHello may change. key_share and
# pre_shared_key may carry new contents in place; early_data is removed, cookie added,
# padding (RFC 7685) resized, added or dropped. Everything else stays as it was.
_REPLACED_IN_SECOND_HELLO = frozenset(
    # RFC 9849 §6.1.5: a second outer hello seals a new payload.
    {ExtensionType.key_share, ExtensionType.pre_shared_key, ExtensionType.encrypted_client_hello}
)
_MAY_COME_OR_GO = frozenset({ExtensionType.cookie, ExtensionType.padding})


def _check_second_hello(first: ClientHello, second: ClientHello) -> None:
    """The ClientHello answering a HelloRetryRequest must be the first one with only the
    changes §4.1.2 lists; any other difference is illegal_parameter."""
    if (
        second.legacy_version != first.legacy_version
        or second.random != first.random
        or second.legacy_session_id != first.legacy_session_id
        or second.cipher_suites != first.cipher_suites
        or second.legacy_compression_methods != first.legacy_compression_methods
    ):
        raise _illegal("second ClientHello changed a field other than its extensions")
    before = [
        (t, d)
        for t, d in first.extensions
        if t != ExtensionType.early_data and t not in _MAY_COME_OR_GO
    ]
    after: list[RawExtension] = []
    for ext_type, data in second.extensions:
        if ext_type == ExtensionType.early_data:
            # §4.2.10: a client MUST NOT send early_data after a HelloRetryRequest.
            raise _illegal("early_data in the second ClientHello")
        if ext_type not in _MAY_COME_OR_GO:
            after.append((ext_type, data))
    if len(before) != len(after):
        raise _illegal("second ClientHello added or dropped an extension")
    for (type1, data1), (type2, data2) in zip(before, after, strict=True):
        if type1 != type2:
            raise _illegal("second ClientHello reordered its extensions")
        if data1 != data2 and type1 not in _REPLACED_IN_SECOND_HELLO:
            raise _illegal(f"second ClientHello changed extension {type1}")


def _send_server_flight(
    ctx: HandshakeContext,
    ch: ClientHello,
    ext: ClientHelloExtensions,
    choice: _Choice,
    client_share: bytes,
    key: PrivateKey,
    transcript: Transcript,
    resumed: Resumed | None = None,
    early_offered: bool = False,
) -> HandshakeState:
    config = ctx.config
    params = choice.params
    server_share, shared = server_exchange(choice.group, client_share, config.rng)
    sh_ext: tuple[RawExtension, ...] = (
        (ExtensionType.key_share, push_server_key_share(choice.group, server_share)),
        (ExtensionType.supported_versions, TLS13.to_bytes(2, "big")),
    )
    if resumed is not None:
        # RFC 8446 §4.2.11: the selected identity (first, as RFC 8448 §4 orders it).
        sh_ext = ((ExtensionType.pre_shared_key, resumed.index.to_bytes(2, "big")), *sh_ext)
    sh = ServerHello(config.rng(32), ch.legacy_session_id, params.suite, sh_ext)
    transcript.select_hash(params.hash_name)
    if choice.ech is not None and choice.ech.accepted is not None:
        # RFC 9849 §7.2: the last 8 bytes of ServerHello.random confirm acceptance.
        confirmation = server_hello_confirmation(
            params, ch.random, lambda m: transcript.digest_with(params.hash_name, m), sh
        )
        sh = replace(sh, random=sh.random[:24] + confirmation)
    early_secret = EarlySecret.start(params, resumed.state.psk if resumed is not None else None)
    client_early: bytes | None = None
    if resumed is not None and resumed.early_data:
        # RFC 8446 §7.1: client_early_traffic_secret covers the ClientHello alone.
        client_early = early_secret.client_early_traffic_secret(transcript.digest())
    ctx.send(transcript, push_server_hello(sh))
    if ch.legacy_session_id:
        ctx.send_ccs()
    th = transcript.digest()
    hs = early_secret.handshake(shared)
    client_hs = hs.client_traffic_secret(th)
    server_hs = hs.server_traffic_secret(th)
    ctx.log_secret(CLIENT_HANDSHAKE, client_hs)
    ctx.log_secret(SERVER_HANDSHAKE, server_hs)
    ctx.install_write_keys(params, server_hs)
    if client_early is not None:
        ctx.log_secret(CLIENT_EARLY, client_early)
        ctx.install_read_keys(params, client_early)
    else:
        ctx.install_read_keys(params, client_hs)

    ee_ext: list[RawExtension] = []
    if choice.alpn is not None:
        ee_ext.append(
            (
                ExtensionType.application_layer_protocol_negotiation,
                push_alpn([choice.alpn.encode("ascii")]),
            )
        )
    if client_early is not None:
        ee_ext.append((ExtensionType.early_data, b""))  # RFC 8446 §4.2.10: accepted
    if choice.ech is not None and choice.ech.accepted is None:
        # RFC 9849 §7.1: rejected, the current config goes back as retry_configs.
        retry_configs = push_config_list([config.ech_keys[0].config])
        ee_ext.append((ExtensionType.encrypted_client_hello, retry_configs))
    ctx.send(transcript, push_encrypted_extensions(EncryptedExtensions(tuple(ee_ext))))
    if resumed is not None:
        # RFC 8446 §2.2: a PSK handshake authenticates with the PSK, no certificates.
        return _resumed_flight(
            ctx, ext, choice, transcript, hs, client_hs, server_hs, resumed, early_offered
        )
    if config.require_client_certificate:
        cr_ext: tuple[RawExtension, ...] = (
            (ExtensionType.signature_algorithms, push_uint16_list(config.signature_schemes)),
            (
                ExtensionType.signature_algorithms_cert,
                push_uint16_list(config.certificate_signature_schemes),
            ),
        )
        if config.grease:
            cr_ext = grease_certificate_request(cr_ext, Grease.draw(config.rng))  # RFC 8701 §4
        ctx.send(transcript, push_certificate_request(CertificateRequest(b"", cr_ext)))
    entries = tuple(CertificateEntry(der) for der in choice.credential.chain_der)
    ctx.send(transcript, push_certificate(Certificate(b"", entries)))
    signature = sign(
        choice.credential.private_key,
        choice.scheme,
        certificate_verify_input(SERVER_CONTEXT, transcript.digest()),
    )
    ctx.send(transcript, push_certificate_verify(CertificateVerify(choice.scheme, signature)))
    ctx.send(
        transcript,
        push_finished(Finished(finished_verify_data(params, server_hs, transcript.digest()))),
    )

    th = transcript.digest()
    master = hs.master()
    client_ap = master.client_application_traffic_secret(th)
    server_ap = master.server_application_traffic_secret(th)
    ctx.log_secret(SERVER_TRAFFIC_0, server_ap)
    ctx.log_secret(CLIENT_TRAFFIC_0, client_ap)
    ctx.log_secret(EXPORTER, master.exporter_master_secret(th))
    ctx.install_write_keys(params, server_ap)
    early = "rejected" if early_offered else "none"
    keys = _ServerKeys(
        params, master, client_hs, client_ap, server_ap, choice, ext.server_name, False, early
    )
    if config.require_client_certificate:
        return ExpectPeerCertificate(CLIENT_PEER, transcript, keys)
    return ExpectPeerFinished(CLIENT_PEER, transcript, keys, anonymous_peer())


def _resumed_flight(
    ctx: HandshakeContext,
    ext: ClientHelloExtensions,
    choice: _Choice,
    transcript: Transcript,
    hs: HandshakeSecret,
    client_hs: bytes,
    server_hs: bytes,
    resumed: Resumed,
    early_offered: bool,
) -> HandshakeState:
    """After EncryptedExtensions of a resumption: Finished, then the client's
    [early data, EndOfEarlyData,] Finished."""
    params = choice.params
    ctx.send(
        transcript,
        push_finished(Finished(finished_verify_data(params, server_hs, transcript.digest()))),
    )
    th = transcript.digest()
    master = hs.master()
    client_ap = master.client_application_traffic_secret(th)
    server_ap = master.server_application_traffic_secret(th)
    ctx.log_secret(SERVER_TRAFFIC_0, server_ap)
    ctx.log_secret(CLIENT_TRAFFIC_0, client_ap)
    ctx.log_secret(EXPORTER, master.exporter_master_secret(th))
    ctx.install_write_keys(params, server_ap)
    early = "accepted" if resumed.early_data else "rejected" if early_offered else "none"
    keys = _ServerKeys(
        params, master, client_hs, client_ap, server_ap, choice, ext.server_name, True, early
    )
    peer = resumed.peer.peer
    if peer is not None:
        ctx.emit(PeerCertificate(peer.spiffe_id, peer.chain))
    if resumed.early_data:
        return ExpectEndOfEarlyData(transcript, keys, resumed, resumed.state.max_early_data)
    return ExpectPeerFinished(CLIENT_PEER, transcript, keys, resumed.peer)


class ExpectEndOfEarlyData(HandshakeState):
    """0-RTT accepted: application data is early data until EndOfEarlyData (§4.5)."""

    __slots__ = ("keys", "remaining", "resumed", "transcript")

    def __init__(
        self, transcript: Transcript, keys: _ServerKeys, resumed: Resumed, limit: int
    ) -> None:
        self.transcript = transcript
        self.keys = keys
        self.resumed = resumed
        self.remaining = limit

    @property
    def accepts_early_data(self) -> bool:
        return True

    def receive_early_data(self, length: int) -> None:
        if length > self.remaining:
            # RFC 8446 §4.2.10: more than max_early_data_size is unexpected_message.
            raise TLSError(
                AlertDescription.unexpected_message, "early data over the ticket's limit"
            )
        self.remaining -= length

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        if msg_type != HandshakeType.end_of_early_data:
            return super().handle(ctx, msg_type, body, raw)
        if body:
            raise TLSError(AlertDescription.decode_error, "EndOfEarlyData with a body")
        self.transcript.update(raw)
        keys = self.keys
        ctx.install_read_keys(keys.params, keys.client_hs_secret)
        return ExpectPeerFinished(CLIENT_PEER, self.transcript, keys, self.resumed.peer)


@dataclass(frozen=True, slots=True)
class _ServerKeys:
    params: SuiteParams
    master: MasterSecret
    client_hs_secret: bytes
    client_ap_secret: bytes
    server_ap_secret: bytes
    choice: _Choice
    server_name: str | None
    resumed: bool = False
    early_data: str = "none"

    @property
    def peer_handshake_secret(self) -> bytes:
        return self.client_hs_secret


def _finish(
    ctx: HandshakeContext,
    transcript: Transcript,
    keys: _ServerKeys,
    authenticated: PeerAuthenticated,
    finished: FinishedVerified,
) -> Traffic:
    """The client's Finished verified: read with the client's application secret."""
    params = keys.params
    resumption = keys.master.resumption_master_secret(transcript.digest())
    ctx.install_read_keys(params, keys.client_ap_secret)
    peer = authenticated.peer
    info = HandshakeComplete(
        cipher_suite=params.suite,
        group=keys.choice.group,
        signature_scheme=authenticated.scheme,
        alpn_protocol=keys.choice.alpn,
        server_name=keys.server_name,
        peer_spiffe_id=peer.spiffe_id if peer is not None else None,
        session_resumed=keys.resumed,
        early_data=keys.early_data,
        ech=keys.choice.ech.label if keys.choice.ech is not None else "none",
    )
    ctx.emit(info)
    issue_tickets(ctx, transcript, params, resumption, keys.choice.alpn, peer)
    return Traffic(
        finished,
        authenticated,
        params,
        keys.client_ap_secret,
        keys.server_ap_secret,
        resumption,
        info,
    )


# The server authenticates a client: RFC 8446 §4.4.2.4 lets it abort on an empty
# Certificate with certificate_required, which mTLS does.
CLIENT_PEER: PeerSide[_ServerKeys] = PeerSide(
    peer_is_server=False,
    signature_context=CLIENT_CONTEXT,
    context_error="certificate_request_context mismatch",
    empty_alert=AlertDescription.certificate_required,
    empty_reason="client sent no certificate",
    finish=_finish,
)
