"""Injection as a pure function over pod variants, the ``trellis operator inject`` CLI, and
API errors translated into temporary vs permanent operator errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from kubernetes.client.exceptions import ApiException

from mesh_operator.errors import PermanentOperatorError, TemporaryOperatorError
from mesh_operator.injection import (
    SIDECAR_NAME,
    InjectorConfig,
    UpstreamError,
    parse_upstreams,
    plan_injection,
)
from mesh_operator.kube import _call

from .conftest import pod

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"annotations": {"team": "a/b~c"}},
        {"spec": {"initContainers": [{"name": "setup", "image": "x"}]}},
        {"spec": {"volumes": None, "initContainers": None}},
        {"annotations": {"trellis.dev/upstreams": "a.b:80=9001, c.d:443=9002"}},
    ],
)
def test_injection_is_idempotent_for_every_pod_shape(variant: dict[str, Any]) -> None:
    original = pod(**variant)
    decision = plan_injection(original, InjectorConfig())
    once = jsonpatch.apply_patch(original, list(decision.patch))
    assert [c["name"] for c in once["spec"]["initContainers"]].count(SIDECAR_NAME) == 1
    assert plan_injection(once, InjectorConfig()).patch == ()
    assert once["metadata"]["annotations"]["trellis.dev/injected"] == "0.1.0"


def test_upstreams_are_parsed_strictly() -> None:
    assert parse_upstreams("api.default:8080=9001") == (("api.default", 8080, 9001),)
    for bad, words in (
        ("api:8080", "SERVICE:PORT=LOCAL_PORT"),
        ("a:1=9,b:2=9", "used twice"),
        ("a:70000=1", "1-65535"),
        (" , ", "empty"),
    ):
        with pytest.raises(UpstreamError, match=words):
            parse_upstreams(bad)


def _injected_sidecar(original: dict[str, Any]) -> dict[str, Any]:
    injected = jsonpatch.apply_patch(
        original, list(plan_injection(original, InjectorConfig()).patch)
    )
    return next(c for c in injected["spec"]["initContainers"] if c["name"] == SIDECAR_NAME)


def test_the_injected_sidecar_forwards_exactly_the_pods_tcp_container_ports() -> None:
    """The sidecar's inbound targets are the app's declared TCP ports, parsed by the
    sidecar's own command line; UDP ports and the sidecar's own ports are left out."""
    from sidecar.cli import build_config
    from trellis.cli import build_parser

    containers = [
        {
            "name": "app",
            "image": "registry.example/ledger:1.4",
            "ports": [
                {"containerPort": 8080, "protocol": "TCP"},
                {"containerPort": 9090},  # protocol defaults to TCP
                {"containerPort": 5353, "protocol": "UDP"},
            ],
        },
        {
            "name": "admin-ui",
            "image": "registry.example/ui:2",
            "ports": [{"containerPort": 8443}, {"containerPort": 15000}, {"containerPort": 8080}],
        },
    ]
    sidecar = _injected_sidecar(pod(spec={"containers": containers}))
    assert "--app-ports=8080,8443,9090" in sidecar["args"]
    config = build_config(build_parser().parse_args(sidecar["args"]))
    assert sorted(config.inbound.targets) == [8080, 8443, 9090]
    assert {str(t.app) for t in config.inbound.targets.values()} == {
        "127.0.0.1:8080",
        "127.0.0.1:8443",
        "127.0.0.1:9090",
    }
    assert config.inbound.app_for(15000) is None and config.inbound.app_for(5353) is None
    assert str(config.admin) == "127.0.0.1:15000"
    assert str(config.health) == "0.0.0.0:15020"
    # A pod that declares no port gets a sidecar that forwards nothing.
    bare = _injected_sidecar(pod(spec={"containers": [{"name": "app", "image": "x"}]}))
    assert not [a for a in bare["args"] if a.startswith("--app-ports")]
    assert build_config(build_parser().parse_args(bare["args"])).inbound.targets == {}


def test_probes_and_scrapes_use_the_health_port_and_only_it_escapes_the_redirect() -> None:
    original = pod()
    injected = jsonpatch.apply_patch(
        original, list(plan_injection(original, InjectorConfig()).patch)
    )
    init, sidecar = injected["spec"]["initContainers"][:2]
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert sidecar[probe]["httpGet"]["port"] == 15020
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"trellis-in": 15008, "trellis-metrics": 15020}  # not the admin port
    assert "--exclude-inbound-ports=15020" in init["args"]
    # Prometheus finds the sidecars by that port's name.
    monitors = (REPO / "manifests/monitoring/servicemonitor.yaml").read_text()
    assert "- port: trellis-metrics" in monitors
    scrape = (REPO / "manifests/prometheus/prometheus.yml").read_text()
    assert "regex: trellis-sidecar;trellis-metrics" in scrape
    assert "trellis-admin" not in monitors + scrape


def test_the_inject_command_prints_the_pod_the_webhook_would_admit(tmp_path: Path) -> None:
    source = tmp_path / "pod.json"
    source.write_text(json.dumps(pod()))
    result = subprocess.run(
        [sys.executable, "-m", "trellis", "operator", "inject", str(source)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=True,
    )
    injected = json.loads(result.stdout)
    assert SIDECAR_NAME in [c["name"] for c in injected["spec"]["initContainers"]]
    assert "injected (transparent)" in result.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "trellis", "operator", "inject", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1 and refused.stderr.startswith("trellis: error: cannot read")


def raising(status: int) -> Any:
    def call() -> None:
        raise ApiException(status=status, reason="Reason")

    return call


@pytest.mark.parametrize("status", [409, 429, 500, 503])
def test_conflicts_throttling_and_server_errors_are_temporary(status: int) -> None:
    with pytest.raises(TemporaryOperatorError, match=f"HTTP {status}"):
        _call("patch thing", raising(status))


def test_forbidden_is_permanent_and_points_at_the_rbac() -> None:
    with pytest.raises(PermanentOperatorError, match="lacks this permission"):
        _call("create ConfigMap shop/trellis-policy", raising(403))
    with pytest.raises(PermanentOperatorError, match="HTTP 422"):
        _call("patch status", raising(422))


def test_an_unreachable_api_server_is_temporary() -> None:
    def refused() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(TemporaryOperatorError, match="unreachable"):
        _call("read Lease", refused)
