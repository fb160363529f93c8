"""The demo HTTP/1.1 echo server (an asyncio protocol; keep-alive; pipelining in order).

Routes:

* ``POST``/``PUT`` any path except ``/sink``: 200 with the request body (up to
  ``MAX_ECHO_BODY``; larger is 413, since the echo holds the body in memory).
* ``POST /sink``: reads and discards a body of any size as it arrives, then answers 200
  with the byte count (bulk throughput without buffering).
* ``GET /bytes/N``: 200 with N bytes (N up to ``MAX_ECHO_BODY``).
* ``GET /healthz``: 200 ``ok``. ``GET /metrics``: the server's counters (Prometheus text).
* Anything else: 404; a malformed request: 400 and the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from trellis.demo.wire import (
    MAX_HEAD,
    RequestHead,
    WireError,
    parse_request_head,
    response_head,
)

__all__ = ["MAX_ECHO_BODY", "EchoServer", "EchoStats", "start_echo_server"]

_log = logging.getLogger("trellis.demo.echo")

MAX_ECHO_BODY = 64 * 1024 * 1024
_FILL = b"trellis-" * 8192  # 64 KiB of filler for GET /bytes/N


@dataclass(slots=True)
class EchoStats:
    requests: int = 0
    errors: int = 0  # malformed requests (each answered 4xx/5xx and the connection closed)
    connections: int = 0
    open_connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def exposition(self) -> bytes:
        rows = [
            ("trellis_demo_echo_requests_total", "counter", self.requests),
            ("trellis_demo_echo_errors_total", "counter", self.errors),
            ("trellis_demo_echo_connections_total", "counter", self.connections),
            ("trellis_demo_echo_open_connections", "gauge", self.open_connections),
            ("trellis_demo_echo_received_bytes_total", "counter", self.bytes_in),
            ("trellis_demo_echo_sent_bytes_total", "counter", self.bytes_out),
        ]
        return "".join(f"# TYPE {n} {t}\n{n} {v}\n" for n, t, v in rows).encode()


class _EchoProtocol(asyncio.Protocol):
    """One connection. States: reading a head, reading a body (kept or discarded)."""

    def __init__(self, stats: EchoStats) -> None:
        self._stats = stats
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._request: RequestHead | None = None
        self._remaining = 0  # body bytes still to come for the current request
        self._sink = False  # discard the body instead of keeping it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._stats.connections += 1
        self._stats.open_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._stats.open_connections -= 1
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._stats.bytes_in += len(data)
        if self._sink:
            taken = min(len(data), self._remaining)
            self._remaining -= taken
            if self._remaining:
                return
            data = data[taken:]
            self._finish_sink()
        self._buffer += data
        while self._transport is not None and self._step():
            pass

    def _step(self) -> bool:
        """Handle at most one request from the buffer; True if another may follow."""
        if self._request is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._refuse(431, "request head too large")
                return False
            try:
                request = parse_request_head(bytes(self._buffer[:end]))
            except WireError as exc:
                self._refuse(exc.status, str(exc))
                return False
            del self._buffer[: end + 4]
            self._request = request
            if request.method == "POST" and request.target == "/sink":
                self._sink = True
                self._remaining = request.content_length
                taken = min(len(self._buffer), self._remaining)
                del self._buffer[:taken]
                self._remaining -= taken
                if self._remaining:
                    return False
                self._finish_sink()
                return True
            if request.content_length > MAX_ECHO_BODY:
                self._refuse(413, f"bodies over {MAX_ECHO_BODY} bytes are not echoed")
                return False
        request = self._request
        if len(self._buffer) < request.content_length:
            return False
        body = bytes(self._buffer[: request.content_length])
        del self._buffer[: request.content_length]
        self._request = None
        self._respond(request, body)
        return True

    def _finish_sink(self) -> None:
        request = self._request
        assert request is not None
        self._sink = False
        self._request = None
        self._reply(request, 200, b"%d\n" % request.content_length)

    def _respond(self, request: RequestHead, body: bytes) -> None:
        method, target = request.method, request.target
        if method in ("POST", "PUT"):
            self._reply(request, 200, body)
        elif method == "GET" and target.startswith("/bytes/"):
            size = target[len("/bytes/") :]
            if not size.isdigit() or int(size) > MAX_ECHO_BODY:
                self._reply(request, 400, b"size must be 0..%d\n" % MAX_ECHO_BODY)
                return
            self._reply_filler(request, int(size))
        elif method == "GET" and target == "/healthz":
            self._reply(request, 200, b"ok\n")
        elif method == "GET" and target == "/metrics":
            self._reply(request, 200, self._stats.exposition(), b"text/plain; version=0.0.4")
        elif method in ("GET", "HEAD", "DELETE"):
            self._reply(request, 404, b"not found\n")
        else:
            self._reply(request, 405, b"method not allowed\n")

    def _reply(
        self, request: RequestHead, status: int, body: bytes, content_type: bytes = b""
    ) -> None:
        transport = self._transport
        assert transport is not None
        head = response_head(
            status, len(body), keep_alive=request.keep_alive, content_type=content_type
        )
        transport.writelines((head, body))
        self._stats.requests += 1
        self._stats.bytes_out += len(head) + len(body)
        if not request.keep_alive:
            transport.close()
            self._transport = None

    def _reply_filler(self, request: RequestHead, size: int) -> None:
        transport = self._transport
        assert transport is not None
        head = response_head(200, size, keep_alive=request.keep_alive)
        transport.write(head)
        left = size
        while left:
            chunk = _FILL[: min(left, len(_FILL))]
            transport.write(chunk)
            left -= len(chunk)
        self._stats.requests += 1
        self._stats.bytes_out += len(head) + size
        if not request.keep_alive:
            transport.close()
            self._transport = None

    def _refuse(self, status: int, message: str) -> None:
        transport = self._transport
        assert transport is not None
        body = message.encode() + b"\n"
        transport.writelines((response_head(status, len(body), keep_alive=False), body))
        transport.close()
        self._transport = None
        self._stats.errors += 1
        # Rare (a malformed request), and the one thing a client cannot see for itself.
        _log.info("refused a request", extra={"fields": {"status": status, "reason": message}})


class EchoServer:
    """A listening echo server; ``port`` is the bound port (useful when asked for 0)."""

    def __init__(self, server: asyncio.Server, stats: EchoStats) -> None:
        self._server = server
        self.stats = stats
        self.port = int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> EchoServer:
    stats = EchoStats()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _EchoProtocol(stats), host, port, backlog=1024)
    return EchoServer(server, stats)
