"""A plain TCP echo server: each line comes back prefixed with ``$POD_NAME`` (set by the
downward API in the pod), so a caller can tell which pod answered.

Usage: ``python -m tests.kube.apps.echo PORT [HOST]``; prints ``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import os
import sys


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    name = os.environ.get("POD_NAME", "echo")
    try:
        while line := await reader.readline():
            writer.write(f"{name} ".encode() + line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port: int, host: str) -> None:
    server = await asyncio.start_server(_serve, host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"))
