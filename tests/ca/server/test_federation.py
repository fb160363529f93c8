"""Federation: the ``--federation`` document, fetching a foreign bundle over https_spiffe,
and every way a fetch is refused. Partner endpoints are real servers on loopback: a real
partner.org ``CaServer``, or an aiohttp HTTPS server holding a real partner.org SVID that
serves what a broken or hostile endpoint would."""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web

from ca import JwtAuthority, RootAuthority, SpiffeId, TrustDomain
from ca.bundle import TrustBundle
from ca.keys import KeyAlgorithm, generate_private_key, private_key_pem
from ca.server.app import CaServer
from ca.server.federation import (
    FederationConfigError,
    FederationFetcher,
    FederationRelationship,
    FetchError,
    fetch_bundle,
    load_federation_file,
    parse_federation,
)
from ca.store import CaStore

from .conftest import CLUSTER, PASSPHRASE, attested, eventually, run, server_config, serving

PARTNER = TrustDomain("partner.org")
PARTNER_CA_ID = SpiffeId(f"spiffe://partner.org/trellis/ca/{CLUSTER}")


def make_partner_dir(directory: Path) -> CaStore:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(directory)
    root = RootAuthority.create(PARTNER, now=now)
    store.save_root(root, PASSPHRASE)
    store.save_intermediate(root.issue_intermediate(CLUSTER, now=now), JwtAuthority.generate())
    return store


@pytest.fixture(scope="module")
def partner_store(tmp_path_factory: pytest.TempPathFactory) -> CaStore:
    return make_partner_dir(tmp_path_factory.mktemp("partner"))


def relationship(
    url: str, bootstrap: TrustBundle, endpoint_id: SpiffeId = PARTNER_CA_ID
) -> FederationRelationship:
    return FederationRelationship(PARTNER, url, endpoint_id, bootstrap)


@asynccontextmanager
async def fetching_partner(
    partner_store: CaStore,
    on_change: Callable[[Mapping[TrustDomain, TrustBundle]], None],
    metric: Callable[[str, str], None],
) -> AsyncIterator[tuple[CaServer, FederationFetcher]]:
    """A served partner CA (bundle endpoint only) and a fetcher aimed at it, not started:
    callers fetch by hand or start its loops. The fetcher is closed on the way out."""
    config = replace(server_config(partner_store.root_dir), entries_path=None)
    async with serving(config) as partner:
        url = f"https://{partner.addresses['bundle_listen']}/"
        fetcher = FederationFetcher(
            [relationship(url, partner_store.load_bundle())], on_change=on_change, metric=metric
        )
        try:
            yield partner, fetcher
        finally:
            await fetcher.close()


@asynccontextmanager
async def partner_endpoint(
    store: CaStore, tmp_path: Path, body: bytes, status: int = 200, *, chunked: bool = False
) -> AsyncIterator[str]:
    """An HTTPS server presenting a real partner.org SVID (the CA's own ID) that answers
    every GET with ``body`` and ``status`` (``chunked``: without a Content-Length)."""
    intermediate = store.load_intermediate(CLUSTER)
    key = generate_private_key(KeyAlgorithm.P256)
    svid = intermediate.issue_x509_svid(
        PARTNER_CA_ID,
        key.public_key(),
        now=dt.datetime.now(dt.UTC),
        ttl=dt.timedelta(hours=1),
        private_key=key,
    )
    (tmp_path / "ep.crt").write_bytes(svid.chain_pem())
    (tmp_path / "ep.key").write_bytes(private_key_pem(key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "ep.crt", tmp_path / "ep.key")

    async def answer(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=body, status=status, content_type="application/json")
        response = web.StreamResponse(status=status)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 1000):
            await response.write(body[start : start + 1000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


async def fetch(rel: FederationRelationship, **kwargs: int) -> TrustBundle:
    return await fetch_bundle(
        rel, rel.bootstrap.x509_authorities, now=dt.datetime.now(dt.UTC), **kwargs
    )


# -- the configuration -----------------------------------------------------------------


def _doc(**item: object) -> dict[str, object]:
    base: dict[str, object] = {
        "trustDomain": "partner.org",
        "bundleEndpointURL": "https://127.0.0.1:8443/",
        "bundleEndpointSPIFFEID": str(PARTNER_CA_ID),
    }
    base.update(item)
    return {"trustDomains": [{k: v for k, v in base.items() if v is not None}]}


def test_a_trust_domain_without_a_bootstrap_bundle_is_refused_by_name() -> None:
    with pytest.raises(FederationConfigError, match=r"partner\.org.*bootstrapBundle"):
        parse_federation(_doc())


def test_the_bundle_endpoint_must_be_an_https_url_and_the_error_names_the_field(
    partner_store: CaStore,
) -> None:
    pem = partner_store.load_bundle().to_pem().decode()
    with pytest.raises(FederationConfigError, match=r"bundleEndpointURL"):
        parse_federation(_doc(bundleEndpointURL="http://x/", bootstrapBundle=pem))
    with pytest.raises(FederationConfigError, match=r"bundleEndpointSPIFFEID"):
        parse_federation(_doc(bundleEndpointSPIFFEID="partner.org", bootstrapBundle=pem))


def test_the_own_trust_domain_cannot_be_federated(partner_store: CaStore) -> None:
    pem = partner_store.load_bundle().to_pem().decode()
    with pytest.raises(FederationConfigError, match="own trust domain"):
        parse_federation(_doc(bootstrapBundle=pem), own=PARTNER)


def test_a_bootstrap_bundle_may_be_inline_json_inline_pem_or_a_relative_path(
    partner_store: CaStore, tmp_path: Path
) -> None:
    bundle = partner_store.load_bundle()
    (tmp_path / "partner.json").write_bytes(bundle.to_json())
    (tmp_path / "partner.pem").write_bytes(bundle.to_pem())
    for value in (
        bundle.to_json().decode(),
        bundle.to_pem().decode(),
        "partner.json",
        "partner.pem",
    ):
        path = tmp_path / "federation.yaml"
        path.write_text(json.dumps(_doc(bootstrapBundle=value)))
        (rel,) = load_federation_file(path, own=TrustDomain("example.org"))
        assert rel.trust_domain == PARTNER
        assert rel.bootstrap.x509_authorities == bundle.x509_authorities


def test_an_unreadable_bootstrap_bundle_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(json.dumps(_doc(bootstrapBundle="missing.pem")))
    with pytest.raises(
        FederationConfigError, match=r"trustDomains\[0\] \(partner\.org\)\.bootstrapBundle"
    ):
        load_federation_file(path)


# -- fetching ----------------------------------------------------------------------------


def test_a_partner_ca_servers_bundle_is_fetched_and_its_endpoint_authenticated(
    partner_store: CaStore,
) -> None:
    async def body() -> None:
        config = replace(server_config(partner_store.root_dir), entries_path=None)
        async with serving(config) as partner:
            url = f"https://{partner.addresses['bundle_listen']}/"
            got = await fetch(relationship(url, partner_store.load_bundle()))
            assert got.trust_domain == PARTNER
            assert got.same_content(partner.bundles.current)

    run(body())


def test_an_endpoint_serving_another_spiffe_id_is_refused(partner_store: CaStore) -> None:
    async def body() -> None:
        config = replace(server_config(partner_store.root_dir), entries_path=None)
        async with serving(config) as partner:
            url = f"https://{partner.addresses['bundle_listen']}/"
            other = SpiffeId("spiffe://partner.org/not-the-bundle-endpoint")
            with pytest.raises(FetchError, match="expected") as caught:
                await fetch(relationship(url, partner_store.load_bundle(), other))
            assert caught.value.reason == "endpoint-unauthenticated"

    run(body())


def test_an_endpoint_that_does_not_chain_to_the_bootstrap_bundle_is_refused(
    partner_store: CaStore,
) -> None:
    impostor_root = RootAuthority.create(PARTNER, now=dt.datetime.now(dt.UTC))
    wrong = TrustBundle(PARTNER, (impostor_root.certificate,))

    async def body() -> None:
        config = replace(server_config(partner_store.root_dir), entries_path=None)
        async with serving(config) as partner:
            url = f"https://{partner.addresses['bundle_listen']}/"
            with pytest.raises(FetchError) as caught:
                await fetch(relationship(url, wrong))
            assert caught.value.reason == "endpoint-unauthenticated"

    run(body())


@pytest.mark.parametrize(
    ("served", "status", "reason"),
    [
        ("example", 200, "wrong-trust-domain"),
        ("oversized", 200, "too-large"),
        ("oversized-chunked", 200, "too-large"),
        ("malformed", 200, "malformed"),
        ("partner", 404, "http-status"),
        ("partner", 500, "http-status"),
    ],
)
def test_a_bad_answer_from_an_authenticated_endpoint_is_refused(
    partner_store: CaStore,
    session_ca: CaStore,
    tmp_path: Path,
    served: str,
    status: int,
    reason: str,
) -> None:
    partner_bundle = partner_store.load_bundle()
    bodies = {
        "example": session_ca.load_bundle().to_json(),  # example.org's roots, not partner's
        "oversized": partner_bundle.to_json() + b" " * 5000,
        "oversized-chunked": partner_bundle.to_json() + b" " * 5000,
        "malformed": b'{"keys": [{"use": "x509-svid", "x5c": ["not base64!"]}]}',
        "partner": partner_bundle.to_json(),
    }

    async def body() -> None:
        chunked = served.endswith("-chunked")
        async with partner_endpoint(
            partner_store, tmp_path, bodies[served], status, chunked=chunked
        ) as url:
            rel = relationship(url, partner_bundle)
            with pytest.raises(FetchError) as caught:
                await fetch(rel, max_bytes=4096)
            assert caught.value.reason == reason

    run(body())


def test_the_last_good_bundle_is_kept_while_the_endpoint_is_down(
    partner_store: CaStore,
) -> None:
    outcomes: list[tuple[str, str]] = []
    published: list[dict[TrustDomain, TrustBundle]] = []

    async def body() -> None:
        async with fetching_partner(
            partner_store,
            on_change=lambda b: published.append(dict(b)),
            metric=lambda td, outcome: outcomes.append((td, outcome)),
        ) as (partner, fetcher):
            # Not started: no refresh loops, each fetch by hand.
            await fetcher.fetch_once(PARTNER)
            good = fetcher.bundles[PARTNER]
            await partner.stop(0)
            with pytest.raises(FetchError) as caught:
                await fetcher.fetch_once(PARTNER)
            assert caught.value.reason == "unreachable"
            assert fetcher.bundles[PARTNER] is good

    run(body())
    assert outcomes == [("partner.org", "ok"), ("partner.org", "unreachable")]
    assert len(published) == 1 and set(published[0]) == {PARTNER}


def test_a_served_ca_fetches_federated_bundles_and_streams_them_to_agents_on_every_change(
    partner_store: CaStore, ca_dir: Path, tmp_path: Path
) -> None:
    async def body() -> None:
        partner_config = replace(server_config(partner_store.root_dir), entries_path=None)
        async with serving(partner_config) as partner:
            path = tmp_path / "federation.yaml"
            path.write_text(
                json.dumps(
                    _doc(
                        bundleEndpointURL=f"https://{partner.addresses['bundle_listen']}/",
                        bootstrapBundle=partner_store.load_bundle().to_pem().decode(),
                    )
                )
            )
            config = replace(server_config(ca_dir), federation_path=path)
            async with serving(config) as server:
                client = await attested(server, "node-a")
                updates = client.watch_bundles()
                update = await anext(updates)
                while not update.federated:  # the first message may precede the first fetch
                    update = await anext(updates)
                (got,) = update.federated
                assert got.trust_domain == PARTNER
                assert got.same_content(partner.bundles.current)
                assert update.bundle.same_content(server.bundles.current)
                assert (
                    server.metrics.value(
                        "trellis_ca_federation_fetch_total",
                        federated_trust_domain="partner.org",
                        outcome="ok",
                    )
                    == 1
                )
                # The file changes: partner.org leaves, and so does its bundle.
                path.write_text(json.dumps({"trustDomains": []}))
                assert (await anext(updates)).federated == ()
                await updates.aclose()
                await client.close()

    run(body())


def test_a_ca_server_does_not_start_on_a_broken_federation_file(
    ca_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "federation.yaml"
    path.write_text(json.dumps(_doc()))
    with pytest.raises(FederationConfigError, match=r"partner\.org"):
        CaServer(replace(server_config(ca_dir), federation_path=path))


def test_serve_refuses_a_bad_federation_file_in_one_line_naming_the_field(
    ca_dir: Path, tmp_path: Path
) -> None:
    from .test_serve_process import listen_args, trellis

    path = tmp_path / "federation.yaml"
    path.write_text(
        "trustDomains:\n  - trustDomain: partner.org\n    bundleEndpointURL: ftp://x/\n"
    )
    done = trellis("ca", "serve", *listen_args(ca_dir, "--federation", str(path)), check=False)
    assert done.returncode != 0
    assert done.stdout == ""  # no "ready" line: nothing started
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "trustDomains[0] (partner.org).bundleEndpointURL" in lines[0]


def test_a_served_ca_logs_and_counts_an_endpoint_with_the_wrong_spiffe_id(
    partner_store: CaStore, ca_dir: Path, tmp_path: Path
) -> None:
    import time
    import urllib.request

    from .test_serve_process import listen_args, serve

    partner_args = listen_args(partner_store.root_dir, "--sign-workers", "0")
    with serve(*partner_args) as (_, partner_ready, _):
        path = tmp_path / "federation.yaml"
        wrong_id = "spiffe://partner.org/not-the-bundle-endpoint"
        path.write_text(
            json.dumps(
                _doc(
                    bundleEndpointURL=f"https://{partner_ready['bundle_listen']}/",
                    bundleEndpointSPIFFEID=wrong_id,
                    bootstrapBundle=str(partner_store.root_cert_path),
                )
            )
        )
        args = listen_args(ca_dir, "--federation", str(path), "--sign-workers", "0")
        with serve(*args) as (process, ready, _):
            url = f"http://{ready['metrics_listen']}/metrics"
            wanted = 'outcome="endpoint-unauthenticated"'
            deadline = time.monotonic() + 30
            metrics = ""
            while wanted not in metrics and time.monotonic() < deadline:
                time.sleep(0.1)
                with urllib.request.urlopen(url, timeout=5) as answer:
                    metrics = answer.read().decode()
            assert wanted in metrics
            assert 'outcome="ok"' not in metrics
            process.terminate()
            process.wait(timeout=10)
            assert process.stderr is not None
            logs = [json.loads(line) for line in process.stderr.read().splitlines() if line]
    refused = [e for e in logs if e.get("event") == "federation-fetch-failed"]
    assert refused and refused[0]["federated_trust_domain"] == "partner.org"
    assert refused[0]["reason"] == "endpoint-unauthenticated"
    assert wrong_id in refused[0]["error"]


def test_a_large_bundle_arriving_in_many_reads_is_read_whole(
    partner_store: CaStore, tmp_path: Path
) -> None:
    partner_bundle = partner_store.load_bundle()
    body_bytes = partner_bundle.to_json().rstrip() + b" " * 300_000 + b"\n"

    async def body() -> TrustBundle:
        async with partner_endpoint(partner_store, tmp_path, body_bytes) as url:
            return await fetch(relationship(url, partner_bundle))

    assert run(body()).same_content(partner_bundle)


def test_the_refresh_loop_follows_a_partner_root_rotation_and_publishes_it(
    partner_store: CaStore,
) -> None:
    published: list[dict[TrustDomain, TrustBundle]] = []
    new_root = RootAuthority.create(PARTNER, now=dt.datetime.now(dt.UTC))

    async def body() -> None:
        async with fetching_partner(
            partner_store,
            on_change=lambda b: published.append(dict(b)),
            metric=lambda td, outcome: None,
        ) as (partner, fetcher):
            fetcher.start()
            await eventually(lambda: PARTNER in fetcher.bundles)
            rotated = partner.bundles.current.with_x509_authorities([new_root.certificate])
            partner.bundles.publish(rotated)
            fetcher.poke()  # instead of waiting out the refresh hint
            await eventually(lambda: fetcher.bundles[PARTNER].same_content(rotated))

    run(body())
    assert [len(p[PARTNER].x509_authorities) for p in published] == [1, 2]
