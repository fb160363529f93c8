"""Proof values (after rustls's `ServerVerified`/`FinishedVerified`).

The traffic state can only be constructed from these, and only the verification
functions below can construct them: a handshake path that skips a check cannot reach
application data (the lesson of OpenSSL's EarlyCCS and the SMACK state-machine bugs).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from .alerts import AlertDescription, TLSError
from .keyschedule import finished_verify_data
from .messages import CertificateVerify
from .signatures import certificate_verify_input, verify
from .suites import SuiteParams
from .verify import VerifiedPeer

_TOKEN = object()


class FinishedVerified:
    """The peer's Finished MAC matched the transcript."""

    __slots__ = ()

    def __init__(self, token: object) -> None:
        if token is not _TOKEN:
            raise TypeError("FinishedVerified is created only by verify_finished()")


class PeerAuthenticated:
    """The peer proved possession of its verified certificate's key, or was allowed to
    stay anonymous (a server that does not require client certificates)."""

    __slots__ = ("peer", "scheme")

    def __init__(self, token: object, peer: VerifiedPeer | None, scheme: int) -> None:
        if token is not _TOKEN:
            raise TypeError("PeerAuthenticated is created only by the verifiers")
        self.peer = peer
        self.scheme = scheme


def verify_finished(
    params: SuiteParams, base_key: bytes, transcript_hash: bytes, verify_data: bytes
) -> FinishedVerified:
    expected = finished_verify_data(params, base_key, transcript_hash)
    if not hmac.compare_digest(expected, verify_data):
        # RFC 8446 §4.4.4: a wrong Finished is decrypt_error.
        raise TLSError(AlertDescription.decrypt_error, "Finished does not match the transcript")
    return FinishedVerified(_TOKEN)


def verify_certificate_verify(
    peer: VerifiedPeer,
    message: CertificateVerify,
    offered: Sequence[int],
    context: bytes,
    transcript_hash: bytes,
) -> PeerAuthenticated:
    if message.algorithm not in offered:
        # RFC 8446 §4.4.3: the algorithm MUST be one offered in signature_algorithms.
        raise TLSError(
            AlertDescription.illegal_parameter, "CertificateVerify with unoffered scheme"
        )
    data = certificate_verify_input(context, transcript_hash)
    verify(peer.public_key, message.algorithm, message.signature, data, peer.rsa_pss_key)
    return PeerAuthenticated(_TOKEN, peer, message.algorithm)


def verify_binder(
    params: SuiteParams,
    binder_key: bytes,
    transcript_hash: bytes,
    binder: bytes,
    peer: VerifiedPeer | None,
) -> PeerAuthenticated:
    """RFC 8446 §4.2.11: the binder proves the client holds the ticket's PSK, so it stands
    for the peer the ticket was issued to (`peer`, re-verified by the caller)."""
    expected = finished_verify_data(params, binder_key, transcript_hash)
    if not hmac.compare_digest(expected, binder):
        # RFC 8446 §6.2: a PSK binder that does not validate is decrypt_error.
        raise TLSError(AlertDescription.decrypt_error, "PSK binder does not match")
    return PeerAuthenticated(_TOKEN, peer, 0)


def psk_server(peer: VerifiedPeer) -> PeerAuthenticated:
    """A server that accepted our PSK (RFC 8446 §2.2): it is the server of the handshake
    that issued the ticket, as its Finished, keyed by the PSK, proves next; `peer` is
    that handshake's chain, verified again against today's bundles by the caller."""
    return PeerAuthenticated(_TOKEN, peer, 0)


def anonymous_peer() -> PeerAuthenticated:
    """A client that sent no certificate to a server that did not require one."""
    return PeerAuthenticated(_TOKEN, None, 0)
