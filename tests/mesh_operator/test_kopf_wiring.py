"""The operator's kopf wiring, end to end against a fake API server.

No kube-apiserver can run on these machines (no kind, k3s or envtest binary is reachable),
so ``fake_apiserver.FakeApiServer`` speaks the REST and watch JSON that kopf and the
``kubernetes`` client use. Two operator replicas run in this process, each with its own
``kubernetes`` client (told apart by User-Agent): the test checks that only the Lease
holder writes, that entries, policies, statuses, finalizers and the webhook certificate
appear, that deleting a template revokes its entries before the object goes, and that the
second replica takes over when the first stops. A second test follows Node labels into the
CA's ban list.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from ca.entries import parse_entries_yaml
from ca.server.bans import parse_ban_list
from ca.spiffeid import TrustDomain
from mesh_operator.bans import BAN_LABEL
from mesh_operator.handlers import FINALIZER, OperatorConfig, OperatorState, build_registry
from mesh_operator.replica import run

from .conftest import run as run_async
from .fake_apiserver import FakeApiServer, running

TD = TrustDomain("example.org")


def api_client(url: str, agent: str) -> Any:
    configuration = kubernetes.client.Configuration()
    configuration.host = url
    configuration.retries = 0
    client = kubernetes.client.ApiClient(configuration)
    client.user_agent = agent
    return client


def config(identity: str) -> OperatorConfig:
    return OperatorConfig(
        trust_domain=TD,
        identity=identity,
        lease_duration=2,
        renew_deadline=1.5,
        retry_period=0.2,
        debounce=0.05,
        resync_interval=5.0,
    )


class Replica:
    """One operator replica on its own thread and event loop, as in its own pod.

    (kopf cancels every task created in its loop after it started, so two operators cannot
    share one loop; in a cluster each replica is its own process anyway.)
    """

    def __init__(self, identity: str, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.stop_event = asyncio.Event()
        self.result: concurrent.futures.Future[int] = concurrent.futures.Future()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                code = self.loop.run_until_complete(
                    run(config(identity), api_client(url, identity), None, stop=self.stop_event)
                )
                self.result.set_result(code)
            except BaseException as exc:  # handed to the test through the future
                self.result.set_exception(exc)
            finally:
                self.loop.close()

        self.thread = threading.Thread(target=main, name=identity, daemon=True)
        self.thread.start()

    async def stop(self) -> int:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        try:
            code = await asyncio.wait_for(asyncio.wrap_future(self.result), 15)
        except TimeoutError:
            # It normally stops within 10 ms; once in a loaded CI run it did not within
            # 15 s. Say where every thread and this replica's tasks were, for next time.
            print(f"replica did not stop; threads and {self.thread.name}'s tasks:")
            for ident, frame in sys._current_frames().items():
                print(f"thread {ident}:\n{''.join(traceback.format_stack(frame))}")
            for task in asyncio.all_tasks(self.loop):
                task.print_stack(file=sys.stdout)
            raise
        self.thread.join(5)
        return code


def seed(server: FakeApiServer) -> None:
    for name, labels in (("trellis-system", {}), ("shop", {"trellis.dev/inject": "enabled"})):
        server.put(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )
    for name, sa in (("web-1", "web"), ("web-2", "web")):
        server.put(pod(name, sa))
    for kind, name in (
        ("MutatingWebhookConfiguration", "trellis-sidecar-injector"),
        ("ValidatingWebhookConfiguration", "trellis-validator"),
    ):
        server.put(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": kind,
                "metadata": {"name": name},
                "webhooks": [
                    {
                        "name": f"{i}.trellis.dev",
                        "clientConfig": {
                            "service": {"name": "trellis-operator", "namespace": "trellis-system"}
                        },
                    }
                    for i in range(2)
                ],
            }
        )
    server.put(
        {
            "apiVersion": "trellis.dev/v1alpha1",
            "kind": "ClusterWorkloadIdentity",
            "metadata": {"name": "default"},
            "spec": {"namespaceSelector": {"matchLabels": {"trellis.dev/inject": "enabled"}}},
        }
    )


def pod(name: str, sa: str, node: str = "node-a") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": sa}},
        "spec": {
            "serviceAccountName": sa,
            "nodeName": node,
            "containers": [{"name": "app", "image": "x"}],
        },
        "status": {"phase": "Running"},
    }


async def eventually(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def entries(server: FakeApiServer) -> list[str] | None:
    cm = server.get("configmaps", "trellis-registration-entries", "trellis-system")
    if cm is None:
        return None
    return sorted(str(e.spiffe_id) for e in parse_entries_yaml(cm["data"]["entries.yaml"]))


def ready(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    if obj is None:
        return None
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition["type"] == "Ready":
            return condition
    return None


def test_the_leader_reconciles_crs_and_pods_into_entries_policies_status_and_certificates() -> None:
    async def body() -> None:
        async with running(FakeApiServer()) as server:
            seed(server)
            replica_a = Replica("replica-a", server.url)
            await eventually(
                "replica-a to hold the lease",
                lambda: (
                    (
                        server.get(
                            "leases", "trellis-operator", "trellis-system", "coordination.k8s.io"
                        )
                        or {}
                    )
                    .get("spec", {})
                    .get("holderIdentity")
                    == "replica-a"
                ),
            )
            replica_b = Replica("replica-b", server.url)
            try:
                # entries for the selected pods, in the document the CA server reads
                assert await eventually("entries", lambda: entries(server)) == [
                    "spiffe://example.org/ns/shop/sa/web"
                ]
                template = await eventually(
                    "template status",
                    lambda: ready(
                        server.get("clusterworkloadidentities", "default", group="trellis.dev")
                    ),
                )
                assert template["status"] == "True"
                assert template["reason"] == "EntriesPublished"
                obj = server.get("clusterworkloadidentities", "default", group="trellis.dev")
                assert FINALIZER in obj["metadata"]["finalizers"]
                assert obj["status"]["selectedPods"] == 2

                # a new service account's pod becomes a second entry
                server.put(pod("api-1", "api", node="node-b"))
                await eventually(
                    "the api entry",
                    lambda: (
                        entries(server)
                        == [
                            "spiffe://example.org/ns/shop/sa/api",
                            "spiffe://example.org/ns/shop/sa/web",
                        ]
                    ),
                )

                # an AccessPolicy becomes the namespace's sidecar policy document
                server.put(
                    {
                        "apiVersion": "trellis.dev/v1alpha1",
                        "kind": "AccessPolicy",
                        "metadata": {"name": "web", "namespace": "shop"},
                        "spec": {
                            "selector": {"matchLabels": {"app": "web"}},
                            "protocol": "http",
                            "allow": [{"exact": "spiffe://example.org/ns/shop/sa/api"}],
                        },
                    }
                )
                policy = await eventually(
                    "policy ConfigMap",
                    lambda: server.get("configmaps", "trellis-policy", "shop"),
                )
                assert (
                    '"exact": "spiffe://example.org/ns/shop/sa/api"'
                    in (policy["data"]["policy.json"])
                )

                # the webhook certificate exists and both configurations trust it
                secret = await eventually(
                    "webhook Secret",
                    lambda: server.get("secrets", "trellis-webhook-tls", "trellis-system"),
                )
                bundle = base64.b64decode(secret["data"]["ca.crt"])
                for plural in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
                    name = (
                        "trellis-sidecar-injector"
                        if plural.startswith("mutating")
                        else "trellis-validator"
                    )
                    hooks = server.get(plural, name, group="admissionregistration.k8s.io")
                    assert {
                        base64.b64decode(h["clientConfig"]["caBundle"]) for h in hooks["webhooks"]
                    } == {bundle}

                # an invalid template is reported in words, and issues nothing
                server.put(
                    {
                        "apiVersion": "trellis.dev/v1alpha1",
                        "kind": "ClusterWorkloadIdentity",
                        "metadata": {"name": "broken"},
                        "spec": {"ttl": "72h"},
                    }
                )
                broken = await eventually(
                    "broken status",
                    lambda: ready(
                        server.get("clusterworkloadidentities", "broken", group="trellis.dev")
                    ),
                )
                assert broken["reason"] == "InvalidSpec" and "spec.ttl" in broken["message"]

                # deleting the template revokes its entries before the object goes away
                server.delete("clusterworkloadidentities", "default", group="trellis.dev")
                await eventually(
                    "the template to be gone",
                    lambda: (
                        server.get("clusterworkloadidentities", "default", group="trellis.dev")
                        is None
                    ),
                )
                assert entries(server) == []

                # the follower never wrote anything but its attempts to read the Lease
                assert server.writes_by("replica-b") == []
            finally:
                assert await replica_a.stop() == 0

            # replica-b takes over once the lease expires, and acts
            await eventually(
                "replica-b to take over",
                lambda: (
                    (
                        server.get(
                            "leases", "trellis-operator", "trellis-system", "coordination.k8s.io"
                        )
                        or {}
                    )
                    .get("spec", {})
                    .get("holderIdentity")
                    == "replica-b"
                ),
            )
            server.put(pod("db-1", "db"))
            server.put(
                {
                    "apiVersion": "trellis.dev/v1alpha1",
                    "kind": "ClusterWorkloadIdentity",
                    "metadata": {"name": "again"},
                    "spec": {"podSelector": {"matchLabels": {"app": "db"}}},
                }
            )
            try:
                assert await eventually("replica-b's entries", lambda: entries(server)) == [
                    "spiffe://example.org/ns/shop/sa/db"
                ]
                assert (
                    "PUT",
                    "/api/v1/namespaces/trellis-system/configmaps/trellis-registration-entries",
                ) in server.writes_by("replica-b")
            finally:
                assert await replica_b.stop() == 0

    run_async(body(), timeout=90)


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def banned(server: FakeApiServer) -> frozenset[str] | None:
    cm = server.get("configmaps", "trellis-banned-agents", "trellis-system")
    if cm is None or not (cm["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by"):
        return None
    return parse_ban_list(cm["data"]["banned.yaml"])


def test_node_labels_ban_and_unban_agents_through_the_cas_ban_list() -> None:
    async def body() -> None:
        async with running(FakeApiServer()) as server:
            seed(server)
            server.put(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "trellis-banned-agents", "namespace": "trellis-system"},
                    "data": {"banned.yaml": "[]\n"},  # as kustomize creates it
                }
            )
            server.put(node("node-a", **{BAN_LABEL: "true"}))
            server.put(node("node-b"))
            replica = Replica("replica-a", server.url)
            try:
                assert await eventually("node-a banned", lambda: banned(server)) == {"node-a"}

                # the label flips: each change reaches the list through the Node watch
                server.put(node("node-b", **{BAN_LABEL: "true"}))
                await eventually("node-b banned", lambda: banned(server) == {"node-a", "node-b"})
                server.put(node("node-a", **{BAN_LABEL: "false"}))
                await eventually("node-a unbanned", lambda: banned(server) == {"node-b"})
                server.delete("nodes", "node-b")
                await eventually("node-b gone", lambda: banned(server) == frozenset())

                # a value that is not true/false bans (fail closed); a bad name is left out
                # (put first: the list that shows node-c was taken after it existed)
                server.put(node("not a node name", **{BAN_LABEL: "true"}))
                server.put(node("node-c", **{BAN_LABEL: "True"}))
                await eventually("node-c banned", lambda: banned(server) == {"node-c"})

                # Nodes are only read: the ClusterRole grants no write on them
                assert [w for w in server.writes_by("replica-a") if "/nodes" in w[1]] == []
            finally:
                assert await replica.stop() == 0

    run_async(body(), timeout=90)


def test_every_resource_the_operator_watches_is_readable_under_its_cluster_role() -> None:
    # A watch the ClusterRole does not allow fails only in a cluster (HTTP 403), never
    # against the fake API server, which authorises everything.
    rbac = Path(__file__).resolve().parents[2] / "manifests/operator/rbac.yaml"
    (role,) = [d for d in yaml.safe_load_all(rbac.read_text()) if d["kind"] == "ClusterRole"]
    allowed = {
        (group, resource)
        for rule in role["rules"]
        if {"get", "list", "watch"} <= set(rule["verbs"]) and "resourceNames" not in rule
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    registry = build_registry(config("x"), OperatorState(), None)  # type: ignore[arg-type]
    # kopf has no public listing of a registry's handlers; _watching holds the on.event ones.
    watched = {
        (h.selector.group, h.selector.any_name) for h in registry._watching.get_all_handlers()
    }
    assert ("", "nodes") in watched
    assert watched <= allowed, watched - allowed
