"""Session tickets and resumption (RFC 8446 §2.2, §4.2.11, §4.6.1) between engine pairs.

The client and server are the real engines in memory; time is the `now` they are given.
Before this feature the server sent no NewSessionTicket, so nothing here could resume.
"""

from __future__ import annotations

import dataclasses

import pytest

from ca.spiffeid import SpiffeId
from sidecar.tls import (
    AlertDescription,
    ClientConnection,
    NamedGroup,
    ServerConnection,
    SessionTicket,
    TLSError,
)
from sidecar.tls.extensions import ExtensionType, pull_offered_psks
from sidecar.tls.messages import pull_client_hello
from sidecar.tls.tickets import Stek, StekRing
from sidecar.tls.ticketstore import TicketStore

from .helpers import drain, pump
from .pki import CLIENT_ID, SERVER_ID
from .resumption_support import ENDPOINT, HOUR, T0, Mesh, completed, connect, ring_at, stek


def _offered_ticket(client: ClientConnection) -> bytes | None:
    """The ticket in the ClientHello a fresh client queued (None if it offered none)."""
    record = client.data_to_send()
    hello = pull_client_hello(record[9 : 9 + int.from_bytes(record[6:9], "big")])
    for ext_type, data in hello.extensions:
        if ext_type == ExtensionType.pre_shared_key:
            return pull_offered_psks(data).identities[0][0]
    return None


def test_the_server_sends_two_tickets_that_land_in_the_clients_store() -> None:
    mesh = Mesh()
    client, server = connect(mesh.client(), mesh.server(), T0)
    tickets = [e for e in drain(client) if isinstance(e, SessionTicket)]
    assert len(tickets) == 2
    assert len({t.ticket for t in tickets}) == 2
    assert tickets[0].peer_spiffe_id == SERVER_ID
    assert len(mesh.store) == 2
    assert not completed(drain(server)).session_resumed


def test_a_ticket_resumes_with_a_fresh_post_quantum_key_exchange_and_no_certificates() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    client = ClientConnection(
        mesh.client(), "x.example.org", T0 + 60, endpoint=ENDPOINT, expected_peer=SERVER_ID
    )
    server = ServerConnection(mesh.server(), now=T0 + 60)
    hello = client.data_to_send()
    server.receive_data(hello)
    flight = server.data_to_send()
    client.receive_data(flight)
    pump(client, server)
    client_done = completed(drain(client))
    server_done = completed(drain(server))
    assert client_done.session_resumed and server_done.session_resumed
    # RFC 8446 §4.2.9 psk_dhe_ke: a fresh hybrid exchange even when resuming.
    assert client_done.group == server_done.group == NamedGroup.X25519MLKEM768
    assert client_done.peer_spiffe_id == SERVER_ID
    assert server_done.peer_spiffe_id == CLIENT_ID
    # No Certificate or CertificateVerify: the server flight is far below a full one's.
    full_client, full_server = (
        ClientConnection(mesh.client(), "x.example.org", T0),
        ServerConnection(mesh.server(), now=T0),
    )
    full_server.receive_data(full_client.data_to_send())
    assert len(flight) + 600 < len(full_server.data_to_send())


def test_each_ticket_is_offered_once() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    seen: list[bytes | None] = []
    for _ in range(4):
        client = ClientConnection(
            mesh.client(), "x.example.org", T0 + 1, endpoint=ENDPOINT, expected_peer=SERVER_ID
        )
        seen.append(_offered_ticket(client))
    assert seen[0] is not None and seen[1] is not None and seen[0] != seen[1]
    assert seen[2:] == [None, None]  # two tickets, two offers, then full handshakes


def test_a_ticket_issued_by_one_replica_resumes_at_another() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(b"replica-a"), T0)
    client, server = connect(mesh.client(), mesh.server(b"replica-b"), T0 + 5)
    assert completed(drain(client)).session_resumed
    assert completed(drain(server)).session_resumed


def test_a_ticket_is_only_offered_to_the_identity_expected_at_that_endpoint() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    other = SpiffeId("spiffe://example.org/ns/default/sa/other")
    client = ClientConnection(
        mesh.client(), "x.example.org", T0 + 1, endpoint=ENDPOINT, expected_peer=other
    )
    assert _offered_ticket(client) is None


def test_a_trust_bundle_change_drops_the_clients_tickets() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    client = ClientConnection(
        mesh.client(trust_generation=1),
        "x.example.org",
        T0 + 1,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
    )
    assert _offered_ticket(client) is None
    assert len(mesh.store) == 0


def test_ticket_lifetime_never_passes_the_peers_svid_expiry() -> None:
    from .pki import client_config, server_config

    store = TicketStore()
    client = ClientConnection(
        client_config(ticket_store=store),
        "x.example.org",
        T0,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
    )
    server = ServerConnection(server_config(ticket_ring=ring_at(0)), now=T0)
    pump(client, server)
    tickets = [e for e in drain(client) if isinstance(e, SessionTicket)]
    # pki's client leaf expires an hour after NOW: the tickets end with it, not in 7 days.
    assert tickets and all(t.lifetime == 3600 for t in tickets)


def test_a_ticket_sealed_23_hours_ago_resumes_after_hourly_rotation() -> None:
    mesh = Mesh(ring=ring_at(0))
    connect(mesh.client(), mesh.server(), T0 + 60)
    for hour in range(1, 24):
        ring_at(hour, mesh.ring)  # hourly rotation, the same ring object the server holds
    _client, server = connect(mesh.client(), mesh.server(), T0 + 23 * HOUR + 60)
    assert completed(drain(server)).session_resumed
    assert mesh.ring.rotations == 23
    assert mesh.ring.decrypt_failures == {"unknown_key": 0, "expired": 0, "corrupt": 0}


def test_a_ticket_sealed_25_hours_ago_gets_a_full_handshake_and_is_counted() -> None:
    mesh = Mesh(ring=ring_at(0))
    connect(mesh.client(), mesh.server(), T0 + 60)
    for hour in range(1, 26):
        ring_at(hour, mesh.ring)
    assert mesh.ring.keys == 26  # 24 previous, the active one and the next one
    client, server = connect(mesh.client(), mesh.server(), T0 + 25 * HOUR + 60)
    assert client.handshake_complete and server.handshake_complete
    assert not completed(drain(server)).session_resumed
    assert mesh.ring.decrypt_failures["unknown_key"] == 1


def _tamper(mesh: Mesh, change: object) -> None:
    """Rewrite every ticket in the client's store with `change(ticket_bytes)`."""
    tickets: list[SessionTicket] = []
    for _ in range(8):
        stored = mesh.store.take((ENDPOINT, str(SERVER_ID)), T0, 0)
        if stored is None:
            break
        tickets.append(stored.ticket)
    for ticket in tickets:
        new = dataclasses.replace(ticket, ticket=change(ticket.ticket))  # type: ignore[operator]
        mesh.store.put((ENDPOINT, str(SERVER_ID)), new, T0, 0)


@pytest.mark.parametrize(
    ("name", "change", "reason"),
    [
        ("truncated", lambda t: t[:20], "corrupt"),
        ("oversized", lambda t: t + bytes(30000), "corrupt"),
        ("unknown key id", lambda t: bytes((t[0] ^ 1,)) + t[1:], "unknown_key"),
        ("corrupt ciphertext", lambda t: t[:-1] + bytes((t[-1] ^ 1,)), "corrupt"),
    ],
)
def test_a_ticket_that_does_not_open_gets_a_full_handshake_and_is_counted(
    name: str, change: object, reason: str
) -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    _tamper(mesh, change)
    client, server = connect(mesh.client(), mesh.server(), T0 + 1)
    assert client.handshake_complete and server.handshake_complete, name
    assert not completed(drain(server)).session_resumed
    assert mesh.ring.decrypt_failures[reason] == 1


def test_a_tampered_binder_is_a_decrypt_error() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    client = ClientConnection(
        mesh.client(), "x.example.org", T0 + 1, endpoint=ENDPOINT, expected_peer=SERVER_ID
    )
    hello = bytearray(client.data_to_send())
    hello[-1] ^= 1  # the binder is the ClientHello's last byte (pre_shared_key is last)
    server = ServerConnection(mesh.server(), now=T0 + 1)
    with pytest.raises(TLSError) as caught:
        server.receive_data(bytes(hello))
    assert caught.value.alert == AlertDescription.decrypt_error
    assert server.data_to_send() == bytes.fromhex("15030300020233")


def test_a_resumed_client_no_longer_allowed_by_policy_is_refused_as_in_a_full_handshake() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    refusing = mesh.server(peer_policy=lambda spiffe_id: spiffe_id != CLIENT_ID)
    with pytest.raises(TLSError) as caught:
        connect(mesh.client(), refusing, T0 + 1)
    # The ticket was not honoured: the refusal came from the full handshake's check.
    assert caught.value.alert in (AlertDescription.access_denied, AlertDescription.bad_certificate)


def test_resumption_after_a_hello_retry_request_binds_the_retry() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    # Only an X25519 share: the server retries for X25519MLKEM768 (RFC 8446 §4.1.4),
    # and the second ClientHello's binder covers ClientHello1 and the retry (§4.2.11.2).
    client, server = connect(
        mesh.client(key_share_groups=(NamedGroup.x25519,)), mesh.server(), T0 + 1
    )
    client_done = completed(drain(client))
    assert client_done.session_resumed and client_done.group == NamedGroup.X25519MLKEM768
    assert completed(drain(server)).session_resumed


def test_a_stek_and_the_ring_never_show_key_bytes() -> None:
    key = bytes(range(32))
    one = Stek(b"k" * 16, key, T0, T0 + HOUR)
    ring = StekRing()
    ring.install(one, [], None)
    for text in (repr(one), str(one), repr(ring), str(ring)):
        assert key.hex() not in text and repr(key) not in text and "key=" not in text


def test_a_ring_rotation_does_not_disturb_a_handshake_in_flight() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    client = ClientConnection(
        mesh.client(), "x.example.org", T0 + 1, endpoint=ENDPOINT, expected_peer=SERVER_ID
    )
    server = ServerConnection(mesh.server(), now=T0 + 1)
    server.receive_data(client.data_to_send())
    ring_at(1, mesh.ring)  # rotate between the ClientHello and the client's Finished
    pump(client, server)
    assert completed(drain(server)).session_resumed
    # The tickets this handshake issued are sealed under the new active key.
    tickets = [e for e in drain(client) if isinstance(e, SessionTicket)]
    assert tickets and all(t.ticket[:16] == stek(1).key_id for t in tickets)


def test_a_client_offering_psk_ke_only_gets_a_full_handshake() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    client = ClientConnection(
        mesh.client(), "x.example.org", T0 + 1, endpoint=ENDPOINT, expected_peer=SERVER_ID
    )
    hello = client.data_to_send()
    modes = bytes.fromhex("002d00020101")  # psk_key_exchange_modes = [psk_dhe_ke]
    assert hello.count(modes) == 1
    # psk_ke alone would resume without a fresh key exchange: never accepted (§4.2.9).
    psk_ke_only = hello.replace(modes, bytes.fromhex("002d00020100"))
    server = ServerConnection(mesh.server(), now=T0 + 1)
    server.receive_data(psk_ke_only)
    out = server.data_to_send()
    assert bytes.fromhex("002900020000") not in out[:200]  # no pre_shared_key selected
    assert len(out) > 2000  # a full flight: the server's certificate chain is in it


def test_a_server_selecting_an_identity_never_offered_is_illegal_parameter() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    client = ClientConnection(
        mesh.client(), "x.example.org", T0 + 1, endpoint=ENDPOINT, expected_peer=SERVER_ID
    )
    server = ServerConnection(mesh.server(), now=T0 + 1)
    server.receive_data(client.data_to_send())
    flight = server.data_to_send()
    selected = bytes.fromhex("002900020000")
    assert selected in flight[:200]
    with pytest.raises(TLSError) as caught:
        client.receive_data(flight.replace(selected, bytes.fromhex("002900020001"), 1))
    assert caught.value.alert == AlertDescription.illegal_parameter


def test_handshakes_keep_resuming_across_hourly_rotations_under_load() -> None:
    mesh = Mesh(ring=ring_at(0))
    connect(mesh.client(), mesh.server(), T0)
    outcomes = {"resumed": 0, "full": 0, "failed": 0}
    for n in range(60):  # bounded: six rotations, ten handshakes an hour
        now = T0 + n * 360 + 1
        if n and n % 10 == 0:
            ring_at(n // 10, mesh.ring)
        try:
            _client, server = connect(mesh.client(), mesh.server(), now)
        except TLSError:
            outcomes["failed"] += 1
            continue
        outcomes["resumed" if completed(drain(server)).session_resumed else "full"] += 1
    # Each ticket was sealed under a key the next ring still holds: every one resumed.
    assert outcomes == {"resumed": 60, "full": 0, "failed": 0}
    assert mesh.ring.rotations == 5


def test_a_ticket_past_its_lifetime_is_dropped_by_the_client() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(), T0)
    stored = mesh.store.take((ENDPOINT, str(SERVER_ID)), T0, 0)
    assert stored is not None
    lifetime = stored.ticket.lifetime
    mesh.store.put((ENDPOINT, str(SERVER_ID)), stored.ticket, T0, 0)
    assert mesh.store.take((ENDPOINT, str(SERVER_ID)), T0 + lifetime + 1, 0) is None
    assert len(mesh.store) == 0  # the expired ones are gone, not kept for later


def test_a_ticket_under_a_key_past_its_not_after_is_counted_as_expired() -> None:
    short = Stek(b"s" * 16, bytes(32), T0, T0 + 60)
    ring = StekRing()
    reasons: list[str] = []
    ring.on_decrypt_failure = reasons.append
    ring.install(short, [], None)
    ticket = ring.seal(b"state", bytes(12))
    assert ring.open(ticket, T0 + 30) == b"state"
    assert ring.open(ticket, T0 + 61) is None
    assert ring.decrypt_failures["expired"] == 1 and reasons == ["expired"]
    assert ring.active_age(T0 + 30) == 30 and ring.keys == 1


def test_a_ticket_from_a_replica_whose_clock_runs_a_few_seconds_ahead_still_resumes() -> None:
    mesh = Mesh()
    connect(mesh.client(), mesh.server(b"replica-a"), T0 + 5)  # replica-a's clock: +5 s
    _client, server = connect(mesh.client(), mesh.server(b"replica-b"), T0 + 1)
    assert completed(drain(server)).session_resumed


def test_a_session_with_mldsa65_chains_resumes_and_its_ticket_carries_the_chain() -> None:
    from .pki import client_config, mldsa_identity, server_config

    store, ring = TicketStore(), ring_at(0)
    client_cfg = client_config(mldsa_identity("client"), ticket_store=store)
    server_cfg = server_config(mldsa_identity("server"), ticket_ring=ring)
    connect(client_cfg, server_cfg, T0)
    tickets = [s.ticket for s in [store.take((ENDPOINT, str(SERVER_ID)), T0, 0)] if s]
    assert tickets and len(tickets[0].ticket) > 10_000  # ML-DSA-65 leaf + intermediate
    store.put((ENDPOINT, str(SERVER_ID)), tickets[0], T0, 0)
    client, server = connect(client_cfg, server_cfg, T0 + 1)
    assert completed(drain(server)).session_resumed
    assert completed(drain(client)).peer_spiffe_id == SERVER_ID
