"""Every Grafana panel's query against a real Prometheus scraping a running mesh under load.

Processes: the whole mesh of ``trellis up`` started as a library (``trellis.up.mesh``):
``trellis ca serve``, ``trellis agent`` (node ``local``), the demo echo server and three
``trellis sidecar`` processes -- echo's (inbound, admits only load's SPIFFE ID), load's
(an upstream to echo's sidecar) and an "intruder" whose one call at start-up is refused --
each holding an SVID from the agent over the Workload API. Beside it, what the mesh alone
never shows: partner.org's ``trellis ca serve`` (its bundle endpoint only), and example.net's
CA (cluster ``edge``), which federates with partner.org and bans its one node ``stray``
once that node's ``trellis agent`` has attested -- so the agent's refusal and fetch-error
series and the CA's federation series exist. Debian's ``prometheus`` runs with its own
config and TSDB in a temporary directory, loads manifests/prometheus/trellis-rules.yml,
and scrapes both CAs that sign (local and edge), both agents and the three sidecars' admin
``/metrics`` every second on loopback. Every port is one the kernel picked; every process
is stopped (SIGTERM, then SIGKILL) whatever the test did.

Why the traffic starts only once Prometheus scrapes. A sidecar's ``tls_group_total``,
``tls_version_total`` and ``tls_cipher_suite_total`` series appear at the first handshake
that uses a label value, and ``rate()`` counts no increase into a series' first sample:
handshakes made before Prometheus saw the series would leave those panels at 0/0. So the
mesh starts without its load generator; the intruder's refused call at start-up has already
created the echo sidecar's series; once Prometheus has scraped every target, the test
starts ``trellis demo load`` through the load sidecar (its pool dials echo's sidecar: a
handshake on both ends) and then holds more app connections open at once than one pooled
TLS connection takes streams (100), so the load sidecar dials again -- handshakes on series
Prometheus already holds, on both sidecars.

Meanwhile the test drives a bounded issuance load through the CA's gRPC API with the
node agent's own credentials (read from the agent's data directory: the CA sees the same
node ``local``): X509- and JWT-SVIDs for the load workload's entry, plus refusals (an
unknown entry: ``entry-not-authorized``; the agent's spent join token:
``join-token-reused``). Then:

* every panel's query (CA, federation, agent and sidecar TLS) returns data: at least one
  row with a finite value (a quantile over an empty window is a NaN row, not data);
* the agent and federation panels return the right kind of data: the stray agent's
  ``permission-denied`` refusals and non-retryable fetch errors, an ``ok`` fetch of
  partner.org and a partner.org bundle younger than the stale alert's 30 minutes;
* every alert rule evaluates without error over these series; the stray agent's failing
  calls make ``TrellisAgentFetchErrors`` pending for it (and for no other agent), and
  ``TrellisFederatedBundleStale`` stays inactive while partner.org's fetches succeed;
* the sidecar TLS panels return the right kind of data: X25519MLKEM768's share of
  handshakes > 0, TLS 1.3 among the versions, a TLS 1.3 cipher suite, a finite positive
  handshake duration p95, a resumption ratio in [0, 1] (0 today: no resumption exists
  yet, every handshake counts as ``kind="none"``), and early-data outcomes ``accepted`` and
  ``rejected`` (zero-valued: no 0-RTT exists yet, but the sidecar exports both series
  from start-up, so the panel shows 0 rather than "No data");
* both the load and the echo sidecar completed handshakes Prometheus saw;
* the issuance-rate panel, evaluated over exactly the load window, times the window equals
  the number of workload SVIDs the test issued (the mesh's SVIDs live an hour: no
  rotation falls into the window; the panel is read for the mesh's trust domain and
  cluster, as a user picking them in the dashboard's variables would).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ca import KeyAlgorithm, TrustDomain, generate_private_key
from ca.agent.rotator import load_agent_state
from ca.api import CaClient, CaError
from trellis.up.identity import create_authorities
from trellis.up.mesh import CLUSTER, Mesh, MeshConfig
from trellis.up.processes import Child, free_ports, spawn

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "manifests" / "grafana" / "trellis-mesh.json"
RULES = REPO / "manifests" / "prometheus" / "trellis-rules.yml"
ISSUANCE_PANEL = "X509-SVID issuance rate by trust domain and cluster"
LOAD_BATCHES, BATCH_SIZE = 6, 10
# More app connections at once than one pooled TLS connection carries streams (the
# sidecar's default max_streams_per_connection is 100): the load sidecar must dial again.
BURST_CONNECTIONS = 110
# Grafana's $__rate_interval for these panels: wide enough to hold the whole test.
RATE_INTERVAL = "1m"
SIDECARS = ("load", "echo", "intruder")
PARTNER = TrustDomain("partner.org")
EDGE, EDGE_CLUSTER, BANNED_NODE = TrustDomain("example.net"), "edge", "stray"
# TrellisFederatedBundleStale's threshold (manifests/prometheus/trellis-rules.yml).
STALE_AFTER = 1800


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as output:
        proc = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, cwd=log.parent)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


@contextlib.contextmanager
def child(name: str, argv: list[str], log_dir: Path) -> Iterator[Child]:
    started = spawn(name, argv, log_dir, {"PYTHONPATH": str(REPO)})
    try:
        yield started
    finally:
        started.stop()


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                return json.loads(response.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:  # 400 for a PromQL parse error: keep the body
            body = exc.read()
            if exc.code == 503:
                # "Service Unavailable" in plain text while the TSDB is still opening:
                # callers polling for readiness treat it like a refused connection.
                raise OSError(f"Prometheus not ready: {body[:80]!r}") from exc
            return json.loads(body)  # type: ignore[no-any-return]

    def query(self, expr: str, **params: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr, **params)

    def value(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None


def panels() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def grafana(expr: str, rate_interval: str, trust_domain: str = ".*", cluster: str = ".*") -> str:
    """What Grafana sends for a selection of the template variables ('All' by default)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$trust_domain", trust_domain)
        .replace("$cluster", cluster)
    )


def http_ok(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)
    return False


@contextlib.contextmanager
def federating_ca_and_a_banned_node(
    host: str, run_dir: Path, log_dir: Path
) -> Iterator[tuple[str, str, list[Child]]]:
    """partner.org's CA (its bundle endpoint only); example.net's CA, cluster edge, which
    federates with partner.org; and the agent of edge's one node, banned once it has
    attested (it then keeps calling and being refused). The edge CA's metrics address, the
    agent's admin address, and the three children."""
    bundle, listen, attest, metrics, admin = free_ports(5)
    partner_root = create_authorities(log_dir / "partner", PARTNER, "east")
    edge_root = create_authorities(log_dir / "edge", EDGE, EDGE_CLUSTER)
    bans = log_dir / "banned.yaml"
    bans.write_text("[]\n")
    federation = log_dir / "federation.yaml"
    federation.write_text(
        yaml.safe_dump(
            {
                "trustDomains": [
                    {
                        "trustDomain": PARTNER.name,
                        "bundleEndpointURL": f"https://{host}:{bundle}/",
                        "bundleEndpointSPIFFEID": f"spiffe://{PARTNER.name}/trellis/ca/east",
                        "bootstrapBundle": str(partner_root),
                    }
                ]
            }
        )
    )
    with contextlib.ExitStack() as stack:
        partner = stack.enter_context(
            child(
                "ca-partner",
                [
                    "ca", "serve", "--dir", str(log_dir / "partner"), "--cluster", "east",
                    "--listen", f"{host}:0", "--attest-listen", f"{host}:0",
                    "--bundle-listen", f"{host}:{bundle}", "--sign-workers", "0",
                ],
                log_dir,
            )
        )  # fmt: skip
        partner.wait_event("ready", 30)
        edge = stack.enter_context(
            child(
                "ca-edge",
                [
                    "ca", "serve", "--dir", str(log_dir / "edge"), "--cluster", EDGE_CLUSTER,
                    "--listen", f"{host}:{listen}", "--attest-listen", f"{host}:{attest}",
                    "--bundle-listen", "off", "--metrics-listen", f"{host}:{metrics}",
                    "--federation", str(federation), "--banned-agents", str(bans),
                    "--join-token", BANNED_NODE, "--join-token-ttl", "5m", "--print-join-tokens",
                    "--poll-interval", "1", "--sign-workers", "0",
                ],
                log_dir,
            )
        )  # fmt: skip
        edge.wait_event("ready", 30)
        token_file = run_dir / "stray-join-token"
        token_file.touch(mode=0o600)
        token_file.write_text(str(edge.wait_event("join-token", 30)["token"]))
        agent = stack.enter_context(
            child(
                "agent-stray",
                [
                    "agent", "--socket", str(run_dir / "stray.sock"), "--node", BANNED_NODE,
                    "--ca", f"{host}:{listen}", "--ca-attest", f"{host}:{attest}",
                    "--trust-bundle", str(edge_root), "--join-token-file", str(token_file),
                    "--data-dir", str(run_dir / "stray"), "--admin", f"{host}:{admin}",
                    "--sync-interval", "1s", "--backoff-cap", "2s",
                ],
                log_dir,
            )
        )  # fmt: skip
        agent.wait_until(lambda: http_ok(f"http://{host}:{admin}/readyz"), "ready (first sync)", 40)
        bans.write_text(f"- {BANNED_NODE}\n")  # ca serve re-reads it within --poll-interval
        yield f"{host}:{metrics}", f"{host}:{admin}", [partner, edge, agent]


async def drive_issuance(mesh: Mesh) -> tuple[int, int]:
    """Workload SVIDs issued and refusals caused, through the CA's gRPC API as node local."""
    assert mesh.run_dir is not None
    state = load_agent_state(mesh.run_dir / "agent", dt.datetime.now(dt.UTC))
    assert state is not None, "the agent has saved no SVID"
    agent_svid, _ = state
    roots = (mesh.run_dir / "ca" / "root.crt").read_bytes()
    host = mesh.config.host
    listen = f"{host}:{mesh.ports['ca']}"
    attest = f"{host}:{mesh.ports['ca_attest']}"
    spent = (mesh.run_dir / "join-token").read_text()
    async with CaClient(listen, attest_address=attest, trust_roots=roots) as stranger:
        # First, so that this refusal's series has samples before the panels look at it.
        with pytest.raises(CaError):  # the agent's join token, used once: join-token-reused
            await stranger.attest_with_join_token(spent)
    issued = 0
    async with CaClient(listen, trust_roots=roots, agent_svid=agent_svid) as client:
        for _ in range(LOAD_BATCHES):
            keys = [("up-load", generate_private_key(KeyAlgorithm.P256)) for _ in range(BATCH_SIZE)]
            issued += len(await client.batch_new_x509_svids(keys))
            await client.new_jwt_svid("up-load", ["billing"])
            with pytest.raises(CaError):  # no such entry: entry-not-authorized
                await client.batch_new_x509_svids([("db", generate_private_key(KeyAlgorithm.P256))])
            await asyncio.sleep(0.4)
    return issued, LOAD_BATCHES + 1


async def burst(host: str, port: int, connections: int) -> int:
    """Open ``connections`` app connections through the load sidecar at once, send a
    request on each, and close them only when all were answered; the 200s."""
    opened = await asyncio.gather(
        *(asyncio.open_connection(host, port) for _ in range(connections))
    )
    body = b"burst"
    request = b"POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(request)
        await writer.drain()
        status = await reader.readline()
        return status.startswith(b"HTTP/1.1 200")

    try:
        answers = await asyncio.gather(*(exchange(r, w) for r, w in opened))
    finally:
        for _, writer in opened:
            writer.close()
    return sum(answers)


def test_every_panel_returns_data_against_a_running_mesh(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus missing: apt-get install --no-install-recommends prometheus")
    config = MeshConfig(
        svid_ttl=dt.timedelta(hours=1),  # no rotation inside the issuance window
        start_load=False,  # the traffic starts once Prometheus scrapes (module docstring)
        probe_policy=True,
        startup_timeout=40.0,
    )
    with Mesh(config) as mesh, contextlib.ExitStack() as stack:
        host = config.host
        assert mesh.run_dir is not None
        edge_metrics, stray_admin, others = stack.enter_context(
            federating_ca_and_a_banned_node(host, mesh.run_dir, tmp_path)
        )
        # The sidecars' Workload API streams stay open (counted when they end): one unary
        # call, from a process no entry matches, gives the agent's request counter a series.
        subprocess.run(
            [
                sys.executable, "-m", "trellis", "svid", "fetch",
                "--socket", str(mesh.run_dir / "agent.sock"), "--timeout", "3s", "--json",
            ],
            cwd=REPO,
            capture_output=True,
            timeout=30,
            check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        (port,) = free_ports(1)
        targets = {
            "trellis-ca": [mesh.url("ca_metrics", "").split("//")[1], edge_metrics],
            "trellis-agent": [mesh.url("agent_admin", "").split("//")[1], stray_admin],
            "trellis-sidecar": [mesh.url(f"{name}_admin", "").split("//")[1] for name in SIDECARS],
        }
        scrape = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addresses}]}
                for job, addresses in targets.items()
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(scrape))
        with process(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={host}:{port}",
            ],
            tmp_path / "prometheus.log",
        ):
            prom = Prometheus(f"http://{host}:{port}")
            scraped = sum(len(addresses) for addresses in targets.values())

            def all_up() -> bool:
                failed = mesh.failed()
                assert failed is None, failed.failure("stopped")
                for other in others:
                    assert other.alive(), other.failure("stopped")
                try:
                    return len(prom.query("up == 1")["data"]["result"]) == scraped
                except OSError:
                    return False

            wait_for("Prometheus to scrape the CA, the agent and the sidecars", all_up)
            handshakes = "sum by (job, instance, direction) (trellis_sidecar_tls_handshakes_total)"
            before = {
                (r["metric"]["instance"], r["metric"]["direction"]): float(r["value"][1])
                for r in prom.query(handshakes)["data"]["result"]
            }
            assert len(before) == 2 * len(SIDECARS), before
            mesh_ca = f'trust_domain="{config.trust_domain.name}", cluster="{CLUSTER}"'
            workload = f'sum(trellis_ca_x509_svid_issued_total{{{mesh_ca}, kind="workload"}})'
            base = wait_for("the base issuance count", lambda: prom.value(workload))

            with child(
                "load",
                [
                    "demo", "load", "--target", f"{host}:{mesh.ports['load_upstream']}",
                    "--rate", "40", "--connections", "4", "--size", "512",
                    "--metrics-listen", f"{host}:{mesh.ports['load_metrics']}",
                ],
                tmp_path,
            ) as load:  # fmt: skip
                load.wait_event("ready", 30)
                load_outbound = (
                    'trellis_sidecar_tls_handshakes_total{direction="outbound",'
                    f'instance="{host}:{mesh.ports["load_admin"]}"}}'
                )
                wait_for(
                    "Prometheus to see the load sidecar's first handshake",
                    lambda: (prom.value(load_outbound) or 0) >= 1,
                )
                time.sleep(1.5)  # a scrape holding the load sidecar's new tls_* series
                answered = asyncio.run(
                    asyncio.wait_for(
                        burst(host, mesh.ports["load_upstream"], BURST_CONNECTIONS), 30
                    )
                )
                assert answered == BURST_CONNECTIONS
                wait_for(
                    "Prometheus to see the load sidecar dial again",
                    lambda: (prom.value(load_outbound) or 0) >= 2,
                )

                issued, refused = asyncio.run(asyncio.wait_for(drive_issuance(mesh), 60))
                assert issued == LOAD_BATCHES * BATCH_SIZE
                wait_for(
                    "Prometheus to see the issuance", lambda: prom.value(workload) == base + issued
                )
                time.sleep(1.5)

                # The issuance window: from the last sample at the base to the last sample.
                raw = prom.query(
                    f'trellis_ca_x509_svid_issued_total{{{mesh_ca}, kind="workload"}}[5m]'
                )
                (series,) = raw["data"]["result"]
                samples = [(float(t), float(v)) for t, v in series["values"]]
                start = max(t for t, v in samples if v == base)
                end = samples[-1][0]
                assert samples[-1][1] == base + issued
                window_ms = round((end - start) * 1000)
                # The stray agent is refused on every call: once Prometheus holds its series,
                # one more scrape gives rate() the two samples it needs.
                wait_for(
                    "Prometheus to see the stray agent refused",
                    lambda: prom.value("sum(trellis_agent_upstream_refusals_total)") is not None,
                )
                time.sleep(1.5)

                results: dict[str, list[dict[str, Any]]] = {}
                for title, expr in panels():
                    sent = grafana(expr, RATE_INTERVAL)
                    answer = prom.query(sent)
                    assert answer["status"] == "success", (title, answer)
                    rows = answer["data"]["result"]
                    assert rows, f"panel {title!r} returned no data: {sent}"
                    # A histogram_quantile over no observations in the window is NaN: a row,
                    # but not data. One series of a panel may be NaN (the CA's p99 for agent
                    # SVIDs, none issued in the window), not all of them.
                    values = [float(r["value"][1]) for r in rows]
                    assert any(math.isfinite(v) for v in values), (title, sent, rows)
                    results.setdefault(title, []).extend(rows)
                assert mesh.failed() is None
                assert load.alive(), load.log_tail()
                assert all(other.alive() for other in others)

            # Real traffic crossed both sidecars while Prometheus watched.
            after = {
                (r["metric"]["instance"], r["metric"]["direction"]): float(r["value"][1])
                for r in prom.query(handshakes)["data"]["result"]
            }
            load_admin = f"{host}:{mesh.ports['load_admin']}"
            echo_admin = f"{host}:{mesh.ports['echo_admin']}"
            assert after[load_admin, "outbound"] - before[load_admin, "outbound"] >= 2, after
            assert after[echo_admin, "inbound"] - before[echo_admin, "inbound"] >= 2, after

            def single(title: str) -> float:
                (row,) = results[title]
                return float(row["value"][1])

            def by(title: str, label: str) -> dict[str, float]:
                return {r["metric"][label]: float(r["value"][1]) for r in results[title]}

            share = single("Share of X25519MLKEM768 handshakes")
            assert 0 < share <= 1, share  # the sidecars really negotiate the hybrid group
            p95 = single("Handshake duration p95")
            assert math.isfinite(p95) and 0 < p95 <= 5, p95
            ratio = single("Resumption ratio")
            assert 0 <= ratio <= 1, ratio  # 0 today: no resumption yet, all kind="none"
            versions = by("TLS versions", "version")
            assert versions.get("TLSv1.3", 0) > 0, versions
            suites = by("Cipher suites", "suite")
            assert sum(suites.values()) > 0, suites
            assert all(s.startswith("TLS_AES_") or s.startswith("TLS_CHACHA20_") for s in suites)
            # No 0-RTT exists yet: both outcomes are exported at zero from start-up.
            assert by("Early data outcomes", "outcome") == {"accepted": 0.0, "rejected": 0.0}

            (issuance_expr,) = [e for t, e in panels() if t == ISSUANCE_PANEL]
            answer = prom.query(
                grafana(issuance_expr, f"{window_ms}ms", config.trust_domain.name, CLUSTER),
                time=f"{end:.3f}",
            )
            (row,) = answer["data"]["result"]
            assert row["metric"] == {"trust_domain": config.trust_domain.name, "cluster": CLUSTER}
            per_second = float(row["value"][1])
            assert per_second * window_ms / 1000 == pytest.approx(issued, abs=0.5)

            rejected = prom.value("sum(trellis_ca_requests_rejected_total)")
            assert rejected is not None and rejected >= refused
            reasons = set(by("Rejections by reason", "reason"))
            assert {"entry-not-authorized", "join-token-reused"} <= reasons, reasons

            # The agent and federation panels, fed by the edge CA and its banned node.
            # (Which call is refused first depends on where the agent's loops stand.)
            errors = [r["metric"] for r in results["Upstream fetch errors"]]
            assert any(m["retryable"] == "false" for m in errors), errors
            refusals = [r["metric"] for r in results["Upstream refusals"]]
            assert any(m["reason"] == "permission-denied" for m in refusals), refusals
            outcomes = [r["metric"] for r in results["Federation fetch outcomes"]]
            ok = {"cluster": EDGE_CLUSTER, "federated_trust_domain": PARTNER.name, "outcome": "ok"}
            assert ok in outcomes, outcomes
            (age_row,) = results["Federated bundle age"]
            assert age_row["metric"] == {
                "cluster": EDGE_CLUSTER,
                "federated_trust_domain": "partner.org",
            }
            assert 0 <= float(age_row["value"][1]) < STALE_AFTER, age_row

            # Every rule of trellis-rules.yml evaluated over these series without an error.
            groups = prom.get("/api/v1/rules")["data"]["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"]}
            wanted = {
                r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
            }
            assert set(rules) == wanted
            for name, rule in rules.items():
                assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
            alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
            failing = {
                (a["labels"]["instance"], a["state"])
                for a in alerts
                if a["labels"]["alertname"] == "TrellisAgentFetchErrors"
            }
            assert failing == {(stray_admin, "pending")}, alerts
            stale = [a for a in alerts if a["labels"]["alertname"] == "TrellisFederatedBundleStale"]
            assert stale == [], stale
