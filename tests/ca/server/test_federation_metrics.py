"""The CA's federation metrics with real fetches: the outcome counter and the freshness
gauge ``trellis_ca_federation_last_success_timestamp_seconds`` that the
``TrellisFederatedBundleStale`` alert reads. The partner is a real partner.org
``CaServer`` on loopback; the fetcher reports to a real ``CaMetrics``, as in ``ca serve``."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

from ca.server.federation import FetchError
from ca.server.metrics import CaMetrics
from ca.store import CaStore
from tests.support import wait_for

from .conftest import CLUSTER, run
from .test_federation import PARTNER, fetching_partner, make_partner_dir
from .test_serve_process import listen_args, serve

FETCHES = "trellis_ca_federation_fetch_total"
LAST_SUCCESS = "trellis_ca_federation_last_success_timestamp_seconds"


@pytest.fixture(scope="module")
def partner_store(tmp_path_factory: pytest.TempPathFactory) -> CaStore:
    return make_partner_dir(tmp_path_factory.mktemp("partner"))


def test_a_successful_fetch_stamps_the_partner_and_a_failed_one_leaves_the_stamp(
    partner_store: CaStore,
) -> None:
    metrics = CaMetrics("example.org", CLUSTER)
    stamps: dict[str, float] = {}

    async def body() -> None:
        async with fetching_partner(
            partner_store, on_change=lambda bundles: None, metric=metrics.federation_fetch
        ) as (partner, fetcher):
            stamps["before"] = time.time()
            await fetcher.fetch_once(PARTNER)
            stamps["after"] = time.time()
            stamps["ok"] = metrics.value(LAST_SUCCESS, federated_trust_domain="partner.org")
            await partner.stop(0)
            with pytest.raises(FetchError):
                await fetcher.fetch_once(PARTNER)

    run(body())
    assert stamps["before"] <= stamps["ok"] <= stamps["after"]
    # The endpoint went away: the attempt is counted, the last success stays where it was.
    assert metrics.value(LAST_SUCCESS, federated_trust_domain="partner.org") == stamps["ok"]
    assert metrics.value(FETCHES, federated_trust_domain="partner.org", outcome="ok") == 1
    unreachable = metrics.value(
        FETCHES, federated_trust_domain="partner.org", outcome="unreachable"
    )
    assert unreachable == 1


def test_a_partner_never_fetched_is_exported_as_zero_not_left_out() -> None:
    metrics = CaMetrics("example.org", CLUSTER)
    metrics.federation_fetch("partner.org", "endpoint-unauthenticated")
    exposition = metrics.exposition().decode()
    assert (
        f'{LAST_SUCCESS}{{cluster="{CLUSTER}",federated_trust_domain="partner.org",'
        'trust_domain="example.org"} 0.0'
    ) in exposition


def test_ca_serve_exports_the_partners_last_success_on_its_metrics_endpoint(
    partner_store: CaStore, ca_dir: Path, tmp_path: Path
) -> None:
    with serve(*listen_args(partner_store.root_dir, "--sign-workers", "0")) as (_, partner, _):
        path = tmp_path / "federation.yaml"
        path.write_text(
            "trustDomains:\n"
            "  - trustDomain: partner.org\n"
            f"    bundleEndpointURL: https://{partner['bundle_listen']}/\n"
            f"    bundleEndpointSPIFFEID: spiffe://partner.org/trellis/ca/{CLUSTER}\n"
            f"    bootstrapBundle: {partner_store.root_cert_path}\n"
        )
        started = time.time()
        args = listen_args(ca_dir, "--federation", str(path), "--sign-workers", "0")
        with serve(*args) as (_, ready, _):
            url = f"http://{ready['metrics_listen']}/metrics"
            seen: list[float] = []

            def stamped() -> bool:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    text = answer.read().decode()
                for line in text.splitlines():
                    if line.startswith(LAST_SUCCESS + "{"):
                        assert 'federated_trust_domain="partner.org"' in line, line
                        seen.append(float(line.rsplit(" ", 1)[1]))
                return bool(seen) and seen[-1] > 0

            wait_for(stamped, 30, "the first successful fetch of partner.org's bundle")
            assert started <= seen[-1] <= time.time()

            # Partner taken out of the file: its series goes, rather than aging forever.
            path.write_text("trustDomains: []\n")

            def forgotten() -> bool:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return LAST_SUCCESS + "{" not in answer.read().decode()

            wait_for(forgotten, 30, "partner.org's freshness series to go with the partner")
