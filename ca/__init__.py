"""Trellis identity: SPIFFE IDs, X.509 and JWT SVIDs, trust bundles and the CA hierarchy.

Public surface (import from ``ca``):

* ``TrustDomain``, ``SpiffeId``, ``SpiffeIdError`` — parsed, canonical identities.
* ``RootAuthority``, ``IntermediateAuthority``, ``IssuanceError``, ``load_csr`` — the hierarchy.
* ``X509Svid``, ``SvidError``, ``check_leaf`` — X509-SVIDs and their rules.
* ``verify_x509_svid``, ``VerifiedSvid``, ``VerificationError`` — chain verification.
* ``JwtAuthority``, ``JwtSvid``, ``JwtSvidError``, ``validate_jwt_svid`` — JWT-SVIDs.
* ``TrustBundle``, ``BundleError`` — SPIFFE bundles.
* ``KeyAlgorithm``, ``generate_private_key`` — key material.

Beside them, in their own modules: ``ca.entries`` (registration entries and selectors: the
CA serves them, the agent matches workloads against them, the operator writes them),
``ca.api`` (the CA's gRPC API: its proto, the client the agent uses), ``ca.server`` (the
CA server) and ``ca.agent`` (the node agent); the last two never import each other.
"""

from ca.authority import IntermediateAuthority, IssuanceError, RootAuthority, load_csr
from ca.bundle import BundleError, TrustBundle
from ca.jwtsvid import JwtAuthority, JwtSvid, JwtSvidError, validate_jwt_svid
from ca.keys import KeyAlgorithm, KeyMaterialError, generate_private_key
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from ca.verify import VerificationError, VerifiedSvid, verify_x509_svid
from ca.x509svid import SvidError, X509Svid, check_leaf

__all__ = [
    "BundleError",
    "IntermediateAuthority",
    "IssuanceError",
    "JwtAuthority",
    "JwtSvid",
    "JwtSvidError",
    "KeyAlgorithm",
    "KeyMaterialError",
    "RootAuthority",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "TrustBundle",
    "TrustDomain",
    "VerificationError",
    "VerifiedSvid",
    "X509Svid",
    "check_leaf",
    "generate_private_key",
    "load_csr",
    "validate_jwt_svid",
    "verify_x509_svid",
]
