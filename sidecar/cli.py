"""``trellis sidecar`` and ``trellis sidecar iptables`` (see the package docstring)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.endpoints import EndpointError, parse_unix_socket
from core.errors import CliError
from core.eventloop import install_uvloop
from core.listeners import ensure_bindable
from core.logs import add_logging_arguments, configure_logging

if TYPE_CHECKING:
    from meshapi.registry import Network

from core.cliargs import seconds as _seconds

from .config import (
    Address,
    ConfigError,
    InboundTarget,
    SidecarConfig,
    check_consistency,
    load_yaml,
    parse_address,
    parse_upstreams_flag,
)

__all__ = ["build_config", "register"]


def _port_or_off(text: str) -> int:
    """A port, or 0 for "off"."""
    if text == "off":
        return 0
    return _port(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def _socket(text: str) -> str:
    try:
        return str(parse_unix_socket(text))
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _ports(text: str) -> list[int]:
    return [_port(p.strip()) for p in text.split(",") if p.strip()]


def _ip_ranges(text: str) -> tuple[Network, ...] | None:
    from meshapi.registry import parse_ip_ranges

    try:
        return parse_ip_ranges(text, "ranges")
    except ValueError as exc:  # FieldError
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(commands: Any) -> None:
    p = commands.add_parser(
        "sidecar",
        help="run the data-plane sidecar (mTLS, HTTP/2 CONNECT pools, SPIFFE authorisation)",
        description="Terminate and originate mutual TLS for the local app: inbound CONNECT "
        "streams are authorised by SPIFFE ID; outbound app connections are pooled onto few "
        "TLS connections. See `python -m pydoc sidecar` for the configuration reference.",
    )
    p.add_argument("--config", type=Path, help="YAML configuration file")
    p.add_argument(
        "--mode",
        choices=("explicit", "transparent"),
        help="explicit upstreams only, or also intercept redirected traffic (default explicit)",
    )
    p.add_argument("--inbound-port", type=_port, help="mTLS listener port (default 15008)")
    p.add_argument("--outbound-port", type=_port, help="transparent listener port (default 15001)")
    p.add_argument(
        "--admin-port",
        type=_port_or_off,
        help="admin port on 127.0.0.1 (/config and the rest), or off (default 15000)",
    )
    p.add_argument(
        "--health-port",
        type=_port_or_off,
        help="port on --listen-host for /metrics, /healthz and /readyz only, or off "
        "(default off; the injector uses 15020)",
    )
    p.add_argument(
        "--listen-host", help="host for the inbound and health listeners (default 0.0.0.0)"
    )
    p.add_argument(
        "--app-ports",
        type=_ports,
        help="PORT,... the app serves (at the pod address a caller dialled, else 127.0.0.1), "
        "reachable through the mesh; a CONNECT "
        "for any port neither here nor in inbound.targets is refused (404)",
    )
    p.add_argument(
        "--app-probes",
        help="JSON {CONTAINER/livez|readyz|startupz: probe}: the app's original probes, "
        "served as /app-health/CONTAINER/KIND on the health port (written by the injector)",
    )
    p.add_argument("--policy", help="the operator's policy.json (SidecarPolicy document)")
    p.add_argument("--pod-labels", help="downward-API labels file the policy selectors match")
    p.add_argument("--upstreams", help="SERVICE:PORT=LOCAL_PORT,... explicit upstreams")
    p.add_argument("--svid-dir", help="svid.pem/svid.key/bundle.pem instead of the Workload API")
    p.add_argument(
        "--workload-api-socket",
        type=_socket,
        metavar="PATH|unix:///PATH",
        help="Workload API socket (default $SPIFFE_ENDPOINT_SOCKET)",
    )
    p.add_argument("--spiffe-id", help="which of the agent's SVIDs to use (default: the first)")
    p.add_argument(
        "--drain-timeout", type=_seconds, help="how long streams may finish after SIGTERM"
    )
    add_logging_arguments(p, default_level="warning")
    p.add_argument(
        "--access-log",
        choices=("on", "off"),
        default="on",
        help="one INFO line per stream (peer, port, bytes, duration, outcome, policy rule); "
        "off keeps only refused streams, which are logged at WARNING (default on)",
    )
    p.set_defaults(handler=cmd_sidecar)
    sub = p.add_subparsers(dest="sidecar_command", metavar="SUBCOMMAND")
    ipt = sub.add_parser(
        "iptables",
        help="install the transparent-mode redirect (needs NET_ADMIN; run once per netns)",
    )
    ipt.add_argument("--proxy-uid", type=int, required=True, help="the sidecar's UID (exempt)")
    ipt.add_argument(
        "--outbound-port",
        dest="ipt_outbound_port",
        type=_port,
        default=15001,
        help="where outbound traffic is redirected (the sidecar's outbound listener)",
    )
    ipt.add_argument(
        "--inbound-port",
        dest="ipt_inbound_port",
        type=_port,
        default=15008,
        help="where inbound traffic is redirected (the sidecar's mTLS listener)",
    )
    ipt.add_argument(
        "--exclude-inbound-ports",
        type=_ports,
        default=[],
        help="PORT,... of the pod reached directly, never through the sidecar",
    )
    ipt.add_argument(
        "--exclude-outbound-ports",
        type=_ports,
        default=[],
        help="destination PORT,... whose traffic never reaches the sidecar",
    )
    ipt.add_argument(
        "--exclude-outbound-ip-ranges",
        type=_ip_ranges,
        default=(),
        help="CIDRs whose traffic never reaches the sidecar (comma-separated)",
    )
    ipt.add_argument(
        "--include-outbound-ip-ranges",
        type=_ip_ranges,
        default=None,
        help="redirect only these CIDRs (comma-separated; * = every address, the default)",
    )
    ipt.add_argument(
        "--no-inbound-capture",
        action="store_true",
        help="redirect only outbound traffic (leave inbound ports alone)",
    )
    ipt.add_argument(
        "--ipv6",
        choices=("auto", "on", "off"),
        default="auto",
        help="install the same rules with ip6tables: auto (the default) when it is installed, "
        "warning otherwise; on fails without it; off leaves IPv6 uncaptured",
    )
    ipt.add_argument("--dry-run", action="store_true", help="print the iptables commands only")
    ipt.set_defaults(handler=cmd_iptables)


def build_config(args: argparse.Namespace) -> SidecarConfig:
    """YAML (if any) with the flags on top; raises ConfigError naming the field."""
    if args.config is not None:
        try:
            text = args.config.read_text()
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {args.config}: {exc.strerror}") from exc
        config = load_yaml(text, str(args.config))
    else:
        config = SidecarConfig()
    changes: dict[str, Any] = {}
    inbound = config.inbound
    if args.mode is not None:
        changes["mode"] = args.mode
    host = args.listen_host
    if host is not None:
        parse_address(f"{host}:1", "--listen-host")
        inbound = dataclasses.replace(inbound, listen=Address(host, inbound.listen.port))
        if config.health is not None:
            changes["health"] = Address(host, config.health.port)
    if args.inbound_port is not None:
        inbound = dataclasses.replace(
            inbound, listen=Address(inbound.listen.host, args.inbound_port)
        )
    changes["inbound"] = inbound
    if args.outbound_port is not None:
        changes["outbound"] = Address(config.outbound.host, args.outbound_port)
    if args.admin_port == 0:
        changes["admin"] = None
    elif args.admin_port is not None:
        # Never --listen-host: the admin port stays on loopback (see sidecar.admin).
        admin_host = config.admin.host if config.admin else "127.0.0.1"
        changes["admin"] = Address(admin_host, args.admin_port)
    if args.health_port == 0:
        changes["health"] = None
    elif args.health_port is not None:
        health_host = host or (config.health.host if config.health else "0.0.0.0")
        changes["health"] = Address(health_host, args.health_port)
    if args.policy is not None:
        changes["policy_file"] = args.policy
    if args.pod_labels is not None:
        changes["pod_labels_file"] = args.pod_labels
    if args.upstreams is not None:
        changes["upstreams"] = config.upstreams + parse_upstreams_flag(
            args.upstreams, inbound.listen.port
        )
    if args.svid_dir is not None:
        changes["svid_dir"] = args.svid_dir
    if args.workload_api_socket is not None:
        changes["workload_api_socket"] = args.workload_api_socket
    if args.spiffe_id is not None:
        from ca.spiffeid import SpiffeId, SpiffeIdError

        try:
            changes["spiffe_id"] = SpiffeId(args.spiffe_id)
        except SpiffeIdError as exc:
            raise ConfigError("--spiffe-id", str(exc)) from exc
    if args.app_probes is not None:
        from .probes import ProbeError, parse_app_probes

        try:
            changes["app_probes"] = parse_app_probes(args.app_probes)
        except ProbeError as exc:
            raise ConfigError("--app-probes", str(exc)) from exc
    if args.drain_timeout is not None:
        if args.drain_timeout < 0:
            raise ConfigError("--drain-timeout", "must not be negative")
        changes["drain_timeout"] = args.drain_timeout
    config = dataclasses.replace(config, **changes)
    if args.app_ports:
        config = _with_app_ports(config, args.app_ports)
    return check_consistency(config)


def _with_app_ports(config: SidecarConfig, ports: list[int]) -> SidecarConfig:
    """``--app-ports``: each port a target on 127.0.0.1 with the policy's rules, unless
    the YAML declares it already (with its own app address or allow list)."""
    own = config.own_ports()
    targets = dict(config.inbound.targets)
    for port in ports:
        if (what := own.get(port)) is not None:
            raise ConfigError(
                "--app-ports", f"{port} is the sidecar's own {what} port, which is never forwarded"
            )
        targets.setdefault(port, InboundTarget(port, Address("127.0.0.1", port), None))
    return dataclasses.replace(config, inbound=dataclasses.replace(config.inbound, targets=targets))


def _listeners(config: SidecarConfig) -> list[tuple[str, Address]]:
    """Every TCP address the sidecar binds, named as the user configured it."""
    found = [("inbound listener", config.inbound.listen)]
    if config.mode == "transparent":
        found.append(("outbound listener", config.outbound))
    if config.admin is not None:
        found.append(("admin port", config.admin))
    if config.health is not None:
        found.append(("health port", config.health))
    found.extend((f"upstream {u.name!r}", u.listen) for u in config.upstreams)
    return found


def cmd_sidecar(args: argparse.Namespace) -> int:
    from .accesslog import ACCESS_LOGGER
    from .dataplane import Sidecar, StartupError

    configure_logging(args)
    # Its own level: per-stream lines show under the default WARNING; off, the logger
    # follows --log-level, so refusals (WARNING) still show.
    logging.getLogger(ACCESS_LOGGER).setLevel(
        logging.INFO if args.access_log == "on" else logging.NOTSET
    )
    try:
        config = build_config(args)
    except ConfigError as exc:
        raise CliError(f"sidecar configuration: {exc}") from exc
    for what, address in _listeners(config):
        ensure_bindable(what, address.host, address.port)
    install_uvloop()

    async def main() -> None:
        sidecar = Sidecar(config)
        await sidecar.run()

    try:
        asyncio.run(main())
    except StartupError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot start the sidecar: {exc.strerror or exc}") from exc
    return 0


def cmd_iptables(args: argparse.Namespace) -> int:
    from . import iptables

    if args.exclude_outbound_ip_ranges is None:
        raise CliError(
            "--exclude-outbound-ip-ranges: * would exclude every address; "
            "leave transparent mode off instead"
        )

    def rules(family: Literal[4, 6]) -> list[list[str]]:
        return iptables.plan(
            proxy_uid=args.proxy_uid,
            outbound_port=args.ipt_outbound_port,
            inbound_port=args.ipt_inbound_port,
            exclude_inbound_ports=args.exclude_inbound_ports,
            exclude_outbound_ports=args.exclude_outbound_ports,
            capture_inbound=not args.no_inbound_capture,
            exclude_outbound_ranges=args.exclude_outbound_ip_ranges,
            include_outbound_ranges=args.include_outbound_ip_ranges,
            family=family,
        )

    binaries = ["iptables"]
    have_ip6tables = shutil.which("ip6tables") is not None
    if args.ipv6 == "on" and not have_ip6tables:
        # Before anything is applied: half a redirect (IPv4 only) is what --ipv6 on forbids.
        raise CliError("ip6tables not found (install the iptables package)")
    if args.ipv6 != "off" and have_ip6tables:
        binaries.append("ip6tables")
    elif args.ipv6 == "auto":
        print(
            "warning: ip6tables is not installed; IPv6 connections will not be captured "
            "(install the iptables package, or pass --ipv6 off to say that is intended)",
            file=sys.stderr,
        )
    if args.dry_run:
        for binary in binaries:
            for rule in rules(6 if binary == "ip6tables" else 4):
                print(f"{binary} " + " ".join(rule))
        return 0
    try:
        for binary in binaries:
            iptables.apply(rules(6 if binary == "ip6tables" else 4), binary)
    except RuntimeError as exc:
        raise CliError(str(exc)) from exc
    return 0
