"""A CA that takes fewer CSRs per call than the agent batches: the agent splits to fit.

Real processes: ``trellis ca serve --max-batch 3`` and ``trellis agent``, with eight
entries for one workload, so the agent's first sync needs eight SVIDs at once. Before the
CA told agents its limit, the agent sent all eight in one call, the CA refused it with
RESOURCE_EXHAUSTED (retryable), and the agent retried the same batch forever.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from spiffe.workloadapi.errors import FetchX509SvidError

from .test_e2e_pyspiffe import Mesh, _client, _make_ca_dir

IDS = [f"spiffe://example.org/ns/default/sa/w{i}" for i in range(8)]


@pytest.fixture
def small_batch_mesh(tmp_path: Path, short_dir: Path) -> Iterator[Mesh]:
    _make_ca_dir(tmp_path / "ca")
    (tmp_path / "entries.yaml").write_text(
        "entries:\n"
        + "".join(
            f"  - id: w{i}\n"
            f"    spiffe_id: {spiffe_id}\n"
            f"    selectors: [unix:uid:{os.getuid()}]\n"
            "    nodes: [node-a]\n"
            for i, spiffe_id in enumerate(IDS)
        )
    )
    mesh = Mesh(tmp_path, short_dir / "agent.sock")
    mesh.start_ca(mint_token=True, extra=["--max-batch", "3"])
    mesh.start_agent()
    try:
        yield mesh
    finally:
        mesh.stop()


def test_an_agent_needing_more_svids_than_the_cas_batch_limit_gets_all_of_them(
    small_batch_mesh: Mesh,
) -> None:
    # The agent answers UNAVAILABLE until its first sync; without the split that is forever.
    deadline = time.monotonic() + 40
    context: Any = None
    with _client(small_batch_mesh) as client:
        while context is None:
            try:
                context = client.fetch_x509_context()
            except FetchX509SvidError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    assert sorted(str(s.spiffe_id) for s in context.x509_svids) == sorted(IDS)
