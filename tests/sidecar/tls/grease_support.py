"""What the GREASE tests share: a loopback relay that records both directions, and the
check that a recorded ClientHello carries a GREASE value in every RFC 8701 position."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sidecar.tls.extensions import (
    ExtensionType,
    find,
    pull_alpn,
    pull_client_key_shares,
    pull_client_versions,
    pull_psk_modes,
    pull_uint16_list,
)
from sidecar.tls.grease import GREASE_PSK_MODES, is_grease
from sidecar.tls.messages import ClientHello, HandshakeType, pull_client_hello

RELAY_TIMEOUT = 20.0


@dataclass
class Recording:
    """Bytes seen on the wire, per direction."""

    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


@contextlib.asynccontextmanager
async def recording_relay(target_port: int) -> AsyncIterator[tuple[int, list[Recording]]]:
    """A TCP relay on loopback in front of `target_port` that keeps every byte, one
    `Recording` per connection in the order they came."""
    recordings: list[Recording] = []
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, into: bytearray
    ) -> None:
        try:
            while data := await asyncio.wait_for(reader.read(65536), RELAY_TIMEOUT):
                into += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.write_eof()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        recording = Recording()
        recordings.append(recording)
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(
            pipe(c_reader, s_writer, recording.to_server),
            pipe(s_reader, c_writer, recording.to_client),
        )
        s_writer.close()
        c_writer.close()

    def start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(start, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], recordings
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def first_client_hello(wire: bytes) -> ClientHello:
    """The ClientHello in the first record of `wire` (it fits one record here)."""
    assert wire[:1] == b"\x16", "first record is not a handshake record"
    length = int.from_bytes(wire[3:5], "big")
    message = wire[5 : 5 + length]
    assert message[0] == HandshakeType.client_hello
    return pull_client_hello(message[4 : 4 + int.from_bytes(message[1:4], "big")])


def grease_positions(hello: ClientHello) -> dict[str, bool]:
    """For each RFC 8701 §3.1 position, whether `hello` carries a GREASE value there."""
    ext = hello.extensions

    def body(ext_type: int) -> bytes:
        data = find(ext, ext_type)
        assert data is not None, f"extension {ext_type} missing"
        return data

    shares = pull_client_key_shares(body(ExtensionType.key_share))
    return {
        "cipher_suites": any(is_grease(s) for s in hello.cipher_suites),
        "empty_extension": any(is_grease(t) and d == b"" for t, d in ext),
        "one_byte_extension": any(is_grease(t) and len(d) == 1 for t, d in ext),
        "supported_groups": any(
            is_grease(g) for g in pull_uint16_list(body(ExtensionType.supported_groups))
        ),
        "key_share": any(is_grease(g) and len(s) == 1 for g, s in shares),
        "signature_algorithms": any(
            is_grease(a) for a in pull_uint16_list(body(ExtensionType.signature_algorithms))
        ),
        "supported_versions": any(
            is_grease(v) for v in pull_client_versions(body(ExtensionType.supported_versions))
        ),
        "psk_key_exchange_modes": any(
            m in GREASE_PSK_MODES
            for m in pull_psk_modes(body(ExtensionType.psk_key_exchange_modes))
        ),
        "alpn": any(
            len(p) == 2 and is_grease(int.from_bytes(p, "big"))
            for p in pull_alpn(body(ExtensionType.application_layer_protocol_negotiation))
        ),
    }


ALL_POSITIONS = dict.fromkeys(
    (
        "cipher_suites",
        "empty_extension",
        "one_byte_extension",
        "supported_groups",
        "key_share",
        "signature_algorithms",
        "supported_versions",
        "psk_key_exchange_modes",
        "alpn",
    ),
    True,
)
