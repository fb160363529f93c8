"""Resumption between Go's crypto/tls and the Trellis engine, both ways, over loopback.

The Go side is ``tlspeer``: its client with ``-resume`` connects twice through one
``ClientSessionCache`` and reports ``did_resume``; its server serves as many connections
as asked and resumes with the tickets Go itself issued. The Trellis side is the engine
in its asyncio shell, with a STEK ring (server) or a ticket store (client). Go has no
0-RTT, so these are 1-RTT resumptions; each must still run a fresh X25519MLKEM768
exchange (psk_dhe_ke).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.tls import TLSConfig
from sidecar.tls.shell import open_tls_connection
from sidecar.tls.tickets import Stek, StekRing
from sidecar.tls.ticketstore import TicketStore
from tests.sidecar.tls.test_interop_system_fixtures import peer_process, run

from .conftest import GoPeers
from .test_go_crypto_tls import (
    CLIENT_ID,
    SERVER_ID,
    TIMEOUT,
    go_client_to_engine,
    handshake,
    server_config,
    svid,
)


@pytest.fixture(scope="module")
def svids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("go-resumption-svids")


def _ring() -> StekRing:
    now = time.time()
    ring = StekRing()
    ring.install(Stek(os.urandom(16), os.urandom(32), now - 60, now + 3600), [], None)
    return ring


def test_a_go_client_resumes_against_the_engine_with_a_fresh_key_exchange(
    go_peers: GoPeers, svids: Path
) -> None:
    ring = _ring()
    config = server_config(svid(SERVER_ID, "ecdsa", svids), ticket_ring=ring)
    outcome = go_client_to_engine(go_peers, config, svid(CLIENT_ID, "ecdsa", svids), "-resume")
    handshake(outcome)  # exit status 0 and at least one handshake line
    shakes = [line for line in outcome.go if line["event"] == "handshake"]
    assert [s["did_resume"] for s in shakes] == [False, True], outcome.go_output
    assert shakes[1]["group"] == "X25519MLKEM768"  # psk_dhe_ke: a fresh hybrid exchange
    assert shakes[1]["peer_id"] == SERVER_ID
    assert ring.decrypt_failures == {"unknown_key": 0, "expired": 0, "corrupt": 0}


def test_the_engine_resumes_against_a_go_server(go_peers: GoPeers, svids: Path) -> None:
    server = svid(SERVER_ID, "ecdsa", svids)
    store = TicketStore()
    config: TLSConfig = svid(CLIENT_ID, "ecdsa", svids).config(
        trust_bundles={"example.org": list(server.roots)}, ticket_store=store
    )

    async def talk(port: int) -> dict[str, Any]:
        reader, writer = await open_tls_connection(
            "127.0.0.1", port, config=config, expected_peer=SERVER_ID
        )
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"hello\n"
        info = writer.get_extra_info("tls_negotiated")
        writer.write_eof()
        await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        return {"resumed": info.session_resumed, "group": info.group, "peer": info.peer_spiffe_id}

    async def scenario() -> tuple[list[dict[str, Any]], int, str]:
        argv = (str(go_peers.tlspeer), "server", "-dir", str(server.directory))
        async with peer_process(*argv, "-connections", "2", stdin=False) as go:
            line = await go.wait_for_line(b'"listening"', TIMEOUT)
            port = int(json.loads(line)["addr"].rsplit(":", 1)[1])
            seen = [await talk(port), await talk(port)]
            code, output = await go.finish(TIMEOUT)
        return seen, code, output

    seen, code, output = run(scenario(), TIMEOUT * 2)
    assert code == 0, output
    assert [s["resumed"] for s in seen] == [False, True]
    assert seen[1]["group"] == 0x11EC and str(seen[1]["peer"]) == SERVER_ID
    lines = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    go = [line for line in lines if line["event"] == "handshake"]
    assert [s["did_resume"] for s in go] == [False, True], output
