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
from meshapi.redirect import AnnotationError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_REVIEW_BYTES",
    "AdmissionOutcome",
    "mutate_pod",
    "validate_resource",
]

# The API server caps objects at 1.5 MiB (etcd); a review carries object and oldObject.
MAX_REVIEW_BYTES = 4 * 1024 * 1024
# Deeper than any Pod or Trellis resource nests (a Pod's deepest paths are about a dozen
# levels). json's C decoder recurses once per level and raises RecursionError near the
# interpreter's limit (1000); anything that walks or prints the object recurses too, so
# depth is bounded well below that, and checked without recursion.
MAX_JSON_DEPTH = 100
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


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests deeper than ``limit`` (iteratively: it may be deep)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            if level > limit:
                return True
            stack.extend(
                (child, level + 1) for child in (item.values() if isinstance(item, dict) else item)
            )
    return False


def _short(value: Any, limit: int = 80) -> str:
    """``repr`` for a message, cut short: the value is the caller's and may be large."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _request_of(body: bytes) -> Mapping[str, Any]:
    if len(body) > MAX_REVIEW_BYTES:
        raise _Refused(413, f"AdmissionReview of {len(body)} bytes exceeds {MAX_REVIEW_BYTES}")
    too_deep = _Refused(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        review = json.loads(body)
    except RecursionError as exc:  # raised cleanly by the C decoder, nothing half-built
        raise too_deep from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int() past 4300 digits
        raise _Refused(400, f"request body is not JSON: {exc}") from exc
    if _depth_exceeds(review, MAX_JSON_DEPTH):
        raise too_deep
    if not isinstance(review, dict):
        raise _Refused(400, "request body must be a JSON object (an AdmissionReview)")
    if review.get("kind") != "AdmissionReview" or review.get("apiVersion") != _API_VERSION:
        raise _Refused(
            400,
            f"expected kind AdmissionReview, apiVersion {_API_VERSION}; got kind "
            f"{_short(review.get('kind'))}, apiVersion {_short(review.get('apiVersion'))} (set "
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


def _pod_shape_error(pod: Mapping[str, Any]) -> str | None:
    """What makes ``pod`` unlike a Pod in the fields injection reads, or None.

    The API server validates the schema before calling a webhook, so this only meets
    clients that are not the API server; they get a reason, not a 500."""
    meta = pod.get("metadata")
    if meta is not None and not isinstance(meta, Mapping):
        return "metadata is not an object"
    for name in ("annotations", "labels"):
        values = (meta or {}).get(name)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            return f"metadata.{name} is not an object"
        for key, value in values.items():
            if not isinstance(value, str):
                return f"metadata.{name}[{_short(key)}] is not a string"
    spec = pod["spec"]
    for name in ("containers", "initContainers", "volumes"):
        items = spec.get(name)
        if items is None:
            continue
        if not isinstance(items, list):
            return f"spec.{name} is not a list"
        for index, item in enumerate(items):
            if not isinstance(item, Mapping):
                return f"spec.{name}[{index}] is not an object"
    return None


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
            f"the trellis injector mutates core/v1 Pods only, not {_short(kind)}; restrict the "
            "MutatingWebhookConfiguration's rules to pods",
        )
    if request.get("operation", "CREATE") != "CREATE":
        return _review(uid, {"allowed": True})
    pod = request.get("object")
    if not isinstance(pod, Mapping):
        return _deny(uid, 400, "request.object is not a Pod object")
    if not isinstance(pod.get("spec"), Mapping):
        return _deny(uid, 400, "request.object has no spec")
    malformed = _pod_shape_error(pod)
    if malformed is not None:
        return _deny(uid, 400, f"request.object is not a valid Pod: {malformed}")
    try:
        decision = plan_injection(pod, config)
    except (UpstreamError, AnnotationError) as exc:
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
            f"not {_short(kind)}",
        )
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return _review(uid, {"allowed": True})
    obj = request.get("object")
    old = request.get("oldObject")
    if (
        request.get("operation") == "UPDATE"
        and isinstance(obj, Mapping)
        and isinstance(old, Mapping)
        and obj.get("spec") == old.get("spec")
    ):
        # Only metadata changed (a label, kopf adding or removing its finalizer). The spec
        # may have been stored while this webhook was down (failurePolicy: Ignore);
        # refusing every update of it would pin its finalizer and block its deletion.
        return _review(uid, {"allowed": True})
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
