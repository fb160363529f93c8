"""A small kubelet: runs the Pod the real API server stored, as processes in a netns.

Nothing here decides what a pod looks like: the test creates a Pod through the API server,
the operator's webhook injects it, and ``Node.run`` (``run_many`` for several pods, side by
side) takes the stored object and does what a kubelet and its container runtime do with it,
in this order:

1. the pod sandbox: a network namespace (``ip netns add``) with loopback up and ``eth0``, one
   end of a veth pair whose other end is on the node's bridge; the node is itself a network
   namespace the harness creates (``Node``), standing for the host side, so every address
   used (10.231.0.0/24) lives in namespaces made here. The pod's IP is written to its status
   as the kubelet would (the operator publishes it in the mesh registry);
2. for a pod marked ``trellis.dev/redirect: cni``: ``trellis-cni`` as the runtime calls a
   chained plugin (``CNI_COMMAND=ADD``, ``CNI_NETNS``, ``CNI_CONTAINERID``, ``CNI_IFNAME``,
   ``CNI_ARGS`` with ``K8S_POD_NAMESPACE``/``K8S_POD_NAME``, the network configuration with
   the main plugin's ``prevResult`` on stdin), with the kubeconfig of the CNI DaemonSet's
   ServiceAccount; ``CHECK`` and ``DEL`` at teardown;
3. the init containers in order: one that runs to completion (``trellis-init``) must exit 0;
   a native sidecar (``restartPolicy: Always``) is started and its startup probe awaited
   before the next container, as KEP-753 has it;
4. the app containers; ``probe`` then sends each container's probes from the node (the
   host side of the veth) to the pod's IP, as the kubelet does: ``httpGet`` passes on
   200-399.

Each container is a process entered into the pod's netns (``nsenter --net``) and a private
mount namespace of its own (``unshare --mount``), where its volumes are bind-mounted at
their ``mountPath``\\s (a missing parent, such as ``/etc/trellis``, appears through an
overlay on its first existing ancestor, inside that mount namespace only). Then it runs
``command`` + ``args`` (``$(VAR)`` expanded) with the container's ``env`` (downward-API
``fieldRef``\\s resolved), ``securityContext.runAsUser``/``runAsGroup`` and a capability
bounding set of the runtime's defaults plus ``capabilities.add`` minus ``drop``
(``setpriv``).

Volumes: ``emptyDir`` is a folder of the pod; ``configMap`` the keys of the API server's
ConfigMap, rewritten when the test calls ``refresh`` (the kubelet's periodic sync, made an
explicit step so a test knows when the new files are there); ``configMap`` and
``downwardAPI`` (the labels file) are laid out as the kubelet's ``AtomicWriter`` does
(``..data`` swapped by a rename, keys as symlinks into it); the ``csi`` volume of the
agent's driver is the node agent's socket folder, which stands in for the CSI
NodePublishVolume bind mount (``tests/ca/agent/test_csi.py`` proves that mount on its own);
the projected ServiceAccount volume holds only ``namespace`` (no app here reads a token).

What is not a kubelet's: images are ignored. The command ``trellis`` runs Trellis from an
interpreter copied for the pod (its "image": the agent's ``unix:path`` selector tells pods
apart by it, beside ``unix:uid:1337``, since every sidecar runs as UID 1337), and
``python`` an interpreter of this environment; ``PYTHONPATH`` names the repository.
``readOnlyRootFilesystem``, seccomp profiles, resource limits and restarts are not applied;
``exec`` is ``kubectl exec`` (a process in the container's namespaces, as its user). Each
pod's steps are timed in its log (``RunningPod.events``), which is printed on a failure.

A real CA server and node agent run on the host for the SVIDs, as ``trellis up`` runs them
(join-token node attestation, SO_PEERCRED workload attestation); ``Node.register`` adds
the entry a pod's sidecar matches. ``Node.stop`` and ``RunningPod.stop`` end every process,
namespace and mount they made, whatever happened before.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.231.0"  # a /24 inside the namespaces made here; nothing else routes to it
GATEWAY = f"{SUBNET}.1"
OUTSIDE_IP = f"{SUBNET}.250"  # a host outside the mesh, in a namespace of its own
PROXY_UID = 1337
NODE_NAME = "node-a"
CSI_DRIVER = "csi.trellis.dev"
CLUSTER = "local"
# What containerd and Docker grant a container by default (containerd's oci spec opts).
DEFAULT_CAPABILITIES = (
    "chown", "dac_override", "fsetid", "fowner", "mknod", "net_raw", "setgid", "setuid",
    "setfcap", "setpcap", "net_bind_service", "sys_chroot", "kill", "audit_write",
)  # fmt: skip
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class KubeletError(AssertionError):
    """The pod could not be run as its spec says; the message names the step."""


def _run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=60, check=False, **kwargs
    )
    if done.returncode != 0:
        raise KubeletError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _in_ns(netns: str, *argv: str) -> None:
    _run(["ip", "netns", "exec", netns, *argv])


def socket_in(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket of network namespace ``netns``: created on a thread that entered it
    (setns(2) changes the calling thread alone), so this process stays where it is."""
    made: list[socket.socket | BaseException] = []

    def enter_and_make() -> None:
        try:
            with open(f"/var/run/netns/{netns}") as handle:
                if _libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller below
            made.append(exc)

    thread = threading.Thread(target=enter_and_make)
    thread.start()
    thread.join(timeout=10)
    if not made:
        raise KubeletError(f"no socket from netns {netns}")
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


def http_get(netns: str, host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """The kubelet's httpGet probe from ``netns``: the status, or None when none came."""
    sock = socket_in(netns)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path, headers={"User-Agent": "kube-probe/1.37", "Accept": "*/*"})
        response = conn.getresponse()
        response.read(10 * 1024)
        return int(response.status)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        sock.close()


def call(netns: str, host: str, port: int, text: str, timeout: float = 5.0) -> str | None:
    """One plaintext line to ``host:port`` from ``netns``; the answer, or None when the
    connection was refused, reset or closed without one."""
    sock = socket_in(netns)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(text.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.decode(errors="replace").strip() or None
    except OSError:
        return None
    finally:
        sock.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise KubeletError(f"timed out after {timeout:g}s waiting for {what}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)


def _spawn(name: str, argv: Sequence[str], log: Path, env: Mapping[str, str]) -> Process:
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,  # its own process group: stop() reaches its children
        )
    return Process(name, popen, log)


@dataclass
class Node:
    """The node: its network namespace and bridge, the CA server and agent, the entries."""

    root: Path
    kubeconfig_cni: Path | None = None
    netns: str = ""
    processes: list[Process] = field(default_factory=list)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    interpreter: Path = Path(sys.executable)
    app_python: Path = Path(sys.executable)
    pods: list[RunningPod] = field(default_factory=list)
    _next_ip: int = 10
    _veths: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _netns_made: list[str] = field(default_factory=list)

    @property
    def socket_dir(self) -> Path:
        return self.root / "agent-socket"

    @property
    def entries_file(self) -> Path:
        return self.root / "entries.yaml"

    # -- set-up ---------------------------------------------------------------------------

    def start(self) -> None:
        from ca.server.tokens import JoinTokenStore
        from ca.spiffeid import TrustDomain
        from trellis.up.identity import base_interpreter, create_authorities
        from trellis.up.processes import free_ports
        from trellis.up.users import plan_isolation

        if shutil.which("iptables") is None:
            raise KubeletError("iptables is not installed (Debian package iptables)")
        # The sidecar runs as UID 1337: an interpreter that UID can run (a pyenv build
        # under a private /root cannot be), found as ``trellis up`` finds one.
        isolation = plan_isolation(["sidecar"], base_interpreter(), self.root)
        if not isolation.uids:
            raise KubeletError(f"no interpreter for UID {PROXY_UID}: {isolation.note}")
        self.interpreter = isolation.interpreter
        self.app_python = _image(self.root / "apps", "python", self.interpreter)
        self.netns = f"tkn-{os.getpid()}"
        self._netns(self.netns)
        _in_ns(self.netns, "ip", "link", "add", "br0", "type", "bridge")
        _in_ns(self.netns, "ip", "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        _in_ns(self.netns, "ip", "link", "set", "br0", "up")

        (self.root / "logs").mkdir()
        self.socket_dir.mkdir(mode=0o755)
        ca_dir = self.root / "ca"
        ca_dir.mkdir(mode=0o700)
        root_cert = create_authorities(ca_dir, TrustDomain("example.org"), CLUSTER)
        self._write_entries()
        ca_port, attest_port, admin_port = free_ports(3)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
        self.processes.append(
            _spawn(
                "ca",
                [
                    sys.executable, "-m", "trellis", "ca", "serve", "--dir", str(ca_dir),
                    "--cluster", CLUSTER, "--listen", f"127.0.0.1:{ca_port}",
                    "--attest-listen", f"127.0.0.1:{attest_port}", "--bundle-listen", "off",
                    "--metrics-listen", "off", "--entries", str(self.entries_file),
                    "--poll-interval", "1",
                ],
                self.root / "logs" / "ca.log",
                env,
            )
        )  # fmt: skip
        token, _ = JoinTokenStore(ca_dir / "clusters" / CLUSTER).create(NODE_NAME, ttl=600)
        token_file = self.root / "join-token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        self.processes.append(
            _spawn(
                "agent",
                [
                    sys.executable, "-m", "trellis", "agent",
                    "--socket", str(self.socket_dir / "agent.sock"), "--node", NODE_NAME,
                    "--ca", f"127.0.0.1:{ca_port}", "--ca-attest", f"127.0.0.1:{attest_port}",
                    "--trust-bundle", str(root_cert), "--join-token-file", str(token_file),
                    "--data-dir", str(self.root / "agent"),
                    "--admin", f"127.0.0.1:{admin_port}",
                    "--sync-interval", "1s", "--backoff-cap", "2s",
                ],
                self.root / "logs" / "agent.log",
                env,
            )
        )  # fmt: skip

        def agent_ready() -> bool:
            for process in self.processes:
                if not process.alive():
                    raise KubeletError(f"{process.name} exited:\n{process.output()}")
            try:
                with socket.create_connection(("127.0.0.1", admin_port), timeout=1) as conn:
                    conn.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                    return b" 200 " in conn.recv(64)
            except OSError:
                return False

        wait_until(agent_ready, 60, "the node agent's first sync")

    def _netns(self, name: str) -> None:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        _run(["ip", "netns", "add", name])
        self._netns_made.append(name)
        _in_ns(name, "ip", "link", "set", "lo", "up")

    def attach(self, netns: str, address: str) -> None:
        """``eth0`` in ``netns`` with ``address``/24, its peer on the node's bridge."""
        self._veths += 1
        peer = f"vp{self._veths}"
        _run(["ip", "link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", peer,
              "netns", self.netns])  # fmt: skip
        _in_ns(self.netns, "ip", "link", "set", peer, "master", "br0")
        _in_ns(self.netns, "ip", "link", "set", peer, "up")
        _in_ns(netns, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        _in_ns(netns, "ip", "link", "set", "eth0", "up")
        _in_ns(netns, "ip", "route", "add", "default", "via", GATEWAY)

    def allocate_ip(self) -> str:
        address = f"{SUBNET}.{self._next_ip}"
        self._next_ip += 1
        return address

    # -- the world outside the mesh -------------------------------------------------------

    def start_outside_echo(self, port: int) -> None:
        """A plain TCP echo server on ``OUTSIDE_IP`` in a namespace of its own."""
        name = f"tko-{os.getpid()}"
        self._netns(name)
        self.attach(name, OUTSIDE_IP)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), "POD_NAME": "outside"}
        process = _spawn(
            "outside-echo",
            ["ip", "netns", "exec", name, sys.executable, "-m", "tests.kube.apps.echo",
             str(port), OUTSIDE_IP],
            self.root / "logs" / "outside-echo.log",
            env,
        )  # fmt: skip
        self.processes.append(process)
        wait_until(lambda: "ready" in process.output(), 30, "the echo server outside the mesh")

    # -- identities ---------------------------------------------------------------------

    def register(self, name: str, spiffe_id: str, selectors: Sequence[str]) -> None:
        self.entries[name] = {
            "id": name,
            "spiffe_id": spiffe_id,
            "selectors": list(selectors),
            "nodes": [NODE_NAME],
            "ttl": "600s",
        }
        self._write_entries()

    def _write_entries(self) -> None:
        from ca.entries import parse_entries_yaml

        text = yaml.safe_dump({"entries": list(self.entries.values())}, sort_keys=False)
        parse_entries_yaml(text)
        scratch = self.entries_file.with_suffix(".new")
        scratch.touch(mode=0o600)
        scratch.write_text(text)
        scratch.rename(self.entries_file)

    # -- from the node ----------------------------------------------------------------------

    def http_get(self, host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
        return http_get(self.netns, host, port, path, timeout)

    def call(self, host: str, port: int, text: str) -> str | None:
        return call(self.netns, host, port, text)

    def run(self, plane: Any, pod: Mapping[str, Any]) -> RunningPod:
        (started,) = self.run_many(plane, [pod])
        return started

    def run_many(self, plane: Any, pods: Sequence[Mapping[str, Any]]) -> list[RunningPod]:
        """Start ``pods`` side by side, as a kubelet starts the pods bound to its node."""
        with self.lock:
            first = len(self.pods)
            started = [RunningPod(self, plane, dict(pod)) for pod in pods]
            self.pods.extend(started)
        errors: list[BaseException] = []

        def start(index: int, pod: RunningPod) -> None:
            try:
                pod.start(index)
            except BaseException as exc:  # reported below, after every start has ended
                errors.append(exc)

        threads = [
            threading.Thread(target=start, args=(first + i, pod)) for i, pod in enumerate(started)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        if errors or any(thread.is_alive() for thread in threads):
            for pod in started:
                print(pod.logs())
                pod.stop()
            raise errors[0] if errors else KubeletError("a pod start did not end")
        return started

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()}" for p in self.processes)

    def stop(self) -> None:
        for pod in reversed(self.pods):
            pod.stop()
        for process in reversed(self.processes):
            process.stop()
        for name in reversed(self._netns_made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _image(directory: Path, name: str, interpreter: Path) -> Path:
    """An interpreter copy of this environment that any UID may run (an "image")."""
    from trellis.up.identity import workload_executable

    executable = workload_executable(directory, name, interpreter)
    for top, dirs, _files in os.walk(directory):
        for sub in dirs:
            (Path(top) / sub).chmod(0o755)
    directory.chmod(0o755)
    return executable


def start_node(kubeconfig_cni: Path | None = None) -> Node:
    # Not pytest's 0700 folders: UID 1337 must reach the agent's socket and the pod's
    # interpreter copy; and not under /tmp, which the sidecar's emptyDir hides in its mount
    # namespace. Short, for the socket path (sun_path).
    root = Path(tempfile.mkdtemp(prefix="tk-", dir="/var/tmp"))
    root.chmod(0o755)
    node = Node(root, kubeconfig_cni)
    try:
        node.start()
    except BaseException:
        print(node.logs())
        node.stop()
        raise
    return node


# -- a pod ---------------------------------------------------------------------------------


def _field_ref(pod: Mapping[str, Any], path: str, ip: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    if path.startswith("metadata.labels['") and path.endswith("']"):
        return str((meta.get("labels") or {}).get(path[len("metadata.labels['") : -2], ""))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": ip,
        "status.hostIP": GATEWAY,
    }
    if path not in values:
        raise KubeletError(f"fieldRef {path} is not one this harness resolves")
    return str(values[path])


def labels_file(labels: Mapping[str, str]) -> str:
    """The downward API's labels format: ``key="value"`` lines, sorted, values quoted as Go's
    ``strconv.Quote`` does (JSON's escaping agrees for the values used here)."""
    return "".join(f"{key}={json.dumps(value)}\n" for key, value in sorted(labels.items()))


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion of command and args (k8s.io/kubernetes
    third_party/forked/golang/expansion): a defined variable is replaced, an undefined
    reference is left as written, and ``$$`` is a literal ``$``."""
    out: list[str] = []
    index = 0
    while index < len(text):
        if text.startswith("$$", index):
            out.append("$")
            index += 2
        elif text.startswith("$(", index) and (end := text.find(")", index)) != -1:
            name = text[index + 2 : end]
            out.append(env[name] if name in env else text[index : end + 1])
            index = end + 1
        else:
            out.append(text[index])
            index += 1
    return "".join(out)


def atomic_write(folder: Path, files: Mapping[str, str]) -> None:
    """k8s.io/kubernetes pkg/volume/util ``AtomicWriter``, which the kubelet uses for
    ConfigMap, Secret and downward-API volumes: the payload goes into a fresh hidden
    ``..<timestamp>`` folder, the ``..data`` symlink is swapped to it by a rename, and each
    key is a symlink ``key -> ..data/key``; so a reader sees the old files or the new ones,
    never a mix, and a file's path never changes while its content does."""
    current = folder / "..data"
    if current.is_symlink():
        old = {p.name: p.read_text() for p in (folder / os.readlink(current)).iterdir()}
        if old == dict(files):
            return
    else:
        old = {}
    payload = Path(tempfile.mkdtemp(prefix=f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.", dir=folder))
    payload.chmod(0o755)
    for key, value in files.items():
        (payload / key).write_text(value)
        (payload / key).chmod(0o644)
    scratch = folder / "..data_tmp"
    scratch.unlink(missing_ok=True)
    scratch.symlink_to(payload.name)
    scratch.rename(current)
    for key in files:
        if not (folder / key).is_symlink():
            (folder / key).symlink_to(f"..data/{key}")
    for key in set(old) - set(files):
        (folder / key).unlink(missing_ok=True)
    for stale in folder.iterdir():
        old_payload = stale.name.startswith("..") and stale.name != payload.name
        if old_payload and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)


@dataclass
class RunningPod:
    node: Node
    plane: Any  # tests.kube.controlplane.ControlPlane
    pod: dict[str, Any]
    ip: str = ""
    netns: str = ""
    dir: Path = Path()
    processes: dict[str, Process] = field(default_factory=dict)
    config_maps: dict[str, Path] = field(default_factory=dict)  # name -> volume folder
    cni_env: dict[str, str] | None = None
    cni_config: str = ""
    cni_calls: list[tuple[str, int]] = field(default_factory=list)
    image: Path = Path()
    events: list[str] = field(default_factory=list)  # the kubelet's steps, timed
    started_at: float = 0.0
    stopped: bool = False

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def spiffe_id(self) -> str:
        account = self.pod["spec"].get("serviceAccountName", "default")
        return f"spiffe://example.org/ns/{self.namespace}/sa/{account}"

    # -- start ------------------------------------------------------------------------------

    def _event(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.started_at:6.2f}s {what}")

    def start(self, index: int) -> None:
        self.started_at = time.monotonic()
        self.dir = self.node.root / f"pod-{index}"
        self.dir.mkdir(mode=0o755)
        (self.dir / "logs").mkdir()
        # The pod's "image": an interpreter copy whose path the agent's entry selects.
        self.image = _image(self.dir / "image", "trellis", self.node.interpreter)
        with self.node.lock:  # the node's addresses, interfaces and entries file
            self.ip = self.node.allocate_ip()
            self.netns = f"tkp-{os.getpid()}-{index}"
            self.node._netns(self.netns)
            self.node.attach(self.netns, self.ip)
            # Registered first: the CA and agent pick it up while the sandbox is made.
            self.node.register(
                f"pod-{self.namespace}-{self.name}",
                self.spiffe_id,
                [f"unix:uid:{PROXY_UID}", f"unix:path:{self.image}"],
            )
        self._patch_status("Pending", ready=False)
        self._event("sandbox ready")
        self._volumes()
        annotations = self.pod["metadata"].get("annotations") or {}
        if annotations.get("trellis.dev/redirect") == "cni":
            self._cni_add()
        for container in self.pod["spec"].get("initContainers") or []:
            if container.get("restartPolicy") == "Always":
                self._start(container)
                self._await_startup(container)
            else:
                self._complete(container)
        for container in self.pod["spec"]["containers"]:
            self._start(container)
        self._patch_status("Running", ready=False)
        self._event("containers started")

    def _patch_status(self, phase: str, *, ready: bool) -> None:
        """What the kubelet reports: the pod's IP (the operator's registry reads it)."""
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "status": {
                "phase": phase,
                "hostIP": GATEWAY,
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "conditions": [{"type": "Ready", "status": str(ready), "lastTransitionTime": now}],
            }
        }
        self.plane.kubectl_ok(
            "-n", self.namespace, "patch", "pod", self.name, "--subresource=status",
            "--type=merge", "-p", json.dumps(status),
        )  # fmt: skip

    def _volumes(self) -> None:
        meta = self.pod["metadata"]
        for volume in self.pod["spec"].get("volumes") or []:
            folder = self.dir / "volumes" / volume["name"]
            folder.mkdir(parents=True)
            folder.chmod(0o777 if "emptyDir" in volume else 0o755)
            if "configMap" in volume:
                self.config_maps[volume["configMap"]["name"]] = folder
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"]["items"]:
                    if item.get("fieldRef", {}).get("fieldPath") != "metadata.labels":
                        raise KubeletError(
                            f"downwardAPI item {item} is not one this harness writes"
                        )
                    atomic_write(folder, {item["path"]: labels_file(meta.get("labels") or {})})
            elif "projected" in volume:
                (folder / "namespace").write_text(self.namespace)
            elif "csi" in volume:
                if volume["csi"].get("driver") != CSI_DRIVER:
                    raise KubeletError(f"no CSI driver {volume['csi'].get('driver')} on this node")
            elif "emptyDir" not in volume:
                raise KubeletError(f"volume {volume['name']}: a kind this harness does not mount")
        self.refresh()

    def refresh(self) -> None:
        """The kubelet's ConfigMap volume sync, as its ``AtomicWriter`` lays it out."""
        for name, folder in self.config_maps.items():
            found = self.plane.kubectl("-n", self.namespace, "get", "configmap", name, "-o", "json")
            data: dict[str, str] = {}
            if found.returncode == 0:  # an optional ConfigMap not there yet: an empty folder
                data = json.loads(found.stdout).get("data") or {}
            atomic_write(folder, data)

    def _mount_source(self, volume_name: str) -> Path:
        for volume in self.pod["spec"].get("volumes") or []:
            if volume["name"] == volume_name and "csi" in volume:
                return self.node.socket_dir
        return self.dir / "volumes" / volume_name

    def _argv(self, container: Mapping[str, Any]) -> list[str]:
        env = self._env(container) if container.get("env") else {}
        argv = [
            expand(part, env)
            for part in [*(container.get("command") or []), *(container.get("args") or [])]
        ]
        if not argv:
            raise KubeletError(f"container {container['name']}: no command (images are ignored)")
        if argv[0] == "trellis":
            return [str(self.image), "-m", "trellis", *argv[1:]]
        if argv[0] == "python":
            return [str(self.node.app_python), *argv[1:]]
        return argv

    def _env(self, container: Mapping[str, Any]) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/",
            "PYTHONPATH": str(REPO),
            "HOSTNAME": self.name,
        }
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "fieldRef" in (item.get("valueFrom") or {}):
                env[item["name"]] = _field_ref(
                    self.pod, item["valueFrom"]["fieldRef"]["fieldPath"], self.ip
                )
            else:
                raise KubeletError(f"env {item['name']}: a source this harness does not resolve")
        return env

    def _launcher(self, container: Mapping[str, Any], argv: Sequence[str]) -> list[str]:
        """nsenter (the pod's netns) → unshare (a mount namespace) → the mounts → setpriv."""
        pod_context = self.pod["spec"].get("securityContext") or {}
        context = container.get("securityContext") or {}
        uid = int(context.get("runAsUser", pod_context.get("runAsUser", 0)))
        gid = int(context.get("runAsGroup", pod_context.get("runAsGroup", 0)))
        capabilities = context.get("capabilities") or {}
        dropped = {c.lower() for c in capabilities.get("drop") or []}
        kept = set() if "all" in dropped else set(DEFAULT_CAPABILITIES) - dropped
        kept |= {c.lower() for c in capabilities.get("add") or []}
        mounts = [
            {
                "source": str(self._mount_source(m["name"])),
                "target": m["mountPath"],
                "readOnly": bool(m.get("readOnly", False)),
            }
            for m in container.get("volumeMounts") or []
        ]
        scratch = self.dir / "scratch" / container["name"]
        scratch.mkdir(parents=True, exist_ok=True)
        spec = {
            "mounts": mounts,
            "scratch": str(scratch),
            "setpriv": [
                "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "--bounding-set=" + ",".join(["-all", *(f"+{c}" for c in sorted(kept))]),
                "--inh-caps=-all", "--",
            ],
            "argv": list(argv),
        }  # fmt: skip
        return [
            "nsenter", f"--net=/var/run/netns/{self.netns}", "--",
            "unshare", "--mount", "--propagation", "private", "--",
            sys.executable, "-m", "tests.kube.kubelet", json.dumps(spec),
        ]  # fmt: skip

    def _start(self, container: Mapping[str, Any]) -> Process:
        self._event(f"start {container['name']}")
        name = container["name"]
        argv = self._launcher(container, self._argv(container))
        process = _spawn(name, argv, self.dir / "logs" / f"{name}.log", self._env(container))
        self.processes[name] = process
        return process

    def _complete(self, container: Mapping[str, Any]) -> None:
        process = self._start(container)
        try:
            code = process.popen.wait(timeout=60)
        except subprocess.TimeoutExpired as exc:
            raise KubeletError(f"init container {container['name']} did not finish") from exc
        if code != 0:
            raise KubeletError(
                f"init container {container['name']} exited {code}:\n{process.output()}"
            )

    def _await_startup(self, container: Mapping[str, Any]) -> None:
        probe = container.get("startupProbe") or container.get("readinessProbe")
        if probe is None:
            return
        name = container["name"]

        def started() -> bool:
            if not self.processes[name].alive():
                raise KubeletError(f"{name} exited:\n{self.processes[name].output()}")
            return self._probe_ok(probe)

        limit = int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))
        wait_until(started, min(limit, 60), f"{self.name}/{name}'s startup probe")
        self._event(f"{name} started (startup probe passed)")

    # -- probes and calls ----------------------------------------------------------------------

    def _port(self, container_ports: Sequence[Mapping[str, Any]], port: Any) -> int:
        if isinstance(port, int):
            return port
        for entry in container_ports:
            if entry.get("name") == port:
                return int(entry["containerPort"])
        raise KubeletError(f"named port {port} is not declared")

    def _probe_ok(self, probe: Mapping[str, Any], ports: Sequence[Mapping[str, Any]] = ()) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1)) + 1.0
        if "httpGet" in probe:
            get = probe["httpGet"]
            status = self.node.http_get(
                self.ip, self._port(ports, get["port"]), get.get("path", "/"), timeout
            )
            return status is not None and 200 <= status < 400
        if "tcpSocket" in probe:
            sock = socket_in(self.node.netns)
            try:
                sock.settimeout(timeout)
                sock.connect((self.ip, self._port(ports, probe["tcpSocket"]["port"])))
                return True
            except OSError:
                return False
            finally:
                sock.close()
        raise KubeletError(f"probe {probe}: not a network probe this harness sends")

    def probe(self, container_name: str, kind: str) -> bool:
        """One ``kind`` probe (``readinessProbe``, ...) of the container, from the node."""
        containers = [
            *(self.pod["spec"].get("initContainers") or []),
            *self.pod["spec"]["containers"],
        ]
        container = next(c for c in containers if c["name"] == container_name)
        return self._probe_ok(container[kind], container.get("ports") or [])

    def ready(self) -> bool:
        """Every container's readiness probe passes (the pod's Ready condition)."""
        containers = [
            c
            for c in [
                *(self.pod["spec"].get("initContainers") or []),
                *self.pod["spec"]["containers"],
            ]
            if c.get("restartPolicy") == "Always" or c in self.pod["spec"]["containers"]
        ]
        for container in containers:
            if "readinessProbe" in container and not self.probe(
                container["name"], "readinessProbe"
            ):
                return False
        return True

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(self.ready, timeout, f"pod {self.name} to become Ready")
        self._patch_status("Running", ready=True)
        self._event("ready")

    def exec(
        self, container_name: str, argv: Sequence[str], timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl exec``: ``argv`` in the container's namespaces, as its user."""
        container = next(c for c in self.pod["spec"]["containers"] if c["name"] == container_name)
        launcher = self._launcher(
            container, self._argv({"name": container_name, "command": list(argv)})
        )
        return subprocess.run(
            launcher,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env(container),
            check=False,
        )

    def volume(self, name: str) -> Path:
        return self.dir / "volumes" / name

    # -- CNI --------------------------------------------------------------------------------

    def _cni_add(self) -> None:
        if self.node.kubeconfig_cni is None:
            raise KubeletError("a CNI-mode pod needs the node's trellis-cni kubeconfig")
        prev = {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": f"/var/run/netns/{self.netns}"}],
            "ips": [{"address": f"{self.ip}/24", "gateway": GATEWAY, "interface": 0}],
        }
        self.cni_config = json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "k8s-pod-network",
                "type": "trellis-cni",
                "kubeconfig": str(self.node.kubeconfig_cni),
                "prevResult": prev,
            }
        )
        self.cni_env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYTHONPATH": str(REPO),
            "CNI_CONTAINERID": f"sandbox-{self.netns}",
            "CNI_NETNS": f"/var/run/netns/{self.netns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};"
                f"K8S_POD_INFRA_CONTAINER_ID=sandbox-{self.netns}"
            ),
        }
        code, result = self.cni("ADD")
        if code != 0 or result != prev:
            raise KubeletError(f"trellis-cni ADD: exit {code}, {result}")

    def cni(self, command: str) -> tuple[int, dict[str, Any]]:
        assert self.cni_env is not None
        done = subprocess.run(
            [sys.executable, "-m", "sidecar.cni"],
            input=self.cni_config,
            env={**self.cni_env, "CNI_COMMAND": command},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if "Traceback" in done.stderr:
            raise KubeletError(f"trellis-cni {command}: {done.stderr}")
        self.cni_calls.append((command, done.returncode))
        return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})

    # -- teardown ---------------------------------------------------------------------------

    def logs(self) -> str:
        steps = "\n".join(self.events)
        return f"--- {self.name}: kubelet steps\n{steps}\n" + "\n".join(
            f"--- {self.name}/{name}\n{process.output()}"
            for name, process in self.processes.items()
        )

    def stop(self) -> None:
        """The kubelet's teardown: containers, then (CNI mode) CHECK and DEL, then the netns."""
        if self.stopped:
            return
        self.stopped = True
        for process in reversed(list(self.processes.values())):
            process.stop()
        if self.cni_env is not None:
            with contextlib.suppress(KubeletError, subprocess.SubprocessError, ValueError):
                self.cni("CHECK")
                self.cni("DEL")
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)
        if self.netns in self.node._netns_made:
            self.node._netns_made.remove(self.netns)


@contextlib.contextmanager
def running(node: Node, plane: Any, pod: Mapping[str, Any]) -> Iterator[RunningPod]:
    """Run ``pod``; on a failure inside the block print its processes' logs; stop it after."""
    started = node.run(plane, pod)
    failed = True
    try:
        yield started
        failed = False
    finally:
        started.stop()
        if failed or os.environ.get("TRELLIS_TEST_LOGS"):
            print(started.logs())
            print(node.logs())


# -- inside the container's namespaces -------------------------------------------------------


def _enter(spec: Mapping[str, Any]) -> None:
    """Run as ``python -m tests.kube.kubelet SPEC`` by ``_launcher``, already in the pod's
    netns and a private mount namespace: make the mounts, then exec setpriv + argv."""
    scratch = Path(spec["scratch"])
    # Overlay upper folders on a tmpfs of this mount namespace: nothing of them outlives it.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(scratch)], check=True)
    # What stands in for the image (the checkout and its virtualenv) must stay visible when
    # a volume is mounted over a folder that holds it (a checkout under /tmp, and the
    # sidecar's emptyDir at /tmp): keep a view of each before the volumes go up.
    image = sorted(
        {os.path.realpath(p) for p in (REPO, sys.prefix, sysconfig.get_paths()["purelib"])}
    )
    views = []
    for index, path in enumerate(image):
        view = scratch / f"image{index}"
        view.mkdir()
        subprocess.run(["mount", "--bind", path, str(view)], check=True)
        views.append((Path(path), view))
    overlaid: set[str] = set()
    # Symlinks resolved first (/var/run is /run): an overlay mounted through one path would
    # hide the bind mounts already made below the other.
    targets = [(Path(os.path.realpath(m["target"])), m) for m in spec["mounts"]]
    for index, (target, mount) in enumerate(sorted(targets, key=lambda t: len(str(t[0])))):
        if not target.exists():
            top = next(p for p in target.parents if p.exists())
            if not any(top.is_relative_to(o) for o in overlaid) and str(top) != "/":
                upper, work = scratch / f"up{index}", scratch / f"work{index}"
                upper.mkdir()
                work.mkdir()
                subprocess.run(
                    ["mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir={top},upperdir={upper},workdir={work}", str(top)],
                    check=True,
                )  # fmt: skip
                overlaid.add(str(top))
            target.mkdir(parents=True)
        subprocess.run(["mount", "--bind", mount["source"], str(target)], check=True)
        if mount["readOnly"]:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
    for path, view in views:
        if any(path.is_relative_to(target) for target, _ in targets):
            path.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(view), str(path)], check=True)
    argv = [*spec["setpriv"], *spec["argv"]]
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _enter(json.loads(sys.argv[1]))
