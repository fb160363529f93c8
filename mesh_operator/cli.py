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
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import urllib3
import yaml

from ca.spiffeid import SpiffeIdError, TrustDomain
from core.errors import CliError, yaml_problem
from core.listeners import ensure_bindable
from core.logs import add_logging_arguments, configure_logging
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
    p.add_argument(
        "--trust-domain", required=True, type=_trust_domain, help="the mesh's trust domain"
    )
    p.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "trellis-system"),
        help="where the Lease and the webhook Secret live ($POD_NAMESPACE)",
    )
    p.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME", socket.gethostname()),
        help="this replica's name in the Lease ($POD_NAME, else the host name)",
    )
    p.add_argument("--kubeconfig", type=Path, help="default: in-cluster configuration")
    p.add_argument(
        "--webhook-host", default="0.0.0.0", help="address to serve the webhook on (all: 0.0.0.0)"
    )
    p.add_argument("--webhook-port", type=int, default=9443, help="port to serve the webhook on")
    p.add_argument(
        "--webhook-cert-dir",
        type=Path,
        default=Path("/etc/trellis/webhook"),
        help="tls.crt and tls.key of the webhook (the leader writes them)",
    )
    p.add_argument("--no-webhook", action="store_true", help="reconcile only")
    _add_injection_arguments(p)
    p.add_argument(
        "--outbound-traffic-policy",
        choices=("ALLOW_ANY", "REGISTRY_ONLY", "off"),
        default="ALLOW_ANY",
        help="what sidecars do with destinations outside the mesh: pass them through "
        "(ALLOW_ANY, the default) or refuse them (REGISTRY_ONLY); off publishes no mesh "
        "registry, so every destination is taken to be in the mesh",
    )
    add_logging_arguments(p)
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("inject", help="print a Pod as the webhook would inject it")
    p.add_argument("file", type=Path, help="a Pod manifest (JSON or YAML); - for stdin")
    p.add_argument(
        "-o",
        "--output",
        choices=("json", "yaml"),
        help="output format (default: the input's, so a YAML manifest stays YAML)",
    )
    _add_injection_arguments(p)
    p.set_defaults(handler=cmd_inject)


def _add_injection_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = InjectorConfig()
    parser.add_argument("--sidecar-image", default=defaults.image, help="the sidecar's image")
    parser.add_argument(
        "--agent-socket-volume",
        choices=("csi", "hostpath"),
        default="csi",
        help="how injected pods mount the agent's Workload API socket: the csi.trellis.dev"
        " ephemeral volume (needs the agent's CSI node plugin), or a hostPath of"
        " --agent-socket-dir for clusters without it (refused where Pod Security is baseline)",
    )
    parser.add_argument(
        "--agent-socket-dir",
        default=defaults.agent_socket_host_dir,
        help="the node directory of the agent's socket (for --agent-socket-volume hostpath)",
    )


def _injector(args: argparse.Namespace) -> InjectorConfig:
    return InjectorConfig(
        image=args.sidecar_image,
        agent_socket_host_dir=args.agent_socket_dir,
        agent_socket_csi_driver=None
        if args.agent_socket_volume == "hostpath"
        else InjectorConfig().agent_socket_csi_driver,
    )


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
        decision = plan_injection(pod, _injector(args))
    except (UpstreamError, AnnotationError) as exc:
        raise CliError(str(exc)) from exc
    injected = jsonpatch.apply_patch(pod, list(decision.patch))
    # The input's own format unless -o says otherwise: `kubectl apply -f` and reviewers of
    # a YAML manifest expect YAML back (JSON is valid YAML, but not what they wrote).
    output = args.output or ("json" if text.lstrip().startswith("{") else "yaml")
    if output == "json":
        print(json.dumps(injected, indent=2))
    else:
        print(yaml.safe_dump(injected, sort_keys=False), end="")
    print(f"trellis operator inject: {decision.reason}", file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import kubernetes

    from mesh_operator.handlers import OperatorConfig
    from mesh_operator.replica import WebhookOptions, run
    from mesh_operator.webhook import CertificateFiles

    configure_logging(args)

    if not args.no_webhook:
        ensure_bindable("--webhook-port", args.webhook_host, args.webhook_port)
    configuration = kubernetes.client.Configuration()
    if args.kubeconfig is not None and not os.access(args.kubeconfig, os.R_OK):
        raise CliError(f"cannot read --kubeconfig {args.kubeconfig}")
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
    except yaml.YAMLError as exc:
        raise CliError(f"--kubeconfig {args.kubeconfig}: {yaml_problem(exc)}") from exc
    except (TypeError, AttributeError, KeyError) as exc:
        # The loader indexes the document as it finds it: a list or a string where a
        # mapping belongs fails here, not as a ConfigException.
        raise CliError(f"--kubeconfig {args.kubeconfig}: not a kubeconfig ({exc!r})") from exc
    api_client = kubernetes.client.ApiClient(configuration)
    _check_api_server(api_client, configuration.host)
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
            injector=_injector(args),
        )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run(config, api_client, webhook, stop=stop)

    try:
        return asyncio.run(main())
    except (urllib3.exceptions.HTTPError, kubernetes.client.ApiException) as exc:
        raise CliError(f"Kubernetes API server {configuration.host}: {_reason(exc)}") from exc
    except OSError as exc:  # the webhook's port in use, its certificate unreadable
        raise CliError(f"cannot run the operator: {exc.strerror or exc}") from exc


def _reason(exc: Exception) -> str:
    """urllib3 nests the socket error several levels down; the innermost is the reason."""
    while isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return str(exc).rpartition(": ")[2] or str(exc)  # "[Errno 111] Connection refused"
    status = getattr(exc, "status", None)
    return f"HTTP {status} {getattr(exc, 'reason', '')}".strip() if status else str(exc)


def _check_api_server(api_client: Any, host: str) -> None:
    """One GET /version before anything starts: an unreachable or refusing API server is
    one line and exit 1 here, where the Lease loop would only retry (and kopf print a
    traceback per watch)."""
    import logging

    import kubernetes

    quiet = logging.getLogger("urllib3.connectionpool")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its retry warnings would be three more lines
    try:
        kubernetes.client.VersionApi(api_client).get_code(_request_timeout=10)
    except (urllib3.exceptions.HTTPError, kubernetes.client.ApiException) as exc:
        raise CliError(f"cannot reach the Kubernetes API server {host}: {_reason(exc)}") from exc
    finally:
        quiet.setLevel(level)
