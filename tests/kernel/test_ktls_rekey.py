"""Host-side checks of what the guest cannot show: the crypto_info layout against
include/uapi/linux/tls.h, and the Linux >= 6.14 KeyUpdate path.

The rekey test drives `KtlsSocket` over a recording stand-in for the socket: no kernel
this project can boot rekeys kTLS (Debian's is 6.1; rekeying came in 6.14) and the host
kernel has no kTLS at all, so the stand-in is the only way to see the calls made. The
engines on both ends are real, in memory, so the keys checked are the ones RFC 8446
§7.2 derives."""

from __future__ import annotations

import socket
import struct

import pytest

from sidecar import ktls
from sidecar.tls.connection import DirectionSecrets
from sidecar.tls.messages import KeyUpdate, KeyUpdateRequest, push_key_update
from sidecar.tls.record import ContentType
from sidecar.tls.suites import CipherSuite
from tests.sidecar.tls.helpers import connected_pair, drain

KEY16 = bytes(range(16))
KEY32 = bytes(range(32))
IV = bytes(range(100, 112))


def test_gcm_crypto_info_puts_the_iv_tail_before_the_key_and_the_salt_after() -> None:
    info = ktls.crypto_info(CipherSuite.AES_128_GCM_SHA256, DirectionSecrets(b"", KEY16, IV, 5))
    version, cipher = struct.unpack_from("=HH", info)
    assert (version, cipher) == (0x0304, 51)
    assert info[4:] == IV[4:] + KEY16 + IV[:4] + (5).to_bytes(8, "big")
    assert len(info) == 40  # sizeof(struct tls12_crypto_info_aes_gcm_128)
    info = ktls.crypto_info(CipherSuite.AES_256_GCM_SHA384, DirectionSecrets(b"", KEY32, IV, 0))
    assert struct.unpack_from("=HH", info)[1] == 52
    assert len(info) == 56  # sizeof(struct tls12_crypto_info_aes_gcm_256)


def test_chacha_crypto_info_carries_the_whole_iv_and_no_salt() -> None:
    secrets = DirectionSecrets(b"", KEY32, IV, 1 << 40)
    info = ktls.crypto_info(CipherSuite.CHACHA20_POLY1305_SHA256, secrets)
    assert struct.unpack_from("=HH", info)[1] == 54
    assert info[4:] == IV + KEY32 + (1 << 40).to_bytes(8, "big")
    assert len(info) == 56  # sizeof(struct tls12_crypto_info_chacha20_poly1305)


def test_only_linux_6_14_and_later_count_as_able_to_rekey() -> None:
    assert not ktls.can_rekey("6.1.0-57-amd64")
    assert not ktls.can_rekey("6.13.12")
    assert ktls.can_rekey("6.14.0")
    assert ktls.can_rekey("7.0.1-arch1")


class RecordingSocket:
    """Stands in for a kTLS socket on a rekeying kernel: hands out queued records and
    records setsockopt and sendmsg calls (see the module docstring for why)."""

    def __init__(self, records: list[tuple[int, bytes]]) -> None:
        self.records = records
        self.calls: list[tuple[str, int, bytes]] = []

    def recvmsg(
        self, size: int, ancsize: int
    ) -> tuple[bytes, list[tuple[int, int, bytes]], int, None]:
        del ancsize
        record_type, data = self.records.pop(0)
        return (
            data[:size],
            [(ktls.SOL_TLS, ktls.TLS_GET_RECORD_TYPE, bytes((record_type,)))],
            0,
            None,
        )

    def setsockopt(self, level: int, name: int, value: bytes) -> None:
        assert level == ktls.SOL_TLS
        self.calls.append(("setsockopt", name, value))

    def sendmsg(self, buffers: list[bytes], ancdata: list[tuple[int, int, bytes]]) -> int:
        ((level, kind, record_type),) = ancdata
        assert (level, kind) == (ktls.SOL_TLS, ktls.TLS_SET_RECORD_TYPE)
        self.calls.append(("sendmsg", record_type[0], buffers[0]))
        return len(buffers[0])

    def fileno(self) -> int:
        return -1


@pytest.mark.parametrize("requested", [True, False])
def test_a_key_update_on_a_rekeying_kernel_installs_the_next_keys(requested: bool) -> None:
    client, server = connected_pair()
    drain(client)
    drain(server)
    server.update_key(request_peer_update=requested)
    server.data_to_send()
    peer_next_write = server.traffic_secrets().write
    update = push_key_update(
        KeyUpdate(
            KeyUpdateRequest.update_requested
            if requested
            else KeyUpdateRequest.update_not_requested
        )
    )
    fake = RecordingSocket([(ContentType.handshake, update), (ContentType.application_data, b"go")])
    ksock = ktls.KtlsSocket(fake, client)  # type: ignore[arg-type]
    ksock._rekey = True
    before = ktls.STATS.rekeys
    assert ksock.recv(10) == b"go"
    suite = client.traffic_secrets().cipher_suite
    expected = [("setsockopt", ktls.TLS_RX, ktls.crypto_info(suite, peer_next_write))]
    assert peer_next_write.seq == 0
    if requested:
        # RFC 8446 §4.6.3: our KeyUpdate goes out under the old key, then TX switches.
        answer = push_key_update(KeyUpdate(KeyUpdateRequest.update_not_requested))
        expected += [
            ("sendmsg", ContentType.handshake, answer),
            ("setsockopt", ktls.TLS_TX, ktls.crypto_info(suite, client.traffic_secrets().write)),
        ]
        assert client.traffic_secrets().write.seq == 0
    assert fake.calls == expected
    assert ktls.STATS.rekeys == before + 1
    assert not ksock.read_closed


def test_a_key_update_on_linux_before_6_14_closes_with_close_notify() -> None:
    client, server = connected_pair()
    drain(client)
    update = push_key_update(KeyUpdate(KeyUpdateRequest.update_requested))
    fake = RecordingSocket([(ContentType.handshake, update)])
    ksock = ktls.KtlsSocket(fake, client)  # type: ignore[arg-type]
    ksock._rekey = False
    ksock.sock = _WithShutdown(fake)  # type: ignore[assignment]
    before = ktls.STATS.key_update_closes
    assert ksock.recv(10) == b""
    assert ktls.STATS.key_update_closes == before + 1
    assert fake.calls == [("sendmsg", ContentType.alert, b"\x01\x00")]  # close_notify
    del server


class _WithShutdown:
    def __init__(self, inner: RecordingSocket) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def gettimeout(self) -> float | None:
        return None

    def settimeout(self, value: float | None) -> None:
        del value

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_WR
