"""Session-ticket encryption key (STEK) rings: from the CA to the sidecars entitled to them.

Two halves, both in the agent's memory only:

* ``StekFollower`` streams ``trellis.ca.v1.CaService/WatchSTEKRings`` over the agent's
  mutual-TLS channel to its CA (through the upstream, after the first sync: the call needs
  the agent SVID) and merges every message into a ``StekStore``. The CA sends the rings of
  the SPIFFE IDs that have entries for this node, each time in full.
* ``SessionKeysApi`` serves ``trellis.workload.v1.SessionKeys/WatchSTEKRing`` on the
  Workload API socket, beside (never inside) the SPIFFE service. A caller is admitted
  exactly as for X509-SVIDs (``WorkloadApi``: the security header, SO_PEERCRED and the
  selectors read from /proc, the first sync) and gets only the rings of the SPIFFE IDs its
  entries give it; asking for any other ID is PERMISSION_DENIED, logged with its pid/uid
  like every Workload API refusal. Streams send the full state at once and again on
  every change, and end with PERMISSION_DENIED when the caller loses the identity.

Merging (``merge_ring``): a restarted CA makes new rings, whose keys the agent has never
seen. Tickets sealed before the restart are under the keys the agent already holds, so
the old active key and the old previous ones stay on as previous keys (decrypt only, at
most 24, each until its own ``not_after``) behind the CA's new active key. The old
``next``, never active anywhere, is dropped.

ECH keys (RFC 9849) come in the same messages: each ring carries its service's ECH keys
(current, next, previous; private halves included, so they go only to that service's sidecars, as
the STEKs do), and every message carries the public ECH keys of every service, which any
attested caller gets: it is what a client seals its ClientHello to, and it is published in
DNS anyway. The agent passes the CA's ECH keys on as they come (no merge: a client holding
a config a restarted CA no longer has is rejected with retry_configs and retries once).

Log lines name SPIFFE IDs and key ids (which travel in the clear in every ticket), never
key bytes; values holding a key leave it out of their repr().
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from ca.agent.backoff import Backoff
from ca.agent.rotator import Rotator
from ca.agent.upstream import UpstreamError, UpstreamRefused
from ca.agent.workload_api import WorkloadApi, _Abort
from ca.api._proto import ca_pb2, session_keys_pb2
from ca.spiffeid import SpiffeId, SpiffeIdError

__all__ = [
    "MAX_PREVIOUS",
    "SERVICE",
    "EchKey",
    "SessionKeysApi",
    "Stek",
    "StekFollower",
    "StekMessageError",
    "StekRing",
    "StekSource",
    "StekStore",
    "ech_public_from_proto",
    "merge_ring",
    "rings_from_proto",
]

log = logging.getLogger("trellis.agent.stek")

SERVICE = "trellis.workload.v1.SessionKeys"
MAX_PREVIOUS = 24
KEY_ID_LENGTH = 16
KEY_LENGTH = 32
# The most rings one CA message may carry (one per SPIFFE ID on this node): far above any
# real node, low enough that a broken CA cannot make the agent hold unbounded keys.
MAX_RINGS = 10_000
ECH_KEY_LENGTH = 32  # X25519, either half
MAX_ECH_KEYS = 4  # the CA sends three (current, next, previous); room for one more


class StekMessageError(ValueError):
    """The CA sent a ring the agent cannot use (bad key length, no active key, ...)."""


@dataclass(frozen=True, slots=True)
class Stek:
    key_id: bytes
    key: bytes = field(repr=False)
    not_before: float
    not_after: float


@dataclass(frozen=True, slots=True)
class EchKey:
    """An ECH key pair and its ECHConfig's fields; ``private_key`` is b"" in public ones."""

    config_id: int
    public_key: bytes
    private_key: bytes = field(repr=False)
    public_name: str
    not_before: float
    not_after: float


@dataclass(frozen=True, slots=True)
class StekRing:
    spiffe_id: SpiffeId
    active: Stek
    previous: tuple[Stek, ...]
    next: Stek | None
    rotation_seconds: float
    ech: tuple[EchKey, ...] = ()  # current first


@runtime_checkable
class StekSource(Protocol):
    """What the follower needs of the upstream (``GrpcUpstream`` has it; an in-process
    upstream has no CA to follow, so its agent serves no rings)."""

    def watch_stek_rings(self) -> AsyncIterator[ca_pb2.STEKRings]: ...


def _stek(message: ca_pb2.STEK, where: str) -> Stek:
    if len(message.key_id) != KEY_ID_LENGTH or len(message.key) != KEY_LENGTH:
        raise StekMessageError(f"{where}: a STEK is a 16-byte id and a 32-byte key")
    if not message.not_after > message.not_before:
        raise StekMessageError(f"{where}: not_after must follow not_before")
    return Stek(message.key_id, message.key, message.not_before, message.not_after)


def _ech_keys(keys: Iterable[ca_pb2.ECHKey], where: str, private: bool) -> tuple[EchKey, ...]:
    result = []
    for key in keys:
        if key.config_id > 0xFF or len(key.public_key) != ECH_KEY_LENGTH:
            raise StekMessageError(f"{where}: an ECH key is a one-byte id and an X25519 key")
        if len(key.private_key) != (ECH_KEY_LENGTH if private else 0):
            # A public config with a private key is a CA bug that would leak a service's
            # key to every node: refuse it rather than pass it on.
            raise StekMessageError(f"{where}: ECH private key {'missing' if private else 'sent'}")
        if not key.public_name or not key.not_after > key.not_before:
            raise StekMessageError(f"{where}: an ECH key needs a public name and a lifetime")
        result.append(
            EchKey(
                key.config_id,
                key.public_key,
                key.private_key,
                key.public_name,
                key.not_before,
                key.not_after,
            )
        )
    if len(result) > MAX_ECH_KEYS:
        raise StekMessageError(f"{where}: over {MAX_ECH_KEYS} ECH keys")
    return tuple(result)


def ech_public_from_proto(
    message: ca_pb2.STEKRings,
) -> tuple[tuple[SpiffeId, tuple[EchKey, ...]], ...]:
    """Every service's public ECH keys in one CA message."""
    if len(message.ech_public) > MAX_RINGS:
        raise StekMessageError(f"{len(message.ech_public)} ECH configs in one message")
    result = []
    for config in message.ech_public:
        try:
            spiffe_id = SpiffeId(config.spiffe_id)
        except SpiffeIdError as exc:
            raise StekMessageError(f"ECH config for {config.spiffe_id!r}: {exc}") from exc
        result.append((spiffe_id, _ech_keys(config.keys, str(spiffe_id), private=False)))
    return tuple(result)


def rings_from_proto(message: ca_pb2.STEKRings) -> tuple[StekRing, ...]:
    """The rings of one CA message; ``StekMessageError`` for anything unusable."""
    if len(message.rings) > MAX_RINGS:
        raise StekMessageError(f"{len(message.rings)} rings in one message")
    rings = []
    for ring in message.rings:
        try:
            spiffe_id = SpiffeId(ring.spiffe_id)
        except SpiffeIdError as exc:
            raise StekMessageError(f"ring for {ring.spiffe_id!r}: {exc}") from exc
        if not ring.HasField("active"):
            raise StekMessageError(f"ring for {spiffe_id} has no active key")
        if len(ring.previous) > MAX_PREVIOUS:
            raise StekMessageError(f"ring for {spiffe_id} has over {MAX_PREVIOUS} old keys")
        rings.append(
            StekRing(
                spiffe_id,
                _stek(ring.active, str(spiffe_id)),
                tuple(_stek(k, str(spiffe_id)) for k in ring.previous),
                _stek(ring.next, str(spiffe_id)) if ring.HasField("next") else None,
                ring.rotation_seconds,
                _ech_keys(ring.ech_keys, str(spiffe_id), private=True),
            )
        )
    return tuple(rings)


def merge_ring(held: StekRing | None, received: StekRing, now: float) -> StekRing:
    """``received`` with the keys of ``held`` that still open tickets kept as previous
    ones (see the module doc: a CA restart must not cut tickets short)."""
    if held is None:
        return received
    current = {received.active.key_id} | ({received.next.key_id} if received.next else set())
    pool: dict[bytes, Stek] = {}
    for key in (*received.previous, held.active, *held.previous):
        if key.key_id not in current and key.not_after > now and key.not_before <= now:
            pool.setdefault(key.key_id, key)
    previous = sorted(pool.values(), key=lambda k: k.not_before, reverse=True)[:MAX_PREVIOUS]
    return StekRing(
        received.spiffe_id, received.active, tuple(previous), received.next,
        received.rotation_seconds, received.ech,
    )  # fmt: skip


class StekStore:
    """The rings this agent holds, by SPIFFE ID, and a way to wait for a change."""

    def __init__(self) -> None:
        self.rings: dict[SpiffeId, StekRing] = {}
        self.ech_public: tuple[tuple[SpiffeId, tuple[EchKey, ...]], ...] = ()
        self.version = 0
        self._changed = asyncio.Event()

    def update(
        self,
        received: Iterable[StekRing],
        now: float,
        ech_public: tuple[tuple[SpiffeId, tuple[EchKey, ...]], ...] = (),
    ) -> bool:
        """One CA message (the full set for this node); whether anything changed."""
        new = {r.spiffe_id: merge_ring(self.rings.get(r.spiffe_id), r, now) for r in received}
        if new == self.rings and ech_public == self.ech_public:
            return False
        self.rings = new
        self.ech_public = ech_public
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()
        return True

    def rings_for(self, spiffe_ids: Iterable[SpiffeId]) -> tuple[StekRing, ...]:
        wanted = set(spiffe_ids)
        return tuple(self.rings[i] for i in sorted(wanted, key=str) if i in self.rings)

    async def wait_for_change(self, seen_version: int) -> None:
        while self.version == seen_version:
            await self._changed.wait()


class StekFollower:
    """Keeps a ``StekStore`` in step with the CA; retries with backoff, forever.

    A CA that does not know the RPC (UNIMPLEMENTED, an older CA) is asked again only after
    the backoff cap: the sidecars meanwhile say they have no ring and send no tickets."""

    def __init__(
        self,
        source: StekSource,
        store: StekStore,
        synced: asyncio.Event,
        *,
        clock: Callable[[], float],
        backoff: Backoff | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.synced = synced
        self.clock = clock
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.last_error: str | None = None

    async def run(self) -> None:
        await self.synced.wait()
        while True:
            try:
                async for message in self.source.watch_stek_rings():
                    rings = rings_from_proto(message)
                    ech_public = ech_public_from_proto(message)
                    self.backoff.reset()
                    self.last_error = None
                    if self.store.update(rings, self.clock(), ech_public):
                        log.info(
                            "stek-rings-received",
                            extra={
                                "fields": {
                                    "spiffe_ids": [str(r.spiffe_id) for r in rings],
                                    "active_key_ids": [r.active.key_id.hex() for r in rings],
                                }
                            },
                        )
            except (UpstreamError, StekMessageError) as exc:
                self.last_error = str(exc)
                delay = (
                    self.backoff.cap
                    if isinstance(exc, UpstreamRefused)
                    else self.backoff.next_delay()
                )
                log.warning(
                    "stek-watch-failed",
                    extra={"fields": {"error": str(exc), "retry_in": round(delay, 2)}},
                )
                await asyncio.sleep(delay)
                continue
            await asyncio.sleep(self.backoff.next_delay())  # the CA ended the stream (OK)


def _stek_to_proto(key: Stek) -> session_keys_pb2.STEK:
    return session_keys_pb2.STEK(
        key_id=key.key_id, key=key.key, not_before=key.not_before, not_after=key.not_after
    )


def _ech_to_proto(key: EchKey) -> session_keys_pb2.ECHKey:
    return session_keys_pb2.ECHKey(
        config_id=key.config_id,
        public_key=key.public_key,
        private_key=key.private_key,
        public_name=key.public_name,
        not_before=key.not_before,
        not_after=key.not_after,
    )


def rings_to_proto(
    rings: Iterable[StekRing],
    ech_public: Iterable[tuple[SpiffeId, tuple[EchKey, ...]]] = (),
) -> session_keys_pb2.STEKRingResponse:
    response = session_keys_pb2.STEKRingResponse()
    for ring in rings:
        message = response.rings.add()
        message.spiffe_id = str(ring.spiffe_id)
        message.active.CopyFrom(_stek_to_proto(ring.active))
        message.previous.extend(_stek_to_proto(k) for k in ring.previous)
        if ring.next is not None:
            message.next.CopyFrom(_stek_to_proto(ring.next))
        message.rotation_seconds = ring.rotation_seconds
        message.ech_keys.extend(_ech_to_proto(k) for k in ring.ech)
    for spiffe_id, keys in ech_public:
        config = response.ech_public.add()
        config.spiffe_id = str(spiffe_id)
        config.keys.extend(_ech_to_proto(k) for k in keys)
    return response


class SessionKeysApi:
    """``trellis.workload.v1.SessionKeys`` on the Workload API socket (see the module doc).

    It admits callers through the agent's ``WorkloadApi`` (the same package), so the rules
    and the refusal log line are the SPIFFE service's own, not a second copy of them."""

    def __init__(self, workload_api: WorkloadApi, store: StekStore) -> None:
        self.api = workload_api
        self.store = store

    @property
    def rotator(self) -> Rotator:
        return self.api.rotator

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "WatchSTEKRing": grpc.unary_stream_rpc_method_handler(
                    self.api._streaming("WatchSTEKRing", self.watch_stek_ring),
                    # Parsed by the handler: bytes that are no request are INVALID_ARGUMENT
                    # and one log line, not a DecodeError traceback out of grpc.
                    request_deserializer=bytes,
                    response_serializer=lambda m: m.SerializeToString(),
                )
            },
        )

    async def _wait(self, store_version: int, cache_version: int) -> None:
        waits = [
            asyncio.ensure_future(self.store.wait_for_change(store_version)),
            asyncio.ensure_future(self.rotator.wait_for_change(cache_version)),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()

    async def watch_stek_ring(
        self, raw: bytes, context: Any
    ) -> AsyncIterator[session_keys_pb2.STEKRingResponse]:
        try:
            request = session_keys_pb2.WatchSTEKRingRequest.FromString(raw)
        except DecodeError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "not a WatchSTEKRingRequest") from exc
        wanted: SpiffeId | None = None
        if request.spiffe_id:
            try:
                wanted = SpiffeId(request.spiffe_id)
            except SpiffeIdError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        api = self.api
        caller = await api._admit(context)
        last: bytes | None = None
        while True:
            store_version, cache_version = self.store.version, self.rotator.cache.version
            api._still_connected(caller)
            entitled = {entry.spiffe_id for entry in api._identified(caller)}
            if wanted is not None and wanted not in entitled:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the caller holds no identity {wanted}, so not its STEK ring",
                )
            rings = self.store.rings_for({wanted} if wanted is not None else entitled)
            response = rings_to_proto(rings, self.store.ech_public)
            payload = response.SerializeToString(deterministic=True)
            if rings and payload != last:
                last = payload
                api._log_issued(
                    "stek-ring-sent",
                    caller,
                    [str(r.spiffe_id) for r in rings],
                    active_key_ids=[r.active.key_id.hex() for r in rings],
                )
                yield response
            await self._wait(store_version, cache_version)
