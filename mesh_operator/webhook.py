"""The admission webhook's HTTPS shell (aiohttp): ``/mutate``, ``/mutate/cni``,
``/validate``, ``/healthz``, ``/metrics`` (``mesh_operator.metrics``).

``/mutate/cni`` injects with the redirect left to the node's CNI plugin: the webhook
configuration sends namespaces labelled ``trellis.dev/redirect: cni`` there (the API server
evaluates the namespaceSelector; the review itself carries no namespace labels).

All decisions are in ``mesh_operator.admission``; this module reads bodies, enforces the
size limit before buffering more than it allows, and serves TLS with a certificate that it
reloads when the mounted Secret changes (the kubelet swaps the files in place; the
``SSLContext`` takes the new pair for every handshake after ``load_cert_chain``).
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

__all__ = ["CertificateFiles", "build_app", "serve_webhook", "server_ssl_context"]

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


def _certificate_expiry(files: CertificateFiles) -> float:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc.timestamp()


def build_app(config: InjectorConfig, metrics: WebhookMetrics | None = None) -> web.Application:
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
        return web.Response(text="ok\n")

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
    context = server_ssl_context(files)
    stamp = files.stamp()
    metrics = WebhookMetrics()
    metrics.certificate_expiry.set(_certificate_expiry(files))
    runner = web.AppRunner(build_app(config, metrics), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=context)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    if started is not None and not started.done():
        started.set_result(int(bound))
    try:
        while True:
            await asyncio.sleep(reload_interval)
            now = files.stamp()
            if now is not None and now != stamp:
                try:
                    # A scratch context first: OpenSSL installs the certificate before it
                    # checks the key, so a half-written pair loaded straight into the live
                    # context would leave it with a certificate and no usable key.
                    server_ssl_context(files)
                    context.load_cert_chain(files.cert, files.key)
                    metrics.certificate_expiry.set(_certificate_expiry(files))
                except (OSError, ssl.SSLError, ValueError) as exc:
                    # Half-written pair (cert and key swapped separately): keep serving the
                    # old one and try again next round.
                    log.warning("certificate reload failed", extra={"fields": {"error": str(exc)}})
                    continue
                stamp = now
                log.info("webhook certificate reloaded")
    finally:
        await runner.cleanup()
