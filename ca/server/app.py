"""The ``trellis ca serve`` process: the gRPC listeners, the bundle and metrics endpoints,
the reload loop, and a graceful stop.

Listeners:

* ``listen`` (mTLS): every RPC but attestation; the client certificate is the agent SVID.
* ``attest_listen`` (server-auth TLS): AttestAgent, for agents that have no SVID yet.
  (grpcio's server credentials either require a client certificate or never ask for one,
  so "optional client certificate" needs its own port.)
* ``bundle_listen`` (HTTPS, aiohttp): the SPIFFE bundle document for federation
  (``GET /`` or ``/bundle.json``), served with the CA server's own SVID
  (the ``https_spiffe`` federation profile).
* ``metrics_listen`` (HTTP): ``/metrics`` in the Prometheus text format, ``/healthz``.
* ``admin_socket`` (HTTP on a 0600 Unix socket): the read-only admin API of
  ``ca.server.admin`` (status, entries, agents), for ``trellis ca entries list`` and
  ``trellis check``.

The server's own SVID (``spiffe://<td>/trellis/ca/<cluster>``, DNS SANs ``trellis-ca``,
``localhost`` and the listen host) is minted from the intermediate at start and re-minted
at half its life; gRPC picks the new one up for new handshakes without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import signal
import ssl
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from ca.authority import IntermediateAuthority
from ca.bundle import TrustBundle
from ca.entries import (
    EntrySource,
    FileStamp,
    StaticEntrySource,
    YamlFileEntrySource,
    file_stamp,
)
from ca.keys import KeyAlgorithm, generate_private_key, private_key_pem
from ca.rotation import IssuanceLedger, LedgerError, load_ledger
from ca.server.attestation import JoinTokenRegistry
from ca.server.bans import BanListFile
from ca.server.federation import (
    FederationConfigError,
    FederationFetcher,
    load_federation_file,
)
from ca.server.grpc_shell import BundleWatch, SigningStreams, make_handler
from ca.server.metrics import CaMetrics
from ca.server.service import (
    MAX_PREVIOUS_INTERMEDIATES,
    CaService,
    ServiceConfig,
    TokenReviewer,
    log_event,
)
from ca.server.signer import ProcessPoolSigner
from ca.server.stek import DEFAULT_ROTATION, StekLeader, StekWatch
from ca.server.tokens import JoinTokenStore
from ca.spiffeid import TrustDomain
from ca.store import CaStore, StoreError
from ca.x509svid import X509Svid
from core.eventloop import settle_heap

__all__ = ["CaServer", "ServerConfig", "split_address"]

GRPC_HARD_LIMIT = 4 * 1024 * 1024
MAX_STREAMS_PER_AGENT = 64


def _issued_by_one_of(certificate: x509.Certificate, roots: Sequence[x509.Certificate]) -> bool:
    for root in roots:
        try:
            certificate.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):  # other issuer, key type, signature
            continue
        return True
    return False


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServerConfig:
    ca_dir: Path
    cluster: str
    listen: str = "127.0.0.1:8081"
    attest_listen: str = "127.0.0.1:8082"
    bundle_listen: str | None = "127.0.0.1:8443"
    metrics_listen: str | None = None
    admin_socket: Path | None = None  # ca.server.admin; None: no admin API
    entries_path: Path | None = None
    federation_path: Path | None = None
    banned_agents_path: Path | None = None
    join_token_nodes: tuple[str, ...] = ()
    join_token_ttl: dt.timedelta = dt.timedelta(hours=1)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    server_svid_ttl: dt.timedelta = dt.timedelta(hours=24)
    poll_interval: float = 1.0
    # How often join-token files that have expired are deleted (and once at start): a
    # token file is only removed when redeemed, so unused ones would pile up forever.
    token_purge_interval: float = 60.0
    token_reviewer: TokenReviewer | None = None
    sign_workers: int = 0  # 0: sign on the event loop; N: in N worker processes
    # Opens an encrypted intermediate and JWT key (trellis ca intermediate with a key
    # passphrase); None for unencrypted ones, e.g. from a Kubernetes Secret.
    key_passphrase: bytes | None = field(default=None, repr=False)
    # How long each service identity's session-ticket key seals tickets (ca.server.stek).
    stek_rotation: dt.timedelta = DEFAULT_ROTATION


@dataclass(frozen=True)
class _Credentials:
    svid: X509Svid
    key_pem: bytes
    chain_pem: bytes
    roots_pem: bytes


class CaServer:
    def __init__(self, config: ServerConfig, *, entries: EntrySource | None = None) -> None:
        self.config = config
        store = CaStore(config.ca_dir, key_passphrase=config.key_passphrase)
        self.store = store
        self.intermediate = store.load_intermediate(config.cluster)
        self.trust_domain = self.intermediate.trust_domain
        jwt = store.load_jwt_authority(config.cluster)
        self._bundle_stamp = self._bundle_mtime()
        self._intermediate_stamp = self._intermediate_mtime()
        self.bundles = BundleWatch(store.load_bundle(self.trust_domain))
        self.signing_streams = SigningStreams()
        # STEK rings live only in this process's memory: never in ca_dir.
        self.steks = StekWatch(StekLeader(config.stek_rotation))
        self._stek_revision: str | None = None
        if entries is None:
            entries = (
                YamlFileEntrySource(config.entries_path, trust_domain=self.trust_domain)
                if config.entries_path is not None
                else StaticEntrySource()
            )
        self.entries = entries
        self.metrics = CaMetrics(self.trust_domain.name, config.cluster)
        # The first load raises FederationConfigError: never start on a broken file.
        self._federation_stamp = self._federation_mtime()
        self.federation = FederationFetcher(
            load_federation_file(config.federation_path, own=self.trust_domain)
            if config.federation_path is not None
            else (),
            on_change=self._federated_changed,
            metric=self.metrics.federation_fetch,
        )
        # The first load raises BanListError: never start without the bans asked for.
        self.bans = (
            BanListFile(config.banned_agents_path)
            if config.banned_agents_path is not None
            else None
        )
        self.token_store = JoinTokenStore(store.cluster_dir(config.cluster))
        self.join_tokens = JoinTokenRegistry(
            lookup=self.token_store.lookup, on_redeemed=self.token_store.remove
        )
        self.service = CaService(
            intermediate=self.intermediate,
            jwt_authority=jwt,
            bundle=lambda: self.bundles.current,
            entries=entries,
            join_tokens=self.join_tokens,
            metrics=self.metrics,
            config=config.service,
            token_reviewer=config.token_reviewer,
            banned=self.bans.current if self.bans is not None else frozenset,
        )
        # Intermediates a rotation replaced stay candidate issuers of agents' leaves until
        # they expire, across a restart too (an agent renews with the SVID it holds).
        with contextlib.suppress(StoreError):
            replaced = [cert for _, cert in store.superseded_intermediates(config.cluster)]
            replaced.sort(key=lambda c: c.not_valid_before_utc, reverse=True)
            self.service.previous_intermediates = tuple(replaced[:MAX_PREVIOUS_INTERMEDIATES])
        self._ledger_error: str | None = None
        self.ledger = self._open_ledger()
        self.service.on_issued = self.ledger.issued
        self.addresses: dict[str, str] = {}
        self.issued_tokens: dict[str, str] = {}
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._creds_lock = threading.Lock()
        self._creds = self._mint_credentials()
        self._creds_version = 0
        self._served_versions: dict[str, int] = {}
        self._bundle_ssl: ssl.SSLContext | None = None
        self._stopped = asyncio.Event()

    # -- the issuance record (ca.rotation) ------------------------------------------------

    def _open_ledger(self) -> IssuanceLedger:
        path = self.store.issued_path(self.config.cluster)
        try:
            records = load_ledger(path)
        except LedgerError as exc:
            # Rewritten from what this process signs: retire then knows less, and falls
            # back to an intermediate's own expiry for what it no longer finds.
            log_event(logging.ERROR, "issuance-record-unreadable", error=str(exc))
            records = {}
        ledger = IssuanceLedger(path, records)
        # One server signs for a cluster: an intermediate the last run used and this one
        # does not (rotated while it was down) signs nothing more, so its record is final.
        ledger.stopped_signing_all_but(self.intermediate.certificate)
        return ledger

    def _flush_ledger(self) -> None:
        try:
            self.ledger.flush()
        except OSError as exc:
            # A read-only CA directory (a Kubernetes Secret volume) or a full disk must not
            # end the server: retire then waits for the replaced intermediates' own
            # expiry. Said once per distinct error, not on every poll.
            error = f"{self.ledger.path}: {exc.strerror or exc}"
            if error != self._ledger_error:
                log_event(logging.WARNING, "issuance-record-not-written", error=error)
            self._ledger_error = error
        else:
            self._ledger_error = None

    # -- the server's own SVID -----------------------------------------------------------

    def _mint_credentials(self) -> _Credentials:
        now = dt.datetime.now(dt.UTC)
        key = generate_private_key(KeyAlgorithm.P256)
        dns = ["trellis-ca", "localhost"]
        for address in (self.config.listen, self.config.attest_listen, self.config.bundle_listen):
            if address:
                host = split_address(address)[0]
                with contextlib.suppress(ValueError):
                    ipaddress.ip_address(host)
                    continue
                if host and host not in dns:
                    dns.append(host)
        ttl = min(self.config.server_svid_ttl, self.intermediate.expires_at - now)
        svid = self.intermediate.issue_x509_svid(
            self.trust_domain.spiffe_id(f"/trellis/ca/{self.config.cluster}"),
            key.public_key(),
            now=now,
            ttl=ttl,
            dns_names=dns,
            private_key=key,
        )
        return _Credentials(
            svid, private_key_pem(key), svid.chain_pem(), self.bundles.current.to_pem()
        )

    def _certificate_config(self, creds: _Credentials) -> Any:
        # The serving intermediate beside the roots: an agent whose chain is too large for
        # grpc's TLS buffers (ML-DSA, see ca.api.client.presented_chain_pem) sends its
        # leaf alone, and the chain is built from here.
        now = dt.datetime.now(dt.UTC)
        issuers = [self.intermediate.certificate] + [
            c for c in self.service.previous_intermediates if c.not_valid_after_utc > now
        ]
        intermediates = b"".join(c.public_bytes(Encoding.PEM) for c in issuers)
        return grpc.ssl_server_certificate_configuration(
            [(creds.key_pem, creds.chain_pem)], root_certificates=creds.roots_pem + intermediates
        )

    def _fetcher(self, port: str) -> Any:
        # Called by grpc core on its own threads before each handshake: None = unchanged.
        def fetch() -> Any:
            with self._creds_lock:
                if self._served_versions.get(port) == self._creds_version:
                    return None
                self._served_versions[port] = self._creds_version
                return self._certificate_config(self._creds)

        return fetch

    def _rotate_credentials(self) -> None:
        creds = self._mint_credentials()
        with self._creds_lock:
            self._creds = creds
            self._creds_version += 1
        if self._bundle_ssl is not None:
            self._load_bundle_cert(self._bundle_ssl)
        log_event(logging.INFO, "server-svid-rotated", expires_at=creds.svid.expires_at.isoformat())

    def _load_bundle_cert(self, context: ssl.SSLContext) -> None:
        # ssl can only load a key from a file: a private temporary directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="trellis-ca-") as tmp:
            key_path = Path(tmp) / "key.pem"
            cert_path = Path(tmp) / "cert.pem"
            key_path.touch(mode=0o600)
            key_path.write_bytes(self._creds.key_pem)
            cert_path.write_bytes(self._creds.chain_pem)
            context.load_cert_chain(cert_path, key_path)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> dict[str, str]:
        """Bind every listener (port 0 = ephemeral) and return the bound addresses.

        If any listener cannot be bound, whatever was started is stopped again and the
        error (``OSError``) propagates."""
        try:
            return await self._start()
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self) -> dict[str, str]:
        cfg = self.config
        for node in cfg.join_token_nodes:
            self.issued_tokens[node] = self.join_tokens.issue(
                node, now=time.time(), ttl=cfg.join_token_ttl.total_seconds()
            )
        self.purge_join_tokens()
        if cfg.sign_workers > 0:
            signer = ProcessPoolSigner(
                cfg.ca_dir,
                cfg.cluster,
                cfg.sign_workers,
                inline=self.intermediate,
                key_passphrase=cfg.key_passphrase,
            )
            await signer.start()
            self.service.signer = signer
        limit = max(GRPC_HARD_LIMIT, 2 * cfg.service.max_request_bytes)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                # Bound each agent connection's in-flight calls: beyond it, calls wait in the
                # agent's HTTP/2 queue. Without a bound, grpc's asyncio server accepts every
                # stream and, when overloaded, cancels some (CANCELLED) instead of queueing.
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_AGENT),
            ],
            maximum_concurrent_rpcs=10_000,
        )
        server.add_generic_rpc_handlers(
            [make_handler(self.service, self.bundles, self.signing_streams, self.steks)]
        )
        mtls = grpc.dynamic_ssl_server_credentials(
            self._certificate_config(self._creds), self._fetcher("mtls"), True
        )
        tls = grpc.dynamic_ssl_server_credentials(
            self._certificate_config(self._creds), self._fetcher("tls"), False
        )
        for name, address, creds in (
            ("listen", cfg.listen, mtls),
            ("attest_listen", cfg.attest_listen, tls),
        ):
            try:
                port = server.add_secure_port(address, creds)
            except RuntimeError as exc:  # grpc reports a failed bind this way
                raise OSError(f"cannot listen on {address} (in use?)") from exc
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            self.addresses[name] = f"{split_address(address)[0]}:{port}"
        self._grpc = server
        await server.start()
        if cfg.bundle_listen is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._load_bundle_cert(context)
            self._bundle_ssl = context
            self.addresses["bundle_listen"] = await self._serve_http(
                self._bundle_app(), cfg.bundle_listen, context
            )
        if cfg.metrics_listen is not None:
            self.addresses["metrics_listen"] = await self._serve_http(
                self._metrics_app(), cfg.metrics_listen, None
            )
        if cfg.admin_socket is not None:
            self.addresses["admin_socket"] = await self._serve_admin(cfg.admin_socket)
        self._update_authority_metrics()
        self._flush_ledger()
        self.metrics.entries(len(self.entries.current()))
        self._tick_steks()
        self.federation.start()
        self._tasks.append(asyncio.create_task(self._maintain()))
        self._tasks.append(asyncio.create_task(self._purge_join_tokens_periodically()))
        log_event(
            logging.INFO,
            "ca-server-started",
            cluster=cfg.cluster,
            sign_workers=cfg.sign_workers,
            **self.addresses,
        )
        return dict(self.addresses)

    async def _serve_http(
        self, app: web.Application, address: str, context: ssl.SSLContext | None
    ) -> str:
        host, port = split_address(address)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)  # cleaned up by stop() even if the bind fails
        site = web.TCPSite(runner, host, port, ssl_context=context)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        bound = runner.addresses[-1][1] if runner.addresses else port
        return f"{host}:{bound}"

    async def _serve_admin(self, path: Path) -> str:
        from ca.server.admin import admin_app, bind_admin_socket

        runner = web.AppRunner(
            admin_app(self), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        self._runners.append(runner)
        try:
            return await bind_admin_socket(runner, path)
        except OSError as exc:
            raise OSError(f"cannot listen on {path}: {exc.strerror or exc}") from exc

    def _bundle_app(self) -> web.Application:
        async def bundle(request: web.Request) -> web.Response:
            return web.Response(
                body=self.bundles.current.to_json(),
                content_type="application/json",
                headers={"Cache-Control": f"max-age={self.bundles.current.refresh_hint}"},
            )

        app = web.Application()
        app.router.add_get("/", bundle)
        app.router.add_get("/bundle.json", bundle)
        return app

    def _metrics_app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(
                body=self.metrics.exposition(),
                headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
            )

        async def healthz(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        return app

    def _bundle_mtime(self) -> int | None:
        try:
            return self.store.bundle_path.stat().st_mtime_ns
        except OSError:
            return None

    def _update_authority_metrics(self) -> None:
        self.metrics.authority_expiry("intermediate", self.intermediate.expires_at.timestamp())
        roots = self.bundles.current.x509_authorities
        if roots:
            latest = max(r.not_valid_after_utc.timestamp() for r in roots)
            self.metrics.authority_expiry("root", latest)
        self.metrics.authority_expiry("server_svid", self._creds.svid.expires_at.timestamp())

    def _federation_mtime(self) -> FileStamp | None:
        if self.config.federation_path is None:
            return None
        return file_stamp(self.config.federation_path)

    def _reload_federation(self) -> None:
        assert self.config.federation_path is not None
        try:
            relationships = load_federation_file(self.config.federation_path, own=self.trust_domain)
        except FederationConfigError as exc:
            log_event(logging.ERROR, "federation-reload-failed", error=str(exc))
            return
        before = {r.trust_domain.name for r in self.federation.relationships}
        self.federation.replace(relationships)
        for gone in before - {r.trust_domain.name for r in relationships}:
            self.metrics.federation_forget(gone)
        log_event(
            logging.INFO,
            "federation-reloaded",
            trust_domains=[r.trust_domain.name for r in relationships],
        )

    def _federated_changed(self, bundles: Mapping[TrustDomain, TrustBundle]) -> None:
        self.bundles.publish_federated(tuple(bundles[td] for td in sorted(bundles, key=str)))

    def _intermediate_mtime(self) -> int | None:
        try:
            path = self.store.cluster_dir(self.config.cluster) / "intermediate.crt"
            return path.stat().st_mtime_ns
        except OSError:
            return None

    def _reload_intermediate(self) -> None:
        """Pick up a re-signed cluster intermediate (``trellis ca intermediate`` again).

        SVIDs signed by the old one stay valid (same root); new ones come from the new
        one, and so does the server's own SVID. A half-written or mismatched pair is
        refused and the old intermediate stays in force."""
        try:
            intermediate = self.store.load_intermediate(self.config.cluster)
            jwt = self.store.load_jwt_authority(self.config.cluster)
        except StoreError as exc:
            log_event(logging.ERROR, "intermediate-reload-failed", error=str(exc))
            return
        if intermediate.trust_domain != self.trust_domain:
            log_event(
                logging.ERROR,
                "intermediate-reload-failed",
                error=f"new intermediate is for {intermediate.trust_domain}",
            )
            return
        if intermediate.certificate == self.intermediate.certificate:
            return
        # Roots in force, and those of a bundle on disk not read yet (a root rotation may
        # write both files in one poll interval). An intermediate from any other root would
        # sign SVIDs that no agent or workload can verify.
        roots = list(self.bundles.current.x509_authorities)
        with contextlib.suppress(StoreError):
            roots.extend(self.store.load_bundle(self.trust_domain).x509_authorities)
        if not _issued_by_one_of(intermediate.certificate, roots):
            log_event(
                logging.ERROR,
                "intermediate-reload-failed",
                error="the new intermediate was not issued by a root of the trust bundle",
            )
            return
        old = self.intermediate
        self.intermediate = intermediate
        # A bundle refused for lacking this intermediate's root is worth reading again.
        self._bundle_stamp = None
        self.ledger.signing_with(intermediate.certificate)
        self.service.replace_authorities(intermediate, jwt)
        if self.config.sign_workers > 0:
            task = asyncio.get_running_loop().create_task(self._restart_signer(old))
            self._tasks.append(task)
        else:
            self.ledger.stopped_signing(old.certificate)
        self._rotate_credentials()
        log_event(
            logging.INFO,
            "intermediate-reloaded",
            expires_at=intermediate.expires_at.isoformat(),
        )

    async def _restart_signer(self, old_intermediate: IntermediateAuthority) -> None:
        # Workers load the intermediate once; new workers load the new one. Until they are
        # up, the old workers keep signing with the old (still valid) intermediate.
        signer = ProcessPoolSigner(
            self.config.ca_dir,
            self.config.cluster,
            self.config.sign_workers,
            inline=self.intermediate,
            key_passphrase=self.config.key_passphrase,
        )
        await signer.start()
        old, self.service.signer = self.service.signer, signer
        await old.close()
        # Only now is nothing signed with it any more: its record is final (ca.rotation).
        self.ledger.stopped_signing(old_intermediate.certificate)

    def maintain_once(self) -> None:
        """One round of reloads: entries, federation, bundle, intermediate, server SVID,
        gauges."""
        federation_stamp = self._federation_mtime()
        if federation_stamp != self._federation_stamp:
            self._federation_stamp = federation_stamp
            self._reload_federation()
        stamp = self._intermediate_mtime()
        if stamp != self._intermediate_stamp:
            self._intermediate_stamp = stamp
            self._reload_intermediate()
        self._reload_bans()
        error = self.entries.refresh(time.time())
        if error is not None:
            self.metrics.entry_reload_failed()
            log_event(logging.ERROR, "entries-reload-failed", error=str(error))
        self.metrics.entries(len(self.entries.current()))
        self._tick_steks()
        stamp = self._bundle_mtime()
        if stamp != self._bundle_stamp:
            self._bundle_stamp = stamp
            self._reload_bundle()
        svid = self._creds.svid
        lifetime = svid.expires_at - svid.leaf.not_valid_before_utc
        if dt.datetime.now(dt.UTC) >= svid.leaf.not_valid_before_utc + lifetime / 2:
            self._rotate_credentials()
        self.service.refresh_agent_gauge()
        self._update_authority_metrics()
        self._flush_ledger()

    def _tick_steks(self) -> None:
        """Rotate the STEK rings that are due and follow the entries: a ring per SPIFFE ID
        that has an entry. Streams are woken on a rotation and on any entry change (an
        entry moved to another node changes which rings that node's agent may hold)."""
        current = self.entries.current()
        changed = self.steks.leader.tick(time.time(), {e.spiffe_id for e in current})
        if changed or current.revision != self._stek_revision:
            self._stek_revision = current.revision
            self.steks.poke()

    def _reload_bundle(self) -> None:
        try:
            bundle = self.store.load_bundle(self.trust_domain)
        except Exception as exc:  # StoreError; anything else is a bug we must log
            log_event(logging.ERROR, "bundle-reload-failed", error=str(exc))
            return
        if not _issued_by_one_of(self.intermediate.certificate, bundle.x509_authorities):
            # Published, it would make every agent SVID (and the server's own) fail to
            # verify: the whole trust domain refused at once. The old bundle stays.
            log_event(
                logging.ERROR,
                "bundle-reload-failed",
                error=f"{self.store.bundle_path} holds no root that issued the serving "
                "intermediate",
            )
            return
        self.bundles.publish(bundle)
        with self._creds_lock:
            self._creds = _Credentials(
                self._creds.svid,
                self._creds.key_pem,
                self._creds.chain_pem,
                bundle.to_pem(),
            )
            self._creds_version += 1
        log_event(logging.INFO, "bundle-reloaded", sequence=bundle.sequence)

    def _reload_bans(self) -> None:
        if self.bans is None:
            return
        before = self.bans.current()
        error = self.bans.refresh()
        if error is not None:
            log_event(logging.ERROR, "banned-agents-reload-failed", error=str(error))
            return
        after = self.bans.current()
        if after != before:
            log_event(
                logging.WARNING,
                "banned-agents-reloaded",
                banned=sorted(after - before),
                unbanned=sorted(before - after),
                total=len(after),
            )
            self.bundles.poke()  # end the bundle streams of newly banned agents
            self.steks.poke()  # and their STEK streams
            self.signing_streams.end_banned(self.service.is_banned)

    def purge_join_tokens(self) -> int:
        """Delete the files of join tokens that have expired; returns how many went."""
        try:
            removed = self.token_store.purge_expired(time.time())
        except OSError as exc:  # an unreadable directory must not end the server
            log_event(logging.ERROR, "join-token-purge-failed", error=str(exc))
            return 0
        if removed:
            log_event(logging.INFO, "join-tokens-purged", removed=removed)
        return removed

    async def _purge_join_tokens_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.token_purge_interval)
            self.purge_join_tokens()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            self.maintain_once()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish for up to ``grace`` seconds."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.federation.close()
        self.bundles.close()
        self.steks.close()
        self.signing_streams.close()
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if "admin_socket" in self.addresses:
            with contextlib.suppress(OSError):
                Path(self.addresses["admin_socket"]).unlink()
        await self.service.signer.close()
        self._flush_ledger()
        self._stopped.set()
        log_event(logging.INFO, "ca-server-stopped", cluster=self.config.cluster)

    async def run(self, *, ready: Any = None) -> None:
        """Start, report readiness, and serve until SIGTERM or SIGINT; then stop gracefully."""
        addresses = await self.start()
        settle_heap()  # a full collection would stall every call in flight (core.eventloop)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready(addresses, dict(self.issued_tokens))
        await stop.wait()
        log_event(logging.INFO, "ca-server-stopping", reason="signal")
        await self.stop()
