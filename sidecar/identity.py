"""The sidecar's own identity: the SVID it presents and the bundles it trusts.

`Identity` is the pure part: it holds the current SVID and bundles and derives the
engine's `TLSConfig`s from them (cached per generation, so a busy sidecar builds each
once). Every new handshake asks for a config, so a rotated SVID or bundle applies to the
next handshake at once while established connections keep the keys they negotiated --
but not for ever: listeners (`subscribe`) hear of every change, and the sessions drain a
connection whose peer chain no longer verifies against the new bundles, or whose own
SVID was withdrawn (`withdraw`: the agent no longer issues it).

Resumption: `tickets` is the client side's store (per endpoint and expected SPIFFE ID,
each ticket used once), handed to every client config with `trust_generation`, which
moves on, and empties the store, whenever the bundles change or our SVID is withdrawn:
a resumed connection skips the certificate exchange, so no ticket may outlive the trust
it was issued under. Server side, `ticket_ring` (the service's shared STEK ring, set by
the sidecar once its agent hands it over) makes the server config send and accept
tickets, and 0-RTT up to `max_early_data` bytes, each ticket's early data admitted once
by `replay_cache` and only at the replica that issued it (`replica_id`, strict mode).

Sources: `WorkloadApiWatcher` streams FetchX509SVID and FetchX509Bundles from the agent
(grpc.aio on the Unix socket, `workload.spiffe.io: true` metadata, reconnecting with a
capped backoff); `load_svid_dir` reads svid.pem / svid.key / bundle.pem for local tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from ca.spiffeid import SpiffeId, TrustDomain
from ca.workload import HEADER_KEY, HEADER_VALUE, method_path, workload_pb2
from ca.x509svid import SvidError, load_der_chain, spiffe_id_of
from sidecar.tls import SpiffeVerifier, TLSConfig, TLSError
from sidecar.tls.ech import ECHKey
from sidecar.tls.replay import ReplayCache
from sidecar.tls.signatures import DEFAULT_CERTIFICATE_SIGNATURE_SCHEMES, PrivateKey
from sidecar.tls.tickets import StekRing
from sidecar.tls.ticketstore import TicketStore

logger = logging.getLogger("sidecar.identity")

__all__ = [
    "Identity",
    "IdentityChange",
    "IdentityError",
    "Svid",
    "WorkloadApiWatcher",
    "load_svid_dir",
]

ALPN = ("h2",)
# 0-RTT a Trellis server accepts: a request head and the HTTP/2 preface with room to
# spare (RFC 8446 §4.2.10 max_early_data_size; the client sends at most MAX_FIRST_FLIGHT).
DEFAULT_MAX_EARLY_DATA = 16 * 1024


class IdentityError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Svid:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey

    @property
    def not_after(self) -> dt.datetime:
        return self.chain[0].not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.chain[0].serial_number


@dataclass(frozen=True, slots=True)
class IdentityChange:
    """What one `Identity.update` / `withdraw` changed, for its listeners."""

    # Trust domains that lost a root: only their peers' chains need verifying again (a
    # root added, as in a rotation's overlap, cannot make a verified chain fail).
    roots_removed: frozenset[str]
    withdrawn: bool  # the SVID is gone (or names another ID): drain what it authenticated


class Identity:
    """Current SVID + bundles; `server_config()` / `client_config(ids)` for new handshakes."""

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        self.svid: Svid | None = None
        self.bundles: dict[str, tuple[x509.Certificate, ...]] = {}
        self.generation = 0
        self._server: TLSConfig | None = None
        self._clients: dict[tuple[str, ...], TLSConfig] = {}
        self._on_change = on_change
        self._listeners: list[Callable[[IdentityChange], None]] = []
        self._verifier: SpiffeVerifier | None = None  # over `bundles`, built when needed
        self.tickets = TicketStore()
        self.trust_generation = 0
        self._ticket_ring: StekRing | None = None
        self.replica_id = os.urandom(16)
        self.replay_cache = ReplayCache()
        self.max_early_data = DEFAULT_MAX_EARLY_DATA
        # Encrypted ClientHello (RFC 9849, keys from the agent: sidecar.stek, echkeys).
        self._ech_keys: tuple[ECHKey, ...] = ()
        self._ech_configs: dict[SpiffeId, bytes] = {}
        # Services that rejected ECH without retry configs: a peer that does not do ECH
        # (a go-spiffe or other non-Trellis workload of the trust domain).
        self._ech_disabled: set[SpiffeId] = set()

    def set_ech(self, keys: Sequence[ECHKey], configs: Mapping[SpiffeId, bytes]) -> None:
        """Our service's ECH keys (current first) and the ECHConfigList of every service
        we may call; the next handshakes use them."""
        self._ech_keys = tuple(keys)
        self._ech_configs = {i: c for i, c in configs.items() if i not in self._ech_disabled}
        self._server = None
        self._clients = {}

    def ech_rejected(self, expected: Sequence[SpiffeId], retry_configs: bytes | None) -> None:
        """The service rejected the config we sealed to (RFC 9849 §6.1.6: it holds newer
        keys than our agent told us of yet): the next dial seals to its retry_configs,
        which the rejected handshake authenticated. Without retry configs the service
        does not do ECH at all (§6.1.6: ECH is then securely disabled, the outer handshake
        having been authenticated): the next dials send GREASE ECH instead."""
        if len(expected) != 1:
            return
        if retry_configs:
            self._ech_configs[expected[0]] = retry_configs
        else:
            self._ech_disabled.add(expected[0])
            self._ech_configs.pop(expected[0], None)
        self._clients = {}

    @property
    def ticket_ring(self) -> StekRing | None:
        return self._ticket_ring

    @ticket_ring.setter
    def ticket_ring(self, ring: StekRing | None) -> None:
        """The service's STEK ring (installed in place as it rotates); None: no tickets."""
        self._ticket_ring = ring
        self._server = None  # the next handshake's config carries it

    def subscribe(self, listener: Callable[[IdentityChange], None]) -> None:
        """Call `listener` after every update (from the event loop that updates)."""
        self._listeners.append(listener)

    @property
    def trust_domain(self) -> TrustDomain | None:
        return self.svid.spiffe_id.trust_domain if self.svid is not None else None

    def ready(self, now: dt.datetime) -> bool:
        svid = self.svid
        return (
            svid is not None
            and bool(self.bundles)
            and svid.chain[0].not_valid_before_utc <= now < svid.not_after
        )

    def update(
        self,
        svid: Svid | None = None,
        bundles: Mapping[str, Sequence[x509.Certificate]] | None = None,
    ) -> None:
        """A new SVID and/or the full bundle set (each Workload API message carries the
        whole state, so bundles replace rather than merge: a root dropped upstream stops
        being trusted here). Applies to the next handshake; live connections keep theirs
        unless the listeners find that the change withdraws what authenticated them."""
        previous = self.svid
        removed: frozenset[str] = frozenset()
        bundles_changed = False
        if svid is not None:
            self.svid = svid
        if bundles is not None:
            new = {td: tuple(certs) for td, certs in bundles.items()}
            if new != self.bundles:
                self._verifier = None
                bundles_changed = True
            removed = frozenset(
                td for td, roots in self.bundles.items() if not set(roots) <= set(new.get(td, ()))
            )
            self.bundles = new
        # An SVID for another SPIFFE ID (the entry was changed under us) withdraws the
        # old one: connections it authenticated must not outlive it.
        withdrawn = (
            previous is not None and svid is not None and svid.spiffe_id != previous.spiffe_id
        )
        if bundles_changed or withdrawn:
            self._drop_tickets()
        self._changed(IdentityChange(removed, withdrawn))

    def _drop_tickets(self) -> None:
        # Tickets were issued to connections checked against the old trust (or for the
        # SPIFFE ID we no longer hold): none may resume now.
        self.trust_generation += 1
        self.tickets.clear()

    def withdraw(self) -> None:
        """The agent no longer issues our SVID (its entry was deleted): no new handshakes,
        and connections it authenticated drain."""
        if self.svid is None:
            return
        self.svid = None
        self._drop_tickets()
        self._changed(IdentityChange(roots_removed=frozenset(), withdrawn=True))

    def _changed(self, change: IdentityChange) -> None:
        self.generation += 1
        self._server = None
        self._clients = {}
        if self._on_change is not None:
            self._on_change()
        for listener in list(self._listeners):
            listener(change)

    def presents(self, chain: Sequence[x509.Certificate]) -> bool:
        """Whether `chain` (what we presented on a connection) is still our identity: an
        SVID is held and names the same SPIFFE ID (a rotation keeps it; withdrawal or an
        entry now naming another ID does not)."""
        svid = self.svid
        if svid is None or not chain:
            return False
        try:
            return spiffe_id_of(chain[0]) == svid.spiffe_id
        except SvidError:
            return False

    def distrust_reason(
        self, chain: Sequence[x509.Certificate], *, peer_is_server: bool, now: dt.datetime
    ) -> str | None:
        """None if a peer's `chain` still verifies against the current bundles, else why
        not (the engine's verifier, so exactly the handshake's rules apply)."""
        if not chain:
            return "no peer chain"
        verifier = self._verifier
        if verifier is None:
            verifier = self._verifier = SpiffeVerifier(self.bundles)
        der = [cert.public_bytes(Encoding.DER) for cert in chain]
        try:
            verifier.verify(der, now, peer_is_server, DEFAULT_CERTIFICATE_SIGNATURE_SCHEMES)
        except TLSError as exc:
            return str(exc)
        return None

    def _base(self) -> tuple[Svid, dict[str, tuple[x509.Certificate, ...]]]:
        if self.svid is None or not self.bundles:
            raise IdentityError("no SVID (not issued yet, or withdrawn)")
        return self.svid, self.bundles

    def server_config(self) -> TLSConfig:
        if self._server is None:
            svid, bundles = self._base()
            # Any verified peer gets in at the TLS layer; authorisation is per stream.
            self._server = TLSConfig(
                rng=os.urandom,
                certificate_chain=svid.chain,
                private_key=svid.private_key,
                trust_bundles=bundles,
                alpn_protocols=ALPN,
                require_client_certificate=True,
                ticket_ring=self.ticket_ring,
                replica_id=self.replica_id,
                max_early_data=self.max_early_data if self.ticket_ring is not None else 0,
                replay_cache=self.replay_cache,
                grease=True,  # RFC 8701: keep peers honest about unknown values
                ech_keys=self._ech_keys,
            )
        return self._server

    def client_config(self, expected: Sequence[SpiffeId]) -> TLSConfig:
        key = tuple(sorted(str(i) for i in expected))
        config = self._clients.get(key)
        if config is None:
            svid, bundles = self._base()
            allowed = frozenset(expected)
            own = svid.spiffe_id.trust_domain

            def policy(spiffe_id: SpiffeId) -> bool:
                if allowed:
                    return spiffe_id in allowed
                # No IDs given: any peer of our own trust domain.
                return spiffe_id.trust_domain == own and bool(spiffe_id.path)

            # RFC 9849: sealed to the one service we expect, if it has ECH; otherwise a
            # GREASE ECH extension (§6.2), so no hello says whether ECH is in use.
            ech = self._ech_configs.get(expected[0]) if len(expected) == 1 else None
            # A rejection's retry_configs come with the outer handshake authenticated as
            # the public name, our trust domain's name: any SVID of it vouches for them.
            public_name = SpiffeVerifier(
                {own.name: bundles.get(own.name, ())}, lambda i: i.trust_domain == own
            )
            config = TLSConfig(
                rng=os.urandom,
                certificate_chain=svid.chain,
                private_key=svid.private_key,
                trust_bundles=bundles,
                alpn_protocols=ALPN,
                peer_policy=policy,
                ticket_store=self.tickets,
                trust_generation=self.trust_generation,
                grease=True,  # RFC 8701: keep peers honest about unknown values
                ech_config_list=ech,
                ech_grease=ech is None,
                ech_public_name_verifier=public_name,
            )
            self._clients[key] = config
        return config

    def describe(self) -> dict[str, Any]:
        svid = self.svid
        return {
            "spiffe_id": str(svid.spiffe_id) if svid else None,
            "serial": format(svid.serial, "x") if svid else None,
            "not_after": svid.not_after.isoformat() if svid else None,
            "generation": self.generation,
            "bundles": {
                td: [format(c.serial_number, "x") for c in certs]
                for td, certs in sorted(self.bundles.items())
            },
        }


# --- sources -----------------------------------------------------------------------------


def split_der(data: bytes) -> list[x509.Certificate]:
    """Certificates from concatenated DER (the Workload API's chain/bundle encoding)."""
    try:
        return load_der_chain(data)
    except ValueError as exc:
        raise IdentityError(str(exc)) from exc


def _spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    try:
        return spiffe_id_of(cert)
    except SvidError as exc:
        raise IdentityError(f"not an SVID: {exc}") from exc


def _private_key(key: Any) -> PrivateKey:
    return key  # type: ignore[no-any-return]


def load_svid_dir(directory: str | Path) -> tuple[Svid, dict[str, tuple[x509.Certificate, ...]]]:
    """svid.pem (leaf first, then intermediates), svid.key (PKCS#8 PEM), bundle.pem (roots
    of the SVID's own trust domain)."""
    base = Path(directory)
    try:
        chain = tuple(x509.load_pem_x509_certificates((base / "svid.pem").read_bytes()))
        key = serialization.load_pem_private_key((base / "svid.key").read_bytes(), None)
        roots = tuple(x509.load_pem_x509_certificates((base / "bundle.pem").read_bytes()))
    except (OSError, ValueError) as exc:
        raise IdentityError(f"--svid-dir {base}: {exc}") from exc
    spiffe_id = _spiffe_id_of(chain[0])
    return Svid(spiffe_id, chain, _private_key(key)), {spiffe_id.trust_domain.name: roots}


def _td_name(key: str) -> str:
    return TrustDomain(key).name


class WorkloadApiWatcher:
    """Streams SVIDs and bundles from the agent into an `Identity`, forever."""

    def __init__(self, target: str, identity: Identity, spiffe_id: SpiffeId | None = None) -> None:
        self.target = target
        self.identity = identity
        self.spiffe_id = spiffe_id
        self.last_error: str | None = None
        self.updates = 0

    async def run(self) -> None:
        await asyncio.gather(self._loop(self._x509_svids), self._loop(self._x509_bundles))

    async def _loop(self, body: Callable[[grpc.aio.Channel], Any]) -> None:
        delay = 0.2
        while True:
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    await body(channel)
                    delay = 0.2
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, IdentityError, ValueError) as exc:
                self.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                logger.warning("Workload API %s: %s (retrying in %.1fs)", self.target, exc, delay)
                if (
                    isinstance(exc, grpc.aio.AioRpcError)
                    and exc.code() == grpc.StatusCode.PERMISSION_DENIED
                ):
                    # Workload API §5: "no identity issued" -- our entry is gone (an agent
                    # that has not synced yet answers UNAVAILABLE, never this).
                    self.identity.withdraw()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _stream(self, channel: grpc.aio.Channel, method: str, request: Any, response: Any) -> Any:
        call: Any = channel.unary_stream(
            method_path(method),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString,
        )
        return call(request, metadata=((HEADER_KEY, HEADER_VALUE),))

    async def _x509_svids(self, channel: grpc.aio.Channel) -> None:
        stream = self._stream(
            channel, "FetchX509SVID", workload_pb2.X509SVIDRequest(), workload_pb2.X509SVIDResponse
        )
        async for message in stream:
            chosen = None
            for item in message.svids:
                if self.spiffe_id is None or SpiffeId(item.spiffe_id) == self.spiffe_id:
                    chosen = item
                    break
            if chosen is None:
                self.last_error = f"the agent offers no SVID for {self.spiffe_id}"
                logger.warning("%s", self.last_error)
                self.identity.withdraw()
                continue
            chain = tuple(split_der(chosen.x509_svid))
            key = serialization.load_der_private_key(chosen.x509_svid_key, None)
            svid = Svid(SpiffeId(chosen.spiffe_id), chain, _private_key(key))
            bundles = {svid.spiffe_id.trust_domain.name: tuple(split_der(chosen.bundle))}
            for td, der in message.federated_bundles.items():
                bundles[_td_name(td)] = tuple(split_der(der))
            self.updates += 1
            self.last_error = None
            self.identity.update(svid=svid, bundles=bundles)
            logger.info("SVID %s serial %x until %s", svid.spiffe_id, svid.serial, svid.not_after)

    async def _x509_bundles(self, channel: grpc.aio.Channel) -> None:
        stream = self._stream(
            channel,
            "FetchX509Bundles",
            workload_pb2.X509BundlesRequest(),
            workload_pb2.X509BundlesResponse,
        )
        async for message in stream:
            bundles = {_td_name(td): tuple(split_der(der)) for td, der in message.bundles.items()}
            if bundles:
                self.updates += 1
                self.identity.update(bundles=bundles)
