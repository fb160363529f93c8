"""Two operator replicas on a real ``coordination.k8s.io/v1`` Lease.

One replica takes the Lease and alone reconciles (only it logs ``synced``); the other
serves its webhook and waits. The leader is then killed with SIGKILL, as a node failure
would, so it never releases anything: the follower takes the Lease once it expires
(``leaseDurationSeconds``, 15 s by default), counts a transition, and reconciles a change
made after the handover.
"""

from __future__ import annotations

import json
import signal
import uuid

from tests.support import wait_for

from .conftest import NAMESPACE, Operators, Replica, create_namespace


def _lease(operators: Operators) -> dict[str, object]:
    spec = operators.plane.get("-n", NAMESPACE, "lease", "trellis-operator")["spec"]
    assert isinstance(spec, dict)
    return spec


def _logged(replica: Replica, message: str) -> int:
    count = 0
    for line in replica.output().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == message:
            count += 1
    return count


def _entries_text(operators: Operators) -> str:
    result = operators.plane.kubectl(
        "-n", NAMESPACE, "get", "configmap", "trellis-registration-entries", "-o", "json"
    )
    if result.returncode != 0:
        return ""
    return str(json.loads(result.stdout).get("data", {}).get("entries.yaml", ""))


def _identity_with_pod(operators: Operators, namespace: str) -> str:
    plane = operators.plane
    create_namespace(plane, namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "api-0", "namespace": namespace, "labels": {"app": "api"}},
        "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "x"}]},
    }
    identity = {
        "apiVersion": "trellis.dev/v1alpha1",
        "kind": "ClusterWorkloadIdentity",
        "metadata": {"name": namespace},
        "spec": {
            "spiffeIDTemplate": "spiffe://{trustDomain}/ns/{namespace}/app/{podLabel:app}",
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        },
    }
    for obj in (pod, identity):
        plane.kubectl_ok("create", "-f", "-", stdin=json.dumps(obj))
    return f"spiffe://example.org/ns/{namespace}/app/api"


def test_one_replica_leads_and_killing_it_hands_the_lease_to_the_other(
    operators: Operators,
) -> None:
    holder = _lease(operators)["holderIdentity"]
    by_name = {r.identity: r for r in operators.replicas}
    leader = by_name[str(holder)]
    follower = next(r for r in operators.replicas if r is not leader)

    before = _identity_with_pod(operators, f"lead-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: before in _entries_text(operators), 60, "the leader to write the entry")
    assert _logged(leader, "became leader") == 1
    # "synced" is logged just after the write the entry check saw.
    wait_for(lambda: _logged(leader, "synced") >= 1, 30, "the leader to log its sync")
    assert _logged(follower, "became leader") == 0
    assert _logged(follower, "synced") == 0, follower.output()[-2000:]
    transitions = int(str(_lease(operators).get("leaseTransitions", 0)))

    leader.stop(signal.SIGKILL)
    wait_for(
        lambda: _lease(operators)["holderIdentity"] == follower.identity,
        60,
        f"{follower.identity} to take the Lease",
    )
    assert int(str(_lease(operators)["leaseTransitions"])) == transitions + 1
    assert _logged(follower, "became leader") == 1

    after = _identity_with_pod(operators, f"handover-{uuid.uuid4().hex[:6]}")
    wait_for(lambda: after in _entries_text(operators), 60, "the new leader to write the entry")
    assert before in _entries_text(operators)  # the new leader recomputed the whole set
    wait_for(lambda: _logged(follower, "synced") >= 1, 30, "the new leader to log its sync")
