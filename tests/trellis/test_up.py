"""``trellis up`` as a real process: the mesh comes up, carries traffic, and leaves nothing.

Each run is wrapped in a small supervisor process that makes itself a child subreaper
(``PR_SET_CHILD_SUBREAPER``): any process ``trellis up`` started and failed to reap would be
re-parented to the supervisor instead of init, so "no child processes remain" is checked
exactly, not by guessing at command lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from trellis.cli import main
from trellis.up import Mesh, MeshConfig

REPO = Path(__file__).resolve().parents[2]

_SUPERVISOR = textwrap.dedent(
    """
    import ctypes, json, os, signal, subprocess, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    argv, signum, base = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    files = []
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signum:
        # Signal once the status shows traffic: wait for a line with requests > 0.
        lines = []
        for line in up.stdout:
            lines.append(line)
            if " traffic " in line and not line.split("traffic")[1].strip().startswith("0 "):
                break
        # While it runs: what the run directory holds, and how it is protected.
        for top, dirs, names in os.walk(base):
            for name in dirs + names:
                path = os.path.join(top, name)
                if os.path.islink(path):
                    continue
                st = os.stat(path)
                secret = False
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        secret = b"PRIVATE KEY" in f.read(1 << 20)
                files.append([os.path.relpath(path, base), st.st_mode & 0o777, secret])
        up.send_signal(signum)
        out, err = up.communicate(timeout=60)
        out = "".join(lines) + out
    else:
        out, err = up.communicate(timeout=120)
    time.sleep(1.0)
    # Reap what was re-parented here and has exited (zombies are not leftovers) ...
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break
    # ... then anything still here is a process trellis up left running.
    orphans = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\\0", b" ")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid():
            orphans.append(cmdline.decode(errors="replace"))
    for pid in [int(e) for e in os.listdir("/proc") if e.isdigit()]:
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid():
            os.kill(pid, signal.SIGKILL)  # do not leak what the test found
    report = {"rc": up.returncode, "out": out, "err": err, "orphans": orphans, "files": files}
    print(json.dumps(report))
    """
)


def _supervised(base: Path, args: list[str], *, signal_when_busy: int = 0) -> dict[str, Any]:
    argv = [sys.executable, "-m", "trellis", "up", "--base-dir", str(base), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR, json.dumps(argv), str(signal_when_busy), str(base)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


def _last_status(out: str) -> str:
    blocks = [b for b in out.split("\n\n") if b.startswith("trellis up")]
    assert blocks, out
    return blocks[-1]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A base dir short enough for the agent's Unix socket (sun_path is 108 bytes), which
    other uids may enter (not list), so that each workload can run under its own."""
    path = Path(tempfile.mkdtemp(prefix="tr-up-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def test_up_runs_the_mesh_for_its_duration_and_leaves_nothing_behind(short_dir: Path) -> None:
    base = short_dir
    report = _supervised(base, ["--duration", "12s", "--svid-ttl", "10s", "--rate", "40"])
    out = report["out"]
    assert report["rc"] == 0, report["err"]
    status = _last_status(out)

    # Identities, each with a remaining TTL, read from the sidecars themselves.
    assert re.search(r"load\s+spiffe://example.org/ns/demo/sa/load\s+\d+s left", status), status
    assert re.search(r"echo\s+spiffe://example.org/ns/demo/sa/echo\s+\d+s left", status), status
    # The hybrid post-quantum group was negotiated.
    assert "X25519MLKEM768" in status
    # Traffic flowed through both sidecars, none of it failed.
    traffic = re.search(r"traffic\s+([\d,]+) requests.*?, ([\d,]+) errors", status)
    assert traffic is not None, status
    assert int(traffic.group(1).replace(",", "")) > 0
    assert traffic.group(2) == "0", status
    # Pooling: a handful of handshakes for the load generator's app connections.
    pooling = re.search(r"pooling\s+(\d+) TLS handshakes? for (\d+) app connections?", status)
    assert pooling is not None and 1 <= int(pooling.group(1)) <= int(pooling.group(2)), status
    # ... and refuses the third sidecar's identity, which the status shows.
    assert re.search(
        r"policy\s+echo admits only load: [1-9][\d,]* allowed, 1 denied;"
        r" intruder's call refused",
        status,
    ), status
    assert re.search(r"intruder\s+spiffe://example.org/ns/demo/sa/intruder\s+\d+s left", status)
    # With a 10 s TTL the agent has rotated the workload SVIDs at least once by now.
    assert re.search(r"issuance\s+CA issued \d+ X509-SVIDs .*agent: .*rotation [1-9]", status), (
        status
    )
    for name in ("ca", "agent", "sidecar-load", "sidecar-echo", "sidecar-intruder", "echo", "load"):
        assert re.search(rf"{name}\s+http://127\.0\.0\.1:\d+/metrics\n", status + "\n"), name
    assert "not answering" not in status
    # What trellis check needs, in the start-up lines and in the status block.
    err = report["err"]
    assert re.search(r"CA server \(pid \d+\) serving on \S+, admin socket \S+/ca\.sock\n", err)
    assert re.search(r"agent \(pid \d+\) attested .*, admin 127\.0\.0\.1:\d+\n", err), err
    assert re.search(r"admin\s+CA socket \S+/ca\.sock, agent 127\.0\.0\.1:\d+\n", status)
    assert re.search(
        r"check\s+trellis check --ca-admin-socket \S+/ca\.sock --agent-admin 127\.0\.0\.1:\d+"
        r"( --sidecar-admin 127\.0\.0\.1:\d+){3}\n",
        status,
    ), status
    assert "load generator: " in out and ", 0 errors" in out.split("load generator: ")[1]

    # Nothing left: no process, no run directory, no socket, no key.
    assert report["orphans"] == []
    assert list(base.iterdir()) == []
    assert _processes_mentioning(str(base)) == []


def test_ctrl_c_stops_everything_cleanly(short_dir: Path) -> None:
    base = short_dir
    report = _supervised(base, ["--interval", "500ms"], signal_when_busy=signal.SIGINT)
    assert report["rc"] == 0, report["err"]
    # While it ran: one private run directory; the root key nowhere; every key 0600.
    files = {path: (mode, secret) for path, mode, secret in report["files"]}
    (run_dir,) = [p for p in files if "/" not in p]
    status = _last_status(report["out"])
    if "each workload under its own uid" in status:
        # The workloads' uids may enter it (for the agent's socket and their own
        # directories), never list it or read anything of the CA's or the agent's.
        assert files[run_dir][0] == 0o711

        def reachable(path: str) -> bool:  # by a uid that neither owns it nor is root
            parts = path.split("/")
            ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
            return all(files[a][0] & 0o001 for a in ancestors) and bool(files[path][0] & 0o004)

        open_to_others = {p for p in files if reachable(p)}
        shared = {f"{run_dir}/agent.sock"}
        unexpected = {p for p in open_to_others if p not in shared and "/workloads/apps" not in p}
        assert unexpected == set()
        assert not any(files[p][1] for p in open_to_others)
    else:
        assert files[run_dir][0] == 0o700
    assert not any(p.endswith("root.key") for p in files)
    assert f"{run_dir}/ca/root.crt" in files
    keys = sorted(p for p, (_, secret) in files.items() if secret)
    assert f"{run_dir}/ca/clusters/local/intermediate.key" in keys
    assert all(files[p][0] == 0o600 for p in keys), {p: oct(files[p][0]) for p in keys}
    assert files[f"{run_dir}/join-token"][0] == 0o600
    assert "stopped 7 processes; removed " in report["out"]
    assert report["orphans"] == []
    assert list(base.iterdir()) == []


def test_even_a_killed_trellis_up_leaves_no_process_running(short_dir: Path) -> None:
    # SIGKILL gives trellis up no chance to clean up; its children get SIGKILL from the
    # kernel as it dies (PR_SET_PDEATHSIG). Only the run directory stays, as it must.
    report = _supervised(short_dir, ["--interval", "500ms"], signal_when_busy=signal.SIGKILL)
    assert report["rc"] == -signal.SIGKILL
    assert report["orphans"] == []
    (leftover,) = short_dir.iterdir()
    assert leftover.name.startswith("trellis-up-")
    # The next start removes it: its owner is gone.
    from trellis.up.mesh import remove_stale_run_dirs

    assert remove_stale_run_dirs(short_dir) == [leftover]
    assert list(short_dir.iterdir()) == []


def test_only_run_dirs_whose_owner_is_gone_are_removed(tmp_path: Path) -> None:
    from trellis.up.mesh import OWNER_FILE, remove_stale_run_dirs

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dirs = {}
        for name, owner in (
            ("trellis-up-stale", str(finished.pid)),
            ("trellis-up-live", str(alive.pid)),
            ("trellis-up-garbled", "not a pid"),
            ("trellis-up-unowned", None),
            ("elsewhere", str(finished.pid)),
        ):
            path = dirs[name] = tmp_path / name
            (path / "ca").mkdir(parents=True)
            if owner is not None:
                (path / OWNER_FILE).write_text(owner + "\n")
        (tmp_path / "trellis-up-file").write_text(str(finished.pid))
        assert remove_stale_run_dirs(tmp_path) == [dirs["trellis-up-stale"]]
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "elsewhere",
            "trellis-up-file",
            "trellis-up-garbled",
            "trellis-up-live",
            "trellis-up-unowned",
        ]
        assert remove_stale_run_dirs(tmp_path / "missing") == []
    finally:
        alive.kill()
        alive.wait()


def test_a_mesh_that_cannot_start_says_which_process_failed_and_cleans_up(short_dir: Path) -> None:
    base = short_dir
    # Hold the first port of the range, the CA server's: it cannot bind, and says so.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        report = _supervised(base, ["--port-base", str(port), "--duration", "5s"])
    assert report["rc"] == 1
    assert report["err"].count("trellis: error: ca ") == 1, report["err"]
    assert report["orphans"] == []
    assert list(base.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--svid-ttl", "1s"], "must be between 10s and 24h"),
        (["--svid-ttl", "soon"], "invalid duration"),
        (["--duration=-3s"], "invalid duration"),
        (["--port-base", "80"], "must be 0 (ports the kernel picks) or 1024.."),
        (["--rate", "0"], "must be a request rate"),
        (["--trust-domain", "Not A Domain"], "--trust-domain"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--host", "0.0.0.0"], "is not a loopback address"),
    ],
)
def test_a_bad_flag_is_one_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["up", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("error:") == 1


def test_up_help_says_its_logging_flags_set_the_childrens_log_files(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["up", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as one line, whatever the wrapping
    assert "least severe level logged" not in text  # as if it were trellis up's own level
    assert (
        "--log-level {debug,info,warning,error} least severe level the children (CA, agent,"
        " sidecars, demo services) write to their logs in the run directory's logs/"
        " (default info); what trellis up itself prints does not change"
    ) in text
    assert (
        "--log-format {auto,json,text} format of the children's logs (CA, agent, sidecars,"
        " demo services) in the run directory's logs/"
    ) in text


def test_a_missing_base_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--base-dir", str(tmp_path / "nope"), "--duration", "1s"]) == 1
    err = capsys.readouterr().err
    assert err == f"trellis: error: --base-dir {tmp_path / 'nope'} is not a directory\n"


def test_each_workload_runs_under_its_own_uid_and_its_entry_names_uid_and_path(
    short_dir: Path,
) -> None:
    """In-process ``Mesh`` (real processes): who each child runs as, and what the entries
    select. Not root, or no interpreter another uid can run: the status says so, and the
    entries name this uid, as before."""
    config = MeshConfig(base_dir=short_dir, start_load=False, probe_policy=False)
    with Mesh(config) as mesh:
        assert mesh.run_dir is not None and mesh.isolation is not None
        entries = yaml.safe_load((mesh.run_dir / "entries.yaml").read_text())["entries"]
        running = {name: _uid_of(mesh.pid(name)) for name in mesh.children}
        note = mesh.isolation.note
        status_line = mesh.status_view().isolation
    selectors = {e["id"]: e["selectors"] for e in entries}
    isolated = bool(mesh.isolation.uids)
    assert isolated == (os.getuid() == 0 and "each workload under its own uid" in note), note
    assert status_line == note
    uids = {name: mesh.workloads[name].uid for name in ("load", "echo")}
    for name, uid in uids.items():
        assert selectors[f"up-{name}"] == [
            f"unix:uid:{uid}",
            f"unix:path:{mesh.workloads[name].executable}",
        ]
        assert running[f"sidecar-{name}"] == uid  # and it got its SVID: the mesh started
    assert running["echo"] == uids["echo"]  # the app shares its sidecar's uid
    assert running["ca"] == running["agent"] == os.getuid()  # the key holders stay ours
    if isolated:
        assert len(set(uids.values())) == 2 and os.getuid() not in uids.values()
    else:
        assert set(uids.values()) == {os.getuid()}
        assert "unix:path alone" in note
    assert list(short_dir.iterdir()) == []


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give workloads uids")
def test_a_base_dir_other_uids_cannot_enter_keeps_every_workload_on_our_uid_and_says_why(
    tmp_path: Path,
) -> None:
    from trellis.up.identity import base_interpreter
    from trellis.up.users import plan_isolation

    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    isolation = plan_isolation(["load", "echo"], base_interpreter(), closed / "trellis-up-x")
    assert isolation.uids == {}
    assert isolation.entry_uid("load") == os.getuid()
    assert f"({closed} is closed to other users)" in isolation.note


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    """A port inside the ephemeral range can be taken as some outgoing connection's source
    port between the check and the child's bind (it happened to the CA beside the kube
    tests); below the range only another listener can take it."""
    import socket

    from trellis.up.processes import _ephemeral_range, free_ports

    low, _ = _ephemeral_range()
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(20_000 <= port < low for port in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert free_ports(3, base=41000) == [41000, 41001, 41002]
