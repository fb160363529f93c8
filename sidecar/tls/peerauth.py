"""Authenticating the peer: its Certificate, CertificateVerify and Finished (RFC 8446 §4.4).

Client and server mirror each other here: each verifies the other's chain, the other's
signature over the transcript and the other's Finished MAC, and only the context string,
a few alerts and what happens after the Finished differ. `PeerSide` holds those
differences; the three states below are the same code for both sides.

    ExpectPeerCertificate        (the chain verifies and passes the policy: VerifiedPeer)
      -> ExpectPeerCertificateVerify   (the key signed the transcript: PeerAuthenticated)
      -> ExpectPeerFinished            (the MAC matches: FinishedVerified)
      -> PeerSide.finish(...)          (the side's last step, ending in Traffic)

A server that does not ask for a client certificate starts at `ExpectPeerFinished` with
`proofs.anonymous_peer()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from .alerts import AlertDescription, TLSError
from .events import PeerCertificate
from .extensions import ALLOWED_IN_CERTIFICATE_ENTRY, check_response_extensions
from .keyschedule import Transcript
from .limits import check_certificate_entries
from .messages import HandshakeType, pull_certificate, pull_certificate_verify, pull_finished
from .proofs import FinishedVerified, PeerAuthenticated, verify_certificate_verify, verify_finished
from .state import HandshakeContext, HandshakeState
from .suites import SuiteParams
from .verify import PeerVerifier, VerifiedPeer, insecure_peer

__all__ = [
    "ExpectPeerCertificate",
    "ExpectPeerCertificateVerify",
    "ExpectPeerFinished",
    "PeerKeys",
    "PeerSide",
]


class PeerKeys(Protocol):
    """What the peer-authentication states need of a side's handshake keys."""

    @property
    def params(self) -> SuiteParams: ...

    @property
    def peer_handshake_secret(self) -> bytes:
        """The peer's handshake traffic secret: the base key of its Finished (§4.4.4)."""
        ...


K = TypeVar("K", bound=PeerKeys)

Finish = Callable[
    [HandshakeContext, Transcript, K, PeerAuthenticated, FinishedVerified], HandshakeState
]


@dataclass(frozen=True, slots=True)
class PeerSide(Generic[K]):
    """How authenticating a server (on the client) differs from authenticating a client."""

    peer_is_server: bool
    # RFC 8446 §4.4.3: the context string of the *peer's* CertificateVerify.
    signature_context: bytes
    # RFC 8446 §4.4.2: the certificate_request_context the peer must echo (empty here).
    context_error: str
    # RFC 8446 §4.4.2.4: an empty Certificate.
    empty_alert: AlertDescription
    empty_reason: str
    # After the peer's Finished verified: the side's last step, returning `Traffic`.
    finish: Finish[K]
    # Replaces the config's verifier: a client whose ECH was rejected authenticates the
    # outer handshake against the public name (RFC 9849 §6.1.7), not a SPIFFE ID.
    verifier: PeerVerifier | None = None


def _peer_from_certificate(ctx: HandshakeContext, side: PeerSide[K], body: bytes) -> VerifiedPeer:
    cert = pull_certificate(body)
    if cert.request_context:
        raise TLSError(AlertDescription.illegal_parameter, side.context_error)
    check_certificate_entries(len(cert.entries))
    for entry in cert.entries:
        check_response_extensions(entry.extensions, frozenset(), ALLOWED_IN_CERTIFICATE_ENTRY)
    if not cert.entries:
        raise TLSError(side.empty_alert, side.empty_reason)
    chain = [entry.cert_data for entry in cert.entries]
    config = ctx.config
    if side.verifier is not None:
        return side.verifier.verify(
            chain, ctx.now, side.peer_is_server, config.certificate_signature_schemes
        )
    verifier = config.peer_verifier
    if not config.verify_peer or verifier is None:
        return insecure_peer(chain)
    return verifier.verify(
        chain, ctx.now, side.peer_is_server, config.certificate_signature_schemes
    )


class ExpectPeerCertificate(HandshakeState, Generic[K]):
    __slots__ = ("keys", "side", "transcript")

    def __init__(self, side: PeerSide[K], transcript: Transcript, keys: K) -> None:
        self.side = side
        self.transcript = transcript
        self.keys = keys

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        if msg_type != HandshakeType.certificate:
            return super().handle(ctx, msg_type, body, raw)
        peer = _peer_from_certificate(ctx, self.side, body)
        self.transcript.update(raw)
        return ExpectPeerCertificateVerify(self.side, self.transcript, self.keys, peer)


class ExpectPeerCertificateVerify(HandshakeState, Generic[K]):
    __slots__ = ("keys", "peer", "side", "transcript")

    def __init__(
        self, side: PeerSide[K], transcript: Transcript, keys: K, peer: VerifiedPeer
    ) -> None:
        self.side = side
        self.transcript = transcript
        self.keys = keys
        self.peer = peer

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        if msg_type != HandshakeType.certificate_verify:
            return super().handle(ctx, msg_type, body, raw)
        authenticated = verify_certificate_verify(
            self.peer,
            pull_certificate_verify(body),
            ctx.config.signature_schemes,
            self.side.signature_context,
            self.transcript.digest(),
        )
        self.transcript.update(raw)
        ctx.emit(PeerCertificate(self.peer.spiffe_id, self.peer.chain))
        return ExpectPeerFinished(self.side, self.transcript, self.keys, authenticated)


class ExpectPeerFinished(HandshakeState, Generic[K]):
    __slots__ = ("authenticated", "keys", "side", "transcript")

    def __init__(
        self,
        side: PeerSide[K],
        transcript: Transcript,
        keys: K,
        authenticated: PeerAuthenticated,
    ) -> None:
        self.side = side
        self.transcript = transcript
        self.keys = keys
        self.authenticated = authenticated

    def handle(
        self, ctx: HandshakeContext, msg_type: int, body: bytes, raw: bytes
    ) -> HandshakeState:
        if msg_type != HandshakeType.finished:
            return super().handle(ctx, msg_type, body, raw)
        keys = self.keys
        finished = verify_finished(
            keys.params,
            keys.peer_handshake_secret,
            self.transcript.digest(),
            pull_finished(body, keys.params.hash_len).verify_data,
        )
        self.transcript.update(raw)
        return self.side.finish(ctx, self.transcript, keys, self.authenticated, finished)
