"""What a peer can make the engine do is bounded (`sidecar/tls/limits.py`).

Each attack is sent as records, one record per `receive_data` call (or one byte per call:
STYLE's bytewise tier), and stops at a fixed count: the engine must refuse with the
alert named here before the attacker runs out of records. CVE-2016-8610 is the warning
alert case; the rest are its relatives (RFC 8446 §4.6.3, §5.1, §5, §4.1.4).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.tls import (
    AlertDescription,
    AlertLevel,
    AlertReceived,
    ApplicationData,
    ClientConnection,
    Connection,
    HandshakeComplete,
    ServerConnection,
    TLSError,
)
from sidecar.tls.extensions import (
    ClientHelloExtensions,
    ExtensionType,
    push_client_key_shares,
    push_uint16_list,
)
from sidecar.tls.limits import (
    MAX_CERTIFICATE_ENTRIES,
    MAX_EMPTY_RECORDS,
    MAX_HANDSHAKE_MESSAGE,
    MAX_KEY_UPDATES,
    MAX_WARNING_ALERTS,
    PRE_AUTH_BYTES,
)
from sidecar.tls.messages import ClientHello, pull_client_hello, push_client_hello
from sidecar.tls.record import HEADER_LENGTH, ContentType, plaintext_record

from .helpers import connected_pair, drain, pump
from .pki import NOW, Identity, authority, client_config, identity, server_config

A = AlertDescription
USER_CANCELED = bytes((AlertLevel.warning, AlertDescription.user_canceled))
# More than any limit under test, few enough that an unbounded engine fails quickly.
ATTACK_RECORDS = 2_000

feeding = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])


def _feed(conn: Connection, data: bytes, bytewise: bool) -> None:
    if bytewise:
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
    else:
        conn.receive_data(data)


def _records_until_refused(
    conn: Connection, records: Iterable[bytes], bytewise: bool
) -> tuple[int, TLSError, bytes]:
    """Feed `records` in turn: how many had gone in when `conn` refused, its error, and
    everything it sent meanwhile (its fatal alert last)."""
    sent = 0
    out: list[bytes] = []
    for record in records:
        sent += 1
        try:
            _feed(conn, record, bytewise)
        except TLSError as exc:
            out.append(conn.data_to_send())
            return sent, exc, b"".join(out)
        out.append(conn.data_to_send())
    raise AssertionError(f"all {sent} records were accepted")


def _fatal_alert_heard_by(peer: Connection, wire: bytes) -> AlertDescription | int:
    """The fatal alert `peer` decrypts from `wire` (the refusing side's output)."""
    peer.receive_data(wire)
    fatal = [
        e.description
        for e in drain(peer)
        if isinstance(e, AlertReceived) and e.level == AlertLevel.fatal
    ]
    assert len(fatal) == 1, fatal
    return fatal[0]


def _client_hello() -> ClientHello:
    record = ClientConnection(client_config(), now=NOW).data_to_send()
    return pull_client_hello(record[9:])


def _established() -> tuple[ClientConnection, ServerConnection]:
    client, server = connected_pair()
    drain(client), drain(server)
    return client, server


def _sealed(conn: Connection, content_type: int, fragment: bytes) -> bytes:
    """One record as `conn` would protect it: an attacker holding its own keys."""
    conn._seal(content_type, fragment)
    return conn.data_to_send()


# --- warning alerts (CVE-2016-8610) -------------------------------------------------


@feeding
def test_user_canceled_alerts_past_the_limit_before_the_handshake_are_unexpected_message(
    bytewise: bool,
) -> None:
    server = ServerConnection(server_config(), now=NOW)
    alert = plaintext_record(ContentType.alert, USER_CANCELED)
    sent, error, out = _records_until_refused(
        server, (alert for _ in range(ATTACK_RECORDS)), bytewise
    )
    assert sent == MAX_WARNING_ALERTS + 1
    assert error.alert == A.unexpected_message
    assert out == plaintext_record(ContentType.alert, bytes((2, A.unexpected_message)))


@feeding
def test_user_canceled_alerts_past_the_limit_after_the_handshake_are_unexpected_message(
    bytewise: bool,
) -> None:
    client, server = _established()
    alerts = (_sealed(client, ContentType.alert, USER_CANCELED) for _ in range(ATTACK_RECORDS))
    sent, error, out = _records_until_refused(server, alerts, bytewise)
    assert sent == MAX_WARNING_ALERTS + 1
    assert error.alert == A.unexpected_message
    assert _fatal_alert_heard_by(client, out) == A.unexpected_message


def test_application_data_between_user_canceled_alerts_resets_the_count() -> None:
    client, server = _established()
    for _ in range(3):
        for _ in range(MAX_WARNING_ALERTS):
            server.receive_data(_sealed(client, ContentType.alert, USER_CANCELED))
        client.send_application_data(b"still here")
        server.receive_data(client.data_to_send())
    events = drain(server)
    assert events.count(ApplicationData(b"still here")) == 3
    assert not server.read_closed


# --- empty records (RFC 8446 §5.1) --------------------------------------------------


def test_zero_length_alert_record_before_the_handshake_is_unexpected_message() -> None:
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        server.receive_data(plaintext_record(ContentType.alert, b""))
    assert info.value.alert == A.unexpected_message


def test_zero_length_alert_record_after_the_handshake_is_unexpected_message() -> None:
    client, server = _established()
    with pytest.raises(TLSError) as info:
        server.receive_data(_sealed(client, ContentType.alert, b""))
    assert info.value.alert == A.unexpected_message


@feeding
def test_empty_application_data_records_past_the_limit_are_unexpected_message(
    bytewise: bool,
) -> None:
    client, server = _established()
    empties = (_sealed(client, ContentType.application_data, b"") for _ in range(ATTACK_RECORDS))
    sent, error, out = _records_until_refused(server, empties, bytewise)
    assert sent == MAX_EMPTY_RECORDS + 1
    assert error.alert == A.unexpected_message
    assert _fatal_alert_heard_by(client, out) == A.unexpected_message


def test_empty_records_between_application_data_are_accepted() -> None:
    client, server = _established()
    for _ in range(3):
        for _ in range(MAX_EMPTY_RECORDS):
            server.receive_data(_sealed(client, ContentType.application_data, b""))
        client.send_application_data(b"data")
        server.receive_data(client.data_to_send())
    assert drain(server) == [ApplicationData(b"data")] * 3


# --- KeyUpdate (RFC 8446 §4.6.3) ----------------------------------------------------


def _key_updates(client: ClientConnection) -> Iterator[bytes]:
    for _ in range(ATTACK_RECORDS):
        # update_requested: each one also makes the server derive and send its own.
        client.update_key(request_peer_update=True)
        yield client.data_to_send()


@feeding
def test_key_updates_past_the_limit_without_application_data_are_unexpected_message(
    bytewise: bool,
) -> None:
    client, server = _established()
    sent, error, out = _records_until_refused(server, _key_updates(client), bytewise)
    assert sent == MAX_KEY_UPDATES + 1
    assert error.alert == A.unexpected_message
    assert _fatal_alert_heard_by(client, out) == A.unexpected_message


def test_key_updates_between_application_data_are_accepted() -> None:
    client, server = _established()
    for round_ in range(3 * MAX_KEY_UPDATES):
        client.update_key(request_peer_update=False)
        client.send_application_data(b"%d" % round_)
        server.receive_data(client.data_to_send())
    data = [e for e in drain(server) if isinstance(e, ApplicationData)]
    assert len(data) == 3 * MAX_KEY_UPDATES
    assert not server.read_closed


# --- the handshake before authentication --------------------------------------------


def test_a_second_change_cipher_spec_is_unexpected_message() -> None:
    # RFC 8446 §5 / Appendix D.4: one dummy change_cipher_spec per flight, dropped
    # unread; a stream of them is not middlebox compatibility.
    client = ClientConnection(client_config(), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(client.data_to_send())
    server.data_to_send()
    ccs = plaintext_record(ContentType.change_cipher_spec, b"\x01")
    sent, error, _ = _records_until_refused(server, (ccs for _ in range(ATTACK_RECORDS)), False)
    assert sent == 2
    assert error.alert == A.unexpected_message


def test_a_client_hello_that_ignores_the_hello_retry_request_gets_no_second_one() -> None:
    # RFC 8446 §4.1.4: one HelloRetryRequest per handshake, so a client cannot make the
    # server hash ClientHellos in a loop.
    client = ClientConnection(client_config(key_share_groups=()), now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    hello = client.data_to_send()
    server.receive_data(hello)
    assert server.data_to_send()  # the HelloRetryRequest
    with pytest.raises(TLSError) as info:
        server.receive_data(hello)
    assert info.value.alert == A.illegal_parameter
    assert server.data_to_send() == plaintext_record(
        ContentType.alert, bytes((2, A.illegal_parameter))
    )


def test_a_handshake_message_declared_over_64_kib_is_refused_at_its_header() -> None:
    server = ServerConnection(server_config(), now=NOW)
    header = bytes((1,)) + (MAX_HANDSHAKE_MESSAGE + 1).to_bytes(3, "big")
    with pytest.raises(TLSError) as info:
        server.receive_data(plaintext_record(ContentType.handshake, header))
    assert info.value.alert == A.decode_error


def _padded_hello(total: int) -> bytes:
    """A valid ClientHello message of `total` bytes, grown by a padding extension (21)."""
    hello = _client_hello()
    size = len(push_client_hello(hello)) + 4
    padded = replace(hello, extensions=(*hello.extensions, (21, bytes(total - size))))
    message = push_client_hello(padded)
    assert len(message) == total
    return message


@feeding
def test_a_60k_client_hello_in_one_byte_records_runs_out_of_the_pre_authentication_budget(
    bytewise: bool,
) -> None:
    message = _padded_hello(60_000)
    server = ServerConnection(server_config(), now=NOW)
    records = (plaintext_record(ContentType.handshake, message[i : i + 1]) for i in range(60_000))
    sent, error, out = _records_until_refused(server, records, bytewise)
    # Six bytes a record: the budget runs out long before the 60,000th.
    assert sent == PRE_AUTH_BYTES // (HEADER_LENGTH + 1) + 1
    assert error.alert == A.unexpected_message
    assert out == plaintext_record(ContentType.alert, bytes((2, A.unexpected_message)))


def test_the_same_60k_client_hello_in_whole_records_is_answered() -> None:
    message = _padded_hello(60_000)
    server = ServerConnection(server_config(), now=NOW)
    for start in range(0, len(message), 1 << 14):
        server.receive_data(
            plaintext_record(ContentType.handshake, message[start : start + (1 << 14)])
        )
    assert server.data_to_send()[:1] == bytes((ContentType.handshake,))


def _in_one_byte_records(wire: bytes) -> bytes:
    """Plaintext handshake records re-cut so that each carries one byte."""
    out: list[bytes] = []
    pos = 0
    while pos < len(wire):
        content_type, length = wire[pos], int.from_bytes(wire[pos + 3 : pos + 5], "big")
        body = wire[pos + HEADER_LENGTH : pos + HEADER_LENGTH + length]
        out += (plaintext_record(content_type, body[i : i + 1]) for i in range(len(body)))
        pos += HEADER_LENGTH + length
    return b"".join(out)


def test_a_handshake_whose_every_record_carries_one_byte_still_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = ClientConnection(client_config(), server_name="x", now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    server.receive_data(_in_one_byte_records(client.data_to_send()))
    flight = server.data_to_send()
    # The client seals its encrypted flight one byte a record.
    monkeypatch.setattr("sidecar.tls.connection.MAX_PLAINTEXT", 1)
    client.receive_data(flight)
    monkeypatch.undo()
    server.receive_data(client.data_to_send())
    assert any(isinstance(e, HandshakeComplete) for e in drain(server))
    pump(client, server)
    client.send_application_data(b"after")
    server.receive_data(client.data_to_send())
    assert ApplicationData(b"after") in drain(server)


class _CountedScans(tuple[int, ...]):
    """The client's parsed supported_groups, counting `in` tests over it."""

    scans = 0

    def __contains__(self, item: object) -> bool:
        _CountedScans.scans += 1
        return super().__contains__(item)


def test_thousands_of_key_shares_are_not_each_checked_by_a_scan_of_supported_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """7,900 one-byte shares and 11,901 groups fit in one 64 KiB ClientHello; one scan
    of the group list per share made the server compare about 60 million integers
    before authentication. Tests never time CPU, so the scans are counted: the parsed
    group list is wrapped to count them (the only stand-in here); the bytes are real."""
    hello = _client_hello()
    keep = {ExtensionType.supported_versions, ExtensionType.signature_algorithms}
    shared = [0x2000 + i for i in range(7_900)]
    groups = [0x8000 + i for i in range(4_000)] + shared + [0x001D]  # x25519 last
    extensions = (
        *((t, d) for t, d in hello.extensions if t in keep),
        (ExtensionType.supported_groups, push_uint16_list(groups)),
        (ExtensionType.key_share, push_client_key_shares((g, b"\x01") for g in shared)),
    )
    message = push_client_hello(replace(hello, extensions=extensions))
    assert len(message) <= MAX_HANDSHAKE_MESSAGE
    parse = ClientHelloExtensions.parse

    def counted(raw: tuple[tuple[int, bytes], ...]) -> ClientHelloExtensions:
        ext = parse(raw)
        return replace(ext, supported_groups=_CountedScans(ext.supported_groups))

    monkeypatch.setattr(ClientHelloExtensions, "parse", counted)
    _CountedScans.scans = 0
    server = ServerConnection(server_config(), now=NOW)
    for start in range(0, len(message), 1 << 14):
        chunk = message[start : start + (1 << 14)]
        server.receive_data(plaintext_record(ContentType.handshake, chunk))
    assert server.data_to_send()[:1] == bytes((ContentType.handshake,))  # a HelloRetryRequest
    assert _CountedScans.scans < len(server_config().groups) + 1


# --- what an earlier probe found bounded, kept that way -----------------------------


def test_a_client_hello_with_16k_extensions_filling_their_vector_is_refused_at_its_header() -> None:
    hello = _client_hello()
    used = sum(4 + len(data) for _, data in hello.extensions)
    count = ((1 << 16) - 1 - used) // 4  # empty extensions until the 2^16-1 vector is full
    assert count > 15_500
    extensions = (*hello.extensions, *((0x7000 + i, b"") for i in range(count)))
    message = push_client_hello(replace(hello, extensions=extensions))
    assert len(message) > MAX_HANDSHAKE_MESSAGE
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        server.receive_data(plaintext_record(ContentType.handshake, message[: 1 << 14]))
    assert info.value.alert == A.decode_error


def test_a_client_hello_with_15k_unknown_extensions_is_answered() -> None:
    hello = _client_hello()
    extensions = (*hello.extensions, *((0x7000 + i, b"") for i in range(15_000)))
    message = push_client_hello(replace(hello, extensions=extensions))
    server = ServerConnection(server_config(), now=NOW)
    for start in range(0, len(message), 1 << 14):
        server.receive_data(
            plaintext_record(ContentType.handshake, message[start : start + (1 << 14)])
        )
    assert server.data_to_send()[:1] == bytes((ContentType.handshake,))


def _decoy_chain(decoys: int) -> Identity:
    """The client's leaf, then `decoys` certificates named like its intermediate but
    signed by strangers, then the real intermediate: a path builder that tries every
    candidate pays one signature check per decoy."""
    real = identity("client")
    inter = authority().intermediate
    stranger = ec.generate_private_key(ec.SECP256R1())
    fakes = []
    for serial in range(1, decoys + 1):
        fakes.append(
            x509.CertificateBuilder()
            .subject_name(inter.subject)
            .issuer_name(inter.issuer)
            .public_key(stranger.public_key())
            .serial_number(serial)
            .not_valid_before(inter.not_valid_before_utc)
            .not_valid_after(inter.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(stranger, hashes.SHA256())
        )
    return replace(real, chain=(real.chain[0], *fakes, inter))


def test_a_290_certificate_decoy_chain_is_refused_before_any_certificate_is_parsed() -> None:
    client = ClientConnection(client_config(_decoy_chain(288)), server_name="x", now=NOW)
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == A.decode_error
    assert "too large" in info.value.reason


def test_a_client_chain_of_more_than_ten_certificates_is_bad_certificate_before_verification() -> (
    None
):
    client = ClientConnection(
        client_config(_decoy_chain(MAX_CERTIFICATE_ENTRIES - 1)), server_name="x", now=NOW
    )
    server = ServerConnection(server_config(), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(client, server)
    assert info.value.alert == A.bad_certificate
    assert f"more than {MAX_CERTIFICATE_ENTRIES}" in info.value.reason


def test_a_server_chain_of_more_than_ten_certificates_is_bad_certificate_at_the_client() -> None:
    client = ClientConnection(client_config(), server_name="x", now=NOW)
    server = ServerConnection(server_config(_decoy_chain(MAX_CERTIFICATE_ENTRIES - 1)), now=NOW)
    with pytest.raises(TLSError) as info:
        pump(server, client)
    assert info.value.alert == A.bad_certificate
    assert f"more than {MAX_CERTIFICATE_ENTRIES}" in info.value.reason


def test_a_chain_of_ten_certificates_with_decoys_still_verifies_to_the_real_intermediate() -> None:
    _, server = connected_pair(client_config(_decoy_chain(MAX_CERTIFICATE_ENTRIES - 2)))
    assert any(isinstance(e, HandshakeComplete) for e in drain(server))
