"""A connection lives no longer than what authenticated it: renewal, bundle changes,
withdrawal, in one event loop over real loopback sockets and the real TLS engine (the
identity updates are the calls the Workload API watcher makes), and a client's GOAWAY
that must not cut the streams it opened."""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
from pathlib import Path

import pytest
from cryptography import x509

from sidecar.dataplane import Sidecar
from sidecar.identity import load_svid_dir
from sidecar.metrics import Metrics
from sidecar.session import Session

from .dataplane.conftest import CLIENT, ECHO
from .dataplane.harness import Pki
from .test_inprocess import _client_sidecar, _exchange, _server, run


def _closed(metrics: Metrics, reason: str) -> float:
    value: float = metrics.connections_closed.labels(reason=reason)._value.get()
    return value


def _handshakes(metrics: Metrics) -> float:
    value: float = metrics.handshakes.labels(direction="outbound")._value.get()
    return value


class _Held:
    """An app connection through the client sidecar kept open across an event."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> _Held:
        held = cls(*await asyncio.open_connection("127.0.0.1", port))
        assert await held.echo(b"first") == b"first"
        return held

    async def echo(self, data: bytes) -> bytes:
        self.writer.write(data)
        return await asyncio.wait_for(self.reader.readexactly(len(data)), 5)

    async def finish(self) -> bytes:
        """Half-close and read to EOF: b"" when the stream ended cleanly."""
        self.writer.write_eof()
        rest = await asyncio.wait_for(self.reader.read(), 5)
        self.writer.close()
        return rest


async def _refused(port: int) -> bool:
    """Whether a new app connection is reset (no stream could be had) instead of echoed."""
    try:
        return await asyncio.wait_for(_exchange(port, b"late"), 15) == b""
    except ConnectionError:
        return True


def _only_pool(sidecar: Sidecar) -> list[Session]:
    (pool,) = sidecar.pools.pools.values()
    return list(pool.sessions)


def test_a_renewed_peer_svid_gets_a_fresh_connection_at_the_old_not_after() -> None:
    """Traffic runs without a failure across the notAfter of the SVID the pooled connection
    was made with; the stream in flight then finishes on the old connection."""
    pki = Pki()
    ttl = dt.timedelta(seconds=4)

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            inbound.identity.update(*load_svid_dir(pki.write(workdir / "s1", ECHO, ttl=ttl)))
            svid = inbound.identity.svid
            assert svid is not None
            expiry = svid.not_after.timestamp()
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            try:
                held = await _Held.open(upstream)
                loop = asyncio.get_running_loop()
                now = dt.datetime.now(dt.UTC).timestamp()
                # Renewed at about half-life, as the agent does.
                await asyncio.sleep(max(0.0, (expiry - now) / 2))
                inbound.identity.update(*load_svid_dir(pki.write(workdir / "s2", ECHO)))
                failures = 0
                sent = 0
                deadline = loop.time() + (expiry - dt.datetime.now(dt.UTC).timestamp()) + 2
                while loop.time() < deadline and sent < 400:
                    sent += 1
                    if await _exchange(upstream, b"ping") != b"ping":
                        failures += 1
                    await asyncio.sleep(0.02)
                assert failures == 0 and sent > 10
                # The stream in flight across the notAfter still runs, then ends cleanly.
                assert await held.echo(b"after") == b"after"
                assert await held.finish() == b""
                assert _handshakes(sidecar.metrics) == 2
                assert _closed(sidecar.metrics, "peer_certificate_expired") == 1
                assert _closed(inbound.metrics, "local_certificate_expired") == 1
                # The new connection presents the renewed SVID.
                (fresh,) = [s for s in _only_pool(sidecar) if s.retired is None]
                assert fresh.expires_at is not None and fresh.expires_at > expiry + 60
            finally:
                await sidecar.drain()

    run(scenario(), timeout=60)


def test_a_peer_whose_root_leaves_our_bundle_is_drained_by_either_side() -> None:
    pki, other = Pki(), Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            try:
                held = await _Held.open(upstream)
                roots: tuple[x509.Certificate, ...] = (pki.root.certificate,)
                # A root added beside the old one (a root rotation's overlap) drains nothing.
                both = {"example.org": (*roots, other.root.certificate)}
                sidecar.identity.update(bundles=both)
                inbound.identity.update(bundles=both)
                assert await _exchange(upstream, b"overlap") == b"overlap"
                assert _handshakes(sidecar.metrics) == 1
                # The inbound side stops trusting the caller's root: GOAWAY, the stream in
                # flight finishes, the next app connection needs a handshake that fails.
                inbound.identity.update(bundles={"example.org": (other.root.certificate,)})
                assert _closed(inbound.metrics, "trust_bundle_changed") == 1
                assert await held.echo(b"still") == b"still"
                assert await _refused(upstream)
                refused = inbound.metrics.handshake_failures.labels(
                    direction="inbound", reason="unknown_ca"
                )
                assert refused._value.get() == 1
                assert await held.finish() == b""
                # Trusted again; then the outbound side drops the server's root.
                inbound.identity.update(bundles={"example.org": roots})
                before = _handshakes(sidecar.metrics)
                held = await _Held.open(upstream)
                assert _handshakes(sidecar.metrics) == before + 1
                sidecar.identity.update(bundles={"example.org": (other.root.certificate,)})
                assert _closed(sidecar.metrics, "trust_bundle_changed") == 1
                assert await held.echo(b"still") == b"still"
                assert await _refused(upstream)
                assert await held.finish() == b""
            finally:
                await sidecar.drain()

    run(scenario(), timeout=60)


def test_a_withdrawn_identity_drains_its_connections_and_takes_no_new_ones() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            try:
                held = await _Held.open(upstream)
                # What the watcher does when the agent answers PERMISSION_DENIED.
                sidecar.identity.withdraw()
                assert _closed(sidecar.metrics, "identity_withdrawn") == 1
                assert sidecar.readiness() == (False, "no valid SVID yet")
                expiry = "trellis_sidecar_svid_expiry_timestamp_seconds"
                assert sidecar.metrics.registry.get_sample_value(expiry) == 0
                assert await held.echo(b"still") == b"still"
                assert await _refused(upstream)
                assert await held.finish() == b""
            finally:
                await sidecar.drain()

    run(scenario())


def test_an_svid_for_another_spiffe_id_withdraws_the_old_one_on_the_inbound_side() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            try:
                held = await _Held.open(upstream)
                # The entry now names another workload: connections made as ECHO drain.
                inbound.identity.update(*load_svid_dir(pki.write(workdir / "s2", CLIENT)))
                assert _closed(inbound.metrics, "identity_withdrawn") == 1
                assert await held.echo(b"still") == b"still"
                assert await _refused(upstream)  # the client wants ECHO, not CLIENT
                assert await held.finish() == b""
            finally:
                await sidecar.drain()

    run(scenario())


def test_a_client_goaway_leaves_the_streams_it_opened_running_on_the_server() -> None:
    """RFC 9113 §6.8: the last stream ID in a client's GOAWAY is about server-initiated
    streams. Read as covering the client's own, it made the server reset every stream of
    a draining client sidecar."""
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            try:
                held = await _Held.open(upstream)
                sidecar.pools.drain()  # the client's GOAWAY, as on SIGTERM
                await asyncio.sleep(0.2)
                assert await held.echo(b"still") == b"still"
                assert await held.finish() == b""
            finally:
                await sidecar.drain()

    run(scenario())


def test_a_stream_that_outlives_the_drain_timeout_is_reset_with_its_connection() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            sidecar, upstream = await _client_sidecar(pki, workdir, inbound.config.listen.port)
            sidecar.pools.drain_timeout = 0.5
            try:
                held = await _Held.open(upstream)
                (session,) = _only_pool(sidecar)
                sidecar.identity.withdraw()
                assert await held.echo(b"still") == b"still"
                await asyncio.wait_for(asyncio.shield(session.closed), 5)
                # The app sees its connection reset, not a half-open socket.
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(held.reader.read(), 5)
                held.writer.close()
                assert _only_pool(sidecar) == []
            finally:
                await sidecar.drain()

    run(scenario())
