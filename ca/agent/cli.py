"""``trellis agent`` (the node agent) and ``trellis svid fetch`` (a Workload API client).

The agent takes its join token from ``--join-token-file`` or ``$TRELLIS_JOIN_TOKEN``. Both
stay out of ``ps``: a command line is world-readable in ``/proc/PID/cmdline`` for as long as
the process lives, while a process's environment is readable only by its owner and root
(``/proc/PID/environ`` is mode 0400). ``--join-token TOKEN`` still works, for a first try
at a terminal, but says on stderr that every local user can read it: a token is single
use, so whoever redeems it first gets the node's agent identity.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.agent.agent import DEFAULT_SOCKET, Agent, AgentConfig
from ca.agent.csi import DEFAULT_PODS_DIR, DRIVER_NAME, CsiConfig, start_csi_server
from ca.agent.grpc_upstream import GrpcUpstream
from ca.agent.rotator import AgentFatalError, RotatorConfig, load_agent_state
from ca.agent.upstream import InProcessUpstream, Upstream
from ca.agent.workload_api import WorkloadApiConfig
from ca.agent.workload_client import (
    ENDPOINT_ENV,
    WorkloadApiError,
    WorkloadClient,
    endpoint_address,
)
from ca.api import CaClient
from ca.bundle import BundleError, TrustBundle, load_pem_certificates
from ca.entries import EntryError, YamlFileEntrySource
from ca.keys import (
    KeyAlgorithm,
    KeyMaterialError,
    write_private_file,
    write_public_file,
)
from ca.spiffeid import TrustDomain
from ca.store import CaStore, StoreError, read_key_passphrase
from ca.x509svid import SvidError, X509Svid, load_der_chain, spiffe_id_of
from core.cliargs import seconds as _seconds
from core.cliargs import unix_socket as _socket
from core.endpoints import EndpointError, parse_unix_socket
from core.errors import CliError
from core.eventloop import install_uvloop, settle_heap
from core.listeners import ensure_bindable
from core.logs import add_logging_arguments, configure_logging

__all__ = ["register"]

DEFAULT_DATA_DIR = Path("/var/lib/trellis/agent")
JOIN_TOKEN_ENV = "TRELLIS_JOIN_TOKEN"  # noqa: S105 (a variable name, not a secret)


_KEY_TYPES = ", ".join(a.value for a in KeyAlgorithm)


def _workload_key_type(text: str) -> KeyAlgorithm | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return KeyAlgorithm.parse(text)
    except KeyMaterialError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0666") from exc
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode")
    return value


def _address(text: str) -> tuple[str, int] | None:
    if text in ("", "off", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} must be HOST:PORT (or 'off')")
    return host or "127.0.0.1", int(port)


def register(commands: Any) -> None:
    p = commands.add_parser(
        "agent",
        help="run the node agent (SPIFFE Workload API on a Unix socket)",
        description="Attest to the CA, cache and rotate this node's SVIDs, and serve the "
        "SPIFFE Workload API on a Unix socket.",
    )
    p.add_argument(
        "--socket",
        type=_socket,
        default=DEFAULT_SOCKET,
        metavar="PATH|unix:///PATH",
        help="serve the Workload API on this Unix socket",
    )
    p.add_argument("--socket-mode", type=_mode, default=0o666, help="socket file mode (octal)")
    p.add_argument("--ca", metavar="HOST:PORT", help="the CA server's mutual-TLS address")
    p.add_argument(
        "--ca-attest",
        metavar="HOST:PORT",
        help="the CA's attestation address (trellis ca serve --attest-listen; default: --ca)",
    )
    p.add_argument("--trust-bundle", type=Path, help="PEM roots or SPIFFE bundle to trust the CA")
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--join-token-file",
        type=Path,
        metavar="FILE",
        help=f"read the single-use join token from FILE (or set ${JOIN_TOKEN_ENV})",
    )
    token.add_argument(
        "--join-token",
        metavar="TOKEN",
        help="the join token itself: visible to every local user in ps while the agent"
        " runs; prefer --join-token-file",
    )
    p.add_argument(
        "--psat-token-file", type=Path, help="Kubernetes projected SA token (audience trellis-ca)"
    )
    p.add_argument("--node", help="this node's name (required with --local-ca)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="keeps the agent SVID (key 0600) so a restart needs no new join token",
    )
    p.add_argument(
        "--key-passphrase-file",
        type=Path,
        metavar="FILE",
        help="encrypt the agent key in --data-dir (and open --local-ca's encrypted cluster"
        " keys) with the passphrase in FILE (default: $TRELLIS_KEY_PASSPHRASE; neither:"
        " unencrypted, 0600)",
    )
    p.add_argument(
        "--admin", type=_address, default=("127.0.0.1", 8089), metavar="HOST:PORT|off",
        help="admin endpoint for /healthz and /metrics (default 127.0.0.1:8089)",
    )  # fmt: skip
    p.add_argument(
        "--workload-key-type", type=_workload_key_type, default=None, metavar="TYPE",
        help="key type of the workload SVIDs (auto: ML-DSA when the CA's intermediate is"
        f" ML-DSA, of its parameter set, else p256; or one of {_KEY_TYPES}) (default auto)",
    )  # fmt: skip
    p.add_argument("--kubernetes", action="store_true", help="attest pods via the API server")
    p.add_argument("--sync-interval", type=_seconds, default="5s", help="entry sync period")
    p.add_argument(
        "--backoff-cap", type=_seconds, default="30s", help="longest wait between CA retries"
    )
    p.add_argument(
        "--sync-wait", type=_seconds, default=5.0,
        help="how long a Workload API call made before the first sync with the CA waits for"
        " it before it is answered UNAVAILABLE (default 5s)",
    )  # fmt: skip
    p.add_argument(
        "--allow-unauthenticated-verifiers",
        action="store_true",
        help="answer ValidateJWTSVID and the bundle calls for callers no entry matches",
    )
    p.add_argument("--local-ca", type=Path, metavar="DIR", help="sign in-process from a CA dir")
    p.add_argument("--cluster", help="cluster intermediate to use with --local-ca")
    p.add_argument("--entries", type=Path, help="registration entries YAML for --local-ca")
    p.add_argument(
        "--csi-socket", type=Path, metavar="PATH",
        help=f"also serve the CSI node plugin {DRIVER_NAME} on PATH, which publishes the"
        " --socket directory into pods as a CSI ephemeral volume (no hostPath in the pod)",
    )  # fmt: skip
    p.add_argument(
        "--csi-pods-dir", type=Path, default=Path(DEFAULT_PODS_DIR), metavar="DIR",
        help=f"the kubelet's pods directory; the plugin mounts nowhere else"
        f" (default {DEFAULT_PODS_DIR})",
    )  # fmt: skip
    add_logging_arguments(p)
    p.set_defaults(handler=cmd_agent)

    csi = commands.add_parser(
        "agent-csi",
        help=f"serve only the CSI node plugin {DRIVER_NAME} (its own container on a node)",
        description="Publish the agent's Workload API socket directory into pods as a CSI "
        "ephemeral volume. Run apart from the agent, this process alone needs the mount "
        "privilege, and holds no identity.",
    )
    csi.add_argument(
        "--csi-socket",
        type=_socket,
        required=True,
        metavar="PATH",
        help="serve the CSI node plugin on this Unix socket (the kubelet's plugin directory)",
    )
    csi.add_argument(
        "--agent-socket-dir", type=Path, default=DEFAULT_SOCKET.parent, metavar="DIR",
        help=f"the directory of the agent's Workload API socket (default {DEFAULT_SOCKET.parent})",
    )  # fmt: skip
    csi.add_argument(
        "--csi-pods-dir",
        type=Path,
        default=Path(DEFAULT_PODS_DIR),
        metavar="DIR",
        help="the kubelet's pods directory; the plugin mounts nowhere else",
    )
    csi.add_argument("--node", help="this node's name (default: the host name)")
    add_logging_arguments(csi)
    csi.set_defaults(handler=cmd_agent_csi)

    svid = commands.add_parser("svid", help="inspect identities from the Workload API")
    sub = svid.add_subparsers(dest="svid_command", metavar="SVID_COMMAND", required=True)
    f = sub.add_parser("fetch", help="fetch this process's SVIDs (like spire-agent api fetch)")
    f.add_argument(
        "--socket",
        type=_socket,
        metavar="PATH|unix:///PATH",
        help="Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET)",
    )
    f.add_argument("--write", type=Path, metavar="DIR", help="write svid.pem, svid.key, bundle.pem")
    f.add_argument("--audience", action="append", default=[], help="also fetch a JWT-SVID")
    f.add_argument("--timeout", type=_seconds, default="10s", help="give up after this long")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(handler=cmd_svid_fetch)


# -- trellis agent --------------------------------------------------------------------------


def _read_bundle(path: Path) -> TrustBundle:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read trust bundle {path}: {exc.strerror}") from exc
    try:
        if data.lstrip().startswith(b"{"):
            probe = TrustBundle.from_json(TrustDomain("probe.invalid"), data)
            certs = probe.x509_authorities
            td = spiffe_id_of(certs[0]).trust_domain if certs else None
            if td is None:
                raise CliError(f"trust bundle {path} holds no X.509 authority")
            return TrustBundle.from_json(td, data)
        certs = tuple(load_pem_certificates(data, what=str(path)))
        return TrustBundle(spiffe_id_of(certs[0]).trust_domain, certs)
    except (BundleError, SvidError) as exc:
        raise CliError(f"trust bundle {path}: {exc}") from exc


def _local_upstream(args: argparse.Namespace) -> tuple[Upstream, TrustBundle]:
    if not args.cluster or not args.entries or not args.node:
        raise CliError("--local-ca needs --cluster, --entries and --node")
    try:
        store = CaStore(args.local_ca, key_passphrase=args.key_passphrase)
        intermediate = store.load_intermediate(args.cluster)
        bundle = store.load_bundle(intermediate.trust_domain)
        jwt = store.load_jwt_authority(args.cluster)
        entries = YamlFileEntrySource(args.entries, trust_domain=intermediate.trust_domain)
    except (StoreError, EntryError) as exc:
        raise CliError(str(exc)) from exc
    upstream = InProcessUpstream(intermediate, jwt, bundle, entries, node=args.node)
    return upstream, bundle


def _join_token(args: argparse.Namespace) -> str | None:
    """The join token from the file, the flag or the environment, in that order."""
    if args.join_token_file is not None:
        path: Path = args.join_token_file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read {args.join_token_file}: {exc.strerror}") from exc
        if not token:
            raise CliError(f"join token file {args.join_token_file} is empty")
        return token
    if args.join_token is not None:
        print(
            "trellis: warning: --join-token puts the token on this process's command line,"
            f" readable by every local user (ps); use --join-token-file or ${JOIN_TOKEN_ENV}",
            file=sys.stderr,
        )
        return str(args.join_token)
    # Dropped from the environment at once, so nothing this process starts inherits it.
    return os.environ.pop(JOIN_TOKEN_ENV, "").strip() or None


def _grpc_upstream(args: argparse.Namespace) -> tuple[Upstream, TrustBundle | None]:
    if args.trust_bundle is None:
        raise CliError("--ca needs --trust-bundle (the roots that authenticate the CA)")
    roots = _read_bundle(args.trust_bundle)
    token = _join_token(args)
    try:
        state = load_agent_state(args.data_dir, dt.datetime.now(dt.UTC), args.key_passphrase)
    except AgentFatalError as exc:
        raise CliError(str(exc)) from exc
    agent_svid, bundle = (state[0], state[1]) if state is not None else (None, None)
    if agent_svid is None and token is None and args.psat_token_file is None:
        raise CliError(
            f"no valid agent SVID in {args.data_dir}: give --join-token-file"
            f" (or ${JOIN_TOKEN_ENV}) or --psat-token-file"
        )
    address, attest_address = args.ca, args.ca_attest or args.ca
    trust_roots = bundle or roots

    def new_client(svid: X509Svid | None, roots: TrustBundle) -> CaClient:
        return CaClient(address, trust_roots=roots, attest_address=attest_address, agent_svid=svid)

    upstream = GrpcUpstream(
        new_client,
        trust_roots,
        agent_svid=agent_svid,
        join_token=token,
        psat_token_path=args.psat_token_file,
    )
    return upstream, bundle


async def _run_agent(agent: Agent, csi: tuple[CsiConfig, Path] | None = None) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)

    async def settle_once_started() -> None:
        await agent.started.wait()
        settle_heap()  # a full collection would stall every Workload API call (core.eventloop)

    settler = asyncio.create_task(settle_once_started())
    # The CSI plugin only publishes the socket directory; it starts before the agent's first
    # sync so the kubelet can mount pods' volumes while the agent is still attesting.
    csi_server = await start_csi_server(*csi) if csi is not None else None
    try:
        await agent.run()
    except asyncio.CancelledError:
        logging.getLogger("trellis.agent").info("shutting down")
    finally:
        settler.cancel()
        if csi_server is not None:
            await csi_server.stop(None)


def cmd_agent(args: argparse.Namespace) -> int:
    configure_logging(args)
    if args.kubernetes:
        if not args.node:
            raise CliError("--kubernetes needs --node (the pod watch is scoped to this node)")
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise CliError("--kubernetes: not in a pod (KUBERNETES_SERVICE_HOST is unset)")
    try:
        args.key_passphrase = read_key_passphrase(args.key_passphrase_file)
    except StoreError as exc:
        raise CliError(str(exc)) from exc
    upstream: Upstream
    bundle: TrustBundle | None
    if args.local_ca is not None:
        upstream, bundle = _local_upstream(args)
    elif args.ca:
        upstream, bundle = _grpc_upstream(args)
    else:
        raise CliError("give --ca HOST:PORT (or --local-ca DIR for development)")
    admin = args.admin
    if admin is not None:
        ensure_bindable("--admin", *admin)
    config = AgentConfig(
        socket_path=args.socket,
        socket_mode=args.socket_mode,
        node=args.node,
        admin_host=admin[0] if admin else "127.0.0.1",
        admin_port=admin[1] if admin else None,
        kubernetes=args.kubernetes,
        rotator=RotatorConfig(
            sync_interval=args.sync_interval,
            data_dir=args.data_dir,
            backoff_cap=args.backoff_cap,
            key_passphrase=args.key_passphrase,
            key_algorithm=args.workload_key_type,
        ),
        workload_api=WorkloadApiConfig(
            allow_unauthenticated_verifiers=args.allow_unauthenticated_verifiers,
            sync_wait=args.sync_wait,
        ),
    )
    csi = None
    if args.csi_socket is not None:
        csi_config = CsiConfig(
            source_dir=args.socket.parent,
            node_id=args.node or socket.gethostname(),
            pods_dir=args.csi_pods_dir,
        )
        csi = (csi_config, args.csi_socket)
    try:
        agent = Agent(config, upstream, initial_bundle=bundle)
        install_uvloop()
        asyncio.run(_run_agent(agent, csi))
    except AgentFatalError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot start the agent: {exc.strerror or exc}") from exc
    return 0


async def _serve_csi(config: CsiConfig, socket_path: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await start_csi_server(config, socket_path)
    logging.getLogger("trellis.agent.csi").info("serving %s on %s", DRIVER_NAME, socket_path)
    try:
        await stop.wait()
    finally:
        await server.stop(None)


def cmd_agent_csi(args: argparse.Namespace) -> int:
    configure_logging(args)
    config = CsiConfig(
        source_dir=args.agent_socket_dir,
        node_id=args.node or socket.gethostname(),
        pods_dir=args.csi_pods_dir,
    )
    try:
        asyncio.run(_serve_csi(config, args.csi_socket))
    except OSError as exc:
        raise CliError(f"cannot serve the CSI plugin: {exc.strerror or exc}") from exc
    return 0


# -- trellis svid fetch --------------------------------------------------------------------


def _pem_chain(der_concatenated: bytes) -> tuple[list[x509.Certificate], bytes]:
    certs = load_der_chain(der_concatenated)
    return certs, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(pkcs8_der: bytes) -> bytes:
    key = serialization.load_der_private_key(pkcs8_der, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cmd_svid_fetch(args: argparse.Namespace) -> int:
    socket_path = args.socket
    if socket_path is None and (env := os.environ.get(ENDPOINT_ENV)):
        try:  # the flag's rules for the variable too: unix:///PATH or a path, never tcp://
            socket_path = parse_unix_socket(env)
        except EndpointError as exc:
            raise CliError(f"${ENDPOINT_ENV}: {exc}") from exc
    target = endpoint_address(socket_path)
    report: dict[str, Any] = {"svids": [], "jwt_svids": []}
    try:
        with WorkloadClient(target, timeout=args.timeout) as client:
            response = client.fetch_x509_svid()
            jwt = client.fetch_jwt_svid(args.audience) if args.audience else None
    except WorkloadApiError as exc:
        raise CliError(f"Workload API at {target}: {exc}") from exc
    files: dict[str, tuple[bytes, bool]] = {}
    now = dt.datetime.now(dt.UTC)
    for index, svid in enumerate(response.svids):
        try:
            chain, chain_pem = _pem_chain(svid.x509_svid)
            roots, roots_pem = _pem_chain(svid.bundle)
            key_pem = _key_pem(svid.x509_svid_key)
        except ValueError as exc:
            raise CliError(f"agent sent an unreadable SVID: {exc}") from exc
        leaf = chain[0]
        report["svids"].append(
            {
                "spiffe_id": svid.spiffe_id,
                "hint": svid.hint or None,
                "serial": f"{leaf.serial_number:x}",
                "not_before": leaf.not_valid_before_utc.isoformat(),
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "seconds_left": int((leaf.not_valid_after_utc - now).total_seconds()),
                "intermediates": len(chain) - 1,
                "bundle_roots": len(roots),
            }
        )
        suffix = "" if index == 0 else f".{index}"
        files[f"svid{suffix}.pem"] = (chain_pem, False)
        files[f"svid{suffix}.key"] = (key_pem, True)
        files[f"bundle{suffix}.pem"] = (roots_pem, False)
    for td, der in sorted(response.federated_bundles.items()):
        name = td.removeprefix("spiffe://")
        files[f"federated-{name}.pem"] = (_pem_chain(der)[1], False)
    if jwt is not None:
        report["jwt_svids"] = [{"spiffe_id": s.spiffe_id, "token": s.svid} for s in jwt.svids]
    if args.write is not None:
        try:
            args.write.mkdir(parents=True, exist_ok=True)
            for name, (data, secret) in files.items():
                (write_private_file if secret else write_public_file)(args.write / name, data)
        except OSError as exc:
            raise CliError(f"cannot write to {args.write}: {exc.strerror}") from exc
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Received {len(report['svids'])} svid(s) from {target}")
    for entry in report["svids"]:
        print()
        print(f"SPIFFE ID:       {entry['spiffe_id']}")
        if entry["hint"]:
            print(f"Hint:            {entry['hint']}")
        print(f"SVID valid after:  {entry['not_before']}")
        print(f"SVID valid until:  {entry['not_after']} ({entry['seconds_left']}s left)")
        print(f"Intermediates:   {entry['intermediates']}")
        print(f"Bundle roots:    {entry['bundle_roots']}")
    for token in report["jwt_svids"]:
        print()
        print(f"JWT-SVID for {token['spiffe_id']}:")
        print(token["token"])
    if args.write is not None:
        print()
        for name in files:
            print(f"Writing {args.write / name}")
    sys.stdout.flush()
    return 0
