"""Writes to the API server through the ``kubernetes`` client: the operator's I/O shell.

Every method is blocking (the client is synchronous) and is called through
``asyncio.to_thread`` by the kopf handlers. ``ApiException`` never escapes: it becomes a
``TemporaryOperatorError`` (conflict, throttling, server errors, unreachable: try again) or
a ``PermanentOperatorError`` (forbidden, invalid: a human must fix RBAC or the object),
with a message naming the object and the verb.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kubernetes.client as k8s
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from mesh_operator.errors import PermanentOperatorError, TemporaryOperatorError
from mesh_operator.spec import GROUP, VERSION

__all__ = ["MANAGED_BY", "KubeClient"]

MANAGED_BY = {"app.kubernetes.io/managed-by": "trellis-operator"}
_TEMPORARY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
T = TypeVar("T")


def _translate(exc: ApiException, what: str) -> Exception:
    detail = f"{what}: HTTP {exc.status} {exc.reason}"
    if exc.status in _TEMPORARY_STATUSES:
        return TemporaryOperatorError(detail, delay=5.0 if exc.status == 409 else 15.0)
    if exc.status == 403:
        return PermanentOperatorError(
            f"{detail}; the operator's ServiceAccount lacks this permission (see "
            "manifests/operator/rbac.yaml)"
        )
    return PermanentOperatorError(detail)


def _call(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ApiException as exc:
        raise _translate(exc, what) from exc
    except (HTTPError, OSError) as exc:
        raise TemporaryOperatorError(f"{what}: API server unreachable: {exc}") from exc


def _json(response: Any) -> dict[str, Any]:
    data = json.loads(response.data)
    if not isinstance(data, dict):
        raise TemporaryOperatorError("API server returned a non-object JSON document")
    return data


class KubeClient:
    """The handful of API calls the operator makes (least privilege: see the RBAC)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        # Typed as Any: bodies are passed as plain dicts (the client serialises them as is)
        # and responses read raw (_preload_content=False), so the model classes never appear.
        self.core: Any = k8s.CoreV1Api(api_client)
        self.custom: Any = k8s.CustomObjectsApi(api_client)
        self.admission: Any = k8s.AdmissionregistrationV1Api(api_client)
        self.coordination: Any = k8s.CoordinationV1Api(api_client)

    # --- generic read ------------------------------------------------------------------

    def _read(self, what: str, fn: Callable[[], Any]) -> dict[str, Any] | None:
        try:
            return _json(fn())
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _translate(exc, what) from exc

    # --- ConfigMaps --------------------------------------------------------------------

    def apply_config_map(self, namespace: str, name: str, data: Mapping[str, str]) -> bool:
        """Create or replace; False (no write) if the ConfigMap already holds ``data``."""
        what = f"ConfigMap {namespace}/{name}"
        current = self._read(
            f"read {what}",
            lambda: self.core.read_namespaced_config_map(name, namespace, _preload_content=False),
        )
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "data": dict(data),
        }
        if current is None:
            _call(
                f"create {what}",
                lambda: self.core.create_namespaced_config_map(
                    namespace, body, _preload_content=False
                ),
            )
            return True
        if current.get("data") == dict(data):
            return False
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        _call(
            f"replace {what}",
            lambda: self.core.replace_namespaced_config_map(
                name, namespace, body, _preload_content=False
            ),
        )
        return True

    def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ConfigMap as the API server holds it, or None if there is none."""
        return self._read(
            f"read ConfigMap {namespace}/{name}",
            lambda: self.core.read_namespaced_config_map(name, namespace, _preload_content=False),
        )

    def managed_config_maps(self, name: str) -> list[str]:
        """Namespaces holding a ConfigMap ``name`` that this operator created."""
        selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
        listed = _call(
            "list ConfigMaps",
            lambda: _json(
                self.core.list_config_map_for_all_namespaces(
                    label_selector=selector,
                    field_selector=f"metadata.name={name}",
                    _preload_content=False,
                )
            ),
        )
        return sorted(str(item["metadata"]["namespace"]) for item in listed.get("items") or [])

    def delete_config_map(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_config_map(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise _translate(exc, f"delete ConfigMap {namespace}/{name}") from exc

    # --- Nodes --------------------------------------------------------------------------

    def node_label_values(self, key: str) -> dict[str, str]:
        """Node name -> value of label ``key``, for every Node carrying it.

        ``resourceVersion=0`` lets the API server answer from its watch cache instead of
        reading every Node from etcd: the list is taken on every sync.
        """
        listed = _call(
            "list Nodes",
            lambda: _json(
                self.core.list_node(
                    label_selector=key, resource_version="0", _preload_content=False
                )
            ),
        )
        values: dict[str, str] = {}
        for item in listed.get("items") or []:
            meta = item.get("metadata") or {}
            labels = meta.get("labels") or {}
            if key in labels:
                values[str(meta.get("name", ""))] = str(labels[key])
        return values

    # --- status of our custom resources ------------------------------------------------

    def patch_status(
        self, plural: str, name: str, namespace: str | None, status: Mapping[str, Any]
    ) -> None:
        body = {"status": dict(status)}
        what = f"status of {plural}/{name}"
        try:
            if namespace is None:
                self.custom.patch_cluster_custom_object_status(
                    GROUP, VERSION, plural, name, body, _preload_content=False
                )
            else:
                self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, plural, name, body, _preload_content=False
                )
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile: nothing to report on
                return
            raise _translate(exc, f"patch {what}") from exc

    # --- webhook certificate -----------------------------------------------------------

    def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        obj = self._read(
            f"read Secret {namespace}/{name}",
            lambda: self.core.read_namespaced_secret(name, namespace, _preload_content=False),
        )
        if obj is None:
            return None
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def write_secret(self, namespace: str, name: str, data: Mapping[str, bytes]) -> None:
        what = f"Secret {namespace}/{name}"
        current = self._read(
            f"read {what}",
            lambda: self.core.read_namespaced_secret(name, namespace, _preload_content=False),
        )
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        if current is None:
            _call(
                f"create {what}",
                lambda: self.core.create_namespaced_secret(namespace, body, _preload_content=False),
            )
            return
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        _call(
            f"replace {what}",
            lambda: self.core.replace_namespaced_secret(
                name, namespace, body, _preload_content=False
            ),
        )

    def set_ca_bundle(self, mutating: str, validating: str, bundle: bytes) -> bool:
        """Point every webhook of both configurations at ``bundle``; True if anything changed."""
        encoded = base64.b64encode(bundle).decode()
        changed = False
        for kind, read, patch in (
            (
                "MutatingWebhookConfiguration",
                lambda: self.admission.read_mutating_webhook_configuration(
                    mutating, _preload_content=False
                ),
                lambda ops: self.admission.patch_mutating_webhook_configuration(
                    mutating,
                    ops,
                    _content_type="application/json-patch+json",
                    _preload_content=False,
                ),
            ),
            (
                "ValidatingWebhookConfiguration",
                lambda: self.admission.read_validating_webhook_configuration(
                    validating, _preload_content=False
                ),
                lambda ops: self.admission.patch_validating_webhook_configuration(
                    validating,
                    ops,
                    _content_type="application/json-patch+json",
                    _preload_content=False,
                ),
            ),
        ):
            current = self._read(f"read {kind}", read)
            if current is None:
                raise TemporaryOperatorError(
                    f"{kind} not found; apply manifests/ (kubectl apply -k manifests/)"
                )
            ops = [
                {
                    "op": "add",  # "add" replaces an existing member (RFC 6902 §4.1)
                    "path": f"/webhooks/{index}/clientConfig/caBundle",
                    "value": encoded,
                }
                for index, hook in enumerate(current.get("webhooks") or [])
                if (hook.get("clientConfig") or {}).get("caBundle") != encoded
            ]
            if ops:
                _call(f"patch {kind} caBundle", lambda p=patch, o=ops: p(o))  # type: ignore[misc]
                changed = True
        return changed

    # --- leader election ---------------------------------------------------------------

    def read_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(
            f"read Lease {namespace}/{name}",
            lambda: self.coordination.read_namespaced_lease(
                name, namespace, _preload_content=False
            ),
        )

    def write_lease(
        self,
        namespace: str,
        name: str,
        spec: Mapping[str, Any],
        resource_version: str | None,
    ) -> bool:
        """Create (``resource_version`` None) or replace; False if another replica won."""
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": dict(spec),
        }
        try:
            if resource_version is None:
                self.coordination.create_namespaced_lease(namespace, body, _preload_content=False)
            else:
                body["metadata"]["resourceVersion"] = resource_version
                self.coordination.replace_namespaced_lease(
                    name, namespace, body, _preload_content=False
                )
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote first: optimistic concurrency lost
                return False
            raise _translate(exc, f"write Lease {namespace}/{name}") from exc
        return True
