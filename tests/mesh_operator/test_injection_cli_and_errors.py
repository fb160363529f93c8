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
