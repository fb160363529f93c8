"""Where workload CSRs are checked and signed: on the event loop, or in worker processes.

Signing is the CA's CPU cost (CSR parse + signature check + leaf signature, about half a
millisecond per SVID on a small machine) and Python runs it under one GIL. With
``--sign-workers N`` it moves to N worker processes, leaving the event loop free for gRPC
and TLS; each worker loads the intermediate key from the CA directory itself, so key
material never crosses a pipe. Only CSRs go in and DER chains come out.

``sign_batch`` is the pure core both signers share: values in, values out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ca.authority import IntermediateAuthority, IssuanceError, load_csr

__all__ = [
    "InlineSigner",
    "ProcessPoolSigner",
    "SignFailure",
    "SignRequest",
    "Signed",
    "Signer",
    "SignerUnavailable",
    "sign_batch",
]


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

_WORKER_AUTHORITY: IntermediateAuthority | None = None


def _worker_init(ca_dir: str, cluster: str) -> None:
    from ca.store import CaStore

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
    a fork). Large batches are split so every worker gets a share."""

    def __init__(self, ca_dir: Path, cluster: str, workers: int) -> None:
        if workers < 1:
            raise ValueError("at least one signing worker is needed")
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(str(ca_dir), cluster),
        )

    async def start(self) -> None:
        """Spawn every worker now rather than on the first request."""
        loop = asyncio.get_running_loop()
        ready = await asyncio.gather(
            *(loop.run_in_executor(self._pool, _worker_ready) for _ in range(self.workers))
        )
        if not all(ready):
            raise SignerUnavailable("a signing worker failed to load the intermediate")

    async def sign(self, requests: Sequence[SignRequest], now: float) -> list[Signed | SignFailure]:
        loop = asyncio.get_running_loop()
        size = max(1, -(-len(requests) // self.workers))
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        try:
            parts = await asyncio.gather(
                *(loop.run_in_executor(self._pool, _worker_sign, chunk, now) for chunk in chunks)
            )
        except BrokenProcessPool as exc:
            raise SignerUnavailable("the signing workers have stopped") from exc
        results: list[Signed | SignFailure] = []
        for part in parts:
            results.extend(part)
            if part and isinstance(part[-1], SignFailure):
                break
        return results

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
