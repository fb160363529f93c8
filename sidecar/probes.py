"""The app's own probes, run by the sidecar on the kubelet's behalf.

Why: the inbound redirect sends every port but the sidecar's own to the mTLS listener, so a
kubelet's plaintext probe of the app's port would land on TLS and fail. The injector
(``mesh_operator.probes``) rewrites each app probe to an ``httpGet`` of
``/app-health/<container>/<livez|readyz|startupz>`` on the health port (as Istio does on
its 15020) and hands the original probes to the sidecar as ``--app-probes`` JSON:

    {"app/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP",
                                "httpHeaders": [{"name": "X", "value": "y"}]},
                    "timeoutSeconds": 1},
     "app/livez": {"tcpSocket": {"port": 8080}},
     "app/startupz": {"grpc": {"port": 9090, "service": "app"}, "timeoutSeconds": 2}}

Ports are numbers (the injector resolved named ports). The text is parsed once into frozen
values; anything malformed is refused with one line naming the key. Each probe is run the
way the kubelet runs it (k8s.io/kubernetes pkg/probe): HTTP GET where 200-399 passes,
redirects to the same host are followed (at most ten requests) and HTTPS is not verified;
TCP where an accepted connection passes; gRPC where ``grpc.health.v1.Health/Check``
answering SERVING passes; each within ``timeoutSeconds`` (default 1, as in the Pod API).

Where: the kubelet probes the pod's IP, so the probe is sent to the address the kubelet's
probe arrived on (``run_probe_on``, hosts from ``sidecar.appaddress``), and only when
nothing listens there to 127.0.0.1, where the sidecar alone used to send it: an app bound
to its pod IP passes as it does without the mesh (istio/istio#25177), one bound to
127.0.0.1 alone still passes as it did.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

from yarl import URL

__all__ = [
    "KINDS",
    "MAX_PROBES",
    "MAX_TEXT",
    "AppProbe",
    "ProbeError",
    "ProbeResult",
    "parse_app_probes",
    "run_probe",
    "run_probe_on",
]

# The path segment each Pod probe field is served under (Istio's names).
KINDS: Mapping[str, str] = MappingProxyType(
    {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
)
MAX_TEXT = 64 * 1024  # a command-line flag; the injector writes a few hundred bytes per probe
MAX_PROBES = 3 * 64  # three probe kinds for each of a generous number of containers
_MAX_HEADERS = 32
_MAX_BODY = 10 * 1024  # the kubelet reads at most 10 KiB of a probe's answer
_MAX_REDIRECTS = 10  # requests per probe: the kubelet's checker stops at len(via) >= 10

Action = Literal["http", "tcp", "grpc"]


class ProbeError(ValueError):
    """``--app-probes`` is malformed; the message is one line naming where."""


@dataclass(frozen=True, slots=True)
class AppProbe:
    """One original probe: ``action`` on the app's ``port`` within ``timeout`` seconds (the
    host is chosen per run: ``run_probe_on``)."""

    action: Action
    port: int
    timeout: float = 1.0
    path: str = "/"
    https: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    service: str = ""  # the gRPC health service name ("" is the server as a whole)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    ok: bool
    reason: str
    refused: bool = False  # nothing listened on that address: another host may be tried


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ProbeError(f"{where}: must be an object")
    return value


def _string(value: Any, where: str, limit: int = 2048) -> str:
    if not isinstance(value, str) or len(value) > limit or any(c in value for c in "\r\n\0"):
        raise ProbeError(f"{where}: must be a string of at most {limit} characters on one line")
    return value


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ProbeError(f"{where}: must be a port number (1-65535)")
    return value


def _probe(key: str, raw: Any) -> AppProbe:
    body = _object(raw, key)
    timeout: float = 1.0
    if "timeoutSeconds" in body:
        seconds = body["timeoutSeconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
            raise ProbeError(f"{key}.timeoutSeconds: must be a whole number of seconds, at least 1")
        # The Pod API sets no upper bound; an hour is far past any kubelet period.
        timeout = float(min(seconds, 3600))
    actions = [name for name in ("httpGet", "tcpSocket", "grpc") if name in body]
    if len(actions) != 1:
        raise ProbeError(f"{key}: needs exactly one of httpGet, tcpSocket, grpc")
    name = actions[0]
    spec = _object(body[name], f"{key}.{name}")
    port = _port(spec.get("port"), f"{key}.{name}.port")
    if name == "tcpSocket":
        return AppProbe("tcp", port, timeout)
    if name == "grpc":
        service = _string(spec.get("service", ""), f"{key}.grpc.service")
        return AppProbe("grpc", port, timeout, service=service)
    path = _string(spec.get("path", "/"), f"{key}.httpGet.path")
    if not path.startswith("/"):
        path = "/" + path  # the kubelet's URL building does the same
    scheme = spec.get("scheme", "HTTP")
    if scheme not in ("HTTP", "HTTPS"):
        raise ProbeError(f"{key}.httpGet.scheme: must be HTTP or HTTPS")
    raw_headers = spec.get("httpHeaders", [])
    if not isinstance(raw_headers, list) or len(raw_headers) > _MAX_HEADERS:
        raise ProbeError(f"{key}.httpGet.httpHeaders: must be a list of at most {_MAX_HEADERS}")
    headers: list[tuple[str, str]] = []
    for index, entry in enumerate(raw_headers):
        where = f"{key}.httpGet.httpHeaders[{index}]"
        item = _object(entry, where)
        header = _string(item.get("name"), f"{where}.name", 256)
        if not header or any(c in header for c in " :\t"):
            raise ProbeError(f"{where}.name: is not an HTTP header name")
        headers.append((header, _string(item.get("value", ""), f"{where}.value")))
    return AppProbe("http", port, timeout, path, scheme == "HTTPS", tuple(headers))


def parse_app_probes(text: str) -> Mapping[str, AppProbe]:
    """``--app-probes`` JSON → {"/app-health/<container>/<kind>": probe}; raises ProbeError."""
    if len(text) > MAX_TEXT:
        raise ProbeError(f"is {len(text)} characters; at most {MAX_TEXT}")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ProbeError(f"is not JSON ({str(exc).splitlines()[0]})") from None
    entries = _object(document, "the document")
    if len(entries) > MAX_PROBES:
        raise ProbeError(f"names {len(entries)} probes; at most {MAX_PROBES}")
    probes: dict[str, AppProbe] = {}
    kinds = set(KINDS.values())
    for key, raw in entries.items():
        container, _, kind = key.partition("/")
        # RFC 1123 label: what a container name is, so the path needs no escaping.
        if not (
            0 < len(container) <= 63
            and all(c.isascii() and (c.islower() or c.isdigit() or c == "-") for c in container)
            and kind in kinds
        ):
            raise ProbeError(f"{key[:80]!r}: keys are <container>/<livez|readyz|startupz>")
        probes[f"/app-health/{container}/{kind}"] = _probe(key, raw)
    return MappingProxyType(probes)


async def run_probe(probe: AppProbe, host: str = "127.0.0.1") -> ProbeResult:
    """Run ``probe`` against the app as the kubelet would; never raises for the app's faults."""
    try:
        async with asyncio.timeout(probe.timeout):
            if probe.action == "tcp":
                return await _tcp(probe, host)
            if probe.action == "grpc":
                return await _grpc(probe, host)
            return await _http(probe, host)
    except TimeoutError:
        return ProbeResult(False, f"no answer within {probe.timeout:g}s")
    except ConnectionRefusedError as exc:
        return ProbeResult(False, f"{host}:{probe.port}: {exc.strerror or exc}", refused=True)
    except OSError as exc:
        return ProbeResult(False, f"{host}:{probe.port}: {exc.strerror or exc}")


async def run_probe_on(probe: AppProbe, hosts: Sequence[str]) -> ProbeResult:
    """Run ``probe`` against the first of ``hosts`` that does not refuse the connection,
    all of it within the probe's one timeout; the last refusal when every host refuses."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + probe.timeout
    result = ProbeResult(False, "no address to probe", refused=True)
    for host in hosts:
        left = deadline - loop.time()
        if left <= 0:
            return ProbeResult(False, f"no answer within {probe.timeout:g}s")
        result = await run_probe(replace(probe, timeout=left), host)
        if not result.refused:
            return result
    return result


def _authority(host: str, port: int) -> str:
    # RFC 3986 §3.2.2: an IPv6 literal in a URI (and in a gRPC target) is in brackets.
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _tcp(probe: AppProbe, host: str) -> ProbeResult:
    _reader, writer = await asyncio.open_connection(host, probe.port)
    writer.close()
    await writer.wait_closed()
    return ProbeResult(True, f"tcp {host}:{probe.port} accepted")


async def _http(probe: AppProbe, host: str) -> ProbeResult:
    from aiohttp import ClientConnectorError, ClientError, ClientSession, ClientTimeout

    scheme = "https" if probe.https else "http"
    first = URL(f"{scheme}://{_authority(host, probe.port)}{probe.path}", encoded=True)
    # The kubelet's defaults, each replaced by a header of the same name from the probe.
    headers = {"User-Agent": "kube-probe/trellis", "Accept": "*/*"}
    for name, value in probe.headers:
        headers[name] = value
    url = first
    try:
        # One timeout for the whole chain of redirects, as the kubelet's http.Client has.
        async with ClientSession(timeout=ClientTimeout(total=probe.timeout)) as session:
            for hops in range(_MAX_REDIRECTS):
                # ssl=False: the kubelet's HTTPS probe sets InsecureSkipVerify, the app's
                # certificate is not checked. Redirects are followed here, not by aiohttp,
                # to apply the kubelet's rule (see _next_hop).
                async with session.get(
                    url, headers=headers, ssl=False, allow_redirects=False
                ) as response:
                    await response.content.read(_MAX_BODY)
                    status = response.status
                    location = response.headers.get("Location")
                target = _next_hop(first, url, status, location)
                if target is None:
                    break
                if hops == _MAX_REDIRECTS - 1:
                    return ProbeResult(False, f"GET {first}: stopped after 10 redirects")
                url = target
    except (ClientError, ValueError) as exc:
        # Refused on the first request only: a redirect that leads nowhere is the answer.
        refused = (
            url == first
            and isinstance(exc, ClientConnectorError)
            and isinstance(exc.os_error, ConnectionRefusedError)
        )
        reason = f"GET {url}: {type(exc).__name__}: {str(exc)[:200]}"
        return ProbeResult(False, reason, refused=refused)
    # k8s pkg/probe/http: 200 <= status < 400 is success; a 3xx not followed (a redirect
    # to another host) is a success the kubelet reports as a warning event.
    ok = 200 <= status < 400
    where = f"GET {first}" if url == first else f"GET {first} -> {url}"
    if 300 <= status < 400:
        return ProbeResult(ok, f"{where}: HTTP {status}, redirect not followed (another host)")
    return ProbeResult(ok, f"{where}: HTTP {status}")


def _next_hop(first: URL, current: URL, status: int, location: str | None) -> URL | None:
    """Where the kubelet's HTTP client goes next, or None to judge this answer.

    k8s.io/kubernetes pkg/probe/http ``RedirectChecker(followNonLocalRedirects=false)``,
    which the kubelet's prober uses: a redirect to the probe's own host name (any port) is
    followed, at most 10 times ("stopped after 10 redirects" is a failure); one to another
    host ends the chain (``http.ErrUseLastResponse``) and the 3xx itself is the answer. Go's
    client follows 301, 302, 303, 307 and 308 when a Location is given.
    """
    if status not in (301, 302, 303, 307, 308) or not location:
        return None
    target = current.join(URL(location))
    if target.scheme not in ("http", "https") or target.host != first.host:
        return None
    return target


# grpc.health.v1 messages, encoded by hand: HealthCheckRequest{string service = 1} and
# HealthCheckResponse{ServingStatus status = 1}, SERVING = 1.
def _encode_request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    return b"\x0a" + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _decode_status(data: bytes) -> int:
    """The ``status`` field of a HealthCheckResponse (0, UNKNOWN, when absent)."""
    status = 0
    index = 0
    while index < len(data):
        tag = data[index]
        index += 1
        if tag == 0x08:  # field 1, varint
            value, shift = 0, 0
            while index < len(data):
                byte = data[index]
                index += 1
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            status = value
        else:
            break  # unknown fields are not expected from a health server; stop reading
    return status


_STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


async def _grpc(probe: AppProbe, host: str) -> ProbeResult:
    import grpc
    from grpc import aio

    target = _authority(host, probe.port)
    async with aio.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=_encode_request,
            response_deserializer=_decode_status,
        )
        try:
            status: int = await check(probe.service, timeout=probe.timeout)
        except aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            details = exc.details() or ""
            # gRPC reports a refused connection as UNAVAILABLE with the socket's error text.
            refused = code == grpc.StatusCode.UNAVAILABLE and "refused" in details.lower()
            return ProbeResult(False, f"grpc {target}: {code.name}: {details}", refused=refused)
    name = _STATUS_NAMES.get(status, str(status))
    return ProbeResult(status == 1, f"grpc {target} service {probe.service!r}: {name}")
