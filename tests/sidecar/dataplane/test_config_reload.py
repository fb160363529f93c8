"""The inbound sidecar's policy files, broken while it runs: each broken edit is refused
with a log line naming the file and the problem, the previous policy stays in force, and
the next good edit still takes effect (the reload loop outlived every broken one).

Real processes on loopback (client app → sidecar A → sidecar B → echo app), real files;
sidecar B reads the operator's policy document (``policy_file``) filtered by its pod
labels (``pod_labels_file``) and re-reads them when either changes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.support import wait_for

from .conftest import CLIENT, ECHO, INTRUDER
from .harness import Pki, Procs, Sidecar, free_port, roundtrip, start_echo, start_sidecar

PAYLOAD = b"held"


def _document(allow: list[dict[str, str]]) -> str:
    return json.dumps(
        {
            "kind": "SidecarPolicy",
            "policies": [
                {
                    "name": "echo",
                    "selector": {"matchLabels": {"app": "echo"}},
                    "ports": [8080],
                    "allow": allow,
                }
            ],
        }
    )


def _passes(port: int) -> bool:
    try:
        return roundtrip(port, PAYLOAD, timeout=10) == PAYLOAD
    except OSError:
        return False


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


# What an operator's mistake, a half-synced volume or an attacker with write access to the
# mount can leave behind: (file, how it is broken, what the log line must name).
BREAKAGES: list[tuple[str, Callable[[Path], None], str]] = [
    ("policy", lambda p: p.write_text('{"kind": "SidecarPolicy", "policies": ['), "not JSON"),
    ("policy", lambda p: p.write_text("[]"), "expected a JSON object"),
    (
        "policy",
        lambda p: p.write_text(_document([{"exact": "https://example.org/ns/default/sa/client"}])),
        "policy.policies[0].allow[0].exact",
    ),
    ("policy", lambda p: p.write_text(_document([{"regex": ".*"}])), "unknown key 'regex'"),
    (
        "policy",
        lambda p: p.write_text(_document([]).replace("8080", "70000")),
        "policy.policies[0].ports[0]",
    ),
    ("policy", lambda p: p.write_bytes(b"\xff\xfe{}"), "utf-8"),
    ("policy", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("policy", _replace_with_directory, "Is a directory"),
    # Gone is broken too: read as "no operator policy", it would open every port to the
    # whole trust domain (the default) until the file came back.
    ("policy", lambda p: p.unlink(), "is gone"),
    ("labels", lambda p: p.unlink(), "is gone"),
    ("labels", lambda p: p.write_text("app echo\n"), "pod-labels line 1"),
    ("labels", lambda p: p.write_bytes(b'app="\xff"\n'), "utf-8"),
]


def _touch_later(path: Path, seconds: float) -> None:
    # Reloads compare modification times: make each edit's stamp distinct even on a
    # filesystem with coarse timestamps (a deleted file has no stamp to set).
    if path.exists():
        stamp = time.time() + seconds
        os.utime(path, (stamp, stamp))


def test_every_broken_policy_or_labels_edit_is_refused_and_the_previous_policy_kept(
    procs: Procs, pki: Pki
) -> None:
    workdir = procs.workdir
    policy = workdir / "policy.json"
    labels = workdir / "labels"
    policy.write_text(_document([{"exact": CLIENT}]))
    labels.write_text('app="echo"\n')
    echo = start_echo(procs)
    b: Sidecar = start_sidecar(
        procs,
        "sidecar-b",
        {
            "svid_dir": str(pki.write(workdir / "svid-b", ECHO)),
            "inbound": {"targets": {8080: {"app": f"127.0.0.1:{echo}"}}},
            "policy_file": str(policy),
            "pod_labels_file": str(labels),
        },
        extra_args=["--log-level", "info"],
    )
    upstream = free_port()
    start_sidecar(
        procs,
        "sidecar-a",
        {
            "svid_dir": str(pki.write(workdir / "svid-a", CLIENT)),
            "upstreams": [
                {
                    "name": "echo",
                    "listen": f"127.0.0.1:{upstream}",
                    "target": "echo.default:8080",
                    "endpoints": [f"127.0.0.1:{b.inbound_port}"],
                    "spiffe_ids": [ECHO],
                }
            ],
        },
    )
    assert _passes(upstream)
    in_force = b.describe()["inbound"]["policy"]
    assert CLIENT in json.dumps(in_force)

    good = {policy: policy.read_bytes(), labels: labels.read_bytes()}
    for index, (which, breakage, named) in enumerate(BREAKAGES, 1):
        path = policy if which == "policy" else labels
        seen = b.proc.output().count("policy reload failed")
        breakage(path)
        _touch_later(path, index)

        def refused(seen: int = seen) -> bool:
            assert b.proc.alive(), b.proc.output()
            return b.proc.output().count("policy reload failed") > seen

        wait_for(refused, 15, f"sidecar B refusing the {which} file broken by {named!r}")
        line = b.proc.output().split("policy reload failed")[-1].splitlines()[0]
        assert named in line, line
        assert str(path) in line, line
        assert _passes(upstream), f"the previous policy was dropped after {named!r}"
        assert b.describe()["inbound"]["policy"] == in_force, named
        # Put the good file back: each case breaks one file of an otherwise good pair.
        if path.is_dir():
            path.rmdir()
        path.write_bytes(good[path])
        _touch_later(path, index + 0.5)
    assert "Traceback" not in b.proc.output()

    # A good edit after all of them still takes effect: the client is no longer allowed.
    policy.write_text(_document([{"exact": INTRUDER}]))
    _touch_later(policy, len(BREAKAGES) + 1)
    wait_for(lambda: not _passes(upstream), 15, "the good policy edit taking effect")
    assert b.proc.output().rstrip().count("policy reloaded") >= 1
