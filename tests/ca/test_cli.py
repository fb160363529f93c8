"""`trellis ca`: the happy path as real processes; every refusal one line, nothing written."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trellis.cli import main

PASS = "correct horse battery staple"
WEB = "spiffe://example.org/ns/default/sa/web"


def trellis(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "TRELLIS_ROOT_PASSPHRASE": PASS, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca")
    assert (
        trellis("ca", "init", "--trust-domain", "example.org", "--dir", str(directory)).returncode
        == 0
    )
    result = trellis(
        "ca", "intermediate", "--dir", str(directory), "--cluster", "west", "--ttl", "720h"
    )
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_ROOT_PASSPHRASE", PASS)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_intermediate_issue_inspect_as_real_processes(ca_dir: Path, tmp_path: Path) -> None:
    assert mode(ca_dir / "root.key") == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in (ca_dir / "root.key").read_bytes()
    assert mode(ca_dir / "clusters/west/intermediate.key") == 0o600
    assert mode(ca_dir / "clusters/west/jwt.key") == 0o600
    out = tmp_path / "web"
    result = trellis(
        "ca",
        "issue",
        "--dir",
        str(ca_dir),
        "--cluster",
        "west",
        "--spiffe-id",
        WEB,
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert mode(out / "svid.key") == 0o600
    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert len(chain) == 2
    assert chain[1] == x509.load_pem_x509_certificate(
        (ca_dir / "clusters/west/intermediate.crt").read_bytes()
    )
    assert (out / "bundle.pem").read_bytes() == (ca_dir / "root.crt").read_bytes()
    inspect = trellis("ca", "inspect", str(out / "svid.pem"), "--bundle", str(out / "bundle.pem"))
    assert inspect.returncode == 0, inspect.stderr
    for expected in (f"spiffe id: {WEB}", "ECDSA P-256", "chain: verified", "59m", "serial:"):
        assert expected in inspect.stdout
    as_json = json.loads(trellis("ca", "inspect", "--json", str(out / "svid.pem")).stdout)
    assert as_json[0]["certificates"][0]["spiffe_id"] == WEB


def test_issue_signs_a_csr(ca_dir: Path, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "req.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = tmp_path / "out"
    assert main(["ca", "issue", "--dir", str(ca_dir), "--cluster", "west", "--spiffe-id", WEB,
                 "--csr", str(tmp_path / "req.csr"), "--out", str(out)]) == 0  # fmt: skip
    assert not (out / "svid.key").exists()  # the key never left the requester
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    assert leaf.public_key() == key.public_key()


def test_jwt_and_bundle_commands(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "ca",
                "jwt",
                "--dir",
                str(ca_dir),
                "--cluster",
                "west",
                "--spiffe-id",
                WEB,
                "--audience",
                "db",
            ]
        )
        == 0
    )
    token = capsys.readouterr().out.strip()
    assert token.count(".") == 2
    assert main(["ca", "bundle", "--dir", str(ca_dir)]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert {k["use"] for k in bundle["keys"]} == {"x509-svid", "jwt-svid"}


def refuse(
    args: list[str], capsys: pytest.CaptureFixture[str], expected: str, code: int = 1
) -> None:
    if code == 2:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
    else:
        assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert expected in err
    if code == 1:
        assert len(err.splitlines()) == 1, err
        assert "Traceback" not in err


def issue_args(ca_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["ca", "issue", "--dir", str(ca_dir), "--cluster", "west", "--out", str(out), *extra]


def test_issue_refusals_write_nothing(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nothing"
    refuse(
        issue_args(ca_dir, out, "--spiffe-id", "spiffe://other.test/x"),
        capsys,
        "outside trust domain",
    )
    refuse(
        issue_args(ca_dir, out, "--spiffe-id", WEB, "--ttl", "25h"), capsys, "exceeds the maximum"
    )
    refuse(
        issue_args(ca_dir, out, "--spiffe-id", "spiffe://example.org/a//b"),
        capsys,
        "empty-segment",
        code=2,
    )
    refuse(
        issue_args(ca_dir, out, "--spiffe-id", WEB, "--ttl", "soon"),
        capsys,
        "invalid duration",
        code=2,
    )
    bad_csr = tmp_path / "bad.csr"
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 1
    bad_csr.write_bytes(bytes(der))
    refuse(
        issue_args(ca_dir, out, "--spiffe-id", WEB, "--csr", str(bad_csr)),
        capsys,
        "CSR signature does not verify",
    )
    refuse(
        issue_args(ca_dir, out, "--spiffe-id", WEB, "--csr", str(tmp_path / "absent.csr")),
        capsys,
        "cannot read CSR",
    )
    east = ["ca", "issue", "--dir", str(ca_dir), "--cluster", "east", "--out", str(out)]
    refuse([*east, "--spiffe-id", WEB], capsys, "no intermediate for cluster 'east'")
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))


def test_wrong_passphrase_is_one_line_and_writes_no_intermediate(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRELLIS_ROOT_PASSPHRASE", "not the passphrase")
    refuse(
        ["ca", "intermediate", "--dir", str(ca_dir), "--cluster", "south"],
        capsys,
        "wrong passphrase",
    )
    assert not (ca_dir / "clusters/south").exists()
    monkeypatch.delenv("TRELLIS_ROOT_PASSPHRASE")
    refuse(
        ["ca", "intermediate", "--dir", str(ca_dir), "--cluster", "south"],
        capsys,
        "no root passphrase",
    )


def test_passphrase_file_is_accepted_and_short_passphrases_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRELLIS_ROOT_PASSPHRASE", raising=False)
    secret = tmp_path / "pass"
    secret.write_text("short\n")
    init = ["ca", "init", "--trust-domain", "x.test", "--dir", str(tmp_path / "a")]
    refuse([*init, "--passphrase-file", str(secret)], capsys, "at least 8")
    assert not (tmp_path / "a").exists()
    secret.write_text("long enough passphrase\n")
    assert main(["ca", "init", "--trust-domain", "x.test", "--dir", str(tmp_path / "a"),
                 "--passphrase-file", str(secret)]) == 0  # fmt: skip
    assert main(["ca", "intermediate", "--dir", str(tmp_path / "a"), "--cluster", "c",
                 "--passphrase-file", str(secret)]) == 0  # fmt: skip


def test_init_refuses_to_overwrite_a_root(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca_dir / "root.key").read_bytes()
    refuse(
        ["ca", "init", "--trust-domain", "example.org", "--dir", str(ca_dir)],
        capsys,
        "already holds a root",
    )
    assert (ca_dir / "root.key").read_bytes() == before


def test_init_refuses_malformed_trust_domains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refuse(
        ["ca", "init", "--trust-domain", "exa mple", "--dir", str(tmp_path)],
        capsys,
        "bad-trust-domain-char",
        2,
    )


def test_missing_ca_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refuse(
        ["ca", "intermediate", "--dir", str(tmp_path / "nope"), "--cluster", "c"],
        capsys,
        "not found",
    )
    refuse(["ca", "inspect", str(tmp_path / "nope.pem")], capsys, "cannot read")


def test_inspect_reports_a_chain_that_does_not_verify(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRELLIS_ROOT_PASSPHRASE", "another passphrase")
    other = tmp_path / "other"
    assert main(["ca", "init", "--trust-domain", "example.org", "--dir", str(other)]) == 0
    out = tmp_path / "svid"
    assert main(issue_args(ca_dir, out, "--spiffe-id", WEB)) == 0
    capsys.readouterr()
    assert main(["ca", "inspect", str(out / "svid.pem"), "--bundle", str(other / "root.crt")]) == 1
    assert "NOT verified" in capsys.readouterr().out
    assert (
        main(["ca", "inspect", str(out / "svid.pem"), "--bundle", str(ca_dir / "bundle.json")]) == 0
    )


AGENT = "spiffe://example.org/trellis/agent/node-a"


def test_an_agent_identity_is_not_issued_without_the_reserved_path_flag(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CA server takes any SVID of its trust domain for /trellis/agent/NODE as NODE's
    attested agent, so `ca issue` (and `ca jwt`) mint one only when asked in so many words."""
    from ca.server.attestation import node_of_agent
    from ca.spiffeid import TrustDomain
    from ca.x509svid import spiffe_id_of

    out = tmp_path / "agent"
    for spiffe_id in (AGENT, "spiffe://example.org/trellis/ca"):
        refuse(issue_args(ca_dir, out, "--spiffe-id", spiffe_id), capsys, "--allow-reserved-path")
        jwt = ["ca", "jwt", "--dir", str(ca_dir), "--cluster", "west", "--audience", "ca"]
        refuse([*jwt, "--spiffe-id", spiffe_id], capsys, "reserved for agents and CAs")
    assert not out.exists()

    assert main(issue_args(ca_dir, out, "--spiffe-id", AGENT, "--allow-reserved-path")) == 0
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    assert node_of_agent(spiffe_id_of(leaf), TrustDomain("example.org")) == "node-a"


KEY_PASS = "cluster key passphrase"


def test_a_key_passphrase_encrypts_the_intermediate_and_jwt_keys_and_issues_with_them(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Local mode: ``ca intermediate`` with a key passphrase writes both cluster keys as
    encrypted PKCS#8 (0600), and ``ca issue`` / ``ca jwt`` open them with the same one, from
    the environment or a file."""
    secret = tmp_path / "key-pass"
    secret.write_text(f"{KEY_PASS}\n")
    made = trellis("ca", "intermediate", "--dir", str(ca_dir), "--cluster", "sealed",
                   env={"TRELLIS_KEY_PASSPHRASE": KEY_PASS})  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "keys encrypted" in made.stdout
    for name in ("intermediate.key", "jwt.key"):
        path = ca_dir / "clusters/sealed" / name
        assert mode(path) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert KEY_PASS.encode() not in path.read_bytes()
    out = tmp_path / "web"
    issue = ["ca", "issue", "--dir", str(ca_dir), "--cluster", "sealed", "--out", str(out)]
    assert main([*issue, "--spiffe-id", WEB, "--key-passphrase-file", str(secret)]) == 0
    chain = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    assert chain[1] == x509.load_pem_x509_certificate(
        (ca_dir / "clusters/sealed/intermediate.crt").read_bytes()
    )
    capsys.readouterr()
    jwt = ["ca", "jwt", "--dir", str(ca_dir), "--cluster", "sealed", "--audience", "db"]
    assert main([*jwt, "--spiffe-id", WEB, "--key-passphrase-file", str(secret)]) == 0
    assert capsys.readouterr().out.count(".") == 2  # header.payload.signature


def test_an_encrypted_intermediate_without_or_with_a_wrong_passphrase_is_one_line_naming_it(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", KEY_PASS)
    assert main(["ca", "intermediate", "--dir", str(ca_dir), "--cluster", "locked"]) == 0
    monkeypatch.delenv("TRELLIS_KEY_PASSPHRASE")
    key = ca_dir / "clusters/locked/intermediate.key"
    out = tmp_path / "nothing"
    issue = ["ca", "issue", "--dir", str(ca_dir), "--cluster", "locked", "--out", str(out)]
    refuse(
        [*issue, "--spiffe-id", WEB],
        capsys,
        f"intermediate key {key} is encrypted: set TRELLIS_KEY_PASSPHRASE"
        " or pass --key-passphrase-file",
    )
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", "not the key passphrase")
    refuse([*issue, "--spiffe-id", WEB], capsys, f"cannot decrypt intermediate key {key}")
    jwt = ["ca", "jwt", "--dir", str(ca_dir), "--cluster", "locked", "--audience", "db"]
    refuse([*jwt, "--spiffe-id", WEB], capsys, f"cannot decrypt intermediate key {key}")
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", "short")
    refuse([*issue, "--spiffe-id", WEB], capsys, "the key passphrase must be at least 8")
    assert not out.exists()


def test_unencrypted_cluster_keys_stay_accepted_with_or_without_a_key_passphrase(
    ca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys mounted from a Kubernetes Secret are unencrypted: a passphrase set for other
    keys does not lock them out."""
    assert b"ENCRYPTED" not in (ca_dir / "clusters/west/intermediate.key").read_bytes()
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", KEY_PASS)
    assert main(issue_args(ca_dir, tmp_path / "a", "--spiffe-id", WEB)) == 0
    monkeypatch.delenv("TRELLIS_KEY_PASSPHRASE")
    assert main(issue_args(ca_dir, tmp_path / "b", "--spiffe-id", WEB)) == 0
