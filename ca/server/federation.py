"""SPIFFE federation: fetch foreign trust domains' bundles for ``trellis ca serve``.

The configuration (``--federation FILE``, YAML or JSON) is the document the operator
renders from ``FederatedTrustDomain`` objects, plus a bootstrap bundle per trust domain::

    trustDomains:
      - trustDomain: partner.org
        bundleEndpointURL: https://ca.partner.org:8443/
        bundleEndpointSPIFFEID: spiffe://partner.org/trellis/ca/east
        bootstrapBundle: partner-bundle.json   # or inline JSON / PEM; a path is relative
                                               # to this file

Why the bootstrap bundle is required: the ``https_spiffe`` profile (SPIFFE Trust Domain
and Bundle standard §5.2.2) authenticates the endpoint's certificate as an X509-SVID of
``bundleEndpointSPIFFEID``, so the first fetch needs that trust domain's bundle out of
band; later fetches use the latest bundle fetched for it.

A fetched bundle replaces the last good one only if the endpoint authenticated, the
answer was a 200 of at most ``MAX_BUNDLE_BYTES``, the document parses, and none of its
X.509 authorities names a different trust domain; otherwise the last good bundle stays in
force and the next try backs off. Successful fetches are repeated after the bundle's
``spiffe_refresh_hint``, clamped to [``MIN_REFRESH``, ``MAX_REFRESH``].
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml
from cryptography import x509

from ca.bundle import MAX_BUNDLE_BYTES, BundleError, TrustBundle, load_pem_certificates
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from ca.verify import verify_x509_svid

__all__ = [
    "MAX_REFRESH",
    "MIN_REFRESH",
    "FederationConfigError",
    "FederationFetcher",
    "FederationRelationship",
    "FetchError",
    "fetch_bundle",
    "load_federation_file",
    "parse_federation",
]

log = logging.getLogger("trellis.ca.federation")

MIN_REFRESH = 30.0
MAX_REFRESH = 3600.0
MAX_BACKOFF = 300.0
FETCH_TIMEOUT = 10.0


class FederationConfigError(ValueError):
    """The federation document is unusable; the message names the offending field."""


class FetchError(Exception):
    """One fetch failed; ``reason`` is a bounded metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(detail)


@dataclass(frozen=True)
class FederationRelationship:
    trust_domain: TrustDomain
    bundle_endpoint_url: str
    bundle_endpoint_spiffe_id: SpiffeId
    # The bundle of ``bundle_endpoint_spiffe_id``'s trust domain, known out of band.
    bootstrap: TrustBundle


# -- the configuration (pure) ------------------------------------------------------------


def _read_bundle(trust_domain: TrustDomain, value: Any, where: str, base_dir: Path) -> TrustBundle:
    if isinstance(value, dict):
        data = json.dumps(value).encode()
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if text.startswith("{") or text.startswith("-----BEGIN"):
            data = text.encode()
        else:
            path = base_dir / text
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FederationConfigError(
                    f"{where}: cannot read {text}: {exc.strerror or exc}"
                ) from exc
    else:
        raise FederationConfigError(
            f"{where}: must be a SPIFFE bundle (JSON), PEM roots, or a file holding either"
        )
    try:
        if data.lstrip().startswith(b"{"):
            bundle = TrustBundle.from_json(trust_domain, data)
        else:
            bundle = TrustBundle(trust_domain, tuple(load_pem_certificates(data, what=where)))
    except BundleError as exc:
        raise FederationConfigError(f"{where}: {exc}") from exc
    if not bundle.x509_authorities:
        raise FederationConfigError(f"{where}: holds no X.509 authority")
    return bundle


def parse_federation(
    doc: Any, *, own: TrustDomain | None = None, base_dir: Path = Path()
) -> tuple[FederationRelationship, ...]:
    """The relationships a federation document declares (raises ``FederationConfigError``)."""
    if doc is None:
        return ()
    if not isinstance(doc, dict) or not isinstance(doc.get("trustDomains", []), list):
        raise FederationConfigError("trustDomains: must be a list")
    found: dict[TrustDomain, FederationRelationship] = {}
    for index, item in enumerate(doc.get("trustDomains") or []):
        where = f"trustDomains[{index}]"
        if not isinstance(item, dict):
            raise FederationConfigError(f"{where}: must be a mapping")
        try:
            td = TrustDomain(str(item.get("trustDomain", "")))
        except SpiffeIdError as exc:
            raise FederationConfigError(f"{where}.trustDomain: {exc}") from exc
        where = f"{where} ({td.name})"
        if td == own:
            raise FederationConfigError(f"{where}.trustDomain: is this CA's own trust domain")
        if td in found:
            raise FederationConfigError(f"{where}.trustDomain: listed twice")
        url = item.get("bundleEndpointURL")
        parts = urlsplit(url) if isinstance(url, str) else None
        if (
            not isinstance(url, str)
            or parts is None
            or parts.scheme != "https"
            or not parts.hostname
        ):
            raise FederationConfigError(f"{where}.bundleEndpointURL: must be an https:// URL")
        try:
            endpoint_id = SpiffeId(str(item.get("bundleEndpointSPIFFEID", "")))
        except SpiffeIdError as exc:
            raise FederationConfigError(f"{where}.bundleEndpointSPIFFEID: {exc}") from exc
        if "bootstrapBundle" not in item:
            raise FederationConfigError(
                f"{where}.bootstrapBundle: missing; the https_spiffe profile needs the "
                f"bundle of {endpoint_id.trust_domain} to authenticate {endpoint_id}"
            )
        bootstrap = _read_bundle(
            endpoint_id.trust_domain, item["bootstrapBundle"], f"{where}.bootstrapBundle", base_dir
        )
        found[td] = FederationRelationship(td, url, endpoint_id, bootstrap)
    return tuple(found.values())


def load_federation_file(
    path: Path, *, own: TrustDomain | None = None
) -> tuple[FederationRelationship, ...]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FederationConfigError(f"{path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise FederationConfigError(f"{path}: not UTF-8: {exc}") from exc
    try:
        doc = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise FederationConfigError(f"{path}: not YAML or JSON: {exc}") from exc
    except RecursionError as exc:  # PyYAML recurses once per nesting level
        raise FederationConfigError(f"{path}: nested too deeply") from exc
    return parse_federation(doc, own=own, base_dir=path.parent)


# -- one fetch ---------------------------------------------------------------------------


def _peer_chain(ssl_object: ssl.SSLObject) -> list[x509.Certificate]:
    # What the server sent, leaf first (SSLObject.get_unverified_chain is public from
    # Python 3.13; before that it is only on the underlying _ssl object).
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = ssl_object._sslobj.get_unverified_chain  # type: ignore[attr-defined]
    raw = getter() or []
    return [
        x509.load_der_x509_certificate(
            c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
        )
        for c in raw
    ]


def _client_context() -> ssl.SSLContext:
    # The chain is checked by ca.verify (SPIFFE rules, URI name constraints) right after
    # the handshake and before a byte of the body is trusted; OpenSSL's hostname and chain
    # checks do not apply to an SVID (https_spiffe, SPIFFE Trust Domain and Bundle §5.2.2).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_trust_domain(bundle: TrustBundle) -> None:
    """Refuse a bundle whose X.509 authorities name another trust domain (Trellis roots
    carry ``spiffe://<td>`` as their URI SAN)."""
    for cert in bundle.x509_authorities:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if not uri.startswith("spiffe://"):
                continue
            try:
                named = SpiffeId(uri).trust_domain
            except SpiffeIdError:
                named = None
            if named != bundle.trust_domain:
                raise FetchError(
                    "wrong-trust-domain",
                    f"bundle for {bundle.trust_domain} holds an authority of {uri}",
                )


class _SvidConnector(aiohttp.TCPConnector):
    """Authenticates every new TLS connection as an X509-SVID of one SPIFFE ID, right
    after the handshake and before the request is sent (https_spiffe)."""

    def __init__(
        self, endpoint_id: SpiffeId, roots: Sequence[x509.Certificate], now: dt.datetime
    ) -> None:
        super().__init__(force_close=True, limit=1)
        self._endpoint_id = endpoint_id
        self._roots = roots
        self._now = now

    async def _wrap_create_connection(
        self, *args: Any, **kwargs: Any
    ) -> tuple[asyncio.Transport, Any]:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        try:
            self._authenticate(transport.get_extra_info("ssl_object"))
        except BaseException:
            transport.abort()
            raise
        return transport, protocol

    def _authenticate(self, ssl_object: object) -> None:
        if not isinstance(ssl_object, ssl.SSLObject):
            raise FetchError("endpoint-unauthenticated", "no TLS session to authenticate")
        try:
            verified = verify_x509_svid(
                _peer_chain(ssl_object),
                {self._endpoint_id.trust_domain: self._roots},
                now=self._now,
            )
        except ValueError as exc:  # VerificationError, or an unreadable certificate
            raise FetchError(
                "endpoint-unauthenticated", f"endpoint certificate does not verify: {exc}"
            ) from exc
        if verified.spiffe_id != self._endpoint_id:
            raise FetchError(
                "endpoint-unauthenticated",
                f"endpoint is {verified.spiffe_id}, expected {self._endpoint_id}",
            )


async def fetch_bundle(
    relationship: FederationRelationship,
    endpoint_roots: Sequence[x509.Certificate],
    *,
    now: dt.datetime,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> TrustBundle:
    """Fetch and check one foreign bundle (raises ``FetchError``)."""
    rel = relationship
    connector = _SvidConnector(rel.bundle_endpoint_spiffe_id, endpoint_roots, now)
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
            ) as session,
            session.get(
                rel.bundle_endpoint_url, ssl=_client_context(), allow_redirects=False
            ) as response,
        ):
            if response.status != 200:
                raise FetchError("http-status", f"endpoint answered HTTP {response.status}")
            if response.content_length is not None and response.content_length > max_bytes:
                raise FetchError("too-large", f"bundle is {response.content_length} bytes")
            # StreamReader.read(n) returns what is buffered, not n bytes: read to the end,
            # but never hold more than the limit (a chunked answer has no length).
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError("too-large", f"bundle is over {max_bytes} bytes")
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise FetchError("unreachable", f"{type(exc).__name__}: {exc}") from exc
    try:
        bundle = TrustBundle.from_json(rel.trust_domain, bytes(body))
    except BundleError as exc:
        raise FetchError("malformed", str(exc)) from exc
    if not bundle.x509_authorities and not bundle.jwt_authorities:
        raise FetchError("malformed", "bundle holds no authority")
    check_trust_domain(bundle)
    return bundle


# -- the refresh loop (the shell) --------------------------------------------------------


Metric = Callable[[str, str], None]  # (trust domain, outcome)


class FederationFetcher:
    """Keeps the latest good bundle of every configured trust domain.

    ``on_change(bundles)`` is called with every bundle in force whenever one changes or a
    trust domain leaves the configuration."""

    def __init__(
        self,
        relationships: Sequence[FederationRelationship],
        *,
        on_change: Callable[[Mapping[TrustDomain, TrustBundle]], None],
        metric: Metric,
        max_bytes: int = MAX_BUNDLE_BYTES,
        min_refresh: float = MIN_REFRESH,
        max_refresh: float = MAX_REFRESH,
    ) -> None:
        self._relationships = {r.trust_domain: r for r in relationships}
        self._on_change = on_change
        self._metric = metric
        self._max_bytes = max_bytes
        self._min_refresh = min_refresh
        self._max_refresh = max_refresh
        self.bundles: dict[TrustDomain, TrustBundle] = {}
        self._tasks: dict[TrustDomain, asyncio.Task[None]] = {}
        self._started = False
        self._wake: dict[TrustDomain, asyncio.Event] = {}

    @property
    def relationships(self) -> tuple[FederationRelationship, ...]:
        return tuple(self._relationships.values())

    def start(self) -> None:
        self._started = True
        for td in self._relationships:
            self._spawn(td)

    def _spawn(self, td: TrustDomain) -> None:
        wake = self._wake[td] = asyncio.Event()
        self._tasks[td] = asyncio.get_running_loop().create_task(self._loop(td, wake))

    def replace(self, relationships: Sequence[FederationRelationship]) -> None:
        """A reloaded configuration: start, stop or restart the loops that changed."""
        new = {r.trust_domain: r for r in relationships}
        changed = False
        for td, old in list(self._relationships.items()):
            if new.get(td) != old:
                task = self._tasks.pop(td, None)
                self._wake.pop(td, None)
                if task is not None:
                    task.cancel()
                if td not in new and self.bundles.pop(td, None) is not None:
                    changed = True
        added = [td for td in new if self._relationships.get(td) != new[td]]
        self._relationships = new
        if self._started:
            for td in added:
                self._spawn(td)
        if changed:
            self._on_change(dict(self.bundles))

    def _endpoint_roots(self, rel: FederationRelationship) -> Sequence[x509.Certificate]:
        latest = self.bundles.get(rel.bundle_endpoint_spiffe_id.trust_domain)
        if latest is not None and latest.x509_authorities:
            return latest.x509_authorities
        return rel.bootstrap.x509_authorities

    async def fetch_once(self, td: TrustDomain) -> float:
        """One fetch for ``td``; returns the delay before the next one on success."""
        rel = self._relationships[td]
        try:
            bundle = await fetch_bundle(
                rel,
                self._endpoint_roots(rel),
                now=dt.datetime.now(dt.UTC),
                max_bytes=self._max_bytes,
            )
        except FetchError as exc:
            self._metric(td.name, exc.reason)
            log.warning(
                "federation-fetch-failed",
                extra={
                    "fields": {
                        "federated_trust_domain": td.name,
                        "reason": exc.reason,
                        "error": str(exc),
                        "keeping_last_good": td in self.bundles,
                    }
                },
            )
            raise
        self._metric(td.name, "ok")
        old = self.bundles.get(td)
        if old is None or not old.same_content(bundle) or old.sequence != bundle.sequence:
            self.bundles[td] = bundle
            log.info(
                "federated-bundle-updated",
                extra={
                    "fields": {
                        "federated_trust_domain": td.name,
                        "sequence": bundle.sequence,
                        "x509_authorities": len(bundle.x509_authorities),
                    }
                },
            )
            self._on_change(dict(self.bundles))
        return min(max(float(bundle.refresh_hint), self._min_refresh), self._max_refresh)

    async def _loop(self, td: TrustDomain, wake: asyncio.Event) -> None:
        failures = 0
        while True:
            try:
                delay = await self.fetch_once(td)
                failures = 0
            except FetchError:
                failures += 1
                delay = min(self._min_refresh / 8 * 2 ** (failures - 1), MAX_BACKOFF)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: see Rotator._sleep
                    await wake.wait()
            wake.clear()

    def poke(self) -> None:
        """Fetch every trust domain now (tests, and a configuration reload)."""
        for event in self._wake.values():
            event.set()

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._started = False
