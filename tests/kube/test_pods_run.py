"""Injected pods that keep working, run from the Pod the real API server stored.

Each test creates an ordinary Pod through the API server; the operator's webhook injects
it; ``kubelet.py`` runs the stored object as a kubelet would (its own netns, the init
container or the CNI plugin first, the native sidecar, then the app, every probe from the
node side of the veth) beside a real CA server and node agent. The operator runs as a
``trellis operator run`` process, so the policy and mesh registry the sidecars read are the
ones it publishes in each namespace's ConfigMap, delivered by the harness as the kubelet
delivers a ConfigMap volume.

Every address is in namespaces the tests create (10.231.0.0/24 on a bridge inside the
node's namespace); the only process outside them is the control plane on loopback.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mesh_operator.injection import INIT_NAME, SIDECAR_NAME
from tests.support import wait_for

from .conftest import (
    NAMESPACE,
    TRUST_DOMAIN,
    Installed,
    Operators,
    Replica,
    create_namespace,
    point_webhooks_at,
    webhook_ready,
)
from .controlplane import WEBHOOK_HOST, ControlPlane
from .kubelet import (
    NODE_NAME,
    OUTSIDE_IP,
    Node,
    RunningPod,
    running,
    start_node,
    wait_until,
)

OUTSIDE_PORT = 7000
HEALTH = 15020


@dataclass
class MeshOperator(Operators):
    """One ``trellis operator run`` replica whose ``--outbound-traffic-policy`` the test
    may change: a restart with the other value, as a user changes the Deployment's args."""

    outbound: str = "ALLOW_ANY"
    restarts: list[str] = field(default_factory=list)

    def start_replica(self, identity: str) -> Replica:
        import subprocess
        import sys

        from .conftest import REPO

        cert_dir = self.root / identity
        cert_dir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{identity}-{len(self.restarts)}.log"
        port = self.replicas[-1].port if self.replicas else _free_port()
        with log.open("w") as out:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "trellis", "operator", "run",
                    f"--trust-domain={TRUST_DOMAIN}", f"--namespace={NAMESPACE}",
                    f"--identity={identity}", f"--kubeconfig={self.kubeconfig}",
                    "--webhook-host=127.0.0.1", f"--webhook-port={port}",
                    f"--webhook-cert-dir={cert_dir}",
                    f"--outbound-traffic-policy={self.outbound}",
                ],
                stdout=out, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
        replica = Replica(identity, port, cert_dir, process, log)
        self.replicas = [replica]
        return replica

    def wait_serving(self) -> None:
        wait_until(lambda: self.lease_holder() is not None, 60, "the operator to take the Lease")
        replica = self.replicas[0]
        # Serving is not enough: until the Secret's certificate (the one the caBundle names)
        # is copied in and loaded, the API server cannot verify the webhook.
        wait_for(lambda: webhook_ready(self.plane, replica), 60, "the webhook's certificate")

    def restart(self, outbound: str) -> None:
        for replica in self.replicas:
            replica.stop()
        self.plane.kubectl(
            "-n", NAMESPACE, "delete", "lease", "trellis-operator", "--ignore-not-found"
        )
        self.restarts.append(outbound)
        self.outbound = outbound
        # The same identity and certificate folder: the webhook Secret's files are there.
        self.start_replica("operator-a")
        wait_until(lambda: self.lease_holder() is not None, 60, "the operator to lead again")


def _free_port() -> int:
    from tests.support import free_port

    return free_port()


@pytest.fixture(scope="module")
def mesh_operator(
    installed: Installed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MeshOperator]:
    assert installed.apply.returncode == 0, installed.apply.stderr
    plane = installed.plane
    root = tmp_path_factory.mktemp("operator")
    kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "trellis-operator")
    ops = MeshOperator(plane, root, kubeconfig)
    try:
        ops.start_copier()
        first = ops.start_replica("operator-a")
        point_webhooks_at(plane, f"https://{WEBHOOK_HOST}:{first.port}")
        ops.wait_serving()
        yield ops
    finally:
        logs = ops.stop()
        if os.environ.get("TRELLIS_TEST_LOGS"):
            print(logs)


@pytest.fixture(scope="module")
def node(installed: Installed) -> Iterator[Node]:
    """The node: its netns and bridge, a CA server and agent, a host outside the mesh."""
    plane = installed.plane
    started = start_node(plane.service_account_kubeconfig(NAMESPACE, "trellis-cni"))
    try:
        started.start_outside_echo(OUTSIDE_PORT)
        yield started
    finally:
        started.stop()


def _namespace(plane: ControlPlane, prefix: str, **labels: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    create_namespace(plane, name, {"trellis.dev/inject": "enabled", **labels})
    return name


def _echo_pod(name: str, **spec: Any) -> dict[str, Any]:
    """An echo app on 8080 with a TCP readiness probe (rewritten by the injector)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": NODE_NAME,
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/echo:1",
                    "command": ["python", "-m", "tests.kube.apps.echo", "8080"],
                    "ports": [{"containerPort": 8080}],
                    "env": [
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        }
                    ],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                }
            ],
            **spec,
        },
    }


def _create(plane: ControlPlane, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
    plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(pod))
    return plane.get("-n", namespace, "pod", pod["metadata"]["name"])


def _policy_document(plane: ControlPlane, namespace: str) -> dict[str, Any] | None:
    found = plane.kubectl("-n", namespace, "get", "configmap", "trellis-policy", "-o", "json")
    if found.returncode != 0:
        return None
    text = (json.loads(found.stdout).get("data") or {}).get("policy.json")
    return json.loads(text) if text else None


def _await_published(
    plane: ControlPlane, namespace: str, pods: list[RunningPod], outbound: str = "ALLOW_ANY"
) -> None:
    """Until the operator's document for ``namespace`` lists every pod's IP under the given
    outbound policy; then each pod's ConfigMap volume is refreshed, as the kubelet would."""

    def published() -> bool:
        document = _policy_document(plane, namespace)
        mesh = (document or {}).get("mesh") or {}
        return mesh.get("outboundTrafficPolicy") == outbound and all(
            f"{pod.ip}/32" in mesh.get("destinations", []) for pod in pods
        )

    wait_until(published, 60, f"the mesh registry of {namespace} ({outbound})")
    for pod in pods:
        pod.refresh()


def _dial(pod: RunningPod, host: str, port: int, text: str) -> dict[str, str]:
    """``kubectl exec`` of the dial program in the pod's app container."""
    done = pod.exec("app", ["python", "-m", "tests.kube.apps.dial", host, str(port), text])
    lines = done.stdout.strip().splitlines()
    assert lines, f"dial printed nothing: {done.stderr}"
    result: dict[str, str] = json.loads(lines[-1])
    return result


def _refused_by_tls(reply: str | None) -> bool:
    """A plaintext call that met the mTLS listener: no answer, or a TLS alert record
    (RFC 8446 §5.1: content type 21, legacy version 0x0303), never the app's echo."""
    return reply is None or reply.startswith("\x15\x03\x03")


def _eventually(check: Any, attempts: int, what: str) -> Any:
    """``check()`` until truthy, at most ``attempts`` times (each bounded by its own
    timeouts): a sidecar picks a refreshed policy file up within its reload period."""
    last = None
    for _ in range(attempts):
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: never true in {attempts} attempts (last: {last!r})")


# -- (1) probes ------------------------------------------------------------------------------


def _probed_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probed", "labels": {"app": "probed"}},
        "spec": {
            "nodeName": NODE_NAME,
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/probed:1",
                    "command": ["python", "-m", "tests.kube.apps.probed"],
                    "args": ["8080", "8081", "9090", "/srv/control"],
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"containerPort": 8081},
                        {"containerPort": 9090},
                    ],
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": "http"},
                        "periodSeconds": 1,
                    },
                    "livenessProbe": {"tcpSocket": {"port": 8081}, "periodSeconds": 1},
                    "startupProbe": {"grpc": {"port": 9090}, "periodSeconds": 1},
                    "volumeMounts": [{"name": "control", "mountPath": "/srv/control"}],
                }
            ],
            "volumes": [{"name": "control", "emptyDir": {}}],
        },
    }


def test_a_pod_with_http_tcp_and_grpc_probes_becomes_ready_and_its_probes_fail_with_the_app(
    mesh_operator: MeshOperator, node: Node
) -> None:
    plane = mesh_operator.plane
    namespace = _namespace(plane, "probes")
    stored = _create(plane, namespace, _probed_pod())
    app = stored["spec"]["containers"][0]
    kinds = ("readinessProbe", "livenessProbe", "startupProbe")
    for kind in kinds:  # what the kubelet is told to send: the sidecar's health port
        assert app[kind]["httpGet"]["port"] == HEALTH, app[kind]

    with running(node, plane, stored) as pod:
        assert [name for name in pod.processes] == [INIT_NAME, SIDECAR_NAME, "app"]
        pod.wait_ready(timeout=30)
        assert all(pod.probe("app", kind) for kind in kinds)
        # The original probe, sent as it was written, lands on the mTLS listener and fails:
        # why the rewrite exists.
        assert node.http_get(pod.ip, 8080, "/ready") is None

        (pod.volume("control") / "fail").touch()  # the app stops being healthy
        for kind in kinds:
            _eventually(lambda kind=kind: not pod.probe("app", kind), 20, f"{kind} failing")
        assert not pod.ready()
        assert pod.probe(SIDECAR_NAME, "livenessProbe")  # the sidecar itself is fine


def test_an_app_bound_to_its_pod_ip_becomes_ready_as_it_does_without_the_mesh(
    mesh_operator: MeshOperator, node: Node
) -> None:
    """istio/istio#25177: the app listens on $(POD_IP) alone, a common pattern. Before the
    fix its probe (run by the sidecar on 127.0.0.1) never passed, and a caller's stream
    (forwarded to 127.0.0.1) met a refusal. Now the probe, a mesh caller and, once the
    workload is permissive, a plaintext caller reach it at its pod IP, as without the
    mesh; the sidecar's own connection to the pod IP is not redirected back into it."""
    plane = mesh_operator.plane
    namespace = _namespace(plane, "bound")
    spec = _echo_pod("bound")
    app = spec["spec"]["containers"][0]
    # A common pattern: listen on the address the kubelet probes, from the downward API.
    app["command"] = ["python", "-m", "tests.kube.apps.echo", "8080", "$(POD_IP)"]
    app["env"].append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    caller_id = f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/default"
    policy = _access_policy("bound", "PERMISSIVE", caller_id)
    plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(policy))
    stored = [_create(plane, namespace, spec), _create(plane, namespace, _echo_pod("caller"))]
    started = node.run_many(plane, stored)
    try:
        bound, caller = started
        wait_until(lambda: "ready" in bound.processes["app"].output(), 10, "the app listening")
        bound.wait_ready(timeout=30)
        caller.wait_ready(timeout=30)
        _await_published(plane, namespace, started)

        def policy_published() -> bool:
            document = _policy_document(plane, namespace) or {}
            return [p.get("mtls") for p in document.get("policies", [])] == ["PERMISSIVE"]

        wait_until(policy_published, 60, "the namespace's AccessPolicy in its document")
        for pod in started:
            pod.refresh()
        # Nothing listens on the caller's or the bound pod's 127.0.0.1:8080 but the caller's
        # own app: the reply's prefix says which app answered.
        reply = _eventually(
            lambda: _dial(caller, bound.ip, 8080, "hi").get("reply"), 20, "the mesh caller"
        )
        assert reply == "bound hi"
        plain = _eventually(lambda: node.call(bound.ip, 8080, "hello"), 20, "plaintext caller")
        assert plain == "bound hello"
    except BaseException:
        for pod in started:
            print(pod.logs())
        raise
    finally:
        for pod in started:
            pod.stop()


# -- (3) and (4) permissive and strict, plaintext and mesh callers -----------------------------


@dataclass
class MeshPods:
    namespace: str
    lax: RunningPod
    strict: RunningPod
    allowed: RunningPod
    denied: RunningPod


def _access_policy(name: str, mtls: str, allowed: str) -> dict[str, Any]:
    return {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "AccessPolicy",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "ports": [8080],
            "mtls": mtls,
            "allow": [{"exact": allowed}],
        },
    }


@pytest.fixture(scope="module")
def mesh_pods(mesh_operator: MeshOperator, node: Node) -> Iterator[MeshPods]:
    """A permissive target ("lax"), a strict one, and two callers: the one their policies
    allow and one they do not, each with its own ServiceAccount (its SPIFFE ID)."""
    plane = mesh_operator.plane
    namespace = _namespace(plane, "mesh")
    allowed_id = f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/allowed"
    for account in ("allowed", "denied"):
        plane.kubectl_ok("-n", namespace, "create", "serviceaccount", account)
    for name, mtls in (("lax", "PERMISSIVE"), ("strict", "STRICT")):
        policy = _access_policy(name, mtls, allowed_id)
        plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(policy))
    started: list[RunningPod] = []
    try:
        stored = [
            _create(plane, namespace, _echo_pod(name, serviceAccountName=account))
            for name, account in (
                ("lax", "default"), ("strict", "default"),
                ("allowed", "allowed"), ("denied", "denied"),
            )
        ]  # fmt: skip
        started = node.run_many(plane, stored)
        for pod in started:
            pod.wait_ready(timeout=30)
        _await_published(plane, namespace, started)

        def policies_published() -> bool:
            document = _policy_document(plane, namespace) or {}
            return {p.get("mtls") for p in document.get("policies", [])} == {"PERMISSIVE", "STRICT"}

        wait_until(policies_published, 60, "the namespace's AccessPolicies in its document")
        for pod in started:
            pod.refresh()
        yield MeshPods(namespace, *started)
    except BaseException:
        for pod in started:
            print(pod.logs())
        print(node.logs())
        raise
    finally:
        for pod in started:
            pod.stop()


def test_a_plaintext_caller_reaches_a_permissive_workload_and_is_refused_by_a_strict_one(
    mesh_pods: MeshPods, node: Node
) -> None:
    lax, strict = mesh_pods.lax, mesh_pods.strict
    assert _eventually(lambda: node.call(lax.ip, 8080, "hello"), 20, "plaintext to lax") == (
        "lax hello"
    )
    # The strict workload's inbound port is mTLS only: the plaintext bytes never reach the
    # app; the TLS listener answers them with an alert, or closes.
    for _ in range(3):
        assert _refused_by_tls(node.call(strict.ip, 8080, "hello"))


def test_a_mesh_caller_keeps_mtls_and_policy_in_both_permissive_and_strict_workloads(
    mesh_pods: MeshPods,
) -> None:
    """The allowed caller's app dials the targets' pod IPs in plaintext; its sidecar carries
    the call over mTLS and each target's sidecar checks the caller's SPIFFE ID. The denied
    caller is refused by both: had its call reached the permissive workload as plaintext, it
    would have been let through, so the refusal there shows mTLS was kept."""
    for target in (mesh_pods.lax, mesh_pods.strict):
        name = target.name
        reply = _eventually(
            lambda target=target: _dial(mesh_pods.allowed, target.ip, 8080, "hi").get("reply"),
            20,
            f"the allowed caller reaching {name}",
        )
        assert reply == f"{name} hi"
        refused = _dial(mesh_pods.denied, target.ip, 8080, "hi")
        assert "reply" not in refused, (name, refused)


# -- (5) the CNI mode -------------------------------------------------------------------------


def test_a_cni_mode_pod_runs_with_no_net_admin_container_and_the_plugin_is_checked_and_deleted(
    mesh_operator: MeshOperator, node: Node
) -> None:
    plane = mesh_operator.plane
    namespace = _namespace(plane, "cni", **{"trellis.dev/redirect": "cni"})
    stored = _create(plane, namespace, _echo_pod("web"))
    containers = [*stored["spec"]["initContainers"], *stored["spec"]["containers"]]
    assert [c["name"] for c in stored["spec"]["initContainers"]] == [SIDECAR_NAME]
    for container in containers:
        added = ((container.get("securityContext") or {}).get("capabilities") or {}).get("add")
        assert not added, container["name"]

    with running(node, plane, stored) as pod:
        assert pod.cni_calls == [("ADD", 0)]
        pod.wait_ready(timeout=30)
        # The redirect is the plugin's: the inbound port is captured (a plaintext caller
        # lands on mTLS), and the app, root without NET_ADMIN, cannot touch the rules.
        assert _refused_by_tls(node.call(pod.ip, 8080, "hello"))
        flushed = pod.exec("app", ["iptables", "-t", "nat", "-F"])
        assert flushed.returncode != 0, flushed.stdout
        assert "Permission denied" in flushed.stderr or "denied" in flushed.stderr.lower()
    assert pod.cni_calls == [("ADD", 0), ("CHECK", 0), ("DEL", 0)]


# -- (2) the world outside the mesh -------------------------------------------------------------


def test_an_app_reaches_a_host_outside_the_mesh_with_allow_any_and_is_refused_with_registry_only(
    mesh_operator: MeshOperator, node: Node
) -> None:
    """Last in this module: it restarts the operator with REGISTRY_ONLY, as a user changes
    the Deployment's ``--outbound-traffic-policy``; the same running pod gets the new
    document through its ConfigMap volume and its sidecar applies it live."""
    plane = mesh_operator.plane
    namespace = _namespace(plane, "outbound")
    with running(node, plane, _create(plane, namespace, _echo_pod("client"))) as pod:
        pod.wait_ready(timeout=30)
        _await_published(plane, namespace, [pod], "ALLOW_ANY")
        reply = _eventually(
            lambda: _dial(pod, OUTSIDE_IP, OUTSIDE_PORT, "hi").get("reply"), 20, "ALLOW_ANY"
        )
        assert reply == "outside hi"

        mesh_operator.restart("REGISTRY_ONLY")
        _await_published(plane, namespace, [pod], "REGISTRY_ONLY")
        refused = _eventually(
            lambda: "error" in _dial(pod, OUTSIDE_IP, OUTSIDE_PORT, "hi"), 20, "REGISTRY_ONLY"
        )
        assert refused
        # The pod's own loopback is never outside the mesh: the app still reaches itself.
        assert _dial(pod, "127.0.0.1", 8080, "self").get("reply") == "client self"
