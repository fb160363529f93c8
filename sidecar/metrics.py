"""The sidecar's Prometheus metrics, in a registry of its own.

The `tls_*` names and labels are a public contract (dashboards and alert
rules use them); the `trellis_sidecar_*` names are this module's, documented in the
package docstring.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from core.buildinfo import register_build_info
from sidecar.tls import CipherSuite, HandshakeComplete, NamedGroup, SignatureScheme

__all__ = ["Metrics"]

# Why a caller without TLS was closed unforwarded (`sidecar.permissive`).
PASSTHROUGH_OUTCOMES = ("forwarded", "refused", "unreachable")
PLAINTEXT_REFUSALS = ("strict", "undeclared_port", "no_original_destination", "app_unreachable")
# What the inbound sidecar did with an HTTP request it read from 0-RTT data
# (`sidecar.earlydata`): served with `Early-Data: 1`, or answered 425 Too Early.
EARLY_DATA_DECISIONS = ("served", "too_early")

_HANDSHAKE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _name(enum: type[CipherSuite] | type[NamedGroup] | type[SignatureScheme], value: int) -> str:
    try:
        return str(enum(value).name)
    except ValueError:
        return f"0x{value:04x}"


def suite_name(value: int) -> str:
    return "TLS_" + _name(CipherSuite, value)


def group_name(value: int) -> str:
    return _name(NamedGroup, value)


def scheme_name(value: int) -> str:
    return _name(SignatureScheme, value)


class ByteCounts:
    """Application bytes carried, as plain ints that the data path adds to on every read
    (a labelled `Counter` takes a lock per `inc`, which cost more than the work it
    counted); the registry reads them as `trellis_sidecar_bytes_total{direction}`."""

    __slots__ = ("inbound", "outbound")

    def __init__(self) -> None:
        self.inbound = 0  # from the mesh to the app
        self.outbound = 0

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "trellis_sidecar_bytes",
            "Application bytes carried, by direction (in: from the mesh to the app).",
            labels=["direction"],
        )
        family.add_metric(["in"], self.inbound)
        family.add_metric(["out"], self.outbound)
        yield family


class KtlsCollector:
    """kTLS offload (`sidecar.offload`): whether each direction hands records to the
    kernel (`trellis_ktls_enabled{direction}`, 1 or 0, set at start from the probe and
    the configuration), and the connections that stayed in user space by reason
    (`trellis_ktls_fallback_total{reason}`, from `sidecar.ktls.STATS`)."""

    def __init__(self) -> None:
        self.enabled = {"inbound": False, "outbound": False}

    def collect(self) -> Iterator[Metric]:
        from sidecar.ktls import STATS

        enabled = GaugeMetricFamily(
            "trellis_ktls_enabled",
            "1 when connections in this direction hand their records to the kernel (kTLS).",
            labels=["direction"],
        )
        for direction, on in sorted(self.enabled.items()):
            enabled.add_metric([direction], 1.0 if on else 0.0)
        yield enabled
        fallback = CounterMetricFamily(
            "trellis_ktls_fallback",
            "Connections that kept the user-space record layer, by reason "
            "(no_kernel_support: the kernel has no TLS ULP).",
            labels=["reason"],
        )
        for reason, count in sorted(STATS.fallbacks.items()):
            fallback.add_metric([reason], count)
        yield fallback
        yield CounterMetricFamily(
            "trellis_ktls_key_update_closes",
            "kTLS connections closed cleanly on a KeyUpdate the kernel cannot follow "
            "(Linux before 6.14).",
            value=STATS.key_update_closes,
        )


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        register_build_info(r)
        # --- public contract --------------------------------------------------------------
        self.tls_handshake_duration = Histogram(
            "tls_handshake_duration_seconds",
            "Full TLS handshake time, TCP connect/accept to handshake complete.",
            registry=r,
            buckets=_HANDSHAKE_BUCKETS,
        )
        self.tls_resumption = Counter(
            "tls_resumption", "Handshakes by resumption kind.", ["kind"], registry=r
        )
        self.tls_version = Counter(
            "tls_version", "Handshakes by TLS version.", ["version"], registry=r
        )
        self.tls_cipher_suite = Counter(
            "tls_cipher_suite", "Handshakes by cipher suite.", ["suite"], registry=r
        )
        self.tls_group = Counter(
            "tls_group", "Handshakes by key-exchange group.", ["group"], registry=r
        )
        self.tls_early_data = Counter(
            "tls_early_data", "0-RTT data offered, by outcome.", ["outcome"], registry=r
        )
        self.tls_ocsp_staple = Counter(
            "tls_ocsp_staple", "OCSP stapling by outcome.", ["outcome"], registry=r
        )
        self.tls_ech = Counter(
            "tls_ech",
            "Encrypted ClientHello (RFC 9849) by outcome: accepted as the serving side "
            "decided, rejected and grease as the calling side saw and sent it.",
            ["outcome"],
            registry=r,
        )
        for kind in ("psk", "ticket", "none"):
            self.tls_resumption.labels(kind=kind)
        for outcome in ("accepted", "rejected"):
            self.tls_early_data.labels(outcome=outcome)
        for outcome in ("accepted", "rejected", "grease"):
            self.tls_ech.labels(outcome=outcome)
        # --- trellis_sidecar_* ---------------------------------------------------------
        # Beside tls_group_total: the peer's CertificateVerify scheme (RFC 8446 §4.4.3),
        # mldsa65 on a post-quantum trust domain (draft-ietf-tls-mldsa).
        self.tls_signature_scheme = Counter(
            "trellis_sidecar_tls_signature_scheme",
            "Handshakes by the peer's CertificateVerify signature scheme.",
            ["scheme"],
            registry=r,
        )
        self.handshakes = Counter(
            "trellis_sidecar_tls_handshakes",
            "Completed TLS handshakes by direction (outbound: we dialled).",
            ["direction"],
            registry=r,
        )
        self.handshake_failures = Counter(
            "trellis_sidecar_tls_handshake_failures",
            "Failed TLS handshakes by direction and reason.",
            ["direction", "reason"],
            registry=r,
        )
        self.app_connections = Counter(
            "trellis_sidecar_app_connections",
            "Plaintext connections accepted from the local app (outbound) or made to it (inbound).",
            ["direction"],
            registry=r,
        )
        self.pool_connections = Gauge(
            "trellis_sidecar_pool_connections",
            "Open pooled TLS connections (outbound).",
            registry=r,
        )
        self.inbound_connections = Gauge(
            "trellis_sidecar_inbound_connections", "Open inbound TLS connections.", registry=r
        )
        self.streams_active = Gauge(
            "trellis_sidecar_streams_active",
            "Open CONNECT streams by direction.",
            ["direction"],
            registry=r,
        )
        self.streams = Counter(
            "trellis_sidecar_streams",
            "CONNECT streams by direction and outcome (ok, reset, refused, error, retried).",
            ["direction", "outcome"],
            registry=r,
        )
        self.bytes = ByteCounts()
        r.register(self.bytes)
        self.ktls = KtlsCollector()
        r.register(self.ktls)
        self.connections_closed = Counter(
            "trellis_sidecar_connections_closed_by_us",
            "TLS connections we closed because of the peer: protocol_error, abuse "
            "(rapid reset), peer_not_reading (answers piling up), keepalive_timeout; or "
            "drained because their credentials ended: peer_certificate_expired, "
            "local_certificate_expired, trust_bundle_changed (the peer's root left the "
            "bundle), identity_withdrawn (our SVID is no longer issued).",
            ["reason"],
            registry=r,
        )
        self.policy = Counter(
            "trellis_sidecar_policy_decisions",
            "Inbound authorisation decisions.",
            ["decision"],
            registry=r,
        )
        self.connect_errors = Counter(
            "trellis_sidecar_connect_requests_rejected",
            "CONNECT requests refused before policy, by HTTP status.",
            ["status"],
            registry=r,
        )
        # Permissive mode (sidecar.permissive): callers without TLS let through, by the
        # app port they dialled, and those refused, by why.
        self.plaintext_accepted = Counter(
            "trellis_sidecar_plaintext_accepted",
            "Inbound connections without TLS forwarded to the app (permissive mode), by port.",
            ["port"],
            registry=r,
        )
        self.plaintext_refused = Counter(
            "trellis_sidecar_plaintext_refused",
            "Inbound connections without TLS closed unforwarded: strict port, undeclared "
            "port, no original destination, app unreachable.",
            ["reason"],
            registry=r,
        )
        # Exported at 0 from start-up, so a strict mesh's dashboard shows 0, not "No data".
        for reason in PLAINTEXT_REFUSALS:
            self.plaintext_refused.labels(reason=reason)
        # Outbound passthrough (sidecar.passthrough): destinations outside the mesh,
        # forwarded unchanged (ALLOW_ANY), refused (REGISTRY_ONLY) or not answering.
        self.passthrough = Counter(
            "trellis_sidecar_passthrough",
            "Outbound connections to destinations outside the mesh, by outcome.",
            ["outcome"],
            registry=r,
        )
        for outcome in PASSTHROUGH_OUTCOMES:
            self.passthrough.labels(outcome=outcome)
        self.early_data_requests = Counter(
            "trellis_sidecar_early_data_requests",
            "HTTP requests read from TLS 0-RTT data by the inbound sidecar: served (with "
            "Early-Data: 1) or too_early (answered 425, RFC 8470).",
            ["decision"],
            registry=r,
        )
        for decision in EARLY_DATA_DECISIONS:
            self.early_data_requests.labels(decision=decision)
        self.svid_expiry = Gauge(
            "trellis_sidecar_svid_expiry_timestamp_seconds",
            "notAfter of the SVID new handshakes use.",
            registry=r,
        )
        self.svid_updates = Counter(
            "trellis_sidecar_svid_updates", "SVIDs or bundles received.", registry=r
        )
        for reason in (
            "protocol_error",
            "abuse",
            "peer_not_reading",
            "keepalive_timeout",
            "peer_certificate_expired",
            "local_certificate_expired",
            "trust_bundle_changed",
            "identity_withdrawn",
            "record_limit",
        ):
            self.connections_closed.labels(reason=reason)
        for decision in ("allow", "deny"):
            self.policy.labels(decision=decision)
        for direction in ("inbound", "outbound"):
            self.handshakes.labels(direction=direction)
            self.app_connections.labels(direction=direction)
            self.streams_active.labels(direction=direction)

    def handshake_done(self, info: HandshakeComplete, direction: str, seconds: float) -> None:
        self.tls_handshake_duration.observe(seconds)
        # Trellis resumes only with tickets its own mesh issued (RFC 8446 §4.6.1); "psk"
        # stays for external PSKs, which it never configures.
        self.tls_resumption.labels(kind="ticket" if info.session_resumed else "none").inc()
        if direction == "inbound" and info.early_data != "none":
            # Counted where it is decided, once per offer: the server (RFC 8446 §4.2.10).
            self.tls_early_data.labels(outcome=info.early_data).inc()
        # RFC 9849, each connection counted once: the server counts acceptance; only the
        # caller knows it sent GREASE (to the server a rejection, §6.2) and sees a real
        # rejection end its handshake (ech_required: the pool counts it).
        if (direction == "inbound" and info.ech == "accepted") or (
            direction == "outbound" and info.ech == "grease"
        ):
            self.tls_ech.labels(outcome=info.ech).inc()
        self.tls_version.labels(version="TLSv1.3").inc()
        self.tls_cipher_suite.labels(suite=suite_name(info.cipher_suite)).inc()
        self.tls_group.labels(group=group_name(info.group)).inc()
        self.tls_signature_scheme.labels(scheme=scheme_name(info.signature_scheme)).inc()
        # SVIDs live hours at most: nobody staples OCSP for them.
        self.tls_ocsp_staple.labels(outcome="not_applicable").inc()
        self.handshakes.labels(direction=direction).inc()
