"""Each RFC 8446 rule a peer can break ends with the alert the RFC names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from sidecar.tls import (
    AlertDescription,
    ApplicationData,
    ClientConnection,
    HandshakeComplete,
    KeyUpdated,
    NamedGroup,
    ServerConnection,
    TLSError,
)
from sidecar.tls.extensions import ExtensionType, push_client_key_shares
from sidecar.tls.messages import (
    ClientHello,
    HandshakeType,
    NewSessionTicket,
    frame,
    pull_client_hello,
    push_client_hello,
    push_new_session_ticket,
)
from sidecar.tls.record import MAX_PLAINTEXT, ContentType, RecordProtection, plaintext_record

from .helpers import connected_pair, drain, pump
from .pki import NOW, client_config, server_config

A = AlertDescription


def _client_hello(**client_overrides: object) -> ClientHello:
    record = ClientConnection(client_config(**client_overrides), now=NOW).data_to_send()
    return pull_client_hello(record[9:])


def _server_alert(data: bytes) -> AlertDescription:
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        server.receive_data(data)
    out = server.data_to_send()
    if server._write is None:  # the fatal alert is queued, in the clear before keys exist
        assert out[-7:] == bytes((21, 3, 3, 0, 2, 2, info.value.alert))
    else:  # or encrypted under the handshake keys the peer can derive from our hello
        assert out[-24:-19] == b"\x17\x03\x03\x00\x13"
    return info.value.alert


def _with_extensions(hello: ClientHello, edit: Callable[[list[tuple[int, bytes]]], None]) -> bytes:
    extensions = list(hello.extensions)
    edit(extensions)
    return plaintext_record(22, push_client_hello(replace(hello, extensions=tuple(extensions))))


def _replace_ext(ext_type: int, data: bytes) -> Callable[[list[tuple[int, bytes]]], None]:
    def edit(extensions: list[tuple[int, bytes]]) -> None:
        for i, (t, _) in enumerate(extensions):
            if t == ext_type:
                extensions[i] = (t, data)

    return edit


# --- ClientHello rules (server side) ------------------------------------------------


def test_duplicate_extension_in_client_hello_is_illegal_parameter() -> None:
    hello = _client_hello()
    assert _server_alert(_with_extensions(hello, lambda e: e.append(e[0]))) == A.illegal_parameter


def test_pre_shared_key_not_last_is_illegal_parameter() -> None:
    hello = _client_hello()
    record = _with_extensions(hello, lambda e: e.insert(0, (ExtensionType.pre_shared_key, b"\x00")))
    assert _server_alert(record) == A.illegal_parameter


def test_tls12_only_client_hello_is_protocol_version() -> None:
    hello = _client_hello()
    record = _with_extensions(
        hello,
        lambda e: e.__setitem__(
            slice(None), [x for x in e if x[0] != ExtensionType.supported_versions]
        ),
    )
    assert _server_alert(record) == A.protocol_version


def test_compression_other_than_null_is_illegal_parameter() -> None:
    hello = replace(_client_hello(), legacy_compression_methods=b"\x01\x00")
    assert _server_alert(plaintext_record(22, push_client_hello(hello))) == A.illegal_parameter


def test_no_common_cipher_suite_is_handshake_failure() -> None:
    hello = replace(_client_hello(), cipher_suites=(0x00FF, 0xC02F))
    assert _server_alert(plaintext_record(22, push_client_hello(hello))) == A.handshake_failure


def test_missing_signature_algorithms_is_missing_extension() -> None:
    hello = _client_hello()
    record = _with_extensions(
        hello,
        lambda e: e.__setitem__(
            slice(None), [x for x in e if x[0] != ExtensionType.signature_algorithms]
        ),
    )
    assert _server_alert(record) == A.missing_extension


def test_key_share_for_unsupported_group_is_illegal_parameter() -> None:
    hello = _client_hello(groups=(NamedGroup.x25519,), key_share_groups=(NamedGroup.x25519,))
    shares = push_client_key_shares(
        [(NamedGroup.x25519, bytes(range(1, 33))), (NamedGroup.secp256r1, b"\x04" * 65)]
    )
    assert (
        _server_alert(_with_extensions(hello, _replace_ext(ExtensionType.key_share, shares)))
        == A.illegal_parameter
    )


def test_malformed_extension_length_is_decode_error() -> None:
    hello = _client_hello()
    record = _with_extensions(
        hello, _replace_ext(ExtensionType.supported_groups, b"\x00\x05\x00\x1d")
    )
    assert _server_alert(record) == A.decode_error


def test_trailing_bytes_after_client_hello_are_decode_error() -> None:
    body = push_client_hello(_client_hello())
    message = frame(HandshakeType.client_hello, body[4:] + b"\x00")
    assert _server_alert(plaintext_record(22, message)) == A.decode_error


@pytest.mark.parametrize(
    ("group", "share"),
    [
        (NamedGroup.X25519MLKEM768, bytes(1184 + 31)),  # wrong length
        (NamedGroup.X25519MLKEM768, b"\xff" * 1184 + bytes(range(1, 33))),  # ek coefficients >= q
        (NamedGroup.X25519MLKEM768, None),  # valid ek, all-zero X25519 part
        (NamedGroup.x25519, bytes(32)),  # low-order point: all-zero shared secret
        (NamedGroup.x25519, bytes(33)),
        (NamedGroup.secp256r1, b"\x04" + bytes(64)),  # not on the curve
        (NamedGroup.secp256r1, b"\x02" + bytes(32)),  # compressed points are not allowed
    ],
    ids=[
        "hybrid-length",
        "hybrid-ek-check",
        "hybrid-zero-x25519",
        "x25519-zero",
        "x25519-length",
        "p256-off-curve",
        "p256-compressed",
    ],
)
def test_bad_key_shares_are_illegal_parameter(group: NamedGroup, share: bytes | None) -> None:
    hello = _client_hello(groups=(group,), key_share_groups=(group,))
    if share is None:
        original = dict(hello.extensions)[ExtensionType.key_share]
        share = original[8 : 8 + 1184] + bytes(32)
    record = _with_extensions(
        hello, _replace_ext(ExtensionType.key_share, push_client_key_shares([(group, share)]))
    )
    assert _server_alert(record) == A.illegal_parameter


def test_unknown_extensions_in_client_hello_are_ignored() -> None:
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    hello = pull_client_hello(client.data_to_send()[9:])
    grease = replace(hello, extensions=((0x0A0A, b""), *hello.extensions, (0xFAFA, b"\x00")))
    server.receive_data(plaintext_record(22, push_client_hello(grease)))
    assert server.data_to_send()


def test_altered_cookie_in_second_client_hello_is_illegal_parameter() -> None:
    client = ClientConnection(client_config(key_share_groups=()), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    out = client.data_to_send()
    assert out[:6] == b"\x14\x03\x03\x00\x01\x01"  # dummy CCS before the second ClientHello
    hello2 = pull_client_hello(out[6 + 9 :])
    cookie = dict(hello2.extensions)[ExtensionType.cookie]
    forged = _with_extensions(
        hello2, _replace_ext(ExtensionType.cookie, cookie[:-1] + bytes((cookie[-1] ^ 1,)))
    )
    with pytest.raises(TLSError) as info:
        server.receive_data(out[:6] + forged)
    assert info.value.alert == A.illegal_parameter


# --- record layer -------------------------------------------------------------------


def test_plaintext_record_over_2_14_is_record_overflow() -> None:
    assert _server_alert(b"\x16\x03\x01\x40\x01" + bytes(MAX_PLAINTEXT + 1)) == A.record_overflow


def test_unknown_record_type_is_unexpected_message() -> None:
    assert _server_alert(b"\x18\x03\x03\x00\x01\x00") == A.unexpected_message


def test_zero_length_handshake_record_is_unexpected_message() -> None:
    assert _server_alert(b"\x16\x03\x01\x00\x00") == A.unexpected_message


def test_change_cipher_spec_before_client_hello_is_unexpected_message() -> None:
    assert _server_alert(b"\x14\x03\x03\x00\x01\x01") == A.unexpected_message


def test_application_data_before_handshake_is_unexpected_message() -> None:
    assert _server_alert(b"\x17\x03\x03\x00\x01\x00") == A.unexpected_message


def test_handshake_data_spanning_a_key_change_is_unexpected_message() -> None:
    record = ClientConnection(client_config(), now=NOW).data_to_send()
    hello = record[5:]
    extra = frame(HandshakeType.finished, bytes(32))
    assert _server_alert(plaintext_record(22, hello + extra)) == A.unexpected_message


def test_malformed_alert_is_decode_error() -> None:
    assert _server_alert(b"\x15\x03\x03\x00\x03\x02\x28\x00") == A.decode_error


def _established() -> tuple[ClientConnection, ServerConnection]:
    client, server = connected_pair()
    drain(client), drain(server)
    return client, server


def _reseal(server: ServerConnection, content_type: int, data: bytes, padding: int = 0) -> bytes:
    server._seal(content_type, data) if not padding else server._out.extend(
        server._write.seal_parts(content_type, data, padding)  # type: ignore[union-attr]
    )
    return server.data_to_send()


def test_tampered_record_is_bad_record_mac() -> None:
    client, server = _established()
    server.send_application_data(b"hello")
    wire = bytearray(server.data_to_send())
    wire[-1] ^= 1
    with pytest.raises(TLSError) as info:
        client.receive_data(bytes(wire))
    assert info.value.alert == A.bad_record_mac


def test_encrypted_record_larger_than_2_14_plus_256_is_record_overflow() -> None:
    client, _ = _established()
    with pytest.raises(TLSError) as info:
        client.receive_data(b"\x17\x03\x03\x41\x01" + bytes(MAX_PLAINTEXT + 257))
    assert info.value.alert == A.record_overflow


def test_inner_plaintext_over_2_14_is_record_overflow() -> None:
    client, server = _established()
    with pytest.raises(TLSError) as info:
        client.receive_data(_reseal(server, ContentType.application_data, bytes(MAX_PLAINTEXT + 1)))
    assert info.value.alert == A.record_overflow


def test_all_zero_inner_plaintext_is_unexpected_message() -> None:
    client, server = _established()
    write = server._write
    assert write is not None
    record = b"".join(write.seal_parts(0, b"", padding=10))
    with pytest.raises(TLSError) as info:
        client.receive_data(record)
    assert info.value.alert == A.unexpected_message


def test_padded_records_from_the_peer_are_accepted() -> None:
    client, server = _established()
    write = server._write
    assert write is not None
    client.receive_data(
        b"".join(write.seal_parts(ContentType.application_data, b"padded", padding=300))
    )
    assert drain(client) == [ApplicationData(b"padded")]


def test_change_cipher_spec_after_handshake_is_unexpected_message() -> None:
    client, _ = _established()
    with pytest.raises(TLSError) as info:
        client.receive_data(b"\x14\x03\x03\x00\x01\x01")
    assert info.value.alert == A.unexpected_message


def test_change_cipher_spec_with_wrong_value_is_unexpected_message() -> None:
    client = ClientConnection(client_config(), now=NOW)
    client.data_to_send()
    with pytest.raises(TLSError) as info:
        client.receive_data(b"\x14\x03\x03\x00\x01\x02")
    assert info.value.alert == A.unexpected_message


def test_invalid_key_update_request_is_illegal_parameter() -> None:
    client, server = _established()
    with pytest.raises(TLSError) as info:
        client.receive_data(
            _reseal(server, ContentType.handshake, frame(HandshakeType.key_update, b"\x02"))
        )
    assert info.value.alert == A.illegal_parameter


def test_key_update_not_at_record_end_is_unexpected_message() -> None:
    client, server = _established()
    two = frame(HandshakeType.key_update, b"\x00") * 2
    with pytest.raises(TLSError) as info:
        client.receive_data(_reseal(server, ContentType.handshake, two))
    assert info.value.alert == A.unexpected_message


def test_unexpected_handshake_message_after_handshake_is_unexpected_message() -> None:
    client, server = _established()
    with pytest.raises(TLSError) as info:
        client.receive_data(
            _reseal(server, ContentType.handshake, frame(HandshakeType.finished, bytes(32)))
        )
    assert info.value.alert == A.unexpected_message


def test_new_session_ticket_lifetime_over_seven_days_is_illegal_parameter() -> None:
    client, server = _established()
    ticket = push_new_session_ticket(NewSessionTicket(604801, 0, b"", b"t", ()))
    with pytest.raises(TLSError) as info:
        client.receive_data(_reseal(server, ContentType.handshake, ticket))
    assert info.value.alert == A.illegal_parameter


def test_new_session_ticket_to_a_server_is_unexpected_message() -> None:
    client, server = _established()
    ticket = push_new_session_ticket(NewSessionTicket(60, 0, b"", b"t", ()))
    client._seal(ContentType.handshake, ticket)
    with pytest.raises(TLSError) as info:
        server.receive_data(client.data_to_send())
    assert info.value.alert == A.unexpected_message


def test_sequence_number_exhaustion_refuses_to_reuse_a_nonce() -> None:
    client, _ = _established()
    write = client._write
    assert isinstance(write, RecordProtection)
    write.seq = (1 << 64) - 1
    write.seal(ContentType.application_data, b"last")  # the final allowed number
    with pytest.raises(TLSError):
        write.seal(ContentType.application_data, b"wrapped")


def test_writer_rekeys_automatically_at_the_aead_record_limit() -> None:
    client, server = _established()
    write = client._write
    assert write is not None
    write.seq = write.params.record_limit  # as if 2^23 records had been sent
    server_read = server._reader.protection
    assert server_read is not None
    server_read.seq = write.seq
    client.send_application_data(b"after the limit")
    assert KeyUpdated("write", requested=False) in drain(client)
    server.receive_data(client.data_to_send())
    events = drain(server)
    assert (
        KeyUpdated("read", requested=False) in events
        and ApplicationData(b"after the limit") in events
    )


def test_data_after_close_notify_is_ignored() -> None:
    client, server = _established()
    client.close()
    wire = client.data_to_send()
    server.receive_data(wire + b"\x17\x03\x03\x00\x05junk!")
    assert server.data_to_send() == b""


# --- responses the client checks ----------------------------------------------------


def test_server_finished_mismatch_is_decrypt_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sidecar.tls.server as server_module

    monkeypatch.setattr(server_module, "finished_verify_data", lambda *args: bytes(32))
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == A.decrypt_error


def test_bad_certificate_verify_signature_is_decrypt_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sidecar.tls.server as server_module

    real_sign = server_module.sign
    monkeypatch.setattr(
        server_module, "sign", lambda key, scheme, data: real_sign(key, scheme, data + b"x")
    )
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == A.decrypt_error


def test_unsolicited_extension_in_server_hello_is_unsupported_extension(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sidecar.tls import server as server_module
    from sidecar.tls.messages import ServerHello

    real = server_module.ServerHello

    def with_extra(
        random: bytes, sid: bytes, suite: int, exts: tuple[tuple[int, bytes], ...]
    ) -> ServerHello:
        return real(random, sid, suite, (*exts, (0x1234, b"")))

    monkeypatch.setattr(server_module, "ServerHello", with_extra)
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == A.unsupported_extension


def test_handshake_completes_when_records_arrive_coalesced_in_one_write() -> None:
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_application_data(b"early from client")
    server.receive_data(client.data_to_send())  # Finished and data in one read
    events = drain(server)
    assert isinstance(events[-2], HandshakeComplete) and events[-1] == ApplicationData(
        b"early from client"
    )


def test_offered_extension_in_the_wrong_message_is_illegal_parameter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # supported_groups was offered, but it belongs in EncryptedExtensions, never in ServerHello.
    from sidecar.tls import server as server_module
    from sidecar.tls.messages import ServerHello

    real = server_module.ServerHello

    def with_groups(
        random: bytes, sid: bytes, suite: int, exts: tuple[tuple[int, bytes], ...]
    ) -> ServerHello:
        return real(
            random, sid, suite, (*exts, (ExtensionType.supported_groups, b"\x00\x02\x00\x1d"))
        )

    monkeypatch.setattr(server_module, "ServerHello", with_groups)
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == A.illegal_parameter


def test_second_hello_retry_request_is_unexpected_message() -> None:
    client = ClientConnection(client_config(key_share_groups=()), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    hrr = server.data_to_send()
    client.receive_data(hrr)
    client.data_to_send()
    with pytest.raises(TLSError) as info:
        client.receive_data(hrr[:-6] if hrr.endswith(b"\x14\x03\x03\x00\x01\x01") else hrr)
    assert info.value.alert == A.unexpected_message
