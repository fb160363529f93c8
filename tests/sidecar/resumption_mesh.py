"""Two sidecars in one event loop, joined by real TLS over loopback, with resumption on.

The callee: an HTTP/1.1 app recording every request head it reads, behind an `Inbound`
whose port 8080 is declared HTTP and whose identity holds a STEK ring. The ring is
installed by the test itself: it stands in for the agent, which hands a sidecar its
service's ring over the Workload API socket (``sidecar.stek``); the engine, the sockets
and both sidecars' data paths are the real ones. The caller: an `Outbound` with one
upstream declared HTTP, on its own `Identity` and `PoolSet`, optionally dialling through
a `Tap` that records every byte the caller sends (what an attacker on the path sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ca.spiffeid import SpiffeId
from sidecar.config import Address, InboundConfig, InboundTarget, PoolConfig, UpstreamConfig
from sidecar.identity import Identity, load_svid_dir
from sidecar.inbound import Inbound
from sidecar.metrics import Metrics
from sidecar.outbound import Outbound
from sidecar.policy import Authorizer
from sidecar.pool import PoolSet
from sidecar.tls.tickets import Stek, StekRing
from tests.support import free_port

from .dataplane.conftest import CLIENT, ECHO
from .dataplane.harness import Pki

HTTP_PORT = 8080


def new_stek(now: float, lifetime: float = 3 * 3600) -> Stek:
    return Stek(os.urandom(16), os.urandom(32), now - 60, now + lifetime)


class HttpApp(asyncio.Protocol):
    """Reads request heads; answers each with a 200 whose body repeats the method and
    the request's Early-Data header (or "-")."""

    def __init__(self, seen: list[bytes]) -> None:
        self.seen = seen
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            early = b"-"
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"early-data":
                    early = value.strip()
            self.buffer = self.buffer[length:]  # the tests' bodies arrive with the head
            self.seen.append(head)
            body = head.split(b" ", 1)[0] + b" early=" + early
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )


class Tap:
    """A loopback TCP relay that records what the caller sends on each connection (and,
    in `received`, what the callee answers)."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.sent: list[bytearray] = []
        self.received: list[bytearray] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record, answer = bytearray(), bytearray()
        self.sent.append(record)
        self.received.append(answer)
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bytearray | None
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if keep is not None:
                        keep += data
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pump(reader, up_writer, record), pump(up_reader, writer, answer))


@dataclass
class Mesh:
    inbound: Inbound
    server_metrics: Metrics
    ring: StekRing
    seen: list[bytes]
    client: Identity
    client_metrics: Metrics
    pools: PoolSet
    outbound: Outbound
    upstream: int  # the port the caller's app dials
    tap: Tap | None
    make_replica: Callable[[], Any]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def replica(self) -> Any:
        """Another replica of the callee (an async context manager yielding its
        `Inbound` and `Metrics`): same service identity, same app, the same STEK ring,
        its own replica id and replay cache."""
        return self.make_replica()

    def counter(self, metrics: Metrics, name: str, **labels: str) -> float:
        value = metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def server(self, name: str, **labels: str) -> float:
        return self.counter(self.server_metrics, name, **labels)

    def caller(self, name: str, **labels: str) -> float:
        return self.counter(self.client_metrics, name, **labels)

    async def forget_connections(self) -> None:
        """Close every pooled connection, so the next request dials a fresh one."""
        for pool in self.pools.pools.values():
            for session in list(pool.sessions):
                session.close()
        deadline = time.monotonic() + 10
        while any(pool.sessions for pool in self.pools.pools.values()):
            assert time.monotonic() < deadline, "pooled connections did not close"
            await asyncio.sleep(0.01)

    async def tickets(self, count: int = 1) -> None:
        """Wait until the caller holds `count` tickets (they follow the handshake)."""
        deadline = time.monotonic() + 10
        while len(self.client.tickets) < count:
            assert time.monotonic() < deadline, "no session ticket arrived"
            await asyncio.sleep(0.01)


async def request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """One HTTP/1.1 exchange through the caller's upstream port: the response body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            return await reader.readexactly(length)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def mesh(
    pki: Pki,
    workdir: Path,
    *,
    early_data: Callable[[bytes], bool] | None = None,
    tap: bool = False,
    pool: PoolConfig | None = None,
    upstream_protocol: str = "http",
    callee_http: bool = True,
) -> AsyncIterator[Mesh]:
    """`early_data`: the caller's judgement of what may go 0-RTT (default: the
    sidecar's own, `sidecar.earlydata.replay_safe`); `upstream_protocol`: what the
    caller's config declares; `callee_http`: whether the callee's policy declares its
    port HTTP."""
    loop = asyncio.get_running_loop()
    seen: list[bytes] = []
    app = await loop.create_server(lambda: HttpApp(seen), "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    ring = StekRing()
    ring.install(new_stek(time.time()), (), None)
    svid_dir = pki.write(workdir / "server", ECHO)

    async def callee() -> tuple[Inbound, Metrics]:
        identity = Identity()
        identity.update(*load_svid_dir(svid_dir))
        identity.ticket_ring = ring
        metrics = Metrics()
        inbound = Inbound(
            InboundConfig(
                listen=Address("127.0.0.1", free_port()),
                targets={HTTP_PORT: InboundTarget(HTTP_PORT, Address("127.0.0.1", app_port), None)},
            ),
            identity,
            metrics,
            lambda: Authorizer(http_ports=frozenset({HTTP_PORT} if callee_http else ())),
        )
        await inbound.start()
        return inbound, metrics

    @contextlib.asynccontextmanager
    async def replica() -> AsyncIterator[tuple[Inbound, Metrics]]:
        other, metrics = await callee()
        try:
            yield other, metrics
        finally:
            other.drain()

    inbound, server_metrics = await callee()
    relay = Tap(inbound.config.listen) if tap else None
    if relay is not None:
        await relay.start()
    endpoint = Address("127.0.0.1", relay.port if relay else inbound.config.listen.port)
    client = Identity()
    client.update(*load_svid_dir(pki.write(workdir / "client", CLIENT)))
    client_metrics = Metrics()
    pools = PoolSet(client, client_metrics, pool or PoolConfig())
    outbound = (
        Outbound(pools, client_metrics, HTTP_PORT)
        if early_data is None
        else Outbound(pools, client_metrics, HTTP_PORT, early_data=early_data)
    )
    upstream = free_port()
    await outbound.listen_upstream(
        UpstreamConfig(
            "echo",
            Address("127.0.0.1", upstream),
            f"echo:{HTTP_PORT}",
            (endpoint,),
            (SpiffeId(ECHO),),
            upstream_protocol,
        )
    )
    built = Mesh(
        inbound,
        server_metrics,
        ring,
        seen,
        client,
        client_metrics,
        pools,
        outbound,
        upstream,
        relay,
        replica,
    )
    try:
        yield built
    finally:
        outbound.close_listeners()
        pools.drain()
        inbound.drain()
        if relay is not None and relay.server is not None:
            relay.server.close()
        app.close()
        await asyncio.sleep(0.05)
