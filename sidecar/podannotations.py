"""One pod's annotations from the API server, by a plain HTTPS GET: what ``trellis-cni``
needs to decide whether a pod is its to redirect.

Why not the Kubernetes client: importing it (and its models) cost the plugin about two
seconds of every pod's ADD, on the node's CPU, while the sandbox waits. This reads the
kubeconfig the DaemonSet writes (``sidecar.cni.write_kubeconfig``: JSON; YAML is read too,
as kubeconfig files are YAML) and sends one GET with the standard library.

The request asks for the pod's metadata alone (``as=PartialObjectMetadata``, served since
Kubernetes 1.15, with the full object as the fallback type: the same ``get pods`` RBAC),
the answer is read up to ``MAX_ANSWER`` bytes and no further, and the whole exchange is
bounded by ``timeout`` seconds. Supported kubeconfig credentials: a bearer token
(``token`` / ``tokenFile``) or a client certificate and key given as files; the server is
always verified, against the kubeconfig's CA or else the system's.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MAX_ANSWER", "ApiAccess", "ApiReadError", "load_kubeconfig", "read_annotations"]

# A pod's metadata is small (annotations are capped at 256 KiB in total by API validation);
# the full object, if a server ignores the metadata-only request, stays below etcd's
# default 1.5 MiB request limit even as JSON in all but contrived cases.
MAX_ANSWER = 4 * 1024 * 1024
_MAX_KUBECONFIG = 1024 * 1024
_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"


class ApiReadError(Exception):
    """``config`` True: the kubeconfig is unusable; False: the request failed."""

    def __init__(self, msg: str, details: str = "", *, config: bool = False) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details
        self.config = config


@dataclass(frozen=True, slots=True)
class ApiAccess:
    """How to reach the API server: from ``load_kubeconfig``."""

    host: str
    port: int
    path_prefix: str
    context: ssl.SSLContext
    server_name: str | None
    token: str | None


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ApiReadError(f"kubeconfig: {where} is missing or not a mapping", config=True)
    return value


def _named(document: Mapping[str, Any], kind: str, name: Any) -> Mapping[str, Any]:
    for item in document.get(kind) or []:
        if isinstance(item, Mapping) and item.get("name") == name:
            return _mapping(item.get(kind[:-1]), f"{kind[:-1]} {name!r}")
    raise ApiReadError(f"kubeconfig: no {kind[:-1]} named {name!r}", config=True)


def _parse(text: str) -> Mapping[str, Any]:
    try:
        return _mapping(json.loads(text), "the document")
    except ValueError:
        pass
    import yaml  # only for a hand-written kubeconfig; the DaemonSet writes JSON

    try:
        return _mapping(yaml.safe_load(text), "the document")
    except yaml.YAMLError as exc:
        raise ApiReadError("kubeconfig is neither JSON nor YAML", str(exc), config=True) from None


def _file(base: Path, raw: Any, key: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ApiReadError(f"kubeconfig: {key} must be a file path", config=True)
    path = Path(raw)
    return path if path.is_absolute() else base / path  # client-go: relative to the file


def load_kubeconfig(path: str) -> ApiAccess:
    """The current context's server and credentials; ApiReadError(config=True) if unusable."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            raw = handle.read(_MAX_KUBECONFIG + 1)
    except OSError as exc:
        raise ApiReadError(f"kubeconfig {path} unreadable", str(exc), config=True) from None
    if len(raw) > _MAX_KUBECONFIG:
        raise ApiReadError(f"kubeconfig {path} exceeds {_MAX_KUBECONFIG} bytes", config=True)
    document = _parse(raw.decode("utf-8", errors="replace"))
    name = document.get("current-context")
    if not name:
        contexts = document.get("contexts") or []
        if len(contexts) != 1 or not isinstance(contexts[0], Mapping):
            raise ApiReadError("kubeconfig: no current-context", config=True)
        name = contexts[0].get("name")
    chosen = _named(document, "contexts", name)
    cluster = _named(document, "clusters", chosen.get("cluster"))
    user = _named(document, "users", chosen.get("user")) if chosen.get("user") else {}
    base = file.parent

    server = cluster.get("server")
    url = urllib.parse.urlsplit(server if isinstance(server, str) else "")
    if url.scheme != "https" or not url.hostname:
        raise ApiReadError(f"kubeconfig: server {server!r} is not an https:// URL", config=True)
    if cluster.get("insecure-skip-tls-verify"):
        raise ApiReadError("kubeconfig: insecure-skip-tls-verify is not supported", config=True)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if "certificate-authority-data" in cluster:
            pem = base64.b64decode(str(cluster["certificate-authority-data"]), validate=True)
            context.load_verify_locations(cadata=pem.decode("ascii"))
        elif "certificate-authority" in cluster:
            ca = _file(base, cluster["certificate-authority"], "certificate-authority")
            context.load_verify_locations(cafile=str(ca))
        else:
            context.load_default_certs()
        if "client-certificate" in user or "client-key" in user:
            context.load_cert_chain(
                _file(base, user.get("client-certificate"), "client-certificate"),
                _file(base, user.get("client-key"), "client-key"),
            )
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise ApiReadError("kubeconfig: unusable TLS settings", str(exc), config=True) from None
    if "client-certificate-data" in user or "client-key-data" in user:
        raise ApiReadError(
            "kubeconfig: client-certificate-data is not supported; use a token or files",
            config=True,
        )
    token = user.get("token")
    if token is None and "tokenFile" in user:
        try:
            token = _file(base, user["tokenFile"], "tokenFile").read_text().strip()
        except OSError as exc:
            raise ApiReadError("kubeconfig: tokenFile unreadable", str(exc), config=True) from None
    if token is not None and (not isinstance(token, str) or any(c in token for c in "\r\n")):
        raise ApiReadError("kubeconfig: token must be one line of text", config=True)
    server_name = cluster.get("tls-server-name")
    return ApiAccess(
        host=url.hostname,
        port=url.port or 443,
        path_prefix=url.path.rstrip("/"),
        context=context,
        server_name=server_name if isinstance(server_name, str) and server_name else None,
        token=token or None,
    )


def _status_message(body: bytes) -> str:
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message) if message else body[:200].decode("utf-8", errors="replace")


def read_annotations(
    access: ApiAccess, namespace: str, name: str, *, timeout: float = 10.0
) -> Mapping[str, str]:
    """The pod's annotations; ApiReadError on any failure, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    path = (
        f"{access.path_prefix}/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}"
        f"/pods/{urllib.parse.quote(name, safe='')}"
    )
    headers = {"Accept": _ACCEPT, "User-Agent": "trellis-cni"}
    if access.token is not None:
        headers["Authorization"] = f"Bearer {access.token}"
    where = f"GET https://{access.host}:{access.port}{path}"
    connection = _Connection(access, deadline)
    try:
        connection.request("GET", path, headers=headers)
        if connection.sock is not None:
            connection.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        response = connection.getresponse()
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ANSWER:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiReadError(f"{where}: no complete answer within {timeout:g}s")
            if connection.sock is not None:
                connection.sock.settimeout(left)  # the whole answer, not each read, is bounded
            chunk = response.read(min(65536, MAX_ANSWER + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except TimeoutError:
        raise ApiReadError(f"{where}: no complete answer within {timeout:g}s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ApiReadError(f"{where} failed", f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()
    if size > MAX_ANSWER:
        raise ApiReadError(f"{where}: the answer exceeds {MAX_ANSWER} bytes")
    body = b"".join(chunks)
    if response.status != 200:
        raise ApiReadError(f"{where}: HTTP {response.status}", _status_message(body))
    try:
        metadata = json.loads(body).get("metadata") or {}
        annotations = metadata.get("annotations") or {}
    except (ValueError, AttributeError):
        raise ApiReadError(f"{where}: the answer is not a JSON object") from None
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ApiReadError(f"{where}: metadata.annotations is not a map of strings")
    return annotations


class _Connection(http.client.HTTPSConnection):
    """HTTPS to the API server with the kubeconfig's TLS settings and server name."""

    def __init__(self, access: ApiAccess, deadline: float) -> None:
        super().__init__(access.host, access.port, context=access.context)
        self._tls = access.context
        self._server_name = access.server_name or access.host
        self._deadline = deadline

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def connect(self) -> None:
        # http.client's own connect names the host it dials; a kubeconfig's tls-server-name
        # may name another (an API server reached by IP with a certificate for a name).
        # Connect and handshake share the one deadline of the whole read.
        sock = socket.create_connection((self.host, self.port), self._left())
        try:
            sock.settimeout(self._left())
            self.sock = self._tls.wrap_socket(sock, server_hostname=self._server_name)
        except BaseException:
            sock.close()
            raise
