"""Fixtures for the chart tests: the Helm binary and ``helm template`` as a function.

Helm must already be built (``make helm``, which ``make test`` runs first); a missing
build is a skip naming the command, which CI (``CI=true``) turns into a failure. The
rendering runs the real Helm on the real chart: no template is evaluated in Python.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

# The real control plane's binaries, as tests/kube finds them (skipped until `make kube`).
from tests.kube.conftest import kube_bin  # noqa: F401

from .binaries import HELM_VERSION, HelmUnavailable, build, cache_dir, cached, stamp_now

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "trellis"
MANIFESTS = REPO / "manifests"
RELEASE = "trellis"

# Values a site would set: every one the issue names, none equal to its default.
SITE_VALUES: dict[str, Any] = {
    "trustDomain": "mesh.corp.example",
    "clusterName": "eu-west-1",
    "image": {
        "repository": "registry.corp.example/platform/trellis",
        "tag": "2.3.4",
        "pullPolicy": "Always",
    },
    "ca": {"replicas": 3, "resources": {"limits": {"cpu": "3", "memory": "1Gi"}}},
    "operator": {"outboundTrafficPolicy": "REGISTRY_ONLY"},
    "redirect": {"default": "cni"},
    "cni": {"enabled": True, "binDir": "/var/lib/cni/bin", "confDir": "/var/lib/cni/net.d"},
    "monitoring": {"prometheusOperator": {"enabled": True}},
}
SITE_NAMESPACE = "mesh"


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        stamp = stamp_now()
    except HelmUnavailable as exc:
        pytest.skip(f"Helm: {exc}")
    if not cached(cache_dir(), stamp):
        pytest.skip(f"helm {HELM_VERSION} is not built yet: run `make helm`")
    try:
        return build()
    except HelmUnavailable as exc:
        pytest.skip(f"Helm: {exc}")


def run_helm(helm: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run helm; the caller checks ``returncode`` (refusals are what some tests want)."""
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def values_file(values: dict[str, Any], folder: Path) -> Path:
    path = folder / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


Render = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """``helm template`` of the chart with these values, as decoded objects."""

    def _render(
        values: dict[str, Any] | None = None, namespace: str = "trellis-system"
    ) -> list[dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="trellis-chart-") as folder:
            args = ["template", RELEASE, str(CHART), "--namespace", namespace]
            if values:
                args += ["--values", str(values_file(values, Path(folder)))]
            result = run_helm(helm, *args)
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d is not None]

    return _render


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return (doc["kind"], meta.get("namespace") or "", meta["name"])


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every container and init container of a workload's pod template."""
    if doc["kind"] not in ("Deployment", "DaemonSet"):
        return []
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]
