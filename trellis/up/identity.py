"""The ephemeral trust domain of ``trellis up``: authorities, workload executables, entries.

The root exists only in this process's memory: it signs the cluster intermediate and is
dropped; only its *certificate* is written (the agent needs it to authenticate the CA).
The intermediate and JWT keys are written 0600 into the run's private directory, which
``trellis ca serve`` reads and ``trellis up`` deletes on exit.

Why each sidecar runs from its own copy of the interpreter. The agent attests a caller by
what the kernel and ``/proc`` say about it: uid, gid and the executable path
(``ca/agent/attestation.py``; there is no pid- or argv-based selector, rightly: argv is
whatever the process says it is). Both sidecars are Python processes of the same user, so
uid, gid and ``/proc/<pid>/exe`` would all be equal and one entry would match both. A copy
of the interpreter binary under a per-workload path gives each sidecar a distinct
``unix:path`` that only a process started from that file carries, so each gets exactly
its own SVID over the real Workload API path — no SVID files handed around. The copy is a
few KiB to a few MiB and lives in the private directory with everything else. The path is
not the only selector when ``trellis up`` runs as root: each workload then also runs under
a uid of its own (``users``) and its entry names both, since a path alone can be borrowed
by a process that execs the file (``ca/agent/attestation.py``).

In a virtual environment the copy gets a ``pyvenv.cfg`` and a symlink to the
environment's ``site-packages``, so it imports the same packages as ``trellis`` itself.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization

from ca.authority import RootAuthority
from ca.entries import parse_entries_yaml
from ca.jwtsvid import JwtAuthority
from ca.keys import KeyAlgorithm, write_public_file
from ca.spiffeid import SpiffeId, TrustDomain
from ca.store import CaStore

__all__ = [
    "Workload",
    "base_interpreter",
    "create_authorities",
    "workload_executable",
    "write_entries",
]

ROOT_TTL = dt.timedelta(days=2)
INTERMEDIATE_TTL = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Workload:
    """One demo service's identity: the sidecar started from ``executable`` gets it."""

    name: str
    spiffe_id: SpiffeId
    executable: Path
    uid: int  # the uid it runs as, which its entry selects beside the path


def create_authorities(
    ca_dir: Path, trust_domain: TrustDomain, cluster: str, *, pq_signatures: bool = False
) -> Path:
    """Write the CA directory ``trellis ca serve`` needs; returns the root certificate path.

    Nothing of the root but its certificate reaches the disk. ``pq_signatures``: an
    ML-DSA-65 root and intermediate, whose workload keys the agent then makes ML-DSA-65.
    """
    now = dt.datetime.now(dt.UTC)
    root_key, intermediate_key = (
        (KeyAlgorithm.MLDSA65, KeyAlgorithm.MLDSA65)
        if pq_signatures
        else (KeyAlgorithm.P384, KeyAlgorithm.P256)
    )
    root = RootAuthority.create(trust_domain, now=now, ttl=ROOT_TTL, key_algorithm=root_key)
    intermediate = root.issue_intermediate(
        cluster, now=now, ttl=INTERMEDIATE_TTL, key_algorithm=intermediate_key
    )
    store = CaStore(ca_dir)
    store.save_intermediate(intermediate, JwtAuthority.generate())
    store.save_bundle(store.load_bundle(trust_domain).with_x509_authorities([root.certificate]))
    write_public_file(
        store.root_cert_path, root.certificate.public_bytes(serialization.Encoding.PEM)
    )
    return store.root_cert_path


def base_interpreter() -> Path:
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Path(os.path.realpath(base))


def workload_executable(directory: Path, name: str, base: Path | None = None) -> Path:
    """A private copy of the interpreter (``base``: of this version, default the running
    one's) at ``directory/bin/name`` that imports Trellis."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, mode=0o700)
    executable = bin_dir / name
    base = base if base is not None else base_interpreter()
    shutil.copy2(base, executable)
    if sys.prefix != sys.base_prefix:
        # A venv: the interpreter finds pyvenv.cfg one directory above itself (PEP 405).
        include_system = "false"
        cfg = Path(sys.prefix) / "pyvenv.cfg"
        if cfg.is_file():
            for line in cfg.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "include-system-site-packages":
                    include_system = value.strip()
        (directory / "pyvenv.cfg").write_text(
            f"home = {base.parent}\ninclude-system-site-packages = {include_system}\n"
        )
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        lib = directory / "lib" / version
        lib.mkdir(parents=True)
        (lib / "site-packages").symlink_to(sysconfig.get_paths()["purelib"])
    return executable.resolve()


def write_entries(path: Path, workloads: list[Workload], *, node: str, ttl: dt.timedelta) -> None:
    """One entry per workload: its ``unix:uid`` and the ``unix:path`` of its executable."""
    doc = {
        "entries": [
            {
                "id": f"up-{w.name}",
                "spiffe_id": str(w.spiffe_id),
                "selectors": [f"unix:uid:{w.uid}", f"unix:path:{w.executable}"],
                "nodes": [node],
                "ttl": f"{max(1, int(ttl.total_seconds()))}s",
            }
            for w in workloads
        ]
    }
    text = yaml.safe_dump(doc, sort_keys=False)
    parse_entries_yaml(text)  # refuse here, in words, what the CA would refuse later
    path.touch(mode=0o600)  # the run directory may be enterable by the workloads' uids
    path.write_text(text)
