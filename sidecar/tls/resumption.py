"""Resumption with session tickets and 0-RTT (RFC 8446 §2.2, §2.3, §4.2.10, §4.2.11, §8).

Server side
-----------
* `issue_tickets` seals `TicketState` under the STEK ring after a handshake completes.
  The lifetime is `TLSConfig.ticket_lifetime` (at most 7 days, §4.6.1) and never past
  the peer's certificates' notAfter: a ticket must not outlive the identity it vouches for.
* `accept_psk` picks the first offered ticket that opens, is alive, matches the suite's
  hash and whose peer chain still verifies against today's bundles and policy; anything
  else is a full handshake, never an error (a client's stale ticket is normal). The one
  error is a wrong binder on the ticket chosen: decrypt_error (§4.2.11, §6.2).
* Only `psk_dhe_ke` is accepted: every resumption runs a fresh (EC)DHE/ML-KEM exchange,
  so a STEK that leaks later exposes no resumed 1-RTT traffic (§2.2, §E.6).
* Early data is accepted only for the first identity, the ticket's suite and ALPN, a
  ticket age within `early_data_window` of the server's view (§8.3), in strict mode only
  at the issuing replica, and only once: the `ReplayCache` admits each ticket once and
  turns early data away when full (§8.1, §8.2).

Client side
-----------
* `take_offer` takes one ticket (single use, §C.4) for (endpoint, expected SPIFFE ID) and
  re-verifies the chain the server showed when it was issued; `bind_psk` writes the
  pre_shared_key extension last with its binder (§4.2.11.2).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .alerts import TLSError
from .codec import Writer
from .extensions import ExtensionType, OfferedPsks, RawExtension, push_offered_psks
from .grease import Grease, grease_ticket_extensions
from .keyschedule import EarlySecret, Transcript, finished_verify_data, resumption_psk
from .messages import (
    ClientHello,
    NewSessionTicket,
    push_client_hello,
    push_new_session_ticket,
)
from .proofs import PeerAuthenticated, verify_binder
from .suites import SUITES, SuiteParams
from .tickets import MAX_CHAIN_BYTES, TicketState, chain_sha256
from .verify import VerifiedPeer, insecure_peer

if TYPE_CHECKING:
    from .config import TLSConfig
    from .state import HandshakeContext
    from .ticketstore import StoredTicket

__all__ = [
    "ClientOffer",
    "Resumed",
    "accept_psk",
    "bind_psk",
    "bind_psk_encoded",
    "issue_tickets",
    "take_offer",
]

PSK_DHE_KE = 1
# Tickets tried per ClientHello: each costs an AEAD open and maybe a chain check before
# the client has proved anything; a real client offers one.
MAX_TICKETS_TRIED = 4
_U32 = 1 << 32


def _seconds(now: dt.datetime) -> float:
    return now.timestamp()


@lru_cache(maxsize=512)
def certificate_der(cert: x509.Certificate) -> bytes:
    """A peer certificate's DER, once per certificate: the verifier hands out the same
    parsed objects for a peer's SVID, and each ticket (issued or received) carries the
    chain, so re-encoding it per handshake would be most of a ticket's cost."""
    return cert.public_bytes(Encoding.DER)


@dataclass(frozen=True, slots=True)
class Resumed:
    """The ticket a server accepted: its index, its contents, the re-verified peer."""

    index: int
    state: TicketState
    peer: PeerAuthenticated
    early_data: bool


def _reverify(ctx: HandshakeContext, state: TicketState) -> tuple[bool, VerifiedPeer | None]:
    """(True, the ticket's peer verified again now, or None for an anonymous peer), or
    (False, None) if the chain no longer verifies or no longer names the same SPIFFE ID."""
    config = ctx.config
    if not state.chain:
        return (not config.require_client_certificate, None)
    verifier = config.peer_verifier
    try:
        if not config.verify_peer or verifier is None:
            peer = insecure_peer(state.chain)
        else:
            peer = verifier.verify(
                state.chain, ctx.now, False, config.certificate_signature_schemes
            )
    except TLSError:
        return (False, None)
    spiffe_id = str(peer.spiffe_id) if peer.spiffe_id is not None else None
    return (True, peer) if spiffe_id == state.peer_spiffe_id else (False, None)


def accept_psk(
    ctx: HandshakeContext,
    offered: OfferedPsks,
    modes: tuple[int, ...],
    params: SuiteParams,
    alpn: str | None,
    raw_hello: bytes,
    before: Transcript | None,
    early_offered: bool,
) -> Resumed | None:
    """The resumption to run for this ClientHello, or None for a full handshake.

    `before` is the transcript preceding this ClientHello (after a HelloRetryRequest),
    None for a first ClientHello."""
    config = ctx.config
    ring = config.ticket_ring
    if ring is None or PSK_DHE_KE not in modes:
        # RFC 8446 §4.2.9: without psk_dhe_ke we would have to resume without a fresh
        # key exchange, which Trellis never does.
        return None
    now = _seconds(ctx.now)
    now_ms = int(now * 1000)
    for index, (identity, obfuscated_age) in enumerate(offered.identities[:MAX_TICKETS_TRIED]):
        plaintext = ring.open(identity, now)
        if plaintext is None:
            continue
        state = TicketState.decode(plaintext)
        if state is None:
            ring.count_corrupt()
            continue
        # Issued "in the future" by up to the early-data window: another replica's clock
        # may run that far ahead (the age check below still bounds 0-RTT).
        skew_ms = int(config.early_data_window * 1000)
        if not state.issued_ms - skew_ms <= now_ms < state.issued_ms + state.lifetime * 1000:
            continue
        ticket_params = SUITES.get(state.cipher_suite)
        if ticket_params is None or ticket_params.hash_name != params.hash_name:
            # RFC 8446 §4.2.11: the PSK's hash must be the selected suite's.
            continue
        valid, peer = _reverify(ctx, state)
        if not valid:
            continue
        truncated = raw_hello[: len(raw_hello) - offered.binders_length]
        if before is None:
            binder_hash = hashlib.new(params.hash_name, truncated).digest()
        else:
            binder_hash = before.digest_with(params.hash_name, truncated)
        binder_key = EarlySecret.start(params, state.psk).binder_key()
        authenticated = verify_binder(params, binder_key, binder_hash, offered.binders[index], peer)
        early = (
            early_offered
            and before is None
            and index == 0
            and _early_data_acceptable(config, state, params, alpn, obfuscated_age, now_ms)
            and config.replay_cache is not None
            # RFC 8446 §8.1: the single-use check comes last, so only a ClientHello
            # that would otherwise be accepted spends the ticket's one early-data use.
            and config.replay_cache.admit(identity, now, now + 2 * config.early_data_window)
        )
        return Resumed(index, state, authenticated, early)
    return None


def _early_data_acceptable(
    config: TLSConfig,
    state: TicketState,
    params: SuiteParams,
    alpn: str | None,
    obfuscated_age: int,
    now_ms: int,
) -> bool:
    if not config.max_early_data or not state.max_early_data:
        return False
    if state.cipher_suite != params.suite or state.alpn != alpn:
        # RFC 8446 §4.2.10: same suite and ALPN as the ticket's connection.
        return False
    if config.early_data_strict and state.replica_id != config.replica_id:
        # Another replica's single-use cache saw this ticket, not ours.
        return False
    # RFC 8446 §8.3: the client's view of the ticket's age against ours.
    client_age_ms = (obfuscated_age - state.age_add) % _U32
    server_age_ms = now_ms - state.issued_ms
    return abs(server_age_ms - client_age_ms) <= config.early_data_window * 1000


def issue_tickets(
    ctx: HandshakeContext,
    transcript: Transcript,
    params: SuiteParams,
    resumption_master_secret: bytes,
    alpn: str | None,
    peer: VerifiedPeer | None,
) -> None:
    """Queue `session_tickets` NewSessionTickets (RFC 8446 §4.6.1) under the ring."""
    config = ctx.config
    ring = config.ticket_ring
    if ring is None or config.session_tickets <= 0:
        return
    now = ctx.now
    if not ring.can_seal(_seconds(now)):
        return
    lifetime = config.ticket_lifetime
    chain: tuple[bytes, ...] = ()
    spiffe_id: str | None = None
    if peer is not None:
        chain = tuple(certificate_der(cert) for cert in peer.chain)
        if sum(len(der) + 3 for der in chain) > MAX_CHAIN_BYTES:
            return  # a ticket we would refuse to open (tickets.py): send none
        spiffe_id = str(peer.spiffe_id) if peer.spiffe_id is not None else None
        not_after = min(cert.not_valid_after_utc for cert in peer.chain)
        lifetime = min(lifetime, int((not_after - now).total_seconds()))
    if lifetime <= 0:
        return
    early = config.max_early_data if config.replay_cache is not None else 0
    extensions: tuple[RawExtension, ...] = ()
    if early:
        w = Writer()
        w.push_uint32(early)  # RFC 8446 §4.2.10: max_early_data_size
        extensions = ((ExtensionType.early_data, w.data()),)
    if config.grease:
        extensions = grease_ticket_extensions(extensions, Grease.draw(config.rng))  # RFC 8701 §4
    issued_ms = int(_seconds(now) * 1000)
    hashed = chain_sha256(chain)
    for number in range(config.session_tickets):
        nonce = number.to_bytes(1, "big")
        age_add = int.from_bytes(config.rng(4), "big")
        state = TicketState(
            psk=resumption_psk(params, resumption_master_secret, nonce),
            cipher_suite=params.suite,
            alpn=alpn,
            peer_spiffe_id=spiffe_id,
            chain_hash=hashed,
            chain=chain,
            issued_ms=issued_ms,
            lifetime=lifetime,
            age_add=age_add,
            max_early_data=early,
            replica_id=config.replica_id,
        )
        ticket = ring.seal(state.encode(), config.rng(12))
        message = NewSessionTicket(lifetime, age_add, nonce, ticket, extensions)
        ctx.send(transcript, push_new_session_ticket(message))


# --- client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientOffer:
    """A ticket the client offers, with the server re-verified from its stored chain."""

    stored: StoredTicket
    params: SuiteParams
    peer: VerifiedPeer

    def obfuscated_age(self, now: float) -> int:
        # RFC 8446 §4.2.11.1: age in milliseconds plus ticket_age_add, modulo 2^32.
        age_ms = max(0, int((now - self.stored.received) * 1000))
        return (age_ms + self.stored.ticket.age_add) % _U32


def take_offer(config: TLSConfig, key: tuple[str, str], now: dt.datetime) -> ClientOffer | None:
    store = config.ticket_store
    if store is None:
        return None
    stored = store.take(key, _seconds(now), config.trust_generation)
    if stored is None:
        return None
    ticket = stored.ticket
    params = SUITES.get(ticket.cipher_suite)
    if params is None or ticket.cipher_suite not in config.cipher_suites or not ticket.peer_chain:
        return None
    verifier = config.peer_verifier
    try:
        if not config.verify_peer or verifier is None:
            peer = insecure_peer(ticket.peer_chain)
        else:
            # The server's chain as it was, against today's bundles and policy.
            peer = verifier.verify(
                ticket.peer_chain, now, True, config.certificate_signature_schemes
            )
    except TLSError:
        return None
    if peer.spiffe_id != ticket.peer_spiffe_id:
        return None
    return ClientOffer(stored, params, peer)


def bind_psk(
    hello: ClientHello, offer: ClientOffer, now: float, before: Transcript | None
) -> ClientHello:
    """`hello` with pre_shared_key last, its binder computed over the truncated
    ClientHello (and, after a HelloRetryRequest, the transcript `before` it)."""
    return bind_psk_encoded(hello, offer, now, before)[0]


def bind_psk_encoded(
    hello: ClientHello, offer: ClientOffer, now: float, before: Transcript | None
) -> tuple[ClientHello, bytes]:
    """`bind_psk` and the bound ClientHello's encoding, serialised once: the binder is
    the message's last `hash_len` bytes, so it is written into the truncated encoding."""
    params = offer.params
    identity = (offer.stored.ticket.ticket, offer.obfuscated_age(now))
    placeholder = push_offered_psks([identity], [bytes(params.hash_len)])
    extensions = [(t, d) for t, d in hello.extensions if t != ExtensionType.pre_shared_key]
    raw = push_client_hello(
        ClientHello(
            hello.random,
            hello.legacy_session_id,
            hello.cipher_suites,
            hello.legacy_compression_methods,
            (*extensions, (ExtensionType.pre_shared_key, placeholder)),
            hello.legacy_version,
        )
    )
    # The encoding ends with the binders list: uint16 length, uint8 length, the binder.
    truncated = raw[: len(raw) - params.hash_len]
    # RFC 8446 §4.2.11.2: the binder covers the ClientHello up to the binders list.
    covered = truncated[: len(truncated) - 3]
    if before is None:
        binder_hash = hashlib.new(params.hash_name, covered).digest()
    else:
        binder_hash = before.digest_with(params.hash_name, covered)
    early = EarlySecret.start(params, offer.stored.ticket.psk)
    binder = finished_verify_data(params, early.binder_key(), binder_hash)
    bound = ClientHello(
        hello.random,
        hello.legacy_session_id,
        hello.cipher_suites,
        hello.legacy_compression_methods,
        (*extensions, (ExtensionType.pre_shared_key, placeholder[: -params.hash_len] + binder)),
        hello.legacy_version,
    )
    return bound, truncated + binder
