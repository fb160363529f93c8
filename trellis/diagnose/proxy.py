"""``trellis proxy status`` and ``trellis proxy config POD|ADDR``: what sidecars hold, from
their own admin ``/config`` (``sidecar.admin``), as ``istioctl proxy-status`` /
``proxy-config`` show Envoy's.

A TARGET with a port (``127.0.0.1:15000``) is an admin address; a bare name is a pod, found
through the API server (``-n``, ``--kubeconfig``) and reached by a port-forward through it
(``trellis.diagnose.kube``). ``status`` lists every injected pod of a namespace (``-A``: all
namespaces) or the admin addresses given, one row each, and compares each sidecar's trust
bundle with the CA's when the CA's admin socket is known.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.durations import format_duration
from core.errors import CliError
from core.output import add_output_argument, emit
from trellis.diagnose.admin_http import fetch_json, parse_address

__all__ = ["SidecarView", "register", "sidecar_rows"]

CA_SOCKET_ENV = "TRELLIS_CA_ADMIN_SOCKET"


def register(commands: Any) -> None:
    proxy = commands.add_parser("proxy", help="what the sidecars hold (from their admin ports)")
    sub = proxy.add_subparsers(dest="proxy_command", metavar="PROXY_COMMAND", required=True)

    p = sub.add_parser("config", help="one sidecar's identity, listeners, pools and policy")
    p.add_argument(
        "target",
        metavar="POD|ADDR",
        help="a pod name (through the API server) or a sidecar admin address HOST:PORT",
    )
    _add_kube_arguments(p)
    add_output_argument(p)
    p.set_defaults(handler=cmd_config)

    p = sub.add_parser("status", help="one line per sidecar: identity, SVID expiry, bundle")
    p.add_argument(
        "addresses",
        nargs="*",
        metavar="ADDR",
        help="sidecar admin addresses HOST:PORT (default: the injected pods, via the API server)",
    )
    p.add_argument("-A", "--all-namespaces", action="store_true", help="pods of every namespace")
    p.add_argument(
        "--ca-admin-socket",
        type=Path,
        default=_env_path(CA_SOCKET_ENV),
        metavar="PATH",
        help=f"compare bundles with this CA's (ca serve --admin-socket; default ${CA_SOCKET_ENV})",
    )
    _add_kube_arguments(p)
    add_output_argument(p)
    p.set_defaults(handler=cmd_status)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _add_kube_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", default="default", help="the pods' namespace")
    p.add_argument(
        "--kubeconfig", type=Path, help="default: $KUBECONFIG, ~/.kube/config, in-cluster"
    )
    p.add_argument(
        "--via",
        choices=("portforward", "pod-ip"),
        default="portforward",
        help="reach a pod's admin port by a port-forward through the API server (the"
        " default: it binds the pod's loopback) or at the pod's IP",
    )


# -- fetching ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SidecarView:
    """One sidecar's ``/config`` (or why it could not be read), and what it is called."""

    name: str
    config: dict[str, Any] | None
    error: str | None = None


def _is_address(target: str) -> bool:
    try:
        parse_address(target)
    except ValueError:
        return False
    return True


def _pod_fetcher(args: argparse.Namespace) -> Callable[[Any, Any], dict[str, Any]]:
    from trellis.diagnose.kube import fetch_via_portforward

    def fetch(api: Any, target: Any) -> dict[str, Any]:
        if args.via == "pod-ip":
            if not target.pod_ip:
                raise CliError(f"pod {target} has no IP yet (not running?)")
            return fetch_json(target.pod_ip, target.admin_port, "/config")
        return fetch_via_portforward(api, target, "/config")

    return fetch


def fetch_target(args: argparse.Namespace, target: str) -> SidecarView:
    if _is_address(target):
        host, port = parse_address(target)
        return SidecarView(target, fetch_json(host, port, "/config"))
    from trellis.diagnose.kube import api_client, resolve_pod

    api = api_client(args.kubeconfig)
    pod = resolve_pod(api, args.namespace, target)
    return SidecarView(str(pod), _pod_fetcher(args)(api, pod))


def _views(args: argparse.Namespace) -> list[SidecarView]:
    views: list[SidecarView] = []
    if args.addresses:
        for address in args.addresses:
            try:
                host, port = parse_address(address)
            except ValueError as exc:
                raise CliError(str(exc)) from exc
            try:
                views.append(SidecarView(address, fetch_json(host, port, "/config")))
            except CliError as exc:
                views.append(SidecarView(address, None, str(exc)))
        return views
    from trellis.diagnose.kube import api_client, injected_pods

    api = api_client(args.kubeconfig)
    fetch = _pod_fetcher(args)
    for pod in injected_pods(api, None if args.all_namespaces else args.namespace):
        try:
            views.append(SidecarView(str(pod), fetch(api, pod)))
        except CliError as exc:
            views.append(SidecarView(str(pod), None, str(exc)))
    return views


# -- rendering -----------------------------------------------------------------------------


def _left(iso: str | None, now: dt.datetime) -> str:
    if not iso:
        return "no SVID"
    remaining = round((dt.datetime.fromisoformat(iso) - now).total_seconds())
    return format_duration(remaining) if remaining > 0 else "EXPIRED"


def _root_serials(config: dict[str, Any]) -> set[str]:
    bundles = (config.get("identity") or {}).get("bundles") or {}
    return {serial for serials in bundles.values() for serial in serials}


def _bundle_state(config: dict[str, Any], ca_roots: set[str] | None) -> str:
    if ca_roots is None:
        return "-"
    return "in sync" if _root_serials(config) == ca_roots else "STALE"


def sidecar_rows(
    views: list[SidecarView], ca_roots: set[str] | None, now: dt.datetime
) -> list[dict[str, Any]]:
    """The status document: one row per sidecar (``error`` set when it did not answer)."""
    rows: list[dict[str, Any]] = []
    for view in views:
        if view.config is None:
            rows.append({"name": view.name, "error": view.error})
            continue
        identity = view.config.get("identity") or {}
        pools = view.config.get("pools") or []
        rows.append(
            {
                "name": view.name,
                "spiffe_id": identity.get("spiffe_id"),
                "svid_not_after": identity.get("not_after"),
                "svid_expires_in": _left(identity.get("not_after"), now),
                "ready": view.config.get("ready"),
                "pools": len(pools),
                "connections": sum(len(p.get("connections") or []) for p in pools),
                "bundle": _bundle_state(view.config, ca_roots),
            }
        )
    return rows


def _table(rows: list[list[str]]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()


def _status_text(document: dict[str, Any]) -> Iterator[str]:
    rows = document["sidecars"]
    if not rows:
        yield "no sidecars found"
        return
    table = [["NAME", "SPIFFE ID", "SVID EXPIRES IN", "READY", "POOLS", "CONNS", "BUNDLE"]]
    for row in rows:
        if "error" in row:
            table.append([row["name"], f"UNREACHABLE: {row['error']}", "", "", "", "", ""])
            continue
        table.append(
            [
                row["name"],
                row["spiffe_id"] or "-",
                row["svid_expires_in"],
                str(row["ready"]),
                str(row["pools"]),
                str(row["connections"]),
                row["bundle"],
            ]
        )
    yield from _table(table)


def _rules(policy: dict[str, Any]) -> Iterator[str]:
    # Where each port's rules come from (AccessPolicy names, or the sidecar config's key),
    # when the sidecar says: what an operator edits to change them.
    sources = policy.get("sources") or {}
    for port, rules in (policy.get("ports") or {}).items():
        named = f" (from {', '.join(sources[port])})" if sources.get(port) else ""
        yield f"port {port}: " + (", ".join(rules) or "deny all") + named
    any_port = policy.get("any_port")
    if any_port is not None:
        names = policy.get("any_port_sources") or []
        named = f" (from {', '.join(names)})" if names else ""
        yield "any port: " + (", ".join(any_port) or "deny all") + named


def _config_text(document: dict[str, Any]) -> Iterator[str]:
    now = dt.datetime.now(dt.UTC)
    config = document["config"]
    identity = config.get("identity") or {}
    yield f"sidecar      {document['name']} (mode {config.get('mode')}, {config.get('ready')})"
    yield (
        f"identity     {identity.get('spiffe_id') or '-'} (serial {identity.get('serial')},"
        f" SVID expires in {_left(identity.get('not_after'), now)})"
    )
    for td, serials in (identity.get("bundles") or {}).items():
        yield f"bundle       {td}: roots {', '.join(serials)}"
    listeners = config.get("listeners") or {}
    for name in ("inbound", "outbound", "admin", "health"):
        if listeners.get(name):
            yield f"listener     {name} {listeners[name]}"
    for upstream in config.get("upstreams") or []:
        yield (
            f"upstream     {upstream['name']} {upstream['listen']} -> "
            f"{', '.join(upstream['endpoints'])} as {', '.join(upstream['spiffe_ids'])}"
        )
    inbound = config.get("inbound") or {}
    for port, app in (inbound.get("targets") or {}).items():
        yield f"inbound      port {port} -> {app}"
    policy = inbound.get("policy") or {}
    lines = list(_rules(policy))
    if not lines:
        yield "policy       no rule: callers of the sidecar's own trust domain are admitted"
    for line in lines:
        yield f"policy       {line}"
    for pool in config.get("pools") or []:
        connections = pool.get("connections") or []
        streams = sum(c.get("streams", 0) for c in connections)
        error = f", last error: {pool['last_error']}" if pool.get("last_error") else ""
        yield (
            f"pool         {pool['endpoint']} as {', '.join(pool.get('spiffe_ids') or [])}:"
            f" {len(connections)} connection(s), {streams} stream(s),"
            f" {pool.get('dials', 0)} dial(s){error}"
        )
    workload_api = config.get("workload_api") or {}
    last_error = workload_api.get("last_error")
    yield f"workload api {workload_api.get('target')}" + (
        f" (last error: {last_error})" if last_error else ""
    )


# -- commands ------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    view = fetch_target(args, args.target)
    emit({"name": view.name, "config": view.config}, args.output, _config_text)
    return 0


def _ca_roots(path: Path | None) -> set[str] | None:
    if path is None:
        return None
    from ca.server.admin_client import AdminClientError, fetch_admin

    try:
        status = fetch_admin(path, "/status")
    except AdminClientError as exc:
        raise CliError(str(exc)) from exc
    return {root["serial"] for root in status["bundle"]["roots"]}


def cmd_status(args: argparse.Namespace) -> int:
    ca_roots = _ca_roots(args.ca_admin_socket)
    rows = sidecar_rows(_views(args), ca_roots, dt.datetime.now(dt.UTC))
    emit({"sidecars": rows}, args.output, _status_text)
    unhealthy = any("error" in r or r["svid_expires_in"] in ("EXPIRED", "no SVID") for r in rows)
    return 1 if unhealthy else 0
