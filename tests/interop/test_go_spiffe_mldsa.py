"""go-spiffe (v2.9.0, the reference SPIFFE library) as a workload of a post-quantum trust
domain: where it stops, recorded so a go-spiffe upgrade that parses ML-DSA shows up here.

go-spiffe's x509svid.ParseRaw reads the key with x509.ParsePKCS8PrivateKey (no ML-DSA
before Go 1.27) and then matches it to the leaf in a switch over RSA, ECDSA and Ed25519
keys only (``keyMatches``: "unsupported private key type"), so v2.9.0 cannot hold an
ML-DSA X509-SVID with any Go. The Trellis side (CA server, agent, Workload API) is the
same as in tests/ca/test_mldsa_mesh.py, where py-spiffe reads the same SVIDs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ca.agent.test_e2e_pyspiffe import Mesh
from tests.ca.test_mldsa_mesh import make_mldsa_ca_dir

from .conftest import GoPeers, by_uid, entries_yaml
from .test_go_spiffe_workload import WEB, workload


@pytest.fixture
def mldsa_mesh(tmp_path: Path, short_dir: Path) -> Iterator[Mesh]:
    make_mldsa_ca_dir(tmp_path / "ca")
    (tmp_path / "entries.yaml").write_text(entries_yaml(("web", WEB, [by_uid()], ["ttl: 1h"])))
    mesh = Mesh(tmp_path, short_dir / "agent.sock")
    mesh.start_ca(mint_token=True)
    mesh.start_agent()
    try:
        yield mesh
    finally:
        logs = mesh.stop()
        if os.environ.get("TRELLIS_TEST_LOGS"):
            print("\n".join(logs))


def test_go_spiffe_2_9_refuses_an_mldsa65_svid_at_its_private_key_in_one_line(
    go_peers: GoPeers, mldsa_mesh: Mesh
) -> None:
    result = workload(go_peers, mldsa_mesh, "x509")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    # Go 1.26: "x509: PKCS#8 wrapping contained private key with unknown algorithm";
    # Go 1.27 (by go-spiffe's source): "unsupported private key type *mldsa.PrivateKey".
    assert "private key" in line, line
    assert result.stdout == ""
