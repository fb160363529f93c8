"""``ca.api.convert``: every value crosses the wire (serialised ``trellis.ca.v1`` bytes)
and comes back as the value it was."""

from __future__ import annotations

import datetime as dt

from ca import (
    IntermediateAuthority,
    KeyAlgorithm,
    RootAuthority,
    TrustBundle,
    TrustDomain,
    generate_private_key,
)
from ca.api import convert
from ca.api._proto import ca_pb2
from ca.api.values import (
    AttestationRequest,
    BundleUpdate,
    JoinTokenProof,
    JwtSvidToken,
    NodeEntries,
    PsatProof,
    SignedSvid,
)
from ca.entries import RegistrationEntry
from ca.spiffeid import SpiffeId


def test_a_bundle_update_comes_back_with_its_federated_bundles(
    root: RootAuthority, other_root: RootAuthority
) -> None:
    own = TrustBundle(root.trust_domain, (root.certificate,), sequence=7)
    partner = TrustBundle(other_root.trust_domain, (other_root.certificate,), sequence=2)
    wire = convert.bundle_update_to_proto(BundleUpdate(own, (partner,))).SerializeToString()
    message = ca_pb2.Bundle.FromString(wire)
    assert convert.bundle_from_proto(message).same_content(own)
    (federated,) = message.federated
    back = convert.bundle_from_proto(federated)
    assert back.trust_domain == TrustDomain("other.test") and back.same_content(partner)


def test_an_entry_and_the_node_answer_around_it_survive_the_wire_unchanged() -> None:
    entry = RegistrationEntry.create(
        "spiffe://example.org/ns/default/sa/web",
        ["unix:uid:1000", "k8s:ns:default"],
        nodes=["node-a", "node-b"],
        x509_svid_ttl=dt.timedelta(minutes=30),
        jwt_svid_ttl=dt.timedelta(minutes=2),
        dns_names=["web.default.svc"],
        federates_with=["partner.org"],
        hint="internal",
    )
    answer = NodeEntries((entry,), "rev-1", 250)
    wire = convert.node_entries_to_proto(answer).SerializeToString()
    message = ca_pb2.FetchEntriesResponse.FromString(wire)
    assert (message.revision, message.max_batch) == ("rev-1", 250)
    assert [convert.entry_from_proto(e) for e in message.entries] == [entry]


def test_an_attestation_request_carries_its_proof_or_says_it_has_none() -> None:
    def received(message: ca_pb2.AttestAgentRequest) -> AttestationRequest:
        return convert.attestation_from_proto(
            ca_pb2.AttestAgentRequest.FromString(message.SerializeToString())
        )

    token = ca_pb2.AttestAgentRequest(
        join_token=ca_pb2.JoinTokenAttestation(token="tjt_x"), csr=b"csr"
    )
    psat = ca_pb2.AttestAgentRequest(k8s_psat=ca_pb2.K8sPsatAttestation(token="a.b.c"))
    bare = ca_pb2.AttestAgentRequest(csr=b"csr")
    assert received(token).proof == JoinTokenProof("tjt_x")
    assert received(psat).proof == PsatProof("a.b.c")
    assert received(bare).proof is None


def test_a_signed_svid_travels_as_der_and_loads_as_the_issued_chain(
    intermediate: IntermediateAuthority, now: dt.datetime
) -> None:
    key = generate_private_key(KeyAlgorithm.P256)
    svid = intermediate.issue_x509_svid(
        "spiffe://example.org/ns/default/sa/web", key.public_key(), now=now
    )
    signed = SignedSvid(svid.spiffe_id, svid.chain_der(), int(svid.expires_at.timestamp()))
    wire = convert.signed_svid_to_proto(signed).SerializeToString()
    back = convert.svid_from_proto(ca_pb2.X509SVID.FromString(wire), key)
    assert back.chain == svid.chain and back.spiffe_id == svid.spiffe_id
    assert back.private_key is key


def test_a_jwt_svid_answer_keeps_its_subject_token_and_expiry_to_the_second() -> None:
    expires = dt.datetime(2026, 12, 8, 1, 0, 0, tzinfo=dt.UTC)
    token = JwtSvidToken(SpiffeId("spiffe://example.org/ns/default/sa/web"), "h.p.s", expires)
    message = ca_pb2.NewJWTSVIDResponse.FromString(
        convert.jwt_svid_to_proto(token).SerializeToString()
    )
    assert (message.spiffe_id, message.token) == (str(token.spiffe_id), "h.p.s")
    assert message.expires_at == int(expires.timestamp())
