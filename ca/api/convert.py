"""Conversions between Trellis values and ``trellis.ca.v1`` messages (both sides use them).

``*_to_proto`` builds the message a value travels as; ``*_from_proto`` reads a received
message back into values and raises the value's own error on a bad one (``BundleError``,
``EntryError``, ``ValueError`` for an unreadable certificate).
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.api._proto import ca_pb2
from ca.api.values import (
    AgentSvid,
    AttestationRequest,
    BundleUpdate,
    JoinTokenProof,
    JwtSvidToken,
    NodeEntries,
    NodeProof,
    PsatProof,
    SignedSvid,
    SvidRequest,
)
from ca.bundle import TrustBundle
from ca.entries import RegistrationEntry
from ca.keys import PrivateKey
from ca.spiffeid import SpiffeId, TrustDomain
from ca.x509svid import X509Svid

__all__ = [
    "SERVICE",
    "agent_svid_to_attest_response",
    "agent_svid_to_renew_response",
    "attestation_from_proto",
    "bundle_from_proto",
    "bundle_to_proto",
    "bundle_update_to_proto",
    "entry_from_proto",
    "entry_to_proto",
    "jwt_svid_to_proto",
    "node_entries_to_proto",
    "signed_svid_to_proto",
    "svid_from_proto",
    "svid_requests_from_proto",
    "svid_to_proto",
]

SERVICE = "trellis.ca.v1.CaService"


# -- identities and bundles ----------------------------------------------------------------


def svid_from_proto(message: ca_pb2.X509SVID, private_key: PrivateKey | None) -> X509Svid:
    chain = tuple(x509.load_der_x509_certificate(der) for der in message.cert_chain)
    return X509Svid(SpiffeId(message.spiffe_id), chain, private_key)


def svid_to_proto(svid: X509Svid) -> ca_pb2.X509SVID:
    return ca_pb2.X509SVID(
        spiffe_id=str(svid.spiffe_id),
        cert_chain=list(svid.chain_der()),
        expires_at=int(svid.expires_at.timestamp()),
    )


def signed_svid_to_proto(svid: SignedSvid) -> ca_pb2.X509SVID:
    return ca_pb2.X509SVID(
        spiffe_id=str(svid.spiffe_id), cert_chain=list(svid.chain_der), expires_at=svid.expires_at
    )


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


def bundle_update_to_proto(update: BundleUpdate) -> ca_pb2.Bundle:
    """One WatchBundle message: the own bundle, the federated ones inside it."""
    message = bundle_to_proto(update.bundle)
    message.federated.extend(bundle_to_proto(f) for f in update.federated)
    return message


# -- registration entries ------------------------------------------------------------------


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


def node_entries_to_proto(answer: NodeEntries) -> ca_pb2.FetchEntriesResponse:
    return ca_pb2.FetchEntriesResponse(
        entries=[entry_to_proto(e) for e in answer.entries],
        revision=answer.revision,
        max_batch=answer.max_batch,
        workload_key_type=answer.workload_key_type,
    )


# -- the service's requests and answers ----------------------------------------------------


def attestation_from_proto(message: ca_pb2.AttestAgentRequest) -> AttestationRequest:
    kind = message.WhichOneof("attestation")
    proof: NodeProof | None = None
    if kind == "join_token":
        proof = JoinTokenProof(message.join_token.token)
    elif kind == "k8s_psat":
        proof = PsatProof(message.k8s_psat.token)
    return AttestationRequest(proof, message.csr)


def agent_svid_to_attest_response(answer: AgentSvid) -> ca_pb2.AttestAgentResponse:
    return ca_pb2.AttestAgentResponse(
        node_name=answer.node_name,
        svid=svid_to_proto(answer.svid),
        bundle=bundle_to_proto(answer.bundle),
        max_batch=answer.max_batch,
    )


def agent_svid_to_renew_response(answer: AgentSvid) -> ca_pb2.RenewAgentResponse:
    # No node name: the caller's agent SVID already names it.
    return ca_pb2.RenewAgentResponse(
        svid=svid_to_proto(answer.svid),
        bundle=bundle_to_proto(answer.bundle),
        max_batch=answer.max_batch,
    )


def svid_requests_from_proto(
    message: ca_pb2.BatchNewX509SVIDRequest,
) -> tuple[SvidRequest, ...]:
    return tuple(SvidRequest(r.entry_id, r.csr) for r in message.requests)


def jwt_svid_to_proto(token: JwtSvidToken) -> ca_pb2.NewJWTSVIDResponse:
    return ca_pb2.NewJWTSVIDResponse(
        spiffe_id=str(token.spiffe_id),
        token=token.token,
        expires_at=int(token.expires_at.timestamp()),
    )
