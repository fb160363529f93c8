"""RFC 8448 §5 "HelloRetryRequest", reproduced byte for byte by the client engine.

The client offers only an X25519 share; the server asks for secp256r1 with a cookie.
Both ClientHellos are inputs (the RFC's second one carries a padding extension we never
send), and so are the two ephemeral keys; the engine must request exactly that group
and cookie, hash ClientHello1 into message_hash (§4.4.1), and produce the RFC's
Finished record.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sidecar.tls import ClientConnection, HandshakeComplete, NamedGroup, TLSConfig
from sidecar.tls.connection import Connection
from sidecar.tls.extensions import ExtensionType, pull_client_key_shares, pull_cookie
from sidecar.tls.groups import ClientKeyShare
from sidecar.tls.messages import (
    ClientHello,
    pull_client_hello,
    pull_server_hello,
    push_client_hello,
    push_server_hello,
)

from .pki import NOW

H = bytes.fromhex

CLIENT_X25519_PRIVATE = H("0ed02f8e8117efc75ca7ac32aa7e34eda64cdc0ddad154a5e85289f959f63204")
CLIENT_P256_PRIVATE = H("ab5473467e19346ceb0a0414e41da21d4d2445bc3025afe97c4e8dc8d513da39")
CLIENT_P256_PUBLIC = H(
    "04a6da7392ec591e17abfd535964b99894d13befb221b3def2ebe3830eac8f0151812677c4d6d2237e85cf01d6"
    "910cfb83954e76ba7352830534159897e8065780"
)
RECORD_CLIENT_HELLO_1 = H(
    "16030100b4010000b00303b0b1c5a5aa37c5919f2ed1d5c6fff7fcb7849716945a2b8cee9258a346677b6f0000"
    "06130113031302010000810000000b0009000006736572766572ff01000100000a00080006001d00170018003300"
    "260024001d0020e8e8e3f3b93a25ed97a14a7dcacb8a272c6288e585c6484d05262fcad062ad1f002b0003020304"
    "000d0020001e040305030603020308040805080604010501060102010402050206020202002d00020101001c0002"
    "4001"
)
RECORD_HELLO_RETRY_REQUEST = H(
    "16030300b0020000ac0303cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c001301"
    "000084003300020017002c0074007271dcd04bb88bc3189119398a00000000eefafc76c146b823b096f8aacad365"
    "dd0030953f4edf625636e5f21bb2e23fcc654b1b5b40318d10d137abcbb87574e36e8a1f025f7dfa5d6e50781b5e"
    "da4aa15b0c8be778257d16aa3030e9e7841dd9e4c0342267e8ca0caf571fb2b7cff0f934b0002b00020304"
)
RECORD_CLIENT_HELLO_2 = H(
    "1603030200010001fc0303b0b1c5a5aa37c5919f2ed1d5c6fff7fcb7849716945a2b8cee9258a346677b6f000006"
    "130113031302010001cd0000000b0009000006736572766572ff01000100000a00080006001d0017001800330047"
    "00450017004104a6da7392ec591e17abfd535964b99894d13befb221b3def2ebe3830eac8f0151812677c4d6d223"
    "7e85cf01d6910cfb83954e76ba7352830534159897e8065780002b0003020304000d0020001e0403050306030203"
    "08040805080604010501060102010402050206020202002c0074007271dcd04bb88bc3189119398a00000000eefa"
    "fc76c146b823b096f8aacad365dd0030953f4edf625636e5f21bb2e23fcc654b1b5b40318d10d137abcbb87574e3"
    "6e8a1f025f7dfa5d6e50781b5eda4aa15b0c8be778257d16aa3030e9e7841dd9e4c0342267e8ca0caf571fb2b7cf"
    "f0f934b0002d00020101001c00024001001500af" + "00" * 0xAF
)
RECORD_SERVER_HELLO = H(
    "160303007b020000770303bb341d847fd789c47c387172dc0c9bf147fccacb5043d86ca4c598d3ff571b98001301"
    "00004f003300450017004104583e054b7a66672ae020ad9d2686fcc85b5ad41a134a0f03ee72b893052bd85b4c8d"
    "e6776f5b04ac07d83540eab3e3d9c547bc6528c4317d294686093a6cad7d002b00020304"
)
RECORD_SERVER_FLIGHT = H(
    "170303029699bee20baf5b7fc727bfab6223928a381e6d0cf9c4da653f9d2a7b23f7de11cce842d5cf7563176345"
    "0ffb8b0cc1d238e658af7a12adc86243114ab14a1da2fae42621ce483fb6242eabfaad52566b02b31d2eddedefeb"
    "80e66a9900d5f973b40c4fdf74719ecf1b68d7f9c3b6ceb903ca13dd1bb8f8187ae33417e1d152522c5822a1a03a"
    "d52c838c55953d610222874cce8e1790b229a2aa0b53c8d377ee720182951dc6181dc5d90bd1f0105ed1e84aa5f7"
    "5957c6661897079e5ea5007449e3197bdc7c9beeedddeafdd844afa5c315ecfe65e576afe909812880620ec7048b"
    "42d7f5c78d76f299d6d82534bdd8f512febc0ed3814aca470cd8000d3e1cb9962b052fbb950df683a52c2ba77ed3"
    "713b122937a6e5170964e2ab7969dcd980b3db9b458da7603124d6dc005e4d6e04b4d0c4baf3275db827dbba0a6d"
    "b09672171fc057b3851d7e026841e2978fbd2346bbefdd0376bb1108fe9acc92189f5650aa5e85d8e8c7b67ac510"
    "dba003d3d7e16350bb66d45013efd44c9b607c0d318c4c7d1a1f5cbc57e20611804e3787d7b4a4b5f08ed8fd70bd"
    "aeade02260b12ab842ef690b4a3ee7911e841b374ecd5ebbbc2a54d047b600336dd7d0c88b4bc10e58ee6cb656de"
    "7247fa20d8e91deb84628608cf80615b62e96c1491c7ac3755eb6901405d3474fe1ac79d106a0cee56c2577fc884"
    "80f96cb6b8c681b7b68b53c146093908f350888175bdfb0b1e31ad61e30ba0adfe6d223aa03c0783b5001a57587c"
    "328a9afcfcfb978d1cd4328f7d9d60530e630befd96c0c816ee20b0100768ae2a6df51fc68f172740a79af11398e"
    "e3be1252491fa9c693479e877f94ab7c5f8cad480203e6ab7b87dd71e8a0729113df17f5eee86ce108d1d72007ec"
    "1cd13c85a6c149621e77b7d78d805a30f0be030c315e54"
)
RECORD_CLIENT_FINISHED = H(
    "1703030035d74f1923c662fd34137c6f502f3dd2b93d951d1b3bc97e42afe23c31abea92fe91b474999e85e3b791"
    "ce252fe8c3e9f939a4120cb2"
)
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _scripted_rng(*chunks: bytes) -> Callable[[int], bytes]:
    queue = list(chunks)

    def rng(n: int) -> bytes:
        value = queue.pop(0)
        return value.rjust(n, b"\x00")

    return rng


def test_hello_retry_request_messages_round_trip_byte_identically() -> None:
    for record, pull, push in (
        (RECORD_CLIENT_HELLO_1, pull_client_hello, push_client_hello),
        (RECORD_CLIENT_HELLO_2, pull_client_hello, push_client_hello),
        (RECORD_HELLO_RETRY_REQUEST, pull_server_hello, push_server_hello),
        (RECORD_SERVER_HELLO, pull_server_hello, push_server_hello),
    ):
        assert push(pull(record[9:])) == record[5:]  # type: ignore[operator]
    assert pull_server_hello(RECORD_HELLO_RETRY_REQUEST[9:]).is_hello_retry_request


def test_client_engine_reproduces_rfc8448_section5_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sidecar.tls.client as client_module

    hello2 = pull_client_hello(RECORD_CLIENT_HELLO_2[9:])
    requested: list[tuple[int, bytes, bytes | None]] = []

    def rfc_second_hello(
        hello: ClientHello, shares: list[ClientKeyShare], cookie: bytes | None
    ) -> ClientHello:
        requested.append((shares[0].group, shares[0].public, cookie))
        return hello2

    monkeypatch.setattr(client_module, "second_client_hello", rfc_second_hello)
    # The P-256 scalar arrives through the RNG: the engine reduces rng bytes mod n-1, +1.
    p256_seed = (int.from_bytes(CLIENT_P256_PRIVATE, "big") - 1).to_bytes(40, "big")
    config = TLSConfig(
        rng=_scripted_rng(p256_seed), verify_peer=False, middlebox_compatibility=False
    )
    client = ClientConnection.__new__(ClientConnection)
    Connection.__init__(client, config, NOW)
    share = ClientKeyShare(NamedGroup.x25519, _scripted_rng(CLIENT_X25519_PRIVATE))
    client._start(pull_client_hello(RECORD_CLIENT_HELLO_1[9:]), [share], "server")
    assert client.data_to_send() == RECORD_CLIENT_HELLO_1

    client.receive_data(RECORD_HELLO_RETRY_REQUEST)
    rfc_cookie = pull_cookie(dict(hello2.extensions)[ExtensionType.cookie])
    rfc_share = pull_client_key_shares(dict(hello2.extensions)[ExtensionType.key_share])
    assert requested == [(NamedGroup.secp256r1, CLIENT_P256_PUBLIC, rfc_cookie)]
    assert rfc_share == ((NamedGroup.secp256r1, CLIENT_P256_PUBLIC),)
    assert client.data_to_send() == RECORD_CLIENT_HELLO_2

    client.receive_data(RECORD_SERVER_HELLO)
    client.receive_data(RECORD_SERVER_FLIGHT)
    assert client.data_to_send() == RECORD_CLIENT_FINISHED
    done = [e for e in client.events() if isinstance(e, HandshakeComplete)]
    assert done[0].group == NamedGroup.secp256r1
