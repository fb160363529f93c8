"""GREASE (RFC 8701) in the engine: what our ClientHello, CertificateRequest and
NewSessionTicket carry, that engine pairs ignore it, and that a server which selects
one of our GREASE values is refused with illegal_parameter, over a real socket."""

from __future__ import annotations

import asyncio
import os

import pytest

from sidecar.tls import ClientConnection, SessionTicket, TLSError
from sidecar.tls.extensions import (
    ExtensionType,
    find,
    pull_uint16_list,
    push_server_key_share,
)
from sidecar.tls.grease import GREASE_PSK_MODES, GREASE_VALUES, Grease, is_grease
from sidecar.tls.keyschedule import Transcript
from sidecar.tls.messages import (
    TLS13,
    HandshakeType,
    ServerHello,
    pull_certificate_request,
    pull_new_session_ticket,
    push_server_hello,
)
from sidecar.tls.shell import open_tls_connection

from .grease_support import ALL_POSITIONS, first_client_hello, grease_positions
from .helpers import drain
from .pki import NOW, DeterministicRng, client_config, server_config
from .resumption_support import T0, Mesh, completed, connect
from .test_interop_system_fixtures import run

ALERT_ILLEGAL_PARAMETER = 47


def _hello(seed: bytes, **overrides: object) -> bytes:
    config = client_config(rng=DeterministicRng(seed), grease=True, **overrides)
    client = ClientConnection(config, server_name="x.example.org", now=NOW)
    return client.data_to_send()


def test_reserved_values_are_the_sixteen_of_rfc_8701() -> None:
    assert GREASE_VALUES[0] == 0x0A0A and GREASE_VALUES[-1] == 0xFAFA
    assert all(is_grease(v) for v in GREASE_VALUES)
    assert sum(is_grease(v) for v in range(0x10000)) == 16
    assert GREASE_PSK_MODES == (0x0B, 0x2A, 0x49, 0x68, 0x87, 0xA6, 0xC5, 0xE4)


def test_a_greasing_client_hello_carries_a_reserved_value_in_every_position() -> None:
    assert grease_positions(first_client_hello(_hello(b"one"))) == ALL_POSITIONS


def test_a_client_hello_without_grease_carries_none() -> None:
    config = client_config(rng=DeterministicRng(b"one"))
    hello = first_client_hello(ClientConnection(config, server_name="x").data_to_send())
    assert not any(grease_positions(hello).values())


def test_grease_values_vary_per_connection_and_repeat_under_the_same_rng() -> None:
    draws = {Grease.draw(DeterministicRng(bytes([i]))) for i in range(16)}
    assert len(draws) > 1
    assert _hello(b"seed") == _hello(b"seed")  # reproducible under an injected RNG
    assert _hello(b"seed") != _hello(b"other")


def test_the_two_grease_extensions_never_share_a_type() -> None:
    for i in range(256):  # bounded: every first byte value
        drawn = Grease.draw(lambda n, i=i: bytes([0, i, i] + [0] * (n - 3)))
        assert drawn.extension != drawn.extension2


def test_greasing_engines_complete_mutual_tls_and_the_client_ignores_the_servers_grease() -> None:
    mesh = Mesh()
    client_cfg = mesh.client(grease=True)
    server_cfg = mesh.server(grease=True)
    client, server = connect(client_cfg, server_cfg, T0)
    events = drain(client)
    done = completed(events)
    assert done.alpn_protocol == "h2" and not is_grease(done.group)
    assert len([e for e in events if isinstance(e, SessionTicket)]) == 2
    assert completed(drain(server)).peer_spiffe_id is not None
    # The next connection resumes on a ticket whose NewSessionTicket carried GREASE.
    client, server = connect(client_cfg, server_cfg, T0 + 60)
    assert completed(drain(client)).session_resumed


def _sent_messages(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[bytes]]:
    """Every handshake message the engines hand to their record layer, by type: the
    plaintext of what goes out encrypted (a spy, not a fake: the message still goes)."""
    import sidecar.tls.connection as connection

    sent: dict[int, list[bytes]] = {}
    real = connection._Context.send

    def spy(self: connection._Context, transcript: Transcript, message: bytes) -> None:
        sent.setdefault(message[0], []).append(message[4:])
        real(self, transcript, message)

    monkeypatch.setattr(connection._Context, "send", spy)
    return sent


def test_a_greasing_server_puts_grease_in_certificate_request_and_tickets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = _sent_messages(monkeypatch)
    mesh = Mesh()
    client, _ = connect(mesh.client(), mesh.server(grease=True), T0)
    assert len([e for e in drain(client) if isinstance(e, SessionTicket)]) == 2
    (body,) = sent[HandshakeType.certificate_request]
    request = pull_certificate_request(body)
    assert any(is_grease(t) and d == b"" for t, d in request.extensions)
    assert any(is_grease(t) and len(d) == 1 for t, d in request.extensions)
    algorithms = find(request.extensions, ExtensionType.signature_algorithms)
    assert algorithms is not None and is_grease(pull_uint16_list(algorithms)[0])
    for ticket in sent[HandshakeType.new_session_ticket]:
        assert any(is_grease(t) for t, _ in pull_new_session_ticket(ticket).extensions)


# --- a server that selects a GREASE value ---------------------------------------------


async def _refusing_server(choose: str) -> tuple[int, asyncio.Server, list[bytes]]:
    """A raw TCP peer that answers our ClientHello with a ServerHello selecting one of
    the client's GREASE values (`choose`), then records what the client sends back."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await asyncio.wait_for(reader.readexactly(5), 10)
        record = await asyncio.wait_for(reader.readexactly(int.from_bytes(header[3:5], "big")), 10)
        hello = first_client_hello(header + record)
        grease_suite = next(s for s in hello.cipher_suites if is_grease(s))
        grease_ext = next(t for t, _ in hello.extensions if is_grease(t))
        suite, version, group = 0x1301, TLS13, 0x001D
        extensions: list[tuple[int, bytes]] = []
        if choose == "cipher_suite":
            suite = grease_suite
        elif choose == "version":
            version = next(v for v in GREASE_VALUES if v != TLS13)
        elif choose == "group":
            group = grease_suite  # any reserved value: the client shared one
        extensions += [
            (ExtensionType.supported_versions, version.to_bytes(2, "big")),
            (ExtensionType.key_share, push_server_key_share(group, bytes(32))),
        ]
        if choose == "extension":
            extensions.append((grease_ext, b""))
        sh = ServerHello(os.urandom(32), hello.legacy_session_id, suite, tuple(extensions))
        message = push_server_hello(sh)
        writer.write(b"\x16\x03\x03" + len(message).to_bytes(2, "big") + message)
        await writer.drain()
        received.append(await asyncio.wait_for(reader.read(64), 10))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], server, received


@pytest.mark.parametrize("choose", ["cipher_suite", "version", "group", "extension"])
def test_a_server_selecting_a_grease_value_is_refused_with_illegal_parameter(
    choose: str,
) -> None:
    async def scenario() -> tuple[TLSError, bytes]:
        port, server, received = await _refusing_server(choose)
        try:
            config = client_config(rng=os.urandom, grease=True)
            with pytest.raises(TLSError) as caught:
                await open_tls_connection(
                    "127.0.0.1", port, config=config, server_name="x.example.org"
                )
            for _ in range(50):  # bounded wait for the peer to have read our alert
                if received:
                    break
                await asyncio.sleep(0.05)
        finally:
            server.close()
            await server.wait_closed()
        return caught.value, received[0] if received else b""

    error, alert = run(scenario())
    assert error.alert == ALERT_ILLEGAL_PARAMETER, error
    # Our fatal alert went out in the clear (no keys yet): level 2, illegal_parameter.
    assert alert[:1] == b"\x15" and alert[5:7] == bytes([2, ALERT_ILLEGAL_PARAMETER])


def test_server_config_default_does_not_grease() -> None:
    assert server_config().grease is False and client_config().grease is False
