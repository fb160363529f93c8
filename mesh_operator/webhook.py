"""The admission webhook's HTTPS shell (aiohttp): ``/mutate``, ``/mutate/cni``,
``/validate``, ``/healthz``, ``/metrics`` (``mesh_operator.metrics``).

``/mutate/cni`` injects with the redirect left to the node's CNI plugin: the webhook
configuration sends namespaces labelled ``trellis.dev/redirect: cni`` there (the API server
evaluates the namespaceSelector; the review itself carries no namespace labels).

All decisions are in ``mesh_operator.admission``; this module reads bodies, enforces the
size limit before buffering more than it allows, and serves TLS with a certificate that it
reloads when the mounted Secret changes (the kubelet swaps the files in place; the
``SSLContext`` takes the new pair for every handshake after ``load_cert_chain``).

``/healthz`` is the Deployment's readiness probe, so it answers 200 only while the pair
served is the pair mounted (``ServedCertificate.ready``): between the kubelet swapping in a
new Secret and the reload, the API server, which trusts the new ``caBundle`` (the leader
writes it first), would refuse the old certificate ("x509: certificate is valid for ...")
and with it every pod created in that window. The probe reloads a changed pair at once
rather than waiting for the next reload round.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from cryptography import x509
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mesh_operator.admission import (
    MAX_REVIEW_BYTES,
    AdmissionOutcome,
    mutate_pod,
    validate_resource,
)
from mesh_operator.injection import InjectorConfig
from mesh_operator.metrics import WebhookMetrics

__all__ = [
    "CertificateFiles",
    "ServedCertificate",
    "build_app",
    "serve_webhook",
    "server_ssl_context",
]

log = logging.getLogger("trellis.operator.webhook")


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    cert: Path
    key: Path

    def stamp(self) -> tuple[float, float] | None:
        try:
            return (self.cert.stat().st_mtime, self.key.stat().st_mtime)
        except OSError:
            return None


def server_ssl_context(files: CertificateFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The API server speaks TLS 1.2 and 1.3; nothing older.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    return context


class ServedCertificate:
    """The live ``SSLContext`` and which certificate it serves, against the mounted files."""

    def __init__(self, files: CertificateFiles, metrics: WebhookMetrics) -> None:
        self.files = files
        self._metrics = metrics
        pem = files.cert.read_bytes()
        self.context = server_ssl_context(files)
        self._served = pem  # read before the load: a swap in between shows as a mismatch
        self._stamp = files.stamp()
        metrics.certificate_expiry.set(_certificate_expiry(pem))

    def reload(self, *, force: bool = False) -> bool:
        """Load the mounted pair if its files changed (``force``: even if their times did
        not); False when it could not be loaded."""
        now = self.files.stamp()
        if now is None or (now == self._stamp and not force):
            return True
        try:
            pem = self.files.cert.read_bytes()
            # A scratch context first: OpenSSL installs the certificate before it checks
            # the key, so a half-written pair loaded straight into the live context would
            # leave it with a certificate and no usable key.
            server_ssl_context(self.files)
            self.context.load_cert_chain(self.files.cert, self.files.key)
            self._metrics.certificate_expiry.set(_certificate_expiry(pem))
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Half-written pair (cert and key swapped separately): keep serving the old one
            # and try again next round.
            log.warning("certificate reload failed", extra={"fields": {"error": str(exc)}})
            return False
        self._served, self._stamp = pem, now
        log.info("webhook certificate reloaded")
        return True

    def ready(self) -> tuple[bool, str]:
        """Whether the certificate mounted is the one served, after loading a changed pair."""
        try:
            if self.files.cert.read_bytes() == self._served:
                return True, "ok"
            # Changed within the files' time resolution, or not reloaded yet: load it now.
            self.reload(force=True)
            mounted = self.files.cert.read_bytes()
        except OSError as exc:
            return False, f"the mounted certificate is unreadable: {exc.strerror or exc}"
        if mounted != self._served:
            return False, "the mounted certificate is not loaded yet"
        return True, "ok"


def _json_response(outcome: AdmissionOutcome) -> web.Response:
    return web.json_response(dict(outcome.body), status=outcome.http_status)


async def _body(request: web.Request) -> bytes | web.Response:
    if request.content_type != "application/json":
        return web.json_response(
            {"error": f"Content-Type must be application/json, not {request.content_type!r}"},
            status=415,
        )
    if request.content_length is not None and request.content_length > MAX_REVIEW_BYTES:
        return web.json_response(
            {
                "error": f"AdmissionReview of {request.content_length} bytes exceeds "
                f"{MAX_REVIEW_BYTES}"
            },
            status=413,
        )
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return web.json_response(
            {"error": f"AdmissionReview exceeds {MAX_REVIEW_BYTES} bytes"}, status=413
        )


def _certificate_expiry(pem: bytes) -> float:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def build_app(
    config: InjectorConfig,
    metrics: WebhookMetrics | None = None,
    certificate: ServedCertificate | None = None,
) -> web.Application:
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    counts = metrics if metrics is not None else WebhookMetrics()

    def mutator(
        injector: InjectorConfig, webhook: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def mutate(request: web.Request) -> web.StreamResponse:
            body = await _body(request)
            if isinstance(body, web.Response):
                return body
            outcome = mutate_pod(body, injector)
            fields = {
                "status": outcome.http_status,
                "allowed": outcome.allowed,
                "redirect": injector.redirect,
            }
            log.info("mutate", extra={"fields": fields})
            counts.reviewed(webhook, outcome.allowed is True)
            return _json_response(outcome)

        return mutate

    async def validate(request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        outcome = validate_resource(body)
        log.info(
            "validate",
            extra={"fields": {"status": outcome.http_status, "allowed": outcome.allowed}},
        )
        counts.reviewed("validate", outcome.allowed is True)
        return _json_response(outcome)

    async def healthz(_request: web.Request) -> web.StreamResponse:
        ready, why = certificate.ready() if certificate is not None else (True, "ok")
        return web.Response(text=why + "\n", status=200 if ready else 503)

    async def metrics_page(_request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=generate_latest(counts.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_post("/mutate", mutator(config, "mutate"))
    app.router.add_post("/mutate/cni", mutator(replace(config, redirect="cni"), "mutate_cni"))
    app.router.add_post("/validate", validate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    return app


async def _wait_for_files(files: CertificateFiles, interval: float) -> None:
    while files.stamp() is None:
        log.info("waiting for the webhook certificate", extra={"fields": {"path": str(files.cert)}})
        await asyncio.sleep(interval)


async def serve_webhook(
    config: InjectorConfig,
    files: CertificateFiles,
    *,
    host: str,
    port: int,
    reload_interval: float = 10.0,
    started: asyncio.Future[int] | None = None,
) -> None:
    """Serve until cancelled; reload the certificate pair whenever its files change.

    The operator replica that is leader writes the Secret; every replica (leader or not)
    serves the webhook from the mounted copy, so injection never waits on leadership.
    """
    await _wait_for_files(files, reload_interval)
    metrics = WebhookMetrics()
    certificate = ServedCertificate(files, metrics)
    runner = web.AppRunner(build_app(config, metrics, certificate), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=certificate.context)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    if started is not None and not started.done():
        started.set_result(int(bound))
    try:
        while True:
            await asyncio.sleep(reload_interval)
            certificate.reload()
    finally:
        await runner.cleanup()
