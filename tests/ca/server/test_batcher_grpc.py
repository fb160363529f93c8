"""The agent's ``Batcher`` in front of a real CA server over gRPC mutual TLS on 127.0.0.1.

The first call of each scenario is held at a gate in front of the real client, so "a call
is in flight" is a state the test sets rather than a race with the network.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from ca import KeyAlgorithm, generate_private_key, verify_x509_svid
from ca.agent.batcher import Batcher
from ca.api import CaClient, CaError
from ca.keys import PrivateKey
from ca.server.app import CaServer
from ca.x509svid import X509Svid

from .conftest import attested, run, server_config, serving

Item = tuple[str, PrivateKey]


def roots(server: CaServer) -> dict[object, list[x509.Certificate]]:
    return {server.trust_domain: list(server.bundles.current.x509_authorities)}


class GatedClient:
    """``client.batch_new_x509_svids`` whose first call waits for ``gate``."""

    def __init__(self, client: CaClient) -> None:
        self.client = client
        self.gate = asyncio.Event()
        self.sizes: list[int] = []

    async def __call__(self, items: Sequence[Item]) -> list[X509Svid]:
        self.sizes.append(len(items))
        if len(self.sizes) == 1:
            await self.gate.wait()
        return await self.client.batch_new_x509_svids(items)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def item(entry_id: str) -> Item:
    return entry_id, generate_private_key(KeyAlgorithm.P256)


def test_requests_that_arrive_during_a_call_share_the_next_call_within_the_servers_limit(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> tuple[list[int], list[str], int]:
        async with serving(server_config(ca_dir, entries_file, max_batch=10)) as server:
            client = await attested(server, "node-a")
            send = GatedClient(client)
            batcher: Batcher[Item, X509Svid] = Batcher(send, max_batch=10, max_in_flight=1)
            tasks = [asyncio.create_task(batcher.submit(item("web")))]
            await settle()
            for _ in range(25):  # arrive one loop turn apart while the first call is held
                tasks.append(asyncio.create_task(batcher.submit(item("everywhere"))))
                await asyncio.sleep(0)
            send.gate.set()
            svids = await asyncio.gather(*tasks)
            now = dt.datetime.now(dt.UTC)
            ids = [str(verify_x509_svid(s.chain, roots(server), now=now).spiffe_id) for s in svids]
            issued = server.metrics.value("trellis_ca_x509_svid_issued_total", kind="workload")
            await client.close()
            return send.sizes, ids, int(issued)

    sizes, ids, issued = run(scenario())
    assert sizes == [1, 10, 10, 5]
    assert ids[0] == "spiffe://example.org/ns/default/sa/web"
    assert set(ids[1:]) == {"spiffe://example.org/ns/default/sa/logger"}
    assert issued == 26


def test_a_refused_call_fails_only_the_requests_it_carried_and_the_next_call_is_served(
    ca_dir: Path, entries_file: Path
) -> None:
    async def scenario() -> tuple[list[int], list[object]]:
        async with serving(server_config(ca_dir, entries_file)) as server:
            client = await attested(server, "node-a")
            send = GatedClient(client)
            batcher: Batcher[Item, X509Svid] = Batcher(send, max_in_flight=1)
            # "db" runs only on node-b: the server refuses the whole call that carries it.
            refused = [asyncio.create_task(batcher.submit(item(e))) for e in ("web", "db")]
            await settle()
            served = [asyncio.create_task(batcher.submit(item("web"))) for _ in range(3)]
            await settle()
            send.gate.set()
            outcomes = await asyncio.gather(*refused, *served, return_exceptions=True)
            await client.close()
            return send.sizes, outcomes

    sizes, outcomes = run(scenario())
    assert sizes == [2, 3]
    assert all(isinstance(o, CaError) and o.code == "PERMISSION_DENIED" for o in outcomes[:2])
    assert all(isinstance(o, X509Svid) and o.private_key is not None for o in outcomes[2:])
