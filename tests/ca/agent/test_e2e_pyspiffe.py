"""End to end with real processes: ``trellis ca serve`` → ``trellis agent`` → py-spiffe.

Three processes talk over real sockets: the CA server (gRPC over mutual TLS on loopback),
the agent (attests with a join token, then serves the Workload API on a Unix socket), and
this test as the workload, using py-spiffe's ``WorkloadApiClient`` exactly as an
application would. Entry TTLs are a few seconds so rotations happen within the test.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from spiffe import JwtSvid, WorkloadApiClient

from ca import JwtAuthority, RootAuthority, TrustDomain
from ca.keys import write_private_file
from ca.store import CaStore
from tests.support import free_port, wait_for

WEB = "spiffe://example.org/ns/default/sa/web"
SVID_TTL = 10  # seconds: rotation at 4-6 s (half-life, ±10% jitter)
REPO = Path(__file__).resolve().parents[3]


def _trellis(
    *args: str, extra_env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "trellis", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def _stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.stderr.read() if process.stderr else ""


@dataclass
class Mesh:
    """A CA server and an agent, each a real ``trellis`` process."""

    workdir: Path
    socket_path: Path
    ca_port: int = field(default_factory=free_port)
    attest_port: int = field(default_factory=free_port)
    ca: subprocess.Popen[str] | None = None
    agent: subprocess.Popen[str] | None = None
    join_token: str = ""
    agent_extra: Sequence[str] = ()
    agent_env: dict[str, str] = field(default_factory=dict)
    # How the agent gets its join token: "file" (--join-token-file), "env"
    # ($TRELLIS_JOIN_TOKEN) or "argv" (--join-token, which warns that ps shows it).
    token_via: str = "file"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket_path}"

    def start_ca(self, *, mint_token: bool, extra: Sequence[str] = ()) -> None:
        args = [
            "ca", "serve", "--dir", str(self.workdir / "ca"), "--cluster", "west",
            "--listen", f"127.0.0.1:{self.ca_port}",
            "--attest-listen", f"127.0.0.1:{self.attest_port}",
            "--bundle-listen", "off", "--entries", str(self.workdir / "entries.yaml"),
        ]  # fmt: skip
        if mint_token:
            args += ["--join-token", "node-a", "--print-join-tokens"]
        self.ca = _trellis(*args, *extra)
        assert self.ca.stdout is not None
        for line in self.ca.stdout:
            event = json.loads(line)
            if event["event"] == "join-token":
                self.join_token = event["token"]
            if event["event"] == "ready" and not mint_token:
                break
            if mint_token and self.join_token:
                break
        else:
            raise AssertionError(f"CA server did not start: {_stop(self.ca)}")

    @property
    def agent_data(self) -> Path:
        return self.workdir / "agent-data"

    def agent_args(self) -> list[str]:
        """``trellis agent``'s arguments, before any join token."""
        return [
            "agent", "--socket", str(self.socket_path), "--node", "node-a",
            "--ca", f"127.0.0.1:{self.ca_port}", "--ca-attest", f"127.0.0.1:{self.attest_port}",
            "--trust-bundle", str(self.workdir / "ca" / "root.crt"),
            "--data-dir", str(self.agent_data), "--admin", "off",
            "--sync-interval", "1s", "--backoff-cap", "1s",
        ]  # fmt: skip

    def start_agent(self) -> None:
        args = self.agent_args()
        env = dict(self.agent_env)
        if not (self.agent_data / "agent-svid.pem").exists():
            if self.token_via == "file":
                token_file = self.workdir / "join-token"
                write_private_file(token_file, self.join_token.encode())
                args += ["--join-token-file", str(token_file)]
            elif self.token_via == "env":
                env["TRELLIS_JOIN_TOKEN"] = self.join_token
            else:
                args += ["--join-token", self.join_token]
        self.agent = _trellis(*args, *self.agent_extra, extra_env=env)
        agent = self.agent

        def listening() -> bool:
            if agent.poll() is not None:
                raise AssertionError(f"agent exited: {_stop(agent)}")
            return self.socket_path.is_socket()

        wait_for(listening, 40, "the agent's socket")

    def stop_ca(self) -> str:
        assert self.ca is not None
        return _stop(self.ca)

    def stop_agent(self) -> str:
        assert self.agent is not None
        return _stop(self.agent)

    def stop(self) -> list[str]:
        """Stop whatever still runs, agent first; returns their logs."""
        return [_stop(p) for p in (self.agent, self.ca) if p is not None]


def _make_ca_dir(directory: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(directory)
    root = RootAuthority.create(TrustDomain("example.org"), now=now)
    store.save_root(root, b"e2e-passphrase-123")
    store.save_intermediate(root.issue_intermediate("west", now=now), JwtAuthority.generate())


@pytest.fixture
def svid_ttl() -> int:
    return SVID_TTL


def write_web_entry(path: Path, *extra: str) -> None:
    """An entries file with one entry, ``web``, for this test process's uid on node-a."""
    lines = [
        "entries:",
        "  - id: web",
        f"    spiffe_id: {WEB}",
        f"    selectors: [unix:uid:{os.getuid()}]",
        "    nodes: [node-a]",
        *(f"    {line}" for line in extra),
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def mesh(tmp_path: Path, short_dir: Path, svid_ttl: int) -> Iterator[Mesh]:
    _make_ca_dir(tmp_path / "ca")
    write_web_entry(tmp_path / "entries.yaml", f"ttl: {svid_ttl}s", "jwt_ttl: 5m")
    mesh = Mesh(tmp_path, short_dir / "agent.sock")
    mesh.start_ca(mint_token=True)
    mesh.start_agent()
    try:
        yield mesh
    finally:
        logs = mesh.stop()
        if os.environ.get("TRELLIS_TEST_LOGS"):
            print("\n".join(logs))


@contextlib.contextmanager
def _client(mesh: Mesh) -> Iterator[WorkloadApiClient]:
    client = WorkloadApiClient(mesh.endpoint, default_timeout=15)
    try:
        yield client
    finally:
        client.close()


class _Contexts:
    """Collects what ``stream_x509_contexts`` delivers, for bounded waits."""

    def __init__(self) -> None:
        self.serials: list[int] = []
        self.not_after: list[dt.datetime] = []
        self.arrived: list[dt.datetime] = []
        self.errors: list[Exception] = []
        self._lock = threading.Lock()

    def on_success(self, context: Any) -> None:
        leaf = context.default_svid.leaf
        with self._lock:
            if not self.serials or self.serials[-1] != leaf.serial_number:
                self.serials.append(leaf.serial_number)
                self.not_after.append(leaf.not_valid_after_utc)
                self.arrived.append(dt.datetime.now(dt.UTC))

    def on_error(self, error: Exception) -> None:
        self.errors.append(error)

    def distinct(self) -> int:
        with self._lock:
            return len(self.serials)


def test_py_spiffe_fetches_svids_contexts_and_jwts_from_the_agent(mesh: Mesh) -> None:
    with _client(mesh) as client:
        svid = client.fetch_x509_svid()
        assert str(svid.spiffe_id) == WEB
        assert len(svid.cert_chain) == 2  # leaf and the cluster intermediate
        assert svid.private_key.public_key() == svid.leaf.public_key()

        context = client.fetch_x509_context()
        assert [str(s.spiffe_id) for s in context.x509_svids] == [WEB]
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None and len(bundle.x509_authorities) == 1
        bundles = client.fetch_x509_bundles()
        assert bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain) == bundle

        jwt = client.fetch_jwt_svid(audience={"db"})
        assert str(jwt.spiffe_id) == WEB
        validated = client.validate_jwt_svid(jwt.token, "db")
        assert str(validated.spiffe_id) == WEB
        assert validated.audience == {"db"}

        # py-spiffe can also verify it locally with the JWT bundle the agent serves.
        jwt_bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(
            svid.spiffe_id.trust_domain
        )
        assert jwt_bundle is not None
        local = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"db"})
        assert str(local.spiffe_id) == WEB


def test_the_stream_delivers_a_rotated_svid_before_the_old_one_expires(mesh: Mesh) -> None:
    seen = _Contexts()
    with _client(mesh) as client:
        handler = client.stream_x509_contexts(seen.on_success, seen.on_error)
        try:
            wait_for(lambda: seen.distinct() >= 2, SVID_TTL + 5, "a rotated SVID")
        finally:
            handler.cancel()
    assert seen.arrived[1] < seen.not_after[0], "the rotation came only after the old expired"
    assert not seen.errors


# Long enough that a CA process restart (imports, key loading: 1-2 s here) plus the
# agent's capped backoff fit between the latest rotation point and expiry.
@pytest.mark.parametrize("svid_ttl", [20])
def test_ca_stopped_past_a_rotation_then_restarted_keeps_workloads_valid_throughout(
    mesh: Mesh, svid_ttl: int
) -> None:
    seen = _Contexts()
    with _client(mesh) as client:
        handler = client.stream_x509_contexts(seen.on_success, seen.on_error)
        try:
            wait_for(lambda: seen.distinct() >= 1, 15, "the first SVID")
            mesh.stop_ca()
            # Stay down past the latest possible rotation point (60% of the lifetime).
            issued = seen.not_after[0] - dt.timedelta(seconds=svid_ttl)
            latest_rotation = issued + dt.timedelta(seconds=svid_ttl * 0.6 + 0.2)
            time.sleep(max(0.0, (latest_rotation - dt.datetime.now(dt.UTC)).total_seconds()))
            during = client.fetch_x509_svid()
            assert during.leaf.serial_number == seen.serials[0]  # served from the cache...
            assert during.leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)  # ...still valid
            mesh.start_ca(mint_token=False)  # same CA directory, same ports, no new token
            wait_for(lambda: seen.distinct() >= 2, svid_ttl, "a rotation after the CA returned")
        finally:
            handler.cancel()
    # Workloads held a valid SVID throughout: the new one came before the old expired.
    assert seen.arrived[1] < seen.not_after[0]
    assert mesh.agent is not None and mesh.agent.poll() is None  # never restarted


def test_an_agent_restart_is_survived_by_streaming_clients(mesh: Mesh) -> None:
    seen = _Contexts()
    with _client(mesh) as client:
        handler = client.stream_x509_contexts(seen.on_success, seen.on_error)
        try:
            wait_for(lambda: seen.distinct() >= 1, 15, "the first SVID")
            mesh.stop_agent()
            mesh.start_agent()  # reuses its agent SVID from --data-dir: no new join token
            # The restarted agent issues fresh SVIDs; the client's stream reconnects.
            wait_for(lambda: seen.distinct() >= 2, 20, "an SVID from the restarted agent")
        finally:
            handler.cancel()
    assert not seen.errors


def test_an_entry_change_at_the_ca_reaches_the_stream_without_restarts(mesh: Mesh) -> None:
    api = "spiffe://example.org/ns/default/sa/api"
    ids: list[str] = []

    def on_success(context: Any) -> None:
        ids.append(str(context.default_svid.spiffe_id))

    with _client(mesh) as client:
        handler = client.stream_x509_contexts(on_success, lambda error: None)
        try:
            wait_for(lambda: WEB in ids, 15, "the first SVID")
            entries = mesh.workdir / "entries.yaml"
            entries.write_text(entries.read_text().replace(WEB, api))
            # The CA re-reads its YAML (1 s poll), the agent re-syncs (1 s), re-issues.
            wait_for(lambda: api in ids, 15, "an SVID for the changed entry")
        finally:
            handler.cancel()
