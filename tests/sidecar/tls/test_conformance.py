"""RFC 8446 rules a conformance run found broken, each named after its section.

Every input is fed whole and one byte at a time. The misbehaving peer is the engine's
own client or server with one message changed (an attacker holding its own keys): the
records are real, only their content breaks the rule under test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

import sidecar.tls.client as client_module
import sidecar.tls.server as server_module
from sidecar.tls import (
    AlertDescription,
    AlertLevel,
    AlertReceived,
    ApplicationData,
    ClientConnection,
    Connection,
    HandshakeComplete,
    NamedGroup,
    ServerConnection,
    TLSError,
)
from sidecar.tls.extensions import ExtensionType, push_client_key_shares
from sidecar.tls.messages import (
    ClientHello,
    HandshakeType,
    frame,
    pull_client_hello,
    push_client_hello,
)
from sidecar.tls.record import HEADER_LENGTH, MAX_PLAINTEXT, ContentType, plaintext_record

from .helpers import connected_pair, drain, feed, pump
from .pki import NOW, client_config, server_config

A = AlertDescription
feeding = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


def _refused(conn: Connection, data: bytes, bytewise: bool) -> AlertDescription:
    """The alert `conn` refuses `data` with; its fatal alert must be queued to send."""
    with pytest.raises(TLSError) as info:
        feed(conn, data, bytewise)
    assert conn._out, "no fatal alert queued"
    assert conn.write_closed
    return info.value.alert


def _heard(peer: Connection, wire: bytes) -> AlertDescription | int:
    """The one fatal alert `peer` reads from `wire`."""
    peer.receive_data(wire)
    fatal = [
        e.description
        for e in drain(peer)
        if isinstance(e, AlertReceived) and e.level == AlertLevel.fatal
    ]
    assert len(fatal) == 1, fatal
    return fatal[0]


def _first_record(wire: bytes) -> tuple[bytes, bytes]:
    length = int.from_bytes(wire[3:5], "big")
    return wire[: HEADER_LENGTH + length], wire[HEADER_LENGTH + length :]


def _after_server_hello() -> tuple[ClientConnection, ServerConnection]:
    """A client that has processed only the ServerHello: it writes with its handshake
    key, which the server reads with, and the server waits for the client's flight."""
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    server_hello, _ = _first_record(server.data_to_send())
    client.receive_data(server_hello)
    client.data_to_send()  # the dummy change_cipher_spec
    return client, server


def _padded(conn: Connection, content_type: int, fragment: bytes, padding: int) -> bytes:
    """One record sealed under `conn`'s current write key with `padding` zero bytes."""
    write = conn._write
    assert write is not None
    return b"".join(write.seal_parts(content_type, fragment, padding))


def _established() -> tuple[ClientConnection, ServerConnection]:
    client, server = connected_pair()
    drain(client), drain(server)
    return client, server


# --- RFC 8446 §4.4.4, §6.2: a Finished of the wrong length is decode_error ------------

_FINISHED_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda verify_data: verify_data[:-1],
    "extended": lambda verify_data: verify_data + b"\x00",
    "empty": lambda verify_data: b"",
}


@feeding
@pytest.mark.parametrize("edit", list(_FINISHED_EDITS))
def test_a_client_finished_not_hash_length_is_decode_error_rfc8446_4_4_4(
    monkeypatch: pytest.MonkeyPatch, edit: str, bytewise: bool
) -> None:
    change = _FINISHED_EDITS[edit]
    monkeypatch.setattr(
        client_module,
        "push_finished",
        lambda msg: frame(HandshakeType.finished, change(msg.verify_data)),
    )
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert _refused(server, client.data_to_send(), bytewise) == A.decode_error
    assert _heard(client, server.data_to_send()) == A.decode_error


@feeding
@pytest.mark.parametrize("edit", list(_FINISHED_EDITS))
def test_a_server_finished_not_hash_length_is_decode_error_rfc8446_4_4_4(
    monkeypatch: pytest.MonkeyPatch, edit: str, bytewise: bool
) -> None:
    change = _FINISHED_EDITS[edit]
    monkeypatch.setattr(
        server_module,
        "push_finished",
        lambda msg: frame(HandshakeType.finished, change(msg.verify_data)),
    )
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    assert _refused(client, server.data_to_send(), bytewise) == A.decode_error
    # The client's alert goes under its handshake key, which the server reads with.
    assert _heard(server, client.data_to_send()) == A.decode_error


# --- RFC 8446 §5.2, §5.4: padding counts towards the 2^14 + 1 inner plaintext ---------

# (content length, padding): every one makes TLSInnerPlaintext longer than 2^14 + 1.
_OVERFLOWS = {
    "content-at-limit-one-byte-padding": (MAX_PLAINTEXT, 1),
    "small-content-padding-over": (100, MAX_PLAINTEXT),
    "no-content-padding-over": (0, MAX_PLAINTEXT + 1),
}


@feeding
@pytest.mark.parametrize("sizes", list(_OVERFLOWS))
def test_application_data_whose_padding_overflows_the_record_is_record_overflow_rfc8446_5_4(
    sizes: str, bytewise: bool
) -> None:
    content, padding = _OVERFLOWS[sizes]
    client, server = _established()
    record = _padded(client, ContentType.application_data, b"a" * content, padding)
    assert _refused(server, record, bytewise) == A.record_overflow
    assert _heard(client, server.data_to_send()) == A.record_overflow


@feeding
@pytest.mark.parametrize("sizes", list(_OVERFLOWS))
def test_a_handshake_record_whose_padding_overflows_is_record_overflow_rfc8446_5_4(
    sizes: str, bytewise: bool
) -> None:
    content, padding = _OVERFLOWS[sizes]
    client, server = _after_server_hello()
    # The record layer refuses it before any handshake message is parsed out of it.
    record = _padded(client, ContentType.handshake, b"\x0b" * content, padding)
    assert _refused(server, record, bytewise) == A.record_overflow


@feeding
def test_a_padded_key_update_over_the_limit_is_record_overflow_rfc8446_5_4(
    bytewise: bool,
) -> None:
    client, server = _established()
    key_update = frame(HandshakeType.key_update, b"\x00")
    record = _padded(client, ContentType.handshake, key_update, MAX_PLAINTEXT - len(key_update) + 1)
    assert _refused(server, record, bytewise) == A.record_overflow


@feeding
def test_padding_up_to_exactly_2_14_plus_1_is_accepted_rfc8446_5_4(bytewise: bool) -> None:
    client, server = _established()
    record = _padded(client, ContentType.application_data, b"fits", MAX_PLAINTEXT - 4)
    feed(server, record, bytewise)
    assert drain(server) == [ApplicationData(b"fits")]


# --- RFC 8446 §5.1: a zero-length alert is unexpected_message ---------------------------


@feeding
@pytest.mark.parametrize("padding", [0, 1, 200], ids=["unpadded", "one-byte-padding", "padded"])
def test_an_empty_alert_under_handshake_keys_is_unexpected_message_rfc8446_5_1(
    padding: int, bytewise: bool
) -> None:
    client, server = _after_server_hello()
    record = _padded(client, ContentType.alert, b"", padding)
    assert _refused(server, record, bytewise) == A.unexpected_message


@feeding
@pytest.mark.parametrize("padding", [0, 1, 200], ids=["unpadded", "one-byte-padding", "padded"])
def test_an_empty_alert_under_application_keys_is_unexpected_message_rfc8446_5_1(
    padding: int, bytewise: bool
) -> None:
    client, server = _established()
    record = _padded(client, ContentType.alert, b"", padding)
    assert _refused(server, record, bytewise) == A.unexpected_message
    assert _heard(client, server.data_to_send()) == A.unexpected_message


@feeding
def test_an_empty_plaintext_alert_is_unexpected_message_rfc8446_5_1(bytewise: bool) -> None:
    server = ServerConnection(server_config(), now=NOW)
    record = plaintext_record(ContentType.alert, b"")
    assert _refused(server, record, bytewise) == A.unexpected_message


# --- RFC 8446 §4.1.2, Appendix D.5: legacy_version below 0x0303 is protocol_version ----


def _client_hello(**client_overrides: object) -> ClientHello:
    record = ClientConnection(client_config(**client_overrides), now=NOW).data_to_send()
    return pull_client_hello(record[HEADER_LENGTH + 4 :])


@feeding
@pytest.mark.parametrize("version", [0x0300, 0x0000, 0x0002, 0x0200, 0x0202, 0x0301, 0x0302])
def test_a_client_hello_legacy_version_below_0x0303_is_protocol_version_rfc8446_4_1_2(
    version: int, bytewise: bool
) -> None:
    hello = replace(_client_hello(), legacy_version=version)
    server = ServerConnection(server_config(), now=NOW)
    record = plaintext_record(ContentType.handshake, push_client_hello(hello), 0x0301)
    assert _refused(server, record, bytewise) == A.protocol_version


def test_a_client_hello_legacy_version_0x0303_is_answered_rfc8446_4_1_2() -> None:
    client, server = connected_pair()
    assert any(isinstance(e, HandshakeComplete) for e in drain(server))
    assert client.handshake_complete


# --- RFC 8446 §4.1.2: the second ClientHello changes only what the HRR allows -----------


def _hello_retry() -> tuple[ClientConnection, ServerConnection, bytes, ClientHello]:
    """A client that offered no key share, and the server that asked it to retry: the
    client's dummy change_cipher_spec record and its second ClientHello."""
    client = ClientConnection(client_config(key_share_groups=()), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    out = client.data_to_send()
    ccs, rest = _first_record(out)
    assert ccs == b"\x14\x03\x03\x00\x01\x01"
    return client, server, ccs, pull_client_hello(rest[HEADER_LENGTH + 4 :])


Edit = Callable[[ClientHello], ClientHello]


def _extensions(edit: Callable[[list[tuple[int, bytes]]], None]) -> Edit:
    def apply(hello: ClientHello) -> ClientHello:
        extensions = list(hello.extensions)
        edit(extensions)
        return replace(hello, extensions=tuple(extensions))

    return apply


def _swap_first_two(extensions: list[tuple[int, bytes]]) -> None:
    extensions[0], extensions[1] = extensions[1], extensions[0]


def _drop(ext_type: int) -> Callable[[list[tuple[int, bytes]]], None]:
    def edit(extensions: list[tuple[int, bytes]]) -> None:
        extensions[:] = [(t, d) for t, d in extensions if t != ext_type]

    return edit


def _change(ext_type: int, data: bytes) -> Callable[[list[tuple[int, bytes]]], None]:
    def edit(extensions: list[tuple[int, bytes]]) -> None:
        extensions[:] = [(t, data if t == ext_type else d) for t, d in extensions]

    return edit


def _insert(ext_type: int, data: bytes) -> Callable[[list[tuple[int, bytes]]], None]:
    def edit(extensions: list[tuple[int, bytes]]) -> None:
        extensions.insert(1, (ext_type, data))

    return edit


_SECOND_HELLO_CHANGES: dict[str, Edit] = {
    "extensions-reordered": _extensions(_swap_first_two),
    "extension-added": _extensions(_insert(0xFAFA, b"")),
    "early-data-added": _extensions(_insert(ExtensionType.early_data, b"")),
    "alpn-dropped": _extensions(_drop(ExtensionType.application_layer_protocol_negotiation)),
    "signature-algorithms-changed": _extensions(
        _change(ExtensionType.signature_algorithms, b"\x00\x02\x08\x07")
    ),
    "supported-groups-changed": _extensions(
        _change(ExtensionType.supported_groups, b"\x00\x04\x11\xec\x00\x1d")
    ),
    "cipher-suites-changed": lambda h: replace(h, cipher_suites=h.cipher_suites[:1]),
    "cipher-suites-reordered": lambda h: replace(h, cipher_suites=h.cipher_suites[::-1]),
    "random-changed": lambda h: replace(h, random=bytes(32)),
    "session-id-changed": lambda h: replace(h, legacy_session_id=bytes(32)),
    "legacy-version-changed": lambda h: replace(h, legacy_version=0x0304),
}


@feeding
@pytest.mark.parametrize("change", list(_SECOND_HELLO_CHANGES))
def test_a_second_client_hello_changed_beyond_the_retry_is_illegal_parameter_rfc8446_4_1_2(
    change: str, bytewise: bool
) -> None:
    _, server, ccs, hello2 = _hello_retry()
    forged = _SECOND_HELLO_CHANGES[change](hello2)
    record = plaintext_record(ContentType.handshake, push_client_hello(forged))
    feed(server, ccs, bytewise)
    assert _refused(server, record, bytewise) == A.illegal_parameter


@feeding
def test_a_second_client_hello_that_only_adds_padding_is_answered_rfc8446_4_1_2(
    bytewise: bool,
) -> None:
    _, server, ccs, hello2 = _hello_retry()
    padded = _extensions(_insert(ExtensionType.padding, bytes(100)))(hello2)
    feed(server, ccs + plaintext_record(ContentType.handshake, push_client_hello(padded)), bytewise)
    assert server.data_to_send()[:1] == bytes((ContentType.handshake,))  # its ServerHello


@feeding
def test_the_engines_own_second_client_hello_completes_the_handshake_rfc8446_4_1_2(
    bytewise: bool,
) -> None:
    client, server, ccs, hello2 = _hello_retry()
    feed(server, ccs + plaintext_record(ContentType.handshake, push_client_hello(hello2)), bytewise)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert client.handshake_complete and server.handshake_complete


# --- RFC 8446 §4.2.8, §4.2.8.2: bad key shares for every group are illegal_parameter ----

_P521_POINT = 133
_BAD_SHARES: dict[str, tuple[NamedGroup, bytes]] = {
    "x448-low-order": (NamedGroup.x448, bytes(56)),
    "x448-short": (NamedGroup.x448, bytes(range(1, 56))),
    "x448-long": (NamedGroup.x448, bytes(range(1, 58))),
    "x25519-long": (NamedGroup.x25519, bytes(range(1, 34))),
    "p256-infinity": (NamedGroup.secp256r1, b"\x00"),
    "p256-off-curve": (NamedGroup.secp256r1, b"\x04" + bytes(range(64))),
    "p384-infinity": (NamedGroup.secp384r1, b"\x00"),
    "p384-off-curve": (NamedGroup.secp384r1, b"\x04" + bytes(96)),
    "p384-short": (NamedGroup.secp384r1, b"\x04" + bytes(95)),
    "p521-infinity": (NamedGroup.secp521r1, b"\x00"),
    "p521-off-curve": (NamedGroup.secp521r1, b"\x04" + bytes(_P521_POINT - 1)),
    "p521-compressed": (NamedGroup.secp521r1, b"\x02" + bytes(66)),
    "p521-long": (NamedGroup.secp521r1, b"\x04" + bytes(_P521_POINT)),
    "secp256r1mlkem768-off-curve": (
        NamedGroup.SecP256r1MLKEM768,
        b"\x04" + bytes(64) + bytes(1184),
    ),
    "secp256r1mlkem768-short": (NamedGroup.SecP256r1MLKEM768, bytes(65 + 1183)),
    "secp384r1mlkem1024-off-curve": (
        NamedGroup.SecP384r1MLKEM1024,
        b"\x04" + bytes(96) + bytes(1568),
    ),
    "secp384r1mlkem1024-infinity": (NamedGroup.SecP384r1MLKEM1024, b"\x00" + bytes(1568)),
    "secp384r1mlkem1024-long": (NamedGroup.SecP384r1MLKEM1024, bytes(97 + 1569)),
}


def _valid_share(group: NamedGroup) -> bytes:
    hello = _client_hello(groups=(group,), key_share_groups=(group,))
    data = dict(hello.extensions)[ExtensionType.key_share]
    return data[2 + 4 :]  # client_shares length, then group and key_exchange length


@feeding
@pytest.mark.parametrize("case", list(_BAD_SHARES))
def test_a_malformed_key_share_is_illegal_parameter_rfc8446_4_2_8(
    case: str, bytewise: bool
) -> None:
    group, share = _BAD_SHARES[case]
    hello = _client_hello(groups=(group,), key_share_groups=(group,))
    extensions = tuple(
        (t, push_client_key_shares([(group, share)]) if t == ExtensionType.key_share else d)
        for t, d in hello.extensions
    )
    record = plaintext_record(
        ContentType.handshake, push_client_hello(replace(hello, extensions=extensions))
    )
    server = ServerConnection(server_config(), now=NOW)
    assert _refused(server, record, bytewise) == A.illegal_parameter


@feeding
@pytest.mark.parametrize(
    "group",
    [NamedGroup.SecP256r1MLKEM768, NamedGroup.SecP384r1MLKEM1024],
    ids=lambda g: g.name,
)
def test_a_hybrid_share_whose_ml_kem_key_fails_its_check_is_illegal_parameter(
    group: NamedGroup, bytewise: bool
) -> None:
    valid = _valid_share(group)
    point = 65 if group == NamedGroup.SecP256r1MLKEM768 else 97
    # FIPS 203 §7.2: every coefficient of the encapsulation key must be below q.
    share = valid[:point] + b"\xff" * (len(valid) - point - 32) + valid[-32:]
    hello = _client_hello(groups=(group,), key_share_groups=(group,))
    extensions = tuple(
        (t, push_client_key_shares([(group, share)]) if t == ExtensionType.key_share else d)
        for t, d in hello.extensions
    )
    record = plaintext_record(
        ContentType.handshake, push_client_hello(replace(hello, extensions=extensions))
    )
    server = ServerConnection(server_config(), now=NOW)
    assert _refused(server, record, bytewise) == A.illegal_parameter


# --- every group completes a handshake, in memory ---------------------------------------


@pytest.mark.parametrize(
    "group",
    [NamedGroup.x448, NamedGroup.secp521r1, NamedGroup.SecP384r1MLKEM1024],
    ids=lambda g: g.name,
)
def test_a_server_with_default_groups_accepts_a_share_for_each_new_group(
    group: NamedGroup,
) -> None:
    client = ClientConnection(client_config(groups=(group,), key_share_groups=(group,)), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    pump(client, server)
    done = [e for e in drain(server) if isinstance(e, HandshakeComplete)]
    assert [e.group for e in done] == [group]
    assert client.handshake_complete


@pytest.mark.parametrize(
    "group",
    [NamedGroup.x448, NamedGroup.secp521r1, NamedGroup.SecP384r1MLKEM1024],
    ids=lambda g: g.name,
)
def test_a_client_retried_into_each_new_group_completes_the_handshake(group: NamedGroup) -> None:
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(groups=(group,)), now=NOW)
    pump(client, server)
    done = [e for e in drain(client) if isinstance(e, HandshakeComplete)]
    assert [e.group for e in done] == [group]


def test_the_client_default_offer_shares_only_x25519mlkem768_and_x25519() -> None:
    data = dict(_client_hello().extensions)[ExtensionType.key_share]
    groups = []
    pos = 2
    while pos < len(data):
        groups.append(int.from_bytes(data[pos : pos + 2], "big"))
        pos += 4 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    assert groups == [NamedGroup.X25519MLKEM768, NamedGroup.x25519]
