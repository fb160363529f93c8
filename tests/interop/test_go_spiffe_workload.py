"""go-spiffe, the reference SPIFFE library, as a workload of a Trellis agent.

Real processes only: ``trellis ca serve`` -> ``trellis agent`` (join token, Workload API
on a Unix socket) -> the Go ``workload`` program (go-spiffe v2.9.0's workloadapi), which
prints what it sees as JSON lines. Entry TTLs are seconds so a rotation arrives within the
test.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.ca.agent.test_e2e_federation import Federation
from tests.ca.agent.test_e2e_pyspiffe import Mesh
from tests.support import wait_for

from .conftest import GoPeers, MeshFactory, by_path, by_uid, entries_yaml

WEB = "spiffe://example.org/ns/default/sa/web"
PLAIN = "spiffe://example.org/ns/default/sa/plain"
RUN_TIMEOUT = 40.0


def workload(
    peers: GoPeers, mesh: Mesh, *args: str, binary: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the go-spiffe workload once (bounded), with the agent's socket in the environment."""
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": mesh.endpoint}
    return subprocess.run(
        [str(binary or peers.workload), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def events(result: subprocess.CompletedProcess[str]) -> dict[str, list[dict[str, Any]]]:
    assert result.returncode == 0, result.stderr
    out: dict[str, list[dict[str, Any]]] = {}
    for line in result.stdout.splitlines():
        event = json.loads(line)
        out.setdefault(event["event"], []).append(event)
    return out


def test_go_spiffe_fetches_x509_svids_and_bundles_from_the_agent(
    go_peers: GoPeers, agent_mesh: MeshFactory
) -> None:
    mesh = agent_mesh(entries_yaml(("web", WEB, [by_uid()], ["ttl: 1h"])))
    seen = events(workload(go_peers, mesh, "x509"))
    (context,) = seen["x509_context"]
    assert context["spiffe_ids"] == [WEB]
    assert context["bundles"] == {"example.org": 1}
    assert seen["x509_bundles"][0]["bundles"] == {"example.org": 1}
    (source,) = seen["x509_source"]
    assert source["spiffe_id"] == WEB
    assert source["chain_len"] == 2  # leaf and the cluster intermediate
    assert source["verified"] is True  # x509svid.Verify against the served bundle
    assert source["own_bundle_authorities"] == 1


def test_go_spiffe_sees_rotation_on_watch(go_peers: GoPeers, agent_mesh: MeshFactory) -> None:
    # A 10 s SVID rotates at half-life (±10%): the second arrives within ~6 s.
    mesh = agent_mesh(entries_yaml(("web", WEB, [by_uid()], ["ttl: 10s"])))
    seen = events(workload(go_peers, mesh, "watch", "-updates", "2", "-timeout", "30s"))
    assert seen["watch_done"] == [{"event": "watch_done", "distinct": 2}]
    updates = seen["x509_update"]
    serials: list[str] = []
    for update in updates:
        assert update["spiffe_id"] == WEB
        if update["serial"] not in serials:
            serials.append(update["serial"])
    first = next(u for u in updates if u["serial"] == serials[0])
    second = next(u for u in updates if u["serial"] == serials[1])
    # The rotated SVID reached the watcher before the first one expired.
    received = dt.datetime.fromisoformat(second["received"])
    assert received < dt.datetime.fromisoformat(first["not_after"])
    assert second["not_after"] > first["not_after"]


def test_go_spiffe_fetches_and_validates_jwt_svids(
    go_peers: GoPeers, agent_mesh: MeshFactory
) -> None:
    mesh = agent_mesh(entries_yaml(("web", WEB, [by_uid()], ["jwt_ttl: 5m"])))
    (jwt,) = events(workload(go_peers, mesh, "jwt", "-audience", "db"))["jwt"]
    assert jwt["spiffe_id"] == WEB
    assert jwt["audience"] == ["db"]
    assert jwt["validated_id"] == WEB  # ValidateJWTSVID on the agent
    assert jwt["locally_validated_id"] == WEB  # go-spiffe's own check with the JWT bundle
    assert "InvalidArgument" in jwt["wrong_audience_error"]


def test_go_spiffe_gets_permission_denied_when_no_entry_matches(
    go_peers: GoPeers, agent_mesh: MeshFactory
) -> None:
    mesh = agent_mesh(entries_yaml(("web", WEB, [f"unix:uid:{os.getuid() + 4242}"], [])))
    result = workload(go_peers, mesh, "x509")
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()  # one line saying why
    assert line.startswith("workload: FetchX509Context: PermissionDenied: "), line


def test_go_spiffe_gets_federated_bundles_only_for_the_entry_that_federates(
    go_peers: GoPeers, federation: Federation, tmp_path: Path
) -> None:
    # Two copies of the same program, attested apart by their paths: one entry each.
    plain = tmp_path / "workload-plain"
    shutil.copy2(go_peers.workload, plain)
    federation.entries.write_text(
        entries_yaml(
            ("web", WEB, [by_path(go_peers.workload)], ["federates_with: [partner.org]"]),
            ("plain", PLAIN, [by_path(plain)], []),
        )
    )
    mesh = federation.mesh

    def ready() -> bool:
        web = events(workload(go_peers, mesh, "x509"))["x509_context"][0]
        plain_ids = events(workload(go_peers, mesh, "x509", binary=plain))["x509_context"]
        return "partner.org" in web["bundles"] and plain_ids[0]["spiffe_ids"] == [PLAIN]

    # The CA re-reads its entries (and has fetched partner.org's bundle); the agent follows.
    wait_for(ready, 30, "both entries and partner.org's bundle at the agent")
    web = events(workload(go_peers, mesh, "x509"))
    assert web["x509_source"][0]["spiffe_id"] == WEB
    assert web["x509_bundles"][0]["bundles"] == {"example.org": 1, "partner.org": 1}
    plain_seen = events(workload(go_peers, mesh, "x509", binary=plain))
    assert plain_seen["x509_source"][0]["spiffe_id"] == PLAIN
    assert plain_seen["x509_context"][0]["bundles"] == {"example.org": 1}
    assert plain_seen["x509_bundles"][0]["bundles"] == {"example.org": 1}
