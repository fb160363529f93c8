"""A client's GOAWAY must not cut the streams it opened, in one event loop over real
loopback sockets and the real TLS engine."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from .dataplane.harness import Pki
from .test_inprocess import _client_sidecar, _server, run


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
