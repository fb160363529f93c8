"""AdmissionReview v1 in, AdmissionReview v1 out: the webhook's logic without the server.

``mutate_pod`` and ``validate_resource`` take the request body (bytes) and return an
``AdmissionOutcome``: an HTTP status and a JSON document. Two kinds of answers:

* the envelope is unusable (not JSON, too big, not ``admission.k8s.io/v1``
  ``AdmissionReview``, no ``request.uid``): HTTP 400/413 with ``{"error": ...}``. There is
  no uid to answer to, so no AdmissionReview can be built; the API server then applies the
  webhook's failure policy and logs our message.
* a well-formed review: HTTP 200 with an AdmissionReview whose ``response.uid`` echoes the
  request. A pod we refuse (malformed upstreams annotation) or an object of a kind we do not
  handle (a misconfigured ``rules`` section) gets ``allowed: false`` with a ``status``
  message saying what to change.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mesh_operator.errors import SpecError
from mesh_operator.injection import InjectorConfig, UpstreamError, plan_injection
from mesh_operator.spec import (
    GROUP,
    parse_access_policy,
    parse_federated_trust_domain,
    parse_identity_template,
)

__all__ = [
    "MAX_REVIEW_BYTES",
    "AdmissionOutcome",
    "mutate_pod",
    "validate_resource",
]

# The API server caps objects at 1.5 MiB (etcd); a review carries object and oldObject.
MAX_REVIEW_BYTES = 4 * 1024 * 1024
_API_VERSION = "admission.k8s.io/v1"

_VALIDATORS: Mapping[str, Callable[[Any], object]] = {
    "ClusterWorkloadIdentity": parse_identity_template,
    "AccessPolicy": parse_access_policy,
    "FederatedTrustDomain": parse_federated_trust_domain,
}


@dataclass(frozen=True, slots=True)
class AdmissionOutcome:
    http_status: int
    body: Mapping[str, Any]

    @property
    def allowed(self) -> bool | None:
        response = self.body.get("response")
        return response.get("allowed") if isinstance(response, Mapping) else None


class _Refused(Exception):
    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status


def _refusal(exc: _Refused) -> AdmissionOutcome:
    return AdmissionOutcome(exc.http_status, {"error": str(exc)})


def _request_of(body: bytes) -> Mapping[str, Any]:
    if len(body) > MAX_REVIEW_BYTES:
        raise _Refused(413, f"AdmissionReview of {len(body)} bytes exceeds {MAX_REVIEW_BYTES}")
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Refused(400, f"request body is not JSON: {exc}") from exc
    if not isinstance(review, dict):
        raise _Refused(400, "request body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != _API_VERSION:
        raise _Refused(
            400,
            f"expected kind AdmissionReview, apiVersion {_API_VERSION}; got kind "
            f"{review.get('kind')!r}, apiVersion {review.get('apiVersion')!r} (set "
            "admissionReviewVersions: [v1] in the webhook configuration)",
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise _Refused(400, "AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise _Refused(400, "AdmissionReview request has no uid")
    return request


def _review(uid: str, response: Mapping[str, Any]) -> AdmissionOutcome:
    return AdmissionOutcome(
        200,
        {
            "apiVersion": _API_VERSION,
            "kind": "AdmissionReview",
            "response": {"uid": uid, **response},
        },
    )


def _deny(uid: str, code: int, message: str) -> AdmissionOutcome:
    return _review(
        uid,
        {"allowed": False, "status": {"code": code, "reason": "BadRequest", "message": message}},
    )


def mutate_pod(body: bytes, config: InjectorConfig) -> AdmissionOutcome:
    """Answer a pod CREATE review with the injection patch (or none)."""
    try:
        request = _request_of(body)
    except _Refused as exc:
        return _refusal(exc)
    uid = request["uid"]
    kind = request.get("kind") or {}
    if not (isinstance(kind, Mapping) and kind.get("kind") == "Pod" and kind.get("group") == ""):
        return _deny(
            uid,
            400,
            f"the trellis injector mutates core/v1 Pods only, not {kind!r}; restrict the "
            "MutatingWebhookConfiguration's rules to pods",
        )
    if request.get("operation", "CREATE") != "CREATE":
        return _review(uid, {"allowed": True})
    pod = request.get("object")
    if not isinstance(pod, Mapping):
        return _deny(uid, 400, "request.object is not a Pod object")
    if not isinstance(pod.get("spec"), Mapping):
        return _deny(uid, 400, "request.object has no spec")
    try:
        decision = plan_injection(pod, config)
    except UpstreamError as exc:
        return _deny(uid, 422, str(exc))
    response: dict[str, Any] = {"allowed": True}
    if decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(list(decision.patch)).encode()).decode()
    return _review(uid, response)


def validate_resource(body: bytes) -> AdmissionOutcome:
    """Answer a CREATE/UPDATE review of a trellis.dev resource: beyond-schema checks."""
    try:
        request = _request_of(body)
    except _Refused as exc:
        return _refusal(exc)
    uid = request["uid"]
    kind = request.get("kind") or {}
    name = kind.get("kind") if isinstance(kind, Mapping) else None
    if (
        not isinstance(kind, Mapping)
        or kind.get("group") != GROUP
        or not isinstance(name, str)
        or name not in _VALIDATORS
    ):
        return _deny(
            uid,
            400,
            f"the trellis validator checks {', '.join(sorted(_VALIDATORS))} ({GROUP}) only, "
            f"not {kind!r}",
        )
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return _review(uid, {"allowed": True})
    obj = request.get("object")
    namespace = request.get("namespace")
    if isinstance(obj, Mapping) and isinstance(namespace, str) and namespace:
        # The object may reach us before the API server defaulted metadata.namespace.
        meta = obj.get("metadata")
        obj = {
            **obj,
            "metadata": {"namespace": namespace, **(meta if isinstance(meta, Mapping) else {})},
        }
    try:
        _VALIDATORS[name](obj)
    except SpecError as exc:
        return _deny(uid, 422, f"{name} {exc.field}: {exc.reason}")
    return _review(uid, {"allowed": True})
