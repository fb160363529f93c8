"""HTTP/2 abuse over real mTLS to a real inbound sidecar: CONTINUATION floods and rapid
reset by a peer the policy refuses. The attackers hold SVIDs of the trust domain, since
these attacks land after the handshake; the policy runs only once a header block is whole.

Every attack is bounded in frames and every read in time; the assertions are about what
the sidecar answered and counted, never about how fast."""

from __future__ import annotations

import select
import socket
import struct
from typing import Any

import h2.errors
import h2.events
import hpack

from sidecar.h2tunnel import MAX_CONTINUATIONS, RESET_BUDGET

from .conftest import CLIENT, ECHO, INTRUDER
from .harness import Pki, Procs, RawClient, Sidecar, start_echo, start_sidecar

CONNECT = [(":method", "CONNECT"), (":authority", "echo:8080")]
ABUSE = 'trellis_sidecar_connections_closed_by_us_total{reason="abuse"}'
DENIED = 'trellis_sidecar_policy_decisions_total{decision="deny"}'


def _server(procs: Procs, pki: Pki) -> Sidecar:
    """An inbound sidecar whose one target admits CLIENT only."""
    echo = start_echo(procs)
    svid = pki.write(procs.workdir / "svid-b", ECHO)
    return start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(svid),
            "inbound": {
                "targets": {8080: {"app": f"127.0.0.1:{echo}", "allow": [{"exact": CLIENT}]}}
            },
        },
    )


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, ftype, flags, stream_id) + payload


def _answers(client: RawClient, wait: float) -> tuple[list[Any], bool]:
    """What the sidecar sent until it went quiet for `wait` seconds, and whether it closed
    the connection (EOF or reset) meanwhile. At most 1000 reads."""
    events: list[Any] = []
    for _ in range(1000):
        readable, _, _ = select.select([client.sock], [], [], wait)
        if not readable:
            return events, False
        try:
            events += client.receive_events()
        except (ConnectionResetError, BrokenPipeError):
            return events, True
    raise AssertionError("the sidecar never stopped talking")


def _settled(client: RawClient) -> None:
    """Read until the sidecar's SETTINGS arrived and h2 acknowledged them: a raw header
    block sent after that is never interrupted by the client's own SETTINGS ACK."""
    for _ in range(20):
        if any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.receive_events()):
            return
    raise AssertionError("no SETTINGS from the sidecar")


def _goaways(events: list[Any]) -> list[h2.events.ConnectionTerminated]:
    return [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]


def test_a_continuation_flood_gets_goaway_long_before_it_is_all_sent(
    procs: Procs, pki: Pki
) -> None:
    """HEADERS without END_HEADERS, then up to 200,000 empty CONTINUATION frames (1.8 MB):
    the sidecar answers GOAWAY(ENHANCE_YOUR_CALM) once the block passes
    `MAX_CONTINUATIONS` frames and closes the connection, so most of the flood never
    leaves the attacker's socket; another client's request on another connection is
    served. The attacker is an identity the policy refuses: it never needed to be
    allowed. Its send buffer is kept small so the kernel cannot swallow the whole flood
    before the sidecar has read any of it."""
    b = _server(procs, pki)
    good = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-client", CLIENT))
    attacker = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-intruder", INTRUDER))
    attacker.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
    total, batch = 200_000, 1000  # a batch of 9,000 bytes fits one TLS record
    sent = 0
    events: list[Any] = []
    closed = False
    try:
        _settled(attacker)
        attacker.send_plaintext(_frame(1, 0, 1, hpack.Encoder().encode(CONNECT)))
        empties = _frame(9, 0, 1) * batch
        while sent < total and not closed:
            try:
                attacker.send_plaintext(empties)
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            except TimeoutError:
                break  # the sidecar stopped reading without closing: stalled
            sent += batch
            if select.select([attacker.sock], [], [], 0)[0]:
                more, closed = _answers(attacker, 0)
                events += more
                closed = closed or bool(_goaways(more))
        more, closed_later = _answers(attacker, 5)
        events += more
        goaways = _goaways(events)
        assert goaways, f"no GOAWAY after {sent} CONTINUATION frames"
        assert goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert f"more than {MAX_CONTINUATIONS} CONTINUATION".encode() in (
            goaways[0].additional_data or b""
        )
        assert closed or closed_later, "the connection stayed open"
        assert sent <= total // 4, f"{sent} frames went out before the sidecar stopped them"
        assert good.request(CONNECT) == 200
    finally:
        good.close()
        attacker.close()
    assert b.metrics()[ABUSE] == 1
    assert b.proc.alive()


def test_a_refused_identity_resetting_its_streams_is_cut_off_as_abuse(
    procs: Procs, pki: Pki
) -> None:
    """Rapid reset (CVE-2023-44487) by an identity the policy refuses: HEADERS then
    RST_STREAM, up to 5,000 times. Each stream is answered 403 at once, so none counts
    against the stream limit; the sidecar still closes the connection with
    GOAWAY(ENHANCE_YOUR_CALM) after exactly `RESET_BUDGET` + 1 refusals, counts it as
    abuse, and keeps serving the allowed client."""
    b = _server(procs, pki)
    good = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-client", CLIENT))
    attacker = RawClient(b.inbound_port, pki.write(procs.workdir / "svid-intruder", INTRUDER))
    events: list[Any] = []
    closed = False
    try:
        for _ in range(5000 // 50):
            try:
                for _ in range(50):
                    stream_id = attacker.h2.get_next_available_stream_id()
                    attacker.h2.send_headers(stream_id, CONNECT)
                    attacker.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                attacker.flush()
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
            more, closed = _answers(attacker, 0)
            events += more
            if closed or _goaways(more):
                break
        more, closed_later = _answers(attacker, 5)
        events += more
        goaways = _goaways(events)
        assert goaways, "no GOAWAY"
        assert goaways[0].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert closed or closed_later, "the connection stayed open"
        assert good.request(CONNECT) == 200
    finally:
        good.close()
        attacker.close()
    metrics = b.metrics()
    assert metrics[ABUSE] == 1
    assert metrics[DENIED] == RESET_BUDGET + 1
    assert b.proc.alive()
