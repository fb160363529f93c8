"""The sidecar's session-ticket encryption key (STEK) ring, as its agent hands it over.

Every replica of a service must seal tickets under the same key, or a ticket one replica
issued would not open at the next (RFC 8446 §4.6.1: the ticket is opaque to the client,
which offers it to whichever replica it reaches). The CA makes one ring per service
identity; the agent passes it on over ``trellis.workload.v1.SessionKeys/WatchSTEKRing``
(``ca.agent.stek``) only to callers attested for that identity. ``StekRingWatcher``
streams it; ``SessionKeys`` holds it and installs it into the engine's
``sidecar.tls.tickets.StekRing``.

Never a key of our own: a sidecar without a ring from its agent says so once in the log
and seals no tickets (full handshakes only), rather than making up a key no other replica
holds. A sidecar that loses its agent keeps its ring: at the rotation the ring announced
it promotes the ``next`` key it already holds (as every replica does at the same time);
once the ring has no key left to seal with (its active key's interval is over and no
successor came), it stops sealing, says so once, and falls back to full handshakes; old
keys go on opening tickets until their own ``not_after``.

The same messages carry the service's Encrypted ClientHello keys (RFC 9849; current,
next, previous: the server decrypts with all three) and every service's current public
ECH key; ``SessionKeys`` holds both as ``EchKeyParts`` (``sidecar.echkeys`` makes the
engine's ECHConfig and ECHKey of them) and calls ``on_ech`` when they change. A sidecar
that loses its agent keeps the keys it has until their ``not_after``; because the next
key is decrypted with before callers switch to it, neither side needs a clock of its own.

Keys are only in memory: never written, never logged (log lines and ``/config`` name key
ids and ages, which are no secret: a key id is in the clear in every ticket).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ca.api._proto import session_keys_pb2
from ca.spiffeid import SpiffeId, SpiffeIdError
from ca.workload import HEADER_KEY, HEADER_VALUE
from sidecar.tls.tickets import MAX_PREVIOUS, Stek, StekRing

__all__ = [
    "METHOD",
    "EchKeyParts",
    "SessionKeys",
    "StekCollector",
    "StekRingWatcher",
    "StekStats",
]

logger = logging.getLogger("sidecar.stek")

METHOD = "/trellis.workload.v1.SessionKeys/WatchSTEKRing"


@dataclass(frozen=True, slots=True)
class _Held:
    """The ring as received, kept so that the sidecar can rotate on its own schedule."""

    active: Stek
    previous: tuple[Stek, ...]
    next: Stek | None
    rotation_seconds: float


@dataclass(frozen=True, slots=True)
class StekStats:
    """What the metrics and ``/config`` show (no key material)."""

    keys: int
    active_age: float | None
    rotations: int
    decrypt_failures: dict[str, int]
    sealing: bool
    active_key_id: str | None


def _stek(message: session_keys_pb2.STEK) -> Stek:
    return Stek(message.key_id, message.key, message.not_before, message.not_after)


@dataclass(frozen=True, slots=True)
class EchKeyParts:
    """One ECH key as the agent hands it over: the X25519 key pair (``private_key`` b""
    for another service's public key) and the rest of its ECHConfig."""

    config_id: int
    public_key: bytes
    private_key: bytes = field(repr=False)
    public_name: str
    not_before: float
    not_after: float


_ECH_KEY_LENGTH = 32


def _ech_parts(keys: Iterable[session_keys_pb2.ECHKey], private: bool) -> tuple[EchKeyParts, ...]:
    result = []
    for key in keys:
        if key.config_id > 0xFF or len(key.public_key) != _ECH_KEY_LENGTH:
            raise ValueError("an ECH key is a one-byte config id and a 32-byte X25519 key")
        if private and len(key.private_key) != _ECH_KEY_LENGTH:
            raise ValueError("an ECH key of our own service came without its private key")
        result.append(
            EchKeyParts(
                key.config_id,
                key.public_key,
                key.private_key if private else b"",
                key.public_name,
                key.not_before,
                key.not_after,
            )
        )
    return tuple(result)


class SessionKeys:
    """The ring new handshakes use: ``ring(now)``, or None (send no tickets)."""

    def __init__(self, spiffe_id: SpiffeId | None = None) -> None:
        self.spiffe_id = spiffe_id
        self.engine_ring = StekRing()
        self._held: _Held | None = None
        self._sealing = False
        self._said: str | None = None  # the last state logged, so each is said once
        self.updates = 0
        # Told when new handshakes are to start or stop using the ring (the sidecar sets
        # `Identity.ticket_ring` from it); the ring itself is installed in place.
        self.on_ring: Callable[[StekRing | None], None] | None = None
        self._published: StekRing | None = None
        # ECH (module doc): our service's keys, and every service's public ones.
        self.ech_keys: tuple[EchKeyParts, ...] = ()
        self.ech_public: dict[SpiffeId, tuple[EchKeyParts, ...]] = {}
        self.on_ech: Callable[[], None] | None = None

    def _say(self, state: str, message: str, *args: object) -> None:
        if self._said != state:
            self._said = state
            logger.warning(message, *args)

    def no_ring(self) -> None:
        """The agent has none for us (yet): say so, once."""
        if self._held is None:
            self._say(
                "none",
                "no STEK ring from the agent: sending no session tickets (full handshakes only)",
            )

    def receive(self, message: session_keys_pb2.STEKRingResponse, now: float) -> bool:
        """One message from the agent; whether it carried a ring for our identity. A
        malformed ring raises ValueError (the stream is then retried)."""
        chosen = None
        for ring in message.rings:
            if self.spiffe_id is None or SpiffeId(ring.spiffe_id) == self.spiffe_id:
                chosen = ring
                break
        self._receive_ech(message, chosen)
        if chosen is None or not chosen.HasField("active"):
            self.no_ring()
            return False
        previous = tuple(_stek(k) for k in chosen.previous)[:MAX_PREVIOUS]
        held = _Held(
            _stek(chosen.active),
            previous,
            _stek(chosen.next) if chosen.HasField("next") else None,
            chosen.rotation_seconds,
        )
        self._held = held
        self.updates += 1
        self._install(now)
        logger.info(
            "STEK ring for %s: active key %s, %d keys",
            chosen.spiffe_id,
            held.active.key_id.hex(),
            self.engine_ring.keys,
        )
        return True

    def _receive_ech(
        self,
        message: session_keys_pb2.STEKRingResponse,
        ring: session_keys_pb2.STEKRing | None,
    ) -> None:
        own = _ech_parts(ring.ech_keys, private=True) if ring is not None else ()
        public = {
            SpiffeId(c.spiffe_id): _ech_parts(c.keys, private=False) for c in message.ech_public
        }
        if own == self.ech_keys and public == self.ech_public:
            return
        self.ech_keys, self.ech_public = own, public
        if own:
            logger.info(
                "ECH keys for %s: config ids %s",
                ring.spiffe_id if ring is not None else "?",
                ", ".join(str(k.config_id) for k in own),
            )
        if self.on_ech is not None:
            self.on_ech()

    def ech_keys_at(self, now: float) -> tuple[EchKeyParts, ...]:
        """Our service's ECH keys not yet past not_after, current first (a clock a
        little behind the CA's still serves a key that just became current)."""
        return tuple(k for k in self.ech_keys if now < k.not_after)

    def ech_public_for(self, spiffe_id: SpiffeId, now: float) -> tuple[EchKeyParts, ...]:
        """The public ECH keys of the service `spiffe_id` still valid, current first."""
        keys = self.ech_public.get(spiffe_id, ())
        return tuple(k for k in keys if now < k.not_after)

    def _install(self, now: float) -> None:
        held = self._held
        assert held is not None
        # Promote the next key at its time, as the CA and every other replica do: a
        # sidecar cut off from its agent keeps sealing with the key the others use.
        while held.next is not None and held.next.not_before <= now:
            held = _Held(held.next, (held.active, *held.previous), None, held.rotation_seconds)
        previous = tuple(k for k in held.previous if k.not_after > now)[:MAX_PREVIOUS]
        held = _Held(held.active, previous, held.next, held.rotation_seconds)
        self._held = held
        self.engine_ring.install(held.active, held.previous, held.next)
        seal_until = held.active.not_before + held.rotation_seconds
        sealing = held.rotation_seconds > 0 and held.active.not_before <= now < seal_until
        if sealing:
            self._said = None
        elif not sealing and self._sealing:
            self._say(
                "aged",
                "STEK ring aged out (key %s's interval is over and the agent sent no "
                "successor): sending no session tickets until it does",
                held.active.key_id.hex(),
            )
        self._sealing = sealing
        ring = self.engine_ring if sealing else None
        if ring is not self._published:
            self._published = ring
            if self.on_ring is not None:
                self.on_ring(ring)

    def tick(self, now: float) -> None:
        """Rotate on the ring's own schedule (called every second or so)."""
        if self._held is None:
            self.no_ring()
            return
        self._install(now)

    def ring(self, now: float) -> StekRing | None:
        """The ring to seal and open tickets with, or None: no tickets from us now."""
        if self._held is None or not self._sealing:
            return None
        return self.engine_ring

    def stats(self, now: float) -> StekStats:
        held = self._held
        return StekStats(
            keys=self.engine_ring.keys,
            active_age=self.engine_ring.active_age(now),
            rotations=self.engine_ring.rotations,
            decrypt_failures=dict(self.engine_ring.decrypt_failures),
            sealing=self._sealing,
            active_key_id=held.active.key_id.hex() if held is not None else None,
        )

    def describe(self) -> dict[str, object]:
        stats = self.stats(time.time())
        return {
            "keys": stats.keys,
            "active_key_id": stats.active_key_id,
            "active_age_seconds": round(stats.active_age, 1) if stats.active_age else None,
            "sealing_tickets": stats.sealing,
            "rotations": stats.rotations,
            # ECH (RFC 9849): ids only, which travel in the clear in every outer hello.
            "ech_config_ids": [k.config_id for k in self.ech_keys],
            "ech_services": len(self.ech_public),
        }


class StekRingWatcher:
    """Streams our ring from the agent into ``SessionKeys``, forever (capped backoff)."""

    def __init__(
        self,
        target: str,
        keys: SessionKeys,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self.keys = keys
        self.clock = clock
        self.last_error: str | None = None

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    call: Any = channel.unary_stream(
                        METHOD,
                        request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=session_keys_pb2.STEKRingResponse.FromString,
                    )
                    request = session_keys_pb2.WatchSTEKRingRequest(
                        spiffe_id=str(self.keys.spiffe_id) if self.keys.spiffe_id else ""
                    )
                    stream = call(request, metadata=((HEADER_KEY, HEADER_VALUE),))
                    async for message in stream:
                        self.keys.receive(message, self.clock())
                        self.last_error = None
                        delay = 0.2
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, ValueError, SpiffeIdError) as exc:
                # The ring held stays: it ages out on its own schedule (module doc).
                text = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                self.last_error = (text or type(exc).__name__).splitlines()[0]
                self.keys.no_ring()
                logger.info("STEK ring stream: %s (retrying in %.1fs)", self.last_error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class StekCollector:
    """The ring's Prometheus metrics, read from ``SessionKeys`` at scrape time (names are
    the public contract of issue 19; ``decrypt_failures`` are the engine ring's counters)."""

    def __init__(self, keys: SessionKeys, clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # collected only when scraped: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        stats = self.keys.stats(self.clock())
        age = GaugeMetricFamily(
            "trellis_stek_active_key_age_seconds",
            "Seconds since the STEK that seals new tickets became active (absent: no ring).",
        )
        if stats.active_age is not None:
            age.add_metric([], stats.active_age)
        yield age
        yield GaugeMetricFamily(
            "trellis_stek_ring_keys",
            "STEKs the ring holds (active, previous and next).",
            value=stats.keys,
        )
        yield CounterMetricFamily(
            "trellis_stek_rotations",
            "Changes of the active STEK since the sidecar started.",
            value=stats.rotations,
        )
        failures = CounterMetricFamily(
            "trellis_stek_decrypt_failures",
            "Tickets that did not open: unknown_key, expired (key past not_after), corrupt.",
            labels=["reason"],
        )
        for reason in ("unknown_key", "expired", "corrupt"):
            failures.add_metric([reason], stats.decrypt_failures.get(reason, 0))
        yield failures
