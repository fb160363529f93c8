"""Fuzzing the resumption path: a mutated resumed ClientHello with 0-RTT, and a mutated
ticket, never get anything but TLSError out of the server engine (test_fuzz's harness
and profiles: bounded in CI, `HYPOTHESIS_PROFILE=long` for a long run)."""

from __future__ import annotations

import contextlib

from hypothesis import given
from hypothesis import strategies as st

from sidecar.tls import ClientConnection, ServerConnection, TLSError
from sidecar.tls.tickets import TicketState

from .pki import SERVER_ID
from .resumption_support import ENDPOINT, T0, Mesh, connect
from .test_fuzz import mutated

_MESH = Mesh()
connect(_MESH.client(), _MESH.server(), T0)
_RESUMED_FLIGHT = ClientConnection(
    _MESH.client(),
    "x.example.org",
    T0 + 1,
    endpoint=ENDPOINT,
    expected_peer=SERVER_ID,
    early_data=b"GET / HTTP/1.1\r\n\r\n",
    replay_safe=True,
).data_to_send()
_SPARE = _MESH.store.take((ENDPOINT, str(SERVER_ID)), T0, 0)
assert _SPARE is not None
_PLAINTEXT = _MESH.ring.open(_SPARE.ticket.ticket, T0)  # a real ticket's plaintext


@given(mutated(_RESUMED_FLIGHT))
def test_a_mutated_resumed_client_hello_with_early_data_only_raises_tls_error(
    data: bytes,
) -> None:
    server = ServerConnection(_MESH.server(), now=T0 + 1)
    with contextlib.suppress(TLSError):
        server.receive_data(data)


@given(st.binary(max_size=64) | (mutated(_PLAINTEXT) if _PLAINTEXT else st.just(b"")))
def test_a_mutated_ticket_plaintext_decodes_or_is_refused(data: bytes) -> None:
    state = TicketState.decode(data)
    assert state is None or isinstance(state, TicketState)
