"""Two sidecars on a kernel with kTLS (run inside the QEMU guest, `tests/kernel/guest_vm.py`).

A client sidecar and a server sidecar run in one uvloop event loop, as the sidecar
command runs them, with an echo app behind the server; a client app's bytes go through
both on loopback. Pooled: HTTP/2 stays in user space and the kernel seals and opens the
records (/config says ``ktls``). Direct: one TLS connection per app connection, the
payload spliced between the app sockets and the kTLS sockets (``ktls+splice``). Each
payload comes back whole and byte-identical; nothing is faked.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar import ktls, session
from sidecar.config import load_yaml
from sidecar.dataplane import Sidecar
from tests.sidecar.dataplane.harness import Pki
from tests.support import free_port

CLIENT = "spiffe://example.org/ns/default/sa/client"
ECHO = "spiffe://example.org/ns/default/sa/echo"
# An emulated CPU: sizes that prove record boundaries and bulk without taking minutes.
SIZES = (1, 16385, 4 << 20)
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 240) -> T:
    try:
        import uvloop
    except ImportError:  # the sidecar command falls back the same way (core.eventloop)
        return asyncio.run(asyncio.wait_for(coro, timeout))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True


@asynccontextmanager
async def mesh(mode: str, drain: float = 1) -> AsyncIterator[tuple[Sidecar, Sidecar, int]]:
    """(client sidecar, server sidecar, the client app's upstream port)."""
    pki = Pki()
    workdir = Path(tempfile.mkdtemp(prefix="tr-ktls-guest-"))
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    inbound = free_port()
    server = Sidecar(
        load_yaml(
            f"""
svid_dir: {pki.write(workdir / "server", ECHO)}
admin: "off"
drain_timeout: {drain}
inbound:
  listen: "127.0.0.1:{inbound}"
  targets: {{8080: {{app: "127.0.0.1:{echo_port}", allow: [{{exact: "{CLIENT}"}}]}}}}
"""
        )
    )
    upstream = free_port()
    client = Sidecar(
        load_yaml(
            f"""
svid_dir: {pki.write(workdir / "client", CLIENT)}
admin: "off"
drain_timeout: {drain}
inbound: {{listen: "127.0.0.1:{free_port()}"}}
upstreams:
  - {{name: echo, listen: "127.0.0.1:{upstream}", target: "echo:8080", mode: {mode},
      endpoints: ["127.0.0.1:{inbound}"], spiffe_ids: ["{ECHO}"]}}
"""
        )
    )
    await server.start()
    await client.start()
    try:
        yield client, server, upstream
    finally:
        await client.drain()
        await server.drain()
        echo.close()


async def exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


async def open_echo(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An app connection that carried one round trip and stays open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    return reader, writer


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def settle(check: Callable[[], bool], what: str) -> None:
    for _ in range(400):  # bounded: 20 s
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


@pytest.fixture(autouse=True)
def fresh_counters() -> None:
    ktls._reset_probe()
    ktls.STATS.fallbacks.clear()


def test_pooled_sidecars_hand_their_records_to_the_kernel_and_move_data_intact() -> None:
    async def scenario() -> None:
        async with mesh("pooled") as (client, server, upstream):
            for size in SIZES:
                payload = os.urandom(size)
                back = await exchange(upstream, payload)
                assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            reader, writer = await open_echo(upstream)
            try:
                (pool,) = client.describe()["pools"]
                assert [c["data_path"] for c in pool["connections"]] == ["ktls"]
                inbound = server.describe()["inbound_connections"]
                assert [c["data_path"] for c in inbound] == ["ktls"]
                # The same connection carries the next stream too, still in the kernel.
                writer.write(b"again")
                assert await reader.readexactly(5) == b"again"
            finally:
                writer.close()
            assert sample(client, "trellis_ktls_enabled", direction="outbound") == 1
            assert sample(server, "trellis_ktls_enabled", direction="inbound") == 1
            # The server has no upstream: nothing of its own goes out.
            assert sample(server, "trellis_ktls_enabled", direction="outbound") == 0
            assert ktls.STATS.fallbacks == {}
            assert sample(client, "trellis_sidecar_tls_handshakes_total", direction="outbound") == 1

    run(scenario())


def test_direct_sidecars_splice_each_app_connection_through_its_own_ktls_connection() -> None:
    async def scenario() -> None:
        async with mesh("direct") as (client, server, upstream):
            for size in SIZES:
                payload = os.urandom(size)
                back = await exchange(upstream, payload)
                assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            reader, writer = await open_echo(upstream)
            try:

                def spliced() -> bool:
                    out = client.describe()["direct"]["outbound"]
                    into = server.describe()["direct"]["inbound"]
                    return [link["data_path"] for link in out + into] == ["ktls+splice"] * 2

                await settle(spliced, "both ends of the open connection spliced")
                writer.write(b"spliced")
                assert await reader.readexactly(7) == b"spliced"
            finally:
                writer.close()
            assert sample(client, "trellis_ktls_enabled", direction="outbound") == 1
            assert ktls.STATS.fallbacks == {}
            handshakes = sample(
                client, "trellis_sidecar_tls_handshakes_total", direction="outbound"
            )
            assert handshakes == len(SIZES) + 1  # one TLS connection per app connection

    run(scenario())


def test_a_pooled_ktls_connection_retires_before_its_records_could_need_a_key_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Linux 6.1 cannot rekey kTLS: the budget stands in for the AEAD's limit, made small
    # enough that one 2 MiB exchange (at least 128 records each way) goes past it.
    monkeypatch.setattr(session, "KTLS_RECORD_BUDGET", 64)

    async def scenario() -> None:
        async with mesh("pooled", drain=60) as (client, _server, upstream):
            payload = os.urandom(2 << 20)
            back = await exchange(upstream, payload)
            # The stream in flight finishes on the retiring connection, whole.
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
            closed = "trellis_sidecar_connections_closed_by_us_total"
            assert sample(client, closed, reason="record_limit") == 1
            await settle(lambda: not client.describe()["pools"][0]["connections"], "retired")
            assert await exchange(upstream, b"next") == b"next"
            (pool,) = client.describe()["pools"]
            assert [c["data_path"] for c in pool["connections"]] == ["ktls"]
            handshakes = sample(
                client, "trellis_sidecar_tls_handshakes_total", direction="outbound"
            )
            assert handshakes == 2  # the next stream went to a fresh connection

    run(scenario())
