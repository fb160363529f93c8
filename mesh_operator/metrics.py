"""The webhook's Prometheus metrics (``trellis_operator_*``), served as ``/metrics`` on the
webhook's own HTTPS port.

Why that port and no other: the API server reaches the webhook there, so a Prometheus that
cannot scrape it (``up == 0``) sees what the API server sees, and injection is
``failurePolicy: Fail``. Labels carry no pod or namespace of the reviewed object:
cardinality stays fixed however many pods a cluster admits.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from core.buildinfo import register_build_info

__all__ = ["WEBHOOKS", "WebhookMetrics"]

# The routes the webhook configuration calls, as the `webhook` label names them.
WEBHOOKS = ("mutate", "mutate_cni", "validate")


class WebhookMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_build_info(self.registry)
        self.reviews = Counter(
            "trellis_operator_admission_reviews_total",
            "AdmissionReviews answered, by webhook and whether the object was allowed",
            ["webhook", "allowed"],
            registry=self.registry,
        )
        # Exported at 0 from start-up: a quiet cluster's dashboard shows 0, not "No data".
        for webhook in WEBHOOKS:
            for allowed in ("true", "false"):
                self.reviews.labels(webhook=webhook, allowed=allowed)
        self.certificate_expiry = Gauge(
            "trellis_operator_webhook_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate the webhook presents (Unix seconds)",
            registry=self.registry,
        )

    def reviewed(self, webhook: str, allowed: bool) -> None:
        self.reviews.labels(webhook=webhook, allowed="true" if allowed else "false").inc()
