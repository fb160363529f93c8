"""The outbound side: app connections in, CONNECT streams on pooled sessions out.

* Explicit upstreams: a listener per upstream on its local port (Consul Connect style);
  every connection goes to that upstream's endpoints with its target as `:authority` and
  its SPIFFE IDs as the identities the peer must present.
* Transparent: one listener (15001) behind an iptables REDIRECT; the original
  destination comes from `SO_ORIGINAL_DST` and the stream goes to that address's sidecar
  (same IP, the inbound port) with `:authority` = the original destination -- if the
  destination is in the mesh. With a mesh registry published (``meshapi.registry``), any
  other destination is passed through or refused (``sidecar.passthrough``); without one,
  every destination is taken to be in the mesh.

A stream the peer's policy refuses (403) ends the app's connection with a reset, as a
firewall would, unless the peer said the app behind it speaks HTTP (``hbone.denial_of``):
then the app gets an HTTP/1.1 ``403 Forbidden`` naming the rule, the connection is
half-closed, and what the app still sends is read and dropped for `LINGER` seconds before
the close (RFC 9112 §9.6: closing with unread input would reset the connection, and the app
could lose the answer). Every stream ends in one access-log line (`sidecar.accesslog`).

A destination known to speak HTTP -- an upstream declared ``protocol: http``, or any route
whose peer answered a stream with ``trellis-app-protocol: http`` (its AccessPolicy says
``protocol: http``; remembered for up to `HTTP_ROUTES` routes) -- may get the app's first
request in TLS 0-RTT on a fresh resumed connection, when `early_data` (by default
`sidecar.earlydata.replay_safe`: GET, HEAD, OPTIONS without a body) judges it
replay-safe; a ``425 Too Early`` from the peer is retried on the completed connection
(`pool`, `bridge`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import cast

from ca.spiffeid import SpiffeId
from meshapi.registry import MeshRegistry

from .accesslog import log_stream
from .bridge import Bridge
from .config import Address, UpstreamConfig
from .direct import DirectLink, client_channel, dial
from .earlydata import replay_safe as http_replay_safe
from .h2tunnel import ErrorCode
from .hbone import denial_of, http_forbidden, speaks_http
from .listen import listen_twin
from .metrics import Metrics
from .passthrough import PassthroughRoute, take_over
from .pool import PoolSet
from .session import Session

logger = logging.getLogger("sidecar.outbound")

__all__ = ["Outbound", "original_destination"]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
LINGER = 2.0  # seconds an app's unread request may keep arriving after our HTTP 403
HTTP_ROUTES = 4096  # routes remembered as HTTP from the peers' answers (oldest forgotten)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address the app dialled before the REDIRECT: `struct sockaddr_in` from
    SO_ORIGINAL_DST, or `sockaddr_in6` from IP6T_SO_ORIGINAL_DST (same number, SOL_IPV6)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def _loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


Route = tuple[tuple[Address, ...], tuple[SpiffeId, ...], str]
Resolver = Callable[[socket.socket], Route | PassthroughRoute]


ReplaySafe = Callable[[bytes], bool]


class _OutboundBridge(Bridge):
    def __init__(
        self, outbound: Outbound, resolve: Resolver, replay_safe: ReplaySafe | None = None
    ) -> None:
        super().__init__(
            outbound.metrics, "outbound", on_retry=outbound.retry, on_done=outbound.done
        )
        self._outbound = outbound
        self._resolve = resolve
        self.replay_safe = replay_safe  # set for upstreams declared HTTP: 0-RTT allowed
        self.route: Route | None = None
        # Passing through: what the app sent while we dialled (uvloop may read an accepted
        # socket even after connection_made paused it), handed to the splice once it runs.
        self.held: list[bytes] | None = None
        self.held_eof = False
        # For the access log: when the app connected, whom the stream reached, how it ended.
        self.started = time.monotonic()
        self.peer: SpiffeId | None = None
        self.status: int | None = None
        self.rule: str | None = None
        self.reason: str | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        try:
            route = self._resolve(sock)
        except OSError as exc:
            logger.warning(
                "no original destination for %s: %s", transport.get_extra_info("peername"), exc
            )
            self.reason = f"no original destination: {exc}"
            self.refuse()
            return
        if isinstance(route, PassthroughRoute):
            # Not a stream at all: the transport leaves the bridge once the dial succeeds.
            self.held = []
            self._outbound.passthrough(cast(asyncio.Transport, transport), route, self.handoff)
            return
        self.route = route
        self._outbound.start(self)

    def attach(self, session: Session, stream_id: int) -> None:
        self.peer = session.peer_id
        super().attach(session, stream_id)

    def stream_response(self, status: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.status = status
        if self.peer is None and self.session is not None:
            self.peer = self.session.peer_id  # a first-flight stream: known only now
        if status == 200 and self.route is not None and speaks_http(headers):
            self._outbound.learned_http(self.route)
        denial = denial_of(headers) if status == 403 else None
        if denial is not None:
            self.rule = denial.rule
        transport = self.transport
        if denial is None or not denial.http or transport is None or transport.is_closing():
            super().stream_response(status, headers)
            return
        # The peer's app speaks HTTP: answer ours in HTTP, naming the rule.
        if self.session is not None:
            self.session.reset(self.stream_id, ErrorCode.CANCEL)
        self._lingering = True
        transport.write(http_forbidden(denial.rule))
        if transport.can_write_eof():
            transport.write_eof()
        if not transport.is_reading():
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER, transport.close)
        self._done("refused")

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the request we refused: read only so that the close is not a reset
        if self.held is None:
            super().data_received(data)
            return
        self.held.append(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self._lingering:
            return False  # the app is done too: close
        if self.held is None:
            return super().eof_received()
        self.held_eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.held is None:
            super().connection_lost(exc)
        # Passing through, the splice sees the closed transport and counts nothing more.

    def handoff(self) -> tuple[list[bytes], bool]:
        held, self.held = self.held or [], []
        return held, self.held_eof


class Outbound:
    def __init__(
        self,
        pools: PoolSet,
        metrics: Metrics,
        inbound_port: int,
        *,
        registry: Callable[[], MeshRegistry | None] = lambda: None,
        connect_timeout: float = 5.0,
        early_data: ReplaySafe | None = http_replay_safe,
    ) -> None:
        """`early_data` judges whether what an app wrote to an upstream declared HTTP may
        go in 0-RTT (None: never)."""
        self.early_data = early_data
        self._http_routes: OrderedDict[Route, None] = OrderedDict()
        self.pools = pools
        self.metrics = metrics
        self.inbound_port = inbound_port
        self.registry = registry  # read per connection: a live reload applies at once
        self.connect_timeout = connect_timeout
        self.servers: list[asyncio.Server] = []
        self.bridges: set[Bridge] = set()
        self.direct_links: set[DirectLink] = set()  # upstreams in mode: direct
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen_upstream(self, upstream: UpstreamConfig) -> None:
        if upstream.mode == "direct":
            await self._listen_direct(upstream)
            return
        route = (upstream.endpoints, upstream.spiffe_ids, upstream.target)
        if upstream.ktls == "off":
            for endpoint in upstream.endpoints:
                self.pools.user_space.add(self.pools.key(endpoint, upstream.spiffe_ids))
        replay_safe = self.early_data if upstream.protocol == "http" else None
        server = await asyncio.get_running_loop().create_server(
            lambda: _OutboundBridge(self, lambda _sock: route, replay_safe),
            upstream.listen.host,
            upstream.listen.port,
            reuse_address=True,
            backlog=1024,
        )
        self.servers.append(server)

    async def _listen_direct(self, upstream: UpstreamConfig) -> None:
        """``mode: direct``: each app connection gets its own TLS connection
        (`sidecar.direct`), no pool; endpoints are taken in turn."""
        turn = itertools.count()
        kernel = upstream.ktls == "auto"

        def accept() -> asyncio.Protocol:
            link = DirectLink(
                lambda now: client_channel(self.pools.identity, upstream.spiffe_ids, now),
                self.metrics,
                direction="outbound",
                authority=upstream.target,
                kernel=kernel,
            )
            endpoint = upstream.endpoints[next(turn) % len(upstream.endpoints)]

            def made(app: asyncio.Transport) -> None:
                self.metrics.app_connections.labels(direction="outbound").inc()
                self.direct_links.add(link)
                started = time.monotonic()
                link.closed.add_done_callback(lambda _f: self._direct_done(link, started))
                task = asyncio.get_running_loop().create_task(
                    dial(link, app, endpoint.host, endpoint.port, self.connect_timeout)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            return link.app_protocol(made)

        server = await asyncio.get_running_loop().create_server(
            accept, upstream.listen.host, upstream.listen.port, reuse_address=True, backlog=1024
        )
        self.servers.append(server)

    def _direct_done(self, link: DirectLink, started: float) -> None:
        """A direct connection ended: one access-log line, as a stream's."""
        self.direct_links.discard(link)
        failure = None
        if not link.ready.done() or link.ready.cancelled():
            failure = "closed before the peer answered"
        elif link.ready.exception() is not None:
            failure = str(link.ready.exception())
        log_stream(
            "outbound",
            "ok" if failure is None else "refused",
            started=started,
            peer=link.peer_id,
            authority=link.authority,
            status=200 if failure is None else None,
            reason=failure,
            bytes_sent=link.bytes_up,
            bytes_received=link.bytes_down,
        )

    async def listen_transparent(self, listen: Address) -> None:
        def resolve(sock: socket.socket) -> Route | PassthroughRoute:
            host, port = original_destination(sock)
            target = Address(host, port)
            registry = self.registry()
            if registry is not None and not registry.contains(host):
                # The pod's own loopback (another container, the app's own ports) is never
                # "the world": REGISTRY_ONLY must not cut a pod off from itself.
                policy = "ALLOW_ANY" if _loopback(host) else registry.outbound_traffic_policy
                return PassthroughRoute(target, policy)
            return (Address(host, self.inbound_port),), (), str(target)

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _OutboundBridge(self, resolve),
            listen.host,
            listen.port,
            reuse_address=True,
            backlog=1024,
        )
        self.servers.append(server)
        # ...and where ip6tables redirects the app's IPv6 connections.
        twin = await listen_twin(loop, lambda: _OutboundBridge(self, resolve), listen)
        if twin is not None:
            self.servers.append(twin)

    def learned_http(self, route: Route) -> None:
        """The peer behind `route` said its app speaks HTTP."""
        self._http_routes[route] = None
        self._http_routes.move_to_end(route)
        if len(self._http_routes) > HTTP_ROUTES:
            self._http_routes.popitem(last=False)

    def start(self, bridge: _OutboundBridge) -> None:
        self.bridges.add(bridge)
        task = asyncio.get_running_loop().create_task(self._open(bridge))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, bridge: _OutboundBridge) -> None:
        assert bridge.route is not None
        endpoints, ids, authority = bridge.route
        try:
            replay_safe = bridge.replay_safe
            if replay_safe is None and bridge.route in self._http_routes:
                replay_safe = self.early_data
            await self.pools.open(endpoints, ids, authority, bridge, replay_safe)
        except ConnectionError as exc:
            logger.info("no stream for %s: %s", authority, exc)
            bridge.reason = f"no stream: {exc}"
            bridge.refuse()

    def passthrough(
        self,
        transport: asyncio.Transport,
        route: PassthroughRoute,
        handoff: Callable[[], tuple[list[bytes], bool]],
    ) -> None:
        take_over(transport, route, self.metrics, self.connect_timeout, self._tasks, handoff)

    def retry(self, bridge: Bridge) -> bool:
        if not isinstance(bridge, _OutboundBridge) or bridge.transport is None:
            return False
        task = asyncio.get_running_loop().create_task(self._open(bridge))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def done(self, bridge: Bridge, outcome: str) -> None:
        self.bridges.discard(bridge)
        if not isinstance(bridge, _OutboundBridge):
            return
        if outcome == "refused":
            outcome = "denied"  # Bridge calls a peer's 403 "refused"; the log says what it was
        log_stream(
            "outbound",
            outcome,
            started=bridge.started,
            peer=bridge.peer,
            authority=bridge.route[2] if bridge.route is not None else None,
            status=bridge.status,
            rule=bridge.rule,
            reason=bridge.reason,
            bytes_sent=bridge.bytes_up,
            bytes_received=bridge.bytes_down,
        )

    def close_listeners(self) -> None:
        for server in self.servers:
            server.close()
