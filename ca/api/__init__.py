"""The CA's agent-facing API, ``trellis.ca.v1``: its proto, the client the agent uses,
and the values both sides exchange.

Public surface (import from ``ca.api``):

* ``CaClient`` — the node agent's asyncio client (attest, renew, sign, entries, bundles);
  ``CaError`` — every failed call, with its gRPC status and whether a retry makes sense;
  ``build_csr`` — the PKCS#10 request for a key; ``DEFAULT_SERVER_NAME``.
* ``AgentIdentity``, ``BundleUpdate``, ``JwtSvidToken`` — what the client returns.
* ``AttestationRequest`` (``JoinTokenProof``, ``PsatProof``), ``SvidRequest``,
  ``AgentSvid``, ``SignedSvid``, ``NodeEntries`` — what the CA server's service takes and
  returns (``ca.server.service``), free of protobuf.
* ``ca.api.convert`` — each value to and from its ``trellis.ca.v1`` message (``SERVICE``
  is the gRPC service name); the server's gRPC shell and the client use it at the wire.

The proto is ``ca/api/proto/trellis/ca/v1/ca.proto``; its generated code (``ca.api._proto``,
excluded from ruff and mypy) is rebuilt by ``scripts/gen-protos.sh``. ``ca.server`` (the CA)
and ``ca.agent`` (the node agent) both import this package and never each other.
"""

from ca.api.client import DEFAULT_SERVER_NAME, CaClient
from ca.api.convert import SERVICE
from ca.api.csr import build_csr
from ca.api.errors import CaError
from ca.api.values import (
    AgentIdentity,
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

__all__ = [
    "DEFAULT_SERVER_NAME",
    "SERVICE",
    "AgentIdentity",
    "AgentSvid",
    "AttestationRequest",
    "BundleUpdate",
    "CaClient",
    "CaError",
    "JoinTokenProof",
    "JwtSvidToken",
    "NodeEntries",
    "NodeProof",
    "PsatProof",
    "SignedSvid",
    "SvidRequest",
    "build_csr",
]
