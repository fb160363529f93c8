"""The validator on UPDATE: spec changes are checked, metadata-only changes pass.

An object may be stored with a spec the operator refuses while its webhook is down
(failurePolicy Ignore, manifests/operator/webhooks.yaml). Refusing every later update of
it would also refuse kopf removing its finalizer, so the object could never be deleted;
tests/kube/test_operator.py shows that against kube-apiserver, this the pure rule.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from mesh_operator.admission import validate_resource

from .conftest import admission_review

BROKEN: dict[str, Any] = {
    "apiVersion": "trellis.dev/v1alpha1",
    "kind": "ClusterWorkloadIdentity",
    "metadata": {"name": "stored", "finalizers": ["trellis.dev/revoke-entries"]},
    "spec": {"ttl": "72h"},
}


def _update(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    review = admission_review(
        new,
        kind="ClusterWorkloadIdentity",
        group="trellis.dev",
        version="v1alpha1",
        resource="clusterworkloadidentities",
        operation="UPDATE",
    )
    review["request"]["oldObject"] = old
    outcome = validate_resource(json.dumps(review).encode())
    response = outcome.body["response"]
    assert isinstance(response, dict)
    return response


def test_removing_a_finalizer_from_a_stored_invalid_identity_is_allowed() -> None:
    released = copy.deepcopy(BROKEN)
    released["metadata"]["finalizers"] = []
    released["metadata"]["deletionTimestamp"] = "2026-12-08T00:00:00Z"
    assert _update(BROKEN, released)["allowed"] is True


def test_labelling_a_stored_invalid_identity_is_allowed() -> None:
    labelled = copy.deepcopy(BROKEN)
    labelled["metadata"]["labels"] = {"team": "payments"}
    assert _update(BROKEN, labelled)["allowed"] is True


def test_changing_the_spec_of_a_stored_identity_is_still_checked() -> None:
    edited = copy.deepcopy(BROKEN)
    edited["spec"]["ttl"] = "48h"
    response = _update(BROKEN, edited)
    assert response["allowed"] is False
    assert "spec.ttl: 48h is longer than the maximum" in response["status"]["message"]
