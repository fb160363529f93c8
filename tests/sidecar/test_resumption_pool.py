"""Resumption on the caller's pooled connections, over real TLS on loopback.

Two sidecars in one event loop (``resumption_mesh``): a fresh pooled connection resumes
with a ticket the callee issued, filed under (endpoint, expected SPIFFE ID); a change of
the trust bundles drops every ticket, so the next dial is a full handshake; and under
load, with the callee's STEK ring rotated several times (the next key distributed before
it becomes active, the old ones kept to open tickets), no handshake fails; and early
data another replica turns away (strict mode) is sent again as 1-RTT and served once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ca.spiffeid import SpiffeId
from sidecar.config import Address, PoolConfig
from sidecar.identity import Identity
from sidecar.metrics import Metrics
from sidecar.pool import Pool

from .dataplane.conftest import ECHO
from .dataplane.harness import Pki
from .resumption_mesh import mesh, new_stek, request

T = TypeVar("T")
GET = b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n"
ROUNDS, PER_ROUND = 6, 8


def run(coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_tickets_are_filed_per_endpoint_and_expected_spiffe_id() -> None:
    async def slots() -> list[tuple[str, SpiffeId | None]]:
        endpoint = Address("10.0.0.7", 15008)
        other = SpiffeId("spiffe://example.org/ns/default/sa/other")
        return [
            Pool(endpoint, ids, Identity(), Metrics(), PoolConfig()).ticket_slot()
            for ids in ((SpiffeId(ECHO),), (), (SpiffeId(ECHO), other))
        ]

    one, anyone, several = asyncio.run(slots())
    assert one == ("10.0.0.7:15008", SpiffeId(ECHO))
    assert anyone == ("10.0.0.7:15008", None)
    assert several[1] is None and several[0] != anyone[0] and ECHO in several[0]


def test_a_fresh_pooled_connection_resumes_with_the_ticket_of_the_last_one(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with mesh(Pki(), tmp_path) as m:
            await request(m.upstream, GET)
            await m.tickets()
            assert m.client.tickets.take(
                (f"127.0.0.1:{m.inbound.config.listen.port}", ECHO),
                time.time(),
                m.client.trust_generation,
            )  # filed under (endpoint, the SPIFFE ID the upstream expects)
            await m.forget_connections()
            await request(m.upstream, GET)
            assert m.caller("tls_resumption_total", kind="ticket") == 1
            assert m.caller("tls_resumption_total", kind="none") == 1
            assert m.server("tls_resumption_total", kind="ticket") == 1
            # /config says so per pooled connection.
            (pool,) = m.pools.describe()
            (connection,) = pool["connections"]
            assert connection["resumed"] is True and connection["early_data"] == "accepted"

    run(scenario())


def test_a_trust_bundle_change_drops_the_tickets_and_the_next_dial_is_a_full_handshake(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        pki = Pki()
        async with mesh(pki, tmp_path) as m:
            await request(m.upstream, GET)
            await m.tickets()
            # The bundle gains a root (a root rotation beginning): nothing is distrusted,
            # but tickets were earned under the old trust and must not be offered.
            extra = Pki("example.org").root.certificate
            bundles = {td: (*roots, extra) for td, roots in m.client.bundles.items()}
            m.client.update(bundles=bundles)
            assert len(m.client.tickets) == 0
            await m.forget_connections()
            await request(m.upstream, GET)
            assert m.caller("tls_resumption_total", kind="ticket") == 0
            assert m.caller("tls_resumption_total", kind="none") == 2

    run(scenario())


def test_handshakes_never_fail_across_stek_rotations_under_load(tmp_path: Path) -> None:
    """Each round dials PER_ROUND connections at once (one stream per connection) while
    the ring rotates: the next key was already in the ring, the active one moves to
    the previous keys, so every ticket in flight still opens."""

    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, pool=PoolConfig(max_streams_per_connection=1)) as m:
            now = time.time()
            active, upcoming = new_stek(now), new_stek(now)
            previous: list[Any] = []
            m.ring.install(active, previous, upcoming)
            rotations = m.ring.rotations
            await request(m.upstream, GET)
            await m.tickets()
            answered = 0
            for _ in range(ROUNDS):
                await m.forget_connections()
                calls = [asyncio.create_task(request(m.upstream, GET)) for _ in range(PER_ROUND)]
                await asyncio.sleep(0)  # dials under way when the key changes
                previous = [active, *previous][:24]
                active, upcoming = upcoming, new_stek(time.time())
                m.ring.install(active, previous, upcoming)
                answered += sum(body.startswith(b"GET") for body in await asyncio.gather(*calls))
            assert answered == ROUNDS * PER_ROUND
            assert m.ring.rotations - rotations == ROUNDS
            failed = "trellis_sidecar_tls_handshake_failures_total"
            for metrics in (m.server_metrics, m.client_metrics):
                failures = [
                    s for f in metrics.registry.collect() for s in f.samples
                    if s.name == failed and s.value
                ]  # fmt: skip
                assert failures == []
            resumed = m.server("tls_resumption_total", kind="ticket")
            full = m.server("tls_resumption_total", kind="none")
            assert resumed + full == 1 + ROUNDS * PER_ROUND
            # Tickets sealed under keys rotated out of the active slot kept opening.
            assert resumed >= ROUNDS, (resumed, full)
            assert m.ring.decrypt_failures["unknown_key"] == 0

    run(scenario())


def test_early_data_another_replica_rejects_falls_back_to_1rtt_and_the_request_is_served(
    tmp_path: Path,
) -> None:
    """Strict mode: a replica accepts 0-RTT only on tickets it issued itself (its replay
    cache is complete only for those). The caller's ticket from replica A resumes at
    replica B (one ring), B skips the early data, and the caller sends the same bytes
    again as 1-RTT: the GET is served once, unmarked, and no handshake fails."""

    async def scenario() -> None:
        async with mesh(Pki(), tmp_path, tap=True) as m, m.replica() as (other, metrics):
            assert m.tap is not None
            assert await request(m.upstream, GET) == b"GET early=-"  # at replica A
            await m.tickets()
            await m.forget_connections()
            m.tap.target = other.config.listen  # the same endpoint now reaches B
            assert await request(m.upstream, GET) == b"GET early=-"
            b = m.counter
            assert b(metrics, "tls_resumption_total", kind="ticket") == 1
            assert b(metrics, "tls_early_data_total", outcome="rejected") == 1
            assert b(metrics, "tls_early_data_total", outcome="accepted") == 0
            assert len(m.seen) == 2
            failed = "trellis_sidecar_tls_handshake_failures_total"
            assert not any(
                s.value
                for f in (*metrics.registry.collect(), *m.client_metrics.registry.collect())
                for s in f.samples
                if s.name == failed
            )

    run(scenario())
