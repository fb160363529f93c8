"""Rings, identities and pairs for the resumption and 0-RTT tests.

Every time is a Unix timestamp passed in as the engine's `now`: the injected clock the
ticket-age window and the STEK ring are checked against.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from functools import cache

from sidecar.tls import ClientConnection, HandshakeComplete, ServerConnection, TLSConfig
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
