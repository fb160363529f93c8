"""CONNECT parsing: a target or the status that refuses it."""

from __future__ import annotations

import pytest

from sidecar.hbone import ConnectRequest, Refusal, parse_connect


def test_a_connect_with_host_and_port_is_a_target() -> None:
    assert parse_connect([(b":method", b"CONNECT"), (b":authority", b"echo.default:8080")]) == (
        ConnectRequest("echo.default", 8080)
    )
    ipv6 = parse_connect([(b":method", b"CONNECT"), (b":authority", b"[fd00::1]:443")])
    assert ipv6 == ConnectRequest("fd00::1", 443) and ipv6.authority == "[fd00::1]:443"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b":method", b"GET"), (b":authority", b"a:1")], 405),
        ([(b":method", b"CONNECT")], 400),
        ([(b":method", b"CONNECT"), (b":authority", b"a")], 400),
        ([(b":method", b"CONNECT"), (b":authority", b"a:0")], 400),
        ([(b":method", b"CONNECT"), (b":authority", b"a:123456")], 400),
        ([(b":method", b"CONNECT"), (b":authority", b":80")], 400),
        ([(b":method", b"CONNECT"), (b":authority", b"\xff:80")], 400),
        ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a:1")], 400),
    ],
)
def test_anything_else_is_refused_with_a_status(
    headers: list[tuple[bytes, bytes]], status: int
) -> None:
    result = parse_connect(headers)
    assert isinstance(result, Refusal) and result.status == status
