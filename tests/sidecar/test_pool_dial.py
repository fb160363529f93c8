"""What a pool dial may fail with, over real loopback sockets: the network and the TLS
handshake are failed dials; anything else is a bug and is not dressed up as one."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import pytest

from ca.spiffeid import SpiffeId
from sidecar.bridge import Bridge
from sidecar.channel import SecureChannel
from sidecar.config import Address, PoolConfig
from sidecar.identity import Identity, load_svid_dir
from sidecar.metrics import Metrics
from sidecar.pool import Pool
from tests.support import free_port

from .dataplane.conftest import CLIENT, INTRUDER
from .dataplane.harness import Pki
from .test_inprocess import _server, run


def _client_identity(pki: Pki, workdir: Path) -> Identity:
    identity = Identity()
    identity.update(*load_svid_dir(pki.write(workdir / "client", CLIENT)))
    return identity


def test_a_bug_under_a_dial_propagates_instead_of_counting_as_a_failed_dial() -> None:
    """The bug is planted in the channel factory (a real one has none to trigger); the
    TCP connection it runs on is real."""
    pki = Pki()

    def broken(identity: Identity, expected: tuple[SpiffeId, ...], now: float) -> SecureChannel:
        raise KeyError("a bug, not a network failure")

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            identity = _client_identity(pki, workdir)
            pool = Pool(
                inbound.config.listen, (), identity, Metrics(), PoolConfig(), channel_factory=broken
            )
            with pytest.raises(KeyError):
                await pool._dial()
            assert pool.last_error is None and pool.sessions == []

    run(scenario())


def test_network_and_handshake_failures_are_failed_dials_with_the_reason_kept() -> None:
    pki = Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            identity = _client_identity(pki, workdir)
            closed = Pool(Address("127.0.0.1", free_port()), (), identity, Metrics(), PoolConfig())
            await closed._dial()
            assert closed.last_error is not None and "ConnectionRefusedError" in closed.last_error
            # The server is not who we expect: the engine's TLSError.
            wrong = Pool(
                inbound.config.listen, (SpiffeId(INTRUDER),), identity, Metrics(), PoolConfig()
            )
            await wrong._dial()
            assert wrong.last_error is not None and "TLSError" in wrong.last_error
            assert closed.sessions == [] and wrong.sessions == []

    run(scenario())


def test_a_server_refusing_our_certificate_costs_one_dial_per_app_connection() -> None:
    """TLS 1.3: our side of the handshake finishes before the server has checked our
    certificate, so its refusal arrives as an alert on a connection we thought was up.
    Before, the pool took that for a working connection and dialled again and again
    until the connect timeout."""
    pki, other = Pki(), Pki()

    async def scenario() -> None:
        workdir = Path(tempfile.mkdtemp())
        async with _server(pki, workdir) as inbound:
            inbound.identity.update(bundles={"example.org": (other.root.certificate,)})
            # We still trust the server (its root and the foreign one).
            identity = _client_identity(pki, workdir)
            pool = Pool(inbound.config.listen, (), identity, Metrics(), PoolConfig())
            # Whether the refusal lands before or after the stream was opened on it, the
            # app connection fails (a reset, or ConnectionError from open) after one dial.
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(pool.open("echo:8080", Bridge(Metrics(), "outbound")), 10)
            await asyncio.sleep(0.2)
            assert pool.dials == 1
            refused = inbound.metrics.handshake_failures.labels(
                direction="inbound", reason="unknown_ca"
            )
            assert refused._value.get() == 1

    run(scenario())
