"""Every Grafana panel's query against a real Prometheus scraping a running mesh under load.

Processes: the whole mesh of ``trellis up`` started as a library (``trellis.up.mesh``):
``trellis ca serve``, ``trellis agent`` (node ``local``), the demo echo server and three
``trellis sidecar`` processes -- echo's (inbound, admits only load's SPIFFE ID), load's
(an upstream to echo's sidecar) and an "intruder" whose one call at start-up is refused --
each holding an SVID from the agent over the Workload API, echo's also its service's
session-ticket key ring; the echo is declared HTTP on both ends (``declare_http``: the
callers' upstreams say ``protocol: http``, echo's sidecar reads an AccessPolicy document
saying its port speaks HTTP), so safe requests may ride in TLS 0-RTT. Beside it, what the mesh alone
never shows: partner.org's ``trellis ca serve`` (its bundle endpoint only), and example.net's
CA (cluster ``edge``), which federates with partner.org and bans its one node ``stray``
once that node's ``trellis agent`` has attested -- so the agent's refusal and fetch-error
series and the CA's federation series exist. And the operator's admission webhook server
(``mesh_operator.webhook.serve_webhook``, with a certificate from the operator's own
rotation plan), run alone because the operator around it needs a Kubernetes API server that
nothing here provides. Debian's ``prometheus`` runs with its own config and TSDB in a
temporary directory, loads manifests/prometheus/trellis-rules.yml, and scrapes both CAs
that sign (local and edge), the webhook's ``/metrics`` over HTTPS (verifying its
certificate against the webhook CA, for the Service's DNS name), both agents and the three
sidecars' admin ``/metrics`` every second on loopback. Each target carries ``cluster``,
``trust_domain`` and ``namespace`` as target labels, the way the Kubernetes scrape adds
them (manifests/prometheus/prometheus.yml), with ``honor_labels`` so that the CA's own
``cluster``/``trust_domain`` win. Every port is one the kernel picked; every process is
stopped (SIGTERM, then SIGKILL) whatever the test did.

Why the traffic starts only once Prometheus scrapes. A sidecar's ``tls_group_total``,
``tls_version_total`` and ``tls_cipher_suite_total`` series appear at the first handshake
that uses a label value, and ``rate()`` counts no increase into a series' first sample:
handshakes made before Prometheus saw the series would leave those panels at 0/0. So the
mesh starts without its load generator; the intruder's refused call at start-up has already
created the echo sidecar's series; once Prometheus has scraped every target, the test
starts ``trellis demo load`` through the load sidecar (its pool dials echo's sidecar: a
full handshake on both ends, after which echo's sidecar sends session tickets) and then
holds more app connections open at once than one pooled TLS connection takes streams
(100), each writing a GET as it connects, so the load sidecar dials again -- handshakes on
series Prometheus already holds, on both sidecars. That dial is the fresh pooled connection
0-RTT is for: it resumes with a ticket, and the GET of the app connection that made it
dial rides in its early data and is served (``tls_resumption_total{kind="ticket"}``,
``tls_early_data_total{outcome="accepted"}``,
``trellis_sidecar_early_data_requests_total{decision="served"}``, each exported at 0 from
start-up, so ``rate()`` sees the increase).

Meanwhile the test drives a bounded issuance load through the CA's gRPC API with the
node agent's own credentials (read from the agent's data directory: the CA sees the same
node ``local``): X509- and JWT-SVIDs for the load workload's entry, plus refusals (an
unknown entry: ``entry-not-authorized``; the agent's spent join token:
``join-token-reused``). While Prometheus watches, the intruder calls echo again (denied by
echo's policy), a TLS client without a certificate fails two handshakes with echo's sidecar,
and a few more app connections pass through the load sidecar. Then:

* every panel's query returns data: at least one row with a finite value (a quantile over
  an empty window is a NaN row, not data);
* the agent and federation panels return the right kind of data: the stray agent's
  ``permission-denied`` refusals and non-retryable fetch errors, an ``ok`` fetch of
  partner.org and a partner.org bundle younger than the stale alert's 30 minutes;
* every alert rule evaluates without error over these series, and every series an alert
  expression selects exists; the stray agent's failing calls make
  ``TrellisAgentFetchErrors`` pending for it (and for no other agent), and
  ``TrellisFederatedBundleStale`` stays inactive while partner.org's fetches succeed;
* the sidecar TLS panels return the right kind of data: X25519MLKEM768's share of
  handshakes > 0, TLS 1.3 among the versions, a TLS 1.3 cipher suite, a finite positive
  handshake duration p95, handshakes in both directions, and ``certificate_required``
  failures on echo's inbound side;
* the resumption and early-data panels: ticket resumptions, early data accepted and
  HTTP requests served from it, and a resumption ratio strictly between 0 and 1 (the
  first handshakes are full ones);
* the policy, traffic and pooling panels: denials and admissions, a denied share and a
  failure ratio strictly between 0 and 1, bytes both ways, streams ended ``ok``, fewer
  handshakes than app connections, the demo namespace's SVID expiring within the hour;
* the control plane: two CAs, one webhook and two agents answering, the webhook's
  certificate good for 30 days, every job exporting ``trellis_build_info``;
* the template variables list the clusters, trust domains and namespaces the scrape
  labelled, and picking the workloads' namespace empties the CA row;
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
import re
import shutil
import signal
import socket
import ssl
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
from mesh_operator.metrics import WEBHOOKS
from mesh_operator.webhook_certs import plan_rotation, service_dns_names
from trellis.up.identity import create_authorities
from trellis.up.mesh import CLUSTER, Mesh, MeshConfig, probe
from trellis.up.processes import Child, free_ports, spawn

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "manifests" / "grafana" / "trellis-mesh.json"
RULES = REPO / "manifests" / "prometheus" / "trellis-rules.yml"
ISSUANCE_PANEL = "X509-SVID issuance rate by trust domain and cluster"
LOAD_BATCHES, BATCH_SIZE = 6, 10
# More app connections at once than one pooled TLS connection carries streams (the
# sidecar's default max_streams_per_connection is 100): the load sidecar must dial again.
BURST_CONNECTIONS = 110
BURST_BODY = 64  # bytes each burst GET asks the echo server for (GET /bytes/N)
# Grafana's $__rate_interval for these panels: wide enough to hold the whole test.
RATE_INTERVAL = "1m"
SIDECARS = ("load", "echo", "intruder")
PARTNER = TrustDomain("partner.org")
EDGE, EDGE_CLUSTER, BANNED_NODE = TrustDomain("example.net"), "edge", "stray"
# Calls the intruder makes while Prometheus watches, each denied by echo's policy.
DENIALS = 3
# TrellisFederatedBundleStale's threshold (manifests/prometheus/trellis-rules.yml).
STALE_AFTER = 1800
# The namespaces the scrape gives targets: the control plane's, and the demo workloads'
# (their SPIFFE IDs are spiffe://<td>/ns/demo/sa/<name>).
CONTROL_NAMESPACE, WORKLOAD_NAMESPACE = "trellis-system", "demo"
TEMPLATE_MATCHERS = (
    'cluster=~"$cluster"',
    'trust_domain=~"$trust_domain"',
    'namespace=~"$namespace"',
)
# A vector selector: a metric name, then its matchers if any (PromQL keywords, functions
# and label names inside by()/without() are not metric names of ours).
SELECTOR = re.compile(r"\b((?:trellis|tls)_[a-z0-9_]+|up)\b(\{[^}]*\})?")
# The webhook's DNS name, which its certificate carries and Prometheus checks.
WEBHOOK_NAME = "trellis-operator.trellis-system.svc"
# The real webhook server (mesh_operator.webhook.serve_webhook), run alone: the operator
# around it needs a Kubernetes API server, which nothing here provides. Arguments: the
# certificate directory, host, port.
WEBHOOK_MAIN = """
import asyncio, sys
from pathlib import Path
from mesh_operator.injection import InjectorConfig
from mesh_operator.webhook import CertificateFiles, serve_webhook
tls = Path(sys.argv[1])
files = CertificateFiles(tls / "tls.crt", tls / "tls.key")
asyncio.run(serve_webhook(InjectorConfig(), files, host=sys.argv[2], port=int(sys.argv[3])))
"""


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


def grafana(
    expr: str,
    rate_interval: str,
    trust_domain: str = ".*",
    cluster: str = ".*",
    namespace: str = ".*",
) -> str:
    """What Grafana sends for a selection of the template variables ('All' by default)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$trust_domain", trust_domain)
        .replace("$cluster", cluster)
        .replace("$namespace", namespace)
    )


def issuance_expr_of() -> str:
    (expr,) = [e for t, e in panels() if t == ISSUANCE_PANEL]
    return expr


def label_set(row: dict[str, Any]) -> dict[str, str]:
    return row["metric"]  # type: ignore[no-any-return]


def selectors(expr: str) -> list[str]:
    """Every vector selector of ``expr``, with its matchers."""
    return [name + (matchers or "") for name, matchers in SELECTOR.findall(expr)]


def target_labels(trust_domain: str, cluster: str, namespace: str) -> dict[str, str]:
    """What the scrape adds to every target (manifests/prometheus/prometheus.yml's
    relabelling; the Prometheus Operator adds namespace itself)."""
    return {"trust_domain": trust_domain, "cluster": cluster, "namespace": namespace}


def scrape_config(
    jobs: dict[str, list[tuple[str, dict[str, str]]]], rules: Path, webhook_ca: Path | None
) -> dict[str, Any]:
    """Prometheus's configuration: one static target per address, labelled as the
    Kubernetes scrape labels it, and ``honor_labels`` as there (the CA's own cluster and
    trust_domain win over the target's)."""
    configs: list[dict[str, Any]] = []
    for job, targets in jobs.items():
        config: dict[str, Any] = {
            "job_name": job,
            "honor_labels": True,
            "static_configs": [
                {"targets": [address], "labels": labels} for address, labels in targets
            ],
        }
        if job == "trellis-operator":
            assert webhook_ca is not None
            config["scheme"] = "https"
            config["tls_config"] = {"ca_file": str(webhook_ca), "server_name": WEBHOOK_NAME}
        configs.append(config)
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": configs,
    }


@contextlib.contextmanager
def webhook(host: str, directory: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """The operator's webhook server with a certificate from the operator's own plan; its
    address, the CA file that verifies it, and the process."""
    tls = directory / "webhook-tls"
    tls.mkdir(parents=True)
    pki = plan_rotation(
        None,
        dns_names=service_dns_names("trellis-operator", "trellis-system"),
        now=dt.datetime.now(dt.UTC),
    ).pki
    (tls / "tls.crt").write_bytes(pki.tls_crt)
    (tls / "tls.key").write_bytes(pki.tls_key)
    (tls / "ca.crt").write_bytes(pki.ca_bundle)
    (port,) = free_ports(1)
    argv = [sys.executable, "-c", WEBHOOK_MAIN, str(tls), host, str(port)]
    with process(argv, directory / "webhook.log") as proc:
        context = ssl.create_default_context(cafile=tls / "ca.crt")

        def serving() -> bool:
            assert proc.poll() is None, (directory / "webhook.log").read_text()
            with (
                contextlib.suppress(OSError),  # ssl.SSLError included: not serving yet
                socket.create_connection((host, port), 1) as raw,
                context.wrap_socket(raw, server_hostname=WEBHOOK_NAME),
            ):
                return True
            return False

        wait_for("the webhook to serve", serving)
        yield f"{host}:{port}", tls / "ca.crt", proc


def admit_the_example_pod(address: str, ca_file: Path) -> bool:
    """POST manifests/examples/pod.yaml to the webhook's /mutate as the API server would
    (AdmissionReview v1, over HTTPS verified for the Service's name); whether it allowed."""
    obj = yaml.safe_load((REPO / "manifests" / "examples" / "pod.yaml").read_text())
    kind = {"group": "", "version": "v1", "kind": "Pod"}
    resource = {"group": "", "version": "v1", "resource": "pods"}
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b3c6a52-6a5e-4c1b-9a0e-6d1f3f0c2a11",
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "namespace": obj["metadata"]["namespace"],
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": obj,
            "dryRun": False,
        },
    }
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)
    with (
        socket.create_connection((host, int(port)), 5) as raw,
        context.wrap_socket(raw, server_hostname=WEBHOOK_NAME) as tls,
    ):
        body = json.dumps(review).encode()
        tls.sendall(
            b"POST /mutate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (WEBHOOK_NAME.encode(), len(body), body)
        )
        answer = b""
        for _ in range(1000):  # bounded: the webhook answers and closes
            chunk = tls.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return bool(json.loads(payload)["response"]["allowed"])


def fail_a_handshake(host: str, port: int) -> None:
    """A TLS 1.3 client with no certificate: the inbound sidecar requires one (mTLS), so
    the handshake fails on its side with certificate_required (RFC 8446 §4.4.2.4)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), 5) as raw:
        raw.settimeout(5)
        with contextlib.suppress(ssl.SSLError, OSError), context.wrap_socket(raw) as tls:
            # TLS 1.3: the client finishes first; the refusal comes as an alert after.
            tls.recv(1)


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
    """Open ``connections`` app connections through the load sidecar at once, each writing
    a GET as soon as it is connected, and close them only when all were answered; the 200s.

    Written at once, as an HTTP client does: the app connection that makes the pool dial
    has its request waiting in the socket by the time the sidecar decides, so the request
    rides in the new connection's first flight -- TLS 0-RTT when the dial resumes a ticket
    (a GET without a body is replay-safe, RFC 8470)."""
    request = b"GET /bytes/%d HTTP/1.1\r\nHost: echo\r\n\r\n" % BURST_BODY
    answers: list[bool] = []
    everyone = asyncio.Event()

    async def exchange() -> bool:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            status = await reader.readline()
            ok = status.startswith(b"HTTP/1.1 200")
            answers.append(ok)
            if len(answers) == connections:
                everyone.set()
            await everyone.wait()  # every connection open until all were answered
            return ok
        finally:
            writer.close()

    return sum(await asyncio.gather(*(exchange() for _ in range(connections))))


def test_every_panel_returns_data_against_a_running_mesh(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus missing: apt-get install --no-install-recommends prometheus")
    config = MeshConfig(
        svid_ttl=dt.timedelta(hours=1),  # no rotation inside the issuance window
        declare_http=True,  # the burst's GET that dials goes 0-RTT (module docstring)
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
        webhook_address, webhook_ca, _ = stack.enter_context(webhook(host, tmp_path))
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
        td = config.trust_domain.name
        local = target_labels(td, CLUSTER, CONTROL_NAMESPACE)
        edge = target_labels(EDGE.name, EDGE_CLUSTER, CONTROL_NAMESPACE)
        workloads = target_labels(td, CLUSTER, WORKLOAD_NAMESPACE)
        targets = {
            "trellis-ca": [
                (mesh.url("ca_metrics", "").split("//")[1], local),
                (edge_metrics, edge),
            ],
            "trellis-operator": [(webhook_address, local)],
            "trellis-agent": [
                (mesh.url("agent_admin", "").split("//")[1], local),
                (stray_admin, edge),
            ],
            "trellis-sidecar": [
                (mesh.url(f"{name}_admin", "").split("//")[1], workloads) for name in SIDECARS
            ],
        }
        scrape = scrape_config(targets, RULES, webhook_ca)
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
                # That dial resumed with a ticket echo's sidecar sealed under its service's
                # ring, and its first stream's GET went in 0-RTT and was served.
                served = 'sum(trellis_sidecar_early_data_requests_total{decision="served"})'
                wait_for(
                    "Prometheus to see a GET served from early data",
                    lambda: (prom.value(served) or 0) >= 1,
                )

                # Denials Prometheus sees happen: the intruder calls echo again (its deny
                # series exists from start-up, at 1 since its first call was refused).
                denied = 'sum(trellis_sidecar_policy_decisions_total{decision="deny"})'
                denied_before = prom.value(denied) or 0
                for _ in range(DENIALS):
                    assert not probe(host, mesh.ports["intruder_upstream"]).startswith("ADMITTED")
                wait_for(
                    "Prometheus to see the denials",
                    lambda: (prom.value(denied) or 0) >= denied_before + DENIALS,
                )
                # A client without a certificate fails its handshake with echo's sidecar;
                # the failure's series appears with the first, so a second one, once
                # Prometheus holds the series, gives rate() an increase.
                failed = "sum(trellis_sidecar_tls_handshake_failures_total)"
                fail_a_handshake(host, mesh.ports["echo_inbound"])
                wait_for("Prometheus to see a failed handshake", lambda: prom.value(failed))
                fail_a_handshake(host, mesh.ports["echo_inbound"])
                wait_for(
                    "Prometheus to see a second failed handshake",
                    lambda: (prom.value(failed) or 0) >= 2,
                )
                # An admission review, counted by the webhook (its series exist at 0).
                reviewed = 'trellis_operator_admission_reviews_total{webhook="mutate"}'
                assert admit_the_example_pod(webhook_address, webhook_ca)
                wait_for(
                    "Prometheus to see the admission review",
                    lambda: prom.value(f"sum({reviewed})") == 1,
                )
                # The burst's streams created the ok series as they ended: a few more now
                # give the streams panel an increase on it.
                ended = 'sum(trellis_sidecar_streams_total{direction="outbound", outcome="ok"})'
                ended_before = prom.value(ended) or 0
                again = asyncio.run(
                    asyncio.wait_for(burst(host, mesh.ports["load_upstream"], 5), 30)
                )
                assert again == 5
                wait_for(
                    "Prometheus to see the streams end",
                    lambda: (prom.value(ended) or 0) >= ended_before + 5,
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
            versions = by("TLS versions", "version")
            assert versions.get("TLSv1.3", 0) > 0, versions
            suites = by("Cipher suites", "suite")
            assert sum(suites.values()) > 0, suites
            assert all(s.startswith("TLS_AES_") or s.startswith("TLS_CHACHA20_") for s in suites)
            # Resumption and 0-RTT, from the burst's dial: resumed with a ticket of this
            # mesh, its GET accepted in early data and served. Every kind, outcome and
            # decision is exported from start-up; the first handshakes are full ones, so
            # the ratio stays below 1.
            ratio = single("Resumption ratio")
            assert 0 < ratio < 1, ratio
            kinds = by("Handshakes by resumption kind", "kind")
            assert set(kinds) == {"psk", "ticket", "none"}, kinds
            assert kinds["ticket"] > 0 and kinds["none"] > 0 and kinds["psk"] == 0, kinds
            early = by("Early data by outcome", "outcome")
            assert set(early) == {"accepted", "rejected"} and early["accepted"] > 0, early
            decided = by("HTTP requests in early data", "decision")
            assert set(decided) == {"served", "too_early"} and decided["served"] > 0, decided
            # ECH: the agent hands echo's sidecar its keys and the load sidecar echo's
            # config, so the load's dials are accepted by echo's sidecar (RFC 9849).
            ech = by("Encrypted ClientHello by outcome", "outcome")
            assert set(ech) == {"accepted", "rejected", "grease"} and ech["accepted"] > 0, ech

            # Policy, handshakes, traffic, pooling and identity of the sidecars.
            decisions = by("Policy decisions by outcome", "decision")
            assert decisions["deny"] > 0 and decisions["allow"] > 0, decisions
            assert 0 < single("Denied share of inbound decisions") < 1
            failures = {
                (r["metric"]["direction"], r["metric"]["reason"]): float(r["value"][1])
                for r in results["Handshake failures by reason"]
            }
            # RFC 8446 §4.4.2.4: a server requiring a certificate answers an empty one so.
            assert failures[("inbound", "certificate_required")] > 0, failures
            assert 0 < single("Handshake failure ratio") < 1
            rates = by("Handshake rate by direction", "direction")
            assert rates["inbound"] > 0 and rates["outbound"] > 0, rates
            carried = by("Application bytes", "direction")
            assert carried["in"] > 0 and carried["out"] > 0, carried
            streams = {
                (r["metric"]["direction"], r["metric"]["outcome"]): float(r["value"][1])
                for r in results["Streams by outcome"]
            }
            assert streams[("outbound", "ok")] > 0, streams
            # Pooling: far fewer handshakes than app connections (110 at once took two).
            assert 0 < single("Handshakes per app connection") < 1
            (expiry,) = results["Sidecar SVID expiry"]
            assert expiry["metric"] == {"namespace": WORKLOAD_NAMESPACE}, expiry
            assert 0 < float(expiry["value"][1]) <= 3600, expiry  # the mesh's SVIDs: 1 h
            assert by("Passthrough to destinations outside the mesh", "outcome") == {
                "forwarded": 0.0,
                "refused": 0.0,
                "unreachable": 0.0,
            }  # the demo mesh has no transparent redirect: exported at 0 from start-up

            # The control plane, the operator's webhook among it.
            answering = by("Control plane targets answering", "job")
            assert answering == {"trellis-ca": 2, "trellis-operator": 1, "trellis-agent": 2}
            (certificate,) = results["Webhook certificate expiry"]
            days = float(certificate["value"][1]) / 86400
            assert 29 < days <= 30, days  # the operator's serving certificate: 30 days
            reviews = {
                (r["metric"]["webhook"], r["metric"]["allowed"]): float(r["value"][1])
                for r in results["Admission reviews"]
            }
            builds = {m["job"] for m in map(label_set, results["Builds running"])}
            assert builds == set(targets), builds  # every process exports trellis_build_info
            # Every webhook and outcome, exported from start-up; the one review allowed.
            assert set(reviews) == {(w, a) for w in WEBHOOKS for a in ("true", "false")}
            assert {k for k, v in reviews.items() if v > 0} == {("mutate", "true")}, reviews

            # The template variables: each lists what the scrape labelled, and selecting a
            # namespace filters the CA row (its targets are in the control plane's).
            for variable, values in (
                ("cluster", {CLUSTER, EDGE_CLUSTER}),
                ("trust_domain", {td, EDGE.name}),
                ("namespace", {CONTROL_NAMESPACE, WORKLOAD_NAMESPACE}),
            ):
                listed = prom.get(
                    f"/api/v1/label/{variable}/values", **{"match[]": 'up{job=~"trellis-.*"}'}
                )["data"]
                assert set(listed) == values, (variable, listed)
            for namespace, wanted in ((WORKLOAD_NAMESPACE, False), (CONTROL_NAMESPACE, True)):
                chosen = grafana(issuance_expr_of(), RATE_INTERVAL, namespace=namespace)
                assert bool(prom.query(chosen)["data"]["result"]) is wanted, chosen

            issuance_expr = issuance_expr_of()
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
            # ... and every series an alert reads exists here: no rule waits on a metric,
            # a label or a job that no process exports.
            for group in yaml.safe_load(RULES.read_text())["groups"]:
                for rule in group["rules"]:
                    for selector in selectors(rule["expr"]):
                        found = prom.query(f"count({selector})")["data"]["result"]
                        assert found, (rule["alert"], selector)
            alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
            failing = {
                (a["labels"]["instance"], a["state"])
                for a in alerts
                if a["labels"]["alertname"] == "TrellisAgentFetchErrors"
            }
            assert failing == {(stray_admin, "pending")}, alerts
            stale = [a for a in alerts if a["labels"]["alertname"] == "TrellisFederatedBundleStale"]
            assert stale == [], stale


def test_every_panel_query_filters_on_cluster_trust_domain_and_namespace() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} has no query"
    for title, expr in panels():
        found = selectors(expr)
        assert found, (title, expr)
        for selector in found:
            for matcher in TEMPLATE_MATCHERS:
                assert matcher in selector, f"panel {title!r}: {selector} lacks {matcher}"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"cluster", "trust_domain", "namespace"} <= variables


def test_the_resumption_and_early_data_panels_graph_the_contract_counters() -> None:
    """Session resumption and 0-RTT exist now: the dashboard graphs their public counters
    (and the inbound sidecar's 425 decisions), each panel by its own metric."""
    graphed = {title: expr for title, expr in panels()}
    assert "tls_resumption_total{" in graphed["Resumption ratio"]
    assert 'kind!="none"' in graphed["Resumption ratio"]
    assert "by (kind)" in graphed["Handshakes by resumption kind"]
    assert "tls_early_data_total{" in graphed["Early data by outcome"]
    assert "by (outcome)" in graphed["Early data by outcome"]
    assert "trellis_sidecar_early_data_requests_total{" in graphed["HTTP requests in early data"]


def test_the_ech_panel_graphs_the_contract_counter_by_outcome() -> None:
    graphed = {title: expr for title, expr in panels()}
    expr = graphed["Encrypted ClientHello by outcome"]
    assert "tls_ech_total{" in expr and "by (outcome)" in expr


def test_numbers_with_a_meaning_carry_the_thresholds_their_alerts_use() -> None:
    day = 86400
    wanted = {
        "CA and intermediate expiry": [None, 2 * day, 7 * day],
        "Webhook certificate expiry": [None, day, 7 * day],
        "SVID expiry horizon": [None, 600],
        "Sidecar SVID expiry": [None, 600],
        "Federated bundle age": [None, STALE_AFTER],
        "Denied share of inbound decisions": [None, 0.1],
        "Handshake failure ratio": [None, 0.05],
        "Control plane targets answering": [None, 1],
    }
    dashboard = json.loads(DASHBOARD.read_text())
    found = {
        p["title"]: [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
        for p in dashboard["panels"]
        if "thresholds" in p.get("fieldConfig", {}).get("defaults", {})
    }
    assert found == wanted
    rules = RULES.read_text()
    for number in ("7 * 86400", "2 * 86400", "< 600", "> 1800", "0.1 * sum", "0.05 * ("):
        assert number in rules, number
