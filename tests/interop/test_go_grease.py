"""GREASE (RFC 8701) between Go's crypto/tls and the Trellis engine, both ways.

Go sends no GREASE itself; what is tested is that it accepts ours. The engine's client
goes through a recording relay so the ClientHellos Go accepted are on record, a GREASE
value in each position, also in the resuming one (where pre_shared_key must still come
last, RFC 8446 §4.2.11). The engine's server sends GREASE in CertificateRequest and in
its NewSessionTickets (RFC 8701 §4); Go's client completes mutual TLS and then resumes
on one of those tickets.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.tls import TLSConfig
from sidecar.tls.extensions import ExtensionType
from sidecar.tls.shell import open_tls_connection
from sidecar.tls.ticketstore import TicketStore
from tests.sidecar.tls.grease_support import (
    ALL_POSITIONS,
    first_client_hello,
    grease_positions,
    recording_relay,
)
from tests.sidecar.tls.test_grease_interop import _assert_server_greased, _ring, _spy_sent
from tests.sidecar.tls.test_interop_system_fixtures import peer_process, run

from .conftest import GoPeers
from .test_go_crypto_tls import (
    CLIENT_ID,
    SERVER_ID,
    TIMEOUT,
    go_client_to_engine,
    server_config,
    svid,
)


@pytest.fixture(scope="module")
def svids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("go-grease-svids")


def test_a_go_server_accepts_the_engines_grease_in_every_position_and_on_resumption(
    go_peers: GoPeers, svids: Path
) -> None:
    server = svid(SERVER_ID, "ecdsa", svids)
    config: TLSConfig = svid(CLIENT_ID, "ecdsa", svids).config(
        trust_bundles={"example.org": list(server.roots)},
        ticket_store=TicketStore(),
        alpn_protocols=("h2",),
        grease=True,
    )

    async def talk(port: int) -> bool:
        reader, writer = await open_tls_connection(
            "127.0.0.1", port, config=config, expected_peer=SERVER_ID
        )
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"hello\n"
        resumed: bool = writer.get_extra_info("tls_negotiated").session_resumed
        writer.write_eof()
        await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        return resumed

    async def scenario() -> tuple[list[bool], list[bytes], int, str]:
        argv = (str(go_peers.tlspeer), "server", "-dir", str(server.directory))
        async with peer_process(*argv, "-connections", "2", stdin=False) as go:
            line = await go.wait_for_line(b'"listening"', TIMEOUT)
            port = int(json.loads(line)["addr"].rsplit(":", 1)[1])
            # One relay for both, so the ticket's endpoint is the same the second time.
            async with recording_relay(port) as (relay_port, recordings):
                seen = [await talk(relay_port), await talk(relay_port)]
            code, output = await go.finish(TIMEOUT)
        return seen, [bytes(r.to_server) for r in recordings], code, output

    seen, wires, code, output = run(scenario(), TIMEOUT * 2)
    assert code == 0, output
    assert seen == [False, True]
    for wire in wires:
        assert grease_positions(first_client_hello(wire)) == ALL_POSITIONS
    resuming = first_client_hello(wires[1])
    assert resuming.extensions[-1][0] == ExtensionType.pre_shared_key
    lines = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    assert [s["did_resume"] for s in lines if s["event"] == "handshake"] == [False, True]


def test_a_go_client_ignores_the_engines_grease_and_resumes_on_its_ticket(
    go_peers: GoPeers, svids: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _spy_sent(monkeypatch)
    config = server_config(svid(SERVER_ID, "ecdsa", svids), ticket_ring=_ring(), grease=True)
    outcome = go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-resume")
    assert outcome.go_exit == 0, outcome.go_output
    shakes: list[dict[str, Any]] = [line for line in outcome.go if line["event"] == "handshake"]
    assert [s["did_resume"] for s in shakes] == [False, True], outcome.go_output
    assert [e["spiffe_id"] for e in outcome.engine][:1] == [CLIENT_ID]
    _assert_server_greased(sent)
