"""``trellis ca entries list`` and ``trellis ca agents list``: what a running CA server holds,
read from its admin socket (``ca serve --admin-socket PATH``), as ``spire-server entry show``
and ``agent list`` do. ``-o json|yaml`` prints the server's own document."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.durations import format_duration
from core.errors import CliError
from core.output import add_output_argument, emit

__all__ = ["SOCKET_ENV", "add_socket_argument", "register"]

SOCKET_ENV = "TRELLIS_CA_ADMIN_SOCKET"


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(SOCKET_ENV)
    parser.add_argument(
        "--socket",
        type=Path,
        default=Path(default) if default else None,
        required=default is None,
        metavar="PATH",
        help=f"the CA server's admin socket (ca serve --admin-socket; default ${SOCKET_ENV})",
    )


def register(ca_commands: Any) -> None:
    """Add ``entries list`` and ``agents list`` to the ``trellis ca`` subcommands."""
    for name, what, handler in (
        ("entries", "registration entries in force", cmd_entries_list),
        ("agents", "agents holding an unexpired SVID", cmd_agents_list),
    ):
        group = ca_commands.add_parser(name, help=f"{what} on a running CA server")
        sub = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
        p = sub.add_parser("list", help=f"list the {what}")
        add_socket_argument(p)
        add_output_argument(p)
        p.set_defaults(handler=handler)


def _fetch(path: Path, resource: str) -> dict[str, Any]:
    from ca.server.admin_client import AdminClientError, fetch_admin

    try:
        return fetch_admin(path, resource)
    except AdminClientError as exc:
        raise CliError(str(exc)) from exc


def _table(rows: list[list[str]]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def _entries_text(document: dict[str, Any]) -> Iterator[str]:
    entries = document["entries"]
    if not entries:
        yield "no registration entries"
        return
    rows = [["ID", "SPIFFE ID", "SELECTORS", "NODES", "TTL"]]
    for e in entries:
        rows.append(
            [
                e["id"],
                e["spiffe_id"],
                ",".join(e["selectors"]),
                ",".join(e.get("nodes", [])) or "-",
                e["ttl"],
            ]
        )
    yield from _table(rows)


def _left(iso: str, now: dt.datetime) -> str:
    remaining = round((dt.datetime.fromisoformat(iso) - now).total_seconds())
    return format_duration(remaining) if remaining > 0 else "expired"


def _agents_text(document: dict[str, Any]) -> Iterator[str]:
    agents = document["agents"]
    now = dt.datetime.now(dt.UTC)
    if not agents:
        yield "no agent holds an unexpired SVID from this server"
    else:
        rows = [["NODE", "SPIFFE ID", "ATTESTED BY", "SVID EXPIRES IN", "BANNED"]]
        for a in agents:
            rows.append(
                [
                    a["node"],
                    a["spiffe_id"],
                    a["attestation"] or "renewal",
                    _left(a["expires_at"], now),
                    "yes" if a["banned"] else "no",
                ]
            )
        yield from _table(rows)
    listed = {a["node"] for a in agents}
    for node in document["banned"]:
        if node not in listed:
            yield f"banned, no valid SVID: {node}"


def cmd_entries_list(args: argparse.Namespace) -> int:
    emit(_fetch(args.socket, "/entries"), args.output, _entries_text)
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    emit(_fetch(args.socket, "/agents"), args.output, _agents_text)
    return 0
