"""The agent's Prometheus metrics (``trellis_agent_*``, a contract of the dashboards).

Labels never carry a per-workload value (SPIFFE ID, pid, uid): cardinality stays fixed
however many workloads a node runs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from core.buildinfo import register_build_info

__all__ = ["AgentMetrics"]


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        register_build_info(r)
        self.rotations = Counter(
            "trellis_agent_svid_rotations_total",
            "X509-SVIDs obtained for cached entries (first issue and rotations)",
            ["kind"],  # initial | rotation | reissue
            registry=r,
        )
        self.fetch_errors = Counter(
            "trellis_agent_upstream_fetch_errors_total",
            "Failed calls to the CA, by operation and whether a retry can help",
            ["operation", "retryable"],
            registry=r,
        )
        self.refusals = Counter(
            "trellis_agent_upstream_refusals_total",
            "Calls the CA refused (not worth retrying as-is), by operation and reason, e.g. "
            "permission-denied for a banned node",
            ["operation", "reason"],
            registry=r,
        )
        self.cache_size = Gauge(
            "trellis_agent_svid_cache_size", "X509-SVIDs currently cached", registry=r
        )
        self.entries = Gauge(
            "trellis_agent_registration_entries", "Registration entries for this node", registry=r
        )
        self.nearest_expiry = Gauge(
            "trellis_agent_svid_nearest_expiry_seconds",
            "Seconds until the soonest-expiring cached X509-SVID expires (-1: none cached)",
            registry=r,
        )
        self.agent_svid_expiry = Gauge(
            "trellis_agent_agent_svid_expiry_seconds",
            "Seconds until the agent's own SVID expires (-1: none)",
            registry=r,
        )
        self.upstream_up = Gauge(
            "trellis_agent_upstream_up",
            "1 if the last call to the CA succeeded, else 0",
            registry=r,
        )
        self.workload_requests = Counter(
            "trellis_agent_workload_api_requests_total",
            "Workload API calls by method and resulting gRPC status",
            ["method", "code"],
            registry=r,
        )
        self.workload_streams = Gauge(
            "trellis_agent_workload_api_streams",
            "Open Workload API streams",
            registry=r,
        )
        self.bundle_updates = Counter(
            "trellis_agent_bundle_updates_total", "Trust bundle changes received", registry=r
        )
