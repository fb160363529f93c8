"""The admission webhook's certificate pair, broken while it serves: over real HTTPS on
loopback, the pair's files rewritten under the running server (reload interval 0.1 s).

The kubelet updates a mounted Secret by swapping a symlink, so both files change at once;
a pair written file by file (a hand edit, another mount type) passes through a state where
the certificate is new and the key still old. The webhook says it keeps serving the old
pair then; this holds it to that.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from pathlib import Path

import aiohttp
import pytest

from mesh_operator.webhook_certs import WebhookPki, plan_rotation, service_dns_names

from .conftest import admission_review, pod, run
from .test_webhook_https import Webhook, webhook


def _fresh_pki() -> WebhookPki:
    return plan_rotation(
        None,
        dns_names=service_dns_names("trellis-operator", "trellis-system"),
        now=dt.datetime.now(dt.UTC),
    ).pki


def test_a_certificate_written_before_its_key_leaves_the_old_pair_serving(
    tmp_path: Path, webhook_pki: WebhookPki, caplog: pytest.LogCaptureFixture
) -> None:
    fresh = _fresh_pki()

    async def body() -> None:
        with caplog.at_level(logging.WARNING, logger="trellis.operator.webhook"):
            async with webhook(tmp_path, webhook_pki) as hook:
                await hook.review("/mutate", admission_review(pod()))
                (tmp_path / "tls" / "tls.crt").write_bytes(fresh.tls_crt)  # the key not yet
                for _ in range(50):
                    if any("certificate reload failed" in r.getMessage() for r in caplog.records):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the half-written pair was never refused")
                # Still the old pair: a new connection from a client trusting only the old
                # CA is served (a new session: a pooled connection would skip the handshake).
                async with aiohttp.ClientSession() as session:
                    again = Webhook(session, hook.port, hook.context)
                    try:
                        await again.review("/mutate", admission_review(pod()))
                    except (aiohttp.ClientConnectorError, ssl.SSLError) as exc:
                        raise AssertionError(f"the old pair is no longer served: {exc}") from exc

    run(body())
