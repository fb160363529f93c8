"""Go 1.27's crypto/tls and crypto/x509 against the engine with ML-DSA-65 chains.

The Go side is ``go_mldsa/cmd/mldsapeer``, its own module (``go 1.27.0``, standard
library only) so the other peers keep building with Go 1.26. When the Go found by
``go_peers.go_binary`` is older than 1.27, the build asks for ``GOTOOLCHAIN=go1.27.3``,
which the go command fetches from the module proxy; where that cannot happen the tests
skip with one line saying so.

Both sides hold ML-DSA-65 SVIDs from the project's CA (root, name-constrained
intermediate and leaf all ML-DSA-65, cut around the real clock, which Go checks),
require and verify each other's, and negotiate X25519MLKEM768. Go's view comes from its
JSON line: the group from ``ConnectionState``, and the scheme as the only one crypto/tls
accepts for the peer's ML-DSA-65 key (see the program's comment).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.tls import NamedGroup, SignatureScheme, TLSError
from sidecar.tls.shell import open_tls_connection
from sidecar.tls.verify import SpiffeVerifier
from tests.sidecar.tls.pki import (
    CLIENT_ID,
    SERVER_ID,
    TRUST_DOMAIN,
    Identity,
    ca_live_identity,
    client_config,
    server_config,
)
from tests.sidecar.tls.test_interop_system_fixtures import peer_process, run, tls_echo_server

from .go_peers import GoPeersUnavailable, cache_root, go_binary

SOURCE = Path(__file__).resolve().parent / "go_mldsa"
TOOLCHAIN = "go1.27.3"
TIMEOUT = 20.0
BUILD_TIMEOUT = 900.0


def _go(go: str, *args: str, env: dict[str, str]) -> str:
    try:
        result = subprocess.run(
            ["nice", "-n", "10", go, *args],
            cwd=SOURCE,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GoPeersUnavailable(f"`go {args[0]}` took over {BUILD_TIMEOUT:.0f}s") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise GoPeersUnavailable(f"`go {args[0]}` failed: {lines[-1] if lines else '?'}")
    return result.stdout.strip()


def _build() -> Path:
    go = go_binary()
    env = {**os.environ, "CGO_ENABLED": "0"}
    # go.mod's `go 1.27.0` line makes an older go command switch toolchains by itself
    # unless GOTOOLCHAIN=local; name the release so the switch is explicit.
    version = _go(go, "env", "GOVERSION", env=env)
    major_minor = tuple(int(p) for p in version.removeprefix("go").split(".")[:2])
    if major_minor < (1, 27):
        env["GOTOOLCHAIN"] = TOOLCHAIN
        version = _go(go, "env", "GOVERSION", env=env)
    digest = hashlib.sha256(version.encode())
    for path in sorted(SOURCE.rglob("*")):
        if path.is_file():
            digest.update(path.read_bytes())
    target = cache_root() / f"mldsa-{digest.hexdigest()[:16]}"
    binary = target / "mldsapeer"
    if binary.is_file():
        return binary
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file():
            return binary
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            _go(go, "build", "-trimpath", "-o", str(staging) + os.sep, "./cmd/mldsapeer", env=env)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return binary


@pytest.fixture(scope="session")
def mldsapeer() -> Path:
    try:
        return _build()
    except GoPeersUnavailable as exc:
        pytest.skip(f"Go 1.27 ML-DSA peer: {exc}")


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _svid_dir(folder: Path, ident: Identity, peer_root: x509.Certificate) -> Path:
    """The files `trellis ca issue` writes: svid.pem (leaf, intermediate), svid.key,
    and bundle.pem (here: the root the peer's chain ends at)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "svid.pem").write_bytes(_pem(*ident.chain))
    key = ident.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (folder / "svid.key").write_bytes(key)
    (folder / "svid.key").chmod(0o600)
    (folder / "bundle.pem").write_bytes(_pem(peer_root))
    return folder


def _lines(output: str) -> dict[str, dict[str, Any]]:
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return {event["event"]: event for event in events}


def _bundles(ident: Identity) -> dict[str, list[x509.Certificate]]:
    return {TRUST_DOMAIN: [ident.root]}


def test_a_go_client_and_an_engine_server_do_mldsa65_mtls_over_x25519mlkem768(
    mldsapeer: Path, tmp_path: Path
) -> None:
    server, client = ca_live_identity("server"), ca_live_identity("client")
    folder = _svid_dir(tmp_path / "client", client, server.root)
    config = server_config(server, rng=os.urandom, trust_bundles=_bundles(client))

    async def scenario() -> tuple[int, str, list[object]]:
        async with tls_echo_server(config) as (port, seen):
            argv = (str(mldsapeer), "client", "-dir", str(folder), "-connect", f"127.0.0.1:{port}")
            async with peer_process(*argv, stdin=False) as go:
                code, output = await go.finish(TIMEOUT)
            await asyncio.sleep(0.05)
        return code, output, seen

    code, output, seen = run(scenario(), TIMEOUT * 2)
    assert code == 0, output
    go = _lines(output)["handshake"]
    # Go's side: it verified our ML-DSA-65 chain and our mldsa65 CertificateVerify.
    assert (go["group"], go["peer_key"], go["peer_scheme"]) == (
        "X25519MLKEM768",
        "ML-DSA-65",
        "MLDSA65",
    )
    assert go["peer_chain"] == ["ML-DSA-65", "ML-DSA-65"] and go["peer_id"] == str(SERVER_ID)
    # Ours: Go's CertificateVerify was mldsa65 too.
    done = seen[0]
    assert done.signature_scheme == SignatureScheme.mldsa65, seen  # type: ignore[attr-defined]
    assert done.group == NamedGroup.X25519MLKEM768  # type: ignore[attr-defined]
    assert done.peer_spiffe_id == CLIENT_ID  # type: ignore[attr-defined]


def test_an_engine_client_and_a_go_server_do_mldsa65_mtls_over_x25519mlkem768(
    mldsapeer: Path, tmp_path: Path
) -> None:
    server, client = ca_live_identity("server"), ca_live_identity("client")
    folder = _svid_dir(tmp_path / "server", server, client.root)
    config = client_config(client, rng=os.urandom, trust_bundles=_bundles(server))

    async def scenario() -> tuple[int, str, dict[str, Any]]:
        argv = (str(mldsapeer), "server", "-dir", str(folder))
        async with peer_process(*argv, stdin=False) as go:
            line = await go.wait_for_line(b'"listening"', TIMEOUT)
            port = int(json.loads(line)["addr"].rsplit(":", 1)[1])
            reader, writer = await open_tls_connection("127.0.0.1", port, config=config)
            view = {
                key: writer.get_extra_info(key)
                for key in ("tls_group", "signature_scheme", "spiffe_id")
            }
            writer.write(b"ping from trellis\n")
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"ping from trellis\n"
            writer.close()
            code, output = await go.finish(TIMEOUT)
        return code, output, view

    code, output, view = run(scenario(), TIMEOUT * 2)
    assert code == 0, output
    go = _lines(output)["handshake"]
    assert (go["group"], go["peer_key"], go["peer_scheme"]) == (
        "X25519MLKEM768",
        "ML-DSA-65",
        "MLDSA65",
    )
    assert go["peer_id"] == str(CLIENT_ID)
    assert view == {
        "tls_group": "X25519MLKEM768",
        "signature_scheme": "mldsa65",
        "spiffe_id": str(SERVER_ID),
    }


def _tampered(ident: Identity) -> tuple[x509.Certificate, ...]:
    """The chain with one bit of the leaf's ML-DSA-65 signature flipped (the signature is
    the last 3309 bytes of the DER)."""
    der = bytearray(ident.chain[0].public_bytes(serialization.Encoding.DER))
    der[-100] ^= 0x01
    return (x509.load_der_x509_certificate(bytes(der)), *ident.chain[1:])


def test_go_x509_accepts_the_mldsa65_chain_and_both_refuse_a_tampered_signature(
    mldsapeer: Path, tmp_path: Path
) -> None:
    ident = ca_live_identity("server")
    good = _svid_dir(tmp_path / "good", ident, ident.root)
    result = subprocess.run(
        [str(mldsapeer), "verify", "-dir", str(good)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout)["verified"]["chain"] == ["ML-DSA-65", "ML-DSA-65"]

    tampered = Identity(_tampered(ident), ident.key, ident.root)
    bad = _svid_dir(tmp_path / "bad", tampered, ident.root)
    result = subprocess.run(
        [str(mldsapeer), "verify", "-dir", str(bad)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 1 and "signature" in result.stderr, result.stderr
    verifier = SpiffeVerifier(_bundles(ident))
    chain = [c.public_bytes(serialization.Encoding.DER) for c in tampered.chain]
    with pytest.raises(TLSError):
        verifier.verify(chain, ident.chain[0].not_valid_before_utc, True, [SignatureScheme.mldsa65])
