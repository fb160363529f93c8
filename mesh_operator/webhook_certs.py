"""The webhook's serving certificate: a self-signed webhook CA, planned as a pure function.

Decision: the webhook is **not** served with a certificate from the cluster's SPIFFE
intermediate (``ca.IntermediateAuthority``). The API server checks the webhook by DNS name
(``<service>.<namespace>.svc``) against ``caBundle``; putting the SPIFFE intermediate there
would mean (a) the operator holding the cluster intermediate's key, the most sensitive key
in the cluster, just to serve a webhook, and (b) a DNS-only leaf signed by the authority
every sidecar trusts for workload identity. A small webhook CA, whose key lives only in the
``trellis-webhook-tls`` Secret and which can sign nothing but this webhook's certificate in
practice (the operator is its only user), keeps the two trust domains apart.

Rotation (``plan_rotation``; the operator runs it periodically, leader only):

* serving certificate: 30 days, renewed after two thirds of its life, or at once if its DNS
  names or its issuer are not what they should be;
* webhook CA: 1 year, replaced after two thirds of its life. The new CA is *added* to the
  bundle, the old one stays until it expires, so an API server that still has the old
  ``caBundle`` cached keeps trusting the webhook while the new one propagates. The shell
  writes ``caBundle`` first and the Secret second for the same reason.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.x509svid import LEAF_KEY_USAGE, SIGNING_KEY_USAGE

__all__ = [
    "CA_LIFETIME",
    "SERVING_LIFETIME",
    "RotationPlan",
    "WebhookPki",
    "plan_rotation",
    "service_dns_names",
]

CA_LIFETIME = dt.timedelta(days=365)
SERVING_LIFETIME = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate API servers whose clock is a little behind


def service_dns_names(service: str, namespace: str) -> tuple[str, ...]:
    return (f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local")


@dataclass(frozen=True, slots=True)
class WebhookPki:
    """The Secret's contents: ``ca.crt`` (bundle, newest first), ``ca.key``, ``tls.*``."""

    ca_bundle: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes

    def secret_data(self) -> dict[str, bytes]:
        return {
            "ca.crt": self.ca_bundle,
            "ca.key": self.ca_key,
            "tls.crt": self.tls_crt,
            "tls.key": self.tls_key,
        }

    @classmethod
    def from_secret_data(cls, data: dict[str, bytes]) -> WebhookPki | None:
        try:
            return cls(data["ca.crt"], data["ca.key"], data["tls.crt"], data["tls.key"])
        except KeyError:
            return None


@dataclass(frozen=True, slots=True)
class RotationPlan:
    pki: WebhookPki
    changed: bool
    reason: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_ca(now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Trellis"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"trellis webhook CA {now:%Y%m%d%H%M%S}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            SIGNING_KEY_USAGE,
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_serving(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns_names: tuple[str, ...],
    now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + SERVING_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            LEAF_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _past_two_thirds(cert: x509.Certificate, now: dt.datetime) -> bool:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= start + (end - start) * 2 / 3


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _fresh(dns_names: tuple[str, ...], now: dt.datetime, reason: str) -> RotationPlan:
    ca_cert, ca_key = _new_ca(now)
    cert, key = _new_serving(ca_cert, ca_key, dns_names, now)
    pki = WebhookPki(_pem([ca_cert]), _key_pem(ca_key), _pem([cert]), _key_pem(key))
    return RotationPlan(pki, True, reason)


def plan_rotation(
    current: WebhookPki | None, *, dns_names: tuple[str, ...], now: dt.datetime
) -> RotationPlan:
    """What the Secret should hold at ``now`` (``changed`` False: leave it alone)."""
    if current is None:
        return _fresh(dns_names, now, "no webhook certificate yet")
    try:
        bundle = x509.load_pem_x509_certificates(current.ca_bundle)
        ca_key = serialization.load_pem_private_key(current.ca_key, None)
        serving = x509.load_pem_x509_certificate(current.tls_crt)
        serialization.load_pem_private_key(current.tls_key, None)
    except ValueError:
        return _fresh(dns_names, now, "the stored webhook certificate could not be parsed")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not bundle:
        return _fresh(dns_names, now, "the stored webhook CA is unusable")
    ca_cert = bundle[0]
    if ca_cert.public_key() != ca_key.public_key() or ca_cert.not_valid_after_utc <= now:
        return _fresh(dns_names, now, "the stored webhook CA is expired or mismatched")
    alive = [c for c in bundle if c.not_valid_after_utc > now]
    reasons: list[str] = []
    if _past_two_thirds(ca_cert, now):
        ca_cert, ca_key = _new_ca(now)
        alive = [ca_cert, *alive]
        reasons.append("webhook CA past two thirds of its life: new CA added to the bundle")
    try:
        names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        serving_names = tuple(names.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        serving_names = ()
    if reasons or serving.issuer != ca_cert.subject:
        reasons.append("serving certificate reissued from the current CA")
    elif _past_two_thirds(serving, now):
        reasons.append("serving certificate past two thirds of its life")
    elif set(serving_names) != set(dns_names):
        reasons.append("serving certificate names changed")
    if len(alive) != len(bundle):
        reasons.append("expired CA dropped from the bundle")
    if not reasons:
        return RotationPlan(current, False, "current")
    tls_crt, tls_key = current.tls_crt, current.tls_key
    if any(r.startswith("serving") for r in reasons):
        cert, key = _new_serving(ca_cert, ca_key, dns_names, now)
        tls_crt, tls_key = _pem([cert]), _key_pem(key)
    pki = WebhookPki(_pem(alive), _key_pem(ca_key), tls_crt, tls_key)
    return RotationPlan(pki, True, "; ".join(reasons))
