"""``trellis operator run``: webhook on every replica, reconcilers on the leader only.

Start-up order: the webhook server starts at once (it waits for its certificate files to
appear, which the leader creates). The replica then campaigns for the Lease
(``mesh_operator.leader``); once leader it runs kopf (``standalone``: the Lease, not kopf's
peering, decides who acts), the sync loop and the certificate rotation, and keeps renewing.
If renewing fails for ``renew_deadline`` it stops everything and returns exit code 1; the
kubelet restarts it as a follower. Leadership is never handed back in-process.

One operator per process: when kopf stops it cancels every task created in its event loop
after it started, so the webhook, sync, rotation and renewal tasks are all created before
kopf starts, and nothing else may share the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from mesh_operator.errors import PermanentOperatorError, TemporaryOperatorError
from mesh_operator.handlers import OperatorConfig, OperatorState, build_registry, sync_loop
from mesh_operator.injection import InjectorConfig
from mesh_operator.kube import KubeClient
from mesh_operator.leader import LeaseRecord, decide, must_step_down
from mesh_operator.webhook import CertificateFiles, serve_webhook
from mesh_operator.webhook_certs import WebhookPki, plan_rotation, service_dns_names

__all__ = ["LeadershipLost", "WebhookOptions", "campaign", "rotate_webhook_certificate", "run"]

log = logging.getLogger("trellis.operator")
Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeadershipLost(Exception):
    """The Lease could not be renewed in time; the process must stop acting."""


@dataclass(frozen=True)
class WebhookOptions:
    files: CertificateFiles
    host: str = "0.0.0.0"  # the webhook Service must reach every replica's pod IP
    port: int = 9443
    injector: InjectorConfig = field(default_factory=InjectorConfig)


async def _try_lease(config: OperatorConfig, client: KubeClient, now: dt.datetime) -> bool:
    raw = await asyncio.to_thread(client.read_lease, config.namespace, config.lease_name)
    current = LeaseRecord.from_object(raw) if raw is not None else None
    decision = decide(
        current, identity=config.identity, now=now, duration_seconds=config.lease_duration
    )
    if decision.record is None:
        return False
    return await asyncio.to_thread(
        client.write_lease,
        config.namespace,
        config.lease_name,
        decision.record.spec(),
        None if decision.action == "create" else decision.record.resource_version,
    )


async def campaign(config: OperatorConfig, client: KubeClient, clock: Clock = _utcnow) -> None:
    """Return once this replica holds the Lease."""
    while True:
        try:
            if await _try_lease(config, client, clock()):
                log.info("became leader", extra={"fields": {"identity": config.identity}})
                return
        except TemporaryOperatorError as exc:
            log.warning("lease unavailable", extra={"fields": {"error": str(exc)}})
        await asyncio.sleep(config.retry_period)


async def keep_leading(config: OperatorConfig, client: KubeClient, clock: Clock = _utcnow) -> None:
    """Renew every ``retry_period``; raise ``LeadershipLost`` past ``renew_deadline``."""
    last = clock()
    while True:
        await asyncio.sleep(config.retry_period)
        try:
            if await _try_lease(config, client, clock()):
                last = clock()
                continue
            raise LeadershipLost("another replica holds the lease")
        except TemporaryOperatorError as exc:
            log.warning("lease renewal failed", extra={"fields": {"error": str(exc)}})
        if must_step_down(last, now=clock(), renew_deadline=config.renew_deadline):
            raise LeadershipLost(f"lease not renewed for {config.renew_deadline}s")


async def rotate_webhook_certificate(
    config: OperatorConfig, client: KubeClient, *, now: dt.datetime
) -> str:
    """Create or rotate the webhook certificate; the caBundle is written before the Secret."""
    data = await asyncio.to_thread(client.read_secret, config.namespace, config.webhook_secret)
    current = WebhookPki.from_secret_data(data) if data is not None else None
    plan = plan_rotation(
        current, dns_names=service_dns_names(config.webhook_service, config.namespace), now=now
    )
    await asyncio.to_thread(
        client.set_ca_bundle, config.mutating_webhook, config.validating_webhook, plan.pki.ca_bundle
    )
    if plan.changed:
        await asyncio.to_thread(
            client.write_secret, config.namespace, config.webhook_secret, plan.pki.secret_data()
        )
        log.info("webhook certificate updated", extra={"fields": {"reason": plan.reason}})
    return plan.reason


async def _certificate_loop(config: OperatorConfig, client: KubeClient) -> None:
    while True:
        delay = config.cert_check_interval
        try:
            await rotate_webhook_certificate(config, client, now=_utcnow())
        except TemporaryOperatorError as exc:
            log.warning("webhook certificate", extra={"fields": {"error": str(exc)}})
            delay = min(delay, exc.delay)
        except PermanentOperatorError as exc:
            log.error("webhook certificate", extra={"fields": {"error": str(exc)}})
        await asyncio.sleep(delay)


async def _first_done(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # re-raise LeadershipLost or a crash
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def run(
    config: OperatorConfig,
    api_client: Any,
    webhook: WebhookOptions | None,
    *,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until ``stop`` is set (0) or leadership is lost (1)."""
    client = KubeClient(api_client)
    stop = stop or asyncio.Event()
    parts: list[Awaitable[Any]] = [stop.wait()]
    if webhook is not None:
        parts.append(
            serve_webhook(webhook.injector, webhook.files, host=webhook.host, port=webhook.port)
        )

    async def lead() -> None:
        await campaign(config, client)
        state = OperatorState()
        registry = build_registry(config, state, client)
        stop_flag: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            await _first_done(
                kopf.operator(
                    registry=registry,
                    standalone=True,
                    clusterwide=True,
                    stop_flag=stop_flag,
                ),
                sync_loop(config, state, client),
                _certificate_loop(config, client),
                keep_leading(config, client),
            )
        finally:
            if not stop_flag.done():
                stop_flag.set_result(None)

    parts.append(lead())
    try:
        await _first_done(*parts)
    except LeadershipLost as exc:
        log.error("stepping down", extra={"fields": {"reason": str(exc)}})
        return 1
    return 0
