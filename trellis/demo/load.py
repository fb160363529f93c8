"""The demo HTTP/1.1 load generator: keep-alive connections, open-loop pacing.

Theory of operation. A *dispatcher* puts one intended send time per request on a queue,
``start + i / rate``, whatever the server is doing; ``connections`` *workers*, each with
one keep-alive connection, take the next intended time, send a ``POST`` with the payload,
and record ``response time - intended time``. When the server stalls, requests wait in the
queue and that wait is part of their latency: a closed-loop client would instead send
less and report only the latencies of the requests it managed to send (coordinated
omission). With ``rate=0`` the workers run closed-loop, back to back, to find the maximum;
there latency runs from the actual send.

Every response body is compared with what was sent, so a proxy that corrupts, truncates or
reorders bytes shows up as ``mismatch`` errors, never as success. Errors are counted by
kind (``connect``, ``reset``, ``timeout``, ``status``, ``mismatch``, ``protocol``); after
one the worker drops its connection and opens a new one for the next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trellis.demo.wire import MAX_HEAD, WireError, parse_request_head, parse_response_head
from trellis.demo.wire import request_head as _request_head
from trellis.demo.wire import response_head as _response_head

__all__ = [
    "ERROR_KINDS",
    "LoadConfig",
    "LoadGenerator",
    "LoadReport",
    "LoadStats",
    "bulk_upload",
    "percentile",
    "start_metrics_server",
]

ERROR_KINDS = ("connect", "reset", "timeout", "status", "mismatch", "protocol")
_RECENT = 20_000  # latencies kept for the live quantiles of a run without an end


class _RequestFailed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class LoadConfig:
    host: str
    port: int
    rate: float = 100.0  # requests/s offered; 0: closed loop, as fast as the server answers
    duration: float | None = 10.0  # seconds; None: until stop()
    size: int = 1024  # request body bytes (echoed back, so the response is as large)
    connections: int = 8
    timeout: float = 5.0
    path: str = "/echo"

    def __post_init__(self) -> None:
        if self.rate < 0 or not math.isfinite(self.rate):
            raise ValueError("rate must be a finite number >= 0")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be positive")
        if self.size < 0:
            raise ValueError("size must be >= 0")
        if self.connections < 1:
            raise ValueError("connections must be >= 1")
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")


@dataclass(slots=True)
class LoadStats:
    """Live counters (what ``/metrics`` shows while a run goes on)."""

    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    connections_opened: int = 0
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=_RECENT)
    )

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def exposition(self) -> bytes:
        recent = sorted(self.latencies)
        lines = [
            "# TYPE trellis_demo_load_requests_total counter",
            f'trellis_demo_load_requests_total{{outcome="ok"}} {self.ok}',
            *(
                f'trellis_demo_load_requests_total{{outcome="{kind}"}} {count}'
                for kind, count in self.errors.items()
            ),
            "# TYPE trellis_demo_load_connections_opened_total counter",
            f"trellis_demo_load_connections_opened_total {self.connections_opened}",
            "# TYPE trellis_demo_load_latency_seconds summary",
        ]
        for q in (0.5, 0.99):
            value = percentile(recent, q) if recent else float("nan")
            lines.append(f'trellis_demo_load_latency_seconds{{quantile="{q}"}} {value}')
        return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True, slots=True)
class LoadReport:
    offered_rate: float  # 0 for a closed-loop run
    elapsed: float
    sent: int
    ok: int
    errors: dict[str, int]
    connections_opened: int
    latency_ms: dict[str, float]  # p50, p90, p99, p999, max, mean over successful requests

    @property
    def achieved_rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "offered_rps": self.offered_rate,
            "achieved_rps": round(self.achieved_rate, 1),
            "elapsed_s": round(self.elapsed, 3),
            "sent": self.sent,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "errors_by_kind": {k: v for k, v in self.errors.items() if v},
            "connections_opened": self.connections_opened,
            "latency_ms": self.latency_ms,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[min(rank, len(sorted_values) - 1)]


def _summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values.sort()
    out = {
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "p999": percentile(values, 0.999),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }
    return {k: round(v * 1000, 3) for k, v in out.items()}


class _Connection(asyncio.Protocol):
    """One keep-alive client connection: one request at a time, response body read whole."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self._status = 0
        self._length = -1  # body length of the response being read; -1 while in the head
        self._keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_RequestFailed("reset"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if self._length < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD and waiter is not None and not waiter.done():
                    waiter.set_exception(_RequestFailed("protocol"))
                return
            try:
                head = parse_response_head(bytes(self._buffer[:end]))
            except WireError:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(_RequestFailed("protocol"))
                return
            del self._buffer[: end + 4]
            self._status, self._length, self._keep_alive = (
                head.status,
                head.content_length,
                head.keep_alive,
            )
        if len(self._buffer) < self._length:
            return
        body = bytes(self._buffer[: self._length])
        del self._buffer[: self._length]
        self._length = -1
        if waiter is None or waiter.done() or self._buffer:
            # A response nobody asked for, or bytes beyond it: the stream is out of step.
            if waiter is not None and not waiter.done():
                waiter.set_exception(_RequestFailed("protocol"))
            return
        waiter.set_result((self._status, body, self._keep_alive))

    async def request(self, data: Sequence[bytes], timeout: float) -> tuple[int, bytes, bool]:
        transport = self.transport
        if transport is None:
            raise _RequestFailed("reset")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, bytes, bool]] = loop.create_future()
        self._waiter = waiter
        transport.writelines(data)
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_RequestFailed("timeout"))


class LoadGenerator:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.stats = LoadStats()
        self._stopping = asyncio.Event()
        # A bounded run keeps every latency for its report; an endless one (trellis up)
        # only the recent ones, so memory stays flat however long it runs.
        self._keep_all = config.duration is not None
        self._latencies: list[float] = []
        self._payload = os.urandom(config.size)
        host_header = f"{config.host}:{config.port}"
        self._request = (
            _request_head("POST", config.path, host_header, config.size),
            self._payload,
        )

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> LoadReport:
        config = self.config
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + config.duration if config.duration is not None else math.inf
        if config.rate > 0:
            queue: asyncio.Queue[float | None] = asyncio.Queue()
            workers = [
                asyncio.create_task(self._open_loop_worker(queue))
                for _ in range(config.connections)
            ]
            await self._dispatch(queue, start, deadline)
            for _ in workers:
                queue.put_nowait(None)
        else:
            workers = [
                asyncio.create_task(self._closed_loop_worker(deadline))
                for _ in range(config.connections)
            ]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
        elapsed = min(loop.time(), deadline) - start
        stats = self.stats
        return LoadReport(
            offered_rate=config.rate,
            elapsed=elapsed,
            sent=stats.sent,
            ok=stats.ok,
            errors=dict(stats.errors),
            connections_opened=stats.connections_opened,
            latency_ms=_summary_ms(self._latencies if self._keep_all else list(stats.latencies)),
        )

    async def _dispatch(self, queue: asyncio.Queue[float | None], start: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.config.rate
        index = 0
        stopping = self._stopping
        while not stopping.is_set():
            now = loop.time()
            # Everything due by now goes out at once; the intended times stay exact.
            while (due := start + index * interval) <= now and due < end:
                queue.put_nowait(due)
                index += 1
            if due >= end:
                return
            # A plain sleep (no wait_for task per tick); stop() is seen within one interval.
            await asyncio.sleep(due - loop.time())

    async def _open_loop_worker(self, queue: asyncio.Queue[float | None]) -> None:
        connection: _Connection | None = None
        try:
            while (intended := await queue.get()) is not None:
                connection = await self._one(connection, intended)
        finally:
            if connection is not None:
                connection.close()

    async def _closed_loop_worker(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        try:
            while not self._stopping.is_set() and loop.time() < deadline:
                connection = await self._one(connection, loop.time())
        finally:
            if connection is not None:
                connection.close()

    async def _one(self, connection: _Connection | None, intended: float) -> _Connection | None:
        """Send one request; returns the connection to reuse (None after an error)."""
        stats = self.stats
        stats.sent += 1
        try:
            if connection is None or connection.transport is None:
                connection = await self._connect()
            status, body, keep_alive = await connection.request(self._request, self.config.timeout)
            if status != 200:
                raise _RequestFailed("status")
            if body != self._payload:
                raise _RequestFailed("mismatch")
        except _RequestFailed as exc:
            stats.errors[exc.kind] += 1
            if connection is not None:
                connection.close()
            return None
        latency = asyncio.get_running_loop().time() - intended
        stats.ok += 1
        if self._keep_all:
            self._latencies.append(latency)
        stats.latencies.append(latency)
        if not keep_alive:
            connection.close()
            return None
        return connection

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(_Connection, self.config.host, self.config.port),
                self.config.timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise _RequestFailed("connect") from exc
        self.stats.connections_opened += 1
        return protocol


async def bulk_upload(host: str, port: int, nbytes: int, *, chunk: int = 256 * 1024) -> float:
    """``POST /sink`` with ``nbytes`` of body on one connection; returns the seconds taken.

    The clock runs from the first byte written to the server's acknowledgement, which it
    sends only after it has received the whole body.
    """
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
    block = memoryview(os.urandom(chunk))
    try:
        started = time.perf_counter()
        writer.write(_request_head("POST", "/sink", f"{host}:{port}", nbytes))
        left = nbytes
        while left:
            piece = block[: min(left, chunk)]
            writer.write(piece)
            left -= len(piece)
            await writer.drain()
        head = parse_response_head((await reader.readuntil(b"\r\n\r\n"))[:-4])
        body = await reader.readexactly(head.content_length)
        elapsed = time.perf_counter() - started
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    if head.status != 200 or int(body) != nbytes:
        raise RuntimeError(f"bulk upload refused: {head.status} {body[:80]!r}")
    return elapsed


class _MetricsProtocol(asyncio.Protocol):
    def __init__(self, render: Callable[[], bytes]) -> None:
        self._render = render
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._transport.close()
            return
        try:
            head = parse_request_head(bytes(self._buffer[:end]))
        except WireError:
            self._transport.close()
            return
        del self._buffer[: end + 4 + head.content_length]
        if head.target == "/metrics":
            body, status = self._render(), 200
        else:
            body, status = b"not found\n", 404
        content_type = b"text/plain; version=0.0.4"
        response = _response_head(status, len(body), keep_alive=False, content_type=content_type)
        self._transport.writelines((response, body))
        self._transport.close()


async def start_metrics_server(host: str, port: int, render: Callable[[], bytes]) -> asyncio.Server:
    """A minimal ``/metrics`` endpoint (one request per connection)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _MetricsProtocol(render), host, port)
