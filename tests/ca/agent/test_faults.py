"""Faults: the CA goes away and comes back; SVIDs run out; the agent SVID renews.

The CA is "stopped" by flipping ``InProcessUpstream.available`` (every call then raises
``UpstreamUnavailable``, exactly what ``GrpcUpstream`` raises for UNAVAILABLE); the real
process version, with ``trellis ca serve`` killed and restarted, is in
``test_e2e_ca_server.py``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
import urllib.request
from pathlib import Path
from typing import Any

import grpc.aio

from ca.agent.rotator import load_agent_state
from ca.agent.upstream import InProcessUpstream
from ca.workload import workload_pb2 as pb
from ca.x509svid import load_der_chain
from tests.ca.agent.conftest import LiveCa, entry, make_upstream, run, running_agent
from tests.ca.agent.test_workload_api import _next, _stream, _target


def _serial(response: Any) -> int:
    return load_der_chain(response.svids[0].x509_svid)[0].serial_number


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_ca_down_longer_than_a_rotation_period_then_back_serves_throughout_and_recovers(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> dict[str, Any]:
        upstream = make_upstream(live_ca, [entry(ttl=6)])
        facts: dict[str, Any] = {}
        async with (
            running_agent(upstream, short_dir, admin_port=0) as agent,
            grpc.aio.insecure_channel(_target(agent)) as channel,
        ):
            port = agent.admin.port if agent.admin else 0
            stream = _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            first = await _next(stream)
            upstream.available = False
            await asyncio.sleep(3.5)  # past the ~3 s rotation point: rotation fails
            # A new caller still gets the cached, still-valid SVID.
            again = await _next(
                _stream(channel, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse)
            )
            facts["served_while_down"] = _serial(again) == _serial(first)
            facts["health_down"] = await asyncio.to_thread(_get, port, "/healthz")
            facts["errors"] = sum(
                s.value
                for m in agent.metrics.fetch_errors.collect()
                for s in m.samples
                if s.name.endswith("_total")
            )
            facts["up_gauge"] = agent.metrics.upstream_up._value.get()
            upstream.available = True
            rotated = await _next(stream, timeout=5)  # recovers with no restart
            facts["rotated"] = _serial(rotated) != _serial(first)
            cert = load_der_chain(first.svids[0].x509_svid)[0]
            facts["before_expiry"] = dt.datetime.now(dt.UTC) < cert.not_valid_after_utc
            await asyncio.sleep(0.3)
            facts["health_up"] = await asyncio.to_thread(_get, port, "/healthz")
            stream.cancel()
        return facts

    facts = run(main())
    assert facts["served_while_down"]
    status, body = facts["health_down"]
    assert status == 200 and body["status"] == "degraded" and body["upstream"] == "unreachable"
    assert facts["errors"] >= 1 and facts["up_gauge"] == 0
    assert facts["rotated"] and facts["before_expiry"]
    status, body = facts["health_up"]
    assert status == 200 and body["status"] == "ok"


def test_svids_that_expire_while_the_ca_stays_down_are_no_longer_served(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[int, dict[str, Any], int]:
        upstream = make_upstream(live_ca, [entry(ttl=2)])
        async with running_agent(upstream, short_dir, admin_port=0) as agent:
            upstream.available = False
            await asyncio.sleep(2.6)
            port = agent.admin.port if agent.admin else 0
            status, body = await asyncio.to_thread(_get, port, "/healthz")
            live = await asyncio.to_thread(_get, port, "/livez")
            return status, body, len(agent.rotator.cache.svids), live

    status, body, cached, live = run(main())
    assert cached == 0
    assert status == 503 and body["status"] == "unhealthy"
    # Not serving, but a restart would not bring the CA back: liveness stays 200.
    assert live == (200, {"live": True, "reason": "ok"})


def test_livez_asks_for_a_restart_only_once_the_agents_own_svid_has_expired(
    live_ca: LiveCa, short_dir: Path
) -> None:
    async def main() -> tuple[tuple[int, dict[str, Any]], tuple[int, dict[str, Any]]]:
        upstream = InProcessUpstream(
            live_ca.intermediate, live_ca.jwt, live_ca.bundle, [entry()],
            node="node-a", agent_ttl=dt.timedelta(seconds=2),
        )  # fmt: skip
        async with running_agent(upstream, short_dir, admin_port=0) as agent:
            port = agent.admin.port if agent.admin else 0
            before = await asyncio.to_thread(_get, port, "/livez")
            upstream.available = False  # no renewal: the agent SVID runs out
            await asyncio.sleep(2.6)
            after = await asyncio.to_thread(_get, port, "/livez")
            return before, after

    before, after = run(main())
    assert before == (200, {"live": True, "reason": "ok"})
    assert after[0] == 503 and after[1]["live"] is False
    assert "own SVID has expired" in after[1]["reason"]


def test_the_agent_svid_is_renewed_at_half_life(live_ca: LiveCa, short_dir: Path) -> None:
    async def main() -> InProcessUpstream:
        upstream = InProcessUpstream(
            live_ca.intermediate, live_ca.jwt, live_ca.bundle, [entry()],
            node="node-a", agent_ttl=dt.timedelta(seconds=2),
        )  # fmt: skip
        async with running_agent(upstream, short_dir):
            await asyncio.sleep(2.5)
        return upstream

    assert run(main()).calls.get("renew", 0) >= 1


def test_the_agent_svid_is_kept_in_the_data_dir_with_its_key_0600(
    live_ca: LiveCa, short_dir: Path, tmp_path: Path
) -> None:
    from dataclasses import replace

    async def main() -> None:
        upstream = make_upstream(live_ca, [entry()])
        async with running_agent(upstream, short_dir) as agent:
            agent.rotator.config = replace(agent.rotator.config, data_dir=tmp_path / "data")
            await agent.rotator.establish_identity()  # no-op: identity is current
            identity = await upstream.renew()
            agent.rotator._accept_identity(identity)

    run(main())
    key = tmp_path / "data" / "agent-svid.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    state = load_agent_state(tmp_path / "data", dt.datetime.now(dt.UTC))
    assert state is not None
    svid, bundle = state
    assert str(svid.spiffe_id) == "spiffe://example.org/trellis/agent/node-a"
    assert bundle.same_content(live_ca.bundle)
