"""``trellis ca root prepare|activate|retire`` and ``trellis ca intermediate rotate``.

The procedure and its safety rules are in ``ca.rotation``; this module is the command
line: each refusal is one line naming what is in the way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from pathlib import Path
from typing import Any

from cryptography import x509

from ca.authority import (
    DEFAULT_INTERMEDIATE_TTL,
    DEFAULT_ROOT_TTL,
    IntermediateAuthority,
    IssuanceError,
    RootAuthority,
)
from ca.bundle import BundleError
from ca.cliargs import key_algorithm as _key_algorithm
from ca.keys import KeyAlgorithm, KeyMaterialError, key_algorithm_of
from ca.rotation import LedgerError, blocker_for_retire, issued_by
from ca.spiffeid import SpiffeIdError
from ca.store import CaStore, StoreError, read_key_passphrase, read_passphrase, utcnow
from ca.x509svid import SvidError
from core.cliargs import duration as _duration
from core.durations import format_duration
from core.errors import CliError

__all__ = ["register"]

_REFUSALS = (
    IssuanceError,
    KeyMaterialError,
    SpiffeIdError,
    StoreError,
    BundleError,
    SvidError,
    LedgerError,
)

_DIR_HELP = "the CA directory (trellis ca init)"
_ROOT_FILE_HELP = "read the root key's passphrase from FILE (default: $TRELLIS_ROOT_PASSPHRASE)"
_CLUSTER_KEYS_FILE_HELP = (
    "the passphrase of the clusters' intermediate and JWT keys, in FILE (default:"
    " $TRELLIS_KEY_PASSPHRASE; must be the one they were written with)"
)


def register(ca_commands: Any) -> None:
    """Add ``root`` to the ``trellis ca`` subcommands and ``rotate`` to ``intermediate``."""
    root = ca_commands.add_parser(
        "root", help="rotate the trust domain's root: prepare, activate, retire"
    )
    sub = root.add_subparsers(dest="root_command", metavar="ROOT_COMMAND", required=True)

    p = sub.add_parser(
        "prepare", help="create the next root and publish it in the bundle beside the current one"
    )
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument(
        "--key-type",
        type=_key_algorithm,
        default=KeyAlgorithm.P384,
        help="p256, p384 or ed25519",
    )
    p.add_argument("--ttl", type=_duration, default=DEFAULT_ROOT_TTL, help="root lifetime")
    p.add_argument("--passphrase-file", type=Path, metavar="FILE", help=_ROOT_FILE_HELP)
    p.set_defaults(handler=cmd_root_prepare)

    p = sub.add_parser(
        "activate",
        help="make the prepared root the root and re-issue every cluster's intermediate under it",
    )
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument(
        "--intermediate-ttl",
        type=_duration,
        default=DEFAULT_INTERMEDIATE_TTL,
        help="lifetime of the re-issued intermediates",
    )
    p.add_argument("--passphrase-file", type=Path, metavar="FILE", help=_ROOT_FILE_HELP)
    p.add_argument("--key-passphrase-file", type=Path, metavar="FILE", help=_CLUSTER_KEYS_FILE_HELP)
    p.set_defaults(handler=cmd_root_activate)

    p = sub.add_parser(
        "retire", help="remove the previous root from the bundle once nothing it anchors is valid"
    )
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument("--passphrase-file", type=Path, metavar="FILE", help=_ROOT_FILE_HELP)
    p.add_argument(
        "--force",
        action="store_true",
        help="retire even though SVIDs it anchors are still valid (a compromised root):"
        " they stop verifying as soon as the bundle reaches their peers",
    )
    p.set_defaults(handler=cmd_root_retire)

    # ``trellis ca intermediate`` (ca.cli) signs a cluster's intermediate; ``rotate`` is an
    # optional positional word on that same parser, so both share its flags.
    intermediate = ca_commands.choices["intermediate"]
    intermediate.add_argument(
        "action",
        nargs="?",
        choices=("rotate",),
        help="rotate: replace an existing cluster's intermediate (signed by the active root,"
        " same JWT key); ca serve picks it up without a restart",
    )
    issue_first = intermediate.get_default("handler")

    def dispatch(args: argparse.Namespace) -> int:
        handler = cmd_intermediate_rotate if args.action == "rotate" else issue_first
        return int(handler(args))

    intermediate.set_defaults(handler=dispatch)


def _root_store(directory: Path) -> CaStore:
    store = CaStore(directory)
    store.root_certificate()  # a missing directory is reported before a missing passphrase
    return store


def _when(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _serial(cert: x509.Certificate) -> str:
    return f"{cert.serial_number:x}"


def cmd_root_prepare(args: argparse.Namespace) -> int:
    try:
        store = _root_store(args.dir)
        pending = store.prepared_root_certificate()
        if pending is not None:
            raise CliError(
                f"a prepared root (serial {_serial(pending)}) is already pending in {args.dir};"
                " activate it (trellis ca root activate) before preparing another"
            )
        previous = store.previous_root_certificate()
        if previous is not None:
            raise CliError(
                f"the previous root (serial {_serial(previous)}) is still in the bundle;"
                " retire it (trellis ca root retire) before preparing another"
            )
        passphrase = read_passphrase(args.passphrase_file)
        current = store.load_root(passphrase)  # proves the passphrase before anything is made
        prepared = RootAuthority.create(
            current.trust_domain, now=utcnow(), key_algorithm=args.key_type, ttl=args.ttl
        )
        store.save_prepared_root(prepared, passphrase)
        sequence = store.load_bundle(current.trust_domain).sequence
    except _REFUSALS as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot write to {args.dir}: {exc.strerror}") from exc
    print(
        f"root {_serial(prepared.certificate)} prepared in {store.next_root_cert_path} (key"
        f" encrypted, 0600) and published in the bundle (sequence {sequence}); activate it"
        " once every agent and workload has that bundle"
    )
    return 0


def _reissue(store: CaStore, root: RootAuthority, ttl: dt.timedelta) -> list[IntermediateAuthority]:
    """New intermediates for every cluster, in memory: nothing is written unless all can be."""
    clusters = store.clusters()
    if not clusters:
        raise CliError(f"{store.root_dir} has no cluster intermediate to re-issue")
    issued = []
    for cluster in clusters:
        # Opening the current key proves the key passphrase: the new key is written with it,
        # and ca serve opens both with one passphrase.
        store.load_intermediate(cluster)
        key_type = _key_type_of(store.intermediate_certificate(cluster))
        issued.append(
            root.issue_intermediate(cluster, now=utcnow(), ttl=ttl, key_algorithm=key_type)
        )
    return issued


def _key_type_of(cert: x509.Certificate) -> KeyAlgorithm:
    # A rotated intermediate keeps its predecessor's key type, ML-DSA included.
    try:
        return key_algorithm_of(cert.public_key())
    except KeyMaterialError:
        return KeyAlgorithm.P256


def cmd_root_activate(args: argparse.Namespace) -> int:
    try:
        _root_store(args.dir)
        store = CaStore(args.dir, key_passphrase=read_key_passphrase(args.key_passphrase_file))
        pending = store.prepared_root_certificate()
        if pending is None:
            raise CliError(
                f"no prepared root in {args.dir}: run trellis ca root prepare, and wait for the"
                " bundle to reach every workload, first"
            )
        previous = store.previous_root_certificate()
        if previous is not None:
            raise CliError(
                f"the previous root (serial {_serial(previous)}) is still in the bundle;"
                " retire it (trellis ca root retire) first"
            )
        passphrase = read_passphrase(args.passphrase_file)
        store.load_root(passphrase)  # the passphrase opens the root in force ...
        prepared = store.load_prepared_root(passphrase)  # ... and the one that replaces it
        bundle = store.load_bundle(prepared.trust_domain)
        if prepared.certificate not in bundle.x509_authorities:
            raise CliError(
                f"the prepared root (serial {_serial(pending)}) is not in {store.bundle_path};"
                " workloads would not trust what it signs"
            )
        intermediates = _reissue(store, prepared, args.intermediate_ttl)
        store.promote_prepared_root(prepared, passphrase)
        for intermediate in intermediates:
            store.replace_intermediate(intermediate)
    except _REFUSALS as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot write to {args.dir}: {exc.strerror}") from exc
    names = ", ".join(i.cluster for i in intermediates)
    print(
        f"root {_serial(prepared.certificate)} active; intermediates re-issued under it for"
        f" {names}; retire the previous root once the SVIDs it anchors have expired"
    )
    return 0


def cmd_root_retire(args: argparse.Namespace) -> int:
    try:
        store = _root_store(args.dir)
        previous = store.previous_root_certificate()
        if previous is None:
            raise CliError(f"no previous root in {args.dir} to retire (activate one first)")
        current = store.load_root(read_passphrase(args.passphrase_file))
        now = utcnow()
        clusters = [
            (
                name,
                store.intermediate_certificate(name),
                [cert for _, cert in store.superseded_intermediates(name)],
                store.issued_path(name),
            )
            for name in store.clusters()
        ]
        blockers = blocker_for_retire(previous, clusters, now)
        if blockers and not args.force:
            more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
            left = blockers[0].until - now
            wait = format_duration(dt.timedelta(seconds=math.ceil(left.total_seconds())))
            raise CliError(
                f"root {_serial(previous)} still anchors what is valid: {blockers[0].reason}"
                f"{more}; retire in {wait} (or --force for a compromised root)"
            )
        bundle = store.load_bundle(current.trust_domain)
        store.save_bundle(bundle.without_x509_authority(previous))
        for cluster in store.clusters():
            for path, cert in store.superseded_intermediates(cluster):
                if issued_by(cert, previous):
                    path.unlink(missing_ok=True)
        store.forget_previous_root()
    except _REFUSALS as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot write to {args.dir}: {exc.strerror}") from exc
    forced = f" ({len(blockers)} still-valid chain(s) cut off: --force)" if blockers else ""
    print(f"root {_serial(previous)} retired: removed from the bundle{forced}")
    return 0


def cmd_intermediate_rotate(args: argparse.Namespace) -> int:
    try:
        store = CaStore(args.dir, key_passphrase=read_key_passphrase(args.key_passphrase_file))
        old = store.intermediate_certificate(args.cluster)  # the cluster must exist
        store.load_intermediate(args.cluster)  # and its key open with the key passphrase
        root = store.load_root(read_passphrase(args.passphrase_file))
        intermediate = root.issue_intermediate(
            args.cluster, now=utcnow(), ttl=args.ttl, key_algorithm=args.key_type
        )
        store.replace_intermediate(intermediate)
    except _REFUSALS as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot write to {args.dir}: {exc.strerror}") from exc
    print(
        f"intermediate for cluster {args.cluster} rotated: {_serial(old)} ->"
        f" {_serial(intermediate.certificate)} (expires {_when(intermediate.expires_at)});"
        " ca serve signs with it from its next reload check"
    )
    return 0
