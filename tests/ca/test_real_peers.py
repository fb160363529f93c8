"""Issued SVIDs against real peers: the system OpenSSL (3.0) and py-spiffe."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pytest
import spiffe
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import IntermediateAuthority, JwtAuthority, RootAuthority, TrustBundle, TrustDomain
from ca.keys import private_key_pem
from tests.ca.svid_fixtures import DIGITAL_SIGNATURE, build_leaf

WEB = "spiffe://example.org/ns/default/sa/web"
OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def real_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def hierarchy(real_now: dt.datetime) -> tuple[RootAuthority, IntermediateAuthority]:
    root = RootAuthority.create(TrustDomain("example.org"), now=real_now)
    return root, root.issue_intermediate("west", now=real_now)


def write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def pem(cert) -> bytes:  # type: ignore[no-untyped-def]
    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[no-any-return]


def run_openssl(*args: str) -> subprocess.CompletedProcess[str]:
    if OPENSSL is None:
        pytest.skip("the system openssl is not installed")
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=30, check=False)


def test_openssl_verify_accepts_issued_svid_with_its_intermediate(
    tmp_path: Path, hierarchy: tuple[RootAuthority, IntermediateAuthority], real_now: dt.datetime
) -> None:
    root, inter = hierarchy
    svid = inter.issue_x509_svid(
        WEB, ec.generate_private_key(ec.SECP256R1()).public_key(), now=real_now
    )
    bundle = write(tmp_path, "bundle.pem", pem(root.certificate))
    untrusted = write(tmp_path, "inter.pem", pem(inter.certificate))
    leaf = write(tmp_path, "leaf.pem", pem(svid.leaf))
    result = run_openssl("verify", "-CAfile", str(bundle), "-untrusted", str(untrusted), str(leaf))
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip().endswith(": OK")
    # The leaf alone fails with OpenSSL's error 20/21: why peers must send the intermediate.
    alone = run_openssl("verify", "-CAfile", str(bundle), str(leaf))
    assert alone.returncode != 0
    assert "unable to get local issuer certificate" in alone.stdout + alone.stderr


def test_openssl_text_shows_the_svid_extensions(
    tmp_path: Path, hierarchy: tuple[RootAuthority, IntermediateAuthority], real_now: dt.datetime
) -> None:
    _, inter = hierarchy
    svid = inter.issue_x509_svid(
        WEB, ec.generate_private_key(ec.SECP256R1()).public_key(), now=real_now
    )
    text = run_openssl(
        "x509", "-noout", "-text", "-in", str(write(tmp_path, "leaf.pem", pem(svid.leaf)))
    ).stdout
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    assert "X509v3 Key Usage: critical\n                Digital Signature\n" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    assert f"URI:{WEB}" in text
    assert "X509v3 Subject Key Identifier" in text and "X509v3 Authority Key Identifier" in text
    inter_text = run_openssl(
        "x509", "-noout", "-text", "-in", str(write(tmp_path, "inter.pem", pem(inter.certificate)))
    ).stdout
    assert "CA:TRUE, pathlen:0" in inter_text
    assert "X509v3 Name Constraints: critical" in inter_text
    assert "Permitted:\n                  URI:example.org" in inter_text
    assert "Certificate Sign, CRL Sign" in inter_text


def test_openssl_refuses_a_foreign_identity_minted_by_a_leaked_intermediate(
    tmp_path: Path, hierarchy: tuple[RootAuthority, IntermediateAuthority], real_now: dt.datetime
) -> None:
    root, inter = hierarchy
    forged = build_leaf(
        inter, real_now, uris=("spiffe://other.test/ns/default/sa/web",), ku=DIGITAL_SIGNATURE
    )
    result = run_openssl(
        "verify",
        "-CAfile", str(write(tmp_path, "bundle.pem", pem(root.certificate))),
        "-untrusted", str(write(tmp_path, "inter.pem", pem(inter.certificate))),
        str(write(tmp_path, "forged.pem", pem(forged))),
    )  # fmt: skip
    assert result.returncode != 0
    assert "permitted subtree violation" in result.stdout + result.stderr


def test_py_spiffe_parses_issued_svid_and_bundle(
    hierarchy: tuple[RootAuthority, IntermediateAuthority], real_now: dt.datetime
) -> None:
    root, inter = hierarchy
    key = ec.generate_private_key(ec.SECP256R1())
    svid = inter.issue_x509_svid(WEB, key.public_key(), now=real_now)
    parsed = spiffe.X509Svid.parse(svid.chain_pem(), private_key_pem(key))
    assert str(parsed.spiffe_id) == WEB
    assert len(parsed.cert_chain) == 2
    bundle = spiffe.X509Bundle.parse(spiffe.TrustDomain("example.org"), pem(root.certificate))
    assert len(bundle.x509_authorities) == 1
    der_chain = b"".join(svid.chain_der())
    raw = spiffe.X509Svid.parse_raw(
        der_chain,
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    assert str(raw.spiffe_id) == WEB


def test_py_spiffe_validates_our_jwt_svid_with_our_bundle(real_now: dt.datetime) -> None:
    authority = JwtAuthority.generate()
    td = TrustDomain("example.org")
    bundle = TrustBundle(td, jwt_authorities={authority.key_id: authority.public_key})
    token = authority.sign(WEB, ["db"], now=real_now).token
    jwt_bundle = spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), bundle.to_json())
    parsed = spiffe.JwtSvid.parse_and_validate(token, jwt_bundle, {"db"})
    assert str(parsed.spiffe_id) == WEB
