"""The webhook's readiness (``/healthz``, the Deployment's readiness probe) against the
certificate it serves, over real HTTPS on loopback.

The API server trusts the ``caBundle`` the leader writes before the Secret; once the kubelet
swaps the new Secret in, a webhook still serving the old pair is refused by the API server
("x509: certificate is valid for ...") and every pod created meanwhile with it. So a 200
from the probe must mean: a new handshake gets the mounted certificate. The periodic reload
is set to an hour here, so only the probe itself can close the window.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from pathlib import Path

from cryptography import x509

from mesh_operator.injection import InjectorConfig
from mesh_operator.webhook import serve_webhook
from mesh_operator.webhook_certs import WebhookPki, plan_rotation, service_dns_names

from .conftest import run, write_pki


def _fresh_pki() -> WebhookPki:
    return plan_rotation(
        None,
        dns_names=service_dns_names("trellis-operator", "trellis-system"),
        now=dt.datetime.now(dt.UTC),
    ).pki


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # as the kubelet's HTTPS probe
    return context


def _probe(port: int) -> tuple[int, bytes]:
    """The kubelet's probe: GET /healthz, unverified; its status and the certificate the
    handshake was served (a new connection, so a new handshake)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        _unverified().wrap_socket(raw) as tls,
    ):
        served = tls.getpeercert(binary_form=True) or b""
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: webhook\r\nConnection: close\r\n\r\n")
        answer = b""
        for _ in range(64):  # bounded: the answer is a few hundred bytes
            chunk = tls.recv(4096)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, served


def _der(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _served_after_probe(tmp_path: Path, swap: dict[str, bytes]) -> tuple[int, bytes, WebhookPki]:
    """Serve the first pair, write ``swap`` (file name → bytes) over it, probe once, and
    then see which certificate a new handshake gets."""
    first = _fresh_pki()
    files = write_pki(tmp_path / "tls", first)

    async def body() -> tuple[int, bytes]:
        started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(
            serve_webhook(
                InjectorConfig(),
                files,
                host="127.0.0.1",
                port=0,
                started=started,
                reload_interval=3600,
            )
        )
        try:
            port = await asyncio.wait_for(started, 10)
            assert await asyncio.to_thread(_probe, port) == (200, _der(first.tls_crt))
            for name, data in swap.items():
                (tmp_path / "tls" / name).write_bytes(data)
            status, _ = await asyncio.to_thread(_probe, port)
            _, served = await asyncio.to_thread(_probe, port)
            return status, served
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)

    status, served = run(body())
    return status, served, first


def test_the_webhook_is_ready_only_once_it_serves_the_certificate_mounted(tmp_path: Path) -> None:
    """The kubelet swaps a new Secret in; the probe right after it either answers 503 or
    the webhook already serves the new certificate. Before the fix: 200 with the old one
    for up to a reload interval."""
    fresh = _fresh_pki()
    status, served, _first = _served_after_probe(
        tmp_path, {"tls.key": fresh.tls_key, "tls.crt": fresh.tls_crt}
    )
    assert status == 200
    assert served == _der(fresh.tls_crt)


def test_a_half_written_pair_keeps_the_old_certificate_and_the_webhook_not_ready(
    tmp_path: Path,
) -> None:
    """The certificate new, its key still the old one: the pair cannot be loaded, the old
    one keeps being served, and the probe says not ready (it said 200 before the fix)."""
    fresh = _fresh_pki()
    status, served, first = _served_after_probe(tmp_path, {"tls.crt": fresh.tls_crt})
    assert status == 503
    assert served == _der(first.tls_crt)
