"""The redirect annotations, from the pod to the rules: the real HTTPS webhook injects
the init container with their flags, and those flags, given to `trellis sidecar iptables
--dry-run`, produce the per-family rules; a malformed annotation refuses the pod with one
line naming it, instead of an init container that would crash-loop."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from mesh_operator.webhook_certs import WebhookPki
from trellis.cli import main

from .conftest import admission_review, pod, run
from .test_webhook_https import webhook
from .test_webhook_malformed import no_traceback_logged

ANNOTATIONS = {
    "trellis.dev/exclude-outbound-ip-ranges": "169.254.169.254/32, fd00::/8",
    "trellis.dev/include-outbound-ip-ranges": "10.0.0.0/8,fc00::/7",
    "trellis.dev/exclude-inbound-ports": "9090,15020",
    "trellis.dev/exclude-outbound-ports": "5432",
}


def _init_args(tmp_path: Path, webhook_pki: WebhookPki, annotations: dict[str, str]) -> list[str]:
    async def main_() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with webhook(tmp_path, webhook_pki) as hook:
            return await hook.inject(pod(annotations=annotations))

    injected, _ = run(main_())
    init = next(c for c in injected["spec"]["initContainers"] if c["name"] == "trellis-init")
    args: list[str] = init["args"]
    return args


def test_the_annotations_become_the_init_containers_redirect_rules(
    tmp_path: Path, webhook_pki: WebhookPki, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _init_args(tmp_path, webhook_pki, ANNOTATIONS)
    assert "--exclude-inbound-ports=15020,9090" in args  # the health port stays first
    assert "--exclude-outbound-ports=5432" in args
    assert "--exclude-outbound-ip-ranges=169.254.169.254/32,fd00::/8" in args
    assert "--include-outbound-ip-ranges=10.0.0.0/8,fc00::/7" in args

    # What the init container will run, as a dry run: each tool gets its own family.
    assert main([*args, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    v4 = [line for line in lines if line.startswith("iptables ")]
    v6 = [line for line in lines if line.startswith("ip6tables ")]
    assert "iptables -t nat -A TRELLIS_INBOUND -p tcp --dport 9090 -j RETURN" in v4
    assert "iptables -t nat -A TRELLIS_OUTPUT -d 169.254.169.254/32 -j RETURN" in v4
    assert (
        "iptables -t nat -A TRELLIS_OUTPUT -p tcp -d 10.0.0.0/8 -j REDIRECT --to-ports 15001" in v4
    )
    assert "ip6tables -t nat -A TRELLIS_OUTPUT -d fd00::/8 -j RETURN" in v6
    assert not any("fd00" in line or "fc00" in line for line in v4)
    assert not any("10.0.0.0" in line or "169.254" in line for line in v6)
    assert not any(line.endswith("-p tcp -j REDIRECT --to-ports 15001") for line in lines)


def test_a_pod_without_the_annotations_keeps_the_catch_all_redirect(
    tmp_path: Path, webhook_pki: WebhookPki
) -> None:
    args = _init_args(tmp_path, webhook_pki, {})
    assert "--exclude-inbound-ports=15020" in args
    assert not any("ip-ranges" in arg or "outbound-ports" in arg for arg in args)


BAD = [
    ({"trellis.dev/exclude-outbound-ip-ranges": "10.0.0.1/8"}, "has host bits set"),
    ({"trellis.dev/exclude-outbound-ip-ranges": "*"}, "would exclude every address"),
    ({"trellis.dev/include-outbound-ip-ranges": "10.0.0.0/8,*"}, "cannot be combined"),
    ({"trellis.dev/include-outbound-ip-ranges": "example.com"}, "is not a CIDR"),
    ({"trellis.dev/exclude-inbound-ports": "80,http"}, "'http' is not a port number"),
    ({"trellis.dev/exclude-outbound-ports": "70000"}, "'70000' is not a port number"),
]


def test_malformed_redirect_annotations_are_refused_at_admission_in_one_line(
    tmp_path: Path, webhook_pki: WebhookPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main_() -> list[dict[str, Any]]:
        async with webhook(tmp_path, webhook_pki) as hook:
            return [
                await hook.review("/mutate", admission_review(pod(annotations=bad)))
                for bad, _ in BAD
            ]

    for denial, (bad, expected) in zip(run(main_()), BAD, strict=True):
        assert denial["allowed"] is False and denial["status"]["code"] == 422, denial
        message = denial["status"]["message"]
        (key,) = bad
        assert message.startswith(f"{key}: ") and expected in message, message
        assert "\n" not in message
    no_traceback_logged(caplog)
