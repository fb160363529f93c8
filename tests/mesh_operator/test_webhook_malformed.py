"""Malformed AdmissionReviews over the real HTTPS webhook: every one gets a 4xx (or, when
the review itself is sound, a denial) with a one-line reason, and nothing in the logs
carries a traceback. The API server validates objects before it calls a webhook; these are
what anything else that can reach the port may send."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh_operator.admission import MAX_JSON_DEPTH, MAX_REVIEW_BYTES
from mesh_operator.webhook_certs import WebhookPki

from .conftest import WEBHOOK_HOST, admission_review, pod, run
from .test_webhook_https import Webhook, webhook


async def post(hook: Webhook, path: str, body: Any) -> tuple[int, str]:
    """POST ``body`` (bytes, or an async iterator: chunked, no Content-Length); the status
    and the raw text (a 500 from aiohttp is text/plain, not JSON)."""
    async with hook.session.post(
        f"https://127.0.0.1:{hook.port}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
        ssl=hook.context,
        server_hostname=WEBHOOK_HOST,
    ) as response:
        return response.status, await response.text()


def error_of(status: int, text: str) -> str:
    """The one-line reason of an envelope refusal."""
    assert 400 <= status < 500, (status, text[:200])
    reason = json.loads(text)["error"]
    assert isinstance(reason, str) and reason and "\n" not in reason
    return reason


def no_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None, record.getMessage()
        assert "Traceback" not in record.getMessage()
        assert record.levelno < logging.ERROR, record.getMessage()


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000_000])
def test_deeply_nested_json_is_a_400_not_a_500_with_a_traceback(
    depth: int, tmp_path: Path, webhook_pki: WebhookPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nested = b"[" * depth + b"]" * depth  # 2 MB at a million levels: under the size limit
    envelope = json.dumps(admission_review(pod())).encode()
    body = envelope[:-1] + b', "deep": ' + nested + b"}"
    assert len(body) <= MAX_REVIEW_BYTES

    async def main() -> list[tuple[int, str]]:
        async with webhook(tmp_path, webhook_pki) as hook:
            return [await post(hook, path, body) for path in ("/mutate", "/validate")]

    for status, text in run(main()):
        assert status == 400, (status, text[:200])
        assert "nests deeper than" in error_of(status, text)
    no_traceback_logged(caplog)


V1 = b'"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"'
BAD_ENVELOPES: list[tuple[bytes, str]] = [
    (b"[]", "must be a JSON object"),
    (b'"AdmissionReview"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b"1e999", "must be a JSON object"),
    (b"\xff\xfe{", "not JSON"),
    (b'{"n": ' + b"7" * 5000 + b"}", "not JSON"),
    (b"{" + V1 + b', "request": []}', "no request object"),
    (b"{" + V1 + b', "request": {"uid": 7}}', "no uid"),
    (b'{"apiVersion": ["admission.k8s.io/v1"], "kind": {"a": 1}}', "expected kind AdmissionReview"),
]


def _review(**request: Any) -> dict[str, Any]:
    review = admission_review(pod())
    review["request"].update(request)
    return review


def _pod_with(meta: Any = None, **spec: Any) -> dict[str, Any]:
    obj = pod()
    if meta is not None:
        obj["metadata"] = meta
    obj["spec"].update(spec)
    return _review(object=obj)


BAD_PODS: list[tuple[dict[str, Any], str]] = [
    (_pod_with(meta="web"), "metadata is not an object"),
    (_pod_with(meta={"name": "p", "annotations": ["a"]}), "metadata.annotations is not an object"),
    (_pod_with(meta={"name": "p", "labels": "x"}), "metadata.labels is not an object"),
    (
        _pod_with(meta={"name": "p", "annotations": {"trellis.dev/upstreams": 5}}),
        "metadata.annotations['trellis.dev/upstreams'] is not a string",
    ),
    (_pod_with(containers={"name": "app"}), "spec.containers is not a list"),
    (_pod_with(initContainers="init"), "spec.initContainers is not a list"),
    (_pod_with(volumes=[{"name": "v"}, 3]), "spec.volumes[1] is not an object"),
    (_review(kind=[[["x" * 5000]]]), "mutates core/v1 Pods only"),
]


def test_malformed_envelopes_and_pods_get_a_one_line_reason_and_no_traceback(
    tmp_path: Path, webhook_pki: WebhookPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def chunked_huge() -> AsyncIterator[bytes]:
        yield b'{"pad": "'
        for _ in range(MAX_REVIEW_BYTES // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    async def main() -> tuple[list[tuple[int, str]], list[dict[str, Any]], tuple[int, str]]:
        async with webhook(tmp_path, webhook_pki) as hook:
            envelopes = [await post(hook, "/mutate", body) for body, _ in BAD_ENVELOPES]
            denials = [await hook.review("/mutate", review) for review, _ in BAD_PODS]
            huge = await post(hook, "/validate", chunked_huge())
            return envelopes, denials, huge

    envelopes, denials, huge = run(main())
    for (status, text), (body, expected) in zip(envelopes, BAD_ENVELOPES, strict=True):
        assert status == 400, (body[:40], status, text[:200])
        assert expected in error_of(status, text), body[:40]
    for denial, (_, expected) in zip(denials, BAD_PODS, strict=True):
        assert denial["allowed"] is False and denial["status"]["code"] == 400
        message = denial["status"]["message"]
        assert expected in message and "\n" not in message
        assert len(message) < 400, message  # a caller's huge value is not echoed back whole
    status, text = huge
    assert status == 413 and "exceeds" in error_of(status, text)
    no_traceback_logged(caplog)
