"""`sidecar.h2tunnel` against a real HTTP/2 peer (the `h2` library), against itself, and
against malformed, oversized, out-of-order and replayed frames."""

from __future__ import annotations

import contextlib
import os
import struct

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import hyperframe.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.h2tunnel import PREFACE, ErrorCode, H2ProtocolError, H2StateError, H2Tunnel

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"echo.test:8080")]
P = pytest.param
E = ErrorCode
PROTO = ErrorCode.PROTOCOL_ERROR


class Recorder:
    def __init__(self) -> None:
        self.headers: list[tuple[int, list[tuple[bytes, bytes]], bool]] = []
        self.data: dict[int, bytearray] = {}
        self.flow: dict[int, int] = {}
        self.ended: list[int] = []
        self.resets: list[tuple[int, int]] = []
        self.windows: list[int] = []
        self.goaways: list[tuple[int, int, bytes]] = []
        self.ping_acks: list[bytes] = []
        self.settings: list[dict[int, int]] = []

    def h2_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        self.headers.append((stream_id, headers, end))

    def h2_data(self, stream_id: int, data: memoryview, flow_length: int) -> None:
        self.data.setdefault(stream_id, bytearray()).extend(data)
        self.flow[stream_id] = self.flow.get(stream_id, 0) + flow_length

    def h2_end(self, stream_id: int) -> None:
        self.ended.append(stream_id)

    def h2_reset(self, stream_id: int, code: int) -> None:
        self.resets.append((stream_id, code))

    def h2_window(self, stream_id: int) -> None:
        self.windows.append(stream_id)

    def h2_goaway(self, last_stream_id: int, code: int, debug: bytes) -> None:
        self.goaways.append((last_stream_id, code, debug))

    def h2_ping_ack(self, payload: bytes) -> None:
        self.ping_acks.append(payload)

    def h2_settings(self, changed: dict[int, int]) -> None:
        self.settings.append(changed)


def out(tunnel: H2Tunnel) -> bytes:
    return b"".join(bytes(part) for part in tunnel.take_output())


def frames(data: bytes) -> list[hyperframe.frame.Frame]:
    result = []
    view = memoryview(data)
    while view:
        frame, length = hyperframe.frame.Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        result.append(frame)
        view = view[9 + length :]
    return result


def goaway_code(data: bytes) -> int:
    found = [f for f in frames(data) if isinstance(f, hyperframe.frame.GoAwayFrame)]
    assert found, "no GOAWAY sent"
    return int(found[-1].error_code)


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, ftype, flags, stream_id) + payload


def settings_frame(**values: int) -> bytes:
    codes = {"window": 4, "frame": 5, "push": 2, "streams": 3, "table": 1}
    body = b"".join(struct.pack(">HL", codes[k], v) for k, v in values.items())
    return frame(4, 0, 0, body)


def server(*, keep_start: bool = False, **kwargs: int) -> tuple[H2Tunnel, Recorder]:
    rec = Recorder()
    tunnel = H2Tunnel(rec, client=False, **kwargs)
    tunnel.start()
    if not keep_start:
        tunnel.take_output()
    return tunnel, rec


def opened_server(**kwargs: int) -> tuple[H2Tunnel, Recorder]:
    """A server that has read the preface and the client's (empty) SETTINGS."""
    tunnel, rec = server(**kwargs)
    tunnel.receive(PREFACE + settings_frame())
    tunnel.take_output()
    return tunnel, rec


def header_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return hpack.Encoder().encode(headers)


# --- against the h2 library -----------------------------------------------------------


def h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def pump(a: h2.connection.H2Connection, tunnel: H2Tunnel) -> list[h2.events.Event]:
    """Move bytes both ways until quiet; returns the h2 side's events."""
    events: list[h2.events.Event] = []
    for _ in range(50):
        to_tunnel = a.data_to_send()
        if to_tunnel:
            tunnel.receive(to_tunnel)
        to_h2 = out(tunnel)
        if to_h2:
            events += a.receive_data(to_h2)
        if not to_tunnel and not to_h2:
            return events
    raise AssertionError("no quiescence")


def test_h2_client_opens_a_connect_stream_and_exchanges_data_both_ways() -> None:
    tunnel, rec = server(
        keep_start=True, stream_window=1 << 20, connection_window=16 << 20, max_frame=1 << 16
    )
    client = h2_client()
    pump(client, tunnel)
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, CONNECT)
    pump(client, tunnel)
    assert rec.headers == [(stream_id, CONNECT, False)]
    tunnel.send_headers(stream_id, [(b":status", b"200")])
    events = pump(client, tunnel)
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)

    payload = os.urandom(3_000_000)  # three times our stream window: needs our updates
    sent = 0
    while sent < len(payload):
        window = client.local_flow_control_window(stream_id)
        chunk = payload[sent : sent + min(window, client.max_outbound_frame_size)]
        assert chunk, "the tunnel never reopened the window"
        client.send_data(stream_id, chunk)
        sent += len(chunk)
        pump(client, tunnel)
        tunnel.ack(stream_id, rec.flow.pop(stream_id, 0))
        pump(client, tunnel)
    assert bytes(rec.data[stream_id]) == payload

    reply = memoryview(os.urandom(200_000))
    received = bytearray()
    while reply:
        went = tunnel.send_data(stream_id, reply)
        reply = reply[went:]
        for event in pump(client, tunnel):
            if isinstance(event, h2.events.DataReceived):
                received += event.data
                client.acknowledge_received_data(event.flow_controlled_length, stream_id)
        pump(client, tunnel)
    assert len(received) == 200_000

    client.end_stream(stream_id)
    tunnel.end_stream(stream_id)
    events = pump(client, tunnel)
    assert rec.ended == [stream_id]
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    assert stream_id not in tunnel.streams


def test_every_data_frame_fits_one_tls_record() -> None:
    tunnel, _ = opened_server()
    tunnel.receive(frame(1, 0x4, 1, header_block(CONNECT)))
    tunnel.send_headers(1, [(b":status", b"200")])
    tunnel.take_output()
    tunnel.send_data(1, memoryview(os.urandom(60_000)))
    sizes = [9 + f.body_len for f in frames(out(tunnel))]
    assert max(sizes) <= 1 << 14


def test_tunnel_client_against_h2_server_and_ping_goaway() -> None:
    rec = Recorder()
    tunnel = H2Tunnel(rec, client=True)
    tunnel.start()
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    peer.initiate_connection()
    events = peer.receive_data(out(tunnel))
    assert any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events)
    tunnel.receive(peer.data_to_send())
    stream_id = tunnel.open_stream(CONNECT)
    events = peer.receive_data(out(tunnel))
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert dict(request.headers)[b":method"] == b"CONNECT"
    peer.send_headers(stream_id, [(b":status", b"200")])
    peer.send_data(stream_id, b"hello", end_stream=True)
    tunnel.receive(peer.data_to_send())
    assert rec.headers[-1][1] == [(b":status", b"200")]
    assert bytes(rec.data[stream_id]) == b"hello"
    assert rec.ended == [stream_id]

    tunnel.ping(b"12345678")
    events = peer.receive_data(out(tunnel))
    assert any(isinstance(e, h2.events.PingReceived) for e in events)
    tunnel.receive(peer.data_to_send())
    assert rec.ping_acks == [b"12345678"]

    peer.close_connection(last_stream_id=stream_id)
    tunnel.receive(peer.data_to_send())
    assert rec.goaways == [(stream_id, 0, b"")]
    with pytest.raises(H2StateError):
        tunnel.open_stream(CONNECT)


def test_tunnel_to_tunnel_many_streams_and_resets() -> None:
    crec, srec = Recorder(), Recorder()
    client = H2Tunnel(crec, client=True)
    server_side = H2Tunnel(srec, client=False)
    client.start()
    server_side.start()

    def flow() -> None:
        for _ in range(20):
            a, b = out(client), out(server_side)
            if a:
                server_side.receive(a)
            if b:
                client.receive(b)
            if not a and not b:
                return

    flow()
    ids = [client.open_stream(CONNECT) for _ in range(50)]
    flow()
    assert [h[0] for h in srec.headers] == ids
    for sid in ids[:25]:
        server_side.send_headers(sid, [(b":status", b"200")])
    for sid in ids[25:]:
        server_side.reset(sid, ErrorCode.REFUSED_STREAM)
    flow()
    assert sorted(s for s, _ in crec.resets) == ids[25:]
    assert all(code == ErrorCode.REFUSED_STREAM for _, code in crec.resets)
    for sid in ids[:25]:
        client.send_data(sid, memoryview(b"x" * 1000), end_stream=True)
    flow()
    assert all(bytes(srec.data[sid]) == b"x" * 1000 for sid in ids[:25])
    assert sorted(srec.ended) == ids[:25]


def test_settings_change_of_the_initial_window_reaches_open_streams() -> None:
    tunnel, rec = opened_server()
    tunnel.receive(frame(1, 0x4, 1, header_block(CONNECT)))
    assert tunnel.window(1) == 65535
    tunnel.receive(settings_frame(window=100_000))
    assert tunnel.window(1) == 65535  # capped by the connection window
    tunnel.receive(frame(8, 0, 0, struct.pack(">L", 100_000)))
    assert tunnel.window(1) == 100_000
    assert rec.settings[-1] == {4: 100_000}


def test_byte_at_a_time_equals_whole() -> None:
    wire = (
        PREFACE
        + settings_frame(window=70_000)
        + frame(1, 0x4, 1, header_block(CONNECT))
        + frame(0, 0, 1, b"abc")
        + frame(0, 0x8 | 0x1, 1, b"\x02xyz\x00\x00")  # padded, END_STREAM
        + frame(6, 0, 0, b"pingpong")
    )
    whole, whole_rec = server()
    whole.receive(wire)
    split, split_rec = server()
    for i in range(len(wire)):
        split.receive(wire[i : i + 1])
    assert whole_rec.headers == split_rec.headers
    assert whole_rec.data == split_rec.data == {1: bytearray(b"abcxyz")}
    assert whole_rec.flow == {1: 3 + 6}
    assert whole_rec.ended == split_rec.ended == [1]
    assert out(whole) == out(split)


# --- refusals: connection errors ------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        P(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20, PROTO, id="http1"),
        P(PREFACE + frame(6, 0, 0, b"12345678"), PROTO, id="no-settings"),
        P(PREFACE + frame(4, 0, 1), PROTO, id="settings-on-stream"),
        P(PREFACE + frame(4, 0, 0, b"\x00" * 5), E.FRAME_SIZE_ERROR, id="settings-length"),
        P(PREFACE + settings_frame(push=2), PROTO, id="push-2"),
        P(PREFACE + settings_frame(window=1 << 31), E.FLOW_CONTROL_ERROR, id="window-2^31"),
        P(PREFACE + settings_frame(frame=1000), PROTO, id="frame-1000"),
        P(PREFACE + frame(4, 1, 0, b"\x00" * 6), E.FRAME_SIZE_ERROR, id="ack-payload"),
    ],
)
def test_bad_starts_are_connection_errors(wire: bytes, code: ErrorCode) -> None:
    tunnel, _ = server()
    with pytest.raises(H2ProtocolError) as info:
        tunnel.receive(wire)
    assert info.value.code == code
    assert goaway_code(out(tunnel)) == code
    tunnel.receive(frame(6, 0, 0, b"12345678"))  # after the failure: ignored, no raise
    assert out(tunnel) == b""


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        P(frame(0, 0, 0, b"x"), PROTO, id="data-stream-0"),
        P(frame(0, 0, 7, b"x"), PROTO, id="data-idle"),
        P(frame(3, 0, 9, b"\x00\x00\x00\x08"), PROTO, id="rst-idle"),
        P(frame(3, 0, 0, b"\x00\x00\x00\x08"), PROTO, id="rst-stream-0"),
        P(frame(8, 0, 0, b"\x00\x00\x00\x00"), PROTO, id="window-zero"),
        P(frame(8, 0, 0, b"\x7f\xff\xff\xff"), E.FLOW_CONTROL_ERROR, id="window-overflow"),
        P(frame(8, 0, 0, b"\x00\x01"), E.FRAME_SIZE_ERROR, id="window-length"),
        P(frame(6, 0, 0, b"short"), E.FRAME_SIZE_ERROR, id="ping-length"),
        P(frame(6, 0, 3, b"12345678"), PROTO, id="ping-on-stream"),
        P(frame(7, 0, 0, b"\x00"), E.FRAME_SIZE_ERROR, id="goaway-length"),
        P(frame(5, 0x4, 1, b"\x00\x00\x00\x02"), PROTO, id="push-promise"),
        P(frame(9, 0x4, 1, b""), PROTO, id="stray-continuation"),
        P(frame(1, 0x4, 1, b"\xff\xff\xff\xff"), E.COMPRESSION_ERROR, id="bad-hpack"),
        P(frame(1, 0x4, 2, header_block(CONNECT)), PROTO, id="even-stream"),
        P(frame(2, 0, 0, b"\x00" * 5), PROTO, id="priority-stream-0"),
        P(struct.pack(">BHBBL", 2, 0, 0, 0, 1), E.FRAME_SIZE_ERROR, id="oversized-frame"),
        P(
            frame(1, 0, 1, header_block(CONNECT)[:2]) + frame(6, 0, 0, b"12345678"),
            PROTO,
            id="continuation-interrupted",
        ),
        P(
            frame(1, 0x4, 3, header_block(CONNECT)) + frame(1, 0x4, 1, header_block(CONNECT)),
            E.STREAM_CLOSED,
            id="replayed-stream-id",
        ),
    ],
)
def test_malformed_frames_are_connection_errors(wire: bytes, code: ErrorCode) -> None:
    tunnel, _ = opened_server()
    with pytest.raises(H2ProtocolError) as info:
        tunnel.receive(wire)
    assert info.value.code == code
    assert goaway_code(out(tunnel)) == code


def test_oversized_header_block_over_continuations() -> None:
    tunnel, _ = opened_server(max_frame=1 << 16)
    wire = frame(1, 0, 1, b"\x00" * 60_000) + frame(9, 0, 1, b"\x00" * 10_000)
    with pytest.raises(H2ProtocolError) as info:
        tunnel.receive(wire)
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM


def test_a_peer_overrunning_the_windows_is_refused() -> None:
    tunnel, rec = opened_server(stream_window=1000)
    tunnel.receive(frame(1, 0x4, 1, header_block(CONNECT)))
    tunnel.receive(frame(0, 0, 1, b"x" * 1000))
    tunnel.receive(frame(0, 0, 1, b"y"))  # one byte over the stream window
    assert rec.resets == [(1, ErrorCode.FLOW_CONTROL_ERROR)]
    assert [f.error_code for f in frames(out(tunnel)) if f.type == 3] == [3]
    assert bytes(rec.data[1]) == b"x" * 1000

    tunnel, rec = opened_server(stream_window=1 << 20)
    tunnel.receive(frame(1, 0x4, 1, header_block(CONNECT)))
    tunnel.receive(frame(1, 0x4, 3, header_block(CONNECT)))
    tunnel.receive(frame(0, 0, 1, b"x" * 16384) * 3)
    with pytest.raises(H2ProtocolError) as info:
        tunnel.receive(frame(0, 0, 3, b"x" * 16384))  # 64 KiB > 65535 connection window
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


# --- refusals: stream errors leave the connection up ----------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b":method", b"CONNECT")], id="no-authority"),
        pytest.param([*CONNECT, (b":path", b"/")], id="path-on-connect"),
        pytest.param([(b":authority", b"a:1")], id="no-method"),
        pytest.param([(b"x-a", b"1"), *CONNECT], id="pseudo-after-regular"),
        pytest.param([*CONNECT, (b"X-Upper", b"1")], id="uppercase"),
        pytest.param([*CONNECT, (b"connection", b"close")], id="connection-header"),
        pytest.param([*CONNECT, (b":status", b"200")], id="response-pseudo"),
        pytest.param([*CONNECT, (b":method", b"CONNECT")], id="duplicate-pseudo"),
        pytest.param([*CONNECT, (b"x-a", b"a\r\nb")], id="crlf-in-value"),
    ],
)
def test_malformed_requests_reset_only_their_stream(headers: list[tuple[bytes, bytes]]) -> None:
    tunnel, rec = opened_server()
    tunnel.receive(frame(1, 0x4, 1, header_block(headers)))
    sent = frames(out(tunnel))
    assert [(f.type, f.stream_id, f.error_code) for f in sent] == [(3, 1, 1)]
    assert rec.headers == []
    tunnel.receive(frame(1, 0x4, 3, hpack.Encoder().encode(CONNECT)))
    assert [h[0] for h in rec.headers] == [3]


def test_streams_beyond_the_limit_are_refused_not_fatal() -> None:
    tunnel, rec = opened_server(max_concurrent_streams=2)
    encoder = hpack.Encoder()
    for sid in (1, 3, 5):
        tunnel.receive(frame(1, 0x4, sid, encoder.encode(CONNECT)))
    assert [h[0] for h in rec.headers] == [1, 3]
    assert [(f.stream_id, f.error_code) for f in frames(out(tunnel))] == [(5, 7)]
    tunnel.reset(1, ErrorCode.CANCEL)
    tunnel.take_output()
    tunnel.receive(frame(1, 0x4, 7, encoder.encode(CONNECT)))
    assert [h[0] for h in rec.headers] == [1, 3, 7]


def test_data_after_end_stream_and_on_reset_streams() -> None:
    tunnel, rec = opened_server()
    tunnel.receive(frame(1, 0x4 | 0x1, 1, header_block(CONNECT)))
    assert rec.ended == [1]
    tunnel.receive(frame(0, 0, 1, b"late"))
    assert rec.resets == [(1, ErrorCode.STREAM_CLOSED)]
    assert b"late" not in rec.data.get(1, b"")
    # Data in flight on a stream we reset: dropped, but its connection window comes back.
    tunnel.receive(frame(1, 0x4, 3, hpack.Encoder().encode(CONNECT)))
    tunnel.reset(3)
    tunnel.take_output()
    for _ in range(5):
        tunnel.receive(frame(0, 0, 3, b"z" * 16000))
    assert 3 not in rec.data
    updates = [f for f in frames(out(tunnel)) if f.type == 8 and f.stream_id == 0]
    assert updates, "the connection window was never returned"


def test_streams_after_our_goaway_are_ignored() -> None:
    tunnel, rec = opened_server()
    encoder = hpack.Encoder()
    tunnel.receive(frame(1, 0x4, 1, encoder.encode(CONNECT)))
    tunnel.goaway()
    (goaway,) = frames(out(tunnel))
    assert goaway.last_stream_id == 1 and goaway.error_code == 0
    tunnel.receive(frame(1, 0x4, 3, encoder.encode(CONNECT)))
    assert [h[0] for h in rec.headers] == [1]
    tunnel.receive(frame(0, 0x1, 1, b"still here"))  # stream 1 may finish
    assert bytes(rec.data[1]) == b"still here"


def test_a_peer_that_keeps_opening_streams_after_our_goaway_is_cut_off() -> None:
    """Streams after our GOAWAY are ignored, but their headers must still be decoded: a
    peer that keeps sending them while our last streams drain spends the reset budget."""
    from sidecar.h2tunnel import RESET_BUDGET

    tunnel, rec = opened_server()
    encoder = hpack.Encoder()
    tunnel.receive(frame(1, 0x4, 1, encoder.encode(CONNECT)))
    tunnel.goaway()
    tunnel.take_output()
    with pytest.raises(H2ProtocolError) as info:
        for n in range(1, RESET_BUDGET * 10):
            tunnel.receive(frame(1, 0x4, 2 * n + 1, encoder.encode(CONNECT)))
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert n == RESET_BUDGET + 2
    assert goaway_code(out(tunnel)) == ErrorCode.ENHANCE_YOUR_CALM
    assert [h[0] for h in rec.headers] == [1]


def test_local_misuse_raises_state_errors() -> None:
    tunnel, _ = opened_server()
    with pytest.raises(H2StateError):
        tunnel.send_data(1, memoryview(b"x"))
    tunnel.receive(frame(1, 0x4, 1, header_block(CONNECT)))
    tunnel.send_headers(1, [(b":status", b"403")], end_stream=True)
    with pytest.raises(H2StateError):
        tunnel.send_data(1, memoryview(b"x"))
    with pytest.raises(ValueError):
        H2Tunnel(Recorder(), client=True, max_frame=100)
    with pytest.raises(ValueError):
        tunnel.ping(b"short")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_only_protocol_errors_escape(junk: bytes) -> None:
    tunnel, _ = opened_server()
    tunnel.receive(frame(1, 0x4, 1, header_block(CONNECT)))
    try:
        tunnel.receive(junk)
    except H2ProtocolError as exc:
        assert goaway_code(out(tunnel)) == exc.code


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10), st.integers(0, 255), st.integers(0, 7), st.binary(max_size=40)
        ),
        max_size=12,
    )
)
def test_fuzz_well_framed_garbage(parts: list[tuple[int, int, int, bytes]]) -> None:
    tunnel, _ = opened_server()
    wire = b"".join(frame(t, f, s, p) for t, f, s, p in parts)
    with contextlib.suppress(H2ProtocolError):
        tunnel.receive(wire)
    # Whatever happened, what we sent back is well-formed HTTP/2.
    frames(out(tunnel))


def test_settings_are_acknowledged_and_h2_sees_our_limits() -> None:
    tunnel, _ = server(
        keep_start=True, stream_window=1 << 20, max_frame=1 << 16, max_concurrent_streams=7
    )
    client = h2_client()
    events = client.receive_data(out(tunnel))
    changed = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
    values = {k: v.new_value for k, v in changed.changed_settings.items()}
    assert values[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 7
    assert values[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 1 << 20
    assert values[h2.settings.SettingCodes.ENABLE_PUSH] == 0
    tunnel.receive(client.data_to_send())
    acks = [f for f in frames(out(tunnel)) if f.type == 4 and "ACK" in f.flags]
    assert len(acks) == 1


def test_rapid_reset_exhausts_the_budget_and_completed_streams_refill_it() -> None:
    from sidecar.h2tunnel import RESET_BUDGET

    tunnel, rec = opened_server(max_concurrent_streams=1000)
    encoder = hpack.Encoder()
    sid = 1
    # A peer that completes as many streams as it resets is within budget for good.
    for _ in range(RESET_BUDGET * 2):
        tunnel.receive(frame(1, 0x4, sid, encoder.encode(CONNECT)))
        tunnel.receive(frame(3, 0, sid, struct.pack(">L", ErrorCode.CANCEL)))
        tunnel.receive(frame(1, 0x4 | 0x1, sid + 2, encoder.encode(CONNECT)))
        tunnel.send_headers(sid + 2, [(b":status", b"200")], end_stream=True)
        sid += 4
    tunnel.take_output()
    # One that only opens and resets is cut off once the budget is spent.
    with pytest.raises(H2ProtocolError) as info:
        for _ in range(RESET_BUDGET + 1):
            tunnel.receive(frame(1, 0x4, sid, encoder.encode(CONNECT)))
            tunnel.receive(frame(3, 0, sid, struct.pack(">L", ErrorCode.CANCEL)))
            sid += 2
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert goaway_code(out(tunnel)) == ErrorCode.ENHANCE_YOUR_CALM
    assert len(rec.resets) >= RESET_BUDGET * 2 + RESET_BUDGET


# --- header blocks: bounded in frames, bytes and table size updates -------------------


def test_a_continuation_flood_is_cut_off_at_the_frame_bound_whole_or_byte_at_a_time() -> None:
    """CONTINUATION floods (CVE-2024-27316 and kin): empty frames add no bytes to the
    block, so only a count stops them. Fed whole, a thousand are refused in one call;
    fed one byte at a time, the connection error comes with the last byte of the first
    frame past `MAX_CONTINUATIONS`, not one byte later."""
    from sidecar.h2tunnel import MAX_CONTINUATIONS

    opening = frame(1, 0, 1, header_block(CONNECT))  # HEADERS without END_HEADERS
    empty = frame(9, 0, 1)

    whole, rec = opened_server()
    with pytest.raises(H2ProtocolError) as info:
        whole.receive(opening + empty * 1000)
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert goaway_code(out(whole)) == ErrorCode.ENHANCE_YOUR_CALM
    assert rec.headers == []

    split, _ = opened_server()
    wire = opening + empty * (MAX_CONTINUATIONS + 10)
    cut = len(opening) + len(empty) * (MAX_CONTINUATIONS + 1)
    for i in range(len(wire)):
        try:
            split.receive(wire[i : i + 1])
        except H2ProtocolError as exc:
            assert exc.code == ErrorCode.ENHANCE_YOUR_CALM
            break
    else:
        raise AssertionError("the flood was never refused")
    assert i + 1 == cut
    assert goaway_code(out(split)) == ErrorCode.ENHANCE_YOUR_CALM


def test_a_header_block_in_the_most_continuations_allowed_is_accepted() -> None:
    from sidecar.h2tunnel import MAX_CONTINUATIONS

    block = header_block([*CONNECT, (b"x-pad", b"p" * 40)])
    size = -(-len(block) // (MAX_CONTINUATIONS + 1))
    pieces = [block[i * size : (i + 1) * size] for i in range(MAX_CONTINUATIONS + 1)]
    wire = frame(1, 0, 1, pieces[0])
    for n, piece in enumerate(pieces[1:], start=1):
        wire += frame(9, 0x4 if n == MAX_CONTINUATIONS else 0, 1, piece)
    whole, whole_rec = opened_server()
    whole.receive(wire)
    split, split_rec = opened_server()
    for i in range(len(wire)):
        split.receive(wire[i : i + 1])
    assert [h[0] for h in whole_rec.headers] == [1]
    assert whole_rec.headers == split_rec.headers


def test_a_header_list_inflating_past_the_advertised_limit_is_a_compression_error() -> None:
    """An HPACK bomb: 1-byte references to a static entry decode to 42 bytes each. We
    advertise SETTINGS_MAX_HEADER_LIST_SIZE and the decoder stops past it."""
    from sidecar.h2tunnel import MAX_HEADER_BLOCK

    ours = next(f for f in frames(out(server(keep_start=True)[0])) if f.type == 4)
    assert ours.settings[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE] == MAX_HEADER_BLOCK
    tunnel, rec = opened_server()
    bomb = b"\x82" * (MAX_HEADER_BLOCK // 42 + 10)  # ":method: GET", 42 bytes decoded
    assert len(bomb) < MAX_HEADER_BLOCK // 40
    with pytest.raises(H2ProtocolError) as info:
        tunnel.receive(frame(1, 0x4, 1, bomb))
    assert info.value.code == ErrorCode.COMPRESSION_ERROR
    assert rec.headers == []


@pytest.mark.parametrize(
    ("updates", "accepted"),
    [
        P(b"\x20\x3f\xe1\x1f", True, id="two"),  # 0, then 4096: what RFC 7541 §4.2 allows
        P(b"\x20\x3f\xe1\x1f\x20", False, id="three"),
        P(b"\x20" * 16_000, False, id="sixteen-thousand"),
    ],
)
def test_a_header_block_opens_with_at_most_two_table_size_updates(
    updates: bytes, accepted: bool
) -> None:
    tunnel, rec = opened_server()
    wire = frame(1, 0x4, 1, updates + header_block(CONNECT))
    if accepted:
        tunnel.receive(wire)
        assert [h[0] for h in rec.headers] == [1]
        return
    with pytest.raises(H2ProtocolError) as info:
        tunnel.receive(wire)
    assert info.value.code == ErrorCode.COMPRESSION_ERROR
    assert rec.headers == []


# --- refused streams spend the reset budget -------------------------------------------


class Refuser(Recorder):
    """Answers every request the way the inbound side answers a policy refusal
    (`Session.refuse`): a final status with END_STREAM, then RST_STREAM(NO_ERROR)."""

    def __init__(self, status: bytes) -> None:
        super().__init__()
        self.status = status
        self.tunnel: H2Tunnel | None = None

    def h2_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        super().h2_headers(stream_id, headers, end)
        assert self.tunnel is not None
        self.tunnel.send_headers(stream_id, [(b":status", self.status)], end_stream=True)
        self.tunnel.reset(stream_id, ErrorCode.NO_ERROR)


def refusing_server(status: bytes) -> tuple[H2Tunnel, Refuser]:
    rec = Refuser(status)
    tunnel = H2Tunnel(rec, client=False, max_concurrent_streams=1000)
    rec.tunnel = tunnel
    tunnel.start()
    tunnel.receive(PREFACE + settings_frame())
    tunnel.take_output()
    return tunnel, rec


@pytest.mark.parametrize(
    "shape",
    [
        P("headers-then-reset", id="headers-then-reset"),
        P("headers-only", id="headers-only"),
        P("headers-with-end-stream", id="headers-with-end-stream"),
    ],
)
def test_a_refused_peer_opening_streams_in_a_loop_is_cut_off(shape: str) -> None:
    """Rapid reset (CVE-2023-44487) by a peer the policy refuses: every stream is answered
    403 at once, so it never counts against MAX_CONCURRENT_STREAMS, and the peer's own
    RST_STREAM (if any) arrives for a stream already gone. Refusals spend the budget."""
    from sidecar.h2tunnel import RESET_BUDGET

    tunnel, rec = refusing_server(b"403")
    encoder = hpack.Encoder()
    flags = 0x4 | (0x1 if shape == "headers-with-end-stream" else 0)
    with pytest.raises(H2ProtocolError) as info:
        for n in range(RESET_BUDGET * 10):
            sid = 2 * n + 1
            wire = frame(1, flags, sid, encoder.encode(CONNECT))
            if shape == "headers-then-reset":
                wire += frame(3, 0, sid, struct.pack(">L", ErrorCode.CANCEL))
            tunnel.receive(wire)
    assert info.value.code == ErrorCode.ENHANCE_YOUR_CALM
    assert goaway_code(out(tunnel)) == ErrorCode.ENHANCE_YOUR_CALM
    assert len(rec.headers) == RESET_BUDGET + 1


def test_answers_that_are_our_fault_do_not_spend_the_reset_budget() -> None:
    """A 503 (the local app is down) is not the peer's doing: a peer that keeps asking is
    still served."""
    from sidecar.h2tunnel import RESET_BUDGET

    tunnel, rec = refusing_server(b"503")
    encoder = hpack.Encoder()
    for n in range(RESET_BUDGET * 3):
        tunnel.receive(frame(1, 0x4, 2 * n + 1, encoder.encode(CONNECT)))
    assert len(rec.headers) == RESET_BUDGET * 3
    assert not [f for f in frames(out(tunnel)) if f.type == 7]
