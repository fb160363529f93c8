"""Child processes of ``trellis up``: started, watched, stopped, never left behind.

Each child runs in a session of its own, so a Ctrl-C at the terminal reaches only
``trellis up``, which then stops the children in reverse start order (the load generator
before the sidecars, the agent before the CA) with SIGTERM, then SIGKILL after a grace
period. Each child also asks the kernel for SIGKILL should its parent die first
(``PR_SET_PDEATHSIG``), so even a ``kill -9`` of ``trellis up`` leaves no orphan serving on
a port. Standard output is read line by line on a thread (the ``ready`` JSON lines);
standard error goes to a log file in the run directory, whose tail is shown when a child
fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Child", "StartupError", "free_ports", "spawn"]

_PR_SET_PDEATHSIG = 1
_libc: Any = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class StartupError(Exception):
    """A child did not come up; the message says which and shows its last log lines."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        *,
        executable: Path | None = None,
        user: int | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._log: IO[bytes] = log_path.open("wb")
        self.process = subprocess.Popen(
            [str(executable or sys.executable), "-m", "trellis", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=dict(env),
            start_new_session=True,
            # A workload's own uid and gid, and no supplementary groups of ours.
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
            # Only prctl(2) runs in the child before exec, after the uid change: changing
            # the uid clears the parent-death signal (prctl(2), PR_SET_PDEATHSIG).
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for raw in stdout:
            with contextlib.suppress(ValueError):
                doc = json.loads(raw)
                if isinstance(doc, dict):
                    self.events.put(doc)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def failure(self, what: str) -> StartupError:
        code = self.process.poll()
        state = f"exited with status {code}" if code is not None else "still running"
        tail = self.log_tail()
        return StartupError(f"{self.name} {what} ({state})" + (f":\n{tail}" if tail else ""))

    def wait_event(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.failure(f"did not report {event!r} within {timeout:.0f}s")
            try:
                doc = self.events.get(timeout=min(left, 0.1))
            except queue.Empty:
                if not self.alive() and not self._reader.is_alive() and self.events.empty():
                    raise self.failure(f"stopped before reporting {event!r}") from None
                continue
            if doc.get("event") == event:
                return doc

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.failure(f"stopped before {what}")
            if check():
                return
            time.sleep(0.05)
        raise self.failure(f"not {what} within {timeout:.0f}s")

    def stop(self, grace: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        process = self.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        self._reader.join(1.0)
        if process.stdout is not None:
            process.stdout.close()
        self._log.close()
        return process.returncode


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    executable: Path | None = None,
    user: int | None = None,
) -> Child:
    return Child(
        name,
        argv,
        log_dir / f"{name}.log",
        {**os.environ, **(env or {})},
        executable=executable,
        user=user,
    )


def port_open(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def free_ports(count: int, base: int = 0, host: str = "127.0.0.1") -> list[int]:
    """``count`` ports: ``base``, ``base+1``, ... if ``base``, else free ones chosen below
    the kernel's ephemeral range.

    Why below it: a port is released before the child binds it, and inside the ephemeral
    range any process's outgoing connection may take it as its source port in between (a
    busy machine makes thousands). Below the range only another listener can, and the
    ports are drawn at random. The child that still loses says so and ``trellis up`` stops.
    """
    if base:
        return list(range(base, base + count))
    low, _high = _ephemeral_range()
    candidates = list(range(_LISTEN_FLOOR, low))
    if len(candidates) < count * 4:
        candidates = []  # an unusual range: let the kernel pick
    random.shuffle(candidates)
    sockets: list[socket.socket] = []
    try:
        for port in candidates[:_MAX_TRIES]:
            if len(sockets) == count:
                break
            s = socket.socket()
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        while len(sockets) < count:
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


_LISTEN_FLOOR = 20_000  # above the ports Trellis and its tests fix (15000-15020, 18080...)
_MAX_TRIES = 512


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's source-port range for outgoing connections (Linux's default if the
    file cannot be read)."""
    try:
        low, high = (
            int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        )
    except (OSError, ValueError):
        return 32768, 60999
    return low, high
