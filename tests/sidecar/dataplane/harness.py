"""Real processes on loopback: SVID files, `trellis sidecar` processes, an echo app.

Every process started here is registered with a `Procs` that the fixtures stop (SIGTERM,
then SIGKILL) whatever the test did; every wait is bounded.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca import RootAuthority, TrustDomain
from tests.support import free_port, wait_for

REPO = Path(__file__).resolve().parents[3]
ECHO = Path(__file__).resolve().parent / "echo_app.py"


class Pki:
    """A trust domain's root + intermediate writing svid.pem/svid.key/bundle.pem dirs."""

    def __init__(self, trust_domain: str = "example.org") -> None:
        now = dt.datetime.now(dt.UTC)
        self.trust_domain = trust_domain
        self.root = RootAuthority.create(TrustDomain(trust_domain), now=now)
        self.intermediate = self.root.issue_intermediate("test", now=now)

    def write(
        self,
        directory: Path,
        spiffe_id: str,
        extra_roots: Sequence[Any] = (),
        ttl: dt.timedelta | None = None,
    ) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        svid = (
            self.intermediate.issue_x509_svid(spiffe_id, key.public_key(), now=now)
            if ttl is None
            else self.intermediate.issue_x509_svid(spiffe_id, key.public_key(), now=now, ttl=ttl)
        )
        (directory / "svid.pem").write_bytes(svid.chain_pem())
        (directory / "svid.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        roots = [self.root.certificate, *extra_roots]
        (directory / "bundle.pem").write_bytes(
            b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)
        )
        return directory


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Procs:
    workdir: Path
    running: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], **kwargs: Any) -> Proc:
        log = self.workdir / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            list(argv), stdout=handle, stderr=subprocess.STDOUT, env=env(), **kwargs
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)
        return int(proc.popen.returncode)

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            self.stop(proc)
        self.running.clear()


@dataclass
class Sidecar:
    proc: Proc
    admin_port: int
    inbound_port: int
    config: dict[str, Any]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def describe(self) -> dict[str, Any]:
        status, text = self.get("/config")
        assert status == 200
        return dict(json.loads(text))

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"sidecar exited: {self.proc.output()}")
            try:
                return self.get("/readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, f"sidecar {self.proc.name} ready")


def start_sidecar(
    procs: Procs,
    name: str,
    config: dict[str, Any],
    *,
    extra_args: Sequence[str] = (),
    wait: bool = True,
    **kwargs: Any,
) -> Sidecar:
    config = dict(config)
    config.setdefault("admin", f"127.0.0.1:{free_port()}")
    admin_port = int(str(config["admin"]).rpartition(":")[2])
    inbound = dict(config.get("inbound") or {})
    inbound.setdefault("listen", f"127.0.0.1:{free_port()}")
    config["inbound"] = inbound
    path = procs.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "trellis", "sidecar", "--config", str(path), *extra_args]
    proc = procs.start(name, argv, **kwargs)
    inbound_port = int(str(inbound["listen"]).rpartition(":")[2])
    sidecar = Sidecar(proc, admin_port, inbound_port, config)
    if wait:
        sidecar.wait_ready()
    return sidecar


def start_echo(procs: Procs, port: int | None = None, name: str = "echo") -> int:
    port = port or free_port()
    procs.start(name, [sys.executable, str(ECHO), str(port)])

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, 15, "echo app")
    return port


def roundtrip(port: int, payload: bytes, timeout: float = 30) -> bytes:
    """Send `payload`, half-close, read until EOF: what the echo app sent back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(payload)
        received = bytearray()
        sock.setblocking(True)
        # Interleave sends and receives so neither side's buffers fill (large payloads).
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        sent_eof = False
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"roundtrip: {len(received)}/{len(payload)} bytes back")
            for _key, events in sel.select(timeout=1):
                if events & selectors.EVENT_WRITE and not sent_eof:
                    if view:
                        n = sock.send(view[: 1 << 20])
                        view = view[n:]
                    if not view:
                        sock.shutdown(socket.SHUT_WR)
                        sent_eof = True
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        sel.close()
                        return bytes(received)
                    received += chunk


@dataclass
class Pair:
    """client app → sidecar A (upstream port) → sidecar B → echo app."""

    a: Sidecar
    b: Sidecar
    upstream_port: int
    echo_port: int


def start_pair(
    procs: Procs,
    pki: Pki,
    *,
    client_id: str,
    server_id: str,
    allow: list[dict[str, str]] | None,
    client_pki: Pki | None = None,
    client_extra_roots: Sequence[Any] = (),
    pool: dict[str, Any] | None = None,
    wait_client: bool = True,
) -> Pair:
    workdir = procs.workdir
    echo = start_echo(procs)
    target: dict[str, Any] = {"app": f"127.0.0.1:{echo}"}
    if allow is not None:
        target["allow"] = allow
    b_dir = pki.write(workdir / "svid-b", server_id)
    b = start_sidecar(
        procs,
        "sidecar-b",
        {"svid_dir": str(b_dir), "inbound": {"targets": {8080: target}}},
        extra_args=["--log-level", "info"],
    )
    a_dir = (client_pki or pki).write(workdir / "svid-a", client_id, client_extra_roots)
    upstream = free_port()
    config: dict[str, Any] = {
        "svid_dir": str(a_dir),
        "upstreams": [
            {
                "name": "echo",
                "listen": f"127.0.0.1:{upstream}",
                "target": "echo.default:8080",
                "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                "spiffe_ids": [server_id],
            }
        ],
    }
    if pool:
        config["pool"] = pool
    a = start_sidecar(
        procs, "sidecar-a", config, extra_args=["--log-level", "info"], wait=wait_client
    )
    return Pair(a, b, upstream, echo)


class RawClient:
    """A blocking mTLS + HTTP/2 client (the Trellis engine and h2 on a plain socket), for
    sending what a well-behaved sidecar never would."""

    def __init__(self, port: int, svid_dir: Path, host: str = "127.0.0.1") -> None:
        import h2.config
        import h2.connection

        from sidecar.identity import Identity, load_svid_dir
        from sidecar.tls import ClientConnection

        identity = Identity()
        identity.update(*load_svid_dir(svid_dir))
        self.sock = socket.create_connection((host, port), timeout=10)
        self.tls = ClientConnection(identity.client_config(()), server_name=None, now=time.time())
        self.sock.sendall(self.tls.data_to_send())
        while not self.tls.handshake_complete:
            self._pump()
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.flush()
        self.events: list[Any] = []

    def _pump(self) -> list[bytes]:
        data = self.sock.recv(1 << 16)
        self.tls.receive_data(data, now=time.time())
        out = self.tls.data_to_send()
        if out:
            self.sock.sendall(out)
        from sidecar.tls import ApplicationData

        if not data:
            raise ConnectionResetError("peer closed")
        return [e.data for e in self.tls.events() if isinstance(e, ApplicationData)]

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.send_plaintext(data)

    def send_plaintext(self, data: bytes) -> None:
        self.tls.send_application_data(data)
        self.sock.sendall(self.tls.data_to_send())

    def receive_events(self) -> list[Any]:
        events = []
        for chunk in self._pump():
            events.extend(self.h2.receive_data(chunk))
        self.flush()
        return events

    def request(self, headers: list[tuple[str, str]], timeout: float = 10) -> int:
        import h2.events

        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers)
        self.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.receive_events():
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    return int(dict(event.headers)[b":status"])
                if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
                    return -int(event.error_code)
        raise TimeoutError("no response")

    def close(self) -> None:
        self.sock.close()
