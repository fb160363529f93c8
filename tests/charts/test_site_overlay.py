"""overlays/site: the site values on top of manifests/ with kustomize, rendered by the real
kustomize (v5, built into the kubectl that tests/kube builds), compared with the base it
patches and with the chart given the same values.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .conftest import MANIFESTS, REPO, Render, key
from .test_kustomize_agreement import _differences, _without_helm_metadata

OVERLAY = REPO / "overlays" / "site"
SITE_IMAGE = "registry.example.com/platform/trellis:0.1.0"
# The values overlays/site is written with, as chart values.
AS_CHART_VALUES: dict[str, Any] = {
    "trustDomain": "mesh.example.com",
    "clusterName": "eu-west-1",
    "image": {"repository": "registry.example.com/platform/trellis", "tag": "0.1.0"},
    "cni": {"enabled": True},
}
# Every field the overlay may change, as the paths _differences reports.
SITE_FIELDS = re.compile(
    r"\.spec\.template\.spec\.containers\[\d\]\.(image|args\[\d+\])"
    r"|\.spec\.template\.spec\.volumes\[2\]\.secret\.items\[[234]\]\.path"
)


def _kustomize(kube_bin: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kube_bin / "kubectl"), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _objects(kube_bin: Path, folder: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    result = _kustomize(kube_bin, folder)
    assert result.returncode == 0, result.stderr
    return {key(d): d for d in yaml.safe_load_all(result.stdout) if d is not None}


def test_the_site_overlay_changes_only_the_site_values_of_the_base(kube_bin: Path) -> None:
    base = _objects(kube_bin, MANIFESTS)
    site = _objects(kube_bin, OVERLAY)
    assert set(site) == set(base)
    changed: dict[tuple[str, str, str], list[str]] = {}
    for object_key, doc in site.items():
        differences = _differences(doc, base[object_key])
        assert all(SITE_FIELDS.match(d.split(":")[0]) for d in differences), differences
        if differences:
            changed[object_key] = differences
    assert sorted(name for _, _, name in changed) == [
        "trellis-agent",
        "trellis-ca",
        "trellis-cni",
        "trellis-operator",
    ]
    operator = site[("Deployment", "trellis-system", "trellis-operator")]
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--trust-domain=mesh.example.com" in args
    assert f"--sidecar-image={SITE_IMAGE}" in args
    ca = site[("Deployment", "trellis-system", "trellis-ca")]["spec"]["template"]["spec"]
    assert "--cluster=eu-west-1" in ca["containers"][0]["args"]
    secret = next(v["secret"] for v in ca["volumes"] if v["name"] == "ca")
    paths = [item["path"] for item in secret["items"]]
    assert [p for p in paths if p.startswith("clusters/")] == [
        "clusters/eu-west-1/intermediate.crt",
        "clusters/eu-west-1/intermediate.key",
        "clusters/eu-west-1/jwt.key",
    ]
    text = yaml.safe_dump_all(list(site.values()))
    assert "localhost/trellis" not in text


def test_the_site_overlay_and_the_chart_with_the_same_values_install_the_same_objects(
    kube_bin: Path, render: Render
) -> None:
    site = _objects(kube_bin, OVERLAY)
    charted = {key(d): d for d in render(AS_CHART_VALUES)}
    shared = set(site) & set(charted)
    assert len(shared) >= 30
    for object_key in sorted(shared):
        if object_key == ("ConfigMap", "trellis-system", "trellis-prometheus"):
            # The chart also puts the site's cluster and trust domain into the scrape
            # jobs' labels; the overlay leaves the Prometheus configuration as it is.
            continue
        differences = _differences(_without_helm_metadata(charted[object_key]), site[object_key])
        assert not differences, (object_key, differences)


def test_the_site_overlay_stops_when_the_base_moves_under_its_patches(
    kube_bin: Path, tmp_path: Path
) -> None:
    """Each JSON patch `test`s the value it replaces: a base whose operator arguments
    moved is an error naming the test, not a patch of the wrong argument."""
    shutil.copytree(MANIFESTS, tmp_path / "manifests")
    shutil.copytree(OVERLAY, tmp_path / "overlays" / "site")
    deployment = tmp_path / "manifests" / "operator" / "deployment.yaml"
    text = deployment.read_text()
    moved = text.replace(
        "- --trust-domain=", "- --log-level=info\n            - --trust-domain=", 1
    )
    assert moved != text
    deployment.write_text(moved)
    assert _kustomize(kube_bin, tmp_path / "manifests").returncode == 0
    result = _kustomize(kube_bin, tmp_path / "overlays" / "site")
    assert result.returncode != 0
    assert "testing value /spec/template/spec/containers/0/args/2 failed" in result.stderr, (
        result.stderr
    )
