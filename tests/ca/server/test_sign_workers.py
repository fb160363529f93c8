"""`trellis ca serve --sign-workers`: the automatic default, refused values, and that the
signing worker processes never outlive the server (SIGTERM, SIGINT or SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ca.server import signer
from ca.server.signer import (
    MAX_SIGN_WORKERS,
    ProcessPoolSigner,
    auto_sign_workers,
    cgroup_cpu_limit,
    sign_workers_for,
)

from .test_serve_process import listen_args, serve, trellis


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a dead orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def workers_of(pid: int) -> list[int]:
    return [p for p in descendants(pid) if "multiprocessing.spawn" in cmdline(p)]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:  # do not leak what a failing test found
        if running(pid):
            os.kill(pid, signal.SIGKILL)


def test_auto_is_one_worker_per_usable_core_when_there_are_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(signer, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(signer.os, "sched_getaffinity", lambda pid: {0})
    assert auto_sign_workers() == 0
    monkeypatch.setattr(signer.os, "sched_getaffinity", lambda pid: {0, 1})
    assert auto_sign_workers() == 2
    monkeypatch.setattr(signer.os, "sched_getaffinity", lambda pid: set(range(500)))
    assert auto_sign_workers() == MAX_SIGN_WORKERS
    monkeypatch.setattr(signer, "cgroup_cpu_limit", lambda: 2.0)  # a pod's limits.cpu: "2"
    assert auto_sign_workers() == 2


@pytest.mark.parametrize(
    ("cores", "limit", "workers"),
    [(64, 2.0, 2), (64, 1.5, 2), (64, 1.0, 0), (64, 0.1, 0), (4, 16.0, 4), (1, None, 0)],
)
def test_a_cgroup_cpu_quota_caps_the_automatic_worker_count(
    cores: int, limit: float | None, workers: int
) -> None:
    assert sign_workers_for(cores, limit) == workers


def _cgroup(tmp_path: Path, own: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(f"0::{own}\n")
    return root, self_cgroup


@pytest.mark.parametrize(
    ("own", "files", "limit"),
    [
        ("/", {"cpu.max": "200000 100000\n"}, 2.0),  # inside a cgroup namespace
        ("/kubepods/pod1/ctr", {"kubepods/pod1/ctr/cpu.max": "150000 100000\n"}, 1.5),
        ("/", {"cpu.max": "max 100000\n"}, None),
        ("/", {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ("/", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ("/", {}, None),
        ("/", {"cpu.max": "lots\n"}, None),
        ("/", {"cpu.max": "100000 0\n"}, None),
        ("/", {"cpu.max": "abc def\n"}, None),
    ],
)
def test_the_cgroup_cpu_quota_is_read_from_v2_or_v1_and_nonsense_means_no_limit(
    tmp_path: Path, own: str, files: dict[str, str], limit: float | None
) -> None:
    root, self_cgroup = _cgroup(tmp_path, own, files)
    assert cgroup_cpu_limit(root, self_cgroup) == limit


@pytest.mark.parametrize("bad", ["-1", "two", "1.5", "", str(MAX_SIGN_WORKERS + 1), "0x2"])
def test_a_bad_worker_count_is_one_clear_error(ca_dir: Path, bad: str) -> None:
    result = trellis("ca", "serve", *listen_args(ca_dir, "--sign-workers", bad), check=False)
    assert result.returncode == 2
    assert "is not 'auto' or a number of worker processes from 0 to 64" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_pool_of_an_impossible_size_is_refused_in_the_library_too(tmp_path: Path) -> None:
    for bad in (0, MAX_SIGN_WORKERS + 1):
        with pytest.raises(ValueError, match="signing workers must number 1 to 64"):
            ProcessPoolSigner(tmp_path, "west", bad)


def test_on_one_core_the_default_signs_on_the_event_loop(ca_dir: Path) -> None:
    def one_core() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    process = subprocess.Popen(
        [sys.executable, "-m", "trellis", "ca", "serve", *listen_args(ca_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=one_core,
    )
    try:
        assert process.stdout is not None and process.stdout.readline()  # ready
        found = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert '"sign_workers": 0' in (process.stderr.read() if process.stderr else "")
    assert [p for p in found if "multiprocessing.spawn" in cmdline(p)] == []


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_workers_stop_with_the_server_on_an_orderly_stop(ca_dir: Path, how: int) -> None:
    with serve(*listen_args(ca_dir, "--sign-workers", "2")) as (process, _, _):
        workers = workers_of(process.pid)
        every = descendants(process.pid)
        try:
            assert len(workers) == 2
            process.send_signal(how)
            assert process.wait(timeout=30) == 0
            wait_until(lambda: not any(running(p) for p in every), "workers gone")
        finally:
            kill_leftovers(every)
        stderr = process.stderr.read() if process.stderr else ""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_workers_do_not_outlive_a_killed_server(ca_dir: Path) -> None:
    with serve(*listen_args(ca_dir, "--sign-workers", "2")) as (process, _, _):
        workers = workers_of(process.pid)
        every = descendants(process.pid)
        try:
            assert len(workers) == 2
            process.kill()  # SIGKILL: no shutdown code runs in the server
            process.wait(timeout=30)
            wait_until(lambda: not any(running(p) for p in every), "workers gone")
        finally:
            kill_leftovers(every)


def test_ctrl_c_in_a_terminal_stops_server_and_workers_once_without_tracebacks(
    ca_dir: Path,
) -> None:
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group.
    process = subprocess.Popen(
        [sys.executable, "-m", "trellis", "ca", "serve",
         *listen_args(ca_dir, "--sign-workers", "2")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    every: list[int] = []
    try:
        assert process.stdout is not None and process.stdout.readline()  # ready
        every = descendants(process.pid)
        assert len(workers_of(process.pid)) == 2
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
        wait_until(lambda: not any(running(p) for p in every), "workers gone")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        kill_leftovers(every)
    stderr = process.stderr.read() if process.stderr else ""
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.count('"event": "ca-server-stopped"') == 1


def test_a_dead_worker_fails_its_calls_and_the_survivor_signs_on(ca_dir: Path) -> None:
    """A worker killed mid-batch fails the batch it held with SignerUnavailable (never a
    hang); the next batches go to the other worker; with none left, calls fail at once.
    A CA directory that cannot be loaded fails start(), leaving no worker behind."""
    import asyncio

    from cryptography.hazmat.primitives.asymmetric import ec

    from ca.api import build_csr
    from ca.server.signer import Signed, SignerUnavailable, SignFailure, SignRequest

    from .conftest import CLUSTER

    web = "spiffe://example.org/ns/default/sa/web"

    def request(in_csr: str | None = None) -> SignRequest:
        return SignRequest(build_csr(ec.generate_private_key(ec.SECP256R1()), in_csr), web, 600)

    async def scenario() -> None:
        pool = ProcessPoolSigner(ca_dir, CLUSTER, 2)
        await pool.start()
        try:
            now = time.time()
            batch = [request() for _ in range(40)]
            first, second = pool._pool
            # Stopped first, so it cannot answer its chunk before the kill lands: on a busy
            # machine this process can be descheduled long enough for 20 signatures.
            os.kill(first.process.pid, signal.SIGSTOP)
            signing = asyncio.ensure_future(pool.sign(batch, now))
            await asyncio.sleep(0)  # both chunks are on their way
            os.kill(first.process.pid, signal.SIGKILL)
            with pytest.raises(SignerUnavailable):
                await asyncio.wait_for(signing, 30)
            results = await asyncio.wait_for(pool.sign(batch[:10], now), 30)
            assert len(results) == 10 and all(isinstance(r, Signed) for r in results)
            stolen = request("spiffe://example.org/ns/default/sa/db")
            refused = await pool.sign([stolen] * 3, now)
            assert [type(r) for r in refused] == [SignFailure]
            os.kill(second.process.pid, signal.SIGKILL)
            second.process.join(10)
            with pytest.raises(SignerUnavailable):
                await asyncio.wait_for(pool.sign(batch[:10], now), 30)
        finally:
            await pool.close()
        assert not any(w.process.is_alive() for w in pool._pool)

        broken = ProcessPoolSigner(ca_dir, "no-such-cluster", 1)
        with pytest.raises(SignerUnavailable, match="cannot load the intermediate"):
            await asyncio.wait_for(broken.start(), 60)
        assert not any(w.process.is_alive() for w in broken._pool)

    asyncio.run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_answers_larger_than_the_pipe_arrive_whole_on_either_event_loop(
    ca_dir: Path, loop: str
) -> None:
    """`ca serve` runs on uvloop, which makes every fd it watches non-blocking: an answer
    bigger than the socket buffer (300 chains, ~400 KiB) arrives in pieces and a request
    may not fit the pipe at once. Both ends must reassemble, on asyncio's loop as well."""
    import asyncio

    import uvloop
    from cryptography.hazmat.primitives.asymmetric import ec

    from ca.api import build_csr
    from ca.server.signer import Signed, SignRequest

    from .conftest import CLUSTER

    web = "spiffe://example.org/ns/default/sa/web"
    key = ec.generate_private_key(ec.SECP256R1())
    # Long DNS names make each request and each answer big.
    names = tuple(f"n{i}-{'x' * 50}.default.svc" for i in range(12))
    batch = [SignRequest(build_csr(key), web, 600, names) for _ in range(300)]

    async def scenario() -> None:
        pool = ProcessPoolSigner(ca_dir, CLUSTER, 1)
        await pool.start()
        try:
            results = await asyncio.wait_for(pool.sign(batch, time.time()), 60)
            again = await asyncio.wait_for(pool.sign(batch[:5], time.time()), 60)
        finally:
            await pool.close()
        assert len(results) == 300 and all(isinstance(r, Signed) for r in results)
        assert sum(len(d) for r in results for d in r.chain_der) > 300_000  # type: ignore[union-attr]
        assert len(again) == 5

    if loop == "uvloop":
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())


def test_the_parent_side_framing_matches_multiprocessing_and_waits_for_whole_messages() -> None:
    from multiprocessing.connection import Pipe

    ours, theirs = Pipe(duplex=True)
    try:
        message = ("ok", [(True, (b"\x01" * 70_000,), 1.5, 0.001)])
        theirs.send(message)  # the worker's end: multiprocessing's own framing
        raw = bytearray()
        while len(raw) < 70_000:
            raw += os.read(ours.fileno(), 1 << 16)
        buffer = bytearray()
        got = []
        for i in range(0, len(raw), 999):  # arrives in pieces
            buffer += raw[i : i + 999]
            got += list(signer._unframe(buffer))
        assert got == [message] and not buffer
        framed = signer._frame(([("csr", "id", 60.0, ())], 1.0))
        os.write(ours.fileno(), framed)
        assert theirs.recv() == ([("csr", "id", 60.0, ())], 1.0)
        long_form = signer._HEADER.pack(-1) + signer._LONG_HEADER.pack(3) + b"abc"
        assert list(signer._unframe(bytearray(long_form[:10]))) == []
    finally:
        ours.close()
        theirs.close()
