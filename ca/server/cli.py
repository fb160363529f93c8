"""``trellis ca serve``, ``trellis ca token create`` and ``trellis ca ban``/``unban``.

``serve`` prints one JSON line per event on stdout: ``{"event": "ready", "listen": ...,
"attest_listen": ..., "bundle_listen": ..., "metrics_listen": ...}`` once every listener is
bound (ports may be 0: the line says which were chosen), and, only with
``--print-join-tokens``, one ``{"event": "join-token", "node": ..., "token": ...}`` per
``--join-token NODE``. Logs are JSON lines on stderr and never carry tokens or key material.

Join tokens, two ways:

* ``trellis ca token create --dir DIR --cluster NAME --node NODE [--ttl 1h] [--out FILE]``
  prints a token (its output, the one thing it was asked for) or writes it to FILE (0600),
  and stores only its SHA-256 under ``DIR/clusters/NAME/join-tokens/``; a running server
  picks it up on first use, no restart needed.
* ``trellis ca serve ... --join-token NODE --print-join-tokens`` mints one at start-up
  (``--join-token-ttl``) and prints it. A server's stdout usually ends up in a log that
  outlives the token's use (journald, ``kubectl logs``, a CI transcript), so ``serve``
  prints a token only when ``--print-join-tokens`` says so, and refuses ``--join-token``
  without it rather than mint tokens nobody can read.

The cluster's intermediate and JWT keys are opened with ``--key-passphrase-file`` or
``$TRELLIS_KEY_PASSPHRASE`` when they were written encrypted (``trellis ca intermediate``
with the same passphrase); unencrypted keys, as mounted from a Kubernetes Secret, need none.

Banning a node: ``trellis ca ban NODE --file FILE`` (``unban`` to lift it) edits the YAML
list that ``serve --banned-agents FILE`` re-reads within ``--poll-interval``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from ca.cli import add_key_passphrase_argument
from ca.cliargs import key_algorithm as _workload_key_type
from ca.entries import EntryError
from ca.keys import KeyAlgorithm
from core.cliargs import duration as _duration
from core.errors import CliError
from core.eventloop import install_uvloop
from core.listeners import ensure_bindable
from core.logs import add_logging_arguments, configure_logging

__all__ = ["register"]


def _seconds(text: str) -> float:
    return _duration(text).total_seconds()


def _stek_rotation(text: str) -> dt.timedelta:
    value = _duration(text)
    if value < dt.timedelta(seconds=1):
        raise argparse.ArgumentTypeError(f"{text!r} is shorter than one second")
    return value


def _batch_limit(text: str) -> int:
    # Agents learn this limit from the CA (a uint32 on the wire) and split their batches
    # to fit; 0 would refuse every batch.
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CSRs from 1 to 100000")
    return int(text)


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def _sign_workers(text: str) -> str | int:
    from ca.server.signer import MAX_SIGN_WORKERS

    if text == "auto":
        return text
    if not text.isdigit() or int(text) > MAX_SIGN_WORKERS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'auto' or a number of worker processes from 0 to {MAX_SIGN_WORKERS}"
        )
    return int(text)


def _optional_address(text: str) -> str | None:
    return None if text in ("", "off", "none") else _address(text)


def register(ca_commands: Any) -> None:
    """Add ``serve`` and ``token`` to the ``trellis ca`` subcommands."""
    p = ca_commands.add_parser("serve", help="run the cluster CA server (gRPC over mTLS)")
    p.add_argument("--dir", required=True, type=Path, help="the CA directory (trellis ca init)")
    p.add_argument("--cluster", required=True, help="the cluster whose intermediate signs")
    p.add_argument("--listen", type=_address, default="127.0.0.1:8081", help="mTLS gRPC")
    p.add_argument(
        "--attest-listen",
        type=_address,
        default="127.0.0.1:8082",
        help="server-auth TLS gRPC for AttestAgent (agents without an SVID yet)",
    )
    p.add_argument(
        "--bundle-listen",
        type=_optional_address,
        default="127.0.0.1:8443",
        help="HTTPS bundle endpoint other trust domains federate with (https_spiffe: "
        "served with this CA's own SVID, spiffe://<td>/trellis/ca/<cluster>); off disables",
    )
    p.add_argument(
        "--metrics-listen",
        type=_optional_address,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off)",
    )
    p.add_argument(
        "--admin-socket",
        type=Path,
        metavar="PATH",
        help="serve the read-only admin API (status, entries, agents) on this Unix socket,"
        " mode 0600, for trellis ca entries list / agents list and trellis check (default: off)",
    )
    p.add_argument("--entries", type=Path, help="registration entries (YAML), reloaded on change")
    p.add_argument(
        "--federation",
        type=Path,
        metavar="FILE",
        help="federated trust domains (YAML or JSON, reloaded on change): "
        "{trustDomains: [{trustDomain, bundleEndpointURL, bundleEndpointSPIFFEID, "
        "bootstrapBundle}]}; each foreign bundle is fetched over HTTPS from its endpoint, "
        "authenticated as an SVID of bundleEndpointSPIFFEID (https_spiffe) against "
        "bootstrapBundle (a SPIFFE bundle or PEM roots, inline or a file path) or the "
        "latest bundle fetched, and sent to agents for entries that federate with it",
    )
    p.add_argument(
        "--join-token",
        action="append",
        default=[],
        metavar="NODE",
        help="mint a join token for NODE at start-up (repeatable; needs --print-join-tokens)",
    )
    p.add_argument(
        "--print-join-tokens",
        action="store_true",
        help="print the --join-token tokens on stdout (and so into whatever keeps it: "
        "prefer trellis ca token create --out FILE)",
    )
    p.add_argument(
        "--join-token-ttl",
        type=_duration,
        default=dt.timedelta(hours=1),
        help="lifetime of the --join-token tokens",
    )
    p.add_argument(
        "--agent-ttl", type=_duration, default=dt.timedelta(hours=1), help="agent SVID lifetime"
    )
    p.add_argument("--agent-rate", type=float, default=200.0, help="SVIDs/s per agent")
    p.add_argument("--agent-burst", type=float, default=2000.0, help="SVIDs an agent may burst")
    p.add_argument(
        "--max-request-bytes", type=int, default=1024 * 1024, help="largest gRPC request"
    )
    p.add_argument(
        "--max-batch",
        type=_batch_limit,
        default=1000,
        help="most CSRs in one BatchNewX509SVID call; agents are told and split to fit",
    )
    p.add_argument(
        "--workload-key-type",
        type=_workload_key_type,
        default=None,
        metavar="TYPE",
        help="key type agents make workload keys of, told with their entries (one of"
        f" {', '.join(a.value for a in KeyAlgorithm)}; default: each agent's own choice,"
        " which follows an ML-DSA intermediate's parameter set)",
    )
    p.add_argument(
        "--k8s-psat",
        action="store_true",
        help="attest Kubernetes nodes by projected service-account tokens (TokenReview)",
    )
    p.add_argument("--kubeconfig", type=Path, help="default: in-cluster configuration")
    p.add_argument(
        "--psat-allow",
        action="append",
        default=[],
        metavar="NAMESPACE:SA",
        help="service account allowed to attest nodes (default trellis-system:trellis-agent)",
    )
    p.add_argument(
        "--sign-workers",
        type=_sign_workers,
        default="auto",
        metavar="auto|N",
        help="check and sign CSRs in N worker processes; 0 signs on the event loop; auto "
        "(the default) is one per usable core (CPU affinity, cgroup CPU quota) when there "
        "are several, else 0",
    )
    p.add_argument(
        "--banned-agents",
        type=Path,
        metavar="FILE",
        help="YAML list of banned node names, re-read on change (trellis ca ban/unban)",
    )
    p.add_argument(
        "--stek-rotation",
        type=_stek_rotation,
        default="1h",
        help="how long each service identity's session-ticket encryption key seals tickets "
        "(the next one is sent to agents this long ahead; 24 old ones still open tickets)",
    )
    p.add_argument(
        "--poll-interval",
        type=_seconds,
        default="1s",
        help="how often --entries, --federation and --banned-agents are checked for changes",
    )
    add_logging_arguments(p)
    add_key_passphrase_argument(p)
    p.set_defaults(handler=cmd_serve)

    token = ca_commands.add_parser("token", help="join tokens for node attestation")
    token_sub = token.add_subparsers(dest="token_command", metavar="TOKEN_COMMAND", required=True)
    p = token_sub.add_parser("create", help="create a single-use join token for a node")
    p.add_argument("--dir", required=True, type=Path, help="the CA directory")
    p.add_argument("--cluster", required=True, help="the cluster the node joins")
    p.add_argument("--node", required=True, help="the node name the token attests")
    p.add_argument(
        "--ttl", type=_duration, default=dt.timedelta(hours=1), help="how long the token is valid"
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the token to FILE (mode 0600) for trellis agent --join-token-file, "
        "instead of printing it",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_token_create)

    for name, verb in (("ban", "cut off"), ("unban", "restore")):
        p = ca_commands.add_parser(
            name, help=f"{verb} a node's agent (edits the ca serve --banned-agents file)"
        )
        p.add_argument("node", help="the node name, as in its agent ID")
        p.add_argument("--file", required=True, type=Path, help="the --banned-agents file")
        p.set_defaults(handler=cmd_ban, ban=name == "ban")


def cmd_token_create(args: argparse.Namespace) -> int:
    from ca.keys import write_private_file
    from ca.server.attestation import AttestationError, hash_join_token
    from ca.server.tokens import JoinTokenStore
    from ca.store import CaStore, StoreError

    store = CaStore(args.dir)
    try:
        store.intermediate_certificate(args.cluster)  # the cluster must exist; no key needed
        if args.out is not None and args.out.is_dir():
            raise CliError(f"--out {args.out} is a directory; give a file name")
        token, expires_at = JoinTokenStore(store.cluster_dir(args.cluster)).create(
            args.node, ttl=args.ttl.total_seconds()
        )
    except (StoreError, AttestationError) as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot write the token: {exc.strerror}") from exc
    doc: dict[str, Any] = {"node": args.node, "expires_at": int(expires_at)}
    if args.out is None:
        # The command's own output, the one place a token is asked for.
        doc["token"] = token
    else:
        try:
            write_private_file(args.out, f"{token}\n".encode())
        except OSError as exc:
            JoinTokenStore(store.cluster_dir(args.cluster)).remove(hash_join_token(token))
            raise CliError(f"cannot write the token to {args.out}: {exc.strerror}") from exc
        doc["file"] = str(args.out)
    if args.json:
        print(json.dumps(doc))
    elif args.out is None:
        print(token)
    else:
        print(f"join token for node {args.node} written to {args.out} (0600)")
    return 0


def cmd_ban(args: argparse.Namespace) -> int:
    """Add or remove one node; a missing file is an empty list (``ban`` creates it)."""
    from ca.server.attestation import is_node_name
    from ca.server.bans import BanListError, load_ban_list, write_ban_list

    if not is_node_name(args.node):
        raise CliError(f"{args.node!r} is not a usable node name")
    try:
        nodes = load_ban_list(args.file) if args.file.exists() else frozenset()
        updated = nodes | {args.node} if args.ban else nodes - {args.node}
        if updated != nodes:
            write_ban_list(args.file, updated)
    except BanListError as exc:
        raise CliError(f"{exc} (fix or remove the file first)") from exc
    except OSError as exc:
        raise CliError(f"cannot write {args.file}: {exc.strerror}") from exc
    state = "banned" if args.ban else "not banned"
    already = "" if updated != nodes else " (unchanged)"
    print(f"{args.node}: {state}{already}; {len(updated)} node(s) in {args.file}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ca.server.app import CaServer, ServerConfig
    from ca.server.bans import BanListError
    from ca.server.federation import FederationConfigError
    from ca.server.service import ServiceConfig, TokenReviewer
    from ca.server.signer import auto_sign_workers
    from ca.store import StoreError, read_key_passphrase

    if args.join_token and not args.print_join_tokens:
        raise CliError(
            "--join-token mints tokens that only --print-join-tokens shows (on stdout, and"
            " in any log that keeps it); add it, or use trellis ca token create --out FILE"
        )
    for flag in ("--listen", "--attest-listen", "--bundle-listen", "--metrics-listen"):
        address = getattr(args, flag[2:].replace("-", "_"))
        if address is not None:
            host, _, port = address.rpartition(":")
            ensure_bindable(flag, host.strip("[]"), int(port))
    try:
        key_passphrase = read_key_passphrase(args.key_passphrase_file)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    configure_logging(args)

    reviewer: TokenReviewer | None = None
    if args.k8s_psat:
        from ca.server.k8s import KubernetesTokenReviewer

        try:
            reviewer = KubernetesTokenReviewer.from_kubeconfig(args.kubeconfig)
        except Exception as exc:  # kubernetes.config raises ConfigException and others
            raise CliError(f"cannot configure the Kubernetes client: {exc}") from exc
    service = ServiceConfig(
        agent_svid_ttl=args.agent_ttl,
        max_request_bytes=args.max_request_bytes,
        max_batch=args.max_batch,
        agent_rate=args.agent_rate,
        agent_burst=args.agent_burst,
        workload_key_type=args.workload_key_type.value if args.workload_key_type else "",
        psat_allowed_service_accounts=tuple(args.psat_allow)
        or ServiceConfig().psat_allowed_service_accounts,
    )
    config = ServerConfig(
        ca_dir=args.dir,
        cluster=args.cluster,
        listen=args.listen,
        attest_listen=args.attest_listen,
        bundle_listen=args.bundle_listen,
        metrics_listen=args.metrics_listen,
        admin_socket=args.admin_socket,
        entries_path=args.entries,
        federation_path=args.federation,
        banned_agents_path=args.banned_agents,
        join_token_nodes=tuple(args.join_token),
        join_token_ttl=args.join_token_ttl,
        service=service,
        poll_interval=args.poll_interval,
        token_reviewer=reviewer,
        sign_workers=auto_sign_workers() if args.sign_workers == "auto" else args.sign_workers,
        key_passphrase=key_passphrase,
        stek_rotation=args.stek_rotation,
    )

    def ready(addresses: dict[str, str], tokens: dict[str, str]) -> None:
        print(json.dumps({"event": "ready", **addresses}), flush=True)
        expires = int(time.time() + args.join_token_ttl.total_seconds())
        for node, token in tokens.items():
            line = {"event": "join-token", "node": node, "token": token, "expires_at": expires}
            print(json.dumps(line), flush=True)

    async def main() -> None:
        server = CaServer(config)
        await server.run(ready=ready)

    try:
        install_uvloop()
        asyncio.run(main())
    except FederationConfigError as exc:
        raise CliError(f"--federation {args.federation}: {exc}") from exc
    except BanListError as exc:
        raise CliError(f"--banned-agents {exc}") from exc
    except (StoreError, EntryError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot start the CA server: {exc}") from exc
    return 0
