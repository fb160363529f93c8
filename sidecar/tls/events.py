"""Events the engine hands to its caller (frozen dataclasses, as in h11/h2)."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from ca.spiffeid import SpiffeId

from .alerts import AlertDescription, AlertLevel


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything `events()` yields."""


@dataclass(frozen=True, slots=True)
class PeerCertificate(Event):
    """The peer's chain verified and its SPIFFE ID passed the policy hook.

    `spiffe_id` is the canonical value parsed from the leaf's URI SAN (None only when
    verification is off and the leaf carries no SPIFFE ID)."""

    spiffe_id: SpiffeId | None
    chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    cipher_suite: int
    group: int
    signature_scheme: int
    alpn_protocol: str | None
    server_name: str | None
    peer_spiffe_id: SpiffeId | None
    # A ticket was used (RFC 8446 §2.2): no certificate was exchanged, so
    # signature_scheme is 0, and the peer is the one the ticket's handshake verified.
    session_resumed: bool = False
    # RFC 8446 §4.2.10: "none" (not offered), "accepted" or "rejected". On a rejection
    # the client's early data never reached the server: the caller sends it again.
    early_data: str = "none"
    # RFC 9849: "accepted" (the inner ClientHello was used), "rejected" (server only: the
    # outer one, with retry_configs sent), "grease" (client: a GREASE extension, §6.2)
    # or "none". A client whose real ECH was rejected never completes (ech.ECHRejected).
    ech: str = "none"


@dataclass(frozen=True, slots=True)
class ApplicationData(Event):
    """Bytes from the peer. `early` marks 0-RTT data (RFC 8446 §2.3): it may be a
    replay, so a server hands it only to requests that are safe to repeat, e.g. HTTP
    marks it `Early-Data: 1` and answers others `425 Too Early` (RFC 8470 §5)."""

    data: bytes
    early: bool = False


@dataclass(frozen=True, slots=True)
class KeyUpdated(Event):
    """A traffic key changed. `direction` is "read" or "write"; `requested` says whether
    the update was asked for (by the peer for "write", by us for "read")."""

    direction: str
    requested: bool


@dataclass(frozen=True, slots=True)
class SessionTicket(Event):
    """A NewSessionTicket (RFC 8446 §4.6.1) with the PSK it stands for.

    Everything a later resumption needs: the ticket, its PSK, the suite whose hash the
    PSK belongs to, and what was negotiated with the identity the ticket vouches for.
    """

    ticket: bytes
    lifetime: int
    age_add: int
    nonce: bytes
    psk: bytes
    cipher_suite: int
    max_early_data_size: int
    server_name: str | None
    alpn_protocol: str | None
    peer_spiffe_id: SpiffeId | None
    # The server's chain (DER) as verified, so a resumption can re-check it.
    peer_chain: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class AlertReceived(Event):
    level: AlertLevel | int
    description: AlertDescription | int


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer's direction ended: `clean` after close_notify, False on a fatal alert or
    a bare EOF (a possible truncation attack, RFC 8446 §6.1)."""

    clean: bool
