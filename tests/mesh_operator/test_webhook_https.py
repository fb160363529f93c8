"""The admission webhook over real HTTPS with AdmissionReview v1 JSON as the API server
sends it: the returned JSONPatch, applied with ``jsonpatch``, gives a Pod that validates
against the Kubernetes 1.37 schema (``kubernetes-validate``), holds the sidecar once, and is
left alone by a second injection; malformed, oversized and wrong-kind reviews get clear
refusals."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest

from mesh_operator.admission import MAX_REVIEW_BYTES
from mesh_operator.injection import INIT_NAME, SIDECAR_NAME, InjectorConfig
from mesh_operator.webhook import serve_webhook
from mesh_operator.webhook_certs import WebhookPki

from .conftest import WEBHOOK_HOST, admission_review, pod, run, write_pki

K8S_VERSION = kubernetes_validate.utils.latest_version()


class Webhook:
    def __init__(self, session: aiohttp.ClientSession, port: int, context: ssl.SSLContext) -> None:
        self.session, self.port, self.context = session, port, context

    async def post(
        self, path: str, body: bytes, content_type: str = "application/json"
    ) -> tuple[int, dict[str, Any]]:
        async with self.session.post(
            f"https://127.0.0.1:{self.port}{path}",
            data=body,
            headers={"Content-Type": content_type},
            ssl=self.context,
            server_hostname=WEBHOOK_HOST,
        ) as response:
            return response.status, await response.json()

    async def review(self, path: str, review: dict[str, Any]) -> dict[str, Any]:
        status, body = await self.post(path, json.dumps(review).encode())
        assert status == 200, body
        assert body["response"]["uid"] == review["request"]["uid"]
        return body["response"]

    async def inject(self, obj: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        response = await self.review("/mutate", admission_review(obj))
        assert response["allowed"] is True
        if "patch" not in response:
            return obj, []
        assert response["patchType"] == "JSONPatch"
        patch = json.loads(base64.b64decode(response["patch"]))
        return jsonpatch.apply_patch(obj, patch), patch


@asynccontextmanager
async def webhook(tmp_path: Path, pki: WebhookPki) -> AsyncIterator[Webhook]:
    files = write_pki(tmp_path / "tls", pki)
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(
        serve_webhook(
            InjectorConfig(), files, host="127.0.0.1", port=0, started=started, reload_interval=0.1
        )
    )
    try:
        port = await asyncio.wait_for(started, 10)
        # Trust exactly what the API server would: the caBundle, and the Service's DNS name.
        context = ssl.create_default_context(cadata=pki.ca_bundle.decode())
        async with aiohttp.ClientSession() as session:
            yield Webhook(session, port, context)
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server


def names(obj: dict[str, Any], field: str) -> list[str]:
    return [c["name"] for c in obj["spec"].get(field) or []]


def test_injected_pod_validates_holds_the_sidecar_once_and_reinjection_changes_nothing(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            original = pod()
            injected, patch = await hook.inject(original)
            assert patch
            kubernetes_validate.validate(injected, K8S_VERSION, strict=True)
            assert names(injected, "initContainers") == [INIT_NAME, SIDECAR_NAME]
            assert names(injected, "containers") == ["app"]
            sidecar = injected["spec"]["initContainers"][1]
            assert sidecar["restartPolicy"] == "Always"
            assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}
            security = sidecar["securityContext"]
            assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
            assert security["capabilities"] == {"drop": ["ALL"]}
            assert sidecar["resources"]["limits"]["memory"]
            env = {e["name"]: e.get("value") for e in sidecar["env"]}
            assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///run/spiffe/workload/agent.sock"
            init = injected["spec"]["initContainers"][0]
            assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
            socket = next(
                v for v in injected["spec"]["volumes"] if v["name"] == "trellis-workload-api"
            )
            assert socket["csi"] == {"driver": "csi.trellis.dev", "readOnly": True}
            # the original volumes and containers are untouched
            assert injected["spec"]["volumes"][0] == original["spec"]["volumes"][0]
            assert injected["spec"]["containers"] == original["spec"]["containers"]
            assert injected["metadata"]["annotations"]["trellis.dev/injected"]

            again, second_patch = await hook.inject(injected)
            assert second_patch == [] and again == injected

    run(body())


def test_explicit_upstreams_skip_the_iptables_init_container_and_keep_app_init_order(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            app_init = {"name": "migrate", "image": "registry.example/migrate:1"}
            original = pod(
                annotations={"trellis.dev/upstreams": "postgres.payments:5432=15432"},
                spec={"initContainers": [app_init]},
            )
            injected, _ = await hook.inject(original)
            kubernetes_validate.validate(injected, K8S_VERSION, strict=True)
            assert names(injected, "initContainers") == [SIDECAR_NAME, "migrate"]
            args = injected["spec"]["initContainers"][0]["args"]
            assert "--mode=explicit" in args
            assert "--upstreams=postgres.payments:5432=15432" in args

    run(body())


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"annotations": {"trellis.dev/inject": "false"}}, "opted out"),
        ({"spec": {"hostNetwork": True}}, "host network"),
    ],
)
def test_opted_out_and_host_network_pods_are_admitted_unchanged(
    tmp_path: Path, webhook_pki: WebhookPki, changes: dict[str, Any], why: str
) -> None:
    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            original = pod(**changes)
            injected, patch = await hook.inject(original)
            assert patch == [], why
            assert injected == original

    run(body())


def test_a_malformed_upstreams_annotation_refuses_the_pod_with_the_fix(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            review = admission_review(pod(annotations={"trellis.dev/upstreams": "postgres"}))
            response = await hook.review("/mutate", review)
            assert response["allowed"] is False
            assert response["status"]["code"] == 422
            assert "SERVICE:PORT=LOCAL_PORT" in response["status"]["message"]

    run(body())


def test_the_webhook_judges_upstreams_by_the_grammar_the_sidecar_reads(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    """A name no resolver takes is refused at admission, naming the entry, rather than
    admitted into a sidecar that dials it; an IPv6 upstream the sidecar reads is admitted,
    and the sidecar parses the flag it is given into the same entries."""
    from sidecar.config import Address, parse_upstreams_flag

    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            bad = pod(
                annotations={"trellis.dev/upstreams": "api.default:80=9001,db..shop:5432=9002"}
            )
            response = await hook.review("/mutate", admission_review(bad))
            assert response["allowed"] is False and response["status"]["code"] == 422
            message = response["status"]["message"]
            assert message.startswith("trellis.dev/upstreams[1]: 'db..shop' ")
            assert "lowercase DNS name" in message

            good = pod(annotations={"trellis.dev/upstreams": "[fd00::7]:5432=9002"})
            injected, _ = await hook.inject(good)
            args = injected["spec"]["initContainers"][0]["args"]
            assert "--upstreams=[fd00::7]:5432=9002" in args
            (upstream,) = parse_upstreams_flag("[fd00::7]:5432=9002", 15008)
            assert upstream.endpoints == (Address("fd00::7", 15008),)

    run(body())


def test_broken_envelopes_get_clear_refusals(tmp_path: Path, webhook_pki: WebhookPki) -> None:
    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            status, refused = await hook.post("/mutate", b"{not json")
            assert status == 400 and "not JSON" in refused["error"]

            status, refused = await hook.post("/mutate", json.dumps(pod()).encode())
            assert status == 400 and "expected kind AdmissionReview" in refused["error"]

            old = admission_review(pod())
            old["apiVersion"] = "admission.k8s.io/v1beta1"
            status, refused = await hook.post("/mutate", json.dumps(old).encode())
            assert status == 400 and "admissionReviewVersions: [v1]" in refused["error"]

            no_uid = admission_review(pod())
            del no_uid["request"]["uid"]
            status, refused = await hook.post("/mutate", json.dumps(no_uid).encode())
            assert status == 400 and "no uid" in refused["error"]

            huge = b'{"pad": "' + b"x" * (MAX_REVIEW_BYTES + 1) + b'"}'
            status, refused = await hook.post("/mutate", huge)
            assert status == 413 and "exceeds" in refused["error"]

            status, refused = await hook.post("/mutate", b"{}", content_type="text/plain")
            assert status == 415 and "application/json" in refused["error"]

    run(body())


def test_a_review_of_the_wrong_kind_is_denied_with_a_configuration_hint(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
            review = admission_review(
                deployment, kind="Deployment", group="apps", resource="deployments"
            )
            response = await hook.review("/mutate", review)
            assert response["allowed"] is False
            assert (
                "restrict the MutatingWebhookConfiguration's rules to pods"
                in (response["status"]["message"])
            )

    run(body())


def test_the_validating_endpoint_explains_what_a_schema_cannot(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:

            def cwi(spec: dict[str, Any]) -> dict[str, Any]:
                obj = {
                    "apiVersion": "trellis.dev/v1alpha1",
                    "kind": "ClusterWorkloadIdentity",
                    "metadata": {"name": "t"},
                    "spec": spec,
                }
                return admission_review(
                    obj,
                    kind="ClusterWorkloadIdentity",
                    group="trellis.dev",
                    version="v1alpha1",
                    resource="clusterworkloadidentities",
                )

            assert (await hook.review("/validate", cwi({"ttl": "2h"})))["allowed"] is True
            denied = await hook.review("/validate", cwi({"ttl": "36h"}))
            assert denied["allowed"] is False
            assert "spec.ttl: 36h is longer than the maximum" in denied["status"]["message"]
            denied = await hook.review(
                "/validate", cwi({"spiffeIDTemplate": "spiffe://{trustDomain}/x/{podName}"})
            )
            assert "pod names and UIDs cannot be attested" in denied["status"]["message"]

            policy = {
                "apiVersion": "trellis.dev/v1alpha1",
                "kind": "AccessPolicy",
                "metadata": {"name": "p"},  # namespace only in the request
                "spec": {"mtls": "DISABLE"},
            }
            review = admission_review(
                policy,
                kind="AccessPolicy",
                group="trellis.dev",
                version="v1alpha1",
                resource="accesspolicies",
            )
            denied = await hook.review("/validate", review)
            assert (
                "spec.mtls: 'DISABLE' must be STRICT or PERMISSIVE" in denied["status"]["message"]
            )

    run(body())


def test_a_rotated_certificate_is_served_without_a_restart(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    import datetime as dt

    from mesh_operator.webhook_certs import plan_rotation, service_dns_names

    async def body() -> None:
        async with webhook(tmp_path, webhook_pki) as hook:
            fresh = plan_rotation(
                None,
                dns_names=service_dns_names("trellis-operator", "trellis-system"),
                now=dt.datetime.now(dt.UTC),
            ).pki
            await asyncio.sleep(0.05)
            write_pki(tmp_path / "tls", fresh)
            hook.context = ssl.create_default_context(cadata=fresh.ca_bundle.decode())
            for _ in range(50):
                try:
                    await hook.review("/mutate", admission_review(pod()))
                    return
                except aiohttp.ClientConnectorCertificateError:
                    await asyncio.sleep(0.1)
            raise AssertionError("the new certificate was never served")

    run(body())
