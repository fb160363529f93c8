"""``trellis operator run`` and ``trellis operator inject`` (the injection, offline).

``run`` connects with the in-cluster ServiceAccount (or ``--kubeconfig``), serves the
webhook on every replica and reconciles on the Lease holder. ``inject`` reads a Pod (JSON
or YAML) and prints the injected Pod: the same pure function the webhook runs, for
``kubectl`` pipelines and for checking what the webhook would do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import yaml

from ca.spiffeid import SpiffeIdError, TrustDomain
from core.errors import CliError
from mesh_operator.injection import InjectorConfig, UpstreamError, plan_injection
from meshapi.redirect import AnnotationError

__all__ = ["register"]


def _trust_domain(text: str) -> TrustDomain:
    try:
        return TrustDomain(text)
    except SpiffeIdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(commands: Any) -> None:
    """Add ``trellis operator ...`` to the top-level subcommands."""
    operator = commands.add_parser("operator", help="the Kubernetes operator and webhook")
    sub = operator.add_subparsers(dest="operator_command", metavar="OPERATOR_COMMAND")
    sub.required = True
    p = sub.add_parser("run", help="reconcile CRDs into entries and serve the webhook")
    p.add_argument("--trust-domain", required=True, type=_trust_domain)
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "trellis-system"))
    p.add_argument("--identity", default=os.environ.get("POD_NAME", socket.gethostname()))
    p.add_argument("--kubeconfig", type=Path, help="default: in-cluster configuration")
    p.add_argument(
        "--webhook-host", default="0.0.0.0", help="address to serve the webhook on (all: 0.0.0.0)"
    )
    p.add_argument("--webhook-port", type=int, default=9443)
    p.add_argument("--webhook-cert-dir", type=Path, default=Path("/etc/trellis/webhook"))
    p.add_argument("--no-webhook", action="store_true", help="reconcile only")
    p.add_argument("--sidecar-image", default=InjectorConfig().image)
    p.add_argument("--agent-socket-dir", default=InjectorConfig().agent_socket_host_dir)
    p.add_argument(
        "--outbound-traffic-policy",
        choices=("ALLOW_ANY", "REGISTRY_ONLY", "off"),
        default="ALLOW_ANY",
        help="what sidecars do with destinations outside the mesh: pass them through "
        "(ALLOW_ANY, the default) or refuse them (REGISTRY_ONLY); off publishes no mesh "
        "registry, so every destination is taken to be in the mesh",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("inject", help="print a Pod as the webhook would inject it")
    p.add_argument("file", type=Path, help="a Pod manifest (JSON or YAML); - for stdin")
    p.add_argument("--sidecar-image", default=InjectorConfig().image)
    p.set_defaults(handler=cmd_inject)


def cmd_inject(args: argparse.Namespace) -> int:
    import jsonpatch

    try:
        text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        pod = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"cannot read {args.file}: {exc}") from exc
    if not isinstance(pod, dict) or pod.get("kind") != "Pod":
        raise CliError(f"{args.file}: expected a Pod manifest")
    try:
        decision = plan_injection(pod, InjectorConfig(image=args.sidecar_image))
    except (UpstreamError, AnnotationError) as exc:
        raise CliError(str(exc)) from exc
    print(json.dumps(jsonpatch.apply_patch(pod, list(decision.patch)), indent=2))
    print(f"trellis operator inject: {decision.reason}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import kubernetes

    from core.logs import JsonLogFormatter
    from mesh_operator.handlers import OperatorConfig
    from mesh_operator.replica import WebhookOptions, run
    from mesh_operator.webhook import CertificateFiles

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    for name in ("trellis", "kopf"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(args.log_level.upper())
        logger.propagate = False

    configuration = kubernetes.client.Configuration()
    try:
        if args.kubeconfig is not None:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(args.kubeconfig), client_configuration=configuration
            )
        else:
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
    except kubernetes.config.ConfigException as exc:
        raise CliError(f"cannot configure the Kubernetes client: {exc}") from exc
    api_client = kubernetes.client.ApiClient(configuration)
    config = OperatorConfig(
        trust_domain=args.trust_domain,
        namespace=args.namespace,
        identity=args.identity,
        outbound_traffic_policy=None
        if args.outbound_traffic_policy == "off"
        else args.outbound_traffic_policy,
    )
    webhook = None
    if not args.no_webhook:
        webhook = WebhookOptions(
            files=CertificateFiles(
                args.webhook_cert_dir / "tls.crt", args.webhook_cert_dir / "tls.key"
            ),
            host=args.webhook_host,
            port=args.webhook_port,
            injector=InjectorConfig(
                image=args.sidecar_image, agent_socket_host_dir=args.agent_socket_dir
            ),
        )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run(config, api_client, webhook, stop=stop)

    return asyncio.run(main())
