"""HTTP requests in TLS 0-RTT data (RFC 8470): the replay-safe methods, `Early-Data: 1`
and `425 Too Early`.

The verdicts of ``sidecar.earlydata`` on request bytes, fed whole and one byte at a time;
then a caller sidecar and a callee sidecar in one event loop over real TLS on loopback
(``resumption_mesh``): a GET on a fresh resumed connection goes 0-RTT and reaches the app
with ``Early-Data: 1``; a POST sent early is answered 425 and retried after the handshake;
the captured bytes of a 0-RTT connection sent again reach the app no second time; the
callee's answer to an early GET reaches the caller while the caller's Finished is still
on its way (0.5-RTT data).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sidecar.config import Address, ConfigError, load_yaml
from sidecar.earlydata import (
    EarlyGate,
    Incomplete,
    Serve,
    TooEarly,
    replay_safe,
    scan,
)

from . import resumption_mesh
from .dataplane.harness import Pki
from .resumption_mesh import Tap, mesh, request

T = TypeVar("T")

GET = b"GET /hello HTTP/1.1\r\nHost: echo\r\n\r\n"
POST = b"POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Length: 2\r\n\r\n{}"


def test_a_get_is_served_with_early_data_1_added_before_the_blank_line() -> None:
    verdict = scan(GET)
    assert verdict == Serve(
        b"GET /hello HTTP/1.1\r\nHost: echo\r\nEarly-Data: 1\r\n\r\n", (b"GET",)
    )


def test_pipelined_safe_requests_each_carry_early_data_1() -> None:
    head = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
    options = b"OPTIONS * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
    verdict = scan(GET + head + options)
    assert isinstance(verdict, Serve)
    assert verdict.methods == (b"GET", b"HEAD", b"OPTIONS")
    assert verdict.data.count(b"Early-Data: 1\r\n") == 3


@pytest.mark.parametrize(
    "request_bytes",
    [
        POST,
        b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",  # idempotent, not safe
        b"DELETE /x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"PATCH /x HTTP/1.1\r\nHost: a\r\n\r\n",
        b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n",  # safe, but reflects credentials back
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",  # a body
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # h2c prior knowledge
        b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",  # space before the colon
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",  # obs-fold
        b"\x16\x03\x01\x00\x05hello\r\n\r\n",  # not HTTP at all
    ],
)
def test_anything_but_a_bodiless_safe_request_is_too_early(request_bytes: bytes) -> None:
    assert isinstance(scan(request_bytes), TooEarly)
    assert not replay_safe(request_bytes)


def test_a_safe_request_after_an_unsafe_one_does_not_make_the_burst_safe() -> None:
    assert isinstance(scan(GET + POST), TooEarly)
    assert isinstance(scan(POST + GET), TooEarly)


def test_a_head_still_open_is_incomplete_and_too_early_when_the_early_data_ends() -> None:
    gate = EarlyGate()
    assert gate.feed(GET[:10]) == Incomplete()
    verdict = gate.end()
    assert isinstance(verdict, TooEarly) and "incomplete" in verdict.reason


def test_the_gate_decides_the_same_fed_one_byte_at_a_time() -> None:
    for data, kind in ((GET, Serve), (POST, TooEarly)):
        gate = EarlyGate()
        verdicts = [gate.feed(data[i : i + 1]) for i in range(len(data))]
        decided = [v for v in verdicts if not isinstance(v, Incomplete)]
        assert decided and isinstance(decided[0], kind), (data, decided)
        assert all(isinstance(v, Incomplete) for v in verdicts[: verdicts.index(decided[0])])


def test_more_early_bytes_after_the_served_requests_are_refused() -> None:
    gate = EarlyGate()
    assert isinstance(gate.feed(GET), Serve)
    assert isinstance(gate.feed(GET), TooEarly)


def test_a_stream_without_early_bytes_has_no_verdict() -> None:
    assert EarlyGate().end() is None


def test_an_oversized_head_is_refused_without_waiting_for_its_end() -> None:
    huge = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (20 * 1024)
    assert isinstance(scan(huge), TooEarly)


# --- two sidecars over real TLS (tests/sidecar/resumption_mesh.py) -----------------------


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_a_get_on_a_fresh_resumed_connection_goes_0rtt_and_the_app_sees_early_data_1(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with mesh(Pki(), tmp_path) as m:
            assert await request(m.upstream, GET) == b"GET early=-"  # full handshake
            await m.tickets()
            await m.forget_connections()
            assert await request(m.upstream, GET) == b"GET early=1"
            assert m.server("tls_early_data_total", outcome="accepted") == 1
            assert m.server("tls_resumption_total", kind="ticket") == 1
            assert m.server("trellis_sidecar_early_data_requests_total", decision="served") == 1
            assert m.caller("tls_resumption_total", kind="ticket") == 1
            assert len(m.seen) == 2 and b"Early-Data: 1" in m.seen[1]
            # One stream on the resumed connection, counted once although it was gated.
            assert [s.streams_opened for s in m.inbound.sessions] == [1]

    run(scenario())


def test_a_post_in_early_data_gets_425_and_the_callers_retry_after_the_handshake_succeeds(
    tmp_path: Path,
) -> None:
    """The caller here judges every request replay-safe (as a misconfigured or older
    peer might); the callee is the one that must hold the line."""

    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, early_data=lambda _data: True) as m:
            assert await request(m.upstream, GET) == b"GET early=-"
            await m.tickets()
            await m.forget_connections()
            assert await request(m.upstream, POST) == b"POST early=-"
            assert m.server("tls_early_data_total", outcome="accepted") == 1
            decided = "trellis_sidecar_early_data_requests_total"
            assert m.server(decided, decision="too_early") == 1
            assert m.server(decided, decision="served") == 0
            # The POST reached the app once, after the handshake, unmarked.
            posts = [head for head in m.seen if head.startswith(b"POST")]
            assert len(posts) == 1 and b"Early-Data" not in posts[0]
            assert (
                m.caller("trellis_sidecar_streams_total", direction="outbound", outcome="retried")
                == 1
            )

    run(scenario())


def test_a_replayed_first_flight_reaches_the_app_only_once(tmp_path: Path) -> None:
    """An attacker on the path captures the caller's bytes of a 0-RTT connection and
    sends them again, byte for byte, on a new connection to the same replica."""

    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, tap=True) as m:
            assert m.tap is not None
            assert await request(m.upstream, GET) == b"GET early=-"
            await m.tickets()
            await m.forget_connections()
            assert await request(m.upstream, GET) == b"GET early=1"
            captured = bytes(m.tap.sent[-1])
            assert m.server("tls_early_data_total", outcome="accepted") == 1
            seen = len(m.seen)
            port = m.inbound.config.listen.port
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # The whole capture, then EOF: the server has read every replayed byte by the
            # time it counts the handshake failed (its flight cannot be finished by a
            # Finished made for another ServerHello; it skips what it cannot decrypt).
            writer.write(captured)
            writer.write_eof()
            failed = "trellis_sidecar_tls_handshake_failures_total"
            deadline = asyncio.get_running_loop().time() + 10
            while not m.server(failed, direction="inbound", reason="eof"):
                assert asyncio.get_running_loop().time() < deadline, "the replay completed?"
                await asyncio.sleep(0.01)
            writer.close()
            # The engine admitted the ticket's early data once (its single-use cache):
            # nothing of the replay reached HTTP/2, let alone the app.
            assert m.server("tls_early_data_total", outcome="accepted") == 1
            decided = "trellis_sidecar_early_data_requests_total"
            assert m.server(decided, decision="served") == 1
            assert len(m.seen) == seen

    run(scenario())


def test_an_upstream_is_declared_http_in_the_sidecar_config_and_anything_else_is_refused() -> None:
    upstream = (
        "upstreams:\n  - {{listen: 127.0.0.1:9001, target: echo:8080, "
        "endpoints: [127.0.0.1:15008]{extra}}}\n"
    )
    (plain,) = load_yaml(upstream.format(extra="")).upstreams
    (http,) = load_yaml(upstream.format(extra=", protocol: http")).upstreams
    assert (plain.protocol, http.protocol) == ("tcp", "http")
    with pytest.raises(ConfigError) as refused:
        load_yaml(upstream.format(extra=", protocol: h2"))
    assert "upstreams[0].protocol" in str(refused.value) and "\n" not in str(refused.value)


def test_a_route_neither_side_declares_http_resumes_but_never_sends_early_data(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, upstream_protocol="tcp", callee_http=False) as m:
            await request(m.upstream, GET)
            await m.tickets()
            await m.forget_connections()
            assert await request(m.upstream, GET) == b"GET early=-"
            assert m.server("tls_resumption_total", kind="ticket") == 1
            assert m.server("tls_early_data_total", outcome="accepted") == 0

    run(scenario())


def test_a_caller_learns_from_the_callees_200_that_it_speaks_http_and_sends_the_next_get_early(
    tmp_path: Path,
) -> None:
    """Transparent interception knows no upstream config: the callee's answer says
    ``trellis-app-protocol: http`` (its AccessPolicy's protocol), and that is enough."""

    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, upstream_protocol="tcp") as m:
            assert await request(m.upstream, GET) == b"GET early=-"
            await m.tickets()
            await m.forget_connections()
            assert await request(m.upstream, GET) == b"GET early=1"
            assert m.server("tls_early_data_total", outcome="accepted") == 1

    run(scenario())


def test_early_data_for_a_port_the_callee_does_not_declare_http_is_too_early(
    tmp_path: Path,
) -> None:
    """The caller believes the app speaks HTTP; the callee's policy does not say so, so
    it cannot judge the bytes and answers 425; the retry after the handshake is served."""

    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, callee_http=False) as m:
            await request(m.upstream, GET)
            await m.tickets()
            await m.forget_connections()
            assert await request(m.upstream, GET) == b"GET early=-"
            assert m.server("tls_early_data_total", outcome="accepted") == 1
            decided = "trellis_sidecar_early_data_requests_total"
            assert m.server(decided, decision="too_early") == 1
            assert len(m.seen) == 2 and all(b"Early-Data" not in head for head in m.seen)

    run(scenario())


class _FinishedHolder(Tap):
    """A `Tap` that, once `hold` is set, forwards the caller's bytes only until the
    callee's first answer has reached the caller: what the caller sends after that (its
    EndOfEarlyData and Finished, RFC 8446 §2.3 Figure 4) waits for `released`."""

    def __init__(self, target: Address) -> None:
        super().__init__(target)
        self.hold = False
        self.holding = asyncio.Event()  # the caller's Finished is being held back
        self.released = asyncio.Event()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hold = self.hold
        answered = False
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)

        async def to_callee() -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if hold and answered and not self.released.is_set():
                        self.holding.set()
                        await self.released.wait()
                    up_writer.write(data)
                    await up_writer.drain()
            with contextlib.suppress(OSError):
                up_writer.close()

        async def to_caller() -> None:
            nonlocal answered
            with contextlib.suppress(OSError):
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                    answered = True
            with contextlib.suppress(OSError):
                writer.close()

        await asyncio.gather(to_callee(), to_caller())


def test_the_callees_answer_to_an_early_get_reaches_the_caller_before_the_callers_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0.5-RTT data (RFC 8446 §2.3): the callee's sidecar answers the early GET from its
    own Finished on, so the answer does not wait a round trip for the caller's. A relay
    holds the caller's Finished back; the GET must be answered all the same (before
    this, the callee held the app's answer until that Finished came: the request timed
    out here)."""
    monkeypatch.setattr(resumption_mesh, "Tap", _FinishedHolder)

    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, tap=True) as m:
            holder = m.tap
            assert isinstance(holder, _FinishedHolder)
            try:
                assert await request(m.upstream, GET) == b"GET early=-"
                await m.tickets()
                await m.forget_connections()
                holder.hold = True
                assert await request(m.upstream, GET, timeout=10) == b"GET early=1"
                # The caller had finished and its Finished was still held at the relay:
                # the callee served the GET without it.
                assert holder.holding.is_set()
                resumed = [s for s in m.inbound.sessions if s.resumed or not s.handshake_done]
                assert [s.handshake_done for s in resumed] == [False]
                assert m.server("tls_early_data_total", outcome="accepted") == 0
            finally:
                holder.released.set()
            deadline = asyncio.get_running_loop().time() + 10
            while not m.server("tls_early_data_total", outcome="accepted"):
                assert asyncio.get_running_loop().time() < deadline, "no Finished arrived"
                await asyncio.sleep(0.01)
            assert m.server("tls_resumption_total", kind="ticket") == 1
            assert len(m.seen) == 2 and b"Early-Data: 1" in m.seen[1]

    run(scenario())
