"""Peer certificate verification for SPIFFE X509-SVIDs.

The chain is verified with `cryptography.x509.verification` against the trust bundle
of the leaf's own trust domain (one root set per trust domain, as SPIFFE federation
requires). `PolicyBuilder.build_client_verifier()` accepts URI-only leaves; its EKU
check is replaced by an extension policy so that a *server* leaf is held to
serverAuth and a *client* leaf to clientAuth. The single URI SAN becomes the peer's
SPIFFE ID: parsed once, by `ca.x509svid.spiffe_id_of` (the project's one SPIFFE ID
grammar), into the canonical `ca.SpiffeId` that the policy hook, the events and everything
above the engine then take as it is.

Verification is pure given `now`; results are cached per chain (with the window in
which they hold) so that a busy sidecar pays for path building once per peer SVID.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ca.spiffeid import SpiffeId
from ca.x509svid import SvidError, spiffe_id_of

from .alerts import AlertDescription, TLSError
from .signatures import PublicKey, certificate_signature_scheme, is_rsa_pss_certificate

PeerPolicy = Callable[[SpiffeId], bool]
_PARSED_CACHE_SIZE = 256


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """A peer whose chain verified; only a `PeerVerifier` creates one.

    `spiffe_id` is None only from `insecure_peer` (verification off) for a leaf whose
    URI SAN is not a single SPIFFE ID; a verified peer always has one."""

    spiffe_id: SpiffeId | None
    chain: tuple[x509.Certificate, ...]
    public_key: PublicKey
    rsa_pss_key: bool


class PeerVerifier(Protocol):
    """What the handshake needs from a certificate verifier."""

    def verify(
        self,
        chain: Sequence[bytes],
        now: dt.datetime,
        peer_is_server: bool,
        accepted_cert_schemes: Sequence[int],
    ) -> VerifiedPeer: ...


def _classify(message: str) -> AlertDescription:
    if "not valid at validation time" in message or "expired" in message:
        return AlertDescription.certificate_expired
    if "EKU" in message:
        return AlertDescription.unsupported_certificate
    if "candidates exhausted" in message or "no valid" in message or "issuer" in message:
        return AlertDescription.unknown_ca
    return AlertDescription.bad_certificate


_SVID_REASONS = {
    "expired": AlertDescription.certificate_expired,
    "not-yet-valid": AlertDescription.bad_certificate,
    "unknown-ca": AlertDescription.unknown_ca,
    "unknown-trust-domain": AlertDescription.unknown_ca,
    "wrong-eku": AlertDescription.unsupported_certificate,
}


def _leaf_eku(cert: x509.Certificate) -> x509.ExtendedKeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _has_name_constraints(cert: x509.Certificate) -> bool:
    try:
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    except x509.ExtensionNotFound:
        return False
    except ValueError:
        return False  # malformed extensions: the path builder reports them
    return True


def _eku_validator(required: x509.ObjectIdentifier) -> Callable[..., None]:
    def check(_policy: object, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        # RFC 5280 §4.2.1.12: an absent EKU places no restriction.
        if (
            eku is not None
            and required not in eku
            and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku
        ):
            raise ValueError("required EKU not found")

    return check


class SpiffeVerifier:
    """Verifies X509-SVID chains against per-trust-domain bundles, then asks `policy`."""

    def __init__(
        self,
        trust_bundles: Mapping[str, Sequence[x509.Certificate]],
        policy: PeerPolicy | None = None,
        cache_size: int = 1024,
    ) -> None:
        self._stores = {td: Store(list(roots)) for td, roots in trust_bundles.items() if roots}
        self._roots = {td: frozenset(roots) for td, roots in trust_bundles.items()}
        self._constrained_roots = {
            td for td, roots in trust_bundles.items() if any(map(_has_name_constraints, roots))
        }
        self._policy = policy
        self._ee_policies = {
            True: ExtensionPolicy.webpki_defaults_ee().may_be_present(
                x509.ExtendedKeyUsage,
                Criticality.AGNOSTIC,
                _eku_validator(ExtendedKeyUsageOID.SERVER_AUTH),
            ),
            False: ExtensionPolicy.webpki_defaults_ee().may_be_present(
                x509.ExtendedKeyUsage,
                Criticality.AGNOSTIC,
                _eku_validator(ExtendedKeyUsageOID.CLIENT_AUTH),
            ),
        }
        self._ca_policy = ExtensionPolicy.webpki_defaults_ca()
        self._bundles = {td: tuple(roots) for td, roots in trust_bundles.items()}
        self._cache: OrderedDict[
            tuple[bool, tuple[bytes, ...]], tuple[VerifiedPeer, dt.datetime, dt.datetime]
        ] = OrderedDict()
        self._cache_size = cache_size
        self._parsed: dict[bytes, x509.Certificate] = {}
        self._verifiers: dict[tuple[str, bool, dt.datetime], ClientVerifier] = {}

    def verify(
        self,
        chain: Sequence[bytes],
        now: dt.datetime,
        peer_is_server: bool,
        accepted_cert_schemes: Sequence[int],
    ) -> VerifiedPeer:
        if not chain:
            raise TLSError(AlertDescription.certificate_required, "peer sent no certificate")
        key = (peer_is_server, tuple(chain))
        cached = self._cache.get(key)
        if cached is not None and cached[1] <= now <= cached[2]:
            self._cache.move_to_end(key)
            peer = cached[0]
        else:
            peer, not_before, not_after = self._verify_uncached(
                chain, now, peer_is_server, accepted_cert_schemes
            )
            self._cache[key] = (peer, not_before, not_after)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        spiffe_id = peer.spiffe_id
        if self._policy is not None and (spiffe_id is None or not self._policy(spiffe_id)):
            raise TLSError(AlertDescription.access_denied, f"policy refused {peer.spiffe_id}")
        return peer

    def _verify_name_constrained(
        self,
        certs: list[x509.Certificate],
        trust_domain: str,
        now: dt.datetime,
        peer_is_server: bool,
    ) -> list[x509.Certificate]:
        from ca.spiffeid import TrustDomain
        from ca.verify import VerificationError as SvidVerificationError
        from ca.verify import verify_x509_svid

        def lookup(td: TrustDomain) -> tuple[x509.Certificate, ...] | None:
            return self._bundles.get(td.name)

        try:
            verified = verify_x509_svid(certs, lookup, now=now)
        except SvidVerificationError as exc:
            raise TLSError(
                _SVID_REASONS.get(exc.reason, AlertDescription.bad_certificate), str(exc)
            ) from exc
        required = (
            ExtendedKeyUsageOID.SERVER_AUTH if peer_is_server else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        try:
            _eku_validator(required)(None, certs[0], _leaf_eku(certs[0]))
        except ValueError as exc:
            raise TLSError(AlertDescription.unsupported_certificate, str(exc)) from exc
        return list(verified.path)

    def _parse(self, der: bytes) -> x509.Certificate:
        """Parse a DER certificate, reusing the parse of intermediates seen before."""
        cert = self._parsed.get(der)
        if cert is None:
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError as exc:
                raise TLSError(AlertDescription.bad_certificate, "unparseable certificate") from exc
            if len(self._parsed) >= _PARSED_CACHE_SIZE:
                self._parsed.clear()
            self._parsed[der] = cert
        return cert

    def _verifier(
        self, trust_domain: str, store: Store, now: dt.datetime, peer_is_server: bool
    ) -> ClientVerifier:
        """A path validator for `now`, reused within the same second (certificate times
        have one-second resolution, so this changes no outcome)."""
        second = now.replace(microsecond=0)
        key = (trust_domain, peer_is_server, second)
        verifier = self._verifiers.get(key)
        if verifier is None:
            if len(self._verifiers) > 16:
                self._verifiers.clear()
            verifier = (
                PolicyBuilder()
                .store(store)
                .time(second)
                .extension_policies(
                    ca_policy=self._ca_policy, ee_policy=self._ee_policies[peer_is_server]
                )
                .build_client_verifier()
            )
            self._verifiers[key] = verifier
        return verifier

    def _verify_uncached(
        self,
        chain: Sequence[bytes],
        now: dt.datetime,
        peer_is_server: bool,
        accepted_cert_schemes: Sequence[int],
    ) -> tuple[VerifiedPeer, dt.datetime, dt.datetime]:
        certs = [self._parse(der) for der in chain]
        leaf = certs[0]
        try:
            # X509-SVID §2: exactly one URI SAN, a SPIFFE ID. SPIFFE-ID §2.4: the scheme and
            # trust domain are case-insensitive, so `Example.org` is `example.org` here, in
            # the policy and in every log line, as it is for `ca.verify_x509_svid`.
            spiffe_id = spiffe_id_of(leaf)
        except SvidError as exc:
            raise TLSError(AlertDescription.bad_certificate, f"leaf: {exc}") from exc
        if not spiffe_id.path:
            # X509-SVID §2: a leaf's SPIFFE ID names a workload, never the bare trust domain
            # (what `ca.check_leaf` enforces on the name-constrained path too).
            raise TLSError(AlertDescription.bad_certificate, "leaf: SPIFFE ID without a path")
        trust_domain = spiffe_id.trust_domain.name
        store = self._stores.get(trust_domain)
        if store is None:
            raise TLSError(AlertDescription.unknown_ca, f"no trust bundle for {trust_domain}")
        if any(_has_name_constraints(cert) for cert in certs[1:]) or trust_domain in (
            self._constrained_roots
        ):
            # cryptography's path builder refuses URI name constraints, which is exactly
            # what a Trellis cluster intermediate carries (X509-SVID §4.2); ca.verify walks
            # that short path itself, with every signature still checked by OpenSSL. Routed
            # up front so a production chain is validated once, not failed and redone.
            built = self._verify_name_constrained(certs, trust_domain, now, peer_is_server)
        else:
            verifier = self._verifier(trust_domain, store, now, peer_is_server)
            try:
                built = list(verifier.verify(leaf, certs[1:]).chain)
            except VerificationError as exc:
                alert = _classify(str(exc))
                if alert == AlertDescription.certificate_expired and any(
                    now < cert.not_valid_before_utc for cert in certs
                ):
                    alert = AlertDescription.bad_certificate  # not yet valid
                raise TLSError(alert, str(exc)) from exc
        roots = self._roots[trust_domain]
        # RFC 8446 §4.2.3: signature_algorithms_cert constrains signatures on the chain
        # (the trust anchor's self-signature is exempt).
        for index, cert in enumerate(built):
            if cert in roots:
                break
            issuer_pss = index + 1 < len(built) and is_rsa_pss_certificate(built[index + 1])
            scheme = certificate_signature_scheme(cert, issuer_pss)
            if scheme is None or scheme not in accepted_cert_schemes:
                raise TLSError(
                    AlertDescription.bad_certificate, "chain signed with an unoffered scheme"
                )
        public_key = leaf.public_key()
        if not isinstance(public_key, PublicKey):
            raise TLSError(AlertDescription.unsupported_certificate, "unsupported leaf key type")
        peer = VerifiedPeer(spiffe_id, tuple(certs), public_key, is_rsa_pss_certificate(leaf))
        not_before = max(c.not_valid_before_utc for c in built)
        not_after = min(c.not_valid_after_utc for c in built)
        return peer, not_before, not_after


def insecure_peer(chain: Sequence[bytes]) -> VerifiedPeer:
    """The leaf's key and URI SAN *without* verification (`verify_peer=False` only)."""
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        public_key = leaf.public_key()
    except ValueError as exc:
        raise TLSError(AlertDescription.bad_certificate, "unparseable certificate") from exc
    if not isinstance(public_key, PublicKey):
        raise TLSError(AlertDescription.unsupported_certificate, "unsupported leaf key type")
    try:
        spiffe_id: SpiffeId | None = spiffe_id_of(leaf)
    except SvidError:
        spiffe_id = None  # not verifying: a peer without a SPIFFE ID is still a peer
    return VerifiedPeer(spiffe_id, (leaf,), public_key, is_rsa_pss_certificate(leaf))
