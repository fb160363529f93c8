"""A post-quantum trust domain end to end with real processes: ``trellis ca serve`` on an
ML-DSA-65 root and intermediate, ``trellis agent`` attesting over gRPC mutual TLS, and
py-spiffe (``spiffe`` 0.3.2) fetching ML-DSA-65 X509-SVIDs from the Workload API.

What it pins: the agent's chain (9 KB, a 3,309-byte signature per certificate) gets
through grpc's TLS, whose buffers take about 8 KB of client chain (see
``ca.api.client.presented_chain_pem``); and the agent makes workload keys of the CA's
parameter set without being told (``--workload-key-type auto``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.x509.oid import SignatureAlgorithmOID
from spiffe import JwtSvid, WorkloadApiClient

from ca import JwtAuthority, KeyAlgorithm, RootAuthority, TrustDomain
from ca.store import CaStore
from ca.verify import verify_x509_svid
from tests.ca.agent.test_e2e_pyspiffe import WEB, Mesh, write_web_entry


def make_mldsa_ca_dir(directory: Path, algorithm: KeyAlgorithm = KeyAlgorithm.MLDSA65) -> None:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(directory)
    root = RootAuthority.create(TrustDomain("example.org"), now=now, key_algorithm=algorithm)
    store.save_root(root, b"e2e-passphrase-123")
    intermediate = root.issue_intermediate("west", now=now, key_algorithm=algorithm)
    store.save_intermediate(intermediate, JwtAuthority.generate())


@pytest.fixture
def mldsa_mesh(tmp_path: Path, short_dir: Path) -> Iterator[Mesh]:
    make_mldsa_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml", "ttl: 1h", "jwt_ttl: 5m")
    mesh = Mesh(tmp_path, short_dir / "agent.sock")
    mesh.start_ca(mint_token=True)
    mesh.start_agent()
    try:
        yield mesh
    finally:
        logs = mesh.stop()
        if os.environ.get("TRELLIS_TEST_LOGS"):
            print("\n".join(logs))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory for the agent's socket (sun_path is at most 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tr-pq-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def client_of(mesh: Mesh) -> Iterator[WorkloadApiClient]:
    client = WorkloadApiClient(mesh.endpoint, default_timeout=30)
    try:
        yield client
    finally:
        client.close()


def test_py_spiffe_fetches_an_mldsa65_svid_through_the_ca_server_and_agent(
    mldsa_mesh: Mesh,
) -> None:
    with client_of(mldsa_mesh) as client:
        svid = client.fetch_x509_svid()
        context = client.fetch_x509_context()
        jwt = client.fetch_jwt_svid(audience={"db"})
        jwt_bundles = client.fetch_jwt_bundles()
    assert str(svid.spiffe_id) == WEB
    # The agent followed the CA: an ML-DSA-65 workload key, signed by the ML-DSA-65 CA.
    assert isinstance(svid.private_key, mldsa.MLDSA65PrivateKey)
    assert svid.private_key.public_key() == svid.leaf.public_key()
    assert [c.signature_algorithm_oid for c in svid.cert_chain] == [
        SignatureAlgorithmOID.ML_DSA_65,
        SignatureAlgorithmOID.ML_DSA_65,
    ]
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert bundle is not None
    roots = list(bundle.x509_authorities)
    assert [r.signature_algorithm_oid for r in roots] == [SignatureAlgorithmOID.ML_DSA_65]
    now = dt.datetime.now(dt.UTC)
    assert verify_x509_svid(svid.cert_chain, {TrustDomain("example.org"): roots}, now=now)
    # JWT-SVIDs stay ES256: no JOSE library the standard clients use verifies ML-DSA yet.
    assert jwt.token.count(".") == 2
    jwt_bundle = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    assert jwt_bundle is not None
    assert str(JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"db"}).spiffe_id) == WEB


def _ecdsa_mesh(tmp_path: Path, short_dir: Path, agent_extra: tuple[str, ...] = ()) -> Mesh:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(tmp_path / "ca")
    root = RootAuthority.create(TrustDomain("example.org"), now=now)  # P-384
    store.save_root(root, b"e2e-passphrase-123")
    store.save_intermediate(root.issue_intermediate("west", now=now), JwtAuthority.generate())
    write_web_entry(tmp_path / "entries.yaml", "ttl: 1h")
    mesh = Mesh(tmp_path, short_dir / "agent.sock", agent_extra=agent_extra)
    mesh.start_ca(mint_token=True, extra=["--workload-key-type", "mldsa65"])
    return mesh


def test_ca_serve_workload_key_type_makes_the_agent_issue_mldsa65_under_an_ecdsa_ca(
    tmp_path: Path, short_dir: Path
) -> None:
    mesh = _ecdsa_mesh(tmp_path, short_dir)
    try:
        mesh.start_agent()
        with client_of(mesh) as client:
            svid = client.fetch_x509_svid()
    finally:
        mesh.stop()
    assert isinstance(svid.private_key, mldsa.MLDSA65PrivateKey)
    # The mixed hierarchy: an ML-DSA-65 key in a leaf an ECDSA P-256 intermediate signed.
    assert svid.leaf.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256


def test_the_agents_own_workload_key_type_wins_over_the_cas(
    tmp_path: Path, short_dir: Path
) -> None:
    mesh = _ecdsa_mesh(tmp_path, short_dir, ("--workload-key-type", "p384"))
    try:
        mesh.start_agent()
        with client_of(mesh) as client:
            svid = client.fetch_x509_svid()
    finally:
        mesh.stop()
    assert isinstance(svid.private_key, ec.EllipticCurvePrivateKey)
    assert svid.private_key.curve.name == "secp384r1"


def test_an_mldsa_agent_renews_through_the_ca_after_its_intermediate_is_rotated(
    tmp_path: Path, short_dir: Path
) -> None:
    """An ML-DSA agent presents its leaf alone (grpc's TLS cannot carry its chain), so the
    CA must still know the intermediate that signed it after ``ca intermediate rotate``, and
    after a restart: the restarted agent here holds an SVID of the replaced intermediate
    and its join token is spent, so it syncs only if the CA accepts that leaf."""
    make_mldsa_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml", "ttl: 1h", "jwt_ttl: 5m")
    mesh = Mesh(tmp_path, short_dir / "agent.sock")
    mesh.start_ca(mint_token=True, extra=["--poll-interval", "1s"])
    mesh.start_agent()
    try:
        with client_of(mesh) as client:
            before = client.fetch_x509_svid()
        old_issuer = before.cert_chain[1]
        env = {**os.environ, "TRELLIS_ROOT_PASSPHRASE": "e2e-passphrase-123"}
        rotated = subprocess.run(
            [sys.executable, "-m", "trellis", "ca", "intermediate", "rotate",
             "--dir", str(tmp_path / "ca"), "--cluster", "west"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        mesh.stop_ca()
        mesh.start_ca(mint_token=False, extra=["--poll-interval", "1s"])
        mesh.stop_agent()
        mesh.start_agent()
        with client_of(mesh) as client:
            after = client.fetch_x509_svid()
        # The agent's mTLS to the CA worked: it synced and served the workload.
        assert str(after.spiffe_id) == WEB
        agent_svid = x509.load_pem_x509_certificates(
            (mesh.agent_data / "agent-svid.pem").read_bytes()
        )[0]
        agent_svid.verify_directly_issued_by(old_issuer)  # the replaced intermediate's
    finally:
        logs = mesh.stop()
        if os.environ.get("TRELLIS_TEST_LOGS"):
            print("\n".join(logs))
