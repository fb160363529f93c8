"""The agent's I/O shell around ``SvidCache``: attest, sync, rotate, watch the bundle.

One ``Rotator`` per agent. ``run()`` establishes the agent's identity (a persisted agent
SVID from ``--data-dir`` if one is still valid, else node attestation), then runs two
loops until cancelled:

* the sync loop: renew the agent SVID at half-life; fetch this node's entries (at most
  once per sync interval: a wake-up for a rotation alone skips the fetch); get
  X509-SVIDs for every entry ``SvidCache.due`` names (fresh key per SVID) through the
  agent's ``Batcher``, which sends them in as few ``BatchNewX509SVID`` calls as it can,
  one at a time; drop expired SVIDs; sleep until the next rotation, expiry or
  sync interval;
* the bundle loop: follow ``Upstream.watch_bundle`` and put every new bundle in the cache.

When the CA is unreachable both loops back off (capped exponential, full jitter) and the
cache keeps serving what it has until each SVID's notAfter; ``health()`` and the metrics
say so. Every cache change bumps ``SvidCache.version`` and wakes ``wait_for_change``
callers, which is how Workload API streams learn about rotations, entry changes and
bundle updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ca.agent.backoff import Backoff
from ca.agent.batcher import Batcher
from ca.agent.cache import JwtCache, SvidCache, rotation_time
from ca.agent.metrics import AgentMetrics
from ca.agent.upstream import Upstream, UpstreamError, UpstreamRefused, UpstreamUnavailable
from ca.api import AgentIdentity, JwtSvidToken
from ca.bundle import BundleError, TrustBundle, load_pem_certificates
from ca.entries import RegistrationEntry
from ca.keys import (
    KeyAlgorithm,
    KeyMaterialError,
    PrivateKey,
    generate_private_key,
    is_encrypted_pem,
    is_mldsa,
    key_algorithm_of,
    private_key_pem,
    write_private_file,
    write_public_file,
)
from ca.store import load_protected_key
from ca.x509svid import SvidError, X509Svid, spiffe_id_of

__all__ = ["AgentFatalError", "Rotator", "RotatorConfig", "load_agent_state"]

log = logging.getLogger("trellis.agent")

Clock = Callable[[], dt.datetime]
# CSRs per batch: under the server's default --max-batch (1,000; a lower one is learnt from
# the CA and the batch split to fit, see grpc_upstream.py) and, for every key type the CA
# accepts, its --max-request-bytes (1 MiB).
MAX_BATCH = 100
# BatchNewX509SVID calls in flight at once. One: every call costs the CA about 1 ms of gRPC
# CPU whatever it carries, and a second call in flight halves the batches under load (8
# agents at 1,000 SVIDs/s: p99 63-72 ms with one, 90-123 ms with two; bench/ca_server.py).
MAX_IN_FLIGHT = 1
# Signing requests that may wait for a call; beyond this the round fails and backs off.
MAX_WAITING = 10_000


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AgentFatalError(Exception):
    """The agent cannot continue without an operator (e.g. its join token was refused)."""


@dataclass(frozen=True)
class RotatorConfig:
    sync_interval: float = 5.0
    # Workload keys; None follows the CA: the type its server tells with the entries, else
    # the parameter set of an ML-DSA intermediate (a trust domain created post-quantum),
    # else P-256, which every classical peer verifies.
    key_algorithm: KeyAlgorithm | None = None
    jitter: float = 0.1
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    data_dir: Path | None = None
    # Encrypts the agent key kept in data_dir (trellis agent --key-passphrase-file).
    key_passphrase: bytes | None = field(default=None, repr=False)


# -- the agent's own state on disk (so a restart needs no new join token) -------------------

_AGENT_CHAIN = "agent-svid.pem"
_AGENT_KEY = "agent-svid.key"
_BUNDLE = "bundle.json"


def load_agent_state(
    data_dir: Path, now: dt.datetime, key_passphrase: bytes | None = None
) -> tuple[X509Svid, TrustBundle] | None:
    """The persisted agent SVID and bundle, if present and the SVID has not expired.

    Unreadable state is ignored (the agent attests afresh), except a key it cannot open
    for want of the right passphrase: that needs the operator, not a new join token, so it
    raises ``AgentFatalError`` naming the file."""
    key_path = data_dir / _AGENT_KEY
    try:
        chain = tuple(load_pem_certificates((data_dir / _AGENT_CHAIN).read_bytes()))
        key_pem = key_path.read_bytes()
        try:
            key = load_protected_key(key_pem, key_passphrase, what=f"agent key {key_path}")
        except KeyMaterialError as exc:
            if is_encrypted_pem(key_pem):
                raise AgentFatalError(str(exc)) from exc
            raise
        spiffe_id = spiffe_id_of(chain[0])
        bundle = TrustBundle.from_json(spiffe_id.trust_domain, (data_dir / _BUNDLE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, BundleError, KeyMaterialError, SvidError, IndexError) as exc:
        log.warning("ignoring unreadable agent state in %s: %s", data_dir, exc)
        return None
    if chain[0].not_valid_after_utc <= now or chain[0].public_key() != key.public_key():
        return None
    return X509Svid(spiffe_id, chain, key), bundle


def _save_agent_state(
    data_dir: Path, svid: X509Svid, bundle: TrustBundle, key_passphrase: bytes | None
) -> None:
    assert svid.private_key is not None
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(data_dir / _AGENT_KEY, private_key_pem(svid.private_key, key_passphrase))
    write_public_file(data_dir / _AGENT_CHAIN, svid.chain_pem())
    write_public_file(data_dir / _BUNDLE, bundle.to_json())


class Rotator:
    def __init__(
        self,
        upstream: Upstream,
        *,
        config: RotatorConfig | None = None,
        metrics: AgentMetrics | None = None,
        clock: Clock = _utcnow,
        rng: random.Random | None = None,
        initial_bundle: TrustBundle | None = None,
    ) -> None:
        self.upstream = upstream
        self.config = config if config is not None else RotatorConfig()
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self.cache = SvidCache(self._rng, self.config.jitter)
        self.issuer: Batcher[tuple[str, PrivateKey], X509Svid] = Batcher(
            lambda requests: self.upstream.batch_new_x509_svids(requests),
            max_batch=MAX_BATCH,
            max_in_flight=MAX_IN_FLIGHT,
            max_pending=MAX_WAITING,
        )
        self.jwt_cache = JwtCache()
        self.node: str | None = None
        self._agent_rotate_at: dt.datetime | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._backoff = Backoff(self.config.backoff_base, self.config.backoff_cap, rng=self._rng)
        self._bundle_backoff = Backoff(
            self.config.backoff_base, self.config.backoff_cap, rng=self._rng
        )
        self.upstream_up = False
        self.unreachable_since: dt.datetime | None = None
        self.last_error: str | None = None
        self.last_sync: dt.datetime | None = None
        self._entries_fetched: dt.datetime | None = None
        self._refetch = True
        self.synced = asyncio.Event()
        self.identity_ready = asyncio.Event()
        if initial_bundle is not None:
            self.cache.set_bundle(initial_bundle)

    # -- change notification -------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._update_gauges()

    async def wait_for_change(self, seen_version: int) -> None:
        """Return once ``cache.version`` differs from ``seen_version``."""
        while self.cache.version == seen_version:
            await self._changed.wait()

    def _update_gauges(self) -> None:
        now = self.clock()
        m = self.metrics
        m.cache_size.set(len(self.cache.svids))
        m.entries.set(len(self.cache.entries))
        nearest = self.cache.nearest_expiry()
        m.nearest_expiry.set((nearest - now).total_seconds() if nearest else -1)
        agent = self.upstream.agent_svid
        m.agent_svid_expiry.set((agent.expires_at - now).total_seconds() if agent else -1)
        m.upstream_up.set(1 if self.upstream_up else 0)

    # -- bookkeeping of the upstream's state ------------------------------------------------

    def _succeeded(self) -> None:
        if not self.upstream_up:
            if self.unreachable_since is not None:
                log.info("CA reachable again")
            self.upstream_up = True
            self.unreachable_since = None
            self.last_error = None

    def _failed(self, operation: str, exc: UpstreamError) -> None:
        retryable = isinstance(exc, UpstreamUnavailable)
        self.metrics.fetch_errors.labels(operation, "true" if retryable else "false").inc()
        if not retryable:
            # reason: a gRPC status name from GrpcUpstream, a fixed label set.
            self.metrics.refusals.labels(operation, exc.reason).inc()
        if self.upstream_up or self.unreachable_since is None:
            log.warning("CA call %s failed: %s", operation, exc)
            self.unreachable_since = self.clock()
        self.upstream_up = False
        self.last_error = f"{operation}: {exc}"
        self._update_gauges()

    # -- identity ---------------------------------------------------------------------------

    def _accept_identity(self, identity: AgentIdentity) -> None:
        now = self.clock()
        self.node = identity.node_name or self.node
        self._agent_rotate_at = rotation_time(
            now, identity.svid.expires_at, self._rng, self.config.jitter
        )
        if self.cache.set_bundle(identity.bundle):
            self._notify()
        if self.config.data_dir is not None:
            _save_agent_state(
                self.config.data_dir,
                identity.svid,
                identity.bundle,
                self.config.key_passphrase,
            )
        self.identity_ready.set()

    async def establish_identity(self) -> None:
        """Reuse a still-valid agent SVID, or attest (retrying while the CA is down)."""
        current = self.upstream.agent_svid
        if current is not None and current.expires_at > self.clock():
            self._agent_rotate_at = rotation_time(
                current.leaf.not_valid_before_utc, current.expires_at, self._rng, 0.0
            )
            self.identity_ready.set()
            return
        while True:
            try:
                identity = await self.upstream.attest()
            except UpstreamUnavailable as exc:
                self._failed("attest", exc)
                await asyncio.sleep(self._backoff.next_delay())
                continue
            except UpstreamRefused as exc:
                self._failed("attest", exc)
                raise AgentFatalError(f"node attestation refused: {exc}") from exc
            self._backoff.reset()
            self._succeeded()
            self._accept_identity(identity)
            return

    async def _renew_if_due(self, now: dt.datetime) -> None:
        if self._agent_rotate_at is None or now < self._agent_rotate_at:
            return
        try:
            identity = await self.upstream.renew()
        except UpstreamError as exc:
            self._failed("renew", exc)
            raise
        self._accept_identity(identity)

    # -- the sync loop ------------------------------------------------------------------------

    def _fetch_due(self, now: dt.datetime) -> bool:
        # A wake-up for a rotation alone need not re-read every entry of the node: under
        # steady rotations that doubled the CA calls (and the agent's parsing) for nothing.
        fetched = self._entries_fetched
        return (
            self._refetch
            or fetched is None
            or (now - fetched).total_seconds() >= self.config.sync_interval
        )

    async def sync_once(self, *, fetch: bool = True) -> None:
        """One round: renew if due, fetch entries (unless ``fetch`` is False), issue what is
        due. Raises ``UpstreamError``."""
        await self._renew_if_due(self.clock())
        if fetch:
            # Set before the call: a poke() while it is in flight asks for another fetch.
            self._refetch = False
            try:
                entries = await self.upstream.fetch_entries()
            except UpstreamError as exc:
                self._refetch = True
                self._failed("fetch_entries", exc)
                raise
            self._entries_fetched = self.clock()
            if self.cache.set_entries(entries.entries, entries.revision):
                self.jwt_cache.forget_entries(self.cache.entries)
                self._notify()
        due = self.cache.due(self.clock())
        if due:
            await self._issue(due)
        self._succeeded()
        self.last_sync = self.clock()
        self.synced.set()

    def workload_key_algorithm(self) -> KeyAlgorithm:
        """The key type of the next workload keys: the configured one, or the CA's choice
        as its intermediate (the second certificate of the agent's own chain) shows it."""
        if self.config.key_algorithm is not None:
            return self.config.key_algorithm
        told = self.upstream.workload_key_type  # trellis ca serve --workload-key-type
        if told is not None:
            return told
        agent = self.upstream.agent_svid
        if agent is not None and len(agent.chain) > 1:
            issuer_key = agent.chain[1].public_key()
            if is_mldsa(issuer_key):
                return key_algorithm_of(issuer_key)
        return KeyAlgorithm.P256

    async def _issue(self, entries: Sequence[RegistrationEntry]) -> None:
        algorithm = self.workload_key_algorithm()
        keys = [generate_private_key(algorithm) for _ in entries]
        kinds = [
            "initial" if e.entry_id not in self.cache.svids
            else "rotation" if self.cache.svids[e.entry_id].entry.spiffe_id == e.spiffe_id
            else "reissue"
            for e in entries
        ]  # fmt: skip
        outcomes = await asyncio.gather(
            *(self.issuer.submit((e.entry_id, k)) for e, k in zip(entries, keys, strict=True)),
            return_exceptions=True,
        )
        # A failed call fails only the entries it carried: keep what the others signed.
        now = self.clock()
        failure: UpstreamError | None = None
        for entry, key, outcome, kind in zip(entries, keys, outcomes, kinds, strict=True):
            if isinstance(outcome, UpstreamError):
                failure = failure or outcome
            elif isinstance(outcome, BaseException):
                raise outcome  # a bug, not a CA answer: do not hide it
            elif self.cache.store(entry.entry_id, outcome.chain, key, now=now) is not None:
                self.metrics.rotations.labels(kind).inc()
        self._notify()
        if failure is not None:
            self._failed("batch_new_x509_svids", failure)
            raise failure

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        # asyncio.timeout, not wait_for: on 3.11 wait_for returns instead of raising when
        # it is cancelled just as the event fires, and the loop would never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._wake.wait()

    def poke(self) -> None:
        """Run the sync loop now, entries included (tests, SIGHUP)."""
        self._refetch = True
        self._wake.set()

    def _next_delay(self, failed: bool) -> float:
        now = self.clock()
        delay = self._backoff.next_delay() if failed else self.config.sync_interval
        # Never sleep past a rotation or an expiry (an expired SVID must stop being served).
        wake = self.cache.next_wakeup(now) if not failed else self.cache.nearest_expiry()
        if wake is not None:
            delay = min(delay, max(0.0, (wake - now).total_seconds()) + 0.001)
        if self._agent_rotate_at is not None and not failed:
            delay = min(delay, max(0.0, (self._agent_rotate_at - now).total_seconds()))
        if self._entries_fetched is not None and not failed:
            # Entries stay at most one sync interval old even when rotations wake us between.
            since = (now - self._entries_fetched).total_seconds()
            delay = min(delay, max(0.0, self.config.sync_interval - since))
        return delay

    async def sync_loop(self) -> None:
        while True:
            failed = False
            try:
                await self.sync_once(fetch=self._fetch_due(self.clock()))
                self._backoff.reset()
            except UpstreamRefused as exc:
                # E.g. an entry deleted between fetch and sign: refetch soon.
                log.info("CA refused: %s", exc)
                self._refetch = True
                failed = True
            except UpstreamUnavailable:
                failed = True
            if self.cache.expire(self.clock()):
                log.warning("cached SVIDs expired while the CA was unreachable")
                self._notify()
            self._update_gauges()
            await self._sleep(self._next_delay(failed))

    async def bundle_loop(self) -> None:
        while True:
            try:
                async for update in self.upstream.watch_bundle():
                    self._bundle_backoff.reset()
                    bundle = update.bundle
                    if self.cache.set_federated(update.federated):
                        log.info(
                            "federated bundles updated: %s",
                            ", ".join(b.trust_domain.name for b in update.federated) or "none",
                        )
                        self._notify()
                    if self.cache.set_bundle(bundle):
                        self.metrics.bundle_updates.inc()
                        log.info("trust bundle updated (sequence %d)", bundle.sequence)
                        agent = self.upstream.agent_svid
                        if self.config.data_dir is not None and agent is not None:
                            _save_agent_state(
                                self.config.data_dir, agent, bundle, self.config.key_passphrase
                            )
                        self._notify()
                raise UpstreamUnavailable("stream-ended", "bundle stream ended")
            except UpstreamError as exc:
                self._failed("watch_bundle", exc)
                await asyncio.sleep(self._bundle_backoff.next_delay())

    async def run(self) -> None:
        await self.establish_identity()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.sync_loop())
            group.create_task(self.bundle_loop())

    # -- JWT-SVIDs ----------------------------------------------------------------------------

    async def jwt_svid(self, entry: RegistrationEntry, audience: Sequence[str]) -> JwtSvidToken:
        now = self.clock()
        cached = self.jwt_cache.get(entry.entry_id, audience, now)
        if cached is not None:
            return cached
        try:
            token = await self.upstream.new_jwt_svid(entry.entry_id, audience)
        except UpstreamError as exc:
            self._failed("new_jwt_svid", exc)
            raise
        self._succeeded()
        self.jwt_cache.put(entry.entry_id, audience, token, now)
        return token

    # -- health ---------------------------------------------------------------------------------

    def live(self) -> tuple[bool, str]:
        """(would a restart not help?, why). False only once the agent's own SVID has
        expired: a running agent cannot renew it over mutual TLS, a new process attests
        again. A CA that is down, or entries without SVIDs, are no reason to restart: that
        cannot bring the CA back and would throw the cache away."""
        agent = self.upstream.agent_svid
        if self.synced.is_set() and (agent is None or agent.expires_at <= self.clock()):
            return False, "the agent's own SVID has expired; a restart attests again"
        return True, "ok"

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(serving?, details). Degraded (CA down, cache still valid) still counts as serving;
        "starting" (no successful sync yet: no entry is known, Workload API calls wait and
        then get UNAVAILABLE) does not."""
        now = self.clock()
        agent = self.upstream.agent_svid
        nearest = self.cache.nearest_expiry()
        missing = [e for e in self.cache.entries if e not in self.cache.svids]
        if not self.synced.is_set():
            status = "starting"
        elif agent is None or agent.expires_at <= now:
            status = "unhealthy"
        elif not self.upstream_up:
            status = "degraded" if not missing else "unhealthy"
        else:
            status = "ok"
        details: dict[str, Any] = {
            "status": status,
            "synced": self.synced.is_set(),
            "node": self.node,
            "upstream": "reachable" if self.upstream_up else "unreachable",
            "unreachable_since": self.unreachable_since.isoformat()
            if self.unreachable_since
            else None,
            "last_error": self.last_error,
            "last_sync": self.last_sync.isoformat() if self.last_sync else None,
            "entries": len(self.cache.entries),
            "cached_svids": len(self.cache.svids),
            "entries_without_svid": len(missing),
            "nearest_expiry_seconds": (nearest - now).total_seconds() if nearest else None,
            "agent_svid_expiry_seconds": (agent.expires_at - now).total_seconds()
            if agent
            else None,
            "bundle_sequence": self.cache.bundle.sequence if self.cache.bundle else None,
        }
        return status in ("ok", "degraded"), details
