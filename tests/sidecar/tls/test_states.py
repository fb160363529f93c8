"""Each handshake state holds frozen values with only what is valid at its point.

Every state each side enters is recorded (several can pass within one record). What a
state holds may be a frozen dataclass, a proof value (`proofs.py`), a plain immutable
value (a private key among them), or the running transcript hash, and nothing else: no
mutable bag filled in as the handshake goes (what rustls's typed states rule out)."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest

from sidecar.tls import ClientConnection, ServerConnection
from sidecar.tls.connection import HandshakeState, Traffic
from sidecar.tls.keyschedule import Transcript
from sidecar.tls.proofs import FinishedVerified, PeerAuthenticated
from sidecar.tls.signatures import PrivateKey

from .helpers import connected_pair, drain, pump
from .pki import NOW, client_config, server_config

_IMMUTABLE = (bytes, str, int, frozenset, tuple, type(None), FinishedVerified, PeerAuthenticated)


def _is_value(value: object) -> bool:
    if isinstance(value, (*_IMMUTABLE, Transcript, PrivateKey)):
        return True
    params = getattr(type(value), "__dataclass_params__", None)
    return dataclasses.is_dataclass(value) and params is not None and params.frozen


class _RecordingClient(ClientConnection):
    """Keeps every state the connection enters (several can pass within one record)."""

    visited: list[HandshakeState]

    @property
    def _state(self) -> HandshakeState:
        return self.visited[-1]

    @_state.setter
    def _state(self, state: HandshakeState) -> None:
        self.__dict__.setdefault("visited", []).append(state)


class _RecordingServer(ServerConnection):
    visited: list[HandshakeState]

    @property
    def _state(self) -> HandshakeState:
        return self.visited[-1]

    @_state.setter
    def _state(self, state: HandshakeState) -> None:
        self.__dict__.setdefault("visited", []).append(state)


def _states(retry: bool) -> tuple[list[HandshakeState], list[HandshakeState]]:
    # A client that sends no key share gets a HelloRetryRequest first.
    shares: dict[str, object] = {"key_share_groups": ()} if retry else {}
    client = _RecordingClient(client_config(**shares), server_name="x", now=NOW)
    server = _RecordingServer(server_config(), now=NOW)
    pump(client, server)
    assert client.handshake_complete and server.handshake_complete
    return client.visited, server.visited


@pytest.mark.parametrize("retry", [False, True], ids=["one_round_trip", "hello_retry"])
def test_every_handshake_state_holds_only_frozen_values_and_the_transcript(retry: bool) -> None:
    client_states, server_states = _states(retry)
    # ServerHello, EncryptedExtensions, CertificateRequest, Certificate, CertificateVerify,
    # Finished on the client; Certificate, CertificateVerify, Finished on the server.
    assert len(client_states) >= 5 and len(server_states) >= 3
    hellos = [s for s in client_states if type(s).__name__ == "ExpectServerHello"]
    assert len(hellos) == (2 if retry else 1)
    for state in client_states + server_states:
        if isinstance(state, Traffic):
            continue  # built only from proofs; its secrets advance with KeyUpdate
        for name in type(state).__slots__:
            value = getattr(state, name)
            assert _is_value(value), f"{type(state).__name__}.{name} is a {type(value)}"


def test_a_finished_connection_is_freed_by_reference_counting_alone() -> None:
    """The states' context must not tie the connection into a reference cycle: a busy
    sidecar would then hold every closed connection's buffers and keys until the cycle
    collector ran."""
    client, server = connected_pair()
    client.send_application_data(b"x")
    server.receive_data(client.data_to_send())
    drain(server)
    refs = (weakref.ref(client), weakref.ref(server))
    gc.disable()
    try:
        del client, server
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()
