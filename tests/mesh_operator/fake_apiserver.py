"""A fake Kubernetes API server (aiohttp) speaking enough REST and watch JSON for kopf and
the ``kubernetes`` client.

Kept only for what a real kube-apiserver will not do: store objects it would refuse (a Node
name the CA cannot hold) or answer in ways a test must script. Everything a real API server
can show runs against one in tests/kube/. What it speaks: API discovery (``/api``,
``/apis``), list with label (equality and existence) and field selectors, watch streams
(newline-delimited JSON events from a ``resourceVersion``), create (with ``generateName``),
replace with optimistic concurrency (409 on a stale ``resourceVersion``), merge and JSON
patches, the ``status`` subresource (which, as in Kubernetes, ignores everything but
``status``), and deletion held by finalizers (``deletionTimestamp`` set; removed when the
last finalizer goes).

Every request is recorded with its User-Agent, so a test can tell which replica wrote what.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
from aiohttp import web


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "pods", "Pod", True, status=True),
    Kind("", "v1", "namespaces", "Namespace", False),
    Kind("", "v1", "nodes", "Node", False, status=True),
    Kind("", "v1", "configmaps", "ConfigMap", True),
    Kind("", "v1", "secrets", "Secret", True),
    Kind("", "v1", "events", "Event", True),
    Kind("events.k8s.io", "v1", "events", "Event", True),
    Kind("coordination.k8s.io", "v1", "leases", "Lease", True),
    Kind(
        "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False
    ),
    Kind(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        False,
    ),
    Kind(
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
        False,
    ),
    Kind(
        "trellis.dev",
        "v1alpha1",
        "clusterworkloadidentities",
        "ClusterWorkloadIdentity",
        False,
        status=True,
    ),
    Kind("trellis.dev", "v1alpha1", "accesspolicies", "AccessPolicy", True, status=True),
    Kind(
        "trellis.dev",
        "v1alpha1",
        "federatedtrustdomains",
        "FederatedTrustDomain",
        False,
        status=True,
    ),
]


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _labels_match(selector: str, labels: dict[str, str]) -> bool:
    """Equality (``key=value``) and existence (``key``) terms, as the operator sends them."""
    for term in filter(None, selector.split(",")):
        key, equals, value = term.partition("=")
        if not equals:
            if key not in labels:
                return False
        elif labels.get(key) != value:
            return False
    return True


def _fields_match(selector: str, obj: dict[str, Any]) -> bool:
    for term in filter(None, selector.split(",")):
        path, _, value = term.partition("=")
        node: Any = obj
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if str(node) != value:
            return False
    return True


@dataclass
class FakeApiServer:
    objects: dict[tuple[Kind, str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, str, Kind, dict[str, Any]]] = field(default_factory=list)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, agent
    _rv: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _changed: asyncio.Condition | None = None
    url: str = ""

    # --- direct access for tests --------------------------------------------------------

    def kind(self, plural: str, group: str = "") -> Kind:
        return next(k for k in KINDS if k.plural == plural and k.group == group)

    def get(self, plural: str, name: str, namespace: str = "", group: str = "") -> Any:
        obj = self.objects.get((self.kind(plural, group), namespace, name))
        return copy.deepcopy(obj)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or overwrite an object as an external client would (emits watch events)."""
        api_version, kind_name = obj["apiVersion"], obj["kind"]
        kind = next(k for k in KINDS if k.api_version == api_version and k.kind == kind_name)
        meta = obj.setdefault("metadata", {})
        key = (kind, meta.get("namespace", "") if kind.namespaced else "", meta["name"])
        existed = key in self.objects
        return self._store(kind, key, obj, "MODIFIED" if existed else "ADDED")

    def delete(self, plural: str, name: str, namespace: str = "", group: str = "") -> None:
        kind = self.kind(plural, group)
        self._delete(kind, (kind, namespace, name))

    def writes_by(self, agent: str) -> list[tuple[str, str]]:
        return [(m, p) for m, p, a in self.requests if a == agent and m != "GET"]

    # --- storage ------------------------------------------------------------------------

    def _store(
        self, kind: Kind, key: tuple[Kind, str, str], obj: dict[str, Any], event: str
    ) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta = obj.setdefault("metadata", {})
        old = self.objects.get(key)
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            generation = old["metadata"].get("generation", 1)
            if obj.get("spec") != old.get("spec"):
                generation += 1
            meta["generation"] = generation
        else:
            meta.setdefault("uid", f"uid-{next(self._rv)}")
            meta.setdefault(
                "creationTimestamp", dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            meta["generation"] = 1
        rv = next(self._rv)
        meta["resourceVersion"] = str(rv)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.objects.pop(key, None)
            self._emit(rv, "DELETED", kind, obj)
            return obj
        self.objects[key] = obj
        self._emit(rv, event, kind, obj)
        return obj

    def _delete(self, kind: Kind, key: tuple[Kind, str, str]) -> dict[str, Any] | None:
        obj = self.objects.get(key)
        if obj is None:
            return None
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = dt.datetime.now(dt.UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                )
                return self._store(kind, key, obj, "MODIFIED")
            return obj
        del self.objects[key]
        rv = next(self._rv)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(rv)
        self._emit(rv, "DELETED", kind, obj)
        return obj

    def _emit(self, rv: int, event: str, kind: Kind, obj: dict[str, Any]) -> None:
        self.events.append((rv, event, kind, copy.deepcopy(obj)))
        if self._changed is not None:
            changed = self._changed

            async def notify() -> None:
                async with changed:
                    changed.notify_all()

            asyncio.get_running_loop().create_task(notify())

    # --- HTTP ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path, request.headers.get("User-Agent", "")))
        parts = [p for p in request.path.split("/") if p]
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if parts == ["apis"]:
            return web.json_response(self._groups())
        if len(parts) == 2 and parts[0] == "api":
            return web.json_response(self._resource_list("", parts[1]))
        if len(parts) == 3 and parts[0] == "apis":
            return web.json_response(self._resource_list(parts[1], parts[2]))
        try:
            kind, namespace, name, sub = self._route(parts)
        except LookupError:
            return self._status(404, "NotFound", f"no route for {request.path}")
        if name is None:
            if request.method == "GET":
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, kind, namespace)
                return web.json_response(self._list(request, kind, namespace))
            if request.method == "POST":
                return self._create(kind, namespace, await request.json())
            return self._status(405, "MethodNotAllowed", request.method)
        key = (kind, namespace or "", name)
        current = self.objects.get(key)
        if request.method == "GET":
            if current is None:
                return self._status(404, "NotFound", f"{kind.plural} {name!r} not found")
            return web.json_response(current)
        if request.method == "DELETE":
            deleted = self._delete(kind, key)
            if deleted is None:
                return self._status(404, "NotFound", f"{kind.plural} {name!r} not found")
            return web.json_response(deleted)
        if current is None:
            return self._status(404, "NotFound", f"{kind.plural} {name!r} not found")
        body = await request.json()
        if request.method == "PUT":
            sent_rv = (body.get("metadata") or {}).get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                return self._status(409, "Conflict", "the object has been modified")
            new = body
        elif request.method == "PATCH":
            if request.content_type == "application/json-patch+json":
                new = jsonpatch.apply_patch(current, body)
            else:
                new = _merge(current, body)
        else:
            return self._status(405, "MethodNotAllowed", request.method)
        if sub == "status":
            new = {**current, "status": new.get("status")}
        elif kind.status:
            new = {**new, "status": current.get("status")}
        new.setdefault("metadata", {})
        for keep in ("deletionTimestamp",):
            if current["metadata"].get(keep):
                new["metadata"][keep] = current["metadata"][keep]
        return web.json_response(self._store(kind, key, new, "MODIFIED"))

    def _route(self, parts: list[str]) -> tuple[Kind, str | None, str | None, str | None]:
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise LookupError
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = (
            rest[0],
            (rest[1] if len(rest) > 1 else None),
            (rest[2] if len(rest) > 2 else None),
        )
        kind = next(
            k for k in KINDS if k.group == group and k.version == version and k.plural == plural
        )
        return kind, namespace, name, sub

    def _groups(self) -> dict[str, Any]:
        groups: dict[str, list[str]] = {}
        for kind in KINDS:
            if kind.group:
                groups.setdefault(kind.group, [])
                if kind.version not in groups[kind.group]:
                    groups[kind.group].append(kind.version)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": name,
                    "versions": [{"groupVersion": f"{name}/{v}", "version": v} for v in versions],
                    "preferredVersion": {
                        "groupVersion": f"{name}/{versions[0]}",
                        "version": versions[0],
                    },
                }
                for name, versions in groups.items()
            ],
        }

    def _resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources = []
        for kind in KINDS:
            if kind.group == group and kind.version == version:
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                resources.append(
                    {
                        "name": kind.plural,
                        "singularName": kind.kind.lower(),
                        "namespaced": kind.namespaced,
                        "kind": kind.kind,
                        "verbs": verbs,
                    }
                )
                if kind.status:
                    resources.append(
                        {
                            "name": f"{kind.plural}/status",
                            "singularName": "",
                            "namespaced": kind.namespaced,
                            "kind": kind.kind,
                            "verbs": ["get", "patch", "update"],
                        }
                    )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def _selected(
        self, request: web.Request, kind: Kind, namespace: str | None, obj: dict[str, Any]
    ) -> bool:
        meta = obj["metadata"]
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        return _labels_match(
            request.query.get("labelSelector", ""), meta.get("labels") or {}
        ) and _fields_match(request.query.get("fieldSelector", ""), obj)

    def _list(self, request: web.Request, kind: Kind, namespace: str | None) -> dict[str, Any]:
        items = [
            obj
            for (k, _, _), obj in sorted(self.objects.items(), key=lambda kv: kv[0][1:])
            if k == kind and self._selected(request, kind, namespace, obj)
        ]
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self._current_rv())},
            "items": items,
        }

    def _current_rv(self) -> int:
        return self.events[-1][0] if self.events else 0

    async def _watch(
        self, request: web.Request, kind: Kind, namespace: str | None
    ) -> web.StreamResponse:
        since = int(request.query.get("resourceVersion") or self._current_rv())
        timeout = float(request.query.get("timeoutSeconds", "300"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        assert self._changed is not None
        deadline = asyncio.get_running_loop().time() + timeout
        position = since
        try:
            while asyncio.get_running_loop().time() < deadline:
                for rv, event, k, obj in list(self.events):
                    if rv <= position:
                        continue
                    position = rv
                    if k == kind and self._selected(request, kind, namespace, obj):
                        line = json.dumps({"type": event, "object": obj}) + "\n"
                        await response.write(line.encode())
                async with self._changed:
                    with suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=1.0)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        return response

    def _create(self, kind: Kind, namespace: str | None, body: dict[str, Any]) -> web.Response:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{next(self._rv):05d}"
        if kind.namespaced:
            meta["namespace"] = namespace or meta.get("namespace", "default")
        key = (kind, meta.get("namespace", "") if kind.namespaced else "", meta["name"])
        if key in self.objects:
            return self._status(409, "AlreadyExists", f"{kind.plural} {meta['name']!r} exists")
        return web.json_response(self._store(kind, key, body, "ADDED"), status=201)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            },
            status=code,
        )


@asynccontextmanager
async def running(server: FakeApiServer) -> AsyncIterator[FakeApiServer]:
    server._changed = asyncio.Condition()
    runner = web.AppRunner(server.app(), shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()
