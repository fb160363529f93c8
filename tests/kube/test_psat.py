"""PSAT node attestation end to end, with tokens the real API server issued and reviews.

A Node and an agent Pod bound to it are stored (never run); the API server's TokenRequest
issues the projected token the kubelet would mount (audience ``trellis-ca``, bound to the
Pod). ``trellis ca serve --k8s-psat`` runs as the ``trellis-ca`` ServiceAccount, so the
TokenReview permission comes from manifests/ca-server/rbac.yaml. A real ``trellis agent``
attests with that token; the refusals are sent over the same gRPC socket by ``CaClient``.

The expired token is the one case the API server cannot be asked for (TokenRequest's
minimum lifetime is ten minutes): it is a copy of a real token's claims with ``exp`` an
hour ago, signed with the API server's own service-account key, which the harness made.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509

from ca.api import CaClient, CaError
from ca.keys import write_private_file
from tests.ca.agent.test_e2e_pyspiffe import Mesh, _make_ca_dir, _stop, _trellis
from tests.support import wait_for

from .conftest import NAMESPACE, Installed
from .controlplane import ControlPlane

NODE = "node-a"


def _store(plane: ControlPlane, obj: dict[str, Any]) -> dict[str, Any]:
    plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(obj))
    namespace = ("-n", obj["metadata"]["namespace"]) if "namespace" in obj["metadata"] else ()
    return plane.get(*namespace, obj["kind"].lower(), obj["metadata"]["name"])


def _agent_pod(plane: ControlPlane, name: str, service_account: str) -> dict[str, Any]:
    return _store(
        plane,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "serviceAccountName": service_account,
                "nodeName": NODE,
                "containers": [{"name": "agent", "image": "ghcr.io/trellis-mesh/trellis:0.1.0"}],
            },
        },
    )


@pytest.fixture(scope="module")
def psat_ca(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    assert installed.apply.returncode == 0, installed.apply.stderr
    plane = installed.plane
    if plane.kubectl("get", "node", NODE).returncode != 0:
        _store(plane, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}})
    plane.kubectl_ok("-n", NAMESPACE, "create", "serviceaccount", "doomed-agent")
    workdir = tmp_path_factory.mktemp("psat")
    _make_ca_dir(workdir / "ca")
    (workdir / "entries.yaml").write_text("entries: []\n")
    short = Path(tempfile.mkdtemp(prefix="tr-psat-"))  # sun_path is at most 108 bytes
    mesh = Mesh(workdir, short / "agent.sock")
    kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "trellis-ca")
    mesh.start_ca(
        mint_token=False,
        extra=[
            "--k8s-psat", f"--kubeconfig={kubeconfig}",
            f"--psat-allow={NAMESPACE}:trellis-agent", f"--psat-allow={NAMESPACE}:doomed-agent",
        ],
    )  # fmt: skip
    try:
        yield mesh
    finally:
        mesh.stop()
        shutil.rmtree(short, ignore_errors=True)


def _attest(mesh: Mesh, token: str) -> str:
    async def go() -> str:
        client = CaClient(
            f"127.0.0.1:{mesh.ca_port}",
            attest_address=f"127.0.0.1:{mesh.attest_port}",
            trust_roots=(mesh.workdir / "ca" / "root.crt").read_bytes(),
        )
        async with client:
            identity = await client.attest_with_psat(token)
        return identity.node_name

    return asyncio.run(go())


def test_agent_attests_with_a_projected_token_the_api_server_issued(
    installed: Installed, psat_ca: Mesh
) -> None:
    plane = installed.plane
    pod = _agent_pod(plane, "trellis-agent-psat", "trellis-agent")
    token = plane.request_token(NAMESPACE, "trellis-agent", audience="trellis-ca", pod=pod)
    token_file = psat_ca.workdir / "psat-token"
    write_private_file(token_file, token.encode())
    agent = _trellis(*psat_ca.agent_args(), "--psat-token-file", str(token_file))
    svid_file = psat_ca.agent_data / "agent-svid.pem"
    try:
        wait_for(lambda: svid_file.is_file() or agent.poll() is not None, 60, "the agent SVID")
        assert agent.poll() is None, _stop(agent)[-3000:]
        leaf = x509.load_pem_x509_certificates(svid_file.read_bytes())[0]
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://example.org/trellis/agent/{NODE}"
        ]
    finally:
        _stop(agent)


def test_token_for_another_audience_is_refused(installed: Installed, psat_ca: Mesh) -> None:
    plane = installed.plane
    pod = _agent_pod(plane, "trellis-agent-audience", "trellis-agent")
    token = plane.request_token(NAMESPACE, "trellis-agent", audience="not-trellis", pod=pod)
    with pytest.raises(CaError) as refused:
        _attest(psat_ca, token)
    assert refused.value.code == "UNAUTHENTICATED", (refused.value.code, str(refused.value))
    assert "is invalid for the target audiences" in str(refused.value)


def test_expired_token_is_refused(installed: Installed, psat_ca: Mesh) -> None:
    plane = installed.plane
    pod = _agent_pod(plane, "trellis-agent-expired", "trellis-agent")
    real = plane.request_token(NAMESPACE, "trellis-agent", audience="trellis-ca", pod=pod)
    assert _attest(psat_ca, real) == NODE  # the same claims, unexpired, are accepted
    claims = jwt.decode(real, options={"verify_signature": False})
    past = int(time.time()) - 7200
    claims.update(iat=past, nbf=past, exp=past + 3600)
    headers = {"kid": jwt.get_unverified_header(real)["kid"]}
    expired = jwt.encode(claims, plane.service_account_key, algorithm="ES256", headers=headers)
    with pytest.raises(CaError) as refused:
        _attest(psat_ca, expired)
    assert refused.value.code == "UNAUTHENTICATED", (refused.value.code, str(refused.value))
    assert "service account token has expired" in str(refused.value)


def test_token_of_a_deleted_service_account_is_refused(installed: Installed, psat_ca: Mesh) -> None:
    plane = installed.plane
    pod = _agent_pod(plane, "doomed-agent-0", "doomed-agent")
    token = plane.request_token(NAMESPACE, "doomed-agent", audience="trellis-ca", pod=pod)
    assert _attest(psat_ca, token) == NODE  # allowed while the account exists
    plane.kubectl_ok("-n", NAMESPACE, "delete", "serviceaccount", "doomed-agent")
    # kube-apiserver caches a successful token authentication for 10 s
    # (--authentication-token-cache-ttl is not a flag; TokenSuccessCacheTTL is fixed), so
    # the review that just passed may pass again until then: refused within 30 s.
    deadline = time.monotonic() + 30
    refused: CaError | None = None
    while refused is None:
        assert time.monotonic() < deadline, "a deleted service account's token still attests"
        try:
            _attest(psat_ca, token)
        except CaError as exc:
            refused = exc
        else:
            time.sleep(1)
    assert refused.code == "UNAUTHENTICATED", (refused.code, str(refused))
    assert 'serviceaccounts "doomed-agent" not found' in str(refused)
