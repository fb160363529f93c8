"""Conversions between Trellis values and ``trellis.ca.v1`` messages (both sides use them)."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.bundle import TrustBundle
from ca.entries import RegistrationEntry
from ca.keys import PrivateKey
from ca.server._proto import ca_pb2
from ca.spiffeid import SpiffeId, TrustDomain
from ca.x509svid import X509Svid

__all__ = [
    "SERVICE",
    "bundle_from_proto",
    "bundle_to_proto",
    "entry_from_proto",
    "entry_to_proto",
    "svid_from_proto",
    "svid_to_proto",
]

SERVICE = "trellis.ca.v1.CaService"


def svid_from_proto(message: ca_pb2.X509SVID, private_key: PrivateKey | None) -> X509Svid:
    chain = tuple(x509.load_der_x509_certificate(der) for der in message.cert_chain)
    return X509Svid(SpiffeId(message.spiffe_id), chain, private_key)


def bundle_from_proto(message: ca_pb2.Bundle) -> TrustBundle:
    """The ``TrustBundle`` a ``Bundle`` message carries (raises ``BundleError``)."""
    return TrustBundle.from_json(TrustDomain(message.trust_domain), message.spiffe_bundle_json)


def bundle_to_proto(bundle: TrustBundle) -> ca_pb2.Bundle:
    return ca_pb2.Bundle(
        trust_domain=bundle.trust_domain.name,
        spiffe_bundle_json=bundle.to_json(),
        x509_authorities=[
            c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities
        ],
        sequence=bundle.sequence,
    )


def entry_to_proto(entry: RegistrationEntry) -> ca_pb2.Entry:
    return ca_pb2.Entry(
        entry_id=entry.entry_id,
        spiffe_id=str(entry.spiffe_id),
        selectors=sorted(str(s) for s in entry.selectors),
        x509_svid_ttl_seconds=int(entry.x509_svid_ttl.total_seconds()),
        jwt_svid_ttl_seconds=int(entry.jwt_svid_ttl.total_seconds()),
        dns_names=list(entry.dns_names),
        federates_with=[t.name for t in entry.federates_with],
        nodes=sorted(entry.nodes),
        hint=entry.hint,
    )


def entry_from_proto(message: ca_pb2.Entry) -> RegistrationEntry:
    """The ``RegistrationEntry`` an ``Entry`` message carries (raises ``EntryError``)."""
    return RegistrationEntry.create(
        message.spiffe_id,
        list(message.selectors),
        nodes=list(message.nodes),
        entry_id=message.entry_id,
        x509_svid_ttl=dt.timedelta(seconds=message.x509_svid_ttl_seconds),
        jwt_svid_ttl=dt.timedelta(seconds=message.jwt_svid_ttl_seconds),
        dns_names=list(message.dns_names),
        federates_with=list(message.federates_with),
        hint=message.hint,
    )


def svid_to_proto(svid: X509Svid) -> ca_pb2.X509SVID:
    return ca_pb2.X509SVID(
        spiffe_id=str(svid.spiffe_id),
        cert_chain=list(svid.chain_der()),
        expires_at=int(svid.expires_at.timestamp()),
    )
