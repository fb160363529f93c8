"""The Workload API socket: SO_PEERCRED for every caller, in front of grpcio.

Why a front at all. Workload attestation starts from the kernel's word on who is calling:
``getsockopt(SO_PEERCRED)`` on the accepted Unix socket gives pid, uid and gid. grpcio
never shows a handler its socket: ``context.peer()`` on a Unix socket is just ``"unix:"``
(the client's socket has no name), ``auth_context()`` is empty for insecure and for
``local_server_credentials(UDS)`` — gRPC core never calls SO_PEERCRED (grpc/grpc#15511,
grpc/grpc#28755), and Python exposes neither a socket mutator nor "serve this fd"
(``CreateInsecureChannelFromFd`` is C++ only). Guessing the caller from ``/proc/net/unix``
inodes would be racy and needs the server-side fd grpcio hides.

What is done instead. The agent accepts connections on the public socket itself (asyncio),
reads SO_PEERCRED, takes a pidfd for the connecting process (``SO_PEERPIDFD``, Linux 6.5+,
which names the very process that called ``connect()``; else ``pidfd_open`` on its pid,
backed by the start time) and has the attestor snapshot what that process runs
(``attestation.UnixAttestor.snapshot``: the binding of a connection to one process and
one program, and the race that remains, are described there), then opens a
connection to grpcio's real listener, which lives in a private 0700 directory only the
agent can enter. Before connecting, that outgoing socket is *bound to a unique path* in the
same directory, so grpcio reports it as the peer: ``context.peer() == "unix:/…/c17"``. The
front records ``"unix:/…/c17" → PeerCredentials`` before forwarding a single byte, and the
handlers look the caller up by ``context.peer()``. Then bytes are spliced both ways with
asyncio transports (flow control by pause/resume reading), one front connection per grpc
connection, so every RPC on a connection carries that connection's credentials, which is
exactly SO_PEERCRED's own granularity.

Safety properties: an unknown peer string (a connection that did not come through the
front, or a grpcio that one day stops reporting bound paths) finds no credentials and is
refused (fail closed; a test pins grpcio's peer format). Nobody but the agent can connect
to the internal listener (0700 directory), and the bound client paths are unlinked right
after connecting, so nothing accumulates; the pidfd is closed with the connection. The
private directory records its owner (pid, start time, pid namespace): an agent killed with
``kill -9`` leaves it behind, and the next agent to start removes those whose owner no
longer runs (``remove_stale_front_dirs``), never a live agent's. The splice costs about
0.1 ms per call (bench/workload_api.py: a bare grpcio echo, direct vs through this front),
well inside the Workload API's 5 ms budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import select
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

from ca.agent.attestation import AttestationError, PeerCredentials, process_start_time

__all__ = [
    "FRONT_DIR_PREFIX",
    "PeerProcess",
    "PeerRegistry",
    "UdsFront",
    "peer_credentials",
    "remove_stale_front_dirs",
]

log = logging.getLogger("trellis.agent.peercred")

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
DEFAULT_MAX_CONNECTIONS = 4096
# sun_path holds 108 bytes; the per-connection paths add "/trellis-wl-XXXXXXXX/cNNNNNNN".
_MAX_TEMP_DIR_CHARS = 70


def _short_temp_dir() -> str:
    """$TMPDIR when socket paths under it fit in sun_path, else /tmp."""
    candidate = tempfile.gettempdir()
    return candidate if len(candidate.encode()) <= _MAX_TEMP_DIR_CHARS else "/tmp"  # noqa: S108


# include/uapi/asm-generic/socket.h (Linux 6.5); Python 3.11's socket module lacks the name.
_SO_PEERPIDFD = 77
FRONT_DIR_PREFIX = "trellis-wl-"
_OWNER_FILE = "owner"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock`` (Linux SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class PeerProcess:
    """A pidfd for the process that connected: whether *it* still runs (``LiveProcess``).

    A pid names whichever process holds it now; a pidfd names one process for good and
    becomes readable when that process exits (pidfd_open(2)), zombie or reaped, so a
    newcomer that reuses the pid can never pass for it.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def of(cls, sock: socket.socket, pid: int) -> PeerProcess | None:
        """The connecting process: SO_PEERPIDFD, else ``pidfd_open(pid)`` (kernels < 6.5,
        where the pid could in principle have been reused before this; the start time
        read right after is the check for that). None on kernels before 5.3, which have
        no pidfds: the start time is then the only check. Raises OSError for a process
        that is already gone."""
        try:
            fd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except OSError as exc:
            if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            try:
                fd = os.pidfd_open(pid)
            except OSError as missing:
                if missing.errno == errno.ENOSYS:
                    return None
                raise
        os.set_inheritable(fd, False)
        return cls(fd)

    def running(self) -> bool:
        if self._fd < 0:
            return False  # the connection is gone: nothing on it may be served any more
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pid_namespace() -> str | None:
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return None


def _owner_record() -> str:
    pid = os.getpid()
    return f"{pid} {process_start_time(pid)} {_pid_namespace()}\n"


def remove_stale_front_dirs(base: Path) -> list[Path]:
    """Remove the private directories under ``base`` of agents that no longer run.

    ``kill -9`` gives an agent no chance to remove its directory. Each names its owner
    (pid, start time, pid namespace); one of ours (same uid, not a symlink) whose owner
    is not running (no such pid, or a pid reused by a process started at another time) is
    removed. Directories without a readable record (being created right now, or made by
    an older agent) and those of another pid namespace, whose pids mean nothing here, are
    left alone: a live agent's directory is never removed.
    """
    removed: list[Path] = []
    try:
        candidates = sorted(base.glob(FRONT_DIR_PREFIX + "*"))
    except OSError:
        return removed
    namespace = _pid_namespace()
    for path in candidates:
        try:
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.geteuid():
                continue
            pid_text, started, owner_namespace = (path / _OWNER_FILE).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if owner_namespace != str(namespace) or started == "None":
            continue
        if pid == os.getpid() or str(process_start_time(pid)) == started:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class PeerRegistry:
    """``context.peer()`` string → credentials of the connection behind it."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerCredentials] = {}

    def add(self, peer: str, credentials: PeerCredentials) -> None:
        self._peers[peer] = credentials

    def remove(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def lookup(self, peer: str) -> PeerCredentials | None:
        return self._peers.get(peer)

    def __len__(self) -> int:
        return len(self._peers)


class _Half(asyncio.Protocol):
    """One side of the splice; forwards what it reads to ``other``."""

    def __init__(self, pair: _Splice) -> None:
        self.pair = pair
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; uvloop's implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:
            self.pending.append(data)  # backend not connected yet (reading is paused soon)

    def eof_received(self) -> bool:
        return False  # close; HTTP/2 has no use for half-closed connections

    def pause_writing(self) -> None:
        # Our peer-bound buffer is full: stop reading from the other side.
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.closed(self)


class _Splice:
    def __init__(self, front: UdsFront) -> None:
        self.front = front
        self.client = _Half(self)
        self.backend = _Half(self)
        self.client.other = self.backend
        self.backend.other = self.client
        self.peer_key: str | None = None
        self.process: PeerProcess | None = None
        self.done = False

    def closed(self, half: _Half) -> None:
        for side in (self.client, self.backend):
            if side is not half and side.transport is not None:
                side.transport.close()
        if not self.done:
            self.done = True
            self.front._forget(self)


class UdsFront:
    """Accepts on ``path``, records SO_PEERCRED, splices to grpcio's private listener."""

    def __init__(
        self,
        path: Path,
        *,
        mode: int = 0o666,
        registry: PeerRegistry | None = None,
        snapshot: Callable[[PeerCredentials], PeerCredentials] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self.mode = mode
        self.registry = registry if registry is not None else PeerRegistry()
        # Attests a caller at accept time (``UnixAttestor.snapshot``); raises
        # AttestationError for one that cannot be, whose connection is then refused.
        self._snapshot = snapshot
        self._max = max_connections
        # mkdtemp creates the directory 0700: only the agent's user can reach grpcio.
        self.temp_base = Path(_short_temp_dir())
        self._dir = Path(tempfile.mkdtemp(prefix=FRONT_DIR_PREFIX, dir=self.temp_base))
        (self._dir / _OWNER_FILE).write_text(_owner_record())
        self.internal_path = self._dir / "grpc.sock"
        self._counter = itertools.count(1)
        self._splices: set[_Splice] = set()
        self._server: asyncio.AbstractServer | None = None
        self.accepted = 0
        self.refused = 0

    @property
    def internal_address(self) -> str:
        return f"unix:{self.internal_path}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()  # a stale socket from a previous run
        self._server = await loop.create_unix_server(self._accept, path=str(self.path))
        self.path.chmod(self.mode)

    def _accept(self) -> asyncio.Protocol:
        splice = _Splice(self)
        half = splice.client
        original = half.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            original(transport)
            self._admit(splice, transport)

        half.connection_made = connection_made  # type: ignore[method-assign]
        return half

    def _admit(self, splice: _Splice, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's do not subclass it
        if len(self._splices) >= self._max:
            self.refused += 1
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = peer_credentials(sock)
            process = PeerProcess.of(sock, pid)
        except OSError as exc:
            log.warning("cannot identify the process behind a connection: %s", exc)
            self.refused += 1
            transport.abort()
            return
        credentials = PeerCredentials(pid, uid, gid, process=process)
        if self._snapshot is not None:
            try:
                credentials = self._snapshot(credentials)
            except AttestationError as exc:
                log.warning("refused a connection from pid %d (uid %d): %s", pid, uid, exc)
                if process is not None:
                    process.close()
                self.refused += 1
                transport.abort()
                return
        splice.process = process
        transport.pause_reading()  # until the backend is connected
        self._splices.add(splice)
        self.accepted += 1
        asyncio.get_running_loop().create_task(self._connect_backend(splice, credentials))

    async def _connect_backend(self, splice: _Splice, credentials: PeerCredentials) -> None:
        loop = asyncio.get_running_loop()
        bound = self._dir / f"c{next(self._counter)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(str(bound))
            peer_key = f"unix:{bound}"
            self.registry.add(peer_key, credentials)  # before grpcio can see a byte
            splice.peer_key = peer_key
            await loop.sock_connect(sock, str(self.internal_path))
            with contextlib.suppress(FileNotFoundError):
                bound.unlink()
            await loop.create_unix_connection(lambda: splice.backend, sock=sock)
        except OSError as exc:
            log.warning("cannot reach the Workload API listener: %s", exc)
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                bound.unlink()
            if splice.client.transport is not None:
                splice.client.transport.abort()
            self._forget(splice)
            return
        client = splice.client
        if client.transport is None or client.transport.is_closing():
            assert splice.backend.transport is not None
            splice.backend.transport.close()
            return
        backend_transport = splice.backend.transport
        assert backend_transport is not None
        for chunk in client.pending:
            backend_transport.write(chunk)
        client.pending.clear()
        client.transport.resume_reading()

    def _forget(self, splice: _Splice) -> None:
        self._splices.discard(splice)
        if splice.peer_key is not None:
            self.registry.remove(splice.peer_key)
        if splice.process is not None:
            splice.process.close()

    @property
    def connections(self) -> int:
        return len(self._splices)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for splice in list(self._splices):
            for side in (splice.client, splice.backend):
                if side.transport is not None:
                    side.transport.abort()
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:
        # Best effort for the private directory if close() was never awaited.
        if os.path.isdir(self._dir):  # noqa: PTH112
            shutil.rmtree(self._dir, ignore_errors=True)
