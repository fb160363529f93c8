"""Kubernetes PSAT node attestation through TokenReview, end to end over gRPC.

There is no kube-apiserver on this machine (nor any way to install one), so the API
server here is a small fake: an aiohttp HTTPS endpoint that speaks the real
``authentication.k8s.io/v1`` TokenReview JSON (request and response bodies shaped as a
real API server sends them, bearer-token authentication of the caller included). The CA
talks to it through the official ``kubernetes`` Python client configured from a
kubeconfig file, exactly as it would talk to a real cluster.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.api import CaError
from ca.server.k8s import KubernetesTokenReviewer
from tests.support import free_port

from .conftest import client_for, run, server_config, serving

API_BEARER = "fake-apiserver-credential"
AGENT_SA = "system:serviceaccount:trellis-system:trellis-agent"


def _projected_token(node: str | None) -> str:
    """A token shaped like a projected SA token (the fake does not check its signature;
    the real API server would, which is what TokenReview is for)."""
    claims: dict[str, Any] = {
        "aud": ["trellis-ca"],
        "iss": "https://kubernetes.default.svc",
        "sub": AGENT_SA,
        "kubernetes.io": {
            "namespace": "trellis-system",
            "pod": {"name": "trellis-agent-x7k2p", "uid": "8d6f-pod"},
            "serviceaccount": {"name": "trellis-agent", "uid": "1a2b-sa"},
        },
    }
    if node is not None:
        claims["kubernetes.io"]["node"] = {"name": node, "uid": "77aa-node"}

    def b64(doc: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'RS256', 'kid': 'k1'})}.{b64(claims)}.c2lnbmF0dXJl"


class FakeApiServer:
    """Answers POST /apis/authentication.k8s.io/v1/tokenreviews like kube-apiserver."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []

    async def token_review(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {API_BEARER}":
            return web.json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": "Unauthorized",
                    "reason": "Unauthorized",
                    "code": 401,
                },
                status=401,
            )
        body = await request.json()
        self.requests.append(body)
        assert body["apiVersion"] == "authentication.k8s.io/v1"
        assert body["kind"] == "TokenReview"
        spec = body["spec"]
        user = self.users.get(spec["token"])
        wanted = spec.get("audiences") or []
        if user is None or "trellis-ca" not in wanted:
            status: dict[str, Any] = {
                "user": {},
                "error": "[invalid bearer token, token lookup failed]",
            }
        else:
            status = {"authenticated": True, "user": user, "audiences": ["trellis-ca"]}
        return web.json_response(
            {
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": spec,
                "status": status,
            },
            status=201,
        )


def _self_signed(tmp: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "apiserver.crt").write_bytes(cert_pem)
    (tmp / "apiserver.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tmp / "apiserver.crt", tmp / "apiserver.key", cert_pem


@contextlib.asynccontextmanager
async def fake_apiserver(tmp: Path) -> AsyncIterator[tuple[FakeApiServer, Path]]:
    import ssl

    fake = FakeApiServer()
    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", fake.token_review)
    cert, key, cert_pem = _self_signed(tmp)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, _kubeconfig(tmp / "kubeconfig", port, cert_pem, API_BEARER)
    finally:
        await runner.cleanup()


def _kubeconfig(path: Path, port: int, cert_pem: bytes, bearer: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "fake",
                        "cluster": {
                            "server": f"https://127.0.0.1:{port}",
                            "certificate-authority-data": base64.b64encode(cert_pem).decode(),
                        },
                    }
                ],
                "users": [{"name": "trellis-ca", "user": {"token": bearer}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "trellis-ca"}}
                ],
                "current-context": "fake",
            }
        )
    )
    return path


def _agent_user(node: str | None, account: str = AGENT_SA) -> dict[str, Any]:
    extra = {
        "authentication.kubernetes.io/credential-id": ["JTI=0b4f0a2e"],
        "authentication.kubernetes.io/pod-name": ["trellis-agent-x7k2p"],
        "authentication.kubernetes.io/pod-uid": ["8d6f-pod"],
    }
    if node is not None:
        extra["authentication.kubernetes.io/node-name"] = [node]
        extra["authentication.kubernetes.io/node-uid"] = ["77aa-node"]
    return {
        "username": account,
        "uid": "1a2b-sa",
        "groups": [
            "system:serviceaccounts",
            "system:serviceaccounts:trellis-system",
            "system:authenticated",
        ],
        "extra": extra,
    }


def test_psat_attestation_names_the_node_from_the_token_review(
    ca_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with fake_apiserver(tmp_path) as (fake, kubeconfig):
            new_style = _projected_token("worker-1")
            old_style = _projected_token("worker-2")  # k8s < 1.32: node only in the token
            fake.users[new_style] = _agent_user("worker-1")
            fake.users[old_style] = _agent_user(None)
            reviewer = KubernetesTokenReviewer.from_kubeconfig(kubeconfig)
            config = replace(server_config(ca_dir), token_reviewer=reviewer)
            async with serving(config) as server:
                identity = await client_for(server).attest_with_psat(new_style)
                assert identity.node_name == "worker-1"
                assert str(identity.svid.spiffe_id).endswith("/trellis/agent/worker-1")
                identity = await client_for(server).attest_with_psat(old_style)
                assert identity.node_name == "worker-2"
            assert fake.requests[0]["spec"]["audiences"] == ["trellis-ca"]

    run(scenario())


def test_psat_refusals_are_unauthenticated_and_an_api_outage_is_unavailable(
    ca_dir: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with fake_apiserver(tmp_path) as (fake, kubeconfig):
            workload = _projected_token("worker-1")
            fake.users[workload] = _agent_user("worker-1", "system:serviceaccount:default:web")
            reviewer = KubernetesTokenReviewer.from_kubeconfig(kubeconfig)
            config = replace(server_config(ca_dir), token_reviewer=reviewer)
            async with serving(config) as server:
                cases = [
                    (_projected_token("worker-9"), "psat-not-authenticated"),  # unknown token
                    (workload, "psat-service-account-not-allowed"),
                ]
                for token, reason in cases:
                    with pytest.raises(CaError) as refused:
                        await client_for(server).attest_with_psat(token)
                    assert refused.value.code == "UNAUTHENTICATED"
                    assert (
                        server.metrics.value("trellis_ca_requests_rejected_total", reason=reason)
                        == 1
                    )
                # the CA's own credential refused, or no API server: an outage, not the agent's
                config_doc = json.loads(kubeconfig.read_text())
                cluster = config_doc["clusters"][0]["cluster"]
                port = int(cluster["server"].rsplit(":", 1)[1])
                cert_pem = base64.b64decode(cluster["certificate-authority-data"])
                wrong = _kubeconfig(tmp_path / "wrong", port, cert_pem, "not-the-ca-credential")
                down = _kubeconfig(tmp_path / "down", free_port(), cert_pem, API_BEARER)
                for broken, reason in ((wrong, "401"), (down, "failed")):
                    server.service.token_reviewer = KubernetesTokenReviewer.from_kubeconfig(broken)
                    with pytest.raises(CaError) as outage:
                        await client_for(server).attest_with_psat(workload)
                    assert outage.value.code == "UNAVAILABLE"
                    assert outage.value.retryable
                    assert reason in outage.value.detail
                assert (
                    server.metrics.value(
                        "trellis_ca_requests_rejected_total", reason="token-review-unavailable"
                    )
                    == 2
                )

    run(scenario())


def test_a_banned_node_cannot_attest_with_a_genuine_psat(ca_dir: Path, tmp_path: Path) -> None:
    from ca.server.bans import write_ban_list

    bans = tmp_path / "banned.yaml"
    write_ban_list(bans, frozenset({"worker-1"}))

    async def scenario() -> None:
        async with fake_apiserver(tmp_path) as (fake, kubeconfig):
            banned, allowed = _projected_token("worker-1"), _projected_token("worker-2")
            fake.users[banned] = _agent_user("worker-1")
            fake.users[allowed] = _agent_user("worker-2")
            reviewer = KubernetesTokenReviewer.from_kubeconfig(kubeconfig)
            config = replace(
                server_config(ca_dir), token_reviewer=reviewer, banned_agents_path=bans
            )
            async with serving(config) as server:
                with pytest.raises(CaError) as refused:
                    await client_for(server).attest_with_psat(banned)
                assert refused.value.code == "PERMISSION_DENIED"
                assert (
                    server.metrics.value(
                        "trellis_ca_requests_rejected_total", reason="agent-banned"
                    )
                    == 1
                )
                identity = await client_for(server).attest_with_psat(allowed)
                assert identity.node_name == "worker-2"

    run(scenario())
