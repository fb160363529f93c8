"""The whole mesh on one machine, as real processes in a private run directory.

Start order, each step waiting for the previous one to say it is ready:

1. the ephemeral authorities (``identity.create_authorities``): root in memory only;
2. ``trellis ca serve`` with the entries, and a join token for node ``local`` made here
   (only its hash in the CA directory, the token in a 0600 file: never argv or a log);
3. ``trellis agent``, attesting with that token (``--join-token-file``);
4. ``trellis demo echo`` (plaintext, loopback only);
5. the sidecars, started together, each from its own interpreter copy and, when
   ``trellis up`` runs as root, under its workload's own uid, which the echo server and
   the load generator share with their sidecars, so the agent tells them apart by uid
   and path (see ``identity`` and ``users``): echo's (inbound: admits only the load
   generator's SPIFFE ID), load's (one explicit upstream: the echo sidecar, which must
   present the echo ID) and, unless ``probe_policy`` is off, an "intruder" configured
   like load's but with an identity the policy does not admit; once all are ready the
   intruder's upstream is called once (``probe``) and what happened is kept for the
   status;
6. ``trellis demo load`` against the load sidecar's upstream port (unless the caller,
   like ``bench/mesh.py``, drives the traffic itself).

``stop`` undoes all of it in reverse and removes the run directory, whatever state the
start reached.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from ca.keys import write_private_file
from ca.server.tokens import JoinTokenStore
from ca.spiffeid import SpiffeId, TrustDomain
from meshapi.policy import API_VERSION as POLICY_API_VERSION
from meshapi.policy import KIND as POLICY_KIND
from trellis.up.identity import (
    Workload,
    base_interpreter,
    create_authorities,
    workload_executable,
    write_entries,
)
from trellis.up.processes import Child, StartupError, free_ports, spawn
from trellis.up.status import SidecarInfo, StatusView
from trellis.up.users import Isolation, hand_over, plan_isolation

__all__ = ["Mesh", "MeshConfig", "StartupError"]

CLUSTER = "local"
NODE = "local"
# The Unix socket's path must fit sockaddr_un.sun_path (108 bytes with the terminator).
_MAX_SOCKET_PATH = 107
_PORT_NAMES = (
    "ca",
    "ca_attest",
    "ca_metrics",
    "agent_admin",
    "echo",
    "echo_admin",
    "echo_inbound",
    "load_admin",
    "load_inbound",
    "load_upstream",
    "load_metrics",
    "intruder_admin",
    "intruder_inbound",
    "intruder_upstream",
)
ECHO_TARGET_PORT = 8080  # the port behind the echo sidecar that the CONNECT names
POLICY_FILE = "policy.json"  # echo's AccessPolicy document, with `declare_http`
CA_ADMIN_SOCKET = "ca.sock"  # in the run directory; shorter than agent.sock, checked below


@dataclass(frozen=True, slots=True)
class MeshConfig:
    trust_domain: TrustDomain = field(default_factory=lambda: TrustDomain("example.org"))
    svid_ttl: dt.timedelta = dt.timedelta(minutes=1)
    base_dir: Path | None = None  # where the private run directory goes (default: $TMPDIR)
    port_base: int = 0  # 0: ports the kernel picks
    host: str = "127.0.0.1"
    rate: float = 50.0
    connections: int = 4
    size: int = 1024
    start_load: bool = True
    # A third sidecar, "intruder", calls the echo server once: its refusal shows the policy.
    probe_policy: bool = True
    startup_timeout: float = 60.0
    # --log-format/--log-level for the children (ca serve, agent, sidecars, demo services).
    log_args: tuple[str, ...] = ()
    # An ML-DSA-65 root, intermediate and workload keys (FIPS 204) instead of ECDSA.
    pq_signatures: bool = False
    # The echo app declared HTTP on both ends: the callers' upstream says `protocol: http`
    # and echo's sidecar reads an AccessPolicy document saying port 8080 speaks HTTP. A
    # GET, HEAD or OPTIONS that makes a caller's pool dial then rides in TLS 0-RTT on the
    # resumed connection (sidecar.earlydata, RFC 8470), and a refusal reaches the caller's
    # app as an HTTP 403 naming the policy. Off: the echo speaks TCP as far as the mesh
    # knows, and its refusals are named by its YAML allow list alone.
    declare_http: bool = False

    def spiffe_id(self, name: str) -> SpiffeId:
        return SpiffeId(f"spiffe://{self.trust_domain.name}/ns/demo/sa/{name}")


class Mesh:
    def __init__(self, config: MeshConfig, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._progress = progress or (lambda line: None)
        self.run_dir: Path | None = None
        self.children: dict[str, Child] = {}
        self.ports: dict[str, int] = {}
        self.workloads: dict[str, Workload] = {}
        self.stopped: dict[str, int] = {}  # exit statuses of every child stopped so far
        self.removed: Path | None = None  # the run directory, once deleted
        self.policy_probe: str | None = None  # what became of the intruder's call
        self.isolation: Isolation | None = None  # the workloads' uids (see ``users``)
        self._app_executable: Path | None = None  # the apps' interpreter, when not ours

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Mesh:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> dict[str, int]:
        """Stop every child (reverse order) and delete the run directory; exit statuses."""
        statuses = {}
        for name in reversed(list(self.children)):
            statuses[name] = self.children[name].stop()
        self.children.clear()
        self.stopped.update(statuses)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.removed = self.run_dir
            self.run_dir = None
        return statuses

    # -- what the status and the bench read ------------------------------------------------

    def url(self, port_name: str, path: str = "/metrics") -> str:
        return f"http://{self.config.host}:{self.ports[port_name]}{path}"

    @property
    def upstream(self) -> tuple[str, int]:
        """Where the client app dials to reach the echo server through both sidecars."""
        return self.config.host, self.ports["load_upstream"]

    @property
    def echo(self) -> tuple[str, int]:
        """The echo server itself (no sidecar): the baseline."""
        return self.config.host, self.ports["echo"]

    def status_view(self) -> StatusView:
        metrics = {
            "ca": self.url("ca_metrics"),
            "agent": self.url("agent_admin"),
            "sidecar-load": self.url("load_admin"),
            "sidecar-echo": self.url("echo_admin"),
        }
        if "sidecar-intruder" in self.children:
            metrics["sidecar-intruder"] = self.url("intruder_admin")
        metrics["echo"] = self.url("echo")
        if "load" in self.children:
            metrics["load"] = self.url("load_metrics")
        return StatusView(
            trust_domain=self.config.trust_domain.name,
            run_dir=str(self.run_dir),
            metrics=metrics,
            sidecars=tuple(
                SidecarInfo(
                    name, str(self.workloads[name].spiffe_id), self.url(f"{name}_admin", "")
                )
                for name in self._sidecar_names()
            ),
            policy_probe=self.policy_probe,
            isolation=self.isolation.note if self.isolation is not None else None,
            ca_admin_socket=str(self.run_dir / CA_ADMIN_SOCKET) if self.run_dir else None,
            agent_admin=f"{self.config.host}:{self.ports['agent_admin']}",
        )

    def _sidecar_names(self) -> tuple[str, ...]:
        return ("load", "echo", "intruder") if self.config.probe_policy else ("load", "echo")

    def pid(self, name: str) -> int:
        return self.children[name].pid

    def failed(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children.values() if not c.alive()), None)

    # -- start-up ------------------------------------------------------------------------

    def _start(self) -> None:
        config = self.config
        base = config.base_dir
        if base is not None and not base.is_dir():
            raise StartupError(f"--base-dir {base} is not a directory")
        if base is None and len(tempfile.gettempdir().encode()) > _MAX_SOCKET_PATH - 40:
            base = Path("/tmp")  # noqa: S108 ($TMPDIR too deep for a socket; mkdtemp is 0700)
        for stale in remove_stale_run_dirs(Path(base or tempfile.gettempdir())):
            self._progress(f"removed {stale}, left by a trellis up that was killed")
        run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=base)).resolve()
        self.run_dir = run_dir  # mkdtemp: mode 0700, so everything below is private
        (run_dir / OWNER_FILE).touch(mode=0o600)
        (run_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        socket_path = run_dir / "agent.sock"
        if len(str(socket_path).encode()) > _MAX_SOCKET_PATH:
            raise StartupError(
                f"the run directory {run_dir} is too deep for a Unix socket path;"
                " choose a shorter --base-dir"
            )
        names = self._sidecar_names()
        isolation = self.isolation = plan_isolation(names, base_interpreter(), run_dir)
        self._progress(isolation.note)
        for private in ("logs", "tmp", "ca"):
            (run_dir / private).mkdir(mode=0o700)
        (run_dir / "workloads").mkdir(mode=0o700)
        if isolation.uids:
            # The workloads' uids may enter (to reach the agent's socket and their own
            # directories) but not list it; all else in it stays 0700 / 0600.
            run_dir.chmod(0o711)
            (run_dir / "workloads").chmod(0o711)
        self.ports = dict(
            zip(_PORT_NAMES, free_ports(len(_PORT_NAMES), config.port_base), strict=True)
        )
        host, ports, timeout = config.host, self.ports, config.startup_timeout

        root_cert = create_authorities(
            run_dir / "ca", config.trust_domain, CLUSTER, pq_signatures=config.pq_signatures
        )
        self._progress(
            f"root and cluster intermediate for {config.trust_domain.name} created"
            f" (root key in memory only, dropped), run dir {run_dir}"
        )
        for name in names:
            directory = run_dir / "workloads" / name
            executable = workload_executable(
                directory, f"trellis-sidecar-{name}", isolation.interpreter
            )
            (directory / "tmp").mkdir(mode=0o700)
            uid = isolation.uid(name)
            if uid is not None:
                hand_over([directory], uid)  # its interpreter copy, TMPDIR and config
                directory.chmod(0o700)
            self.workloads[name] = Workload(
                name, config.spiffe_id(name), executable, isolation.entry_uid(name)
            )
        if isolation.uids:
            # The apps cannot run from this interpreter, which another uid may not reach;
            # they get a copy of their own, whose path no entry names.
            apps = run_dir / "workloads" / "apps"
            self._app_executable = workload_executable(apps, "trellis-app", isolation.interpreter)
            apps.chmod(0o755)
            (apps / "bin").chmod(0o755)
        entries = run_dir / "entries.yaml"
        write_entries(entries, list(self.workloads.values()), node=NODE, ttl=config.svid_ttl)

        ca = self._spawn(
            "ca",
            [
                "ca", "serve", "--dir", str(run_dir / "ca"), "--cluster", CLUSTER,
                "--listen", f"{host}:{ports['ca']}",
                "--attest-listen", f"{host}:{ports['ca_attest']}",
                "--bundle-listen", "off",
                "--metrics-listen", f"{host}:{ports['ca_metrics']}",
                "--admin-socket", str(run_dir / CA_ADMIN_SOCKET),
                "--entries", str(entries), "--poll-interval", "1",
            ],
        )  # fmt: skip
        token, _ = JoinTokenStore(run_dir / "ca" / "clusters" / CLUSTER).create(NODE, ttl=300)
        token_file = run_dir / "join-token"
        write_private_file(token_file, token.encode())
        ready = ca.wait_event("ready", timeout)
        self._progress(
            f"CA server (pid {ca.pid}) serving on {ready.get('listen')},"
            f" admin socket {run_dir / CA_ADMIN_SOCKET}"
        )

        agent = self._spawn(
            "agent",
            [
                "agent", "--socket", str(socket_path), "--node", NODE,
                "--ca", f"{host}:{ports['ca']}", "--ca-attest", f"{host}:{ports['ca_attest']}",
                "--trust-bundle", str(root_cert), "--join-token-file", str(token_file),
                "--data-dir", str(run_dir / "agent"),
                "--admin", f"{host}:{ports['agent_admin']}",
                "--sync-interval", "1s", "--backoff-cap", "2s",
            ],
        )  # fmt: skip
        # The echo server needs nothing from the others: it starts while the agent attests.
        echo = self._spawn(
            "echo", ["demo", "echo", "--listen", f"{host}:{ports['echo']}"], workload="echo"
        )
        agent.wait_until(
            lambda: _http_ok(self.url("agent_admin", "/readyz")), "ready (first sync)", timeout
        )
        self._progress(
            f"agent (pid {agent.pid}) attested as node {NODE!r}, Workload API ready,"
            f" admin {host}:{ports['agent_admin']}"
        )
        echo.wait_event("ready", timeout)
        self._progress(f"echo server (pid {echo.pid}) on {host}:{ports['echo']}")

        env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{socket_path}"}
        for name in self._sidecar_names():  # started together, then awaited: faster
            directory = run_dir / "workloads" / name
            path = directory / "sidecar.yaml"
            path.touch(mode=0o600)
            path.write_text(
                yaml.safe_dump(self._sidecar_config(name, socket_path), sort_keys=False)
            )
            files = [path]
            if name == "echo" and config.declare_http:
                policy = directory / POLICY_FILE
                policy.touch(mode=0o600)
                policy.write_text(json.dumps(self._echo_policy(), indent=2) + "\n")
                files.append(policy)
            uid = isolation.uid(name)
            if uid is not None:
                hand_over(files, uid)
            self._spawn(
                f"sidecar-{name}",
                sidecar_argv(path),
                env=env,
                executable=self.workloads[name].executable,
                workload=name,
            )
        for name in self._sidecar_names():
            self.children[f"sidecar-{name}"].wait_until(
                lambda name=name: _http_ok(self.url(f"{name}_admin", "/readyz")),  # type: ignore[misc]
                "ready (holding an SVID)",
                timeout,
            )
            sidecar = self.children[f"sidecar-{name}"]
            self._progress(
                f"sidecar for {name} (pid {sidecar.pid}) ready as {self.workloads[name].spiffe_id}"
            )
        if config.probe_policy:
            self.policy_probe = probe(host, ports["intruder_upstream"])

        if config.start_load:
            load = self._spawn(
                "load",
                [
                    "demo", "load", "--target", f"{host}:{ports['load_upstream']}",
                    "--rate", str(config.rate), "--connections", str(config.connections),
                    "--size", str(config.size),
                    "--metrics-listen", f"{host}:{ports['load_metrics']}",
                ],
                workload="load",
            )  # fmt: skip
            load.wait_event("ready", timeout)
            self._progress(f"load generator (pid {load.pid}) sending {config.rate:g} req/s")

    def _spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        executable: Path | None = None,
        workload: str | None = None,
    ) -> Child:
        """Start a child; one of ``workload``'s runs as its uid, with its own TMPDIR."""
        assert self.run_dir is not None
        # Whatever temporary files or sockets a child makes land in the run dir, which is
        # short enough for socket paths and removed at the end.
        tmp = self.run_dir / "tmp"
        user = None
        if workload is not None:
            tmp = self.run_dir / "workloads" / workload / "tmp"
            user = self.isolation.uid(workload) if self.isolation is not None else None
            if user is not None and executable is None:
                executable = self._app_executable
        env = {"TMPDIR": str(tmp), **(env or {})}
        if argv[0] in ("ca", "agent", "sidecar", "demo"):
            argv = [*argv, *self.config.log_args]
        try:
            child = spawn(name, argv, self.run_dir / "logs", env, executable=executable, user=user)
        except OSError as exc:
            hint = ""
            if executable is not None and isinstance(exc, PermissionError):
                hint = f" (is {self.run_dir.parent} mounted noexec? choose another --base-dir)"
            raise StartupError(f"cannot start {name}: {exc.strerror or exc}{hint}") from exc
        self.children[name] = child
        return child

    def _sidecar_config(self, name: str, socket_path: Path) -> dict[str, Any]:
        host, ports = self.config.host, self.ports
        load_id, echo_id = (
            str(self.workloads["load"].spiffe_id),
            str(self.workloads["echo"].spiffe_id),
        )
        config: dict[str, Any] = {
            "mode": "explicit",
            "workload_api_socket": f"unix://{socket_path}",
            "spiffe_id": str(self.workloads[name].spiffe_id),
            "admin": f"{host}:{ports[f'{name}_admin']}",
        }
        if name == "echo":
            config["inbound"] = {
                "listen": f"{host}:{ports['echo_inbound']}",
                "targets": {
                    ECHO_TARGET_PORT: {
                        "app": f"{host}:{ports['echo']}",
                        "allow": [{"exact": load_id}],
                    }
                },
            }
            if self.config.declare_http:
                assert self.run_dir is not None
                config["policy_file"] = str(self.run_dir / "workloads" / name / POLICY_FILE)
        else:  # load, intruder: callers of the echo server
            config["inbound"] = {
                "listen": f"{host}:{ports[f'{name}_inbound']}",
                "targets": {},
            }
            config["upstreams"] = [
                {
                    "name": "echo",
                    "listen": f"{host}:{ports[f'{name}_upstream']}",
                    "target": f"echo.demo:{ECHO_TARGET_PORT}",
                    "endpoints": [f"{host}:{ports['echo_inbound']}"],
                    "spiffe_ids": [echo_id],
                }
            ]
            if self.config.declare_http:
                config["upstreams"][0]["protocol"] = "http"
        return config

    def _echo_policy(self) -> dict[str, Any]:
        """The operator's document (meshapi.policy) for echo's sidecar, as a cluster's
        ConfigMap would carry it: port 8080 speaks HTTP (the only way an inbound sidecar
        learns it, and without it an early request is answered 425, not served), admitting
        the load generator alone, as the sidecar's YAML allow list does."""
        return {
            "apiVersion": POLICY_API_VERSION,
            "kind": POLICY_KIND,
            "namespace": "demo",
            "trustDomain": self.config.trust_domain.name,
            "policies": [
                {
                    "name": "echo",
                    "ports": [ECHO_TARGET_PORT],
                    "allow": [{"exact": str(self.workloads["load"].spiffe_id)}],
                    "protocol": "http",
                }
            ],
        }


def sidecar_argv(config_path: Path) -> list[str]:
    return ["sidecar", "--config", str(config_path)]


def probe(host: str, port: int) -> str:
    """Call the echo server through ``host:port`` once; say what happened, in words."""
    body = b"who goes there?"
    request = b"POST /echo HTTP/1.1\r\nHost: echo\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    try:
        with socket.create_connection((host, port), timeout=5.0) as s:
            s.sendall(request)
            answer = s.recv(64)
    except ConnectionResetError:
        return "refused (connection reset)"
    except TimeoutError:
        return "no answer within 5s"
    except OSError as exc:
        return f"failed: {exc.strerror or exc}"
    if not answer:
        return "refused (connection closed)"
    if answer.startswith(b"HTTP/1.1 200"):
        return "ADMITTED: the policy did not hold"
    status_line = answer.split(b"\r\n")[0].decode("ascii", "replace")
    return f"answered {status_line!r}"


def _http_ok(url: str) -> bool:
    with (
        contextlib.suppress(OSError, ValueError),
        urllib.request.urlopen(url, timeout=1.0) as response,  # noqa: S310 (loopback http)
    ):
        return bool(response.status == 200)
    return False


RUN_DIR_PREFIX = "trellis-up-"
OWNER_FILE = "owner.pid"


def remove_stale_run_dirs(base: Path) -> list[Path]:
    """Remove run directories under ``base`` whose ``trellis up`` is gone.

    A ``kill -9`` of ``trellis up`` takes its processes with it (they die with their
    parent) but leaves its run directory, CA files included. Each run directory names its
    owner's pid; one of ours (same uid) whose owner no longer runs is removed by the next
    start. Directories without that file, or not ours, are left alone."""
    removed: list[Path] = []
    try:
        candidates = sorted(base.glob(RUN_DIR_PREFIX + "*"))
    except OSError:
        return removed
    for path in candidates:
        try:
            if not path.is_dir() or path.is_symlink() or path.stat().st_uid != os.getuid():
                continue
            owner = int((path / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if owner == os.getpid() or _running(owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
