"""Property/fuzz harness: whatever a peer sends, only TLSError leaves the engine.

Bounded for CI through max_examples (a few seconds). A long run is the same tests under
another profile: `HYPOTHESIS_PROFILE=long python3 -m pytest tests/sidecar/tls/test_fuzz.py`.
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.tls import ClientConnection, ServerConnection, TLSError
from sidecar.tls import messages as m
from sidecar.tls.extensions import ClientHelloExtensions

from .pki import NOW, client_config, server_config

settings.register_profile(
    "ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=20000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_CLIENT_CONFIG = client_config()
_SERVER_CONFIG = server_config()
_CLIENT_HELLO_RECORD = ClientConnection(_CLIENT_CONFIG, now=NOW).data_to_send()


def _server_flight() -> bytes:
    client = ClientConnection(_CLIENT_CONFIG, now=NOW)
    server = ServerConnection(_SERVER_CONFIG, now=NOW)
    server.receive_data(client.data_to_send())
    return server.data_to_send()


_SERVER_FLIGHT = _server_flight()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "cut":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def _feed_server(data: bytes) -> None:
    server = ServerConnection(_SERVER_CONFIG, now=NOW)
    try:
        server.receive_data(data)
    except TLSError:
        assert server.data_to_send(), "a fatal alert must be queued with the error"


def _feed_client(data: bytes) -> None:
    client = ClientConnection(_CLIENT_CONFIG, now=NOW)
    client.data_to_send()
    with contextlib.suppress(TLSError):
        client.receive_data(data)


@given(st.binary(max_size=600))
def test_random_bytes_to_a_server_raise_only_tls_error(data: bytes) -> None:
    _feed_server(data)


@given(mutated(_CLIENT_HELLO_RECORD))
def test_mutated_client_hellos_raise_only_tls_error(data: bytes) -> None:
    _feed_server(data)


@given(mutated(_SERVER_FLIGHT))
def test_mutated_server_flights_raise_only_tls_error(data: bytes) -> None:
    _feed_client(data)


_PARSERS = [
    m.pull_client_hello,
    m.pull_server_hello,
    m.pull_encrypted_extensions,
    m.pull_certificate_request,
    m.pull_certificate,
    m.pull_certificate_verify,
    m.pull_new_session_ticket,
    m.pull_key_update,
]


@given(st.sampled_from(_PARSERS), st.binary(max_size=300))
def test_message_parsers_raise_only_tls_error(parser: object, data: bytes) -> None:
    with contextlib.suppress(TLSError):
        parser(data)  # type: ignore[operator]


@given(mutated(_CLIENT_HELLO_RECORD[9:]))
def test_client_hello_extension_views_raise_only_tls_error(body: bytes) -> None:
    with contextlib.suppress(TLSError):
        ClientHelloExtensions.parse(m.pull_client_hello(body).extensions)
