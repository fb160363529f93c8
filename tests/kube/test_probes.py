"""Probe rewrite as the real API server stores it.

A Pod with HTTP (on a named port), TCP, gRPC and exec probes is created in a labelled
namespace; the webhook's patch passes the API server's own Pod validation, and the stored
Pod is what a kubelet would run: the network probes point at the sidecar's health port, the
sidecar's ``--app-probes`` holds the originals with the port name resolved, and the
annotation gives back the probes as stored before injection (with the API server's
defaults, which it applies before calling the webhook).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mesh_operator.injection import SIDECAR_NAME, InjectorConfig
from mesh_operator.probes import restore_probes
from sidecar.probes import AppProbe

from .conftest import Operators, create_namespace

HEALTH = InjectorConfig().health_port


def _pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probed", "labels": {"app": "probed"}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.example/app:1",
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"containerPort": 9090},
                    ],
                    "readinessProbe": {
                        "httpGet": {"path": "/ready", "port": "http"},
                        "timeoutSeconds": 2,
                    },
                    "livenessProbe": {"tcpSocket": {"port": 8080}},
                    "startupProbe": {"grpc": {"port": 9090, "service": "app"}},
                },
                {
                    "name": "helper",
                    "image": "registry.example/helper:1",
                    "livenessProbe": {"exec": {"command": ["/bin/true"]}},
                },
            ]
        },
    }


def test_a_stored_pod_probes_the_health_port_and_keeps_its_originals(
    operators: Operators,
) -> None:
    from sidecar.cli import build_config
    from trellis.cli import build_parser

    plane = operators.plane
    namespace = f"probes-{uuid.uuid4().hex[:8]}"
    create_namespace(plane, namespace, {"trellis.dev/inject": "enabled"})
    plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(_pod()))
    stored = plane.get("-n", namespace, "pod", "probed")

    app, helper = stored["spec"]["containers"]
    for field, kind in (
        ("readinessProbe", "readyz"),
        ("livenessProbe", "livez"),
        ("startupProbe", "startupz"),
    ):
        assert set(app[field]) & {"tcpSocket", "grpc", "exec"} == set(), field
        assert app[field]["httpGet"]["port"] == HEALTH
        assert app[field]["httpGet"]["path"] == f"/app-health/app/{kind}"
    assert app["readinessProbe"]["timeoutSeconds"] == 2
    assert helper["livenessProbe"]["exec"] == {"command": ["/bin/true"]}

    sidecar = next(c for c in stored["spec"]["initContainers"] if c["name"] == SIDECAR_NAME)
    config = build_config(build_parser().parse_args(sidecar["args"]))
    assert dict(config.app_probes) == {
        "/app-health/app/readyz": AppProbe("http", 8080, 2.0, "/ready"),
        "/app-health/app/livez": AppProbe("tcp", 8080),
        "/app-health/app/startupz": AppProbe("grpc", 9090, service="app"),
    }

    restored = restore_probes(stored)["spec"]["containers"][0]
    assert restored["readinessProbe"]["httpGet"]["port"] == "http"
    assert restored["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert restored["livenessProbe"]["tcpSocket"] == {"port": 8080}
    assert restored["startupProbe"]["grpc"] == {"port": 9090, "service": "app"}
    # The restored probes are valid in a Pod the API server accepts as is.
    bare = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "restored", "annotations": {"trellis.dev/inject": "false"}},
        # The service-account token mount names a volume of the stored pod only.
        "spec": {"containers": [{k: v for k, v in restored.items() if k != "volumeMounts"}]},
    }
    plane.kubectl_ok("-n", namespace, "create", "-f", "-", stdin=json.dumps(bare))
    assert plane.get("-n", namespace, "pod", "restored")["spec"]["containers"][0]["startupProbe"][
        "grpc"
    ] == {"port": 9090, "service": "app"}
