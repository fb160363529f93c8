"""Kubernetes workload attestation: cgroup → pod UID → namespace, service account, labels.

Theory of operation. A container's processes live in a cgroup whose path names the pod's
UID, in one of the kubelet's layouts::

    cgroupfs driver:  .../kubepods/burstable/pod<uid>/<container-id>
    systemd driver:   .../kubepods-burstable-pod<uid_with_underscores>.slice/cri-<id>.scope

``pod_uid_from_cgroups`` extracts that UID (sans-I/O: lines of /proc/<pid>/cgroup in).
``PodIndex`` holds the pods scheduled on this node, fed by watch events (``apply``); the
``PodAttestor`` plugin turns the caller's pod into selectors: ``k8s:ns``, ``k8s:sa``,
``k8s:pod-label:<key>:<value>`` and ``k8s:node-name``. A process outside any pod simply
gets no ``k8s:`` selectors.

``watch_pods`` is the I/O shell: list + watch of ``/api/v1/pods?fieldSelector=
spec.nodeName=<node>`` against the API server with the pod's own service-account token
(in-cluster configuration), through aiohttp, so the agent needs no Kubernetes client
library. Unit tests feed ``PodIndex`` recorded cgroup files and pod objects;
tests/kube/test_svid.py runs ``watch_pods`` against a real kube-apiserver.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ca.agent.attestation import AttestationPending, WorkloadAttributes
from ca.agent.backoff import Backoff
from ca.entries import Selector

__all__ = [
    "InClusterConfig",
    "PodAttestor",
    "PodIndex",
    "PodInfo",
    "pod_from_object",
    "pod_uid_from_cgroups",
    "watch_pods",
]

log = logging.getLogger("trellis.agent.k8s")

_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_POD_IN_PATH = re.compile(rf"(?:^|[/-])pod({_UID})(?:\.slice)?(?:/|$)")


def pod_uid_from_cgroups(lines: Iterable[str]) -> str | None:
    """The pod UID named by a process's cgroup lines (``/proc/<pid>/cgroup``), if any."""
    for line in lines:
        # "hierarchy-ID:controller-list:cgroup-path"; the path may itself contain ':'.
        parts = line.split(":", 2)
        path = parts[2] if len(parts) == 3 else line
        if "kubepods" not in path:
            continue
        for segment in path.split("/"):
            match = _POD_IN_PATH.search("/" + segment + "/")
            if match:
                return match.group(1).replace("_", "-")
    return None


@dataclass(frozen=True, slots=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    service_account: str
    node_name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def selectors(self) -> frozenset[Selector]:
        found = {
            Selector("k8s", "ns", self.namespace),
            Selector("k8s", "sa", self.service_account),
        }
        if self.node_name:
            found.add(Selector("k8s", "node-name", self.node_name))
        found.update(Selector("k8s", "pod-label", f"{k}:{v}") for k, v in self.labels.items())
        return frozenset(found)


def pod_from_object(obj: Mapping[str, Any]) -> PodInfo | None:
    """A ``PodInfo`` from a v1 Pod object (as JSON-decoded), or ``None`` if it lacks a UID."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    uid = meta.get("uid")
    if not isinstance(uid, str) or not uid:
        return None
    labels = meta.get("labels") or {}
    return PodInfo(
        uid=uid,
        namespace=str(meta.get("namespace") or "default"),
        name=str(meta.get("name") or ""),
        # The API server defaults serviceAccountName to "default" on admission.
        service_account=str(spec.get("serviceAccountName") or "default"),
        node_name=str(spec.get("nodeName") or ""),
        labels={str(k): str(v) for k, v in labels.items()},
    )


class PodIndex:
    """Pods on this node by UID, kept current by list/watch events."""

    def __init__(self) -> None:
        self._pods: dict[str, PodInfo] = {}
        self.resource_version: str | None = None
        self.synced = False

    def replace(self, objects: Iterable[Mapping[str, Any]], resource_version: str | None) -> None:
        pods = [p for p in (pod_from_object(o) for o in objects) if p is not None]
        self._pods = {p.uid: p for p in pods}
        self.resource_version = resource_version
        self.synced = True

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one watch event; ``False`` means the watch must restart with a fresh list."""
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            return False  # typically 410 Gone: our resourceVersion is too old
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if isinstance(rv, str):
            self.resource_version = rv
        if kind == "BOOKMARK":
            return True
        pod = pod_from_object(obj)
        if pod is None:
            return True
        if kind == "DELETED":
            self._pods.pop(pod.uid, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._pods[pod.uid] = pod
        return True

    def get(self, uid: str) -> PodInfo | None:
        return self._pods.get(uid)

    def __len__(self) -> int:
        return len(self._pods)


class PodAttestor:
    """Selector plugin: adds the ``k8s:`` selectors of the caller's pod."""

    def __init__(self, index: PodIndex) -> None:
        self.index = index

    def selectors(self, attributes: WorkloadAttributes) -> frozenset[Selector]:
        uid = pod_uid_from_cgroups(attributes.cgroups)
        if uid is None:
            return frozenset()
        pod = self.index.get(uid)
        if pod is None:
            # A pod that just started can call before its watch event arrives; answering
            # "no identity" would be wrong, so the caller is told to retry (UNAVAILABLE).
            raise AttestationPending(f"pod {uid} is not known to this agent yet")
        return pod.selectors()


# -- the I/O shell ------------------------------------------------------------------------

_SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class InClusterConfig:
    base_url: str
    token_path: Path = _SA_DIR / "token"
    ca_path: Path | None = _SA_DIR / "ca.crt"

    @classmethod
    def from_environment(cls) -> InClusterConfig:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST unset)")
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}")

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.base_url.startswith("https://"):
            return False
        return ssl.create_default_context(
            cafile=str(self.ca_path) if self.ca_path is not None else None
        )

    def headers(self) -> dict[str, str]:
        # Projected tokens rotate: read the file on every (re)connect, never cache it.
        token = self.token_path.read_text().strip()
        return {"Authorization": f"Bearer {token}", "Accept": "application/json"}


async def _list(
    session: aiohttp.ClientSession, config: InClusterConfig, node: str, index: PodIndex
) -> None:
    url = f"{config.base_url}/api/v1/pods"
    params = {"fieldSelector": f"spec.nodeName={node}"}
    async with session.get(
        url, params=params, headers=config.headers(), ssl=config.ssl_context()
    ) as response:
        response.raise_for_status()
        doc = await response.json()
    index.replace(doc.get("items") or [], (doc.get("metadata") or {}).get("resourceVersion"))


async def _watch(
    session: aiohttp.ClientSession, config: InClusterConfig, node: str, index: PodIndex
) -> None:
    url = f"{config.base_url}/api/v1/pods"
    params = {
        "fieldSelector": f"spec.nodeName={node}",
        "watch": "true",
        "allowWatchBookmarks": "true",
        "resourceVersion": index.resource_version or "",
        "timeoutSeconds": "300",
    }
    async with session.get(
        url,
        params=params,
        headers=config.headers(),
        ssl=config.ssl_context(),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=330),
    ) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                log.warning("ignoring a malformed pod watch event")
                continue
            if not isinstance(event, dict) or not index.apply(event):
                index.resource_version = None
                return


async def watch_pods(config: InClusterConfig, node: str, index: PodIndex) -> None:
    """Keep ``index`` current with the pods on ``node``: list, then watch; forever."""
    backoff = Backoff(base=0.5, cap=30.0)
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                if index.resource_version is None or not index.synced:
                    await _list(session, config, node, index)
                await _watch(session, config, node, index)
                backoff.reset()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.warning("pod watch failed: %s", exc)
                index.resource_version = None
                await asyncio.sleep(backoff.next_delay())
