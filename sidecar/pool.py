"""Outbound connection pools: one per (endpoint, expected SPIFFE IDs).

The decisions are pure functions of a snapshot and `now` (`choose`, `idle`); `Pool` is the
asyncio shell that dials, waits and applies them. Each app connection becomes one CONNECT
stream on a pooled `Session`; a session takes at most `max_streams_per_connection`
streams, and a new one is dialled only when every live one is saturated and the
connections already being dialled cannot absorb the waiting streams either. So N app
connections cost ceil(N / max_streams) handshakes, not N.

The channel under each session comes from `channel_factory(now)` -- the Trellis engine
today; kTLS or resumption-capable channels plug in there.

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

from .bridge import Bridge
from .channel import EngineChannel, SecureChannel
from .config import Address, PoolConfig
from .h2tunnel import H2StateError
from .identity import Identity, IdentityChange, IdentityError
from .metrics import Metrics
from .session import Session, SessionSettings, credentials_changed

logger = logging.getLogger("sidecar.pool")

__all__ = ["EXPIRY_LEAD", "ConnView", "NoEndpoint", "Pool", "PoolSet", "choose", "idle"]

# Outbound sessions retire this long before their credentials' notAfter, the inbound side
# at the notAfter itself: a new stream never lands on a connection the peer is about to
# refuse it on (clocks on one host agree; NTP keeps hosts well within this).
EXPIRY_LEAD = 1.0


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
    ) -> None:
        self.endpoint = endpoint
        self.expected = expected
        self.identity = identity
        self.metrics = metrics
        self.config = config
        self.drain_timeout = drain_timeout
        self.sessions: list[Session] = []
        self._channel_factory = channel_factory or _engine_channel
        self._connecting = 0
        self._waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._failures = 0
        self.last_error: str | None = None
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

    async def open(self, authority: str, bridge: Bridge) -> None:
        """Attach `bridge` to a new stream; raises ConnectionError if none can be had."""
        deadline = time.monotonic() + self.config.connect_timeout
        failures = self._failures
        while True:
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
                # Counted now, not when the task first runs: every open() in this loop
                # iteration must see the dial in flight, or each would start its own.
                self._connecting += 1
                task = asyncio.get_running_loop().create_task(self._dial(counted=True))
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
            # Sessions still finishing their streams (draining) take none of ours.
            usable = any(view.can_open for view in self._views())
            if self._failures != failures and not self._connecting and not usable:
                raise NoEndpoint(f"{self.endpoint}: {self.last_error}")

    async def _dial(self, counted: bool = False) -> None:
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
        )
        identity, expected, factory = self.identity, self.expected, self._channel_factory
        try:
            _, session = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Session(
                        lambda now: factory(identity, expected, now),
                        settings,
                        self.metrics,
                        on_state=self._on_state,
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
                    "credentials_expire_at": s.expires_at,
                }
                for s in self.sessions
            ],
            "dials": self.dials,
            "last_error": self.last_error,
        }


def _engine_channel(
    identity: Identity, expected: tuple[SpiffeId, ...], now: float
) -> SecureChannel:
    return EngineChannel(identity.client_config(expected), client=True, now=now)


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
        self._rr = itertools.count()
        identity.subscribe(self._identity_changed)

    def _identity_changed(self, change: IdentityChange) -> None:
        for pool in self.pools.values():
            credentials_changed(pool.sessions, self.identity, change)

    def pool(self, endpoint: Address, expected: tuple[SpiffeId, ...]) -> Pool:
        key = (endpoint, tuple(sorted(expected, key=str)))
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(
                endpoint,
                key[1],
                self.identity,
                self.metrics,
                self.config,
                drain_timeout=self.drain_timeout,
            )
        return pool

    async def open(
        self,
        endpoints: Sequence[Address],
        expected: tuple[SpiffeId, ...],
        authority: str,
        bridge: Bridge,
    ) -> None:
        """Round-robin over endpoints; an endpoint that cannot be reached is skipped."""
        start = next(self._rr)
        errors = []
        for offset in range(len(endpoints)):
            endpoint = endpoints[(start + offset) % len(endpoints)]
            try:
                await self.pool(endpoint, expected).open(authority, bridge)
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
