"""The inbound side: mTLS on 15008, CONNECT streams authorised, then the local app.

Per stream: parse the CONNECT (`hbone`), find the app address for the target port
(`InboundConfig.app_for`: only declared targets; any other port → 404 and
`trellis_sidecar_connect_requests_rejected_total{status="404"}`), authorise the peer's
SPIFFE ID for that port (`policy.Authorizer`; refusal → 403 and
`trellis_sidecar_policy_decisions{decision="deny"}`), and only then dial the app. The app
unreachable → 503. Every refusal is an HTTP status on that stream alone; the connection
and its other streams go on.

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
from collections.abc import Callable, Collection

from .bridge import Bridge
from .channel import EngineChannel, SecureChannel
from .config import InboundConfig
from .hbone import Refusal, parse_connect
from .identity import Identity
from .listen import listen_twin
from .metrics import Metrics
from .permissive import STRICT, PlaintextPolicy, Sniffer
from .policy import Authorizer
from .session import Session, SessionSettings, credentials_changed

logger = logging.getLogger("sidecar.inbound")

__all__ = ["Inbound"]


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
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._connect_timeout = connect_timeout
        # At 0 per declared port from start-up: a strict workload shows 0 on the dashboard,
        # and a port turned permissive later already has its series.
        for port in config.targets:
            metrics.plaintext_accepted.labels(port=str(port))
        # A connection must not outlive the bundles or the SVID that authenticated it.
        identity.subscribe(lambda change: credentials_changed(self.sessions, identity, change))

    def _channel(self, now: float) -> SecureChannel:
        return EngineChannel(self.identity.server_config(), client=False, now=now)

    def _session(self) -> Session:
        session = Session(
            self._channel,
            self._settings,
            self.metrics,
            on_request=self._request,
            on_state=self._state,
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
        request = parse_connect(headers)
        if isinstance(request, Refusal):
            self._refuse(session, stream_id, request.status, request.reason)
            return
        app = self.config.app_for(request.port)
        if app is None or app.port in self.own_ports:
            self._refuse(session, stream_id, 404, f"no local target for port {request.port}")
            return
        caller = session.peer_id  # parsed once by the engine, from the leaf's URI SAN
        decision = self.authorizer().decide(caller, request.port, self.identity.trust_domain)
        if not decision.allowed:
            self.metrics.policy.labels(decision="deny").inc()
            logger.info("denied %s -> port %d: %s", caller, request.port, decision.reason)
            session.refuse(stream_id, 403)
            self.metrics.streams.labels(direction="inbound", outcome="refused").inc()
            return
        self.metrics.policy.labels(decision="allow").inc()

        def connected() -> None:
            if stream_id in session.streams:
                session.respond(stream_id, 200)

        bridge = Bridge(self.metrics, "inbound", on_connected=connected)
        session.accept_stream(stream_id, bridge)
        bridge.attach(session, stream_id)
        task = asyncio.get_running_loop().create_task(
            self._dial(session, stream_id, bridge, app.host, app.port)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial(
        self, session: Session, stream_id: int, bridge: Bridge, host: str, port: int
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: bridge, host, port), self._connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            logger.info("local app %s:%d unreachable: %s", host, port, exc)
            if stream_id in session.streams:
                session.refuse(stream_id, 503)
            bridge.refuse()

    def _refuse(self, session: Session, stream_id: int, status: int, reason: str) -> None:
        logger.info("refused CONNECT on %s: %d %s", session.peername, status, reason)
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
