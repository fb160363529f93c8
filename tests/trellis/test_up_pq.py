"""``trellis up --pq-signatures``: the whole local mesh on an ML-DSA-65 hierarchy, as real
processes, with the sidecars' negotiated signature scheme in the status beside the group."""

from __future__ import annotations

import re
from pathlib import Path

from tests.trellis.test_up import _last_status, _supervised, short_dir  # noqa: F401


def test_pq_signatures_runs_the_mesh_on_mldsa65_and_the_status_shows_the_scheme(
    short_dir: Path,  # noqa: F811
) -> None:
    report = _supervised(short_dir, ["--pq-signatures", "--duration", "12s", "--rate", "20"])
    assert report["rc"] == 0, report["err"]
    status = _last_status(report["out"])
    # ML-KEM for the key exchange, ML-DSA-65 for every CertificateVerify: post-quantum both.
    tls = re.search(r"tls\s+X25519MLKEM768 \([\d,]+ handshakes?\), mldsa65, TLS_", status)
    assert tls is not None, status
    assert "ecdsa" not in status
    traffic = re.search(r"traffic\s+([\d,]+) requests.*?, ([\d,]+) errors", status)
    assert traffic is not None and int(traffic.group(1).replace(",", "")) > 0, status
    assert traffic.group(2) == "0", status
    assert report["orphans"] == []
    assert list(short_dir.iterdir()) == []
