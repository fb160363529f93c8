"""`trellis ca root prepare|activate|retire` and `trellis ca intermediate rotate` on a CA
directory: what each writes, and every refusal as one line with nothing written.

The commands run in this process (``trellis.cli.main``); the mesh under traffic that
rotates with real processes is tests/trellis/test_rotation.py. The CA server's issuance
record is written here by the server's own ``IssuanceLedger``, standing in for a running
``ca serve`` (which the end-to-end test runs for real).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca.rotation import LEDGER_GRANULARITY, IssuanceLedger, issued_by
from ca.store import CaStore
from trellis.cli import main

PASS = "correct horse battery staple"
KEY_PASS = "cluster keys passphrase"


@pytest.fixture(autouse=True)
def _passphrases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRELLIS_ROOT_PASSPHRASE", PASS)
    monkeypatch.setenv("TRELLIS_KEY_PASSPHRASE", KEY_PASS)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    assert main(["ca", "init", "--trust-domain", "example.org", "--dir", str(directory)]) == 0
    for cluster in ("west", "east"):
        assert main(["ca", "intermediate", "--dir", str(directory), "--cluster", cluster]) == 0
    return directory


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command that must be refused; its whole error, which must be one line."""
    capsys.readouterr()
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("trellis: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def roots(directory: Path) -> list[x509.Certificate]:
    return list(CaStore(directory).load_bundle().x509_authorities)


def test_prepare_publishes_an_encrypted_next_root_beside_the_current_one(ca_dir: Path) -> None:
    before = CaStore(ca_dir).load_bundle()
    assert main(["ca", "root", "prepare", "--dir", str(ca_dir)]) == 0
    key = ca_dir / "next-root.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in key.read_bytes()
    # Never an unencrypted key on disk: every key here is under a passphrase.
    for name, data in snapshot(ca_dir).items():
        assert b"BEGIN PRIVATE KEY" not in data, name
    after = CaStore(ca_dir).load_bundle()
    prepared = x509.load_pem_x509_certificate((ca_dir / "next-root.crt").read_bytes())
    current = CaStore(ca_dir).root_certificate()
    assert set(after.x509_authorities) == {current, prepared}
    assert after.sequence > before.sequence
    # Nothing signs with it yet: both clusters' intermediates are the current root's.
    for cluster in ("west", "east"):
        assert issued_by(CaStore(ca_dir).intermediate_certificate(cluster), current)


def test_activate_without_prepare_is_refused_in_one_line(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(ca_dir)
    err = refused(capsys, "ca", "root", "activate", "--dir", str(ca_dir))
    assert "no prepared root" in err and "trellis ca root prepare" in err
    assert snapshot(ca_dir) == before


def test_a_second_prepare_while_one_is_pending_is_refused_in_one_line(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "root", "prepare", "--dir", str(ca_dir)]) == 0
    pending = x509.load_pem_x509_certificate((ca_dir / "next-root.crt").read_bytes())
    before = snapshot(ca_dir)
    err = refused(capsys, "ca", "root", "prepare", "--dir", str(ca_dir))
    assert f"{pending.serial_number:x}" in err and "already pending" in err
    assert snapshot(ca_dir) == before


@pytest.mark.parametrize("command", ["prepare", "activate", "retire"])
def test_a_wrong_root_passphrase_is_refused_in_one_line_and_nothing_is_written(
    ca_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    if command != "prepare":
        assert main(["ca", "root", "prepare", "--dir", str(ca_dir)]) == 0
    if command == "retire":
        assert main(["ca", "root", "activate", "--dir", str(ca_dir)]) == 0
    before = snapshot(ca_dir)
    monkeypatch.setenv("TRELLIS_ROOT_PASSPHRASE", "not the passphrase")
    err = refused(capsys, "ca", "root", command, "--dir", str(ca_dir))
    assert "wrong passphrase" in err
    assert snapshot(ca_dir) == before


def test_activate_without_the_cluster_key_passphrase_is_refused_and_writes_no_plain_key(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["ca", "root", "prepare", "--dir", str(ca_dir)]) == 0
    before = snapshot(ca_dir)
    monkeypatch.delenv("TRELLIS_KEY_PASSPHRASE")
    err = refused(capsys, "ca", "root", "activate", "--dir", str(ca_dir))
    assert "encrypted" in err and "TRELLIS_KEY_PASSPHRASE" in err
    assert snapshot(ca_dir) == before


def test_activate_reissues_every_cluster_intermediate_under_the_new_root(ca_dir: Path) -> None:
    store = CaStore(ca_dir, key_passphrase=KEY_PASS.encode())
    old_root = store.root_certificate()
    jwt_before = {c: (ca_dir / "clusters" / c / "jwt.key").read_bytes() for c in ("west", "east")}
    assert main(["ca", "root", "prepare", "--dir", str(ca_dir)]) == 0
    prepared = x509.load_pem_x509_certificate((ca_dir / "next-root.crt").read_bytes())
    assert main(["ca", "root", "activate", "--dir", str(ca_dir)]) == 0
    assert store.root_certificate() == prepared
    assert store.previous_root_certificate() == old_root
    assert not (ca_dir / "next-root.key").exists() and not (ca_dir / "next-root.crt").exists()
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in (ca_dir / "root.key").read_bytes()
    # Both roots stay in the bundle: chains to either verify until the old one retires.
    assert set(roots(ca_dir)) == {old_root, prepared}
    for cluster in ("west", "east"):
        intermediate = store.load_intermediate(cluster)  # opens with the key passphrase
        assert issued_by(intermediate.certificate, prepared)
        (_, superseded), *_ = store.superseded_intermediates(cluster)
        assert issued_by(superseded, old_root)
        # JWT keys are not the root's business: they stay.
        assert (ca_dir / "clusters" / cluster / "jwt.key").read_bytes() == jwt_before[cluster]


def _activated(ca_dir: Path) -> tuple[x509.Certificate, x509.Certificate]:
    old_root = CaStore(ca_dir).root_certificate()
    assert main(["ca", "root", "prepare", "--dir", str(ca_dir)]) == 0
    assert main(["ca", "root", "activate", "--dir", str(ca_dir)]) == 0
    return old_root, CaStore(ca_dir).root_certificate()


def _record(ca_dir: Path, cluster: str, *, valid_until: float, signing: bool) -> None:
    """What `ca serve` for ``cluster`` writes after signing with its previous intermediate
    until ``valid_until`` (and, unless ``signing``, switching to the new one)."""
    store = CaStore(ca_dir)
    ((_, previous),) = store.superseded_intermediates(cluster)
    ledger = IssuanceLedger(store.issued_path(cluster), {})
    ledger.signing_with(previous)
    ledger.issued(previous.public_bytes(Encoding.DER), valid_until)
    if not signing:
        ledger.stopped_signing(previous)
    ledger.flush()


def test_retire_is_refused_while_no_server_has_recorded_what_the_old_chain_signed(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old_root, _ = _activated(ca_dir)
    before = snapshot(ca_dir)
    err = refused(capsys, "ca", "root", "retire", "--dir", str(ca_dir))
    assert f"root {old_root.serial_number:x} still anchors" in err
    assert "no CA server recorded what it signed" in err and "(and 1 more)" in err
    assert snapshot(ca_dir) == before


def test_retire_is_refused_while_the_server_still_signs_with_the_old_chain(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _activated(ca_dir)
    for cluster in ("west", "east"):
        _record(ca_dir, cluster, valid_until=time.time() - 60, signing=cluster == "east")
    err = refused(capsys, "ca", "root", "retire", "--dir", str(ca_dir))
    assert "cluster east's previous intermediate" in err and "still signs with it" in err
    assert "(and" not in err  # west's record is final and in the past


def test_retire_waits_for_the_last_svid_of_the_old_chain_then_drops_the_old_root(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, new_root = _activated(ca_dir)
    last = time.time() + 600
    _record(ca_dir, "west", valid_until=last, signing=False)
    _record(ca_dir, "east", valid_until=time.time() - 60, signing=False)
    err = refused(capsys, "ca", "root", "retire", "--dir", str(ca_dir))
    assert (
        "cluster west's previous intermediate" in err and "SVIDs it signed are valid until" in err
    )
    # As recorded: rounded up to the record's granularity.
    until = dt.datetime.fromtimestamp(
        math.ceil(last / LEDGER_GRANULARITY) * LEDGER_GRANULARITY, dt.UTC
    )
    assert f"{until:%Y-%m-%d %H:%M}" in err
    # The last SVID of the old chain has expired: the record says so.
    _record(ca_dir, "west", valid_until=time.time() - 2 * LEDGER_GRANULARITY, signing=False)
    assert main(["ca", "root", "retire", "--dir", str(ca_dir)]) == 0
    assert roots(ca_dir) == [new_root]
    assert CaStore(ca_dir).previous_root_certificate() is None
    for cluster in ("west", "east"):
        assert CaStore(ca_dir).superseded_intermediates(cluster) == []
    bundle = json.loads((ca_dir / "bundle.json").read_text())
    assert len([k for k in bundle["keys"] if k["use"] == "x509-svid"]) == 1


def test_a_new_prepare_is_refused_until_the_previous_root_is_retired(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _activated(ca_dir)
    err = refused(capsys, "ca", "root", "prepare", "--dir", str(ca_dir))
    assert "previous root" in err and "trellis ca root retire" in err


def test_retire_force_drops_a_root_whose_chains_are_still_valid(ca_dir: Path) -> None:
    _, new_root = _activated(ca_dir)
    assert main(["ca", "root", "retire", "--dir", str(ca_dir), "--force"]) == 0
    assert roots(ca_dir) == [new_root]


def test_intermediate_rotate_signs_a_new_one_under_the_root_and_keeps_the_jwt_key(
    ca_dir: Path,
) -> None:
    store = CaStore(ca_dir, key_passphrase=KEY_PASS.encode())
    old = store.intermediate_certificate("west")
    jwt = (ca_dir / "clusters/west/jwt.key").read_bytes()
    bundle = (ca_dir / "bundle.json").read_bytes()
    argv = ["ca", "intermediate", "rotate", "--dir", str(ca_dir), "--cluster", "west"]
    assert main([*argv, "--ttl", "2h"]) == 0
    new = store.load_intermediate("west")
    assert new.certificate != old and issued_by(new.certificate, store.root_certificate())
    assert new.expires_at - dt.datetime.now(dt.UTC) < dt.timedelta(hours=2)
    assert store.superseded_intermediates("west")[0][1] == old
    assert (ca_dir / "clusters/west/jwt.key").read_bytes() == jwt
    assert (ca_dir / "bundle.json").read_bytes() == bundle  # same root: nothing to publish
    assert (
        b"BEGIN ENCRYPTED PRIVATE KEY" in (ca_dir / "clusters/west/intermediate.key").read_bytes()
    )


def test_intermediate_rotate_of_an_unknown_cluster_is_refused_in_one_line(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(ca_dir)
    argv = ["ca", "intermediate", "rotate", "--dir", str(ca_dir), "--cluster", "north"]
    err = refused(capsys, *argv)
    assert "no intermediate for cluster 'north'" in err
    assert snapshot(ca_dir) == before


def test_the_refusals_are_one_line_from_the_command_as_a_process_too(ca_dir: Path) -> None:
    def run(*argv: str, passphrase: str = PASS) -> str:
        environ = {**os.environ, "TRELLIS_ROOT_PASSPHRASE": passphrase}
        result = subprocess.run(
            [sys.executable, "-m", "trellis", *argv],
            capture_output=True,
            text=True,
            env=environ,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1 and result.stdout == "", result
        assert result.stderr.startswith("trellis: error: ") and result.stderr.count("\n") == 1
        return result.stderr

    directory = str(ca_dir)
    assert "no prepared root" in run("ca", "root", "activate", "--dir", directory)
    assert "wrong passphrase" in run(
        "ca", "root", "prepare", "--dir", directory, passphrase="not the passphrase"
    )
    assert main(["ca", "root", "prepare", "--dir", directory]) == 0
    assert "already pending" in run("ca", "root", "prepare", "--dir", directory)
    assert main(["ca", "root", "activate", "--dir", directory]) == 0
    assert "still anchors what is valid" in run("ca", "root", "retire", "--dir", directory)


def test_intermediate_rotate_forgets_replaced_intermediates_once_they_have_expired(
    ca_dir: Path,
) -> None:
    store = CaStore(ca_dir, key_passphrase=KEY_PASS.encode())
    first = store.intermediate_certificate("west")
    argv = ["ca", "intermediate", "rotate", "--dir", str(ca_dir), "--cluster", "west"]
    assert main([*argv, "--ttl", "1s"]) == 0
    short_lived = store.intermediate_certificate("west")
    wait = (short_lived.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds()
    time.sleep(max(0.0, wait) + 0.1)
    assert main(argv) == 0
    assert main(argv) == 0
    kept = [cert for _, cert in store.superseded_intermediates("west")]
    assert first in kept and short_lived not in kept and len(kept) == 2
