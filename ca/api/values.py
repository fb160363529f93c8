"""The Trellis values the CA API carries, on either side of the wire (no protobuf here).

The agent's client (``ca.api.client``) returns the first three; the CA server's service
(``ca.server.service``) takes and returns the rest. ``ca.api.convert`` turns each into its
``trellis.ca.v1`` message and back, so neither side's logic sees a protobuf message.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ca.bundle import TrustBundle
from ca.entries import RegistrationEntry
from ca.spiffeid import SpiffeId
from ca.x509svid import X509Svid

__all__ = [
    "AgentIdentity",
    "AgentSvid",
    "AttestationRequest",
    "BundleUpdate",
    "JoinTokenProof",
    "JwtSvidToken",
    "NodeEntries",
    "NodeProof",
    "PsatProof",
    "SignedSvid",
    "SvidRequest",
]


# -- what the agent's client hands back ----------------------------------------------------


@dataclass(frozen=True)
class AgentIdentity:
    """What attestation or renewal yields: the node, its agent SVID (with key), the bundle."""

    node_name: str
    svid: X509Svid
    bundle: TrustBundle


@dataclass(frozen=True)
class BundleUpdate:
    """One WatchBundle message: the trust domain's own bundle and the federated ones."""

    bundle: TrustBundle
    federated: tuple[TrustBundle, ...] = ()


@dataclass(frozen=True)
class JwtSvidToken:
    """A JWT-SVID as the CA issued it (NewJWTSVID)."""

    spiffe_id: SpiffeId
    token: str
    expires_at: dt.datetime


# -- what the CA's service takes and returns -----------------------------------------------


@dataclass(frozen=True)
class JoinTokenProof:
    """A single-use join token (local mode): the node it was made for is the caller."""

    token: str


@dataclass(frozen=True)
class PsatProof:
    """A Kubernetes projected service-account token, for the CA to have reviewed."""

    token: str


NodeProof = JoinTokenProof | PsatProof


@dataclass(frozen=True)
class AttestationRequest:
    """AttestAgent: the proof of the node (None when the caller sent none) and the DER
    PKCS#10 CSR of the agent's new key."""

    proof: NodeProof | None
    csr: bytes


@dataclass(frozen=True)
class AgentSvid:
    """AttestAgent's and RenewAgent's answer: the caller's node, its new agent SVID (no
    key: the agent holds it), the trust bundle, and the most CSRs one batch may carry."""

    node_name: str
    svid: X509Svid
    bundle: TrustBundle
    max_batch: int


@dataclass(frozen=True, slots=True)
class SvidRequest:
    """One workload SVID asked for: the entry and the DER PKCS#10 CSR."""

    entry_id: str
    csr: bytes


@dataclass(frozen=True, slots=True)
class SignedSvid:
    """A workload X509-SVID as signed, still DER (leaf first): the CA sends it on without
    parsing it again, and only the agent, which keeps it, loads the certificates."""

    spiffe_id: SpiffeId
    chain_der: tuple[bytes, ...]
    expires_at: int  # Unix seconds, as on the wire


@dataclass(frozen=True)
class NodeEntries:
    """FetchEntries' answer: the entries that may run on the caller's node, the revision of
    the whole entry set, and the most CSRs one batch may carry."""

    entries: tuple[RegistrationEntry, ...]
    revision: str
    max_batch: int
    workload_key_type: str = ""  # a KeyAlgorithm value, or "" for the agent's choice
