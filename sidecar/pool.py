"""Outbound connection pools: one per (endpoint, expected SPIFFE IDs).

The decisions are pure functions of a snapshot and `now` (`choose`, `idle`); `Pool` is the
asyncio shell that dials, waits and applies them. Each app connection becomes one CONNECT
stream on a pooled `Session`; a session takes at most `max_streams_per_connection`
streams, and a new one is dialled only when every live one is saturated and the
connections already being dialled cannot absorb the waiting streams either. So N app
connections cost ceil(N / max_streams) handshakes, not N.

The channel under each session comes from `channel_factory(now)` -- the Trellis engine
by default; kTLS channels plug in there.

Resumption and 0-RTT (engine channels only): each dial offers a ticket from the sidecar's
ticket store (`Identity.tickets`), filed per (endpoint, expected SPIFFE ID): a ticket
vouches for one server identity, is used once (RFC 8446 §C.4) and is dropped when the
trust bundles change (the engine compares `trust_generation`). When the stream that
makes a pool dial holds a request its caller judged replay-safe (`replay_safe`, in
practice `sidecar.earlydata` for upstreams declared HTTP), that stream rides in the new
connection's first flight: 0-RTT if the ticket allows it, else the first 1-RTT bytes.

A pooled session never outlives its credentials (`session.py`): `EXPIRY_LEAD` before the
earliest notAfter of either chain, or when an identity update withdraws our SVID or drops
the peer's root, it stops taking streams and the next stream dials a fresh connection
with the current SVID, while the streams in flight finish.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ca.spiffeid import SpiffeId
from sidecar.tls import TLSError
from sidecar.tls.ech import ECHRejected

from .bridge import Bridge
from .channel import EngineChannel, SecureChannel
from .config import Address, PoolConfig
from .h2tunnel import H2StateError
from .identity import Identity, IdentityChange, IdentityError
from .metrics import Metrics
from .session import FirstStream, Session, SessionSettings, credentials_changed

logger = logging.getLogger("sidecar.pool")

__all__ = ["EXPIRY_LEAD", "ConnView", "NoEndpoint", "Pool", "PoolSet", "choose", "idle"]

# Outbound sessions retire this long before their credentials' notAfter, the inbound side
# at the notAfter itself: a new stream never lands on a connection the peer is about to
# refuse it on (clocks on one host agree; NTP keeps hosts well within this).
EXPIRY_LEAD = 1.0
# The most request bytes a first flight carries: within a ticket's max_early_data (16 KiB
# from Trellis servers) with room for the HTTP/2 preface, SETTINGS and the CONNECT.
MAX_FIRST_FLIGHT = 15 * 1024
# How long a dial that could carry a 0-RTT request waits for the app's first bytes: an
# HTTP client writes its request as soon as it has connected, so this is one read away;
# a client slower than this still gets its stream, only not in the first flight.
FIRST_BYTES_WAIT = 0.05


class NoEndpoint(ConnectionError):
    pass


@dataclass(frozen=True, slots=True)
class ConnView:
    """What the decisions need to know about one pooled session."""

    index: int
    can_open: bool
    active: int
    last_active: float


def choose(
    conns: Sequence[ConnView], waiting: int, connecting: int, max_streams: int
) -> tuple[str, int]:
    """("use", index) | ("dial", 0) | ("wait", 0) for one more stream.

    Packs streams onto the busiest session with room (so idle ones can time out),
    dials only when dials in flight cannot absorb the streams already waiting.
    """
    best: ConnView | None = None
    for conn in conns:
        if conn.can_open and (best is None or conn.active > best.active):
            best = conn
    if best is not None:
        return ("use", best.index)
    if connecting * max_streams <= waiting:
        return ("dial", 0)
    return ("wait", 0)


def idle(conns: Sequence[ConnView], now: float, idle_timeout: float) -> list[int]:
    """Sessions with no streams for longer than `idle_timeout`."""
    return [c.index for c in conns if c.active == 0 and now - c.last_active >= idle_timeout]


class Pool:
    def __init__(
        self,
        endpoint: Address,
        expected: tuple[SpiffeId, ...],
        identity: Identity,
        metrics: Metrics,
        config: PoolConfig,
        channel_factory: Callable[[Identity, tuple[SpiffeId, ...], float], SecureChannel]
        | None = None,
        *,
        drain_timeout: float = 10.0,
        kernel: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.kernel = kernel  # kTLS after each handshake (`sidecar.offload`)
        self.expected = expected
        self.identity = identity
        self.metrics = metrics
        self.config = config
        self.drain_timeout = drain_timeout
        self.sessions: list[Session] = []
        self._channel_factory = channel_factory
        self._connecting = 0
        self._waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._failures = 0
        self.last_error: str | None = None
        self._ech_retry = True  # one immediate re-dial after an ECH rejection (RFC 9849 §6.1.6)
        self.dials = 0

    # --- state -------------------------------------------------------------------------

    def _views(self) -> list[ConnView]:
        return [
            ConnView(i, s.can_open(), s.active_streams, s.last_active)
            for i, s in enumerate(self.sessions)
        ]

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_state(self, session: Session) -> None:
        if session.dead and session in self.sessions:
            self.sessions.remove(session)
            self.metrics.pool_connections.dec()
            if session.peer_alert is not None and not session.streams_opened:
                self._dial_failed(f"the peer closed with alert {session.peer_alert}")
        self._signal()

    def _dial_failed(self, error: str) -> None:
        self._failures += 1
        self.last_error = error
        logger.info("dial %s failed: %s", self.endpoint, error)

    # --- opening streams -----------------------------------------------------------------

    def ticket_slot(self) -> tuple[str, SpiffeId | None]:
        """(endpoint, expected peer) naming this pool's tickets in the store: the one
        SPIFFE ID the peer must present, or the whole list in the endpoint's name."""
        if len(self.expected) == 1:
            return str(self.endpoint), self.expected[0]
        if not self.expected:
            return str(self.endpoint), None
        return f"{self.endpoint} {','.join(str(i) for i in self.expected)}", None

    def _channel(self, now: float, early: bytes) -> SecureChannel:
        if self._channel_factory is not None:
            return self._channel_factory(self.identity, self.expected, now)
        endpoint, expected_peer = self.ticket_slot()
        return EngineChannel(
            self.identity.client_config(self.expected),
            client=True,
            now=now,
            endpoint=endpoint,
            expected_peer=expected_peer,
            early=early,
        )

    def _may_go_early(self, bridge: Bridge, replay_safe: Callable[[bytes], bool] | None) -> bool:
        """Whether to wait for the app's first bytes before dialling: they may ride in
        the first flight, the app has written nothing yet, and a ticket is at hand."""
        return (
            replay_safe is not None
            and self._channel_factory is None
            and not bridge.early_attempted
            and not bridge.waited_held
            and bridge.held_request() == b""
            and len(self.identity.tickets) > 0
        )

    def _first_stream(
        self, authority: str, bridge: Bridge, replay_safe: Callable[[bytes], bool] | None
    ) -> FirstStream | None:
        """The stream to carry in a new connection's first flight, if any."""
        if replay_safe is None or self._channel_factory is not None or bridge.early_attempted:
            return None
        held = bridge.held_request()
        if not held or len(held) > MAX_FIRST_FLIGHT or not replay_safe(held):
            return None
        return FirstStream(authority, bridge, held)

    async def open(
        self,
        authority: str,
        bridge: Bridge,
        replay_safe: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Attach `bridge` to a new stream; raises ConnectionError if none can be had.
        `replay_safe` says whether the bytes the app wrote so far may be sent early."""
        deadline = time.monotonic() + self.config.connect_timeout
        failures = self._failures
        handed_over = False  # the bridge rides in a dial's first flight
        while True:
            if handed_over and bridge.early_attempted:
                return  # the session has the stream; its failures retry through the bridge
            action, index = choose(
                self._views(),
                self._waiting,
                self._connecting,
                self.config.max_streams_per_connection,
            )
            if action == "use":
                session = self.sessions[index]
                try:
                    stream_id = session.open_stream(authority, bridge)
                except H2StateError as exc:
                    # The connection stopped taking streams between the check and now.
                    logger.debug("session to %s refused a stream: %s", self.endpoint, exc)
                    session.goaway_received = True
                    continue
                bridge.attach(session, stream_id)
                return
            if action == "dial":
                if not handed_over and self._may_go_early(bridge, replay_safe):
                    await bridge.wait_held(FIRST_BYTES_WAIT)
                    continue  # the pool may have changed meanwhile: decide again
                # Counted now, not when the task first runs: every open() in this loop
                # iteration must see the dial in flight, or each would start its own.
                self._connecting += 1
                first = None if handed_over else self._first_stream(authority, bridge, replay_safe)
                handed_over = handed_over or first is not None
                task = asyncio.get_running_loop().create_task(self._dial(True, first))
                self._tasks.add(task)  # the loop holds tasks weakly
                task.add_done_callback(self._tasks.discard)
            elif self._failures != failures and not self._connecting:
                raise NoEndpoint(f"{self.endpoint}: {self.last_error}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoEndpoint(f"{self.endpoint}: no connection within the connect timeout")
            changed = self._changed
            self._waiting += 1
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for returns instead of
                # raising when it is cancelled just as the event fires.
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                pass
            finally:
                self._waiting -= 1
            if handed_over and bridge.early_attempted:
                return
            # Sessions still finishing their streams (draining) take none of ours.
            usable = any(view.can_open for view in self._views())
            if self._failures != failures and not self._connecting and not usable:
                raise NoEndpoint(f"{self.endpoint}: {self.last_error}")

    async def _dial(self, counted: bool = False, first: FirstStream | None = None) -> None:
        if not counted:
            self._connecting += 1
        self.dials += 1
        loop = asyncio.get_running_loop()
        settings = SessionSettings(
            "outbound",
            handshake_timeout=self.config.connect_timeout,
            keepalive_interval=self.config.keepalive_interval,
            keepalive_timeout=self.config.keepalive_timeout,
            max_streams=self.config.max_streams_per_connection,
            drain_timeout=self.drain_timeout,
            expiry_lead=EXPIRY_LEAD,
            ktls=self.kernel,
        )
        try:
            _, session = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Session(
                        self._channel,
                        settings,
                        self.metrics,
                        on_state=self._on_state,
                        first_stream=first,
                    ),
                    self.endpoint.host,
                    self.endpoint.port,
                ),
                self.config.connect_timeout,
            )
            await asyncio.wait_for(asyncio.shield(session.ready), self.config.connect_timeout)
        except (OSError, TimeoutError, TLSError, IdentityError) as exc:
            # What a dial can raise: the socket (OSError), the handshake (the engine's
            # TLSError, or a peer gone mid-handshake), no SVID to present, the connect
            # timeout. Anything else is a bug and propagates as one.
            if isinstance(exc, ECHRejected) and self._ech_retry:
                # RFC 9849 §6.1.6: retry at once on a new connection, sealed to the
                # service's retry configs, or without ECH when it sent none; once, so
                # a service that keeps rejecting fails the dial as any refusal does.
                self._ech_retry = False
                self.metrics.tls_ech.labels(outcome="rejected").inc()
                self.identity.ech_rejected(self.expected, exc.retry_configs)
                logger.info("dial %s: ECH rejected, retrying (%s)", self.endpoint, exc)
            else:
                self._dial_failed(f"{type(exc).__name__}: {exc}")
        else:
            if session.dead:
                # Refused right after our side finished (the peer distrusts our SVID):
                # a failed dial, or open() would dial again at once, for ever.
                self._dial_failed(f"the peer closed at once (alert {session.peer_alert})")
            else:
                self.sessions.append(session)
                self.metrics.pool_connections.inc()
                self.last_error = None
                self._ech_retry = True
        finally:
            self._connecting -= 1
            self._signal()

    # --- maintenance -----------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        for index in sorted(idle(self._views(), now, self.config.idle_timeout), reverse=True):
            session = self.sessions[index]
            logger.debug("closing idle connection to %s", self.endpoint)
            session.close()

    def drain(self) -> None:
        for session in list(self.sessions):
            session.drain()

    def describe(self) -> dict[str, Any]:
        return {
            "endpoint": str(self.endpoint),
            "spiffe_ids": [str(i) for i in self.expected],
            "connections": [
                {
                    "peer": str(s.peer_id) if s.peer_id is not None else None,
                    "streams": s.active_streams,
                    "streams_opened": s.streams_opened,
                    "open_for_streams": s.can_open(),
                    "retired": s.retired,
                    "resumed": s.resumed,
                    "early_data": s.early_data,
                    "credentials_expire_at": s.expires_at,
                    "data_path": s.data_path,
                }
                for s in self.sessions
            ],
            "dials": self.dials,
            "last_error": self.last_error,
        }


class PoolSet:
    """Every pool of the sidecar, keyed by (endpoint, expected IDs)."""

    def __init__(
        self,
        identity: Identity,
        metrics: Metrics,
        config: PoolConfig,
        *,
        drain_timeout: float = 10.0,
    ) -> None:
        self.identity = identity
        self.metrics = metrics
        self.config = config
        self.drain_timeout = drain_timeout
        self.pools: dict[tuple[Address, tuple[SpiffeId, ...]], Pool] = {}
        # Pools an upstream with `ktls: off` goes through: their records stay in user
        # space; every other pool's go to the kernel when it has kTLS (`sidecar.offload`).
        self.user_space: set[tuple[Address, tuple[SpiffeId, ...]]] = set()
        self.kernel = True  # `ktls: auto` unless the upstream said off
        self._rr = itertools.count()
        identity.subscribe(self._identity_changed)

    def _identity_changed(self, change: IdentityChange) -> None:
        for pool in self.pools.values():
            credentials_changed(pool.sessions, self.identity, change)

    @staticmethod
    def key(
        endpoint: Address, expected: tuple[SpiffeId, ...]
    ) -> tuple[Address, tuple[SpiffeId, ...]]:
        return endpoint, tuple(sorted(expected, key=str))

    def pool(self, endpoint: Address, expected: tuple[SpiffeId, ...]) -> Pool:
        key = self.key(endpoint, expected)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(
                endpoint,
                key[1],
                self.identity,
                self.metrics,
                self.config,
                drain_timeout=self.drain_timeout,
                kernel=self.kernel and key not in self.user_space,
            )
        return pool

    async def open(
        self,
        endpoints: Sequence[Address],
        expected: tuple[SpiffeId, ...],
        authority: str,
        bridge: Bridge,
        replay_safe: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Round-robin over endpoints; an endpoint that cannot be reached is skipped."""
        start = next(self._rr)
        errors = []
        for offset in range(len(endpoints)):
            endpoint = endpoints[(start + offset) % len(endpoints)]
            try:
                await self.pool(endpoint, expected).open(authority, bridge, replay_safe)
                return
            except ConnectionError as exc:
                errors.append(str(exc))
        raise NoEndpoint("; ".join(errors) or "no endpoints")

    def sweep(self, now: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now)

    def drain(self) -> None:
        for pool in self.pools.values():
            pool.drain()

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.pools.values()]
