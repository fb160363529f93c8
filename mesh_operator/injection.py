"""Sidecar injection as a pure function: a pod (dict) in, a JSONPatch (list) out.

What gets added (``plan_injection``), in the order the kubelet must run it:

1. ``trellis-init`` (init container, transparent mode only): installs the iptables
   redirect to the sidecar's ports (``sidecar.iptables``). It alone gets NET_ADMIN/NET_RAW and runs
   as root, then exits; skipped when the pod names explicit upstreams
   (``trellis.dev/upstreams``), since then the app dials local ports bound per upstream.
2. ``trellis-sidecar``, a *native sidecar*: an init container with ``restartPolicy:
   Always`` (KEP-753, GA in 1.33), so it starts before the app's containers, stays up while
   they run, and does not keep a Job's pod alive. It runs ``trellis sidecar`` as UID 1337
   (the UID the redirect exempts), non-root, read-only root filesystem, ALL capabilities
   dropped, and is ready when ``/readyz`` on the health port 15020 says so. Its inbound
   side forwards to the ports the pod's containers declare (``--app-ports``, their TCP
   ``containerPort`` entries) and refuses every other port, so no caller can reach through it
   to what else listens in the pod. Its admin port (15000, with ``/config``) binds
   127.0.0.1 only; the health port on the pod's address serves ``/metrics``,
   ``/healthz`` and ``/readyz`` alone, for the kubelet and Prometheus (container port
   ``trellis-metrics``), and is the one port the inbound redirect leaves alone.
3. Volumes: the agent's Workload API socket directory (read-only; ``SPIFFE_ENDPOINT_SOCKET``
   points at it) as a CSI ephemeral volume of the agent's own node plugin
   (``ca.agent.csi``), not a ``hostPath``: Pod Security "baseline" forbids hostPath volumes
   and allows ``csi`` ones, which is why the SPIFFE CSI driver exists. The agent attests by
   SO_PEERCRED either way; the plugin only makes the socket reachable. Clusters whose agent
   runs without ``--csi-socket`` set ``agent_socket_csi_driver=None`` for the hostPath.
   Then the namespace's policy ConfigMap
   (optional: a namespace without AccessPolicies has none), the pod's labels through the
   downward API (the sidecar matches policy selectors against them), and a memory-backed
   ``/tmp``.

4. Probe rewrite (transparent mode; ``mesh_operator.probes``): the app containers' HTTP,
   TCP and gRPC probes become ``httpGet`` probes of ``/app-health/<container>/<kind>`` on
   the health port, the sidecar gets the originals as ``--app-probes`` and runs them
   against the app at the pod address the kubelet's probe arrived on (127.0.0.1 when
   nothing listens there), and ``trellis.dev/original-probes`` keeps them. Explicit
   mode installs no redirect, so the app's probes work there as they are.

5. Redirect mode (``InjectorConfig.redirect``): ``init`` installs the redirect with
   ``trellis-init`` as above; ``cni`` leaves that container out and marks the pod
   ``trellis.dev/redirect: cni``, and the node's ``trellis-cni`` plugin (``sidecar.cni``)
   installs the same rules in the pod's network namespace before any container starts, so
   no container of the pod holds NET_ADMIN/NET_RAW (Pod Security "baseline" forbids adding
   them). The webhook configuration picks the mode per namespace: namespaces labelled
   ``trellis.dev/redirect: cni`` are sent to ``/mutate/cni``.

Idempotence: a pod that already has a ``trellis-sidecar`` init container gets an empty
patch, so a reinvoked webhook (``reinvocationPolicy: IfNeeded``) or a pod re-submitted with
its injected spec changes nothing. Skipped: pods annotated ``trellis.dev/inject: "false"``
and ``hostNetwork`` pods (an iptables redirect there would capture the node's traffic).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ca.agent.csi import DRIVER_NAME as CSI_DRIVER
from core.errors import FieldError
from meshapi import upstreams as meshapi_upstreams
from meshapi.redirect import RedirectAnnotations, parse_redirect_annotations
from meshapi.upstreams import Upstream

from .probes import ANNOTATION_ORIGINAL_PROBES, ProbeRewrite, plan_probe_rewrite

__all__ = [
    "ANNOTATION_INJECT",
    "ANNOTATION_REDIRECT",
    "ANNOTATION_STATUS",
    "ANNOTATION_UPSTREAMS",
    "INIT_NAME",
    "SIDECAR_NAME",
    "InjectionDecision",
    "InjectorConfig",
    "UpstreamError",
    "app_ports",
    "parse_upstreams",
    "plan_injection",
]

ANNOTATION_INJECT = "trellis.dev/inject"
ANNOTATION_UPSTREAMS = "trellis.dev/upstreams"
ANNOTATION_STATUS = "trellis.dev/injected"
# Read by the node's CNI plugin (sidecar.cni): the pod wants its redirect from the node.
ANNOTATION_REDIRECT = "trellis.dev/redirect"
REDIRECT_MODES = ("init", "cni")
SIDECAR_NAME = "trellis-sidecar"
INIT_NAME = "trellis-init"
VOLUME_SOCKET = "trellis-workload-api"
VOLUME_POLICY = "trellis-policy"
VOLUME_PODINFO = "trellis-podinfo"
VOLUME_TMP = "trellis-tmp"
POLICY_CONFIGMAP = "trellis-policy"


class UpstreamError(FieldError):
    """The upstreams annotation is malformed; the pod is refused with this message."""


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    # The image `make image` builds: localhost/trellis:<project version>, the tag the
    # manifests name too (a cluster gets it by `podman save` + import, or a registry).
    image: str = "localhost/trellis:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    proxy_uid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15008
    admin_port: int = 15000
    health_port: int = 15020
    agent_socket_host_dir: str = "/run/trellis/workload"
    # The agent's CSI node plugin (``trellis agent --csi-socket``); None: a hostPath volume.
    agent_socket_csi_driver: str | None = CSI_DRIVER
    socket_mount_path: str = "/run/spiffe/workload"
    socket_name: str = "agent.sock"
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"
    version: str = "0.1.0"
    # "init": the trellis-init container installs the redirect; "cni": the node's plugin does.
    redirect: str = "init"

    def __post_init__(self) -> None:
        if self.redirect not in REDIRECT_MODES:
            raise ValueError(f"redirect mode {self.redirect!r}: expected init or cni")

    @property
    def endpoint_socket(self) -> str:
        return f"unix://{self.socket_mount_path}/{self.socket_name}"


@dataclass(frozen=True, slots=True)
class InjectionDecision:
    """``patch`` is empty when nothing is to be done; ``reason`` says why, for logs."""

    patch: tuple[dict[str, Any], ...]
    reason: str


def parse_upstreams(text: str) -> tuple[Upstream, ...]:
    """``svc.ns:8080=9001,db.ns:5432=9002`` → ((service, port, local port), ...), in the
    grammar the sidecar's ``--upstreams`` reads (``meshapi.upstreams``)."""
    try:
        return meshapi_upstreams.parse_upstreams(text, ANNOTATION_UPSTREAMS)
    except FieldError as exc:
        raise UpstreamError(exc.field, exc.reason) from exc


def _pointer(token: str) -> str:
    # RFC 6901 §3: "~" is written "~0" and "/" is written "~1".
    return token.replace("~", "~0").replace("/", "~1")


def _security_context(config: InjectorConfig) -> dict[str, Any]:
    return {
        "runAsUser": config.proxy_uid,
        "runAsGroup": config.proxy_uid,
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(config: InjectorConfig) -> dict[str, Any]:
    return {
        "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
        "limits": {"cpu": config.cpu_limit, "memory": config.memory_limit},
    }


def _init_container(config: InjectorConfig, redirect: RedirectAnnotations) -> dict[str, Any]:
    inbound_excluded = ",".join(
        str(p) for p in dict.fromkeys((config.health_port, *redirect.exclude_inbound_ports))
    )
    args = [
        "sidecar",
        "iptables",
        f"--proxy-uid={config.proxy_uid}",
        f"--outbound-port={config.outbound_port}",
        f"--inbound-port={config.inbound_port}",
        # The kubelet's probes and Prometheus reach the health port in plaintext.
        f"--exclude-inbound-ports={inbound_excluded}",
        *redirect.iptables_args(),
    ]
    return {
        "name": INIT_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["trellis"],
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "64Mi"},
        },
        "securityContext": {
            # iptables needs root and NET_ADMIN in the pod's network namespace; nothing else.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def app_ports(spec: Mapping[str, Any], config: InjectorConfig) -> tuple[int, ...]:
    """The TCP ``containerPort`` entries of the pod's containers: what the sidecar may forward
    to. The sidecar's own ports are left out (an app cannot share them anyway)."""
    own = {config.inbound_port, config.outbound_port, config.admin_port, config.health_port}
    found: set[int] = set()
    for container in spec.get("containers") or []:
        if not isinstance(container, Mapping):
            continue
        for entry in container.get("ports") or []:
            if not isinstance(entry, Mapping) or entry.get("protocol", "TCP") != "TCP":
                continue
            port = entry.get("containerPort")
            if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
                found.add(port)
    return tuple(sorted(found - own))


def _sidecar(
    config: InjectorConfig, upstreams: str | None, ports: tuple[int, ...]
) -> dict[str, Any]:
    mode = "explicit" if upstreams is not None else "transparent"
    args = [
        "sidecar",
        f"--mode={mode}",
        f"--outbound-port={config.outbound_port}",
        f"--inbound-port={config.inbound_port}",
        f"--admin-port={config.admin_port}",
        f"--health-port={config.health_port}",
        "--policy=/etc/trellis/policy/policy.json",
        "--pod-labels=/etc/trellis/podinfo/labels",
    ]
    if ports:
        args.append("--app-ports=" + ",".join(str(p) for p in ports))
    if upstreams is not None:
        args.append(f"--upstreams={upstreams}")
    env: list[dict[str, Any]] = [
        {"name": "SPIFFE_ENDPOINT_SOCKET", "value": config.endpoint_socket},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": "POD_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
    ]
    return {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["trellis"],
        "args": args,
        # KEP-753: an init container with restartPolicy Always is a native sidecar.
        "restartPolicy": "Always",
        "env": env,
        "ports": [
            {"name": "trellis-in", "containerPort": config.inbound_port, "protocol": "TCP"},
            {"name": "trellis-metrics", "containerPort": config.health_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": config.health_port},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": config.health_port},
            "periodSeconds": 1,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": config.health_port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": _resources(config),
        "securityContext": _security_context(config),
        "volumeMounts": [
            {"name": VOLUME_SOCKET, "mountPath": config.socket_mount_path, "readOnly": True},
            {"name": VOLUME_POLICY, "mountPath": "/etc/trellis/policy", "readOnly": True},
            {"name": VOLUME_PODINFO, "mountPath": "/etc/trellis/podinfo", "readOnly": True},
            {"name": VOLUME_TMP, "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, not the host's
        ],
    }


def _socket_volume(config: InjectorConfig) -> dict[str, Any]:
    if config.agent_socket_csi_driver is None:
        return {
            "name": VOLUME_SOCKET,
            "hostPath": {"path": config.agent_socket_host_dir, "type": "Directory"},
        }
    # A CSI ephemeral inline volume: the kubelet asks the agent's plugin on this node to
    # publish its socket directory (NodePublishVolume); the plugin refuses a writable one.
    return {
        "name": VOLUME_SOCKET,
        "csi": {"driver": config.agent_socket_csi_driver, "readOnly": True},
    }


def _volumes(config: InjectorConfig) -> list[dict[str, Any]]:
    return [
        _socket_volume(config),
        {
            "name": VOLUME_POLICY,
            "configMap": {"name": POLICY_CONFIGMAP, "optional": True},
        },
        {
            "name": VOLUME_PODINFO,
            "downwardAPI": {
                "items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]
            },
        },
        {"name": VOLUME_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]


def _truthy_off(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("false", "disabled", "no", "0")


def plan_injection(pod: Mapping[str, Any], config: InjectorConfig) -> InjectionDecision:
    """The JSONPatch that injects the sidecar into ``pod`` (see the module docstring).

    Raises ``UpstreamError`` for a malformed upstreams annotation, ``AnnotationError``
    for a malformed redirect one (``meshapi.redirect``): refusing the pod is
    better than starting it without the connectivity its author asked for.
    """
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if _truthy_off(annotations.get(ANNOTATION_INJECT)) or _truthy_off(
        labels.get(ANNOTATION_INJECT)
    ):
        return InjectionDecision((), f"opted out ({ANNOTATION_INJECT}: false)")
    if spec.get("hostNetwork") is True:
        return InjectionDecision((), "hostNetwork pod: a redirect would capture node traffic")
    init_containers = spec.get("initContainers") or []
    containers = spec.get("containers") or []
    names = {c.get("name") for c in [*init_containers, *containers] if isinstance(c, Mapping)}
    if SIDECAR_NAME in names:
        return InjectionDecision((), "already injected")
    upstreams_raw = annotations.get(ANNOTATION_UPSTREAMS)
    upstreams: str | None = None
    if upstreams_raw is not None:
        upstreams = meshapi_upstreams.render_upstreams(parse_upstreams(str(upstreams_raw)))
    # Validated whatever the mode: a bad value is refused now, not in a crash-looping init.
    redirect = parse_redirect_annotations(annotations)

    new_init: list[dict[str, Any]] = []
    cni_redirect = upstreams is None and config.redirect == "cni"
    if upstreams is None and not cni_redirect:
        # The CA and agent ports the app itself may need stay reachable without the proxy.
        new_init.append(_init_container(config, redirect))
    sidecar = _sidecar(config, upstreams, app_ports(spec, config))
    probes = ProbeRewrite((), "", "")
    if upstreams is None:
        probes = plan_probe_rewrite(pod, config.health_port)
    if probes.app_probes:
        sidecar["args"].append(f"--app-probes={probes.app_probes}")
    new_init.append(sidecar)

    patch: list[dict[str, Any]] = []
    if "initContainers" not in spec or spec.get("initContainers") is None:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": new_init})
    else:
        # The redirect and the sidecar go first, so the app's own init containers already
        # run inside the mesh (as with Istio's native-sidecar mode).
        for index, container in enumerate(new_init):
            patch.append({"op": "add", "path": f"/spec/initContainers/{index}", "value": container})
    existing_volumes = {v.get("name") for v in spec.get("volumes") or [] if isinstance(v, Mapping)}
    volumes = [v for v in _volumes(config) if v["name"] not in existing_volumes]
    if spec.get("volumes") is None:
        patch.append({"op": "add", "path": "/spec/volumes", "value": volumes})
    else:
        patch.extend({"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes)
    if meta.get("annotations") is None:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    patch.append(
        {
            "op": "add",
            "path": f"/metadata/annotations/{_pointer(ANNOTATION_STATUS)}",
            "value": config.version,
        }
    )
    if cni_redirect:
        patch.append(
            {
                "op": "add",
                "path": f"/metadata/annotations/{_pointer(ANNOTATION_REDIRECT)}",
                "value": "cni",
            }
        )
    patch.extend(probes.patch)
    if probes.originals:
        patch.append(
            {
                "op": "add",
                "path": f"/metadata/annotations/{_pointer(ANNOTATION_ORIGINAL_PROBES)}",
                "value": probes.originals,
            }
        )
    mode = "explicit upstreams" if upstreams is not None else "transparent"
    if cni_redirect:
        mode += ", redirect by the node's CNI plugin"
    return InjectionDecision(tuple(patch), f"injected ({mode})")
