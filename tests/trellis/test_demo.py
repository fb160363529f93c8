"""The demo services: the echo server and the load generator, in process over loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import free_port
from trellis.demo import LoadConfig, LoadGenerator, bulk_upload, start_echo_server
from trellis.demo.wire import WireError, parse_request_head, response_head

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _exchange(port: int, data: bytes, *, until_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if until_close:
        received = await reader.read()
    else:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        received = head + await reader.readexactly(length)
    writer.close()
    return received


def test_echo_answers_two_requests_on_one_kept_alive_connection() -> None:
    async def main() -> tuple[bytes, bytes, int]:
        server = await start_echo_server()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        answers = []
        for body in (b"first", b"second!"):
            writer.write(
                b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            answers.append(await reader.readexactly(len(body)))
        writer.close()
        await server.close()
        return answers[0], answers[1], server.stats.connections

    assert run(main()) == (b"first", b"second!", 1)


def test_echo_answers_pipelined_requests_in_order() -> None:
    async def main() -> bytes:
        server = await start_echo_server()
        requests = (
            b"".join(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\n\r\n%d" % i for i in range(5))
            + b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
        )
        received = await _exchange(server.port, requests, until_close=True)
        await server.close()
        return received

    received = run(main())
    assert [chunk[-1:] for chunk in received.split(b"HTTP/1.1 200 OK")[1:6]] == [
        b"0",
        b"1",
        b"2",
        b"3",
        b"4",
    ]
    assert received.endswith(b"ok\n")


@pytest.mark.parametrize("size", [0, 1, 1024, 1024 * 1024 + 7])
def test_echo_returns_every_payload_size_byte_for_byte(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)

    async def main() -> bytes:
        server = await start_echo_server()
        received = await _exchange(
            server.port, b"POST /e HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + payload
        )
        await server.close()
        return received

    head, _, body = run(main()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert body == payload


def test_echo_serves_n_bytes_and_sinks_a_body_without_echoing_it() -> None:
    async def main() -> tuple[bytes, bytes]:
        server = await start_echo_server()
        filler = await _exchange(server.port, b"GET /bytes/100000 HTTP/1.1\r\n\r\n")
        sink = await _exchange(
            server.port, b"POST /sink HTTP/1.1\r\nContent-Length: 300000\r\n\r\n" + b"s" * 300000
        )
        await server.close()
        return filler, sink

    filler, sink = run(main())
    assert len(filler.partition(b"\r\n\r\n")[2]) == 100000
    assert sink.partition(b"\r\n\r\n")[2] == b"300000\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NONSENSE\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
        (b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n", b"431"),
    ],
)
def test_echo_refuses_a_malformed_request_closes_and_counts_it(
    request_bytes: bytes, status: bytes
) -> None:
    async def main() -> tuple[bytes, int]:
        server = await start_echo_server()
        received = await _exchange(server.port, request_bytes, until_close=True)
        await server.close()
        return received, server.stats.errors

    received, errors = run(main())
    assert received.startswith(b"HTTP/1.1 " + status)
    assert b"Connection: close" in received
    assert errors == 1


def test_echo_metrics_count_requests() -> None:
    async def main() -> bytes:
        server = await start_echo_server()
        await _exchange(server.port, b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
        received = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        await server.close()
        return received

    assert b"trellis_demo_echo_requests_total 1\n" in run(main())


def test_load_generator_paces_open_loop_over_kept_alive_connections() -> None:
    async def main() -> tuple[Any, int]:
        server = await start_echo_server()
        config = LoadConfig("127.0.0.1", server.port, rate=200, duration=1.0, connections=4)
        report = await LoadGenerator(config).run()
        await server.close()
        return report, server.stats.connections

    report, server_connections = run(main())
    assert report.errors == dict.fromkeys(report.errors, 0)
    assert 195 <= report.ok <= 201
    assert report.connections_opened == 4 == server_connections  # keep-alive throughout
    assert report.latency_ms["p50"] < 100


def test_load_generator_closed_loop_finds_a_maximum() -> None:
    async def main() -> Any:
        server = await start_echo_server()
        config = LoadConfig("127.0.0.1", server.port, rate=0, duration=0.5, size=16)
        report = await LoadGenerator(config).run()
        await server.close()
        return report

    report = run(main())
    assert report.ok > 100 and sum(report.errors.values()) == 0


async def _bad_server(respond: Callable[[bytes], bytes | None]) -> tuple[asyncio.Server, int]:
    """A server that answers each request head with ``respond(head)`` (None: hang up)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = parse_request_head(head[:-4]).content_length
                body = await reader.readexactly(length)
                answer = respond(body)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, WireError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@pytest.mark.parametrize(
    ("respond", "kind"),
    [
        (lambda body: response_head(500, 0), "status"),
        (lambda body: response_head(200, len(body)) + body[::-1], "mismatch"),
        (lambda body: None, "reset"),
        (lambda body: b"garbage\r\n\r\n", "protocol"),
    ],
    ids=["status", "mismatch", "reset", "protocol"],
)
def test_load_generator_counts_each_kind_of_error(
    respond: Callable[[bytes], bytes | None], kind: str
) -> None:
    async def main() -> Any:
        server, port = await _bad_server(respond)
        config = LoadConfig("127.0.0.1", port, rate=50, duration=0.4, size=64, timeout=2.0)
        report = await LoadGenerator(config).run()
        server.close()
        return report

    report = run(main())
    assert report.ok == 0
    assert report.errors[kind] == report.sent > 0


def test_load_generator_counts_refused_connections() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        config = LoadConfig("127.0.0.1", port, rate=50, duration=0.3, timeout=1.0)
        report = run(LoadGenerator(config).run())
    assert report.errors["connect"] == report.sent > 0


def test_load_generator_measures_from_intended_send_time_so_a_slow_server_shows() -> None:
    # One connection, 50 ms per response, 100 requests/s offered for 0.5 s: the server can
    # only do 20/s, so requests queue. A closed-loop client would report ~50 ms for each;
    # measured from when each was due, the last ones waited seconds.
    async def main() -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = parse_request_head(head[:-4]).content_length
                    body = await reader.readexactly(length)
                    await asyncio.sleep(0.05)
                    writer.write(response_head(200, len(body)) + body)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = int(server.sockets[0].getsockname()[1])
        config = LoadConfig("127.0.0.1", port, rate=100, duration=0.5, connections=1, size=8)
        report = await LoadGenerator(config).run()
        server.close()
        return report

    report = run(main())
    assert report.ok == 50
    assert report.latency_ms["p50"] > 500 and report.latency_ms["max"] > 1500


def test_bulk_upload_reports_the_time_for_the_whole_body() -> None:
    async def main() -> tuple[float, int]:
        server = await start_echo_server()
        seconds = await bulk_upload("127.0.0.1", server.port, 8 * 1024 * 1024)
        await server.close()
        return seconds, server.stats.bytes_in

    seconds, received = run(main())
    assert seconds > 0 and received >= 8 * 1024 * 1024


def test_load_config_refuses_nonsense() -> None:
    for bad in ({"rate": -1}, {"duration": 0}, {"connections": 0}, {"size": -1}):
        with pytest.raises(ValueError):
            LoadConfig("127.0.0.1", 1, **bad)  # type: ignore[arg-type]


# -- the demo services as processes, with the logging flags of every long-running command ---

REPO = Path(__file__).resolve().parents[2]


def _demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "trellis", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_echo_logs_a_refused_request_as_json_lines_under_the_logging_flags() -> None:
    echo = _demo("echo", "--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "info")
    try:
        assert echo.stdout is not None
        ready = json.loads(echo.stdout.readline())
        port = int(ready["listen"].rpartition(":")[2])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"NONSENSE\r\n\r\n")
            sock.settimeout(10)
            assert sock.recv(1024).startswith(b"HTTP/1.1 400 ")
        echo.send_signal(signal.SIGTERM)
        _, err = echo.communicate(timeout=30)
    finally:
        echo.kill()
        echo.wait(timeout=10)
    assert echo.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]
    events = [(line["level"], line["logger"], line["event"]) for line in lines]
    assert ("info", "trellis.demo.echo", "refused a request") in events, err
    (refused,) = [line for line in lines if line["event"] == "refused a request"]
    assert refused["status"] == 400
    assert lines[-1]["event"] == "echo server stopped"
    assert (lines[-1]["requests"], lines[-1]["refused"]) == (0, 1)


def test_load_logs_its_failed_requests_at_warning_in_text_and_nothing_below_its_level() -> None:
    closed = free_port()  # nothing listens: every request fails to connect
    argv = ["load", "--target", f"127.0.0.1:{closed}", "--rate", "5", "--duration", "1s"]
    quiet = _demo(*argv, "--log-format", "text", "--log-level", "error")
    _, err = quiet.communicate(timeout=60)
    assert quiet.returncode == 0, err
    assert err == ""
    load = _demo(*argv, "--log-format", "text", "--log-level", "warning")
    out, err = load.communicate(timeout=60)
    assert load.returncode == 0, err
    assert json.loads(out)["errors"] > 0
    (line,) = err.splitlines()
    assert " WARNING trellis.demo: load generator stopped " in line
    assert line.split(" errors_by_kind=")[1].startswith('"{\\"connect\\": ')
