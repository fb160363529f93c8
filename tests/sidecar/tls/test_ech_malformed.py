"""Malformed Encrypted ClientHellos (RFC 9849 §5, §7.1) and ECHConfigs (§4).

Each bad hello is sealed correctly under the server's key, so the server opens it and
meets the defect in the decrypted EncodedClientHelloInner; it is sent over a real
loopback socket and the answer must be the RFC's alert record, never a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import pytest

from sidecar.tls import AlertDescription, ClientConnection, ServerConnection, TLSError
from sidecar.tls.client import build_client_hello
from sidecar.tls.ech import (
    EXT_ECH_OUTER_EXTENSIONS,
    EXT_ENCRYPTED_CLIENT_HELLO,
    INNER_EXTENSION,
    ECHConfig,
    ECHConfigError,
    OuterECH,
    parse_config_list,
    pull_config_list,
    push_config_list,
    push_outer_ech,
    valid_public_name,
)
from sidecar.tls.ech_client import outer_extensions, start_client_ech
from sidecar.tls.groups import ClientKeyShare
from sidecar.tls.messages import ClientHello, pull_client_hello, push_client_hello
from sidecar.tls.record import ContentType, plaintext_record

from .ech_support import INNER_NAME, PUBLIC_NAME, config_list, ech_key, public_name_credential
from .pki import NOW, client_config, server_config
from .resumption_support import T0, replay, serving

KEY = ech_key(7)


def _server_cfg() -> object:
    return server_config(ech_keys=[KEY], ech_public_credential=public_name_credential().credential)


def _inner() -> ClientHello:
    config = client_config()
    shares = [ClientKeyShare(g, os.urandom) for g in config.key_shares]
    hello = build_client_hello(config, INNER_NAME, shares)
    return replace(hello, extensions=(*hello.extensions, INNER_EXTENSION))


def _seal(
    encoded: bytes, inner: ClientHello, ech_data: Callable[[OuterECH], bytes] | None = None
) -> bytes:
    """A ClientHelloOuter record carrying `encoded` as its (sealed) EncodedClientHelloInner."""
    ech, enc = start_client_ech(KEY.config, os.urandom)
    outer = ClientHello(
        os.urandom(32), inner.legacy_session_id, inner.cipher_suites, b"\x00",
        tuple(outer_extensions(inner, PUBLIC_NAME)),
    )  # fmt: skip
    zeros = OuterECH(ech.kdf_id, ech.aead_id, KEY.config.config_id, enc, bytes(len(encoded) + 16))
    with_zeros = replace(
        outer, extensions=(*outer.extensions, (EXT_ENCRYPTED_CLIENT_HELLO, push_outer_ech(zeros)))
    )
    payload = ech.context.seal(push_client_hello(with_zeros)[4:], encoded)
    sealed = replace(zeros, payload=payload)
    data = ech_data(sealed) if ech_data is not None else push_outer_ech(sealed)
    hello = replace(outer, extensions=(*outer.extensions, (EXT_ENCRYPTED_CLIENT_HELLO, data)))
    return plaintext_record(ContentType.handshake, push_client_hello(hello), 0x0301)


def _encode(inner: ClientHello, **changes: object) -> bytes:
    return push_client_hello(replace(inner, legacy_session_id=b"", **changes))[4:]


def _without(inner: ClientHello, ext_type: int) -> tuple[tuple[int, bytes], ...]:
    return tuple(e for e in inner.extensions if e[0] != ext_type)


def _non_zero_padding(inner: ClientHello) -> bytes:
    return _encode(inner) + b"\x00" * 15 + b"\x01"


def _own_session_id(inner: ClientHello) -> bytes:
    return push_client_hello(replace(inner, legacy_session_id=b"\x01" * 32))[4:]


def _outer_extensions_naming_ech(inner: ClientHello) -> bytes:
    ref = (EXT_ECH_OUTER_EXTENSIONS, b"\x02\xfe\x0d")
    return _encode(inner, extensions=(ref, *inner.extensions))


def _outer_extensions_naming_a_missing_one(inner: ClientHello) -> bytes:
    ref = (EXT_ECH_OUTER_EXTENSIONS, b"\x02\x00\x2a")  # early_data: not in the outer hello
    return _encode(inner, extensions=(ref, *inner.extensions))


def _outer_extensions_out_of_order(inner: ClientHello) -> bytes:
    # key_share (51) then supported_groups (10): the outer hello has them the other way.
    ref = (EXT_ECH_OUTER_EXTENSIONS, b"\x04\x00\x33\x00\x0a")
    kept = tuple(e for e in inner.extensions if e[0] not in (10, 51))
    return _encode(inner, extensions=(ref, *kept))


def _no_inner_extension(inner: ClientHello) -> bytes:
    return _encode(inner, extensions=_without(inner, EXT_ENCRYPTED_CLIENT_HELLO))


def _offers_tls12(inner: ClientHello) -> bytes:
    extensions = tuple((t, b"\x04\x03\x04\x03\x03" if t == 43 else d) for t, d in inner.extensions)
    return _encode(inner, extensions=extensions)


def _truncated(inner: ClientHello) -> bytes:
    return _encode(inner)[:60]


ILLEGAL = AlertDescription.illegal_parameter
CASES: dict[str, tuple[Callable[[ClientHello], bytes], AlertDescription]] = {
    "non_zero_padding": (_non_zero_padding, ILLEGAL),
    "inner_legacy_session_id": (_own_session_id, ILLEGAL),
    "outer_extensions_naming_ech": (_outer_extensions_naming_ech, ILLEGAL),
    "outer_extensions_naming_a_missing_extension": (
        _outer_extensions_naming_a_missing_one,
        ILLEGAL,
    ),
    "outer_extensions_out_of_order": (_outer_extensions_out_of_order, ILLEGAL),
    "no_inner_ech_extension": (_no_inner_extension, ILLEGAL),
    "inner_offers_tls12": (_offers_tls12, ILLEGAL),
    "truncated_inner": (_truncated, AlertDescription.decode_error),
}


def _alert(description: AlertDescription) -> bytes:
    return plaintext_record(ContentType.alert, bytes((2, description)))


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_inner_client_hello_is_answered_with_the_rfc_alert_over_a_socket(
    case: str,
) -> None:
    build, alert = CASES[case]
    inner = _inner()
    record = _seal(build(inner), inner)
    with serving(_server_cfg(), T0) as (port, served):  # type: ignore[arg-type]
        answer = replay(port, record)
    assert answer == _alert(alert)
    assert served.error is not None and served.error.alert == alert


@pytest.mark.parametrize(
    ("ech_data", "alert"),
    [
        (lambda e: b"\x02" + push_outer_ech(e)[1:], ILLEGAL),  # neither outer nor inner
        (lambda e: push_outer_ech(e)[:9], AlertDescription.decode_error),  # cut in enc
    ],
    ids=["unknown_type", "truncated_extension"],
)
def test_a_malformed_ech_extension_is_answered_with_the_rfc_alert(
    ech_data: Callable[[OuterECH], bytes], alert: AlertDescription
) -> None:
    inner = _inner()
    server = ServerConnection(_server_cfg(), now=NOW)  # type: ignore[arg-type]
    with pytest.raises(TLSError) as failed:
        server.receive_data(_seal(_encode(inner), inner, ech_data))
    assert failed.value.alert == alert
    assert server.data_to_send() == _alert(alert)


def test_a_payload_that_does_not_open_is_a_rejection_not_an_error() -> None:
    inner = _inner()
    garbled = _seal(
        _encode(inner), inner, lambda e: push_outer_ech(replace(e, payload=bytes(len(e.payload))))
    )
    server = ServerConnection(_server_cfg(), now=NOW)  # type: ignore[arg-type]
    server.receive_data(garbled)
    assert server.data_to_send()[:1] == bytes((ContentType.handshake,))  # a ServerHello


def test_a_second_client_hello_that_does_not_open_after_acceptance_is_decrypt_error() -> None:
    """RFC 9849 §7.1.1: the server accepted ECH in its HelloRetryRequest, so a second
    ClientHelloOuter whose payload fails to open is fatal (decrypt_error)."""
    from sidecar.tls.groups import NamedGroup

    cfg = client_config(
        ech_config_list=config_list(KEY),
        ech_public_name_roots=[public_name_credential().root],
        key_share_groups=(NamedGroup.secp256r1,),
    )
    client = ClientConnection(cfg, server_name=INNER_NAME, now=NOW)
    server = ServerConnection(server_config(ech_keys=[KEY], groups=(NamedGroup.x25519,)), now=NOW)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    flight = client.data_to_send()
    # The flight is a change_cipher_spec record, then the second ClientHello's record.
    ccs, record = flight[:6], flight[6:]
    hello = pull_client_hello(record[9:])
    flipped = tuple(
        (t, d[:-1] + bytes((d[-1] ^ 1,)) if t == EXT_ENCRYPTED_CLIENT_HELLO else d)
        for t, d in hello.extensions
    )
    tampered = plaintext_record(
        ContentType.handshake, push_client_hello(replace(hello, extensions=flipped))
    )
    with pytest.raises(TLSError) as failed:
        server.receive_data(ccs + tampered)
    assert failed.value.alert == AlertDescription.decrypt_error


def test_retry_configs_after_an_accepted_ech_are_refused_by_the_client() -> None:
    """RFC 9849 §6.1.4: a server that accepted ECH sends no retry_configs."""
    cfg = client_config(
        ech_config_list=config_list(KEY), ech_public_name_roots=[public_name_credential().root]
    )
    # A server that accepts and also sends retry_configs: its EncryptedExtensions patched.
    from sidecar.tls import server as server_module

    original = server_module.EncryptedExtensions

    def with_retry(extensions: tuple[tuple[int, bytes], ...]) -> object:
        return original((*extensions, (EXT_ENCRYPTED_CLIENT_HELLO, config_list(KEY))))

    server2 = ServerConnection(server_config(ech_keys=[KEY]), now=NOW)
    client2 = ClientConnection(cfg, server_name=INNER_NAME, now=NOW)
    server_module.EncryptedExtensions = with_retry  # type: ignore[assignment,misc]
    try:
        server2.receive_data(client2.data_to_send())
    finally:
        server_module.EncryptedExtensions = original  # type: ignore[misc]
    with pytest.raises(TLSError) as failed:
        client2.receive_data(server2.data_to_send())
    assert failed.value.alert == AlertDescription.unsupported_extension


# --- ECHConfig validity (§4) ------------------------------------------------------------


def test_a_config_with_an_unknown_mandatory_extension_is_not_usable() -> None:
    mandatory = replace(KEY.config, extensions=((0x8001, b""),), raw=b"")
    optional = replace(KEY.config, extensions=((0x0001, b"x"),), raw=b"")
    assert not mandatory.usable() and optional.usable()
    assert parse_config_list(push_config_list([mandatory, optional])) == (optional,)


@pytest.mark.parametrize(
    "name",
    ["", "1.2.3.4", "example.123", "example.0x1f", "-bad.example", "bad-.example",
     "a..example", "example.", "ex ample.net", "é.example", "a" * 64 + ".example"],
)  # fmt: skip
def test_a_bad_public_name_is_refused(name: str) -> None:
    assert not valid_public_name(name)
    if name and name.isascii():
        assert not replace(KEY.config, public_name=name, raw=b"").usable()


def test_good_public_names_are_accepted() -> None:
    for name in ("public.example.net", "a-b.c1", "xn--bcher-kva.example"):
        assert valid_public_name(name)


def test_configs_of_other_versions_are_skipped_by_their_length() -> None:
    other = b"\xfe\x0c\x00\x03abc"
    data = len(other + KEY.config.raw).to_bytes(2, "big") + other + KEY.config.raw
    assert pull_config_list(data) == (KEY.config,)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        b"\x00\x05\xfe\x0d\x00\x09\x01",  # the config overruns the list
        config_list(KEY)[:-1],
        config_list(KEY) + b"\x00",
        b"\x00\x06\xfe\x0d\x00\x02\x01\x00",  # a config body cut short
    ],
    # Named, not shown: KEY is drawn at import, and pytest-xdist needs the same test ids
    # in every worker.
    ids=["empty", "no-configs", "config-overruns-list", "list-cut-short", "trailing-byte",
         "config-body-cut-short"],
)
def test_a_malformed_config_list_is_a_configuration_error(data: bytes) -> None:
    with pytest.raises(ECHConfigError):
        parse_config_list(data)


def test_a_config_round_trips_byte_identically() -> None:
    (parsed,) = pull_config_list(config_list(KEY))
    assert parsed == KEY.config and parsed.raw == KEY.config.raw
    assert isinstance(parsed, ECHConfig) and parsed.public_name == PUBLIC_NAME


def test_retry_configs_that_do_not_parse_are_a_decode_error_at_the_client() -> None:
    cfg = client_config(
        ech_config_list=config_list(ech_key(8)),
        ech_public_name_roots=[public_name_credential().root],
    )
    client = ClientConnection(cfg, server_name=INNER_NAME, now=NOW)
    from sidecar.tls import server as server_module

    original = server_module.push_config_list
    server_module.push_config_list = lambda configs: b"\x00\x09\xfe\x0d"  # type: ignore[assignment]
    try:
        server = ServerConnection(_server_cfg(), now=NOW)  # type: ignore[arg-type]
        server.receive_data(client.data_to_send())
    finally:
        server_module.push_config_list = original
    with pytest.raises(TLSError) as failed:
        client.receive_data(server.data_to_send())
    assert failed.value.alert == AlertDescription.decode_error


def test_mutated_inner_client_hellos_only_ever_raise_protocol_alerts() -> None:
    """A bounded fuzz of the decrypted side: each EncodedClientHelloInner has a few
    random bytes changed, is sealed properly and sent; the server completes its flight
    or raises TLSError with a protocol alert, never internal_error (a Python exception
    it did not expect)."""
    import random

    rng = random.Random(9849)
    inner = _inner()
    encoded = _encode(inner)
    outcomes: set[str] = set()
    for _ in range(150):
        mutated = bytearray(encoded)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        server = ServerConnection(_server_cfg(), now=NOW)  # type: ignore[arg-type]
        try:
            server.receive_data(_seal(bytes(mutated), inner))
            outcomes.add("flight")
        except TLSError as exc:
            assert exc.alert != AlertDescription.internal_error, exc
            outcomes.add(exc.alert.name)
    assert len(outcomes) > 2, outcomes  # the mutations reached several checks
