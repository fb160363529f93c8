"""A connection belongs to the process that made it, running the program it ran then.

The attack (issue 12): a process connects to the Workload API socket and forks; the parent
execs a binary some entry names by ``unix:path``; the child, holding the inherited
connection, asks for an SVID. SO_PEERCRED still names the parent's pid, and a
``/proc/<pid>/exe`` read at call time names the new binary, so the child would get that
binary's identity. Real processes here: the agent runs in this test's event loop, the
attacker is a separate interpreter (another uid when the test runs as root, as in the
report), and its child speaks HTTP/2 itself (``h2``) over the inherited socket, since no
gRPC client can adopt an open file descriptor.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ca.workload import method_path
from tests.ca.agent.conftest import WEB, LiveCa, entry, make_upstream, run, running_agent

REPO = Path(__file__).resolve().parents[3]
SLEEP = os.path.realpath(shutil.which("sleep") or "/usr/bin/sleep")


def _attacker() -> tuple[str, int | None]:
    """The interpreter and uid of the attacker: uid 3001, as in the report, when this runs
    as root and a system interpreter of this version is there for another uid to run (this
    one may sit under root's private home), else this interpreter and this uid."""
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.getuid() == 0 and os.path.exists(system):
        return system, 3001
    return os.path.realpath(sys.executable), None


PYTHON, ATTACKER_UID = _attacker()
SITE_PACKAGES = sysconfig.get_paths()["purelib"]  # h2 and protobuf for the attacker's child

# argv: agent socket, what the parent does after "go" on stdin ("exec:<path>", "exit",
# "stay"; "stream-exec:<path>": the child calls first, before the parent execs), the
# method path. The child prints a JSON line per answer: what the parent runs by then, the
# gRPC status and the SPIFFE IDs it received.
_FORKER = textwrap.dedent(
    """
    import json, os, socket, sys, time
    socket_path, then, path = sys.argv[1:4]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    parent = os.getpid()
    streaming = then.startswith("stream-")
    then = then.removeprefix("stream-")
    if os.fork():
        sys.stdin.readline()  # the test says when: after the agent accepted the connection
        if then.startswith("exec:"):
            target = then[len("exec:"):]
            os.execv(target, [target, "30"])
        if then == "exit":
            os._exit(0)
        time.sleep(30)
        os._exit(0)

    import h2.config, h2.connection, h2.events
    from ca.workload import workload_pb2

    def parent_exe():
        try:
            return os.readlink(f"/proc/{parent}/exe")
        except OSError:
            return None

    for _ in range(0 if streaming else 600):  # until the parent did as told (30 s at most)
        exe = parent_exe()
        if then == "stay" or (then == "exit" and exe is None) or then == f"exec:{exe}":
            break
        time.sleep(0.05)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "localhost"),
        ("content-type", "application/grpc"), ("te", "trailers"), ("workload.spiffe.io", "true"),
    ])
    conn.send_data(stream, b"\\0\\0\\0\\0\\0", end_stream=True)  # one empty X509SVIDRequest
    sock.sendall(conn.data_to_send())
    sock.settimeout(20)
    state = {"body": b"", "status": None, "ended": False}

    def answer():
        # The SPIFFE IDs of the next whole message, or [] once the stream has ended.
        while True:
            body = state["body"]
            if len(body) >= 5 and len(body) >= 5 + int.from_bytes(body[1:5], "big"):
                size = 5 + int.from_bytes(body[1:5], "big")
                state["body"] = body[size:]
                response = workload_pb2.X509SVIDResponse.FromString(body[5:size])
                return [svid.spiffe_id for svid in response.svids]
            chunk = b"" if state["ended"] else sock.recv(65536)
            if not chunk:
                return []
            for event in conn.receive_data(chunk):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    state["status"] = dict(event.headers).get(b"grpc-status", state["status"])
                elif isinstance(event, h2.events.DataReceived):
                    state["body"] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    state["ended"] = True
            sock.sendall(conn.data_to_send())

    for _ in range(2 if streaming else 1):
        ids = answer()
        status = state["status"]
        print(json.dumps({
            "parent_exe": parent_exe(),
            "status": status.decode() if status else None,
            "spiffe_ids": ids,
        }), flush=True)
    """
)


def _attack(live_ca: LiveCa, socket_dir: Path, then: str, selectors: Sequence[str]) -> list[Any]:
    """Run the forking caller against an in-process agent; its child's JSON reports."""
    socket_dir.chmod(0o755)  # the attacker may be another uid: let it reach the socket
    first = entry(selectors=list(selectors))

    async def main() -> list[Any]:
        errors = (socket_dir / "attacker.err").open("wb")
        upstream = make_upstream(live_ca, [first])
        async with running_agent(upstream, socket_dir) as agent:
            process = subprocess.Popen(
                [PYTHON, "-c", _FORKER, str(agent.config.socket_path), then,
                 method_path("FetchX509SVID")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{SITE_PACKAGES}"},
                user=ATTACKER_UID,
                group=ATTACKER_UID,
                extra_groups=[] if ATTACKER_UID is not None else None,
            )  # fmt: skip
            assert process.stdin is not None and process.stdout is not None
            stdout = process.stdout

            async def report() -> Any:
                line = await asyncio.wait_for(asyncio.to_thread(stdout.readline), 30)
                if not line:
                    errors.flush()
                    said = (socket_dir / "attacker.err").read_text(errors="replace")
                    raise AssertionError(f"the attacker's child said nothing; stderr:\n{said}")
                return json.loads(line)

            reports = []
            try:
                for _ in range(600):  # the agent has accepted (and attested) the connection
                    if agent.front.accepted:
                        break
                    await asyncio.sleep(0.05)
                assert agent.front.accepted == 1
                if then.startswith("stream-"):
                    reports.append(await report())  # served before the parent execs
                process.stdin.write(b"go\n")
                process.stdin.flush()
                if then.startswith("stream-"):
                    target = then.removeprefix("stream-exec:")
                    for _ in range(600):
                        if os.path.realpath(f"/proc/{process.pid}/exe") == target:
                            break
                        await asyncio.sleep(0.05)
                    # News for the stream: an entry for someone else, so the agent re-sends.
                    other = entry("spiffe://example.org/other", ["unix:uid:4242424"])
                    upstream.set_entries([first, other])
                    agent.rotator.poke()
                reports.append(await report())
            finally:
                process.kill()  # the parent, sleeping or exec'd; the child has printed
                process.wait(10)
                errors.close()
            return reports

    return run(main())


def test_a_child_holding_the_connection_does_not_get_the_svid_of_the_binary_its_parent_execs(
    live_ca: LiveCa, short_dir: Path
) -> None:
    (report,) = _attack(live_ca, short_dir, f"exec:{SLEEP}", [f"unix:path:{SLEEP}"])
    assert report["parent_exe"] == SLEEP  # the pid that connected now runs the entitled binary
    assert report["spiffe_ids"] == []
    assert report["status"] == "7"  # PERMISSION_DENIED


def test_a_child_holding_the_connection_of_a_parent_that_exited_is_refused(
    live_ca: LiveCa, short_dir: Path
) -> None:
    # The parent stays a zombie (its pid is not reaped until the test waits): /proc still
    # knows the pid, but it is not the process that connected any more.
    uid = os.getuid() if ATTACKER_UID is None else ATTACKER_UID
    (report,) = _attack(live_ca, short_dir, "exit", [f"unix:uid:{uid}"])
    assert report["parent_exe"] is None
    assert report["spiffe_ids"] == []
    assert report["status"] == "7"


def test_a_forked_child_of_a_caller_that_still_runs_its_program_gets_the_svid(
    live_ca: LiveCa, short_dir: Path
) -> None:
    # Pre-fork servers share one connection among workers: legitimate, same program.
    (report,) = _attack(live_ca, short_dir, "stay", [f"unix:path:{PYTHON}"])
    assert report["parent_exe"] == PYTHON
    assert report["spiffe_ids"] == [WEB]


def test_an_open_svid_stream_ends_when_the_process_that_opened_it_executes_another_program(
    live_ca: LiveCa, short_dir: Path
) -> None:
    first, after = _attack(live_ca, short_dir, f"stream-exec:{SLEEP}", [f"unix:path:{PYTHON}"])
    assert first["spiffe_ids"] == [WEB]  # legitimately its own while the caller ran Python
    assert after["parent_exe"] == SLEEP
    assert after["spiffe_ids"] == []  # no rotation, no new SVID for whatever it runs now
    assert after["status"] == "7"
