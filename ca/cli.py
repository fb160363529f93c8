"""``trellis ca``: create the hierarchy, issue SVIDs and inspect certificates (local mode)."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509

from ca.authority import (
    DEFAULT_INTERMEDIATE_TTL,
    DEFAULT_ROOT_TTL,
    IssuanceError,
    RootAuthority,
    load_csr,
)
from ca.bundle import BundleError, TrustBundle, load_pem_certificates
from ca.cliargs import key_algorithm as _key_algorithm
from ca.cliargs import spiffe_id as _spiffe_id
from ca.cliargs import trust_domain as _trust_domain
from ca.entries import RESERVED_PATH_PREFIX
from ca.jwtsvid import DEFAULT_JWT_SVID_TTL, JwtAuthority, JwtSvidError
from ca.keys import (
    KeyAlgorithm,
    KeyMaterialError,
    describe_public_key,
    generate_private_key,
    private_key_pem,
    write_private_file,
    write_public_file,
)
from ca.spiffeid import SpiffeId, SpiffeIdError, TrustDomain
from ca.store import CaStore, StoreError, read_key_passphrase, read_passphrase, utcnow
from ca.verify import VerificationError, verify_x509_svid
from ca.x509svid import DEFAULT_X509_SVID_TTL, SvidError, spiffe_id_of
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
    JwtSvidError,
    SvidError,
)


_KEY_PROTECTION_HELP = (
    "encrypt (ca intermediate) or open the cluster's intermediate and JWT keys with the"
    " passphrase in FILE (default: $TRELLIS_KEY_PASSPHRASE; neither: unencrypted keys, for"
    " Kubernetes, where the Secret holding them is the cluster's protection)"
)


_DIR_HELP = "the CA directory (trellis ca init)"
_CLUSTER_HELP = "the cluster whose intermediate signs (trellis ca intermediate)"
_KEY_TYPE_HELP = ", ".join(a.value for a in KeyAlgorithm)
_ROOT_KEY_FILE_HELP = "read the root key's passphrase from FILE (default: $TRELLIS_ROOT_PASSPHRASE)"


def add_key_passphrase_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-passphrase-file", type=Path, metavar="FILE", help=_KEY_PROTECTION_HELP
    )


def open_store(directory: Path, key_passphrase_file: Path | None) -> CaStore:
    """The CA directory, with the key passphrase from the flag or the environment."""
    return CaStore(directory, key_passphrase=read_key_passphrase(key_passphrase_file))


def register(commands: Any) -> None:
    ca = commands.add_parser("ca", help="certificate authority (local mode)")
    sub = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND", required=True)

    p = sub.add_parser("init", help="create a trust domain's root (key encrypted at rest)")
    p.add_argument("--trust-domain", required=True, type=_trust_domain, help="e.g. example.org")
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument(
        "--key-type", type=_key_algorithm, default=KeyAlgorithm.P384, help=_KEY_TYPE_HELP
    )
    p.add_argument("--ttl", type=_duration, default=DEFAULT_ROOT_TTL, help="root lifetime")
    p.add_argument("--passphrase-file", type=Path, metavar="FILE", help=_ROOT_KEY_FILE_HELP)
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("intermediate", help="sign a cluster intermediate with the root")
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument("--cluster", required=True, help="the cluster's name")
    p.add_argument(
        "--ttl", type=_duration, default=DEFAULT_INTERMEDIATE_TTL, help="intermediate lifetime"
    )
    p.add_argument(
        "--key-type", type=_key_algorithm, default=KeyAlgorithm.P256, help=_KEY_TYPE_HELP
    )
    p.add_argument("--passphrase-file", type=Path, metavar="FILE", help=_ROOT_KEY_FILE_HELP)
    add_key_passphrase_argument(p)
    p.set_defaults(handler=cmd_intermediate)

    p = sub.add_parser("issue", help="issue an X509-SVID from a cluster intermediate")
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument("--cluster", required=True, help=_CLUSTER_HELP)
    p.add_argument("--spiffe-id", required=True, type=_spiffe_id, help="the SVID's identity")
    p.add_argument(
        "--ttl", type=_duration, default=DEFAULT_X509_SVID_TTL, help="SVID lifetime (<= 24h)"
    )
    p.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="writes svid.pem/.key, bundle.pem"
    )
    p.add_argument("--csr", type=Path, help="sign this PKCS#10 CSR instead of generating a key")
    p.add_argument(
        "--key-type", type=_key_algorithm, default=KeyAlgorithm.P256, help=_KEY_TYPE_HELP
    )
    p.add_argument("--dns", action="append", default=[], help="extra DNS SAN (repeatable)")
    _add_reserved_path_argument(p)
    add_key_passphrase_argument(p)
    p.set_defaults(handler=cmd_issue)

    p = sub.add_parser("jwt", help="issue a JWT-SVID and print it")
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument("--cluster", required=True, help=_CLUSTER_HELP)
    p.add_argument("--spiffe-id", required=True, type=_spiffe_id, help="the token's subject")
    p.add_argument("--audience", required=True, action="append", help="aud claim (repeatable)")
    p.add_argument("--ttl", type=_duration, default=DEFAULT_JWT_SVID_TTL, help="token lifetime")
    _add_reserved_path_argument(p)
    add_key_passphrase_argument(p)
    p.set_defaults(handler=cmd_jwt)

    p = sub.add_parser("bundle", help="print the trust bundle")
    p.add_argument("--dir", required=True, type=Path, help=_DIR_HELP)
    p.add_argument(
        "--format", choices=("spiffe", "pem"), default="spiffe", help="SPIFFE bundle JSON or PEM"
    )
    p.set_defaults(handler=cmd_bundle)

    p = sub.add_parser("inspect", help="describe certificates and check a chain against a bundle")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="PEM certificates")
    p.add_argument(
        "--bundle", type=Path, help="PEM roots or a SPIFFE bundle (JSON) to verify against"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_inspect)

    from ca.server import cli as server_cli  # `ca serve`, `ca token` (issue 4)

    server_cli.register(sub)

    from ca import rotation_cli  # `ca root prepare|activate|retire`, `ca intermediate rotate`

    rotation_cli.register(sub)

    from ca.server import admin_cli  # `ca entries list`, `ca agents list`

    admin_cli.register(sub)


def _add_reserved_path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-reserved-path",
        action="store_true",
        help=f"issue an ID under {RESERVED_PATH_PREFIX}, the agents' and CAs' own paths (the CA"
        " takes spiffe://TD/trellis/agent/NODE for NODE's attested agent)",
    )


def _refuse_reserved_path(args: argparse.Namespace) -> None:
    """An ID under /trellis/ is an agent's or a CA's: the CA server believes an X509-SVID
    for /trellis/agent/NODE is NODE's attested agent, so minting one by hand bypasses node
    attestation. Only an explicit flag does it."""
    spiffe_id: SpiffeId = args.spiffe_id
    if spiffe_id.path.startswith(RESERVED_PATH_PREFIX) and not args.allow_reserved_path:
        raise CliError(
            f"{spiffe_id} is under {RESERVED_PATH_PREFIX}, reserved for agents and CAs (the CA"
            " accepts /trellis/agent/NODE as NODE's agent); pass --allow-reserved-path to"
            " issue it anyway"
        )


def _refusal(exc: Exception) -> CliError:
    return CliError(str(exc))


def cmd_init(args: argparse.Namespace) -> int:
    try:
        passphrase = read_passphrase(args.passphrase_file)
        store = CaStore(args.dir)
        if store.root_cert_path.exists() or store.root_key_path.exists():
            raise StoreError(f"{args.dir} already holds a root; refusing to overwrite it")
        root = RootAuthority.create(
            args.trust_domain, now=utcnow(), key_algorithm=args.key_type, ttl=args.ttl
        )
        store.save_root(root, passphrase)
    except _REFUSALS as exc:
        raise _refusal(exc) from exc
    except OSError as exc:
        raise CliError(f"cannot write to {args.dir}: {exc.strerror}") from exc
    print(f"root for {root.trust_domain} written to {store.root_cert_path} (key encrypted, 0600)")
    return 0


def cmd_intermediate(args: argparse.Namespace) -> int:
    try:
        store = open_store(args.dir, args.key_passphrase_file)
        store.root_certificate()  # a missing directory is reported before a missing passphrase
        root = store.load_root(read_passphrase(args.passphrase_file))
        intermediate = root.issue_intermediate(
            args.cluster, now=utcnow(), ttl=args.ttl, key_algorithm=args.key_type
        )
        store.save_intermediate(intermediate, JwtAuthority.generate())
    except _REFUSALS as exc:
        raise _refusal(exc) from exc
    except OSError as exc:
        raise CliError(f"cannot write to {args.dir}: {exc.strerror}") from exc
    protection = "encrypted" if store.key_passphrase is not None else "unencrypted"
    print(
        f"intermediate for cluster {args.cluster} written to {store.cluster_dir(args.cluster)}"
        f" (keys {protection}, 0600; expires {intermediate.expires_at:%Y-%m-%d %H:%M} UTC)"
    )
    return 0


def _stage(directory: Path, files: dict[str, tuple[bytes, bool]]) -> None:
    """Write every output or none: all are prepared in memory, then renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".trellis-", dir=directory))
    try:
        for name, (data, secret) in files.items():
            (write_private_file if secret else write_public_file)(staging / name, data)
        for name in files:
            (staging / name).replace(directory / name)
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def cmd_issue(args: argparse.Namespace) -> int:
    _refuse_reserved_path(args)
    try:
        store = open_store(args.dir, args.key_passphrase_file)
        intermediate = store.load_intermediate(args.cluster)
        bundle = store.load_bundle(intermediate.trust_domain)
        now = utcnow()
        files: dict[str, tuple[bytes, bool]] = {}
        if args.csr is not None:
            try:
                csr_bytes = args.csr.read_bytes()
            except OSError as exc:
                raise StoreError(f"cannot read CSR {args.csr}: {exc.strerror}") from exc
            svid = intermediate.issue_x509_svid_from_csr(
                load_csr(csr_bytes), args.spiffe_id, now=now, ttl=args.ttl, dns_names=args.dns
            )
        else:
            key = generate_private_key(args.key_type)
            svid = intermediate.issue_x509_svid(
                args.spiffe_id, key.public_key(), now=now, ttl=args.ttl, dns_names=args.dns
            )
            files["svid.key"] = (private_key_pem(key), True)
        files["svid.pem"] = (svid.chain_pem(), False)
        files["bundle.pem"] = (bundle.to_pem(), False)
        _stage(args.out, files)
    except _REFUSALS as exc:
        raise _refusal(exc) from exc
    except OSError as exc:
        raise CliError(f"cannot write to {args.out}: {exc.strerror}") from exc
    print(
        f"{svid.spiffe_id} issued to {args.out} (expires {svid.expires_at:%Y-%m-%d %H:%M:%S} UTC)"
    )
    return 0


def cmd_jwt(args: argparse.Namespace) -> int:
    _refuse_reserved_path(args)
    try:
        store = open_store(args.dir, args.key_passphrase_file)
        intermediate = store.load_intermediate(args.cluster)
        if args.spiffe_id.trust_domain != intermediate.trust_domain:
            raise IssuanceError(
                "foreign-trust-domain", f"{args.spiffe_id} is outside {intermediate.trust_domain}"
            )
        authority = store.load_jwt_authority(args.cluster)
        svid = authority.sign(args.spiffe_id, args.audience, now=utcnow(), ttl=args.ttl)
    except _REFUSALS as exc:
        raise _refusal(exc) from exc
    print(svid.token)
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    try:
        bundle = CaStore(args.dir).load_bundle()
    except _REFUSALS as exc:
        raise _refusal(exc) from exc
    data = bundle.to_pem() if args.format == "pem" else bundle.to_json()
    print(data.decode(), end="")
    return 0


def _load_roots(path: Path) -> TrustBundle:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read bundle {path}: {exc.strerror}") from exc
    try:
        if data.lstrip().startswith(b"{"):
            doc_certs = TrustBundle.from_json(
                TrustDomain("placeholder.invalid"), data
            ).x509_authorities
        else:
            doc_certs = tuple(load_pem_certificates(data, what=str(path)))
    except BundleError as exc:
        raise CliError(str(exc)) from exc
    if not doc_certs:
        raise CliError(f"bundle {path} holds no X.509 authority")
    td = spiffe_id_of(doc_certs[0]).trust_domain if _has_spiffe_id(doc_certs[0]) else None
    return TrustBundle(td or TrustDomain("unknown.invalid"), doc_certs)


def _has_spiffe_id(cert: x509.Certificate) -> bool:
    with contextlib.suppress(SvidError):
        spiffe_id_of(cert)
        return True
    return False


def _describe(cert: x509.Certificate, now: dt.datetime) -> dict[str, Any]:
    try:
        spiffe: str | None = str(spiffe_id_of(cert))
    except SvidError:
        spiffe = None
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    remaining = cert.not_valid_after_utc - now
    return {
        "subject": cert.subject.rfc4514_string() or "(empty)",
        "spiffe_id": spiffe,
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "ca": is_ca,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "remaining": format_duration(remaining) if remaining.total_seconds() > 0 else "expired",
        "key": describe_public_key(cert.public_key()),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    now = utcnow()
    roots = _load_roots(args.bundle) if args.bundle else None
    status = 0
    report: list[dict[str, Any]] = []
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            certs = load_pem_certificates(data, what=str(path))
        except BundleError as exc:
            raise CliError(str(exc)) from exc
        entry: dict[str, Any] = {
            "file": str(path),
            "certificates": [_describe(c, now) for c in certs],
        }
        if roots is not None:
            try:
                verified = verify_x509_svid(certs, lambda td: roots.x509_authorities, now=now)
                entry["chain"] = {"verified": True, "spiffe_id": str(verified.spiffe_id)}
            except VerificationError as exc:
                entry["chain"] = {"verified": False, "reason": exc.reason, "detail": str(exc)}
                status = 1
        report.append(entry)
    if args.json:
        print(json.dumps(report, indent=2))
        return status
    for entry in report:
        print(f"== {entry['file']}")
        for index, cert in enumerate(entry["certificates"]):
            print(f"  [{index}] subject:   {cert['subject']}")
            print(f"      spiffe id: {cert['spiffe_id'] or '-'}")
            print(f"      issuer:    {cert['issuer']}")
            print(f"      serial:    {cert['serial']}")
            print(f"      ca:        {'yes' if cert['ca'] else 'no'}")
            validity = f"{cert['not_before']} .. {cert['not_after']}"
            print(f"      validity:  {validity} ({cert['remaining']} left)")
            print(f"      key:       {cert['key']}")
        chain = entry.get("chain")
        if chain is not None:
            if chain["verified"]:
                print(f"  chain: verified against {args.bundle} as {chain['spiffe_id']}")
            else:
                print(f"  chain: NOT verified against {args.bundle}: {chain['detail']}")
    return status
