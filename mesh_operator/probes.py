"""Probe rewrite: the app's HTTP, TCP and gRPC probes moved to the sidecar's health port.

Why: the inbound redirect (``trellis-init``) sends every port but the sidecar's own to the
mTLS listener, so the kubelet's plaintext probe of the app's port would land on TLS and the
pod would never be Ready. As Istio does, each such probe becomes an ``httpGet`` of
``/app-health/<container>/<livez|readyz|startupz>`` on the health port, which the kubelet
reaches in plaintext (the redirect leaves it alone); the sidecar runs the original probe
against the app on 127.0.0.1 and answers with its result (``sidecar.probes``).

* The originals go to the sidecar as ``--app-probes`` JSON with named ports resolved from
  the container's ports, and stay in the ``trellis.dev/original-probes`` annotation
  (``{container: {livenessProbe: probe, ...}}``) so ``restore_probes`` can put them back
  when the sidecar is removed.
* Left unchanged: ``exec`` probes (they run in the app's container, not over the network),
  probes with an explicit ``httpGet.host`` (they target some other address), and probes
  whose named port the container does not declare (the kubelet would fail them too; moving
  them would hide that).
* Opt-out: ``trellis.dev/rewrite-probes: "false"`` on the pod.

Pure functions on dicts, like the rest of the injector.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ANNOTATION_ORIGINAL_PROBES",
    "ANNOTATION_REWRITE_PROBES",
    "KINDS",
    "ProbeRewrite",
    "plan_probe_rewrite",
    "restore_probes",
]

ANNOTATION_REWRITE_PROBES = "trellis.dev/rewrite-probes"
ANNOTATION_ORIGINAL_PROBES = "trellis.dev/original-probes"
# Pod probe field -> the path segment the sidecar serves it under (Istio's names).
KINDS: Mapping[str, str] = {
    "livenessProbe": "livez",
    "readinessProbe": "readyz",
    "startupProbe": "startupz",
}
_ACTIONS = ("httpGet", "tcpSocket", "grpc", "exec")


@dataclass(frozen=True, slots=True)
class ProbeRewrite:
    """``patch``: JSONPatch ops replacing the probes; ``app_probes``: the sidecar's
    ``--app-probes`` value; ``originals``: the annotation's value. All empty when no probe
    is moved."""

    patch: tuple[dict[str, Any], ...]
    app_probes: str
    originals: str


def _resolve_port(port: Any, container: Mapping[str, Any]) -> int | None:
    """An IntOrString probe port as a number: a named port is looked up in the container's
    ``ports`` (as the kubelet does, pkg/kubelet/prober findPortByName)."""
    if isinstance(port, bool):
        return None
    if isinstance(port, int):
        return port if 1 <= port <= 65535 else None
    if isinstance(port, str):
        for entry in container.get("ports") or []:
            if isinstance(entry, Mapping) and entry.get("name") == port:
                return _resolve_port(entry.get("containerPort"), {})
    return None


def _sidecar_probe(probe: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``--app-probes`` entry for ``probe``, or None when it stays as it is."""
    actions = [name for name in _ACTIONS if name in probe]
    if len(actions) != 1 or actions[0] == "exec":
        return None
    action = actions[0]
    handler = probe[action]
    if not isinstance(handler, Mapping):
        return None
    port = _resolve_port(handler.get("port"), container)
    if port is None:
        return None
    entry: dict[str, Any] = {}
    if action == "tcpSocket":
        if handler.get("host"):
            return None
        entry["tcpSocket"] = {"port": port}
    elif action == "grpc":
        entry["grpc"] = {"port": port, "service": str(handler.get("service") or "")}
    else:
        if handler.get("host"):
            return None
        entry["httpGet"] = {
            "path": str(handler.get("path") or "/"),
            "port": port,
            "scheme": str(handler.get("scheme") or "HTTP"),
            "httpHeaders": [dict(h) for h in handler.get("httpHeaders") or []],
        }
    timeout = probe.get("timeoutSeconds")
    if isinstance(timeout, int) and not isinstance(timeout, bool):
        entry["timeoutSeconds"] = timeout
    return entry


def _is_rewritten(probe: Mapping[str, Any], health_port: int) -> bool:
    handler = probe.get("httpGet")
    return (
        isinstance(handler, Mapping)
        and handler.get("port") == health_port
        and str(handler.get("path", "")).startswith("/app-health/")
    )


def _previous_originals(annotations: Mapping[str, Any]) -> Mapping[str, Any]:
    try:
        value = json.loads(str(annotations.get(ANNOTATION_ORIGINAL_PROBES) or "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def plan_probe_rewrite(pod: Mapping[str, Any], health_port: int) -> ProbeRewrite:
    """The probe part of the injection patch for ``pod`` (see the module docstring)."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    opt = annotations.get(ANNOTATION_REWRITE_PROBES)
    if isinstance(opt, str) and opt.strip().lower() in ("false", "disabled", "no", "0"):
        return ProbeRewrite((), "", "")
    # A pod re-submitted with probes we already moved (its sidecar removed by hand) keeps
    # its originals from the annotation instead of losing them.
    previous = _previous_originals(annotations)
    patch: list[dict[str, Any]] = []
    app_probes: dict[str, Any] = {}
    originals: dict[str, dict[str, Any]] = {}
    for index, container in enumerate((pod.get("spec") or {}).get("containers") or []):
        if not isinstance(container, Mapping) or not isinstance(container.get("name"), str):
            continue
        name: str = container["name"]
        for field, kind in KINDS.items():
            probe = container.get(field)
            if not isinstance(probe, Mapping):
                continue
            if _is_rewritten(probe, health_port):
                kept = (previous.get(name) or {}).get(field)
                if not isinstance(kept, Mapping):
                    continue
                probe = kept
            entry = _sidecar_probe(probe, container)
            if entry is None:
                continue
            app_probes[f"{name}/{kind}"] = entry
            originals.setdefault(name, {})[field] = copy.deepcopy(dict(probe))
            moved = {k: copy.deepcopy(v) for k, v in probe.items() if k not in _ACTIONS}
            moved["httpGet"] = {
                "path": f"/app-health/{name}/{kind}",
                "port": health_port,
                "scheme": "HTTP",
            }
            patch.append(
                {"op": "replace", "path": f"/spec/containers/{index}/{field}", "value": moved}
            )
    if not patch:
        return ProbeRewrite((), "", "")
    return ProbeRewrite(
        tuple(patch),
        json.dumps(app_probes, separators=(",", ":"), sort_keys=True),
        json.dumps(originals, separators=(",", ":"), sort_keys=True),
    )


def restore_probes(pod: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``pod`` with the probes of ``trellis.dev/original-probes`` put back and the
    annotation removed: what a pod looks like with its sidecar taken out."""
    restored = copy.deepcopy(dict(pod))
    annotations = (restored.get("metadata") or {}).get("annotations") or {}
    originals = _previous_originals(annotations)
    annotations.pop(ANNOTATION_ORIGINAL_PROBES, None)
    for container in (restored.get("spec") or {}).get("containers") or []:
        if not isinstance(container, dict):
            continue
        kept = originals.get(str(container.get("name")))
        for field, probe in (kept if isinstance(kept, Mapping) else {}).items():
            if field in KINDS and isinstance(probe, Mapping):
                container[field] = copy.deepcopy(dict(probe))
    return restored
