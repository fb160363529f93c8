"""``trellis ech config``: a service's ECHConfigList and its DNS HTTPS record (RFC 9460,
``ech=`` SvcParam) for front ends outside the mesh.

The keys are the CA's (``ca.server.stek``; memory only, rotating with the STEKs): this
asks the running CA's admin socket for their public halves (``/ech``), either at the path
given (``--ca``) or in a ``trellis up`` run directory (``--dir``). The configs are built
as every sidecar builds them (``sidecar.echkeys``), so the published list is the one the
service's sidecars decrypt with. Rotation means the record must be refreshed at least
once per rotation interval, and its TTL be shorter than that (RFC 9849 §10.10.1).
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path
from typing import Any

from core.errors import CliError
from core.output import add_output_argument, emit

__all__ = ["register"]


def register(commands: Any) -> None:
    ech = commands.add_parser("ech", help="Encrypted ClientHello (RFC 9849) tools")
    sub = ech.add_subparsers(dest="ech_command", metavar="ECH_COMMAND", required=True)
    p = sub.add_parser(
        "config",
        help="print a service's ECHConfigList (base64) and DNS HTTPS record",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ca", type=Path, metavar="SOCKET", help="the CA's admin socket (ca serve --admin-socket)"
    )
    source.add_argument("--dir", type=Path, help="a trellis up run directory")
    p.add_argument("--spiffe-id", help="the service whose keys to print (default: every service)")
    p.add_argument("--name", help="the record's owner name (default: the configs' public name)")
    p.add_argument("--ttl", type=_ttl, default=300, help="the record's TTL in seconds")
    p.add_argument("--alpn", default="h2", help="the record's alpn SvcParam")
    add_output_argument(p)
    p.set_defaults(handler=cmd_config)


def _ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 2**31 - 1:  # RFC 2181 §8
        raise argparse.ArgumentTypeError("a TTL is 0 to 2147483647 seconds")
    return value


def _socket(args: argparse.Namespace) -> Path:
    if args.ca is not None:
        return Path(args.ca)
    from trellis.up.mesh import CA_ADMIN_SOCKET

    return Path(args.dir) / CA_ADMIN_SOCKET


def _services(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ca.server.admin_client import AdminClientError, fetch_admin

    try:
        answer = fetch_admin(_socket(args), "/ech")
    except AdminClientError as exc:
        raise CliError(str(exc)) from exc
    services: list[dict[str, Any]] = list(answer.get("services", []))
    if args.spiffe_id is not None:
        services = [s for s in services if s["spiffe_id"] == args.spiffe_id]
        if not services:
            raise CliError(f"the CA has no ECH keys for {args.spiffe_id} (no entry names it)")
    if not services:
        raise CliError("the CA has no ECH keys yet (it makes them for services with entries)")
    return services


def cmd_config(args: argparse.Namespace) -> int:
    from sidecar.echkeys import ech_config_list, https_record
    from sidecar.stek import EchKeyParts

    document = []
    for service in _services(args):
        try:
            parts = [
                EchKeyParts(
                    config_id=int(k["config_id"]),
                    public_key=bytes.fromhex(k["public_key"]),
                    private_key=b"",
                    public_name=str(k["public_name"]),
                    not_before=float(k["not_before"]),
                    not_after=float(k["not_after"]),
                )
                for k in service["keys"]
            ]
            config_list = ech_config_list(parts) if parts else b""
        except (KeyError, TypeError, ValueError) as exc:
            where = service.get("spiffe_id")
            raise CliError(f"the CA's ECH keys for {where} are malformed: {exc}") from exc
        if not parts:
            continue
        owner = args.name or parts[0].public_name
        document.append(
            {
                "spiffe_id": service["spiffe_id"],
                "public_name": parts[0].public_name,
                "config_ids": [p.config_id for p in parts],
                "ech_config_list": base64.b64encode(config_list).decode("ascii"),
                "https_record": https_record(owner, config_list, args.ttl, args.alpn),
                "valid_until": min(p.not_after for p in parts),
            }
        )
    emit(document, args.output, _text)
    return 0


def _text(document: list[dict[str, Any]]) -> list[str]:
    lines = []
    for entry in document:
        lines += [
            entry["spiffe_id"],
            f"  ECHConfigList  {entry['ech_config_list']}",
            f"  HTTPS record   {entry['https_record']}",
        ]
    return lines
