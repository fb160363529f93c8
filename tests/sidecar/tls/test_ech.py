"""Encrypted ClientHello (RFC 9849) between Trellis clients and servers, in memory."""

from __future__ import annotations

import pytest

from sidecar.tls import (
    AlertDescription,
    AlertReceived,
    ApplicationData,
    ClientConnection,
    HandshakeComplete,
    ServerConnection,
    SessionTicket,
    TLSConfig,
)
from sidecar.tls.ech import ECHRejected
from sidecar.tls.extensions import ExtensionType, pull_offered_psks
from sidecar.tls.groups import NamedGroup
from sidecar.tls.messages import pull_client_hello

from .ech_support import INNER_NAME, PUBLIC_NAME, config_list, ech_key, public_name_credential
from .helpers import drain, feed, pump
from .pki import NOW, SERVER_ID, client_config, server_config
from .resumption_support import ENDPOINT, T0, Mesh, completed, connect

KEY_1 = ech_key(1)
KEY_2 = ech_key(2)


def _server(*keys: object, **overrides: object) -> TLSConfig:
    return server_config(
        ech_keys=keys, ech_public_credential=public_name_credential().credential, **overrides
    )


def _client(ech_list: bytes | None, **overrides: object) -> TLSConfig:
    return client_config(
        ech_config_list=ech_list,
        ech_public_name_roots=[public_name_credential().root],
        **overrides,
    )


class _Wire:
    """Both directions' bytes, as an on-path observer records them."""

    def __init__(self) -> None:
        self.data = b""


def _run(
    client_cfg: TLSConfig, server_cfg: TLSConfig, wire: _Wire | None = None
) -> tuple[ClientConnection, ServerConnection]:
    client = ClientConnection(client_cfg, server_name=INNER_NAME, now=NOW)
    server = ServerConnection(server_cfg, now=NOW)
    for _ in range(20):
        ab = client.data_to_send()
        if wire is not None:
            wire.data += ab
        if ab:
            server.receive_data(ab)
        ba = server.data_to_send()
        if wire is not None:
            wire.data += ba
        if ba:
            client.receive_data(ba)
        if not ab and not ba:
            break
    return client, server


def _done(conn: ClientConnection | ServerConnection) -> HandshakeComplete:
    (done,) = [e for e in drain(conn) if isinstance(e, HandshakeComplete)]
    return done


def test_accepted_ech_hides_the_inner_server_name_and_the_server_sees_it() -> None:
    wire = _Wire()
    client, server = _run(_client(config_list(KEY_1)), _server(KEY_1), wire)
    client_done, server_done = _done(client), _done(server)
    assert client_done.ech == server_done.ech == "accepted"
    assert server_done.server_name == INNER_NAME
    assert INNER_NAME.encode() not in wire.data
    assert PUBLIC_NAME.encode() in wire.data
    assert client_done.alpn_protocol == "h2"  # ALPN travelled inside, not in clear


def test_a_previous_key_still_opens_a_hello_sealed_to_it() -> None:
    client, server = _run(_client(config_list(KEY_1)), _server(KEY_2, KEY_1))
    assert _done(server).ech == "accepted"
    assert _done(client).server_name == INNER_NAME


def test_rejected_ech_authenticates_the_public_name_and_hands_over_retry_configs() -> None:
    client = ClientConnection(_client(config_list(KEY_1)), server_name=INNER_NAME, now=NOW)
    server = ServerConnection(_server(KEY_2), now=NOW)
    with pytest.raises(ECHRejected) as rejected:
        pump(client, server)
    assert rejected.value.retry_configs == config_list(KEY_2)
    assert not client.handshake_complete
    # The server hears ech_required (RFC 9849 §6.1.6) instead of the client's Finished.
    server.receive_data(client.data_to_send())
    alerts = [e for e in drain(server) if isinstance(e, AlertReceived)]
    assert [a.description for a in alerts] == [AlertDescription.ech_required]
    # The one retry, on a new connection, with the configs the rejection carried.
    retry_list = rejected.value.retry_configs
    client2, server2 = _run(_client(retry_list), _server(KEY_2))
    assert _done(client2).ech == _done(server2).ech == "accepted"


def test_a_rejection_from_a_server_without_the_public_name_certificate_is_refused() -> None:
    """Retry configs count only from a server that proved the public name (§6.1.7)."""
    client = ClientConnection(_client(config_list(KEY_1)), server_name=INNER_NAME, now=NOW)
    server = ServerConnection(server_config(ech_keys=[KEY_2]), now=NOW)
    with pytest.raises(Exception) as failed:
        pump(client, server)
    assert not isinstance(failed.value, ECHRejected)
    assert "bad_certificate" in str(failed.value)


def test_hello_retry_request_inside_ech_seals_the_second_hello_in_the_same_context() -> None:
    cfg = _client(config_list(KEY_1), key_share_groups=(NamedGroup.secp256r1,))
    wire = _Wire()
    client, server = _run(cfg, _server(KEY_1, groups=(NamedGroup.x25519,)), wire)
    client_done, server_done = _done(client), _done(server)
    assert client_done.ech == server_done.ech == "accepted"
    assert server_done.group == NamedGroup.x25519
    assert server_done.server_name == INNER_NAME
    assert INNER_NAME.encode() not in wire.data


def test_hello_retry_request_then_rejection_still_authenticates_the_public_name() -> None:
    cfg = _client(config_list(KEY_1), key_share_groups=(NamedGroup.secp256r1,))
    client = ClientConnection(cfg, server_name=INNER_NAME, now=NOW)
    server = ServerConnection(_server(KEY_2, groups=(NamedGroup.x25519,)), now=NOW)
    with pytest.raises(ECHRejected) as rejected:
        pump(client, server)
    assert rejected.value.retry_configs == config_list(KEY_2)


def test_grease_ech_completes_against_servers_with_and_without_keys() -> None:
    for server_cfg, server_outcome in ((server_config(), "none"), (_server(KEY_1), "rejected")):
        client, server = _run(client_config(ech_grease=True), server_cfg)
        client_done, server_done = _done(client), _done(server)
        assert client_done.ech == "grease"
        assert server_done.ech == server_outcome
        assert server_done.server_name == INNER_NAME  # GREASE hides nothing


def test_grease_ech_survives_a_hello_retry_request() -> None:
    cfg = client_config(ech_grease=True, key_share_groups=(NamedGroup.secp256r1,))
    client, _server_conn = _run(cfg, _server(KEY_1, groups=(NamedGroup.x25519,)))
    assert _done(client).ech == "grease"


def test_a_ticket_resumes_inside_ech() -> None:
    mesh = Mesh()
    ech = {
        "ech_config_list": config_list(KEY_1),
        "ech_public_name_roots": [public_name_credential().root],
    }
    server_ech = {"ech_keys": [KEY_1]}
    first, server = connect(mesh.client(**ech), mesh.server(**server_ech), T0)
    assert completed(drain(first)).ech == "accepted"
    drain(server)
    second, server2 = connect(mesh.client(**ech), mesh.server(**server_ech), T0 + 60)
    done = completed(drain(second))
    assert done.session_resumed and done.ech == "accepted"
    assert completed(drain(server2)).session_resumed


def test_a_config_list_with_no_usable_config_is_refused_at_configuration() -> None:
    with pytest.raises(ValueError, match="ECHConfig"):
        _client(b"\x00\x04\xfe\x0e\x00\x00")


def test_an_ech_handshake_fed_one_byte_at_a_time_is_accepted() -> None:
    client = ClientConnection(_client(config_list(KEY_1)), server_name=INNER_NAME, now=NOW)
    server = ServerConnection(_server(KEY_1), now=NOW)
    for _ in range(8):  # bounded: three flights each way at most
        to_server = client.data_to_send()
        feed(server, to_server, bytewise=True)
        to_client = server.data_to_send()
        feed(client, to_client, bytewise=True)
        if not to_server and not to_client:
            break
    assert _done(client).ech == _done(server).ech == "accepted"


def _resuming_client(mesh: Mesh, ech_list: bytes, now: float) -> ClientConnection:
    cfg = mesh.client(
        ech_config_list=ech_list, ech_public_name_roots=[public_name_credential().root]
    )
    return ClientConnection(
        cfg, server_name=INNER_NAME, now=now, endpoint=ENDPOINT, expected_peer=SERVER_ID
    )


def test_a_resuming_hello_inside_ech_shows_only_a_grease_ticket_outside() -> None:
    """RFC 9849 §6.1.2, §10.12.3: the outer hello carries a pre_shared_key of random
    identities of the ticket's length, so it does not say whether the client resumes."""
    mesh = Mesh()
    first, server = connect(
        mesh.client(
            ech_config_list=config_list(KEY_1),
            ech_public_name_roots=[public_name_credential().root],
        ),
        mesh.server(ech_keys=[KEY_1]),
        T0,
    )
    tickets = {e.ticket for e in drain(first) if isinstance(e, SessionTicket)}
    drain(server)
    client = _resuming_client(mesh, config_list(KEY_1), T0 + 60)
    flight = client.data_to_send()
    outer = pull_client_hello(flight[9:])
    psk = pull_offered_psks(dict(outer.extensions)[ExtensionType.pre_shared_key])
    ((identity, _age),) = psk.identities
    assert tickets and {len(t) for t in tickets} == {len(identity)}
    assert identity not in tickets
    assert not any(t in flight for t in tickets)
    assert outer.extensions[-1][0] == ExtensionType.pre_shared_key  # still last
    server2 = ServerConnection(mesh.server(ech_keys=[KEY_1]), now=T0 + 60)
    server2.receive_data(flight)
    pump(client, server2)
    done = completed(drain(client))
    assert done.session_resumed and done.ech == "accepted"


def test_a_resuming_hello_whose_ech_is_rejected_completes_the_outer_handshake_in_full() -> None:
    """The rejecting server meets only the GREASE ticket, which it cannot open: a full
    handshake as the public name, then the retry configs."""
    mesh = Mesh()
    ech = {
        "ech_config_list": config_list(KEY_1),
        "ech_public_name_roots": [public_name_credential().root],
    }
    first, _server = connect(mesh.client(**ech), mesh.server(ech_keys=[KEY_1]), T0)
    drain(first)
    client = _resuming_client(mesh, config_list(KEY_1), T0 + 60)
    rotated = mesh.server(
        ech_keys=[KEY_2], ech_public_credential=public_name_credential().credential
    )
    server = ServerConnection(rotated, now=T0 + 60)
    with pytest.raises(ECHRejected) as rejected:
        pump(client, server)
    assert rejected.value.retry_configs == config_list(KEY_2)


def test_early_data_rides_inside_an_accepted_ech_resumption() -> None:
    mesh = Mesh()
    ech = {
        "ech_config_list": config_list(KEY_1),
        "ech_public_name_roots": [public_name_credential().root],
    }
    first, server = connect(mesh.client(**ech), mesh.server(ech_keys=[KEY_1]), T0)
    drain(first)
    drain(server)
    client, server2 = connect(
        mesh.client(**ech),
        mesh.server(ech_keys=[KEY_1]),
        T0 + 60,
        early_data=b"GET / early",
        replay_safe=True,
    )
    done = completed(drain(client))
    assert (done.ech, done.session_resumed, done.early_data) == ("accepted", True, "accepted")
    events = drain(server2)
    assert [e.data for e in events if isinstance(e, ApplicationData) and e.early] == [
        b"GET / early"
    ]


def test_early_data_sent_into_a_rejected_ech_is_skipped_by_the_server() -> None:
    """The outer hello says early_data too, so the rejecting server skips the 0-RTT
    records it has no key for and completes the outer handshake (RFC 8446 §4.2.10)."""
    mesh = Mesh()
    ech = {
        "ech_config_list": config_list(KEY_1),
        "ech_public_name_roots": [public_name_credential().root],
    }
    first, _server = connect(mesh.client(**ech), mesh.server(ech_keys=[KEY_1]), T0)
    drain(first)
    client = ClientConnection(
        mesh.client(**ech),
        server_name=INNER_NAME,
        now=T0 + 60,
        endpoint=ENDPOINT,
        expected_peer=SERVER_ID,
        early_data=b"GET / early",
        replay_safe=True,
    )
    rotated = mesh.server(
        ech_keys=[KEY_2], ech_public_credential=public_name_credential().credential
    )
    server = ServerConnection(rotated, now=T0 + 60)
    with pytest.raises(ECHRejected):
        pump(client, server)
    assert not [e for e in drain(server) if isinstance(e, ApplicationData)]
