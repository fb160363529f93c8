"""0-RTT (RFC 8446 §2.3, §4.2.10, §8): who may send it, and the server's three defences.

The replay tests capture a real client's first flight (ClientHello, the dummy
change_cipher_spec and the early-data records) and send those exact bytes again over a
loopback socket to a server engine, as an attacker on the path would; time is the
server's injected `now`. Before this feature no ticket existed, so nothing was 0-RTT.
"""

from __future__ import annotations

import dataclasses

import pytest

from sidecar.tls import AlertDescription, ClientConnection, ServerConnection, TLSError
from sidecar.tls.replay import ReplayCache

from .helpers import drain, feed, pump
from .pki import SERVER_ID
from .resumption_support import (
    ENDPOINT,
    T0,
    Mesh,
    completed,
    connect,
    replay,
    run_client,
    serving,
    stek,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def _early_client(
    mesh: Mesh, now: float, data: bytes = REQUEST, **overrides: object
) -> ClientConnection:
    return ClientConnection(
        mesh.client(**overrides),
        "x.example.org",
        now,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
        early_data=data,
        replay_safe=True,
    )


def _with_ticket(now: float = T0) -> Mesh:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), now)
    return mesh


def test_replay_safe_early_data_is_accepted_and_flagged_as_early() -> None:
    mesh = _with_ticket()
    client, server = connect(mesh.client(), mesh.server(), T0 + 2, REQUEST, replay_safe=True)
    events = drain(server)
    early = [e for e in events if getattr(e, "early", False)]
    assert [e.data for e in early] == [REQUEST]  # type: ignore[attr-defined]
    assert completed(events).early_data == "accepted"
    assert completed(drain(client)).early_data == "accepted"


def test_early_data_not_marked_replay_safe_is_never_sent() -> None:
    mesh = _with_ticket()
    client, server = connect(mesh.client(), mesh.server(), T0 + 2, REQUEST, replay_safe=False)
    assert completed(drain(client)).early_data == "none"
    assert not [e for e in drain(server) if getattr(e, "early", False)]


def test_early_data_is_only_sent_when_resuming() -> None:
    client = ClientConnection(
        Mesh().client(),
        "x.example.org",
        T0,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
        early_data=REQUEST,
        replay_safe=True,
    )
    assert len(client.data_to_send()) < 2000  # the ClientHello alone, no early record
    assert client.data_to_send() == b""


def test_early_data_over_the_tickets_limit_is_not_sent() -> None:
    mesh = _with_ticket()
    client, _server = connect(mesh.client(), mesh.server(), T0 + 2, bytes(16385), replay_safe=True)
    assert completed(drain(client)).early_data == "none"


def test_the_same_client_hello_and_early_data_replayed_to_one_replica_is_rejected() -> None:
    mesh = _with_ticket()
    client = _early_client(mesh, T0 + 2)
    captured = client.data_to_send()
    config = mesh.server(b"replica-a")
    with serving(config, T0 + 2) as (port, first):
        run_client(client, port, captured)
    assert first.early_data == [REQUEST]
    assert completed(drain(client)).early_data == "accepted"
    with serving(config, T0 + 3) as (port, second):
        answer = replay(port, captured)
    assert answer  # the server answered: a resumed 1-RTT handshake, not an error
    assert second.error is None
    assert second.early_data == []


def test_early_data_replayed_to_another_replica_is_rejected_in_strict_mode() -> None:
    mesh = _with_ticket()
    client = _early_client(mesh, T0 + 2)
    captured = client.data_to_send()
    with serving(mesh.server(b"replica-a"), T0 + 2) as (port, first):
        run_client(client, port, captured)
    assert first.early_data == [REQUEST]
    # replica-b shares the STEK ring, so the ticket opens there, but its single-use cache
    # never saw it: strict mode accepts early data only where the ticket was issued.
    with serving(mesh.server(b"replica-b"), T0 + 3) as (port, second):
        replay(port, captured)
    assert second.error is None and second.early_data == []


def test_early_data_replayed_after_the_ticket_age_window_is_rejected() -> None:
    mesh = _with_ticket()
    captured = _early_client(mesh, T0 + 2).data_to_send()
    # Never delivered in time: replayed 11 s after it was sent, past the 10 s window.
    with serving(mesh.server(b"replica-a"), T0 + 13) as (port, served):
        replay(port, captured)
    assert served.error is None and served.early_data == []


def test_early_data_within_the_window_at_the_issuing_replica_is_accepted_once() -> None:
    mesh = _with_ticket()
    captured = _early_client(mesh, T0 + 2).data_to_send()
    with serving(mesh.server(b"replica-a"), T0 + 11) as (port, served):
        replay(port, captured)
    assert served.early_data == [REQUEST]  # 9 s late is within the window, the first time


def test_a_full_replay_cache_rejects_early_data_rather_than_accept_it_unchecked() -> None:
    mesh = _with_ticket()
    full = ReplayCache(capacity=1)
    assert full.admit(b"another ticket", T0, T0 + 100)
    mesh.caches[b"replica-a"] = full
    client = _early_client(mesh, T0 + 2)
    with serving(mesh.server(b"replica-a"), T0 + 2) as (port, served):
        run_client(client, port)
    assert served.early_data == []
    assert completed(drain(client)).early_data == "rejected"
    assert full.full_rejections == 1


def test_rejected_early_data_falls_back_to_1rtt_and_the_client_sends_it_again() -> None:
    mesh = _with_ticket()
    client = _early_client(mesh, T0 + 2)
    server = ServerConnection(mesh.server(b"replica-b"), now=T0 + 2)
    pump(client, server)
    assert client.handshake_complete and server.handshake_complete
    assert completed(drain(client)).early_data == "rejected"
    server_events = drain(server)
    assert completed(server_events).early_data == "rejected"
    assert completed(server_events).session_resumed
    client.send_application_data(REQUEST)
    pump(client, server)
    assert [(e.data, e.early) for e in drain(server)] == [(REQUEST, False)]  # type: ignore[attr-defined]


def test_early_data_offered_before_a_hello_retry_request_is_skipped() -> None:
    mesh = _with_ticket()
    from sidecar.tls import NamedGroup

    client = _early_client(mesh, T0 + 2, key_share_groups=(NamedGroup.x25519,))
    server = ServerConnection(mesh.server(), now=T0 + 2)
    pump(client, server)
    assert client.handshake_complete and server.handshake_complete
    assert completed(drain(client)).early_data == "rejected"
    server_events = drain(server)
    assert not [e for e in server_events if getattr(e, "early", False)]
    assert completed(server_events).early_data == "rejected"  # counted as a rejection


def test_early_data_with_a_ticket_the_server_cannot_open_is_rejected_in_a_full_handshake() -> None:
    mesh = _with_ticket()
    client = _early_client(mesh, T0 + 2)
    stranger = Mesh()
    stranger.ring.install(stek(50), [], None)  # a ring that never held the ticket's key
    server = ServerConnection(stranger.server(), now=T0 + 2)
    pump(client, server)
    assert client.handshake_complete and server.handshake_complete
    server_done = completed(drain(server))
    assert not server_done.session_resumed and server_done.early_data == "rejected"
    assert completed(drain(client)).early_data == "rejected"


def _inflate_ticket_limit(mesh: Mesh, limit: int) -> None:
    """The client trusts a ticket's max_early_data_size: make it claim `limit`."""
    stored = mesh.store.take((ENDPOINT, str(SERVER_ID)), T0, 0)
    assert stored is not None
    ticket = dataclasses.replace(stored.ticket, max_early_data_size=limit)
    mesh.store.put((ENDPOINT, str(SERVER_ID)), ticket, stored.received, 0)


def test_early_data_beyond_the_tickets_own_limit_is_unexpected_message() -> None:
    mesh = _with_ticket()
    _inflate_ticket_limit(mesh, 20000)
    client = _early_client(mesh, T0 + 2, bytes(20000))
    server = ServerConnection(mesh.server(), now=T0 + 2)
    with pytest.raises(TLSError) as caught:
        server.receive_data(client.data_to_send())
    # RFC 8446 §4.2.10: more than max_early_data_size (16384 in the ticket) is refused.
    assert caught.value.alert == AlertDescription.unexpected_message


def test_rejected_early_data_is_skipped_only_up_to_a_bound() -> None:
    mesh = _with_ticket()
    _inflate_ticket_limit(mesh, 70000)
    client = _early_client(mesh, T0 + 2, bytes(70000))
    server = ServerConnection(mesh.server(b"replica-b"), now=T0 + 2)  # rejects: strict
    with pytest.raises(TLSError) as caught:
        server.receive_data(client.data_to_send())
    assert caught.value.alert == AlertDescription.unexpected_message


@pytest.mark.parametrize("replica", [b"replica-a", b"replica-b"], ids=["accepted", "rejected"])
def test_a_0rtt_flight_fed_one_byte_at_a_time_gives_the_same_outcome(replica: bytes) -> None:
    mesh = _with_ticket()
    client = _early_client(mesh, T0 + 2)
    server = ServerConnection(mesh.server(replica), now=T0 + 2)
    feed(server, client.data_to_send(), bytewise=True)
    feed(client, server.data_to_send(), bytewise=True)
    feed(server, client.data_to_send(), bytewise=True)
    assert server.handshake_complete
    events = drain(server)
    early = [e.data for e in events if getattr(e, "early", False)]  # type: ignore[attr-defined]
    if replica == b"replica-a":
        assert b"".join(early) == REQUEST and completed(events).early_data == "accepted"
    else:
        assert early == [] and completed(events).early_data == "rejected"
