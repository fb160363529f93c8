"""The sidecar's access log: one line per stream, denials shown under the default level.

Real processes on loopback: an echo app behind sidecar B, whose configuration admits one
SPIFFE ID on port 8080; sidecar A-client holds that ID, sidecar A-intruder another. Every
sidecar runs with its default ``--log-level`` (warning) and its standard error in a file,
so it logs JSON lines (``core.logs``), parsed here.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Sequence
from typing import Any

from tests.sidecar.dataplane.conftest import pki, procs  # noqa: F401 (fixtures)
from tests.sidecar.dataplane.harness import (
    Pki,
    Procs,
    Sidecar,
    roundtrip,
    start_echo,
    start_sidecar,
)
from tests.support import free_port, wait_for

CLIENT = "spiffe://example.org/ns/default/sa/client"
SERVER = "spiffe://example.org/ns/default/sa/echo"
INTRUDER = "spiffe://example.org/ns/default/sa/intruder"
RULE = "inbound.targets.8080.allow"


def _caller(registry: Procs, authority: Pki, name: str, spiffe_id: str, b: Sidecar) -> int:
    upstream = free_port()
    start_sidecar(
        registry,
        name,
        {
            "svid_dir": str(authority.write(registry.workdir / f"svid-{name}", spiffe_id)),
            "upstreams": [
                {
                    "name": "echo",
                    "listen": f"127.0.0.1:{upstream}",
                    "target": "echo.default:8080",
                    "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                    "spiffe_ids": [SERVER],
                }
            ],
        },
    )
    return upstream


def _server(registry: Procs, authority: Pki, extra_args: Sequence[str] = ()) -> Sidecar:
    echo = start_echo(registry)
    target = {"app": f"127.0.0.1:{echo}", "allow": [{"exact": CLIENT}]}
    return start_sidecar(
        registry,
        "sidecar-b",
        {
            "svid_dir": str(authority.write(registry.workdir / "svid-b", SERVER)),
            "inbound": {"targets": {8080: target}},
        },
        extra_args=extra_args,
    )


def access_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    lines = []
    for line in sidecar.proc.output().splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and doc.get("logger") == "sidecar.access":
            lines.append(doc)
    return lines


def _refused(port: int) -> None:
    """Connect, send, and see the connection closed (the peer's policy refused it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"hello")
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1024) == b""


def _wait_lines(sidecar: Sidecar, count: int) -> list[dict[str, Any]]:
    wait_for(lambda: len(access_lines(sidecar)) >= count, 15, f"{count} access lines")
    return access_lines(sidecar)


def test_each_stream_is_one_access_line_on_both_sides_and_a_denial_is_a_warning(
    procs: Procs,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    b = _server(procs, pki)
    client_port = _caller(procs, pki, "sidecar-client", CLIENT, b)
    intruder_port = _caller(procs, pki, "sidecar-intruder", INTRUDER, b)
    a_client = procs.running[-2]
    a_intruder = procs.running[-1]
    payload = b"x" * 10_000
    assert roundtrip(client_port, payload) == payload
    _refused(intruder_port)

    allowed, denied = sorted(_wait_lines(b, 2), key=lambda line: line["outcome"] == "denied")
    assert allowed["level"] == "info"
    assert allowed["direction"] == "inbound"
    assert (allowed["peer"], allowed["port"], allowed["status"]) == (CLIENT, 8080, 200)
    assert (allowed["outcome"], allowed["rule"]) == ("ok", RULE)
    assert allowed["bytes_received"] == allowed["bytes_sent"] == len(payload)
    assert allowed["duration_ms"] >= 0
    assert denied["level"] == "warning"
    assert (denied["peer"], denied["port"], denied["status"]) == (INTRUDER, 8080, 403)
    assert (denied["outcome"], denied["rule"]) == ("denied", RULE)
    assert denied["reason"] == f"{INTRUDER} matches no rule for port 8080"

    client_side = Sidecar(a_client, 0, 0, {})
    (outbound,) = _wait_lines(client_side, 1)
    assert (outbound["direction"], outbound["peer"]) == ("outbound", SERVER)
    assert (outbound["authority"], outbound["outcome"]) == ("echo.default:8080", "ok")
    assert outbound["bytes_sent"] == outbound["bytes_received"] == len(payload)
    # The caller's own sidecar names the rule that refused it, at WARNING too.
    (refused,) = _wait_lines(Sidecar(a_intruder, 0, 0, {}), 1)
    assert (refused["level"], refused["outcome"], refused["status"]) == ("warning", "denied", 403)
    assert refused["rule"] == RULE


def test_with_the_access_log_off_only_denials_are_logged_here_as_text(
    procs: Procs,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    b = _server(procs, pki, ["--access-log", "off", "--log-format", "text"])
    client_port = _caller(procs, pki, "sidecar-client", CLIENT, b)
    intruder_port = _caller(procs, pki, "sidecar-intruder", INTRUDER, b)
    assert roundtrip(client_port, b"ping") == b"ping"
    _refused(intruder_port)

    def denial_line() -> str | None:
        return next((ln for ln in b.proc.output().splitlines() if "outcome=denied" in ln), None)

    wait_for(lambda: denial_line() is not None, 15, "the denial's log line")
    line = denial_line()
    assert line is not None
    assert f" WARNING sidecar.access: denied {INTRUDER} -> port 8080 direction=inbound " in line
    assert f"peer={INTRUDER} port=8080 status=403 outcome=denied rule={RULE} " in line
    # The allowed stream has ended (counted), and left no line.
    ended = 'trellis_sidecar_streams_total{direction="inbound",outcome="ok"}'
    wait_for(lambda: b.metric(ended) == 1, 15, "the allowed stream's end")
    assert "outcome=ok" not in b.proc.output()
