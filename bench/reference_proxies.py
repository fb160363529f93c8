"""Reference proxy pairs for bench/mesh.py: the hop a user would build without Trellis.

Only HAProxy runs here. ghostunnel (Go, Workload API aware) was the other candidate, but
the Go module proxy refuses it: ``go list -m -versions github.com/ghostunnel/ghostunnel``
answers "403 Forbidden ... This module version is not available" (checked 2026-12-07), and
no distribution package carries it, so ``GHOSTUNNEL`` records why it is absent.

``HaproxyPair`` is two HAProxy processes (Debian's package, 2.6, on the system OpenSSL 3.0)
in the places of the two sidecars: a client-side one that takes the app's plaintext
HTTP/1.1 and forwards it over mutual TLS with ALPN ``h2`` and ``http-reuse always`` (so
requests share pooled HTTP/2 connections, as the sidecars' CONNECT streams do), and a
server-side one that requires a client certificate and hands requests to the echo server.
Both present X509-SVIDs (leaf + intermediate) from a root made here, and verify the peer's
chain against it. HAProxy 2.6 has no sample fetch for a URI SAN, so unlike the sidecars
neither side checks the peer's SPIFFE ID: the chain is the whole of its authorisation.
Each runs one thread (``nbthread 1``), like each sidecar's one event loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ca import KeyAlgorithm, RootAuthority, TrustDomain, generate_private_key
from trellis.up.processes import free_ports

GHOSTUNNEL = {
    "measured": False,
    "reason": "github.com/ghostunnel/ghostunnel is not served by the Go module proxy"
    " (403 Forbidden on its version list, checked 2026-12-07); HAProxy alone stands in",
}

CONFIG_HEAD = """\
global
    nbthread 1
    maxconn 4096
    log stderr format short local0 warning

defaults
    mode http
    log global
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    http-reuse always
"""

CLIENT_SIDE = """\
frontend app
    bind {host}:{app_port}
    default_backend mesh

backend mesh
    # ALPN h2: one pooled HTTP/2 connection carries many app connections' requests.
    server peer {host}:{tls_port} ssl crt {crt} ca-file {ca} verify required alpn h2
"""

SERVER_SIDE = """\
frontend mtls
    bind {host}:{tls_port} ssl crt {crt} ca-file {ca} verify required alpn h2,http/1.1
    default_backend echo

backend echo
    server echo {echo_host}:{echo_port}
"""


def haproxy_binary() -> str:
    binary = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None
    )
    if binary is None:
        raise SystemExit(
            "mesh.py: haproxy is missing (apt-get install -y --no-install-recommends haproxy),"
            " or run with --no-reference"
        )
    return binary


def haproxy_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.removeprefix("HAProxy version ").split(" ")[0] or "unknown"


def _write_identity(directory: Path) -> tuple[Path, Path, Path]:
    """A root, an intermediate and two SVIDs; returns (client crt, server crt, root)."""
    now = dt.datetime.now(dt.UTC)
    root = RootAuthority.create(TrustDomain("haproxy.bench"), now=now)
    intermediate = root.issue_intermediate("bench", now=now)
    paths = []
    for name in ("client", "server"):
        key = generate_private_key(KeyAlgorithm.P256)
        svid = intermediate.issue_x509_svid(
            f"spiffe://haproxy.bench/ns/bench/sa/{name}", key.public_key(), now=now
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = directory / f"{name}.pem"  # HAProxy's crt: the chain, then the key
        path.touch(mode=0o600)
        path.write_bytes(svid.chain_pem() + key_pem)
        paths.append(path)
    ca = directory / "root.pem"
    ca.write_bytes(root.certificate.public_bytes(serialization.Encoding.PEM))
    return paths[0], paths[1], ca


def _wait_listening(host: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mesh.py: haproxy exited: {_last_line(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise SystemExit(f"mesh.py: haproxy not listening on {host}:{port} within 20 s")


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


@dataclass
class HaproxyPair:
    """Two running HAProxy processes between the load generator and ``echo``."""

    address: tuple[str, int]
    pids: dict[str, int]
    version: str


@contextlib.contextmanager
def haproxy_pair(echo: tuple[str, int], directory: Path) -> Iterator[HaproxyPair]:
    binary = haproxy_binary()
    host = "127.0.0.1"
    client_crt, server_crt, ca = _write_identity(directory)
    app_port, tls_port = free_ports(2)
    configs = {
        "haproxy-client": CONFIG_HEAD
        + CLIENT_SIDE.format(
            host=host, app_port=app_port, tls_port=tls_port, crt=client_crt, ca=ca
        ),
        "haproxy-server": CONFIG_HEAD
        + SERVER_SIDE.format(
            host=host,
            tls_port=tls_port,
            crt=server_crt,
            ca=ca,
            echo_host=echo[0],
            echo_port=echo[1],
        ),
    }
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, text in configs.items():
            config = directory / f"{name}.cfg"
            config.write_text(text)
            check = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True)
            if check.returncode != 0:
                reason = (check.stderr or check.stdout).decode(errors="replace").strip()
                raise SystemExit(f"mesh.py: {name} config refused: {reason.splitlines()[-1]}")
            log = directory / f"{name}.log"
            with log.open("wb") as sink:
                # -db: stay in the foreground, one process (no master-worker, no daemon).
                processes[name] = subprocess.Popen(
                    [binary, "-db", "-f", str(config)], stdout=sink, stderr=sink
                )
        _wait_listening(
            host, tls_port, processes["haproxy-server"], directory / "haproxy-server.log"
        )
        _wait_listening(
            host, app_port, processes["haproxy-client"], directory / "haproxy-client.log"
        )
        yield HaproxyPair(
            address=(host, app_port),
            pids={name: p.pid for name, p in processes.items()},
            version=haproxy_version(binary),
        )
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
