"""Join-token files on disk (``ca/server/tokens.py``) and their lifetime under ``ca serve``:
the server in process on loopback, with token files written as ``trellis ca token create``
writes them (already expired ones by passing their creation time)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ca.server.attestation import hash_join_token
from ca.server.tokens import JoinTokenStore

from .conftest import CLUSTER, client_for, eventually, run, server_config, serving


def token_file(store: JoinTokenStore, token: str) -> Path:
    return store.directory / f"{hash_join_token(token)}.json"


def test_expired_join_token_files_are_purged_at_start_and_then_on_a_timer(
    ca_dir: Path,
) -> None:
    store = JoinTokenStore(ca_dir / "clusters" / CLUSTER)
    an_hour_ago = time.time() - 3600
    stale, _ = store.create("node-a", ttl=60, now=an_hour_ago)
    live, _ = store.create("node-b", ttl=600)
    config = replace(server_config(ca_dir), token_purge_interval=0.05)

    async def scenario() -> None:
        async with serving(config) as server:
            assert not token_file(store, stale).exists()  # purged once at start
            assert token_file(store, live).exists()
            later, _ = store.create("node-c", ttl=60, now=an_hour_ago)
            assert token_file(store, later).exists()
            await eventually(lambda: not token_file(store, later).exists())  # by the timer
            assert token_file(store, live).exists()  # a token still valid stays
            identity = await client_for(server).attest_with_join_token(live)
            assert identity.node_name == "node-b"
            assert not token_file(store, live).exists()  # spent: gone at once

    run(scenario())


def test_purge_leaves_files_that_are_not_token_records_and_drops_unreadable_records(
    tmp_path: Path,
) -> None:
    store = JoinTokenStore(tmp_path)
    live, _ = store.create("node-a", ttl=600)
    foreign = store.directory / "notes.json"
    foreign.write_text("{}")
    garbled = store.directory / f"{'0' * 64}.json"
    garbled.write_text("not json")
    assert store.purge_expired(time.time()) == 1
    assert foreign.exists() and token_file(store, live).exists() and not garbled.exists()
