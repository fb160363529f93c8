"""The inbound side: mTLS on 15008, CONNECT streams authorised, then the local app.

Per stream: parse the CONNECT (`hbone`), find the app address for the target port
(`InboundConfig.app_for`: only declared targets; any other port → 404 and
`trellis_sidecar_connect_requests_rejected_total{status="404"}`), authorise the peer's
SPIFFE ID for that port (`policy.Authorizer`; refusal → 403 naming the rule, see
`hbone.denial_headers`, and `trellis_sidecar_policy_decisions{decision="deny"}`), and only
then dial the app: at the pod address the peer dialled, then at the configured loopback
host if nothing listens there (`sidecar.appaddress`). The app unreachable → 503. Every
refusal is an HTTP status on that stream alone; the connection and its other streams go
on. Every stream, refused or not, ends in one access-log line (`sidecar.accesslog`); a
denial's is a WARNING.

The sidecar's own ports are refused here as well as in the configuration
(`check_consistency`): a config built in code skips that check, and a stream into the
admin port or an upstream listener would let a caller act through the sidecar.

Permissive mode (`sidecar.permissive`): while the pod's policy makes some port permissive,
each accepted connection is a `Sniffer` first, which hands TLS to the `Session` and
forwards a plaintext caller to the declared app port it dialled. Strict (no permissive
port) accepts straight into the `Session`, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from ca.spiffeid import SpiffeId

from .accesslog import log_stream
from .appaddress import app_hosts, dial_app, local_host
from .bridge import Bridge
from .channel import EngineChannel, SecureChannel
from .config import Address, InboundConfig
from .direct import DirectLink, ServerConfigs, Verdict
from .earlygate import EarlyStream
from .hbone import Refusal, app_protocol_headers, denial_headers, parse_connect
from .identity import Identity
from .listen import listen_twin
from .metrics import Metrics
from .permissive import STRICT, PlaintextPolicy, Sniffer
from .policy import Authorizer
from .session import Session, SessionSettings, StreamHandler, credentials_changed

logger = logging.getLogger("sidecar.inbound")

__all__ = ["Inbound"]


@dataclass(slots=True)
class _Entry:
    """One stream's access-log line, filled in as the stream goes."""

    started: float
    peer: SpiffeId | None
    port: int | None = None
    rule: str | None = None
    status: int | None = None
    reason: str | None = None

    def log(self, outcome: str, bridge: Bridge | None = None) -> None:
        log_stream(
            "inbound",
            outcome,
            started=self.started,
            peer=self.peer,
            port=self.port,
            status=self.status,
            rule=self.rule,
            reason=self.reason,
            bytes_sent=bridge.bytes_up if bridge is not None else 0,
            bytes_received=bridge.bytes_down if bridge is not None else 0,
        )


class Inbound:
    def __init__(
        self,
        config: InboundConfig,
        identity: Identity,
        metrics: Metrics,
        authorizer: Callable[[], Authorizer],
        *,
        keepalive_interval: float = 20.0,
        keepalive_timeout: float = 10.0,
        drain_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        own_ports: Collection[int] = (),
        plaintext: Callable[[], PlaintextPolicy] = lambda: STRICT,
    ) -> None:
        self.plaintext = plaintext
        self.config = config
        self.own_ports = frozenset(own_ports)
        self.identity = identity
        self.metrics = metrics
        self.authorizer = authorizer
        self.sessions: set[Session] = set()
        self.servers: list[asyncio.Server] = []
        self._settings = SessionSettings(
            "inbound",
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            drain_timeout=drain_timeout,
            ktls=True,  # the inbound side offers kTLS whenever the kernel has it
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._connect_timeout = connect_timeout
        # ALPN h2 for pooled callers, `direct.DIRECT_ALPN` for direct ones.
        self._server_configs = ServerConfigs(identity)
        self.direct_links: set[DirectLink] = set()
        self.kernel = self._settings.ktls
        # At 0 per declared port from start-up: a strict workload shows 0 on the dashboard,
        # and a port turned permissive later already has its series.
        for port in config.targets:
            metrics.plaintext_accepted.labels(port=str(port))
        # A connection must not outlive the bundles or the SVID that authenticated it.
        identity.subscribe(lambda change: credentials_changed(self.sessions, identity, change))

    def _channel(self, now: float, _early: bytes) -> SecureChannel:
        return EngineChannel(self._server_configs.get(), client=False, now=now)

    def _session(self) -> Session:
        session = Session(
            self._channel,
            self._settings,
            self.metrics,
            on_request=self._request,
            on_state=self._state,
            on_direct=self._direct,
        )
        self.sessions.add(session)
        self.metrics.inbound_connections.inc()
        return session

    def _accept(self) -> asyncio.Protocol:
        policy = self.plaintext()  # read per connection: a policy reload applies to the next
        if not policy.permissive:
            return self._session()
        return Sniffer(
            self._session,
            policy,
            self.config,
            self.own_ports,
            self.metrics,
            timeout=self._settings.handshake_timeout,
            connect_timeout=self._connect_timeout,
        )

    def _state(self, session: Session) -> None:
        if session.dead and session in self.sessions:
            self.sessions.discard(session)
            self.metrics.inbound_connections.dec()

    async def start(self, *, ipv6_twin: bool = False) -> None:
        """Listen on ``config.listen``; transparent mode also on its IPv6 twin (where
        ip6tables redirects), when the host has IPv6."""
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self.servers.append(
            await loop.create_server(
                self._accept, listen.host, listen.port, reuse_address=True, backlog=1024
            )
        )
        if ipv6_twin and (twin := await listen_twin(loop, self._accept, listen)) is not None:
            self.servers.append(twin)

    def _request(
        self, session: Session, stream_id: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        # The caller's SPIFFE ID, parsed once by the engine from the leaf's URI SAN.
        entry = _Entry(time.monotonic(), session.peer_id)
        request = parse_connect(headers)
        if isinstance(request, Refusal):
            self._refuse(session, stream_id, request.status, request.reason, entry)
            return
        entry.port = request.port
        app = self.config.app_for(request.port)
        if app is None or app.port in self.own_ports:
            reason = f"no local target for port {request.port}"
            self._refuse(session, stream_id, 404, reason, entry)
            return
        authorizer = self.authorizer()
        decision = authorizer.decide(entry.peer, request.port, self.identity.trust_domain)
        entry.rule = decision.rule
        if not decision.allowed:
            self.metrics.policy.labels(decision="deny").inc()
            entry.status, entry.reason = 403, decision.reason
            entry.log("denied")
            http = authorizer.speaks_http(request.port)
            session.refuse(stream_id, 403, denial_headers(decision.rule, http=http))
            self.metrics.streams.labels(direction="inbound", outcome="refused").inc()
            return
        self.metrics.policy.labels(decision="allow").inc()
        http = authorizer.speaks_http(request.port)
        if session.receiving_early:
            self._early(session, stream_id, app, entry, http)
            return
        self._forward(session, stream_id, app, entry, http)

    def _early(
        self, session: Session, stream_id: int, app: Address, entry: _Entry, http: bool
    ) -> None:
        """A CONNECT in 0-RTT data (RFC 8470): safe HTTP requests go on marked, the rest
        is answered 425, which the caller retries after its handshake (`earlygate`)."""

        def too_early(reason: str) -> None:
            entry.status, entry.reason = 425, reason
            entry.log("refused")
            self.metrics.streams.labels(direction="inbound", outcome="refused").inc()
            session.refuse(stream_id, 425)

        if not http:
            # Bytes of an app protocol we cannot judge: none may be a replay.
            self.metrics.early_data_requests.labels(decision="too_early").inc()
            too_early("early data for a port not declared HTTP")
            return
        gate = EarlyStream(
            session,
            stream_id,
            self.metrics,
            forward=lambda: self._forward(session, stream_id, app, entry, http, gate),
            too_early=too_early,
        )
        session.accept_stream(stream_id, gate)

    def _forward(
        self,
        session: Session,
        stream_id: int,
        app: Address,
        entry: _Entry,
        http: bool,
        handler: StreamHandler | None = None,
    ) -> Bridge:
        """Dial the app and splice it to the stream (`handler` stays in front if given).
        The 200 says whether the app speaks HTTP (`hbone.app_protocol_headers`): the
        caller may then send it safe requests in 0-RTT on a later connection."""

        def connected() -> None:
            entry.status = 200
            if stream_id in session.streams:
                session.respond(stream_id, 200, app_protocol_headers(http=http))

        def done(bridge: Bridge, outcome: str) -> None:
            if entry.status is None:  # never connected: `_dial` answered 503
                entry.status, entry.reason = 503, f"local app {app.host}:{app.port} unreachable"
            entry.log(outcome, bridge)

        bridge = Bridge(self.metrics, "inbound", on_connected=connected, on_done=done)
        if handler is None:  # an early stream's gate was accepted already
            session.accept_stream(stream_id, bridge)
        bridge.attach(session, stream_id)
        hosts = app_hosts(session.arrived_on, app.host)
        task = asyncio.get_running_loop().create_task(
            self._dial(session, stream_id, bridge, hosts, app.port)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return bridge

    async def _dial(
        self, session: Session, stream_id: int, bridge: Bridge, hosts: tuple[str, ...], port: int
    ) -> None:
        try:
            await asyncio.wait_for(dial_app(lambda: bridge, hosts, port), self._connect_timeout)
        except (OSError, TimeoutError) as exc:
            logger.info("local app %s port %d unreachable: %s", " or ".join(hosts), port, exc)
            if stream_id in session.streams:
                session.refuse(stream_id, 503)
            bridge.refuse()

    def _direct(
        self,
        transport: asyncio.Transport,
        channel: SecureChannel,
        plaintext: list[bytes],
        closed: bool,
    ) -> None:
        """A direct connection (`sidecar.direct`): one caller, one app connection."""
        arrived_on = local_host(transport)

        async def accept(peer: SpiffeId | None, authority: str, link: DirectLink) -> Verdict:
            return await self._accept_direct(peer, authority, link, arrived_on)

        link = DirectLink(
            None,
            self.metrics,
            direction="inbound",
            acceptor=accept,
            kernel=self._settings.ktls,
        )
        self.direct_links.add(link)
        link.closed.add_done_callback(lambda _f: self.direct_links.discard(link))
        link.adopt(transport, channel, plaintext, closed)

    async def _accept_direct(
        self, peer: SpiffeId | None, authority: str, link: DirectLink, arrived_on: str | None
    ) -> Verdict:
        """The same checks as a CONNECT stream's (`_request`), answered as a status line."""
        entry = _Entry(time.monotonic(), peer)
        request = parse_connect([(b":method", b"CONNECT"), (b":authority", authority.encode())])
        if isinstance(request, Refusal):
            return self._refuse_direct(entry, request.status, request.reason)
        entry.port = request.port
        app = self.config.app_for(request.port)
        if app is None or app.port in self.own_ports:
            return self._refuse_direct(entry, 404, f"no local target for port {request.port}")
        decision = self.authorizer().decide(peer, request.port, self.identity.trust_domain)
        entry.rule = decision.rule
        if not decision.allowed:
            self.metrics.policy.labels(decision="deny").inc()
            entry.status, entry.reason = 403, decision.reason
            entry.log("denied")
            return 403, f"denied by {decision.rule}", None
        self.metrics.policy.labels(decision="allow").inc()
        hosts = app_hosts(arrived_on, app.host)
        try:
            app_transport, _ = await asyncio.wait_for(
                dial_app(link.app_protocol, hosts, app.port), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            reason = f"local app {' or '.join(hosts)} port {app.port} unreachable: {exc}"
            return self._refuse_direct(entry, 503, reason)
        entry.status = 200
        self.metrics.app_connections.labels(direction="inbound").inc()
        link.closed.add_done_callback(
            lambda _f: log_stream(
                "inbound",
                "ok",
                started=entry.started,
                peer=peer,
                port=entry.port,
                status=200,
                rule=entry.rule,
                bytes_sent=link.bytes_down,
                bytes_received=link.bytes_up,
            )
        )
        return 200, "", app_transport

    def _refuse_direct(self, entry: _Entry, status: int, reason: str) -> Verdict:
        entry.status, entry.reason = status, reason
        entry.log("refused")
        self.metrics.connect_errors.labels(status=str(status)).inc()
        return status, reason, None

    def _refuse(
        self, session: Session, stream_id: int, status: int, reason: str, entry: _Entry
    ) -> None:
        entry.status, entry.reason = status, reason
        entry.log("refused")
        self.metrics.connect_errors.labels(status=str(status)).inc()
        session.refuse(stream_id, status)

    def drain(self) -> None:
        for server in self.servers:
            server.close()
        for session in list(self.sessions):
            session.drain()

    @property
    def active_streams(self) -> int:
        return sum(s.active_streams for s in self.sessions)
