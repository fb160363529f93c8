"""`trellis ca serve` as a real process: CLI-made join tokens, gRPC mTLS, metrics over
HTTP, JSON logs without secrets, SIGTERM, start-up refusals, tokens printed only when
asked, and cluster keys encrypted at rest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ca import KeyAlgorithm, generate_private_key
from ca.api import CaClient, CaError

from .conftest import CLUSTER, ENTRIES_YAML

REPO = Path(__file__).resolve().parents[3]


def trellis(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trellis", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=check,
    )


@contextmanager
def serve(*args: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], list[str]]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "trellis", "ca", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        ready_line = process.stdout.readline()
        if not ready_line:
            raise AssertionError(f"server did not start: {process.stderr.read()}")  # type: ignore[union-attr]
        ready = json.loads(ready_line)
        assert ready.pop("event") == "ready"
        extra: list[str] = []
        yield process, ready, extra
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def listen_args(ca_dir: Path, *more: str) -> list[str]:
    return [
        "--dir", str(ca_dir), "--cluster", CLUSTER,
        "--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0",
        "--bundle-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
        *more,
    ]  # fmt: skip


def test_served_process_attests_a_cli_token_signs_and_stops_cleanly_on_sigterm(
    ca_dir: Path, tmp_path: Path
) -> None:
    entries = tmp_path / "entries.yaml"
    entries.write_text(ENTRIES_YAML)
    minting = ("--join-token", "node-b", "--print-join-tokens")
    with serve(*listen_args(ca_dir, "--entries", str(entries), *minting)) as (
        process,
        ready,
        _,
    ):
        assert process.stdout is not None
        minted = json.loads(process.stdout.readline())
        assert minted["event"] == "join-token" and minted["node"] == "node-b"
        # a token created while the server runs is accepted: only its hash is on disk
        made = trellis("ca", "token", "create", "--dir", str(ca_dir), "--cluster", CLUSTER,
                       "--node", "node-a", "--ttl", "5m")  # fmt: skip
        token = made.stdout.strip()
        assert token.startswith("tjt_")

        async def agent() -> None:
            roots = (ca_dir / "root.crt").read_bytes()
            client = CaClient(ready["listen"], attest_address=ready["attest_listen"],
                              trust_roots=roots)  # fmt: skip
            identity = await client.attest_with_join_token(token)
            assert identity.node_name == "node-a"
            svids = await client.batch_new_x509_svids(
                [("web", generate_private_key(KeyAlgorithm.P256))]
            )
            assert str(svids[0].spiffe_id) == "spiffe://example.org/ns/default/sa/web"
            with pytest.raises(CaError) as refused:
                await client.batch_new_x509_svids([("db", generate_private_key(KeyAlgorithm.P256))])
            assert refused.value.code == "PERMISSION_DENIED"
            other = CaClient(ready["listen"], attest_address=ready["attest_listen"],
                             trust_roots=roots)  # fmt: skip
            assert (await other.attest_with_join_token(minted["token"])).node_name == "node-b"
            with pytest.raises(CaError) as replay:
                await CaClient(ready["listen"], attest_address=ready["attest_listen"],
                               trust_roots=roots).attest_with_join_token(token)  # fmt: skip
            assert replay.value.code == "UNAUTHENTICATED"
            # a stream open at shutdown must not hold the process up
            stream = client.watch_bundle()
            await stream.__anext__()
            with urllib.request.urlopen(f"http://{ready['metrics_listen']}/metrics") as r:
                metrics = r.read().decode()
            assert (
                'trellis_ca_x509_svid_issued_total{cluster="west",kind="workload",'
                'trust_domain="example.org"} 1.0' in metrics
            )
            assert 'reason="entry-not-authorized"' in metrics
            assert 'reason="join-token-reused"' in metrics
            process.send_signal(signal.SIGTERM)
            # The server ends the stream itself as it stops: a clean end, which the client
            # reports as "bundle stream ended". A stream left to hold the stop until the
            # grace period runs out is cancelled by grpcio instead ("Cancelling all calls").
            with pytest.raises(CaError) as ended:
                await stream.__anext__()
            assert (ended.value.code, ended.value.detail) == ("UNAVAILABLE", "bundle stream ended")
            # It exits while this client still holds its connection open.
            await asyncio.to_thread(process.wait, 60)  # a hang guard, not a measurement
            await client.close()
            await other.close()

        asyncio.run(asyncio.wait_for(agent(), 120))
        assert process.returncode == 0
        assert process.stderr is not None
        logs = process.stderr.read()
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert "agent-attested" in events
    stopping = [r for r in records if r["event"] == "ca-server-stopping"]
    assert [r.get("reason") for r in stopping] == ["signal"]
    assert events[-1] == "ca-server-stopped"
    assert token not in logs and minted["token"] not in logs
    assert "PRIVATE KEY" not in logs


def test_serve_refuses_a_malformed_entries_file_with_one_clear_line(
    ca_dir: Path, tmp_path: Path
) -> None:
    entries = tmp_path / "entries.yaml"
    entries.write_text("entries:\n  - spiffe_id: spiffe://example.org/x\n    selectors: [uid:1]\n")
    result = trellis("ca", "serve", *listen_args(ca_dir, "--entries", str(entries)), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("trellis: error: ")
    assert "entries[0].selectors[0]" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "three", "4294967296"])
def test_serve_refuses_a_batch_limit_agents_could_not_be_told(ca_dir: Path, value: str) -> None:
    result = trellis("ca", "serve", *listen_args(ca_dir, "--max-batch", value), check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(f"argument --max-batch: {value!r} is not a number of CSRs from 1 to 100000")
    )
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_unknown_cluster(ca_dir: Path) -> None:
    args = listen_args(ca_dir)
    args[args.index(CLUSTER)] = "east"
    result = trellis("ca", "serve", *args, check=False)
    assert result.returncode == 1
    assert "no intermediate for cluster 'east'" in result.stderr
    assert "Traceback" not in result.stderr


def test_token_create_refuses_a_bad_node_name_and_writes_nothing(ca_dir: Path) -> None:
    result = trellis("ca", "token", "create", "--dir", str(ca_dir), "--cluster", CLUSTER,
                     "--node", "bad/node", check=False)  # fmt: skip
    assert result.returncode == 1
    assert "not a usable node name" in result.stderr
    assert not (ca_dir / "clusters" / CLUSTER / "join-tokens").exists() or not os.listdir(
        ca_dir / "clusters" / CLUSTER / "join-tokens"
    )


def test_serve_reports_a_port_in_use_in_one_line_and_leaves_nothing_running(
    ca_dir: Path,
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        for flag in ("--listen", "--bundle-listen"):
            args = listen_args(ca_dir)
            args[args.index(flag) + 1] = taken
            result = trellis("ca", "serve", *args, check=False)
            assert result.returncode == 1, flag
            # One line naming the flag: no gRPC core log line, no "stopped" event before it.
            assert result.stderr == (
                f"trellis: error: {flag} {taken}: cannot listen: Address already in use\n"
            )


def test_ban_and_unban_edit_the_list_and_repeat_harmlessly(tmp_path: Path) -> None:
    bans = tmp_path / "banned.yaml"
    assert "node-a: banned; 1 node(s)" in trellis("ca", "ban", "node-a", "--file", str(bans)).stdout
    trellis("ca", "ban", "node-b", "--file", str(bans))
    again = trellis("ca", "ban", "node-a", "--file", str(bans)).stdout
    assert "(unchanged)" in again
    assert bans.read_text() == "- node-a\n- node-b\n"
    assert (
        "node-a: not banned; 1 node(s)"
        in trellis("ca", "unban", "node-a", "--file", str(bans)).stdout
    )
    trellis("ca", "unban", "node-b", "--file", str(bans))
    assert bans.read_text() == "[]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["banned.yaml"]  # no temporary left


@pytest.mark.parametrize("node", ["bad/node", "", "-dash", "x" * 300])
def test_ban_refuses_a_bad_node_name_and_writes_nothing(tmp_path: Path, node: str) -> None:
    bans = tmp_path / "banned.yaml"
    result = trellis("ca", "ban", node, "--file", str(bans), check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 3
    assert not bans.exists()


def test_ban_refuses_to_rewrite_a_file_it_cannot_read_as_a_ban_list(tmp_path: Path) -> None:
    bans = tmp_path / "banned.yaml"
    bans.write_text("banned: [node-a]\n")
    result = trellis("ca", "unban", "node-a", "--file", str(bans), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"trellis: error: {bans}: must be a YAML list of node names (fix or remove the file first)"
    ]
    assert bans.read_text() == "banned: [node-a]\n"


def test_serve_refuses_a_bad_ban_list_with_one_line(ca_dir: Path, tmp_path: Path) -> None:
    bans = tmp_path / "banned.yaml"
    bans.write_text("- node-a\n- node a\n")
    result = trellis("ca", "serve", *listen_args(ca_dir, "--banned-agents", str(bans)),
                     check=False)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"trellis: error: --banned-agents {bans}: [1]: 'node a' is not a node name"
    ]
    missing = trellis("ca", "serve", *listen_args(ca_dir, "--banned-agents", str(tmp_path / "x")),
                      check=False)  # fmt: skip
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_serve_refuses_to_mint_join_tokens_it_was_not_asked_to_print(ca_dir: Path) -> None:
    """A server's stdout ends up in logs that outlive a token's use: without
    --print-join-tokens, --join-token is refused and no token reaches stdout."""
    process = subprocess.Popen(
        [sys.executable, "-m", "trellis", "ca", "serve",
         *listen_args(ca_dir, "--join-token", "node-b")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()  # still serving: it minted the token
        out, err = process.communicate(timeout=10)
    assert "tjt_" not in out and "tjt_" not in err
    assert process.returncode == 1
    assert err.strip().splitlines() == [
        "trellis: error: --join-token mints tokens that only --print-join-tokens shows (on"
        " stdout, and in any log that keeps it); add it, or use trellis ca token create"
        " --out FILE"
    ]


def test_token_create_writes_the_token_to_a_0600_file_and_prints_no_token(
    ca_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "node-a.token"
    made = trellis("ca", "token", "create", "--dir", str(ca_dir), "--cluster", CLUSTER,
                   "--node", "node-a", "--out", str(out), "--json")  # fmt: skip
    token = out.read_text().strip()
    assert token.startswith("tjt_")
    assert os.stat(out).st_mode & 0o777 == 0o600
    assert token not in made.stdout and token not in made.stderr
    assert json.loads(made.stdout)["file"] == str(out)
    assert len(os.listdir(ca_dir / "clusters" / CLUSTER / "join-tokens")) == 1


KEY_PASS = b"cluster key passphrase"


def test_serve_opens_an_encrypted_intermediate_only_with_its_key_passphrase(
    ca_dir: Path, tmp_path: Path
) -> None:
    """Cluster keys written encrypted (ca intermediate with a key passphrase): serve
    refuses in one line naming the key without the passphrase or with a wrong one, and with
    it signs, in a worker process too (three CSRs are more than the event loop signs
    itself), for a token made without it."""
    from ca.store import CaStore

    plain = CaStore(ca_dir)
    intermediate, jwt = plain.load_intermediate(CLUSTER), plain.load_jwt_authority(CLUSTER)
    CaStore(ca_dir, key_passphrase=KEY_PASS).save_intermediate(intermediate, jwt)
    key = ca_dir / "clusters" / CLUSTER / "intermediate.key"
    assert key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    secret = tmp_path / "key-pass"
    secret.write_bytes(KEY_PASS + b"\n")
    wrong = tmp_path / "wrong-pass"
    wrong.write_text("not the key passphrase\n")
    for extra, expected in (
        ((), f"intermediate key {key} is encrypted: set TRELLIS_KEY_PASSPHRASE"),
        (("--key-passphrase-file", str(wrong)), f"cannot decrypt intermediate key {key}"),
    ):
        result = trellis("ca", "serve", *listen_args(ca_dir, *extra), check=False)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr
    made = trellis("ca", "token", "create", "--dir", str(ca_dir), "--cluster", CLUSTER,
                   "--node", "node-a", "--ttl", "5m")  # fmt: skip
    token = made.stdout.strip()
    entries = tmp_path / "entries.yaml"
    entries.write_text(ENTRIES_YAML)
    args = listen_args(ca_dir, "--entries", str(entries), "--sign-workers", "1",
                       "--key-passphrase-file", str(secret))  # fmt: skip
    with serve(*args) as (process, ready, _):

        async def agent() -> None:
            client = CaClient(ready["listen"], attest_address=ready["attest_listen"],
                              trust_roots=(ca_dir / "root.crt").read_bytes())  # fmt: skip
            assert (await client.attest_with_join_token(token)).node_name == "node-a"
            keys = [("web", generate_private_key(KeyAlgorithm.P256)) for _ in range(3)]
            svids = await client.batch_new_x509_svids(keys)
            assert {str(s.spiffe_id) for s in svids} == {"spiffe://example.org/ns/default/sa/web"}
            await client.close()

        asyncio.run(asyncio.wait_for(agent(), 60))
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        assert process.stderr is not None
        logs = process.stderr.read()
    assert process.returncode == 0, logs
    assert KEY_PASS.decode() not in logs and "PRIVATE KEY" not in logs
