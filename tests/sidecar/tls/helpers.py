"""Driving engine pairs in memory."""

from __future__ import annotations

from sidecar.tls import ClientConnection, Connection, Event, ServerConnection, TLSConfig

from .pki import NOW, client_config, server_config


def pump(a: Connection, b: Connection, rounds: int = 20) -> None:
    """Shuttle bytes both ways until neither side has anything to send."""
    for _ in range(rounds):
        ab = a.data_to_send()
        if ab:
            b.receive_data(ab)
        ba = b.data_to_send()
        if ba:
            a.receive_data(ba)
        if not ab and not ba:
            return
    raise AssertionError("pair did not settle")


def drain(conn: Connection) -> list[Event]:
    return list(conn.events())


def connected_pair(
    client_cfg: TLSConfig | None = None,
    server_cfg: TLSConfig | None = None,
    server_name: str | None = "x.example.org",
) -> tuple[ClientConnection, ServerConnection]:
    client = ClientConnection(client_cfg or client_config(), server_name=server_name, now=NOW)
    server = ServerConnection(server_cfg or server_config(), now=NOW)
    pump(client, server)
    return client, server


def feed(conn: Connection, data: bytes, bytewise: bool) -> None:
    """`conn.receive_data(data)` whole, or one byte per call (STYLE's bytewise tier)."""
    if bytewise:
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
    else:
        conn.receive_data(data)
