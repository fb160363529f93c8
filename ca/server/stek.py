"""Session-ticket encryption keys (STEKs), one rotating ring per service identity.

The CA is the one place that makes the secrets a service's replicas share:
every replica of ``spiffe://td/ns/shop/sa/web`` must seal tickets under the same key, or a
ticket issued by one replica would not open at another (RFC 8446 §4.6.1 leaves the ticket
opaque to the client, which may offer it to any replica).

Theory of operation. Per SPIFFE ID that has at least one registration entry, a ring:

* ``active`` seals new tickets from its ``not_before`` for one rotation interval;
* ``next`` is made one interval ahead and published at once, so every replica already
  holds it when the first one starts sealing with it (a replica whose clock runs ahead
  issues tickets the others can open);
* ``previous`` (at most ``MAX_PREVIOUS`` = 24) only open tickets, newest first.

Every key opens tickets until ``not_after`` = its activation + (1 + MAX_PREVIOUS)
intervals: with hourly rotation a ticket sealed 23 hours ago still opens and one sealed 25
hours ago does not. Keys are 32 random bytes from the OS with a random 16-byte id.

Secrets: the keys exist only in this object's memory. Nothing here writes a file or logs
a key (log lines name the SPIFFE ID and the key *id*, which travels in the clear inside
every ticket anyway). A restarted CA therefore starts new rings; agents keep the keys they
hold and merge (``ca.agent.stek``), so tickets sealed before the restart still open.

ECH keys (RFC 9849) ride in the same ring and rotate with its STEKs, on the same plan:
``ech`` holds the current key, the next one (made an interval ahead, so every replica
already decrypts with it when callers switch to it, whichever hears of the rotation
first) and the previous one (a caller that has not heard yet is still accepted). The
current key's public half of every ring, ``public_ech()``, goes to every agent: a caller
seals to the service it calls. The ECHConfig's public_name is the trust domain's name, the
same for every service, so the outer ClientHello says only which mesh a connection is in.

Sans-I/O: the clock and the randomness are passed in; ``StekLeader.tick(now, ids)``
rotates what is due and says whether anything changed, and the gRPC shell streams
``rings_for(ids)`` to agents.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ca.spiffeid import SpiffeId

__all__ = [
    "DEFAULT_ROTATION",
    "KEY_ID_LENGTH",
    "KEY_LENGTH",
    "MAX_PREVIOUS",
    "EchKey",
    "StekKey",
    "StekLeader",
    "StekRingState",
    "StekWatch",
]

log = logging.getLogger("trellis.ca.server.stek")

DEFAULT_ROTATION = dt.timedelta(hours=1)
# As sidecar.tls.tickets: a day of hourly keys opens tickets; older ones get a full handshake.
MAX_PREVIOUS = 24
KEY_ID_LENGTH = 16
KEY_LENGTH = 32  # AES-256-GCM


@dataclass(frozen=True, slots=True)
class StekKey:
    """One STEK. ``key`` is never shown by repr(), so a logged value cannot leak it."""

    key_id: bytes
    key: bytes = field(repr=False)
    not_before: float
    not_after: float


@dataclass(frozen=True, slots=True)
class EchKey:
    """One ECH key pair (DHKEM(X25519, HKDF-SHA256)) and the rest of its ECHConfig.
    ``private_key`` is never shown by repr()."""

    config_id: int
    public_key: bytes
    private_key: bytes = field(repr=False)
    public_name: str
    not_before: float
    not_after: float

    def public(self) -> EchKey:
        """The same key without its private half (what callers of the service get)."""
        return EchKey(
            self.config_id, self.public_key, b"", self.public_name, self.not_before,
            self.not_after,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StekRingState:
    """One identity's ring as it is published (immutable: a stream reads it once)."""

    spiffe_id: SpiffeId
    active: StekKey
    previous: tuple[StekKey, ...]
    next: StekKey
    rotation_seconds: float
    ech: tuple[EchKey, ...] = ()  # current, next, then the previous one (if still valid)


class StekLeader:
    """Makes and rotates the rings of every identity with entries (see the module doc)."""

    def __init__(
        self,
        rotation: dt.timedelta = DEFAULT_ROTATION,
        *,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if rotation <= dt.timedelta(0):
            raise ValueError("the STEK rotation interval must be positive")
        self.interval = rotation.total_seconds()
        self._rng = rng
        self._rings: dict[SpiffeId, StekRingState] = {}
        self.rotations = 0
        # Bumped on every change; streams compare it to what they last sent.
        self.version = 0

    def _key(self, not_before: float) -> StekKey:
        return StekKey(
            key_id=self._rng(KEY_ID_LENGTH),
            key=self._rng(KEY_LENGTH),
            not_before=not_before,
            not_after=not_before + self.interval * (1 + MAX_PREVIOUS),
        )

    def _ech_key(self, spiffe_id: SpiffeId, not_before: float, avoid: set[int]) -> EchKey:
        private = X25519PrivateKey.from_private_bytes(self._rng(32))
        config_id = self._rng(1)[0]
        while config_id in avoid:
            # RFC 9849 §7.1: the server tries the config the id names first; two live
            # configs under one id would cost a second trial decryption each time.
            config_id = (config_id + 1) % 256
        return EchKey(
            config_id=config_id,
            public_key=private.public_key().public_bytes_raw(),
            private_key=private.private_bytes_raw(),
            public_name=spiffe_id.trust_domain.name,
            not_before=not_before,
            # Current for one interval, then previous for one more (next before both).
            not_after=not_before + 2 * self.interval,
        )

    def _new_ring(self, spiffe_id: SpiffeId, now: float) -> StekRingState:
        active = self._key(now)
        current = self._ech_key(spiffe_id, now, set())
        ech = (current, self._ech_key(spiffe_id, now + self.interval, {current.config_id}))
        return StekRingState(
            spiffe_id, active, (), self._key(now + self.interval), self.interval, ech
        )

    def _rotated(self, ring: StekRingState, now: float) -> StekRingState:
        """The ring after every rotation due by ``now`` (several after a long pause)."""
        active, previous, upcoming = ring.active, ring.previous, ring.next
        ech_current, ech_next, ech_previous = ring.ech[0], ring.ech[1], ring.ech[0]
        while upcoming.not_before <= now:
            previous = (active, *previous)
            active = upcoming
            # Scheduled from the old next, not from now: the replicas' keys stay an exact
            # interval apart however late this tick runs.
            upcoming = self._key(active.not_before + self.interval)
            ech_previous, ech_current = ech_current, ech_next
            live = {ech_current.config_id, ech_previous.config_id}
            ech_next = self._ech_key(ring.spiffe_id, upcoming.not_before, live)
            self.rotations += 1
        kept = tuple(k for k in previous if k.not_after > now)[:MAX_PREVIOUS]
        ech: tuple[EchKey, ...] = (ech_current, ech_next)
        if ech_previous is not ech_current and ech_previous.not_after > now:
            ech += (ech_previous,)
        return StekRingState(ring.spiffe_id, active, kept, upcoming, self.interval, ech)

    def tick(self, now: float, spiffe_ids: Iterable[SpiffeId]) -> bool:
        """Rotate what is due, make rings for new identities, forget gone ones; whether
        anything changed (then ``version`` has moved)."""
        wanted = set(spiffe_ids)
        changed = False
        for gone in set(self._rings) - wanted:
            del self._rings[gone]
            log.info("stek-ring-dropped", extra={"fields": {"spiffe_id": str(gone)}})
            changed = True
        for spiffe_id in sorted(wanted, key=str):
            ring = self._rings.get(spiffe_id)
            if ring is None:
                ring, event = self._new_ring(spiffe_id, now), "stek-ring-created"
            elif ring.next.not_before <= now:
                ring, event = self._rotated(ring, now), "stek-rotated"
            else:
                continue
            self._rings[spiffe_id] = ring
            changed = True
            fields = {"spiffe_id": str(spiffe_id), "key_id": ring.active.key_id.hex()}
            log.info(event, extra={"fields": fields})
        if changed:
            self.version += 1
        return changed

    def rings_for(self, spiffe_ids: Iterable[SpiffeId]) -> tuple[StekRingState, ...]:
        """The rings of these identities (those that have one), sorted by SPIFFE ID."""
        wanted = set(spiffe_ids)
        return tuple(self._rings[i] for i in sorted(wanted, key=str) if i in self._rings)

    def public_ech(self) -> tuple[tuple[SpiffeId, tuple[EchKey, ...]], ...]:
        """Every ring's current ECH key without its private half, sorted by SPIFFE ID:
        what callers seal to and DNS publishes."""
        return tuple(
            (spiffe_id, (self._rings[spiffe_id].ech[0].public(),))
            for spiffe_id in sorted(self._rings, key=str)
        )

    def seconds_until_due(self, now: float) -> float | None:
        """How long until the next rotation of any ring (None: no rings)."""
        if not self._rings:
            return None
        return max(0.0, min(r.next.not_before for r in self._rings.values()) - now)


class StekWatch:
    """Wakes the WatchSTEKRings streams when rings or entries change (the asyncio shell
    around ``StekLeader``)."""

    def __init__(self, leader: StekLeader) -> None:
        self.leader = leader
        self.closed = False
        self._changed = asyncio.Event()

    def poke(self) -> None:
        """Something streams must look at again: a rotation, an entry change, a ban."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def close(self) -> None:
        self.closed = True
        self.poke()

    async def changes(self) -> AsyncIterator[None]:
        """Yields at once, then after every poke, until closed."""
        while not self.closed:
            waiter = self._changed
            yield None
            await waiter.wait()
