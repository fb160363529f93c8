"""kTLS on a kernel without it (this machine's: `tcp_available_ulp` lists no "tls"): the
probe says so once, `attach` refuses with the reason the fallback metric counts, and
the engine's user-space record layer carries the same connection on over the real
socket. The kTLS paths themselves run in the guest (tests/kernel/guest/)."""

from __future__ import annotations

import logging

import pytest

from sidecar import ktls
from sidecar.tls.suites import CipherSuite
from tests.kernel.guest.peers import EngineRecv, handshake_pair, payload, read_exactly

pytestmark = pytest.mark.skipif(
    ktls._probe_kernel().available, reason="this kernel has kTLS: the guest suite covers it"
)


def test_the_probe_says_once_that_the_kernel_has_no_tls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ktls._reset_probe()
    with caplog.at_level(logging.INFO, logger="trellis.ktls"):
        first = ktls.probe()
        second = ktls.probe()
    assert not first.available
    assert second is first
    assert "TLS ULP" in first.reason
    lines = [r.getMessage() for r in caplog.records if r.name == "trellis.ktls"]
    assert len(lines) == 1
    assert lines[0].startswith("kTLS off, using the user-space record layer")


def test_a_connection_the_kernel_cannot_take_goes_on_in_user_space() -> None:
    ktls._reset_probe()
    client, server = handshake_pair(CipherSuite.AES_128_GCM_SHA256)
    before = ktls.STATS.fallbacks.get("no_kernel_support", 0)
    with pytest.raises(ktls.KtlsUnavailable) as refused:
        ktls.attach(client.sock, client.conn, client.pending)
    assert refused.value.reason == "no_kernel_support"
    assert ktls.STATS.fallbacks["no_kernel_support"] == before + 1
    # Nothing was done to the socket: the engine's record layer carries on, both ways.
    user_client, user_server = EngineRecv(client), EngineRecv(server)
    data = payload(40_000)
    user_client.send(data)
    assert read_exactly(user_server, len(data)) == data
    user_server.send(b"and back")
    assert read_exactly(user_client, 8) == b"and back"
    client.sock.close()
    server.sock.close()
