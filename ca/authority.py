"""The hierarchy: a root per trust domain, one name-constrained intermediate per cluster.

The root is offline: it signs intermediates and nothing else. An intermediate signs
workload X509-SVIDs from CSRs or public keys. The URI name constraint on every
intermediate (X509-SVID §4.2) means a leaked cluster key cannot mint identities for a
different trust domain: OpenSSL, Go and Trellis's own verifier all refuse such a leaf.

Issuance is the CA's hot path (a rolling restart of a 10,000-pod mesh renews every SVID),
so everything that does not depend on the request (issuer name, AKI, hash algorithm) is
computed once per authority.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID, NameOID, SignatureAlgorithmOID

from ca.keys import (
    KeyAlgorithm,
    KeyMaterialError,
    PrivateKey,
    PublicKey,
    check_public_key,
    generate_private_key,
)
from ca.leafder import LeafTemplate, der_oid, random_serial, read_tlv
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from ca.x509svid import (
    CLOCK_SKEW,
    DEFAULT_X509_SVID_TTL,
    MAX_X509_SVID_TTL,
    SIGNING_KEY_USAGE,
    X509Svid,
    leaf_extensions,
    spiffe_id_of,
)
from core.durations import format_duration

__all__ = [
    "DEFAULT_INTERMEDIATE_TTL",
    "DEFAULT_ROOT_TTL",
    "IntermediateAuthority",
    "IssuanceError",
    "RootAuthority",
    "load_csr",
]

DEFAULT_ROOT_TTL = dt.timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = dt.timedelta(days=30)
MAX_CSR_BYTES = 64 * 1024


class IssuanceError(ValueError):
    """A request the CA refuses; ``reason`` is a short machine-readable label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    return None  # Ed25519 and ML-DSA sign the message itself


def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise ValueError("times must be timezone-aware (UTC)")
    return now.astimezone(dt.UTC)


def _check_ttl(ttl: dt.timedelta, maximum: dt.timedelta, what: str) -> None:
    if ttl <= dt.timedelta(0):
        raise IssuanceError("bad-ttl", f"{what} TTL must be positive")
    if ttl > maximum:
        # Printed as the flags take it (48h), not as str(timedelta) ("2 days, 0:00:00").
        raise IssuanceError(
            "ttl-too-long",
            f"{what} TTL {format_duration(ttl)} exceeds the maximum of {format_duration(maximum)}",
        )


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER PKCS#10 CSR and check its self-signature."""
    if len(data) > MAX_CSR_BYTES:
        raise IssuanceError("csr-too-large", f"CSR is {len(data)} bytes (limit {MAX_CSR_BYTES})")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        _refuse_bad_mldsa_key(_request_info(data))
        raise IssuanceError("malformed-csr", f"cannot parse CSR: {exc}") from exc
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        _refuse_bad_mldsa_key(csr.tbs_certrequest_bytes)
        raise IssuanceError("malformed-csr", f"cannot check CSR signature: {exc}") from exc
    if not valid:
        raise IssuanceError("csr-signature-invalid", "CSR signature does not verify")
    return csr


# FIPS 204 Table 2: the public key's length is fixed by the parameter set.
_MLDSA_PUBLIC_KEY_BYTES = {
    der_oid(SignatureAlgorithmOID.ML_DSA_44): ("ML-DSA-44", 1312),
    der_oid(SignatureAlgorithmOID.ML_DSA_65): ("ML-DSA-65", 1952),
    der_oid(SignatureAlgorithmOID.ML_DSA_87): ("ML-DSA-87", 2592),
}


def _refuse_bad_mldsa_key(request_info: bytes) -> None:
    """Name what is wrong with an ML-DSA key that cryptography will not parse or load (its
    own words are ASN.1 parser internals or "Invalid key"): parameters, which RFC 9881 §4
    says are absent, or a length that is not its parameter set's (FIPS 204 Table 2).

    ``request_info`` is a CSR's CertificationRequestInfo DER (RFC 2986 §4.1)."""
    try:  # version, subject, subjectPKInfo, attributes
        _, start, _ = read_tlv(request_info, 0)
        _, _, version_end = read_tlv(request_info, start)
        _, _, subject_end = read_tlv(request_info, version_end)
        _, spki_start, _ = read_tlv(request_info, subject_end)
        _, algorithm_start, algorithm_end = read_tlv(request_info, spki_start)
        _, _, oid_end = read_tlv(request_info, algorithm_start)
        _, bits_start, bits_end = read_tlv(request_info, algorithm_end)
    except ValueError:
        return
    known = _MLDSA_PUBLIC_KEY_BYTES.get(request_info[algorithm_start:oid_end])
    if known is None:
        return
    name, expected = known
    if oid_end != algorithm_end:
        raise IssuanceError(
            "unsupported-key",
            f"CSR's {name} key has algorithm parameters; RFC 9881 requires them absent",
        )
    size = bits_end - bits_start - 1  # after the BIT STRING's unused-bits octet
    if size != expected:
        raise IssuanceError(
            "unsupported-key",
            f"CSR's {name} public key is {size} bytes; FIPS 204 fixes it at {expected}",
        )


def _request_info(data: bytes) -> bytes:
    """The CertificationRequestInfo of a PEM or DER CSR, or b"" if there is none to find."""
    if data.lstrip().startswith(b"-----BEGIN"):
        body = b"".join(
            line for line in data.strip().splitlines()[1:-1] if line and b":" not in line
        )
        try:
            data = base64.b64decode(body, validate=True)
        except ValueError:
            return b""
    try:
        _, start, _ = read_tlv(data, 0)
        _, _, end = read_tlv(data, start)
    except ValueError:
        return b""
    return data[start:end]


@dataclass(frozen=True)
class RootAuthority:
    """A trust domain's self-signed root. Keep it offline; it never signs a workload."""

    trust_domain: TrustDomain
    certificate: x509.Certificate
    private_key: PrivateKey

    @classmethod
    def create(
        cls,
        trust_domain: TrustDomain,
        *,
        now: dt.datetime,
        key_algorithm: KeyAlgorithm = KeyAlgorithm.P384,
        ttl: dt.timedelta = DEFAULT_ROOT_TTL,
    ) -> RootAuthority:
        now = _utc(now)
        if key_algorithm not in _ROOT_KEY_ALGORITHMS:
            raise KeyMaterialError(
                "a root key must be P-256, P-384, Ed25519 or ML-DSA-44/65/87 (not RSA)"
            )
        key = generate_private_key(key_algorithm)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Trellis root CA {trust_domain.name}"),
            ]
        )
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(SIGNING_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(trust_domain.id_string())]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, _signature_hash(key))
        )
        return cls(trust_domain, certificate, key)

    @classmethod
    def load(cls, certificate: x509.Certificate, private_key: PrivateKey) -> RootAuthority:
        trust_domain = spiffe_id_of(certificate).trust_domain
        if certificate.public_key() != private_key.public_key():
            raise KeyMaterialError("root key does not match root certificate")
        return cls(trust_domain, certificate, private_key)

    def issue_intermediate(
        self,
        cluster: str,
        *,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
        key_algorithm: KeyAlgorithm = KeyAlgorithm.P256,
        name_constraints: bool = True,
    ) -> IntermediateAuthority:
        """Sign a cluster intermediate.

        ``name_constraints=False`` exists only for verifiers that cannot process URI name
        constraints at all (``cryptography.x509.verification`` refuses them outright); it
        gives up the cross-trust-domain protection and is never the default.
        """
        now = _utc(now)
        _check_cluster_name(cluster)
        if ttl <= dt.timedelta(0):
            raise IssuanceError("bad-ttl", "intermediate TTL must be positive")
        not_after = now + ttl
        if not_after > self.certificate.not_valid_after_utc:
            raise IssuanceError(
                "outlives-issuer",
                f"intermediate would expire {not_after:%Y-%m-%d %H:%M} UTC, after the root "
                f"({self.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)",
            )
        key = generate_private_key(key_algorithm)
        public = key.public_key()
        td = self.trust_domain
        root_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis"),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster),
                        x509.NameAttribute(
                            NameOID.COMMON_NAME, f"Trellis intermediate {td.name} {cluster}"
                        ),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(SIGNING_KEY_USAGE, critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td.id_string())]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
                critical=False,
            )
        )
        if name_constraints:
            # X509-SVID §4.2 / RFC 5280 §4.2.1.10: a URI constraint names a host; an exact
            # host matches only the trust domain itself, never a sub- or sibling domain.
            builder = builder.add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.UniformResourceIdentifier(td.name)],
                    excluded_subtrees=None,
                ),
                critical=True,
            )
        certificate = builder.sign(self.private_key, _signature_hash(self.private_key))
        return IntermediateAuthority(td, cluster, certificate, key)


_ROOT_KEY_ALGORITHMS = frozenset(
    {
        KeyAlgorithm.P256,
        KeyAlgorithm.P384,
        KeyAlgorithm.ED25519,
        KeyAlgorithm.MLDSA44,
        KeyAlgorithm.MLDSA65,
        KeyAlgorithm.MLDSA87,
    }
)


def _check_cluster_name(cluster: str) -> None:
    ok = 0 < len(cluster) <= 63 and all(
        c.isascii() and (c.isalnum() or c in "-_.") for c in cluster
    )
    if not ok or cluster[0] in "-_." or cluster in (".", ".."):
        raise IssuanceError(
            "bad-cluster-name",
            f"cluster name {cluster!r} must be 1-63 characters of letters, digits, '-', '_', '.'",
        )


@dataclass(frozen=True)
class IntermediateAuthority:
    """A cluster's signing authority: issues workload X509-SVIDs for its trust domain only."""

    trust_domain: TrustDomain
    cluster: str
    certificate: x509.Certificate
    private_key: PrivateKey
    _issuer_name: x509.Name = field(init=False, repr=False)
    _aki: x509.AuthorityKeyIdentifier = field(init=False, repr=False)
    _hash: hashes.SHA256 | hashes.SHA384 | None = field(init=False, repr=False)
    _not_after: dt.datetime = field(init=False, repr=False)
    _leaf_template: LeafTemplate = field(init=False, repr=False)
    _certificate_der: bytes = field(init=False, repr=False)
    # Workload IDs already checked by _own_spiffe_id: entries repeat them on every renewal.
    _checked_ids: dict[str, SpiffeId] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ski = self.certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_KEY_IDENTIFIER
        ).value
        assert isinstance(ski, x509.SubjectKeyIdentifier)
        object.__setattr__(self, "_issuer_name", self.certificate.subject)
        object.__setattr__(
            self, "_aki", x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        )
        object.__setattr__(self, "_hash", _signature_hash(self.private_key))
        object.__setattr__(self, "_not_after", self.certificate.not_valid_after_utc)
        # The SAN and SKI given here are placeholders: build() puts each leaf's own there.
        extensions = leaf_extensions(
            SpiffeId(self.trust_domain.id_string() + "/leaf"),
            x509.SubjectKeyIdentifier(bytes(20)),
            self._aki,
        )
        template = LeafTemplate(
            key=self.private_key,
            issuer=self._issuer_name,
            subject=_LEAF_SUBJECT,
            extensions=extensions,
        )
        object.__setattr__(self, "_leaf_template", template)
        object.__setattr__(self, "_certificate_der", self.certificate.public_bytes(Encoding.DER))
        object.__setattr__(self, "_checked_ids", {})

    @classmethod
    def load(
        cls, certificate: x509.Certificate, private_key: PrivateKey, cluster: str | None = None
    ) -> IntermediateAuthority:
        if certificate.public_key() != private_key.public_key():
            raise KeyMaterialError("intermediate key does not match intermediate certificate")
        trust_domain = spiffe_id_of(certificate).trust_domain
        if cluster is None:
            units = certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            cluster = str(units[0].value) if units else "default"
        return cls(trust_domain, cluster, certificate, private_key)

    @property
    def expires_at(self) -> dt.datetime:
        return self._not_after

    @property
    def certificate_der(self) -> bytes:
        """This intermediate's certificate, DER: the second element of every chain it issues."""
        return self._certificate_der

    def issue_x509_svid_from_csr(
        self,
        csr: x509.CertificateSigningRequest | bytes,
        spiffe_id: SpiffeId | str,
        *,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_X509_SVID_TTL,
        dns_names: Sequence[str] = (),
    ) -> X509Svid:
        """Sign a CSR for ``spiffe_id``; a SAN in the CSR, if any, must name the same ID."""
        checked_id, public_key = self._check_csr(csr, spiffe_id)
        return self._sign(checked_id, public_key, now, ttl, dns_names, None)

    def sign_csr_der(
        self,
        csr: x509.CertificateSigningRequest | bytes,
        spiffe_id: SpiffeId | str,
        *,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_X509_SVID_TTL,
        dns_names: Sequence[str] = (),
    ) -> tuple[bytes, dt.datetime]:
        """``issue_x509_svid_from_csr``'s checks and leaf, as the leaf's DER and notAfter.

        For the CA server, which sends DER on: it skips parsing the leaf it has just built
        and encoding it again (the chain is this DER and ``certificate_der``).
        """
        checked_id, public_key = self._check_csr(csr, spiffe_id)
        return self._sign_der(checked_id, public_key, now, ttl, dns_names)

    def _check_csr(
        self, csr: x509.CertificateSigningRequest | bytes, spiffe_id: SpiffeId | str
    ) -> tuple[SpiffeId, PublicKey | object]:
        if isinstance(csr, bytes):
            csr = load_csr(csr)
        spiffe_id = self._own_spiffe_id(spiffe_id)
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = None
        except ValueError as exc:
            raise IssuanceError("malformed-csr", f"cannot parse CSR extensions: {exc}") from exc
        if san is not None:
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
            if uris and (len(uris) != 1 or uris[0] != str(spiffe_id)):
                raise IssuanceError(
                    "csr-spiffe-id-mismatch",
                    f"CSR asks for {', '.join(uris)}, but the request is for {spiffe_id}",
                )
        try:
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            _refuse_bad_mldsa_key(csr.tbs_certrequest_bytes)
            raise IssuanceError("unsupported-key", f"CSR public key: {exc}") from exc
        return spiffe_id, public_key

    def issue_x509_svid(
        self,
        spiffe_id: SpiffeId | str,
        public_key: PublicKey | object,
        *,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_X509_SVID_TTL,
        dns_names: Sequence[str] = (),
        private_key: PrivateKey | None = None,
    ) -> X509Svid:
        """Sign a leaf for ``public_key``; returns the leaf and this intermediate as the chain."""
        return self._sign(
            self._own_spiffe_id(spiffe_id), public_key, now, ttl, dns_names, private_key
        )

    def _sign(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey | object,
        now: dt.datetime,
        ttl: dt.timedelta,
        dns_names: Sequence[str],
        private_key: PrivateKey | None,
    ) -> X509Svid:
        der, _ = self._sign_der(spiffe_id, public_key, now, ttl, dns_names)
        leaf = x509.load_der_x509_certificate(der)
        return X509Svid(spiffe_id, (leaf, self.certificate), private_key)

    def _sign_der(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey | object,
        now: dt.datetime,
        ttl: dt.timedelta,
        dns_names: Sequence[str],
    ) -> tuple[bytes, dt.datetime]:
        _check_ttl(ttl, MAX_X509_SVID_TTL, "X509-SVID")
        try:
            checked_key = check_public_key(public_key)
        except KeyMaterialError as exc:
            raise IssuanceError("unsupported-key", str(exc)) from exc
        now = _utc(now)
        not_after = now + ttl
        if not_after > self._not_after:
            raise IssuanceError(
                "outlives-issuer",
                f"SVID would expire {not_after:%Y-%m-%d %H:%M:%S} UTC, after its intermediate "
                f"({self._not_after:%Y-%m-%d %H:%M:%S} UTC); rotate the intermediate",
            )
        try:
            spki = checked_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise IssuanceError("unsupported-key", f"cannot encode the public key: {exc}") from exc
        try:
            der = self._leaf_template.build(
                serial=random_serial(),
                not_before=now - CLOCK_SKEW,
                not_after=not_after,
                spki=spki,
                uris=(str(spiffe_id),),
                dns_names=dns_names,
            )
        except UnicodeEncodeError as exc:
            raise IssuanceError(
                "bad-dns-name", f"DNS names must be ASCII (A-labels): {', '.join(dns_names)}"
            ) from exc
        # What the certificate says: build() drops the microseconds, as CertificateBuilder.
        return der, not_after.replace(microsecond=0)

    def _own_spiffe_id(self, spiffe_id: SpiffeId | str) -> SpiffeId:
        if isinstance(spiffe_id, str):
            known = self._checked_ids.get(spiffe_id)
            if known is not None:
                return known
        checked = self._check_own_spiffe_id(spiffe_id)
        if isinstance(spiffe_id, str):
            if len(self._checked_ids) >= _CHECKED_IDS_MAX:
                self._checked_ids.clear()  # bounded; entries come back on their next use
            self._checked_ids[spiffe_id] = checked
        return checked

    def _check_own_spiffe_id(self, spiffe_id: SpiffeId | str) -> SpiffeId:
        try:
            parsed = SpiffeId(spiffe_id)
        except SpiffeIdError as exc:
            raise IssuanceError("malformed-spiffe-id", str(exc)) from exc
        if parsed.trust_domain != self.trust_domain:
            raise IssuanceError(
                "foreign-trust-domain",
                f"{parsed} is outside trust domain {self.trust_domain}; "
                "this intermediate may only issue for its own trust domain",
            )
        if not parsed.path:
            raise IssuanceError("missing-path", f"{parsed} has no path; workload IDs need one")
        return parsed


_CHECKED_IDS_MAX = 10_000

_LEAF_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis")])
