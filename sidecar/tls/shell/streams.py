"""`asyncio.open_connection`/`start_server`/`create_connection`/`create_server` look-alikes
over Trellis TLS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import TLSConfig
from .protocol import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    Clock,
    TLSClientProtocol,
    TLSServerProtocol,
)
from .transport import TLSTransport

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


async def create_tls_connection(
    protocol_factory: ProtocolFactory,
    host: str,
    port: int,
    *,
    config: TLSConfig,
    server_name: str | None = None,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    expected_peer: str | None = None,
    **kwargs: Any,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """Like `loop.create_connection(..., ssl=...)`: returns once the handshake completed.

    `server_name` defaults to `host` (an IP literal sends no SNI). With a
    `config.ticket_store`, tickets are kept per (`host:port`, `expected_peer`) and the
    next connection there offers one (RFC 8446 §2.2). Raises `TLSError`
    (we refused the peer; the alert was sent), `PeerAlertError` (it refused us),
    `TimeoutError` or `OSError`.
    """
    loop = asyncio.get_running_loop()
    app = protocol_factory()
    _, shell = await loop.create_connection(
        lambda: TLSClientProtocol(
            app,
            config,
            server_name=server_name if server_name is not None else host,
            handshake_timeout=handshake_timeout,
            clock=clock,
            endpoint=f"{host}:{port}",
            expected_peer=expected_peer,
        ),
        host,
        port,
        **kwargs,
    )
    try:
        transport = await shell.handshake_done()
    except BaseException:
        shell.abort()
        raise
    return transport, app


async def create_tls_server(
    protocol_factory: ProtocolFactory,
    host: str | None,
    port: int,
    *,
    config: TLSConfig,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    on_error: Callable[[BaseException, Any], None] | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """Like `loop.create_server(..., ssl=...)`; each accepted socket gets its own engine."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: TLSServerProtocol(
            protocol_factory(),
            config,
            handshake_timeout=handshake_timeout,
            clock=clock,
            on_error=on_error,
        ),
        host,
        port,
        **kwargs,
    )


async def open_tls_connection(
    host: str,
    port: int,
    *,
    config: TLSConfig,
    server_name: str | None = None,
    limit: int = 2**16,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like `asyncio.open_connection`, over Trellis TLS."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_tls_connection(
        lambda: protocol,
        host,
        port,
        config=config,
        server_name=server_name,
        handshake_timeout=handshake_timeout,
        clock=clock,
        **kwargs,
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


async def start_tls_server(
    client_connected_cb: ClientConnected,
    host: str | None,
    port: int,
    *,
    config: TLSConfig,
    limit: int = 2**16,
    handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
    clock: Clock = time.time,
    on_error: Callable[[BaseException, Any], None] | None = None,
    **kwargs: Any,
) -> asyncio.Server:
    """Like `asyncio.start_server`: `client_connected_cb(reader, writer)` runs once the
    handshake completed; a failed handshake never reaches it (see `on_error`)."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_tls_server(
        factory,
        host,
        port,
        config=config,
        handshake_timeout=handshake_timeout,
        clock=clock,
        on_error=on_error,
        **kwargs,
    )
