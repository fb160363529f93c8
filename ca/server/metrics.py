"""The CA server's Prometheus metrics, in their own registry (names are a public contract).

Every series carries ``trust_domain`` and ``cluster``; none carries a workload's SPIFFE ID
or a node name, so cardinality stays bounded whatever the mesh size.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from core.buildinfo import register_build_info

__all__ = ["CaMetrics"]

_SIGN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class CaMetrics:
    def __init__(self, trust_domain: str, cluster: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        register_build_info(self.registry)
        base = ("trust_domain", "cluster")
        self._base = {"trust_domain": trust_domain, "cluster": cluster}
        self._x509 = Counter(
            "trellis_ca_x509_svid_issued_total",
            "X509-SVIDs signed (workload and agent SVIDs)",
            [*base, "kind"],
            registry=self.registry,
        )
        self._jwt = Counter(
            "trellis_ca_jwt_svid_issued_total",
            "JWT-SVIDs signed",
            base,
            registry=self.registry,
        )
        self._sign = Histogram(
            "trellis_ca_sign_duration_seconds",
            "Time to check one CSR and sign one SVID",
            [*base, "kind"],
            buckets=_SIGN_BUCKETS,
            registry=self.registry,
        )
        self._rejected = Counter(
            "trellis_ca_requests_rejected_total",
            "Requests refused, by reason",
            [*base, "reason"],
            registry=self.registry,
        )
        self._expiry = Gauge(
            "trellis_ca_authority_expiry_timestamp_seconds",
            "When each signing authority expires (Unix seconds)",
            [*base, "authority"],
            registry=self.registry,
        )
        self._agents = Gauge(
            "trellis_ca_attested_agents",
            "Agents holding an unexpired agent SVID from this CA",
            base,
            registry=self.registry,
        )
        self._signing_streams = Gauge(
            "trellis_ca_signing_streams",
            "Open StreamX509SVIDs streams (one per agent signing since its start or renewal)",
            base,
            registry=self.registry,
        )
        self._entry_reload_errors = Counter(
            "trellis_ca_entries_reload_errors_total",
            "Entry source reloads that failed (the previous entries stay in force)",
            base,
            registry=self.registry,
        )
        self._entries = Gauge(
            "trellis_ca_registration_entries",
            "Registration entries in force",
            base,
            registry=self.registry,
        )
        self._federation = Counter(
            "trellis_ca_federation_fetch_total",
            "Fetches of federated trust domains' bundles, by outcome (ok or why refused)",
            [*base, "federated_trust_domain", "outcome"],
            registry=self.registry,
        )
        # Freshness, which the counter cannot show: a partner whose fetches keep failing
        # still counts attempts, but its last good bundle (and any root rotation it missed)
        # ages. Alert rules compare it with time().
        self._federation_success = Gauge(
            "trellis_ca_federation_last_success_timestamp_seconds",
            "When each federated trust domain's bundle was last fetched successfully (Unix "
            "seconds; 0 until the first success)",
            [*base, "federated_trust_domain"],
            registry=self.registry,
        )
        self._x509_workload = self._x509.labels(**self._base, kind="workload")
        self._sign_workload = self._sign.labels(**self._base, kind="workload")
        self._jwt_child = self._jwt.labels(**self._base)

    def x509_issued(self, seconds: float, *, kind: str = "workload") -> None:
        if kind == "workload":
            self._x509_workload.inc()
            self._sign_workload.observe(seconds)
        else:
            self._x509.labels(**self._base, kind=kind).inc()
            self._sign.labels(**self._base, kind=kind).observe(seconds)

    def jwt_issued(self, seconds: float) -> None:
        self._jwt_child.inc()
        self._sign.labels(**self._base, kind="jwt").observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(**self._base, reason=reason).inc()

    def authority_expiry(self, authority: str, timestamp: float) -> None:
        self._expiry.labels(**self._base, authority=authority).set(timestamp)

    def attested_agents(self, count: int) -> None:
        self._agents.labels(**self._base).set(count)

    def signing_stream_opened(self) -> None:
        self._signing_streams.labels(**self._base).inc()

    def signing_stream_closed(self) -> None:
        self._signing_streams.labels(**self._base).dec()

    def entries(self, count: int) -> None:
        self._entries.labels(**self._base).set(count)

    def entry_reload_failed(self) -> None:
        self._entry_reload_errors.labels(**self._base).inc()

    def federation_fetch(self, federated_trust_domain: str, outcome: str) -> None:
        # Both labels are bounded: trust domains come from the configuration, outcomes from
        # a fixed set (ok, unreachable, endpoint-unauthenticated, http-status, too-large,
        # malformed, wrong-trust-domain).
        self._federation.labels(
            **self._base, federated_trust_domain=federated_trust_domain, outcome=outcome
        ).inc()
        # .labels() creates the series at 0 on a first failure: a partner never fetched
        # shows up as infinitely stale rather than not at all.
        last_success = self._federation_success.labels(
            **self._base, federated_trust_domain=federated_trust_domain
        )
        if outcome == "ok":
            last_success.set_to_current_time()

    def federation_forget(self, federated_trust_domain: str) -> None:
        """A partner taken out of the federation file: its freshness series goes with it
        (it would otherwise age forever on the dashboard); its counts stay, as counters do."""
        with contextlib.suppress(KeyError):
            self._federation_success.remove(*self._base.values(), federated_trust_domain)

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 if absent): for tests and the bench."""
        found = self.registry.get_sample_value(name, {**self._base, **labels})
        return found or 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
