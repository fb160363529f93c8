"""The sidecar's configuration: YAML and flags in, one frozen `SidecarConfig` out.

Parse, don't validate: every raw value is checked once here and becomes a typed field;
a bad value raises `ConfigError` naming the field (`upstreams[1].endpoints[0]`), which
the CLI prints as one line. Nothing here touches sockets or the clock.

YAML (``--config FILE``; every key optional)::

    mode: explicit                      # explicit | transparent
    workload_api_socket: unix:///run/spiffe/workload/agent.sock  # default: $SPIFFE_ENDPOINT_SOCKET
    svid_dir: /path                     # svid.pem, svid.key, bundle.pem instead of the Workload API
    spiffe_id: spiffe://example.org/x   # which SVID to use when the agent offers several
    admin: 127.0.0.1:15000              # loopback only, or "off"; serves /config too
    health: 0.0.0.0:15020               # default off: /metrics, /healthz, /readyz only
    outbound: 127.0.0.1:15001           # the transparent listener (mode: transparent)
    inbound:
      listen: 0.0.0.0:15008
      targets:                          # the only ports a CONNECT may reach
        8080:
          app: 127.0.0.1:18080          # where the local app listens for target port 8080
          allow:                        # omitted: same trust domain; [] refuses everyone
            - exact: spiffe://example.org/ns/default/sa/client
            - prefix: spiffe://example.org/ns/tools
    upstreams:
      - name: echo
        listen: 127.0.0.1:9001           # the app dials this
        target: echo.default:8080        # the CONNECT :authority (host:port behind the peer)
        endpoints: [127.0.0.1:15008]     # peer sidecars' inbound addresses
        spiffe_ids: [spiffe://example.org/ns/default/sa/echo]   # empty: any of our domain
        protocol: http                   # tcp (default) or http: GET/HEAD/OPTIONS may go 0-RTT
    pool:
      max_streams_per_connection: 100
      idle_timeout: 60s
      keepalive_interval: 20s
      keepalive_timeout: 10s
      connect_timeout: 5s
    drain_timeout: 10s

Inbound forwards to the declared targets and nothing else: a CONNECT for any other port
is answered 404, whoever asks, so a caller of the trust domain cannot use the sidecar as a
proxy to whatever else listens in the pod or on the node (the agent's admin port, the
CA's ports, other sidecars). A target whose app is one of the sidecar's own listeners is
refused here, since a stream into the admin port or an upstream listener would turn the
sidecar against itself. The former `inbound.strict` and `inbound.default_app_host` keys,
which forwarded every undeclared port, are refused with what to write instead.

The admin listener serves `/config` (identity, policy, pools) without authentication, so
it binds a loopback address only; `health` is the listener for the pod's address, with
only what kubelet probes and Prometheus need (as Istio keeps 15000 local and serves
15020 on the pod IP).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import yaml

from ca.spiffeid import SpiffeId, SpiffeIdError
from core.durations import parse_duration
from core.errors import FieldError, yaml_problem
from meshapi.upstreams import parse_upstreams

from .policy import CallerRule, PolicyError, parse_rules
from .probes import AppProbe

__all__ = [
    "Address",
    "ConfigError",
    "InboundConfig",
    "InboundTarget",
    "PoolConfig",
    "SidecarConfig",
    "UpstreamConfig",
    "check_consistency",
    "is_loopback",
    "load_yaml",
    "loopback_admin",
    "parse_address",
    "parse_config",
    "parse_upstreams_flag",
]

Mode = Literal["explicit", "transparent"]
ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"


class ConfigError(ValueError):
    """A configuration value is wrong; `field` is where, the message says why."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.field = where


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InboundTarget:
    port: int
    app: Address
    allow: tuple[CallerRule, ...] | None  # None: the same-trust-domain default


@dataclass(frozen=True, slots=True)
class InboundConfig:
    listen: Address = Address("0.0.0.0", 15008)
    targets: Mapping[int, InboundTarget] = field(default_factory=dict)

    def app_for(self, port: int) -> Address | None:
        """The app behind target ``port``; None for a port nobody declared."""
        target = self.targets.get(port)
        return None if target is None else target.app


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    listen: Address
    target: str  # the CONNECT :authority
    endpoints: tuple[Address, ...]
    spiffe_ids: tuple[SpiffeId, ...]  # empty: any peer of our own trust domain
    # "http": the app speaks HTTP/1.1 to this upstream, so a request safe to replay may
    # ride in TLS 0-RTT on a fresh resumed connection (`sidecar.earlydata`); "tcp": never.
    protocol: str = "tcp"
    # "pooled": app connections are HTTP/2 CONNECT streams on shared TLS connections;
    # "direct": one TLS connection per app connection, its bytes relayed unframed
    # (`sidecar.direct`), spliced in the kernel when kTLS is on.
    mode: str = "pooled"
    # "auto": hand the record layer to the kernel (kTLS) when it has it; "off": never.
    ktls: str = "auto"


UPSTREAM_PROTOCOLS = ("tcp", "http")
UPSTREAM_MODES = ("pooled", "direct")
KTLS_SETTINGS = ("auto", "off")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_streams_per_connection: int = 100
    idle_timeout: float = 60.0
    keepalive_interval: float = 20.0
    keepalive_timeout: float = 10.0
    connect_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    mode: Mode = "explicit"
    workload_api_socket: str | None = None
    svid_dir: str | None = None
    spiffe_id: SpiffeId | None = None
    admin: Address | None = Address("127.0.0.1", 15000)
    health: Address | None = None
    outbound: Address = Address("127.0.0.1", 15001)
    inbound: InboundConfig = field(default_factory=InboundConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    pool: PoolConfig = field(default_factory=PoolConfig)
    drain_timeout: float = 10.0
    policy_file: str | None = None
    pod_labels_file: str | None = None
    # --app-probes: the app's original probes by health-port path (sidecar.probes).
    app_probes: Mapping[str, AppProbe] = field(default_factory=dict)

    def workload_api_target(self) -> str | None:
        """The gRPC target of the Workload API, or None when SVIDs come from files."""
        if self.svid_dir is not None:
            return None
        raw = self.workload_api_socket or os.environ.get(ENDPOINT_ENV)
        if not raw:
            return None
        if raw.startswith("unix://"):
            return "unix:" + raw[len("unix://") :]
        if raw.startswith("unix:"):
            return raw
        return f"unix:{raw}"

    def own_ports(self) -> dict[int, str]:
        """The ports the sidecar itself listens on, each with what it is: never a target."""
        ports: dict[int, str] = {}
        for upstream in self.upstreams:
            ports[upstream.listen.port] = f"upstream {upstream.name!r} listener"
        if self.mode == "transparent":
            ports[self.outbound.port] = "outbound"
        ports[self.inbound.listen.port] = "inbound"
        if self.health is not None:
            ports[self.health.port] = "health"
        if self.admin is not None:
            ports[self.admin.port] = "admin"
        return ports


# --- field parsers --------------------------------------------------------------------


def parse_address(raw: Any, where: str, default_host: str | None = None) -> Address:
    if isinstance(raw, int) and not isinstance(raw, bool) and default_host is not None:
        return Address(default_host, _port(raw, where))
    if not isinstance(raw, str) or not raw:
        raise ConfigError(where, f"expected HOST:PORT, got {_shown(raw)}")
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        if default_host is not None and _is_port_text(raw):
            return Address(default_host, _port(int(raw), where))
        raise ConfigError(where, f"expected HOST:PORT, got {_shown(raw)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(where, f"missing host in {_shown(raw)}")
    if not _is_port_text(port_text):
        raise ConfigError(where, f"port {_shown(port_text)} in {_shown(raw)} is not a port number")
    return Address(host, _port(int(port_text), where))


def _is_port_text(text: str) -> bool:
    # ASCII digits only ("²".isdigit() is true, and int() refuses it), and few enough that
    # int() never meets Python's 4,300-digit limit on a hostile config.
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def _shown(raw: Any) -> str:
    """A value quoted for an error line, cut short so one line stays one line."""
    text = repr(raw)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _port(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(where, f"{value!r} is not a port number (1-65535)")
    return value


def _duration(raw: Any, where: str) -> float:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if raw <= 0:
            raise ConfigError(where, "must be positive")
        return float(raw)
    if not isinstance(raw, str):
        raise ConfigError(where, f"expected a duration such as 10s, got {raw!r}")
    try:
        return parse_duration(raw).total_seconds()
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from exc


def _spiffe_id(raw: Any, where: str) -> SpiffeId:
    if not isinstance(raw, str):
        raise ConfigError(where, f"expected a SPIFFE ID string, got {raw!r}")
    try:
        return SpiffeId(raw)
    except SpiffeIdError as exc:
        raise ConfigError(where, str(exc)) from exc


def _mapping(raw: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, "expected a mapping")
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}" if where else unknown[0], "unknown field")
    return raw


# Keys that once made undeclared ports reachable; each refusal says what to write instead.
_REMOVED_INBOUND = {
    "strict": "removed: only the ports under inbound.targets are reachable, always; "
    "delete this key",
    "default_app_host": "removed: undeclared ports are never forwarded; list each port "
    "under inbound.targets (with app: HOST:PORT for an app on another host)",
}


def _inbound(raw: Any) -> InboundConfig:
    if isinstance(raw, Mapping):
        for key, why in _REMOVED_INBOUND.items():
            if key in raw:
                raise ConfigError(f"inbound.{key}", why)
    section = _mapping(raw, "inbound", {"listen", "targets"})
    base = InboundConfig()
    listen = (
        parse_address(section["listen"], "inbound.listen", "0.0.0.0")
        if "listen" in section
        else base.listen
    )
    host = "127.0.0.1"  # an app named by port alone listens on the pod's loopback
    targets_raw = section.get("targets") or {}
    if not isinstance(targets_raw, Mapping):
        raise ConfigError("inbound.targets", "expected a mapping of target port to settings")
    targets: dict[int, InboundTarget] = {}
    for key, value in targets_raw.items():
        where = f"inbound.targets.{key}"
        try:
            port = _port(int(key), where)
        except (TypeError, ValueError):
            raise ConfigError(where, "the key must be a port number") from None
        entry = _mapping(value, where, {"app", "allow"})
        app = (
            parse_address(entry["app"], f"{where}.app", host)
            if "app" in entry
            else Address(host, port)
        )
        try:
            allow = parse_rules(entry["allow"], f"{where}.allow") if "allow" in entry else None
        except PolicyError as exc:
            raise ConfigError(exc.field, str(exc).split(": ", 1)[-1]) from exc
        targets[port] = InboundTarget(port, app, allow)
    return InboundConfig(listen, targets)


def _upstreams(raw: Any) -> tuple[UpstreamConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("upstreams", "expected a list")
    result = []
    for index, item in enumerate(raw):
        where = f"upstreams[{index}]"
        entry = _mapping(
            item,
            where,
            {"name", "listen", "target", "endpoints", "spiffe_ids", "protocol", "mode", "ktls"},
        )
        for required in ("listen", "target", "endpoints"):
            if required not in entry:
                raise ConfigError(f"{where}.{required}", "required")
        name = entry.get("name", f"upstream-{index}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}.name", "expected a non-empty string")
        listen = parse_address(entry["listen"], f"{where}.listen", "127.0.0.1")
        target = entry["target"]
        parse_address(target, f"{where}.target")
        endpoints_raw = entry["endpoints"]
        if not isinstance(endpoints_raw, list) or not endpoints_raw:
            raise ConfigError(f"{where}.endpoints", "expected a non-empty list of HOST:PORT")
        endpoints = tuple(
            parse_address(e, f"{where}.endpoints[{i}]") for i, e in enumerate(endpoints_raw)
        )
        ids_raw = entry.get("spiffe_ids") or []
        if isinstance(ids_raw, str):
            ids_raw = [ids_raw]
        if not isinstance(ids_raw, list):
            raise ConfigError(f"{where}.spiffe_ids", "expected a list of SPIFFE IDs")
        ids = tuple(_spiffe_id(v, f"{where}.spiffe_ids[{i}]") for i, v in enumerate(ids_raw))
        protocol = entry.get("protocol", "tcp")
        if protocol not in UPSTREAM_PROTOCOLS:
            raise ConfigError(
                f"{where}.protocol", "expected one of: " + ", ".join(UPSTREAM_PROTOCOLS)
            )
        choices = {"mode": UPSTREAM_MODES, "ktls": KTLS_SETTINGS}
        for key, allowed in choices.items():
            if entry.get(key, allowed[0]) not in allowed:
                raise ConfigError(f"{where}.{key}", "expected one of: " + ", ".join(allowed))
        mode = entry.get("mode", "pooled")
        ktls = entry.get("ktls", "auto")
        result.append(UpstreamConfig(name, listen, target, endpoints, ids, protocol, mode, ktls))
    return tuple(result)


def _pool(raw: Any) -> PoolConfig:
    section = _mapping(
        raw,
        "pool",
        {
            "max_streams_per_connection",
            "idle_timeout",
            "keepalive_interval",
            "keepalive_timeout",
            "connect_timeout",
        },
    )
    pool = PoolConfig()
    if "max_streams_per_connection" in section:
        value = section["max_streams_per_connection"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
            raise ConfigError("pool.max_streams_per_connection", "expected an integer 1-10000")
        pool = replace(pool, max_streams_per_connection=value)
    for name in ("idle_timeout", "keepalive_interval", "keepalive_timeout", "connect_timeout"):
        if name in section:
            seconds: Any = _duration(section[name], f"pool.{name}")
            pool = replace(pool, **{name: seconds})
    return pool


_TOP = {
    "mode",
    "workload_api_socket",
    "svid_dir",
    "spiffe_id",
    "admin",
    "health",
    "outbound",
    "inbound",
    "upstreams",
    "pool",
    "drain_timeout",
    "policy_file",
    "pod_labels_file",
}


def parse_config(raw: Any) -> SidecarConfig:
    """A `SidecarConfig` from the YAML document's value (a mapping or None)."""
    top = _mapping(raw, "", _TOP)
    config = SidecarConfig()
    mode = top.get("mode", config.mode)
    if mode not in ("explicit", "transparent"):
        raise ConfigError("mode", f"{mode!r} must be explicit or transparent")
    admin: Address | None = config.admin
    if "admin" in top:
        admin = (
            None
            if top["admin"] in ("off", None)
            else loopback_admin(parse_address(top["admin"], "admin", "127.0.0.1"), "admin")
        )
    health: Address | None = config.health
    if "health" in top:
        health = (
            None
            if top["health"] in ("off", None)
            else parse_address(top["health"], "health", "0.0.0.0")
        )
    strings: dict[str, str | None] = {}
    for name in ("workload_api_socket", "svid_dir", "policy_file", "pod_labels_file"):
        value = top.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(name, "expected a path")
        strings[name] = value
    return SidecarConfig(
        mode=mode,
        workload_api_socket=strings["workload_api_socket"],
        svid_dir=strings["svid_dir"],
        spiffe_id=_spiffe_id(top["spiffe_id"], "spiffe_id") if "spiffe_id" in top else None,
        admin=admin,
        health=health,
        outbound=(
            parse_address(top["outbound"], "outbound", "127.0.0.1")
            if "outbound" in top
            else config.outbound
        ),
        inbound=_inbound(top.get("inbound")),
        upstreams=_upstreams(top.get("upstreams")),
        pool=_pool(top.get("pool")),
        drain_timeout=(
            _duration(top["drain_timeout"], "drain_timeout")
            if "drain_timeout" in top
            else config.drain_timeout
        ),
        policy_file=strings["policy_file"],
        pod_labels_file=strings["pod_labels_file"],
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_admin(address: Address, where: str) -> Address:
    """The admin address, refused unless it is a loopback one: /config tells anyone who
    reaches it the workload's identity, policy and peers, with no authentication."""
    if not is_loopback(address.host):
        raise ConfigError(
            where,
            f"{address} is not a loopback address: the admin port serves /config without "
            "authentication; bind it to 127.0.0.1 and use health (--health-port) for "
            "/metrics and the probes on the pod's address",
        )
    return address


def load_yaml(text: str, source: str = "config") -> SidecarConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, f"not valid YAML: {yaml_problem(exc)}") from exc
    except RecursionError as exc:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(source, "not valid YAML: nested too deeply") from exc
    return parse_config(raw)


def parse_upstreams_flag(text: str, inbound_port: int) -> tuple[UpstreamConfig, ...]:
    """``--upstreams=svc.ns:8080=9001,...`` (the injector's annotation, grammar in
    ``meshapi.upstreams``): the app dials 127.0.0.1:LOCAL; the stream goes to SERVICE's
    sidecar on the inbound port with :authority SERVICE:PORT, and any peer of our trust
    domain is accepted."""
    try:
        entries = parse_upstreams(text, "--upstreams")
    except FieldError as exc:
        raise ConfigError(exc.field, exc.reason) from exc
    return tuple(
        UpstreamConfig(
            entry.service,
            Address("127.0.0.1", entry.local_port),
            str(Address(entry.service, entry.port)),
            (Address(entry.service, inbound_port),),
            (),
        )
        for entry in entries
    )


def check_consistency(config: SidecarConfig) -> SidecarConfig:
    """Cross-field rules: no two listeners on one address, no target on our own ports."""
    seen: dict[tuple[str, int], str] = {}

    def claim(address: Address | None, what: str) -> None:
        if address is None:
            return
        key = (address.host, address.port)
        if key in seen:
            raise ConfigError(what, f"{address} is already used by {seen[key]}")
        seen[key] = what

    claim(config.admin, "admin")
    claim(config.health, "health")
    claim(config.inbound.listen, "inbound.listen")
    if config.mode == "transparent":
        claim(config.outbound, "outbound")
    for index, upstream in enumerate(config.upstreams):
        claim(upstream.listen, f"upstreams[{index}].listen")
    own = config.own_ports()
    for port, target in sorted(config.inbound.targets.items()):
        if (what := own.get(target.app.port)) is not None:
            raise ConfigError(
                f"inbound.targets.{port}",
                f"{target.app} is the sidecar's own {what} port, which is never forwarded",
            )
    return config
