"""Federation end to end with real processes on loopback.

Two ``trellis ca serve`` processes, one per trust domain (example.org and partner.org);
example.org's CA federates with partner.org's bundle endpoint (https_spiffe, bootstrapped
from partner.org's root file); a ``trellis agent`` of example.org; and this test as the
workload, through py-spiffe's ``WorkloadApiClient`` and the raw FetchX509SVID stream.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from spiffe import TrustDomain as PyTrustDomain
from spiffe import WorkloadApiClient

from ca import JwtAuthority, RootAuthority, TrustDomain
from ca.agent.workload_client import WorkloadClient
from ca.store import CaStore
from tests.ca.agent.test_e2e_pyspiffe import Mesh, _stop, _trellis
from tests.support import wait_for

WEB = "spiffe://example.org/ns/default/sa/web"
PARTNER_ENDPOINT_ID = "spiffe://partner.org/trellis/ca/east"


def _make_ca_dir(directory: Path, trust_domain: str, cluster: str) -> CaStore:
    now = dt.datetime.now(dt.UTC)
    store = CaStore(directory)
    root = RootAuthority.create(TrustDomain(trust_domain), now=now)
    store.save_root(root, b"e2e-passphrase-123")
    store.save_intermediate(root.issue_intermediate(cluster, now=now), JwtAuthority.generate())
    return store


def _entries(*, federates: bool) -> str:
    return (
        "entries:\n"
        "  - id: web\n"
        f"    spiffe_id: {WEB}\n"
        f"    selectors: [unix:uid:{os.getuid()}]\n"
        "    nodes: [node-a]\n" + ("    federates_with: [partner.org]\n" if federates else "")
    )


@dataclass
class Federation:
    mesh: Mesh
    partner: subprocess.Popen[str]
    partner_store: CaStore
    entries: Path


@pytest.fixture
def federation(tmp_path: Path, short_dir: Path) -> Iterator[Federation]:
    partner_store = _make_ca_dir(tmp_path / "partner", "partner.org", "east")
    partner = _trellis(
        "ca", "serve", "--dir", str(tmp_path / "partner"), "--cluster", "east",
        "--listen", "127.0.0.1:0", "--attest-listen", "127.0.0.1:0",
        "--bundle-listen", "127.0.0.1:0", "--sign-workers", "0",
    )  # fmt: skip
    mesh: Mesh | None = None
    try:
        assert partner.stdout is not None
        line = partner.stdout.readline()
        if not line:
            raise AssertionError(f"partner CA did not start: {_stop(partner)}")
        bundle_listen = json.loads(line)["bundle_listen"]
        (tmp_path / "federation.yaml").write_text(
            "trustDomains:\n"
            "  - trustDomain: partner.org\n"
            f"    bundleEndpointURL: https://{bundle_listen}/\n"
            f"    bundleEndpointSPIFFEID: {PARTNER_ENDPOINT_ID}\n"
            "    bootstrapBundle: partner/root.crt\n"
        )
        _make_ca_dir(tmp_path / "ca", "example.org", "west")
        entries = tmp_path / "entries.yaml"
        entries.write_text(_entries(federates=True))
        mesh = Mesh(tmp_path, short_dir / "agent.sock")
        mesh.start_ca(mint_token=True, extra=["--federation", str(tmp_path / "federation.yaml")])
        mesh.start_agent()
        yield Federation(mesh, partner, partner_store, entries)
    finally:
        for process in (mesh and mesh.agent, mesh and mesh.ca, partner):
            if process is not None:
                _stop(process)


def test_a_workload_whose_entry_federates_with_partner_org_gets_its_bundle_and_others_do_not(
    federation: Federation,
) -> None:
    partner_root = federation.partner_store.root_certificate()
    partner_td = PyTrustDomain("partner.org")
    client = WorkloadApiClient(federation.mesh.endpoint, default_timeout=15)
    try:

        def partner_bundle_served() -> bool:
            bundle = client.fetch_x509_context().x509_bundle_set.get_bundle_for_trust_domain(
                partner_td
            )
            return bundle is not None

        # The example.org CA fetches partner.org's bundle once started; the agent follows.
        wait_for(partner_bundle_served, 30, "partner.org's bundle in the X509 context")
        context = client.fetch_x509_context()
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(partner_td)
        assert bundle is not None and list(bundle.x509_authorities) == [partner_root]
        assert str(context.default_svid.spiffe_id) == WEB
        with WorkloadClient(federation.mesh.endpoint) as raw:
            response = raw.fetch_x509_svid()
        assert list(response.federated_bundles) == ["spiffe://partner.org"]
        assert client.fetch_jwt_bundles().get_bundle_for_trust_domain(partner_td) is not None

        # The same workload, once its entry no longer federates: the bundle goes away.
        federation.entries.write_text(_entries(federates=False))
        wait_for(lambda: not partner_bundle_served(), 30, "partner.org's bundle to go")
        with WorkloadClient(federation.mesh.endpoint) as raw:
            assert dict(raw.fetch_x509_svid().federated_bundles) == {}
            assert "spiffe://partner.org" not in raw.fetch_x509_bundles().bundles
        assert client.fetch_jwt_bundles().get_bundle_for_trust_domain(partner_td) is None
    finally:
        client.close()
