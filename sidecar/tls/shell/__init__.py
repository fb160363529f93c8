"""The asyncio shell around the sans-I/O engine: sockets, the clock and timers live here.

Theory of operation
-------------------
`TLSShellProtocol` is the protocol asyncio attaches to the plain TCP transport. It owns
one engine `Connection`, feeds it every chunk the socket delivers (with `now` from the
shell's clock), writes whatever `data_to_send()` returns, and turns the engine's events
into calls on the *application* protocol. The application protocol sees a
`TLSTransport`, an `asyncio.Transport` that encrypts on `write()` and sends close_notify
on `write_eof()`/`close()`, so stream readers, `h2` code and aiohttp run over it
unchanged. The application protocol's `connection_made` is called only once the
handshake completed, as with `loop.create_connection(..., ssl=...)`.

Flow control is the TCP transport's: `TLSTransport.write` seals and hands the records
straight to it, so its buffer is the only buffer, and its pause/resume_writing calls are
passed up. `pause_reading` pauses the socket and holds back events already decrypted.

Failures: a `TLSError` from the engine already has its fatal alert queued; the shell
writes it, half-closes (FIN once asyncio's buffer drained) and reads and drops what the
peer still sends for up to a second after that or 64 KiB before it closes, so unread
bytes never make the kernel reset the connection and drop the alert. It reports the
error to whoever awaits the handshake, or as `connection_lost(exc)` afterwards. A
fatal alert from the peer becomes `PeerAlertError`; a stalled handshake `TimeoutError`.
An EOF without close_notify after the handshake is reported as EOF (as asyncio's own TLS
does) and is visible as `get_extra_info("tls_clean_close") is False`.

Use::

    reader, writer = await open_tls_connection(host, port, config=config)
    server = await start_tls_server(handle, host, port, config=config)
    transport, protocol = await create_tls_connection(factory, host, port, config=config)
    server = await create_tls_server(factory, host, port, config=config)
    # or, with asyncio directly (then await shell.handshake_done()):
    _, shell = await loop.create_connection(lambda: TLSClientProtocol(app, config), ...)

`get_extra_info` keys after the handshake: `peercert` (the peer's leaf as a
`cryptography` certificate), `peercert_chain`, `spiffe_id` (canonical, a string), `cipher` (the
`ssl.SSLSocket.cipher()` shape), `cipher_suite`, `tls_version`, `tls_group`,
`signature_scheme`, `alpn_protocol`, `server_name`, `tls_negotiated` (the engine's
`HandshakeComplete`), `traffic_secrets` (for kTLS), `tls_connection` (the engine),
`tls_clean_close`, `tls_session_tickets`; anything else (`peername`, `socket`, ...)
comes from the TCP transport. `sslcontext` and `ssl_object` stay absent: this is not the
`ssl` module.
"""

from .protocol import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    PeerAlertError,
    TLSClientProtocol,
    TLSServerProtocol,
    TLSShellProtocol,
)
from .streams import create_tls_connection, create_tls_server, open_tls_connection, start_tls_server
from .transport import TLSTransport

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "PeerAlertError",
    "TLSClientProtocol",
    "TLSServerProtocol",
    "TLSShellProtocol",
    "TLSTransport",
    "create_tls_connection",
    "create_tls_server",
    "open_tls_connection",
    "start_tls_server",
]
