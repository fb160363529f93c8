"""A TCP echo app for the data-plane tests: echoes every byte, half-closes on EOF.

`python echo_app.py PORT [HOST [echo|sink]]` listens on HOST:PORT (default 127.0.0.1);
`sink` discards what it reads and answers EOF with the byte count.
"""

from __future__ import annotations

import asyncio
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class Sink(asyncio.Protocol):
    """Reads and discards; answers its peer's EOF with the byte count."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(str(self.count).encode())
        self.transport.write_eof()
        return True


async def main(port: int, host: str, mode: str) -> None:
    loop = asyncio.get_running_loop()
    factory = Sink if mode == "sink" else Echo
    server = await loop.create_server(factory, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    asyncio.run(main(int(sys.argv[1]), host, sys.argv[3] if len(sys.argv) > 3 else "echo"))
