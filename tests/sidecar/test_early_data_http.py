"""HTTP requests in TLS 0-RTT data (RFC 8470): the replay-safe methods, `Early-Data: 1`
and `425 Too Early`.

The verdicts of ``sidecar.earlydata`` on request bytes, fed whole and one byte at a time.
"""

from __future__ import annotations

import pytest

from sidecar.earlydata import (
    EarlyGate,
    Incomplete,
    Serve,
    TooEarly,
    replay_safe,
    scan,
)

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
