"""Every input fed one byte at a time gives exactly what feeding it whole gives."""

from __future__ import annotations

import pytest

from sidecar.tls import ClientConnection, Connection, Event, NamedGroup, ServerConnection

from .pki import CLIENT_ID, NOW, SERVER_ID, authority, client_config, server_config

_CLIENT = authority().leaf(CLIENT_ID, "ed25519")
_SERVER = authority().leaf(SERVER_ID, "ed25519")


def _transcript(
    bytewise: bool, **client_overrides: object
) -> tuple[list[bytes], list[Event], list[Event]]:
    # Ed25519 signatures and X25519 keys from the seeded RNG make both sides
    # deterministic, so the wire bytes themselves can be compared.
    options: dict[str, object] = {"groups": (NamedGroup.x25519, NamedGroup.secp256r1)}
    options.update(client_overrides)
    client = ClientConnection(client_config(_CLIENT, **options), server_name="x", now=NOW)
    server = ServerConnection(server_config(_SERVER), now=NOW)
    wire: list[bytes] = []

    def deliver(src: Connection, dst: Connection) -> bool:
        data = src.data_to_send()
        if not data:
            return False
        wire.append(data)
        if bytewise:
            for i in range(len(data)):
                dst.receive_data(data[i : i + 1])
        else:
            dst.receive_data(data)
        return True

    while deliver(client, server) | deliver(server, client):
        pass
    client.send_application_data(b"hello" * 1000)
    client.update_key(request_peer_update=True)
    deliver(client, server)
    deliver(server, client)
    client.close()
    deliver(client, server)
    return wire, list(client.events()), list(server.events())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "key_share_groups": (NamedGroup.secp256r1,),
            "groups": (NamedGroup.x25519, NamedGroup.secp256r1),
        },
    ],
    ids=["one-rtt", "hello-retry"],
)
def test_feeding_one_byte_at_a_time_gives_the_same_bytes_and_events(
    overrides: dict[str, object],
) -> None:
    whole = _transcript(False, **overrides)
    bytewise = _transcript(True, **overrides)
    assert whole[0] == bytewise[0]
    assert whole[1] == bytewise[1]
    assert whole[2] == bytewise[2]
    assert any(type(e).__name__ == "HandshakeComplete" for e in whole[2])
