"""Injection moves the app's HTTP, TCP and gRPC probes to the sidecar's health port.

The pod goes through `plan_injection` and the JSONPatch is applied as the API server would
(`jsonpatch`); the sidecar's `--app-probes` argument is then parsed by the sidecar's own
command line, so the two sides are checked against each other.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch

from mesh_operator.injection import SIDECAR_NAME, InjectorConfig, plan_injection
from mesh_operator.probes import restore_probes
from sidecar.probes import AppProbe

from .conftest import pod

HEALTH = InjectorConfig().health_port


def _app() -> dict[str, Any]:
    return {
        "name": "web",
        "image": "registry.example/web:2",
        "ports": [
            {"name": "http", "containerPort": 8080},
            {"name": "admin-tls", "containerPort": 8443},
            {"name": "rpc", "containerPort": 9090},
        ],
        "livenessProbe": {
            "tcpSocket": {"port": 8080},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {
                "path": "/ready",
                "port": "admin-tls",
                "scheme": "HTTPS",
                "httpHeaders": [{"name": "X-Probe", "value": "kubelet"}],
            },
            "timeoutSeconds": 3,
            "periodSeconds": 5,
        },
        "startupProbe": {"grpc": {"port": 9090, "service": "web"}, "failureThreshold": 30},
    }


def _worker() -> dict[str, Any]:
    return {
        "name": "worker",
        "image": "registry.example/worker:2",
        "livenessProbe": {"exec": {"command": ["/bin/check"]}},
        "readinessProbe": {"tcpSocket": {"port": "missing"}},  # no such named port
    }


def _pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    original = pod(annotations=annotations or {})
    original["spec"]["containers"] = [_app(), _worker()]
    return original


def _inject(original: dict[str, Any]) -> dict[str, Any]:
    patch = list(plan_injection(original, InjectorConfig()).patch)
    result: dict[str, Any] = jsonpatch.apply_patch(original, patch)
    return result


def _sidecar_args(injected: dict[str, Any]) -> list[str]:
    sidecar = next(c for c in injected["spec"]["initContainers"] if c["name"] == SIDECAR_NAME)
    return list(sidecar["args"])


def _parsed_app_probes(injected: dict[str, Any]) -> dict[str, AppProbe]:
    from sidecar.cli import build_config
    from trellis.cli import build_parser

    args = build_parser().parse_args(_sidecar_args(injected))
    return dict(build_config(args).app_probes)


def test_http_tcp_and_grpc_probes_point_at_the_health_port_and_keep_their_timing() -> None:
    injected = _inject(_pod())
    app = injected["spec"]["containers"][0]
    assert app["livenessProbe"] == {
        "httpGet": {"path": "/app-health/web/livez", "port": HEALTH, "scheme": "HTTP"},
        "periodSeconds": 10,
        "failureThreshold": 3,
    }
    assert app["readinessProbe"] == {
        "httpGet": {"path": "/app-health/web/readyz", "port": HEALTH, "scheme": "HTTP"},
        "timeoutSeconds": 3,
        "periodSeconds": 5,
    }
    assert app["startupProbe"] == {
        "httpGet": {"path": "/app-health/web/startupz", "port": HEALTH, "scheme": "HTTP"},
        "failureThreshold": 30,
    }


def test_the_sidecar_runs_the_original_probes_with_named_ports_resolved() -> None:
    assert _parsed_app_probes(_inject(_pod())) == {
        "/app-health/web/livez": AppProbe("tcp", 8080),
        "/app-health/web/readyz": AppProbe(
            "http", 8443, 3.0, "/ready", True, (("X-Probe", "kubelet"),)
        ),
        "/app-health/web/startupz": AppProbe("grpc", 9090, service="web"),
    }


def test_exec_probes_and_probes_on_undeclared_named_ports_are_left_unchanged() -> None:
    original = _pod()
    injected = _inject(original)
    assert injected["spec"]["containers"][1] == original["spec"]["containers"][1]
    assert not any(path.startswith("/app-health/worker/") for path in _parsed_app_probes(injected))


def test_the_annotation_keeps_the_originals_and_restoring_gives_back_the_pods_probes() -> None:
    original = _pod()
    injected = _inject(original)
    kept = json.loads(injected["metadata"]["annotations"]["trellis.dev/original-probes"])
    web = original["spec"]["containers"][0]
    assert kept == {"web": {k: web[k] for k in ("livenessProbe", "readinessProbe", "startupProbe")}}
    restored = restore_probes(injected)
    assert restored["spec"]["containers"] == original["spec"]["containers"]
    assert "trellis.dev/original-probes" not in restored["metadata"]["annotations"]


def test_the_opt_out_annotation_leaves_every_probe_to_the_kubelet() -> None:
    original = _pod({"trellis.dev/rewrite-probes": "false"})
    injected = _inject(original)
    assert injected["spec"]["containers"] == original["spec"]["containers"]
    assert not any(a.startswith("--app-probes") for a in _sidecar_args(injected))
    assert "trellis.dev/original-probes" not in injected["metadata"]["annotations"]


def test_explicit_upstream_pods_keep_their_probes_since_nothing_redirects_them() -> None:
    original = _pod({"trellis.dev/upstreams": "api.default:8080=9001"})
    assert _inject(original)["spec"]["containers"] == original["spec"]["containers"]


def test_reinjection_is_idempotent_and_a_pod_stripped_of_its_sidecar_keeps_its_originals() -> None:
    original = _pod()
    injected = _inject(original)
    assert plan_injection(injected, InjectorConfig()).patch == ()
    # The sidecar taken out by hand, the moved probes and the annotation left behind:
    # injecting again must run the originals, not probe the health port through itself.
    stripped = copy.deepcopy(injected)
    stripped["spec"]["initContainers"] = [
        c for c in stripped["spec"]["initContainers"] if not c["name"].startswith("trellis-")
    ]
    del stripped["metadata"]["annotations"]["trellis.dev/injected"]
    again = _inject(stripped)
    assert _parsed_app_probes(again) == _parsed_app_probes(injected)
    assert again["spec"]["containers"] == injected["spec"]["containers"]
    assert (
        again["metadata"]["annotations"]["trellis.dev/original-probes"]
        == injected["metadata"]["annotations"]["trellis.dev/original-probes"]
    )
