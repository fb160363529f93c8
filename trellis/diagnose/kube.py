"""The API server's part in the diagnostics: which pods carry a sidecar and on which admin
port, the namespace's policy document, the webhook's configuration and certificate, and a
port-forward to a sidecar's admin port.

A sidecar's admin port binds the pod's loopback only (``sidecar.admin``: ``/config`` tells
the workload's identity and policy), so from outside the pod it is reached the way
``kubectl port-forward`` does: the ``pods/portforward`` subresource, which the kubelet
serves inside the pod's network namespace. ``pods/proxy`` would not do: the kubelet proxies
it to the pod's IP, where the admin port does not listen. ``--via pod-ip`` connects to
``status.podIP`` directly instead, for sidecars started with an admin address on the pod's
IP and a caller inside the cluster network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import CliError

__all__ = [
    "PodTarget",
    "api_client",
    "fetch_via_portforward",
    "injected_pods",
    "read_mutating_webhook",
    "read_pod_labels",
    "read_policy_document",
    "read_secret_data",
    "read_workload",
    "resolve_pod",
]

SIDECAR_CONTAINER = "trellis-sidecar"  # mesh_operator.injection.SIDECAR_NAME
DEFAULT_ADMIN_PORT = 15000
POLICY_CONFIGMAP = "trellis-policy"
POLICY_KEY = "policy.json"


@dataclass(frozen=True, slots=True)
class PodTarget:
    namespace: str
    name: str
    admin_port: int
    pod_ip: str | None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def api_client(kubeconfig: Path | None) -> Any:
    """A client from ``kubeconfig`` (default: $KUBECONFIG or ~/.kube/config, then the
    in-cluster service account); one line when neither gives a configuration."""
    import kubernetes

    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=None if kubeconfig is None else str(kubeconfig),
            client_configuration=configuration,
        )
    except (kubernetes.config.ConfigException, OSError, TypeError) as exc:
        if kubeconfig is not None:
            raise CliError(f"cannot use kubeconfig {kubeconfig}: {exc}") from exc
        try:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except kubernetes.config.ConfigException as inner:
            raise CliError(
                "no Kubernetes configuration: give --kubeconfig, set $KUBECONFIG, or run in a pod"
            ) from inner
    return kubernetes.client.ApiClient(configuration)


def _status_message(exc: Exception) -> str | None:
    """The ``message`` of the API server's Status object in an error, if there is one.

    A port-forward refusal arrives as a websocket handshake failure whose text is the
    status line, the headers and the body run together; the body's Status says why."""
    for raw in (getattr(exc, "body", None), getattr(exc, "reason", None)):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")
        start = text.find("{")
        while start != -1:
            try:
                document = json.loads(text[start:].strip())
            except ValueError:
                start = text.find("{", start + 1)
                continue
            if isinstance(document, dict) and isinstance(document.get("message"), str):
                return str(document["message"])
            break
    return None


def _api_error(exc: Exception, what: str) -> CliError:
    status = getattr(exc, "status", None)
    message = _status_message(exc)
    if status == 404:
        return CliError(f"{what} not found")
    if status in (401, 403):
        return CliError(f"{what}: forbidden by the API server (HTTP {status}); check RBAC")
    if message is not None:
        return CliError(f"{what}: refused by the API server: {message}")
    reason = " ".join(str(getattr(exc, "reason", None) or exc).split())
    return CliError(f"{what}: the API server answered {reason}")


def _call(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    import kubernetes
    import urllib3

    try:
        return call(*args, **kwargs)
    except kubernetes.client.exceptions.ApiException as exc:
        raise _api_error(exc, what) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise CliError(f"cannot reach the API server to read {what}: {exc}") from exc


def _admin_port(container: dict[str, Any]) -> int:
    for arg in container.get("args") or []:
        if isinstance(arg, str) and arg.startswith("--admin-port="):
            value = arg.partition("=")[2]
            if value.isdigit():
                return int(value)
    return DEFAULT_ADMIN_PORT


def _target(pod: dict[str, Any]) -> PodTarget | None:
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if container.get("name") == SIDECAR_CONTAINER:
            return PodTarget(
                namespace=str(meta.get("namespace")),
                name=str(meta.get("name")),
                admin_port=_admin_port(container),
                pod_ip=(pod.get("status") or {}).get("podIP"),
            )
    return None


def _raw(api: Any, method: str, *args: Any) -> dict[str, Any]:
    import kubernetes

    core = kubernetes.client.CoreV1Api(api)
    response = getattr(core, method)(*args, _preload_content=False)
    value = json.loads(response.data)
    assert isinstance(value, dict)
    return value


def resolve_pod(api: Any, namespace: str, name: str) -> PodTarget:
    """The pod's sidecar admin port and address; one line if it has no sidecar."""
    pod = _call(f"pod {namespace}/{name}", _raw, api, "read_namespaced_pod", name, namespace)
    target = _target(pod)
    if target is None:
        raise CliError(
            f"pod {namespace}/{name} has no {SIDECAR_CONTAINER} container (not injected: is"
            " its namespace labelled trellis.dev/inject=enabled?)"
        )
    return target


def read_pod_labels(api: Any, namespace: str, name: str) -> dict[str, str]:
    """A pod's labels, injected or not (what its policies select it by)."""
    pod = _call(f"pod {namespace}/{name}", _raw, api, "read_namespaced_pod", name, namespace)
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def injected_pods(api: Any, namespace: str | None) -> list[PodTarget]:
    """Every pod carrying a sidecar, in ``namespace`` or (None) in all namespaces."""
    if namespace is None:
        pods = _call("pods", _raw, api, "list_pod_for_all_namespaces")
    else:
        pods = _call(f"pods in {namespace}", _raw, api, "list_namespaced_pod", namespace)
    targets = (_target(p) for p in pods.get("items") or [])
    return sorted((t for t in targets if t is not None), key=str)


def read_policy_document(api: Any, namespace: str) -> Any:
    """The namespace's ``SidecarPolicy`` document, as the operator wrote it (JSON decoded)."""
    what = f"ConfigMap {namespace}/{POLICY_CONFIGMAP}"
    config_map = _call(what, _raw, api, "read_namespaced_config_map", POLICY_CONFIGMAP, namespace)
    text = (config_map.get("data") or {}).get(POLICY_KEY)
    if text is None:
        raise CliError(f"{what} has no {POLICY_KEY}")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{what}: {POLICY_KEY} is not JSON: {exc}") from exc


def _http_get(sock: Any, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status_line.split(" ")[1:2] != ["200"]:
        raise CliError(f"the admin port answered {status_line!r}")
    return body


def fetch_via_portforward(api: Any, target: PodTarget, path: str) -> dict[str, Any]:
    """``GET path`` on the pod's admin port through the API server's pods/portforward."""
    import kubernetes
    from kubernetes.stream import portforward

    core = kubernetes.client.CoreV1Api(api)
    try:
        forward = portforward(
            core.connect_get_namespaced_pod_portforward,
            target.name,
            target.namespace,
            ports=str(target.admin_port),
        )
        sock = forward.socket(target.admin_port)
        sock.setblocking(True)
        sock.settimeout(10)
        try:
            body = _http_get(sock, path)
        finally:
            sock.close()
            forward.close()
    except kubernetes.client.exceptions.ApiException as exc:
        raise _api_error(exc, f"port-forward to {target}") from exc
    except OSError as exc:  # socket.timeout is an OSError too
        raise CliError(f"port-forward to {target}:{target.admin_port} failed: {exc}") from exc
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise CliError(f"{target}:{target.admin_port}{path} did not answer JSON") from exc
    if not isinstance(document, dict):
        raise CliError(f"{target}:{target.admin_port}{path} did not answer a JSON object")
    return document


def read_mutating_webhook(api: Any, name: str) -> dict[str, Any]:
    import kubernetes

    admission = kubernetes.client.AdmissionregistrationV1Api(api)

    def read() -> dict[str, Any]:
        response: Any = admission.read_mutating_webhook_configuration(name, _preload_content=False)
        value = json.loads(response.data)
        assert isinstance(value, dict)
        return value

    result: dict[str, Any] = _call(f"MutatingWebhookConfiguration {name}", read)
    return result


def read_secret_data(api: Any, namespace: str, name: str) -> dict[str, str]:
    """The Secret's data, base64 as the API server sends it (the caller decodes what it
    needs and no more: this Secret holds the webhook's private keys too)."""
    secret = _call(
        f"Secret {namespace}/{name}", _raw, api, "read_namespaced_secret", name, namespace
    )
    data = secret.get("data") or {}
    return {str(k): str(v) for k, v in data.items()}


def read_workload(api: Any, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A Deployment or DaemonSet (``kind``), or None when there is none of that name."""
    import kubernetes

    apps = kubernetes.client.AppsV1Api(api)
    method = {
        "Deployment": apps.read_namespaced_deployment,
        "DaemonSet": apps.read_namespaced_daemon_set,
    }[kind]

    def read() -> dict[str, Any]:
        response: Any = method(name, namespace, _preload_content=False)
        value = json.loads(response.data)
        assert isinstance(value, dict)
        return value

    try:
        result: dict[str, Any] = _call(f"{kind} {namespace}/{name}", read)
    except CliError as exc:
        if str(exc).endswith(" not found"):
            return None
        raise
    return result
