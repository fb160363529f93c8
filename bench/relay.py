"""A bare TCP relay on uvloop: the floor any Python proxy on this machine pays.

    python3 bench/relay.py LISTEN_PORT TARGET_PORT

Each accepted connection gets its own connection to 127.0.0.1:TARGET_PORT and bytes go
through untouched both ways: the same reads, writes and event-loop wake-ups per message
as a sidecar, with no TLS, no HTTP/2, no policy and no metrics. `sidecar_path.py` chains
two of these in front of the echo app as the baseline for the sidecars' CPU per message.
Prints "ready" once listening.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Side(asyncio.Protocol):
    def __init__(self, peer: _Side | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # read before the other side was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(listen: int, target: int) -> None:
    loop = asyncio.get_running_loop()
    dialling: set[asyncio.Task[None]] = set()  # the loop holds tasks weakly

    async def dial(front: _Side) -> None:
        back = _Side(front)
        await loop.create_connection(lambda: back, "127.0.0.1", target)
        front.peer = back
        assert back.transport is not None
        for data in front.early:
            back.transport.write(data)
        front.early = []

    class _Front(_Side):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            task = loop.create_task(dial(self))
            dialling.add(task)
            task.add_done_callback(dialling.discard)

    await loop.create_server(_Front, "127.0.0.1", listen)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.install()
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2])))
