"""Rings, identities and pairs for the resumption and 0-RTT tests.

Every time is a Unix timestamp passed in as the engine's `now`: the injected clock the
ticket-age window and the STEK ring are checked against.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

from sidecar.tls import (
    ApplicationData,
    ClientConnection,
    Event,
    HandshakeComplete,
    ServerConnection,
    TLSConfig,
    TLSError,
)
from sidecar.tls.replay import ReplayCache
from sidecar.tls.tickets import Stek, StekRing
from sidecar.tls.ticketstore import TicketStore

from .helpers import pump
from .pki import CLIENT_ID, NOW, SERVER_ID, Identity, authority, client_config, server_config

T0 = NOW.timestamp()
HOUR = 3600.0
ENDPOINT = "127.0.0.1:15008"


def stek(number: int, start: float = T0) -> Stek:
    """The STEK that becomes active `number` hours after `start` (valid 26 hours)."""
    seed = number.to_bytes(4, "big", signed=True)
    not_before = start + number * HOUR
    return Stek(
        key_id=hashlib.sha256(b"id" + seed).digest()[:16],
        key=hashlib.sha256(b"key" + seed).digest(),
        not_before=not_before,
        not_after=not_before + 26 * HOUR,
    )


def ring_at(hour: int, ring: StekRing | None = None) -> StekRing:
    """A ring after hourly rotation up to `hour`: that hour's key active, 24 previous."""
    ring = ring or StekRing()
    previous = [stek(n) for n in range(max(0, hour - 24), hour)]
    ring.install(stek(hour), previous, stek(hour + 1))
    return ring


@cache
def long_lived(role: str) -> Identity:
    """A leaf valid for two days: long enough for tickets a day old."""
    return authority().leaf(
        SERVER_ID if role == "server" else CLIENT_ID,
        not_before=NOW - dt.timedelta(hours=1),
        not_after=NOW + dt.timedelta(days=2),
    )


@dataclass
class Mesh:
    """One service's replicas (sharing `ring`) and one client with a ticket store."""

    ring: StekRing = field(default_factory=lambda: ring_at(0))
    store: TicketStore = field(default_factory=TicketStore)
    caches: dict[bytes, ReplayCache] = field(default_factory=dict)

    def server(self, replica: bytes = b"replica-a", **overrides: object) -> TLSConfig:
        fields: dict[str, object] = dict(
            rng=os.urandom,  # tickets' AES-GCM nonces must never repeat under one STEK
            ticket_ring=self.ring,
            replica_id=replica,
            max_early_data=16384,
            replay_cache=self.caches.setdefault(replica, ReplayCache()),
        )
        fields.update(overrides)
        return server_config(long_lived("server"), **fields)

    def client(self, **overrides: object) -> TLSConfig:
        fields: dict[str, object] = dict(rng=os.urandom, ticket_store=self.store)
        fields.update(overrides)
        return client_config(long_lived("client"), **fields)


def connect(
    client_cfg: TLSConfig,
    server_cfg: TLSConfig,
    now: float,
    early_data: bytes = b"",
    replay_safe: bool = False,
) -> tuple[ClientConnection, ServerConnection]:
    client = ClientConnection(
        client_cfg,
        server_name="x.example.org",
        now=now,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
        early_data=early_data,
        replay_safe=replay_safe,
    )
    server = ServerConnection(server_cfg, now=now)
    pump(client, server)
    return client, server


def completed(events: list[object]) -> HandshakeComplete:
    (done,) = [e for e in events if isinstance(e, HandshakeComplete)]
    return done


# --- over a real loopback socket ------------------------------------------------------


@dataclass
class Served:
    """What the server engine saw on one accepted connection."""

    events: list[Event] = field(default_factory=list)
    error: TLSError | None = None

    @property
    def early_data(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, ApplicationData) and e.early]

    @property
    def data(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, ApplicationData) and not e.early]


@contextlib.contextmanager
def serving(config: TLSConfig, now: float) -> Iterator[tuple[int, Served]]:
    """A loopback TCP listener whose one connection is run by a ServerConnection (in a
    thread, at the injected time `now`); the context exit waits for it to end."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    served = Served()

    def run() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        server = ServerConnection(config, now=now)
        with conn:
            for _ in range(64):  # bounded: a handshake and a few records
                data = conn.recv(65536)
                try:
                    server.receive_data(data)
                except TLSError as exc:
                    served.error = exc
                served.events.extend(server.events())
                out = server.data_to_send()
                if out:
                    conn.sendall(out)
                if not data or served.error is not None:
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], served
    finally:
        thread.join(15)
        listener.close()
        assert not thread.is_alive(), "the server thread did not end"


def run_client(client: ClientConnection, port: int, first_flight: bytes | None = None) -> None:
    """Drive `client` over a socket to `port` until its handshake completes, then close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(first_flight if first_flight is not None else client.data_to_send())
        for _ in range(16):
            data = sock.recv(65536)
            if not data:
                break
            client.receive_data(data)
            sock.sendall(client.data_to_send())
            if client.handshake_complete:
                client.close()
                sock.sendall(client.data_to_send())
                break
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):  # the server's tickets, then its EOF
            pass


def replay(port: int, captured: bytes) -> bytes:
    """An attacker: send captured bytes, read the server's first answer, hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(captured)
        answer = sock.recv(65536)
        sock.shutdown(socket.SHUT_WR)
        return answer
