"""Where workload CSRs are checked and signed: on the event loop, or in worker processes.

Signing is the CA's CPU cost (CSR parse + signature check + leaf signature, about half a
millisecond per SVID on a small machine) and Python runs it under one GIL. With
``--sign-workers N`` it moves to N worker processes, leaving the event loop free for gRPC
and TLS; each worker loads the intermediate key from the CA directory itself, so key
material never crosses a pipe. Only CSRs go in and DER chains come out.

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
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    results: list[Signed | SignFailure] = []
    for request in requests:
        started = time.perf_counter()
        try:
            csr = load_csr(request.csr)
            svid = intermediate.issue_x509_svid_from_csr(
                csr,
                request.spiffe_id,
                now=when,
                ttl=dt.timedelta(seconds=request.ttl_seconds),
                dns_names=request.dns_names,
            )
        except IssuanceError as exc:
            results.append(SignFailure(exc.reason, str(exc)))
            break
        results.append(
            Signed(svid.chain_der(), svid.expires_at.timestamp(), time.perf_counter() - started)
        )
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


_WORKER_AUTHORITY: IntermediateAuthority | None = None
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


def _worker_init(ca_dir: str, cluster: str, parent_pid: int) -> None:
    from ca.store import CaStore

    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _WORKER_AUTHORITY
    _WORKER_AUTHORITY = CaStore(Path(ca_dir)).load_intermediate(cluster)


def _worker_sign(requests: Sequence[SignRequest], now: float) -> list[Signed | SignFailure]:
    if _WORKER_AUTHORITY is None:
        raise RuntimeError("signing worker was not initialised")
    return sign_batch(_WORKER_AUTHORITY, requests, now)


def _worker_ready() -> bool:
    return _WORKER_AUTHORITY is not None


class ProcessPoolSigner:
    """Signs in ``workers`` processes (spawned, not forked: gRPC's threads do not survive
    a fork). Large batches are split so every worker gets a share (chunks of at least
    ``MIN_CHUNK``: each chunk costs a round trip).

    With ``inline`` (the same intermediate, loaded in this process), a batch of at most
    ``inline_max`` CSRs that arrives while no worker call is outstanding is signed on the
    event loop instead. Why: a worker round trip (pickling, the executor's queue and
    manager threads, a result pipe) costs more CPU than one signature -- on a 2-core
    machine a one-CSR call took ~3.9 ms of server CPU through a worker against ~2.4 ms
    inline -- so workers pay only once calls overlap, which is exactly when the event
    loop needs the relief.
    """

    def __init__(
        self,
        ca_dir: Path,
        cluster: str,
        workers: int,
        *,
        inline: IntermediateAuthority | None = None,
        inline_max: int = 2,
    ) -> None:
        if not 1 <= workers <= MAX_SIGN_WORKERS:
            raise ValueError(f"signing workers must number 1 to {MAX_SIGN_WORKERS}, not {workers}")
        self.workers = workers
        self._inline = inline
        self._inline_max = inline_max
        self._outstanding = 0
        self.batches_inline = 0
        self.batches_in_workers = 0
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(str(ca_dir), cluster, os.getpid()),
        )

    async def start(self) -> None:
        """Spawn every worker now rather than on the first request."""
        loop = asyncio.get_running_loop()
        # Each submission here spawns a worker (synchronously). With SIGINT ignored
        # meanwhile, workers start with it ignored (an ignored signal stays ignored across
        # exec, and Python then installs no KeyboardInterrupt handler), so a Ctrl-C cannot
        # interrupt one that is still importing and print its traceback.
        with _sigint_ignored():
            waiting = [loop.run_in_executor(self._pool, _worker_ready) for _ in range(self.workers)]
        ready = await asyncio.gather(*waiting)
        if not all(ready):
            raise SignerUnavailable("a signing worker failed to load the intermediate")

    async def sign(self, requests: Sequence[SignRequest], now: float) -> list[Signed | SignFailure]:
        if (
            self._inline is not None
            and self._outstanding == 0
            and len(requests) <= self._inline_max
        ):
            self.batches_inline += 1
            return sign_batch(self._inline, requests, now)
        self.batches_in_workers += 1
        loop = asyncio.get_running_loop()
        # Split only batches big enough to repay a worker round trip per chunk.
        size = max(MIN_CHUNK, -(-len(requests) // self.workers))
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        self._outstanding += 1
        try:
            parts = await asyncio.gather(
                *(loop.run_in_executor(self._pool, _worker_sign, chunk, now) for chunk in chunks)
            )
        except BrokenProcessPool as exc:
            raise SignerUnavailable("the signing workers have stopped") from exc
        finally:
            self._outstanding -= 1
        results: list[Signed | SignFailure] = []
        for part in parts:
            results.extend(part)
            if part and isinstance(part[-1], SignFailure):
                break
        return results

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
