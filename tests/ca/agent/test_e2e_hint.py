"""X509SVID.hint end to end: entries file → ``ca serve`` → FetchEntries → ``trellis agent``
→ FetchX509SVID, read from the raw gRPC response (py-spiffe 0.3.2's ``X509Svid`` has no
hint attribute, so it can only show that the extra field does not disturb it)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from spiffe.workloadapi.errors import FetchX509SvidError

from ca.agent.workload_client import WorkloadApiError, WorkloadClient

from .test_e2e_pyspiffe import WEB, Mesh, _client, _make_ca_dir

EXTERNAL = "spiffe://example.org/ns/default/sa/web-external"


@pytest.fixture
def hinted_mesh(tmp_path: Path, short_dir: Path) -> Iterator[Mesh]:
    _make_ca_dir(tmp_path / "ca")
    uid = os.getuid()
    (tmp_path / "entries.yaml").write_text(
        "entries:\n"
        f"  - {{id: web, spiffe_id: {WEB}, selectors: [unix:uid:{uid}], nodes: [node-a],"
        " hint: internal}\n"
        f"  - {{id: ext, spiffe_id: {EXTERNAL}, selectors: [unix:uid:{uid}], nodes: [node-a],"
        " hint: 'public edge'}\n"
    )
    mesh = Mesh(tmp_path, short_dir / "agent.sock")
    mesh.start_ca(mint_token=True)
    mesh.start_agent()
    try:
        yield mesh
    finally:
        mesh.stop()


def _until_synced(fetch: Any, errors: tuple[type[Exception], ...]) -> Any:
    deadline = time.monotonic() + 40
    while True:
        try:
            result = fetch()
            if len(result) == 2:
                return result
        except errors:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("the agent never served both SVIDs")
        time.sleep(0.2)


def test_the_raw_workload_api_response_carries_each_entrys_hint(hinted_mesh: Mesh) -> None:
    with WorkloadClient(f"unix:{hinted_mesh.socket_path}") as client:
        svids = _until_synced(lambda: list(client.fetch_x509_svid().svids), (WorkloadApiError,))
    assert {s.spiffe_id: s.hint for s in svids} == {WEB: "internal", EXTERNAL: "public edge"}
    with _client(hinted_mesh) as spiffe_client:
        context = _until_synced(
            lambda: spiffe_client.fetch_x509_context().x509_svids, (FetchX509SvidError,)
        )
    assert sorted(str(s.spiffe_id) for s in context) == sorted([WEB, EXTERNAL])
