"""The Trellis node agent: SVID cache and rotation, and the SPIFFE Workload API.

Public surface (import from ``ca.agent``):

* ``Agent``, ``AgentConfig`` — the whole agent process (``trellis agent``).
* ``Upstream``, ``InProcessUpstream``, ``GrpcUpstream``, ``UpstreamUnavailable``,
  ``UpstreamRefused`` — what the agent needs from its CA, in-process or over gRPC.
* ``SvidCache``, ``JwtCache``, ``rotation_time`` — the sans-I/O cache and schedule.
* ``Batcher`` (``BatchQueueFull``, ``BatcherClosed``) — group commit: coalesces concurrent
  signing needs into few ``BatchNewX509SVID`` calls, one in flight at a time.
* ``Rotator`` — the asyncio shell that attests, syncs, rotates and watches the bundle.
* ``WorkloadApi`` — the ``SpiffeWorkloadAPI`` servicer; ``UdsFront`` — the Unix socket
  front that records SO_PEERCRED for every connection.
* ``PeerCredentials``, ``WorkloadAttestor``, ``UnixAttestor``, ``SubsetMatcher`` —
  workload attestation; ``ca.agent.k8s`` adds Kubernetes pod selectors.
* ``WorkloadClient`` (``ca.agent.workload_client``) — a small blocking Workload API client
  (``trellis svid fetch``). The CA's own client, which the agent uses, is ``ca.api.CaClient``.

Layering: ``cache``/``backoff``/``attestation``/``k8s`` (pure) ← ``batcher`` ←
``rotator``/``peercred``/``workload_api`` (I/O shells) ← ``agent`` ← ``cli``.
"""

from ca.agent.agent import Agent, AgentConfig
from ca.agent.attestation import (
    PeerCredentials,
    SubsetMatcher,
    UnixAttestor,
    WorkloadAttestor,
    WorkloadAttributes,
)
from ca.agent.batcher import Batcher, BatcherClosed, BatchQueueFull
from ca.agent.cache import JwtCache, SvidCache, rotation_time
from ca.agent.grpc_upstream import GrpcUpstream
from ca.agent.peercred import PeerRegistry, UdsFront
from ca.agent.rotator import Rotator, RotatorConfig
from ca.agent.upstream import (
    InProcessUpstream,
    Upstream,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnavailable,
)
from ca.agent.workload_api import WorkloadApi, WorkloadApiConfig
from ca.agent.workload_client import WorkloadApiError, WorkloadClient

__all__ = [
    "Agent",
    "AgentConfig",
    "BatchQueueFull",
    "Batcher",
    "BatcherClosed",
    "GrpcUpstream",
    "InProcessUpstream",
    "JwtCache",
    "PeerCredentials",
    "PeerRegistry",
    "Rotator",
    "RotatorConfig",
    "SubsetMatcher",
    "SvidCache",
    "UdsFront",
    "UnixAttestor",
    "Upstream",
    "UpstreamError",
    "UpstreamRefused",
    "UpstreamUnavailable",
    "WorkloadApi",
    "WorkloadApiConfig",
    "WorkloadApiError",
    "WorkloadAttestor",
    "WorkloadAttributes",
    "WorkloadClient",
    "rotation_time",
]
