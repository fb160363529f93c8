"""Where workload CSRs are checked and signed: on the event loop, or in worker processes.

Signing is the CA's CPU cost (CSR parse + signature check + leaf signature, about a third of a
millisecond per SVID on a small machine) and Python runs it under one GIL. With
``--sign-workers N`` it moves to N worker processes, leaving the event loop free for gRPC
and TLS; each worker loads the intermediate key from the CA directory itself, so key
material never crosses a pipe (only the key's passphrase, when it has one, goes to each
worker once, in the spawn pipe's start-up message, never in argv or the environment).
Only CSRs go in and DER chains come out.

Workers never outlive the server: they ask the kernel for SIGKILL when it dies (even by
SIGKILL, which runs no shutdown code), and they are born ignoring SIGINT, so a Ctrl-C in
a terminal, which reaches the whole process group, is handled once, by the server's
orderly stop.

``auto_sign_workers`` is ``trellis ca serve``'s default: one worker per usable core (in
the CPU affinity and within the cgroup's CPU quota) when there is more than one, else
none (on one core a worker only adds a hand-over to every batch).

``sign_batch`` is the pure core both signers share: values in, values out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import math
import multiprocessing
import os
import pickle
import signal
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from ca.authority import IntermediateAuthority, IssuanceError, load_csr

__all__ = [
    "MAX_SIGN_WORKERS",
    "InlineSigner",
    "ProcessPoolSigner",
    "SignFailure",
    "SignRequest",
    "Signed",
    "Signer",
    "SignerUnavailable",
    "auto_sign_workers",
    "cgroup_cpu_limit",
    "sign_batch",
    "sign_workers_for",
]

MAX_SIGN_WORKERS = 64
MIN_CHUNK = 8  # CSRs; a smaller batch goes to one worker whole


@dataclass(frozen=True, slots=True)
class SignRequest:
    csr: bytes
    spiffe_id: str
    ttl_seconds: float
    dns_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Signed:
    chain_der: tuple[bytes, ...]
    expires_at: float
    seconds: float  # time spent checking and signing this one


@dataclass(frozen=True, slots=True)
class SignFailure:
    reason: str  # IssuanceError.reason
    detail: str


class SignerUnavailable(Exception):
    """The signing workers are gone (crashed or shut down)."""


def sign_batch(
    intermediate: IntermediateAuthority, requests: Sequence[SignRequest], now: float
) -> list[Signed | SignFailure]:
    """Check and sign each CSR; stops at the first failure (the batch is all or nothing)."""
    when = dt.datetime.fromtimestamp(now, dt.UTC)
    issuer = intermediate.certificate_der
    results: list[Signed | SignFailure] = []
    for request in requests:
        started = time.perf_counter()
        try:
            leaf, not_after = intermediate.sign_csr_der(
                load_csr(request.csr),
                request.spiffe_id,
                now=when,
                ttl=dt.timedelta(seconds=request.ttl_seconds),
                dns_names=request.dns_names,
            )
        except IssuanceError as exc:
            results.append(SignFailure(exc.reason, str(exc)))
            break
        results.append(Signed((leaf, issuer), not_after.timestamp(), time.perf_counter() - started))
    return results


class Signer(Protocol):
    async def sign(
        self, requests: Sequence[SignRequest], now: float
    ) -> list[Signed | SignFailure]: ...

    async def close(self) -> None: ...


class InlineSigner:
    """Signs on the calling thread (the event loop): simplest, one core."""

    def __init__(self, intermediate: IntermediateAuthority) -> None:
        self.intermediate = intermediate

    async def sign(self, requests: Sequence[SignRequest], now: float) -> list[Signed | SignFailure]:
        return sign_batch(self.intermediate, requests, now)

    async def close(self) -> None:
        return None


# -- worker processes -----------------------------------------------------------------------


def cgroup_cpu_limit(
    cgroup_root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPU quota of this process's cgroup in cores (a pod's ``limits.cpu``), or None.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD" for none) in the process's own
    cgroup (``0::/path`` in ``/proc/self/cgroup``; inside a cgroup namespace that is the
    root). cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 for none).
    Anything unreadable or malformed counts as no limit.
    """
    try:
        own = next(
            (line[3:] for line in self_cgroup.read_text().splitlines() if line.startswith("0::")),
            "/",
        )
    except OSError:
        own = "/"
    for directory in (cgroup_root / own.lstrip("/"), cgroup_root):
        try:
            quota, period = (directory / "cpu.max").read_text().split()
        except (OSError, ValueError):
            continue
        if quota == "max":
            return None
        try:
            return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
        except ValueError:
            return None
    for v1 in (cgroup_root / "cpu,cpuacct", cgroup_root / "cpu"):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


def sign_workers_for(cores: int, cpu_limit: float | None) -> int:
    """One worker per usable core -- in the affinity (``cores``) and within the cgroup's
    quota (a pod limited to 2 CPUs on a 64-core node gets 2, not 64) -- if there are
    several, else 0."""
    if cpu_limit is not None:
        cores = min(cores, max(1, math.ceil(cpu_limit)))
    return min(cores, MAX_SIGN_WORKERS) if cores > 1 else 0


def auto_sign_workers() -> int:
    """``sign_workers_for`` this process's CPU affinity and cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return sign_workers_for(cores, cgroup_cpu_limit())


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl (not Linux): only close() ends workers
        pass
    if os.getppid() != parent_pid:
        os._exit(0)  # the server died before the request took effect


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _worker_main(
    conn: Connection,
    ca_dir: str,
    cluster: str,
    parent_pid: int,
    key_passphrase: bytes | None = None,
) -> None:
    """A signing worker: load the intermediate, say ready, then answer each
    ``(requests, now)`` with ``("ok", results)`` in order until ``None`` or EOF."""
    from ca.store import CaStore

    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        authority = CaStore(Path(ca_dir), key_passphrase=key_passphrase).load_intermediate(cluster)
    except Exception as exc:
        conn.send(("error", f"cannot load the intermediate: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        requests, now = message
        try:
            results = sign_batch(authority, [SignRequest(*r) for r in requests], now)
            reply: tuple[str, Any] = ("ok", [_result_to_wire(r) for r in results])
        except Exception as exc:  # a bug, not a bad CSR (those are SignFailures)
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


# Plain tuples on the pipe: pickling the dataclasses cost ~30 us per call on the event
# loop, against ~3 us for the same values as tuples.
_WireResult = tuple[bool, Any, Any, Any]


def _result_to_wire(result: Signed | SignFailure) -> _WireResult:
    if isinstance(result, Signed):
        return (True, result.chain_der, result.expires_at, result.seconds)
    return (False, result.reason, result.detail, None)


def _result_from_wire(wire: _WireResult) -> Signed | SignFailure:
    ok, a, b, c = wire
    return Signed(a, b, c) if ok else SignFailure(a, b)


# The parent's end of each pipe is non-blocking (uvloop makes every fd it watches so, and
# a blocking read in a callback would stall the loop), so the parent frames messages itself
# the way multiprocessing.Connection does on the worker's blocking end: a 4-byte signed
# big-endian length (-1 and an 8-byte length beyond 2 GiB), then the pickle.
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


def _frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > 0x7FFFFFFF:
        return _HEADER.pack(-1) + _LONG_HEADER.pack(len(body)) + body
    return _HEADER.pack(len(body)) + body


def _unframe(buffer: bytearray) -> Iterator[Any]:
    """Take each complete message off the front of ``buffer``."""
    while len(buffer) >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer)
        start = _HEADER.size
        if size == -1:
            if len(buffer) < start + _LONG_HEADER.size:
                return
            (size,) = _LONG_HEADER.unpack_from(buffer, start)
            start += _LONG_HEADER.size
        if len(buffer) < start + size:
            return
        # Our own worker process on a socket pair, as Connection.recv would unpickle.
        message = pickle.loads(buffer[start : start + size])  # noqa: S301
        del buffer[: start + size]
        yield message


class _Worker:
    """One worker process and the answers it owes, in the order it will give them."""

    __slots__ = ("conn", "dead", "inbox", "outbox", "process", "waiting")

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.dead = False
        self.inbox = bytearray()
        self.outbox = bytearray()  # what the pipe would not take yet


class ProcessPoolSigner:
    """Signs in ``workers`` processes (spawned, not forked: gRPC's threads do not survive
    a fork). Large batches are split so every worker gets a share (chunks of at least
    ``MIN_CHUNK``: each chunk costs a round trip), each chunk to the least busy worker.

    Each worker has a socket pair that the event loop itself watches (``add_reader``):
    requests are pickled onto it and answers read off it when it turns readable. No
    helper threads -- ``concurrent.futures.ProcessPoolExecutor``'s queue-feeder and
    manager threads took the GIL from the event loop for a third of its samples under
    load, and woke it through a self-pipe for every result.

    With ``inline`` (the same intermediate, loaded in this process), a batch of at most
    ``inline_max`` CSRs that arrives while no worker call is outstanding is signed on the
    event loop instead: a worker round trip (pickling both ways, two socket hops) costs
    about as much CPU as one signature, so workers pay only once calls overlap, which is
    exactly when the event loop needs the relief.
    """

    def __init__(
        self,
        ca_dir: Path,
        cluster: str,
        workers: int,
        *,
        inline: IntermediateAuthority | None = None,
        inline_max: int = 2,
        key_passphrase: bytes | None = None,
    ) -> None:
        if not 1 <= workers <= MAX_SIGN_WORKERS:
            raise ValueError(f"signing workers must number 1 to {MAX_SIGN_WORKERS}, not {workers}")
        self.workers = workers
        self._ca_dir = ca_dir
        self._cluster = cluster
        self._inline = inline
        self._inline_max = inline_max
        self._key_passphrase = key_passphrase
        self._outstanding = 0
        self._pool: list[_Worker] = []
        self._closed = False
        self.batches_inline = 0
        self.batches_in_workers = 0

    async def start(self) -> None:
        """Spawn every worker and wait until each has loaded the intermediate."""
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        # With SIGINT ignored while they spawn, workers start with it ignored (an ignored
        # signal stays ignored across exec, and Python then installs no KeyboardInterrupt
        # handler), so a Ctrl-C cannot interrupt one still importing and print a traceback.
        with _sigint_ignored():
            for _ in range(self.workers):
                ours, theirs = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_main,
                    args=(
                        theirs,
                        str(self._ca_dir),
                        self._cluster,
                        os.getpid(),
                        self._key_passphrase,
                    ),
                    name="trellis-ca-signer",
                    daemon=True,
                )
                process.start()
                theirs.close()
                os.set_blocking(ours.fileno(), False)
                worker = _Worker(process, ours)
                self._pool.append(worker)
                loop.add_reader(ours.fileno(), self._readable, worker)
        ready: list[asyncio.Future[Any]] = []
        for worker in self._pool:
            future = loop.create_future()
            worker.waiting.append(future)
            ready.append(future)
        try:
            await asyncio.gather(*ready)
        except SignerUnavailable:
            await self.close()
            raise

    def _readable(self, worker: _Worker) -> None:
        try:
            while True:
                data = os.read(worker.conn.fileno(), 1 << 16)
                if not data:
                    raise EOFError
                worker.inbox += data
                if len(data) < 1 << 16:
                    break
        except BlockingIOError:
            pass
        except (EOFError, OSError):
            self._lost(worker)
            return
        try:
            answers = list(_unframe(worker.inbox))
        except (pickle.UnpicklingError, ValueError, EOFError):
            self._lost(worker)
            return
        for status, value in answers:
            if not worker.waiting:
                self._lost(worker)  # an answer nobody asked for: the pipe is out of step
                return
            future = worker.waiting.popleft()
            if future.done():
                continue  # its caller was cancelled
            if status == "ok":
                future.set_result(value)
            else:
                future.set_exception(SignerUnavailable(f"signing worker: {value}"))

    def _write(self, worker: _Worker, data: bytes) -> None:
        """Send now what the pipe takes; the rest goes when it is writable again."""
        if worker.outbox:
            worker.outbox += data
            return
        try:
            sent = os.write(worker.conn.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            worker.outbox += data[sent:]
            asyncio.get_running_loop().add_writer(worker.conn.fileno(), self._writable, worker)

    def _writable(self, worker: _Worker) -> None:
        try:
            sent = os.write(worker.conn.fileno(), worker.outbox)
        except BlockingIOError:
            return
        except OSError:
            self._lost(worker)
            return
        del worker.outbox[:sent]
        if not worker.outbox:
            asyncio.get_running_loop().remove_writer(worker.conn.fileno())

    def _lost(self, worker: _Worker) -> None:
        if worker.dead:
            return
        worker.dead = True
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        if worker.outbox:
            worker.outbox.clear()
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_writer(worker.conn.fileno())
        worker.conn.close()
        while worker.waiting:
            future = worker.waiting.popleft()
            if not future.done():
                future.set_exception(SignerUnavailable("a signing worker has stopped"))

    def _submit(self, chunk: Sequence[SignRequest], now: float) -> asyncio.Future[Any]:
        alive = [w for w in self._pool if not w.dead]
        if self._closed or not alive:
            raise SignerUnavailable("the signing workers have stopped")
        worker = min(alive, key=lambda w: len(w.waiting))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            self._write(
                worker,
                _frame(([(r.csr, r.spiffe_id, r.ttl_seconds, r.dns_names) for r in chunk], now)),
            )
        except OSError:
            self._lost(worker)
            return self._submit(chunk, now)
        worker.waiting.append(future)
        return future

    async def sign(self, requests: Sequence[SignRequest], now: float) -> list[Signed | SignFailure]:
        if (
            self._inline is not None
            and self._outstanding == 0
            and len(requests) <= self._inline_max
        ):
            self.batches_inline += 1
            return sign_batch(self._inline, requests, now)
        self.batches_in_workers += 1
        # Split only batches big enough to repay a worker round trip per chunk.
        size = max(MIN_CHUNK, -(-len(requests) // self.workers))
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        self._outstanding += 1
        try:
            parts: list[list[_WireResult]] = await asyncio.gather(
                *(self._submit(chunk, now) for chunk in chunks)
            )
        finally:
            self._outstanding -= 1
        results: list[Signed | SignFailure] = []
        for part in parts:
            results.extend(map(_result_from_wire, part))
            if results and isinstance(results[-1], SignFailure):
                break
        return results

    async def close(self) -> None:
        """Ask every worker to stop, wait for them (killing any that will not), and fail
        whatever was still waiting for an answer."""
        if self._closed:
            return
        self._closed = True
        for worker in self._pool:
            if not worker.dead:
                with contextlib.suppress(OSError):
                    self._write(worker, _frame(None))
        deadline = time.monotonic() + 5
        while any(w.process.is_alive() for w in self._pool) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for worker in self._pool:
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join(1)
            self._lost(worker)
