"""TLSConfig: everything a connection needs, fixed before the first byte."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509

from .credentials import Credential
from .ech import ECHConfig, ECHKey, parse_config_list
from .groups import DEFAULT_GROUPS, DEFAULT_KEY_SHARES, NamedGroup
from .keylog import KeyLogCallback
from .limits import MAX_EARLY_DATA
from .messages import MAX_TICKET_LIFETIME
from .replay import ReplayCache
from .signatures import (
    DEFAULT_CERTIFICATE_SIGNATURE_SCHEMES,
    DEFAULT_SIGNATURE_SCHEMES,
    PrivateKey,
    SignatureScheme,
)
from .suites import DEFAULT_CIPHER_SUITES, CipherSuite
from .tickets import StekRing
from .ticketstore import TicketStore
from .verify import PeerPolicy, PeerVerifier, SpiffeVerifier

Rng = Callable[[int], bytes]


@dataclass(frozen=True)
class TLSConfig:
    """Configuration shared by any number of connections.

    `rng` is the only source of randomness the engine uses (pass `os.urandom`);
    `trust_bundles` maps a trust domain name to its root certificates; `peer_policy`
    is called with the peer's canonical `ca.SpiffeId` after its chain verified. `verifier` replaces
    the SPIFFE verifier entirely (for tests or non-SPIFFE peers).

    `certificate_chain` + `private_key` is one credential; `credentials` adds more (an
    ECDSA and an ML-DSA SVID, say), in preference order after it: each handshake sends
    the first one the peer can verify (`credentials.select_credential`).
    """

    rng: Rng
    certificate_chain: Sequence[x509.Certificate] = ()
    private_key: PrivateKey | None = None
    credentials: Sequence[Credential] = ()
    trust_bundles: Mapping[str, Sequence[x509.Certificate]] = field(default_factory=dict)
    peer_policy: PeerPolicy | None = None
    verifier: PeerVerifier | None = None
    cipher_suites: Sequence[CipherSuite] = DEFAULT_CIPHER_SUITES
    groups: Sequence[NamedGroup] = DEFAULT_GROUPS
    key_share_groups: Sequence[NamedGroup] = DEFAULT_KEY_SHARES
    signature_schemes: Sequence[SignatureScheme] = DEFAULT_SIGNATURE_SCHEMES
    certificate_signature_schemes: Sequence[SignatureScheme] = DEFAULT_CERTIFICATE_SIGNATURE_SCHEMES
    alpn_protocols: Sequence[str] = ()
    require_client_certificate: bool = True
    verify_peer: bool = True
    middlebox_compatibility: bool = True
    send_hrr_cookie: bool = True
    record_padding: int = 0
    key_update_after_records: int | None = None
    key_log: KeyLogCallback | None = None
    # RFC 8701: reserved values in our lists, drawn from `rng` per handshake (grease.py).
    # Off by default so the RFC 8448 transcripts stay byte-for-byte; the sidecar turns it on.
    grease: bool = False
    # Resumption and 0-RTT (RFC 8446 §2.2, §2.3, §4.6.1; see tickets.py and replay.py).
    # Server: `ticket_ring` set means NewSessionTickets are sent (`session_tickets` per
    # handshake) and tickets sealed under the ring are accepted; `replica_id` names this
    # replica inside its tickets. Early data is accepted only with `max_early_data` > 0
    # and a `replay_cache`, within `early_data_window` seconds of the ticket's expected
    # age (§8.3), and in `early_data_strict` mode only at the replica that issued it.
    # Client: tickets go into and come out of `ticket_store`, dropped when
    # `trust_generation` (bumped by the caller on every trust-bundle change) moves on.
    ticket_ring: StekRing | None = None
    session_tickets: int = 2
    ticket_lifetime: int = MAX_TICKET_LIFETIME
    replica_id: bytes = b""
    max_early_data: int = 0
    replay_cache: ReplayCache | None = None
    early_data_window: float = 10.0
    early_data_strict: bool = True
    ticket_store: TicketStore | None = None
    trust_generation: int = 0
    # Encrypted ClientHello (RFC 9849; see ech.py). Client: `ech_config_list` (an
    # ECHConfigList, e.g. a retry's) seals the real ClientHello under its first usable
    # config; on a rejection the outer handshake must verify as the public name against
    # `ech_public_name_roots`. Without a config, `ech_grease` sends a GREASE extension
    # (§6.2). Server: `ech_keys`, current first then previous ones, are tried in turn;
    # a rejection completes with `ech_public_credential` (a certificate for the public
    # name) and the current config as retry_configs.
    ech_config_list: bytes | None = None
    ech_grease: bool = False
    ech_public_name_roots: Sequence[x509.Certificate] = ()
    # Replaces the WebPKI check of the public name where the public name stands for a
    # SPIFFE trust domain (the mesh: any SVID of that trust domain vouches for it).
    ech_public_name_verifier: PeerVerifier | None = None
    ech_keys: Sequence[ECHKey] = ()
    ech_public_credential: Credential | None = None

    def __post_init__(self) -> None:
        # ValueError (ECHConfigError) for a list with no usable config: said at once.
        configs = parse_config_list(self.ech_config_list) if self.ech_config_list else ()
        object.__setattr__(self, "_ech_configs", configs)
        if self.certificate_chain and self.private_key is None:
            raise ValueError("certificate_chain given without private_key")
        # Shares only for groups we support; none at all means "always HelloRetryRequest".
        shares = tuple(g for g in self.key_share_groups if g in self.groups)
        object.__setattr__(self, "_key_shares", shares)
        if not 0 <= self.ticket_lifetime <= MAX_TICKET_LIFETIME:
            # RFC 8446 §4.6.1: at most seven days.
            raise ValueError("ticket_lifetime is 0 to 604800 seconds")
        if not 0 <= self.max_early_data <= MAX_EARLY_DATA:
            raise ValueError(f"max_early_data is 0 to {MAX_EARLY_DATA} bytes")
        if len(self.replica_id) > 255:
            raise ValueError("replica_id is at most 255 bytes")
        if not self.cipher_suites or not self.groups:
            raise ValueError("at least one cipher suite and one group are required")
        if self.verify_peer and self.verifier is None and not self.trust_bundles:
            raise ValueError("verify_peer needs trust_bundles or a verifier")
        # Derived once per config, not per handshake.
        credentials = tuple(self.credentials)
        if self.certificate_chain and self.private_key is not None:
            credentials = (Credential(self.certificate_chain, self.private_key), *credentials)
        object.__setattr__(self, "_credentials", credentials)
        verifier: PeerVerifier | None = self.verifier
        if verifier is None and self.trust_bundles:
            verifier = SpiffeVerifier(self.trust_bundles, self.peer_policy)
        object.__setattr__(self, "_peer_verifier", verifier)

    @property
    def all_credentials(self) -> tuple[Credential, ...]:
        """`certificate_chain` + `private_key` (if given), then `credentials`."""
        value: tuple[Credential, ...] = self.__dict__["_credentials"]
        return value

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        """The first credential's chain, DER-encoded."""
        credentials = self.all_credentials
        return credentials[0].chain_der if credentials else ()

    @property
    def key_shares(self) -> tuple[NamedGroup, ...]:
        value: tuple[NamedGroup, ...] = self.__dict__["_key_shares"]
        return value

    @property
    def own_signature_schemes(self) -> tuple[int, ...]:
        """The schemes of the first credential's key."""
        credentials = self.all_credentials
        return credentials[0].signature_schemes if credentials else ()

    @property
    def ech_configs(self) -> tuple[ECHConfig, ...]:
        """The usable configs of `ech_config_list`, in its order."""
        value: tuple[ECHConfig, ...] = self.__dict__["_ech_configs"]
        return value

    @property
    def peer_verifier(self) -> PeerVerifier | None:
        value: PeerVerifier | None = self.__dict__["_peer_verifier"]
        return value
