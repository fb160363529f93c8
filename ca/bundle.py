"""Trust bundles in the SPIFFE bundle format (SPIFFE Trust Domain and Bundle standard §4).

A bundle is a JWKS: ``use: x509-svid`` entries carry exactly one certificate in ``x5c``;
``use: jwt-svid`` entries carry a ``kid``. ``spiffe_sequence`` increases with every change
and ``spiffe_refresh_hint`` tells consumers how often to poll. Root rotation is a merge:
the new root is added while the old one stays until every SVID it anchors has expired.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.jwk import JwkError, key_from_jwk, key_to_jwk
from ca.keys import PublicKey
from ca.spiffeid import TrustDomain

__all__ = [
    "DEFAULT_REFRESH_HINT",
    "MAX_BUNDLE_BYTES",
    "BundleError",
    "TrustBundle",
    "load_pem_certificates",
]

DEFAULT_REFRESH_HINT = 300
MAX_BUNDLE_BYTES = 1024 * 1024


class BundleError(ValueError):
    """A bundle document (JSON or PEM) is malformed."""


def load_pem_certificates(data: bytes, *, what: str = "PEM data") -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise BundleError(f"{what} holds no readable certificate: {exc}") from exc
    return certs


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class TrustBundle:
    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: Mapping[str, PublicKey] = field(default_factory=lambda: MappingProxyType({}))
    sequence: int = 0
    refresh_hint: int = DEFAULT_REFRESH_HINT

    def __post_init__(self) -> None:
        object.__setattr__(self, "jwt_authorities", MappingProxyType(dict(self.jwt_authorities)))
        seen: set[bytes] = set()
        unique = []
        for cert in self.x509_authorities:
            der = _der(cert)
            if der not in seen:
                seen.add(der)
                unique.append(cert)
        object.__setattr__(self, "x509_authorities", tuple(unique))

    # -- building -----------------------------------------------------------------------

    def merge(self, other: TrustBundle) -> TrustBundle:
        """Union of both bundles' authorities (root rotation keeps old and new roots)."""
        if other.trust_domain != self.trust_domain:
            raise BundleError(
                f"cannot merge bundles of {self.trust_domain} and {other.trust_domain}"
            )
        jwt = dict(self.jwt_authorities)
        jwt.update(other.jwt_authorities)
        merged = TrustBundle(
            self.trust_domain,
            self.x509_authorities + other.x509_authorities,
            jwt,
            self.sequence,
            min(self.refresh_hint, other.refresh_hint),
        )
        if merged.same_content(self):
            return self
        return merged.with_sequence(max(self.sequence, other.sequence) + 1)

    def with_x509_authorities(self, certs: Iterable[x509.Certificate]) -> TrustBundle:
        return self.merge(TrustBundle(self.trust_domain, tuple(certs)))

    def with_jwt_authority(self, kid: str, key: PublicKey) -> TrustBundle:
        return self.merge(TrustBundle(self.trust_domain, jwt_authorities={kid: key}))

    def without_x509_authority(self, cert: x509.Certificate) -> TrustBundle:
        """Drop a retired root once nothing it anchors is still valid."""
        der = _der(cert)
        kept = tuple(c for c in self.x509_authorities if _der(c) != der)
        if len(kept) == len(self.x509_authorities):
            return self
        return TrustBundle(
            self.trust_domain, kept, self.jwt_authorities, self.sequence + 1, self.refresh_hint
        )

    def with_sequence(self, sequence: int) -> TrustBundle:
        return TrustBundle(
            self.trust_domain,
            self.x509_authorities,
            self.jwt_authorities,
            sequence,
            self.refresh_hint,
        )

    def same_content(self, other: TrustBundle) -> bool:
        return (
            self.trust_domain == other.trust_domain
            and {_der(c) for c in self.x509_authorities}
            == {_der(c) for c in other.x509_authorities}
            and set(self.jwt_authorities) == set(other.jwt_authorities)
        )

    # -- encodings ----------------------------------------------------------------------

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    def to_dict(self) -> dict[str, Any]:
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            entry: dict[str, Any] = {"use": "x509-svid", **key_to_jwk(cert.public_key())}
            entry["x5c"] = [base64.b64encode(_der(cert)).decode("ascii")]
            keys.append(entry)
        for kid, key in sorted(self.jwt_authorities.items()):
            keys.append({"use": "jwt-svid", "kid": kid, **key_to_jwk(key)})
        return {
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2).encode() + b"\n"

    def jwks_json(self) -> bytes:
        """Only the JWT authorities, as a plain JWKS (what Workload API JWT bundles carry)."""
        keys = [
            {"use": "jwt-svid", "kid": k, **key_to_jwk(v)}
            for k, v in sorted(self.jwt_authorities.items())
        ]
        return json.dumps({"keys": keys}).encode()

    @classmethod
    def from_json(cls, trust_domain: TrustDomain, data: bytes | str) -> TrustBundle:
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) > MAX_BUNDLE_BYTES:
            raise BundleError(f"bundle is {len(raw)} bytes (limit {MAX_BUNDLE_BYTES})")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"bundle is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise BundleError("bundle must be a JSON object with a 'keys' array")
        sequence = doc.get("spiffe_sequence", 0)
        hint = doc.get("spiffe_refresh_hint", DEFAULT_REFRESH_HINT)
        for name, value in (("spiffe_sequence", sequence), ("spiffe_refresh_hint", hint)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BundleError(f"{name} must be a non-negative integer")
        certs: list[x509.Certificate] = []
        jwt: dict[str, PublicKey] = {}
        for index, entry in enumerate(doc["keys"]):
            if not isinstance(entry, dict):
                raise BundleError(f"keys[{index}] is not an object")
            use = entry.get("use")
            try:
                if use == "x509-svid":
                    certs.append(_parse_x509_entry(entry, index))
                elif use == "jwt-svid":
                    kid = entry.get("kid")
                    if not isinstance(kid, str) or not kid:
                        raise BundleError(f"keys[{index}]: a jwt-svid entry needs a 'kid'")
                    if kid in jwt:
                        raise BundleError(f"keys[{index}]: duplicate kid {kid!r}")
                    jwt[kid] = key_from_jwk(entry)
                # SPIFFE bundle §4.2.2: entries with an unknown "use" are ignored.
            except JwkError as exc:
                raise BundleError(f"keys[{index}]: {exc}") from exc
        return cls(trust_domain, tuple(certs), jwt, sequence, hint)


def _parse_x509_entry(entry: Mapping[str, Any], index: int) -> x509.Certificate:
    x5c = entry.get("x5c")
    if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
        raise BundleError(f"keys[{index}]: an x509-svid entry needs exactly one x5c certificate")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
    except (ValueError, binascii.Error) as exc:
        raise BundleError(f"keys[{index}]: x5c is not a DER certificate: {exc}") from exc
    declared = key_from_jwk(dict(entry))
    if declared != cert.public_key():
        raise BundleError(f"keys[{index}]: JWK parameters do not match the x5c certificate's key")
    return cert
