"""Go 1.27's crypto/x509 judges Trellis's ML-DSA chains: a verifier that shares no code
with OpenSSL or ``cryptography`` accepts what ``ca.verify`` accepts and refuses what it
refuses (a tampered signature, an intermediate without keyCertSign).

The program is ``go/pq/cmd/x509verify``, a module of its own whose ``go 1.27.0`` line makes
an older go command fetch Go 1.27 (``GOTOOLCHAIN``) rather than build it without ML-DSA.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca import KeyAlgorithm
from ca.keys import generate_private_key
from ca.verify import VerificationError, verify_x509_svid
from tests.ca.test_mldsa import SIGNER_ONLY, TD, WEB, hierarchy, mldsa_ca_with, tampered

from .go_peers import GoPeersUnavailable, _run, go_binary

SOURCE = Path(__file__).resolve().parent / "go" / "pq"
GO_WITH_MLDSA = "go1.27.3"


@pytest.fixture(scope="module")
def x509verify(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The verifier, built with Go >= 1.27 (a cached toolchain builds it in seconds)."""
    target = tmp_path_factory.mktemp("go-pq") / "x509verify"
    with pytest.MonkeyPatch.context() as patch:
        # A GOTOOLCHAIN the caller set wins; else at least 1.27 (ML-DSA), newer if local.
        patch.setenv("GOTOOLCHAIN", os.environ.get("GOTOOLCHAIN", f"{GO_WITH_MLDSA}+auto"))
        try:
            _run(go_binary(), "build", "-trimpath", "-o", str(target), "./cmd/x509verify",
                 what="go build of x509verify", cwd=SOURCE)  # fmt: skip
        except GoPeersUnavailable as exc:
            pytest.skip(f"Go 1.27 x509verify: {exc}")
    return target


def go_verify(
    program: Path, tmp: Path, chain: list[x509.Certificate], root: x509.Certificate
) -> dict[str, Any]:
    (tmp / "chain.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain))
    (tmp / "roots.pem").write_bytes(root.public_bytes(Encoding.PEM))
    result = subprocess.run(
        [str(program), "-roots", str(tmp / "roots.pem"), "-chain", str(tmp / "chain.pem")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stdout + result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    assert answer["verified"] is (result.returncode == 0)
    return answer


@pytest.mark.parametrize(
    ("root_key", "intermediate_key", "leaf_key", "signatures"),
    [
        (KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65,
         ["ML-DSA-65", "ML-DSA-65", "ML-DSA-65"]),
        (KeyAlgorithm.P384, KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65,
         ["ML-DSA-65", "ECDSA-SHA384", "ECDSA-SHA384"]),
        (KeyAlgorithm.MLDSA65, KeyAlgorithm.P256, KeyAlgorithm.P256,
         ["ECDSA-SHA256", "ML-DSA-65", "ML-DSA-65"]),
        (KeyAlgorithm.MLDSA87, KeyAlgorithm.MLDSA44, KeyAlgorithm.MLDSA44,
         ["ML-DSA-44", "ML-DSA-87", "ML-DSA-87"]),
    ],
    ids=["mldsa65", "ecdsa-root", "mldsa-root-ecdsa-below", "mldsa87-root-mldsa44"],
)  # fmt: skip
def test_go_accepts_the_mldsa_chains_trellis_issues(
    x509verify: Path,
    tmp_path: Path,
    root_key: KeyAlgorithm,
    intermediate_key: KeyAlgorithm,
    leaf_key: KeyAlgorithm,
    signatures: list[str],
) -> None:
    now = dt.datetime.now(dt.UTC)  # Go checks validity against its own clock
    root, intermediate = hierarchy(root_key, intermediate_key, now)
    svid = intermediate.issue_x509_svid(WEB, generate_private_key(leaf_key).public_key(), now=now)
    assert verify_x509_svid(svid.chain, {TD: [root.certificate]}, now=now)
    answer = go_verify(x509verify, tmp_path, list(svid.chain), root.certificate)
    assert answer == {"verified": True, "chain": signatures}


def test_go_and_trellis_both_refuse_a_tampered_mldsa_signature(
    x509verify: Path, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    root, intermediate = hierarchy(KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65, now)
    svid = intermediate.issue_x509_svid(
        WEB, generate_private_key(KeyAlgorithm.MLDSA65).public_key(), now=now
    )
    for chain in (
        [tampered(svid.leaf), intermediate.certificate],
        [svid.leaf, tampered(intermediate.certificate)],
    ):
        answer = go_verify(x509verify, tmp_path, chain, root.certificate)
        assert answer["verified"] is False
        assert "signature" in answer["error"]  # x509: ... verification error / invalid signature
        with pytest.raises(VerificationError) as info:
            verify_x509_svid(chain, {TD: [root.certificate]}, now=now)
        assert info.value.reason == "unknown-ca"


def test_go_and_trellis_both_refuse_an_mldsa_intermediate_without_key_cert_sign(
    x509verify: Path, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    root, _ = hierarchy(KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65, now)
    wrong = mldsa_ca_with(SIGNER_ONLY, root, now)
    svid = wrong.issue_x509_svid(
        WEB, generate_private_key(KeyAlgorithm.MLDSA65).public_key(), now=now
    )
    answer = go_verify(x509verify, tmp_path, list(svid.chain), root.certificate)
    assert answer["verified"] is False
    assert "cannot sign" in answer["error"]  # Go: "parent certificate cannot sign this kind"
    with pytest.raises(VerificationError) as info:
        verify_x509_svid(svid.chain, {TD: [root.certificate]}, now=now)
    assert info.value.reason == "signing-cert-without-key-cert-sign"
