"""The operator's kopf registry checked against its RBAC, without an API server.

The wiring itself (two ``trellis operator run`` replicas on a Lease, watches, finalizers,
entries, policies, federation, ban lists, statuses and the webhook certificate) runs
against a real kube-apiserver in tests/kube/. What stays here needs no API server: every
resource a handler watches must be readable under the operator's ClusterRole.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ca.spiffeid import TrustDomain
from mesh_operator.handlers import OperatorConfig, OperatorState, build_registry

TD = TrustDomain("example.org")


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


def test_every_resource_the_operator_watches_is_readable_under_its_cluster_role() -> None:
    # A watch the ClusterRole does not allow fails in a cluster (HTTP 403) only as kopf's
    # retried errors in a log; this names the missing rule at once.
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
