"""One operator sync of the CA's ban list against the real API server.

``sync_once`` runs in this process with the ``trellis-operator`` ServiceAccount's
credentials, into a namespace of its own per test (``OperatorConfig.namespace``), so the
ConfigMaps it writes are this test's alone. Nodes are cluster-wide: each test names its
own, looks only at those, and deletes them afterwards. Every list is read back with the
CA's own loader (``ca.server.bans``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ca.entries import parse_entries_yaml
from ca.server.bans import parse_ban_list
from ca.spiffeid import TrustDomain
from mesh_operator.bans import BAN_LABEL
from mesh_operator.handlers import OperatorConfig, OperatorState, SyncReport, sync_once
from mesh_operator.kube import MANAGED_BY, KubeClient

from .conftest import NAMESPACE, Installed, create_namespace
from .controlplane import ControlPlane

CONFIG_MAP = "trellis-banned-agents"


@dataclass
class BanCluster:
    plane: ControlPlane
    client: KubeClient
    namespace: str
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    nodes: set[str] = field(default_factory=set)

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def node(self, base: str, **labels: str) -> None:
        name = self.name(base)
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}
        self.plane.kubectl_ok("apply", "-f", "-", stdin=json.dumps(body))
        if not labels:  # apply keeps labels it set before: drop them explicitly
            self.plane.kubectl_ok("label", "node", name, f"{BAN_LABEL}-")
        self.nodes.add(name)

    def config_map(self, text: str, **labels: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIG_MAP, "namespace": self.namespace, "labels": labels},
            "data": {"banned.yaml": text},
        }
        self.plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(body))

    def read(self, name: str = CONFIG_MAP) -> dict[str, Any]:
        return self.plane.get("-n", self.namespace, "configmap", name)

    def banned(self) -> frozenset[str]:
        return parse_ban_list(self.read()["data"]["banned.yaml"]) & self.nodes

    def problems(self, report: SyncReport) -> list[str]:
        return [p for p in report.ban_problems if self.suffix in p]

    def sync(self) -> SyncReport:
        config = OperatorConfig(trust_domain=TrustDomain("example.org"), namespace=self.namespace)
        return asyncio.run(
            sync_once(config, OperatorState(), self.client, now=dt.datetime.now(dt.UTC))
        )


@pytest.fixture
def bans(installed: Installed) -> Iterator[BanCluster]:
    assert installed.apply.returncode == 0, installed.apply.stderr
    plane = installed.plane
    namespace = f"bans-{uuid.uuid4().hex[:6]}"
    create_namespace(plane, namespace)
    # The operator's Role is in trellis-system; here the same rules in the test namespace.
    plane.kubectl_ok(
        "-n", namespace, "create", "rolebinding", "operator-configmaps",
        "--clusterrole=admin", f"--serviceaccount={NAMESPACE}:trellis-operator",
    )  # fmt: skip
    kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "trellis-operator")
    cluster = BanCluster(plane, KubeClient(plane.api_client(kubeconfig)), namespace)
    try:
        yield cluster
    finally:
        for name in cluster.nodes:
            plane.kubectl("delete", "node", name, "--ignore-not-found")


def test_a_sync_replaces_the_shipped_empty_list_with_the_labelled_nodes(
    bans: BanCluster,
) -> None:
    bans.config_map("[]\n", **{"app.kubernetes.io/part-of": "trellis"})
    bans.node("worker-2", **{BAN_LABEL: "true"})
    bans.node("worker-1", **{BAN_LABEL: "true", "zone": "a"})
    bans.node("worker-3", **{BAN_LABEL: "false"})
    bans.node("worker-4", **{BAN_LABEL: "yes"})
    bans.node("worker-5")
    report = bans.sync()
    assert f"{bans.namespace}/{CONFIG_MAP}" in report.config_maps_written
    assert bans.banned() == {bans.name("worker-1"), bans.name("worker-2"), bans.name("worker-4")}
    labels = bans.read()["metadata"]["labels"]
    assert labels == MANAGED_BY
    (problem,) = bans.problems(report)
    assert bans.name("worker-4") in problem and "banned anyway" in problem

    # unlabelling a node lifts its ban at the next sync
    bans.node("worker-2")
    bans.sync()
    assert bans.banned() == {bans.name("worker-1"), bans.name("worker-4")}


def test_a_hand_written_list_is_kept_but_the_other_writes_go_on(bans: BanCluster) -> None:
    bans.nodes.add(bans.name("worker-9"))
    bans.config_map(f"- {bans.name('worker-9')}\n")
    bans.node("worker-1", **{BAN_LABEL: "true"})
    report = bans.sync()
    assert bans.banned() == {bans.name("worker-9")}
    problem = next(p for p in report.ban_problems if p.startswith(f"ConfigMap {bans.namespace}/"))
    assert problem.startswith(f"ConfigMap {bans.namespace}/{CONFIG_MAP} left as it is: ")
    assert bans.name("worker-9") in problem
    # the registration entries were still written
    entries = bans.read("trellis-registration-entries")
    assert len(parse_entries_yaml(entries["data"]["entries.yaml"])) == 0

    # once worker-9 is labelled, the operator takes the list over
    bans.node("worker-9", **{BAN_LABEL: "true"})
    report = bans.sync()
    assert not [p for p in report.ban_problems if p.startswith(f"ConfigMap {bans.namespace}/")]
    assert bans.banned() == {bans.name("worker-1"), bans.name("worker-9")}


def test_a_sync_creates_the_list_when_there_is_none(bans: BanCluster) -> None:
    bans.node("worker-1", **{BAN_LABEL: "true"})
    report = bans.sync()
    assert f"{bans.namespace}/{CONFIG_MAP}" in report.config_maps_written
    assert bans.banned() == {bans.name("worker-1")}
