"""``trellis up``: start the mesh, show its live status, tear it all down on the way out."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ca.cliargs import trust_domain as _trust_domain
from ca.spiffeid import TrustDomain
from core.durations import parse_duration
from core.errors import CliError
from core.logs import LOG_FORMATS, LOG_LEVELS, log_format_for
from trellis.up.mesh import Mesh, MeshConfig, StartupError
from trellis.up.status import Snapshot, collect, render

__all__ = ["register"]

MIN_SVID_TTL = dt.timedelta(seconds=10)
MAX_SVID_TTL = dt.timedelta(hours=24)
_PORTS_USED = 11
_CLEAR = "\x1b[H\x1b[J"


def _duration(text: str) -> dt.timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _svid_ttl(text: str) -> dt.timedelta:
    ttl = _duration(text)
    if not MIN_SVID_TTL <= ttl <= MAX_SVID_TTL:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 10s and 24h")
    return ttl


def _port_base(text: str) -> int:
    if not text.isdigit() or not (1024 <= int(text) <= 65535 - _PORTS_USED or int(text) == 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be 0 (ports the kernel picks) or 1024..{65535 - _PORTS_USED}"
            f" (this port and the next {_PORTS_USED - 1})"
        )
    return int(text)


def _loopback(text: str) -> str:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from exc
    if not address.is_loopback:
        # The echo server and every admin endpoint speak plaintext: keep them on loopback.
        raise argparse.ArgumentTypeError(f"{text!r} is not a loopback address (127.0.0.0/8)")
    return text


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not 0 < value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} must be a request rate in 0..100000 (>0)")
    return value


def _small_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number in 1..1000")
    return int(text)


def _size(text: str) -> int:
    if not text.isdigit() or int(text) > 1024 * 1024:
        raise argparse.ArgumentTypeError(f"{text!r} must be a byte count in 0..1048576")
    return int(text)


def _interval(text: str) -> float:
    seconds = _duration(text).total_seconds()
    if seconds < 0.2:
        raise argparse.ArgumentTypeError(f"{text!r} is too short (at least 200ms)")
    return seconds


def register(commands: Any) -> None:
    p = commands.add_parser(
        "up",
        help="run the whole mesh on this machine (CA, agent, two sidecars, demo traffic)",
        description="Start an ephemeral CA, `trellis ca serve`, `trellis agent`, an echo "
        "server and a load generator each behind its own sidecar, and show a live status "
        "until Ctrl-C or --duration. Leaves no process, socket or file behind.",
    )
    p.add_argument("--duration", type=_duration, help="stop after this long (e.g. 30s)")
    p.add_argument(
        "--svid-ttl", type=_svid_ttl, default=dt.timedelta(minutes=1),
        help="workload SVID TTL (default 1m: a rotation every ~30s)",
    )  # fmt: skip
    p.add_argument("--base-dir", type=Path, help="where the private run directory goes")
    p.add_argument(
        "--port-base", type=_port_base, default=0,
        help=f"use ports BASE..BASE+{_PORTS_USED - 1} (default: ports the kernel picks)",
    )  # fmt: skip
    p.add_argument("--host", type=_loopback, default="127.0.0.1", help="loopback address to bind")
    p.add_argument(
        "--trust-domain",
        type=_trust_domain,
        default=TrustDomain("example.org"),
        help="the ephemeral CA's trust domain",
    )
    p.add_argument("--rate", type=_rate, default=50.0, help="demo requests/s (default 50)")
    p.add_argument("--connections", type=_small_count, default=4, help="load generator's")
    p.add_argument("--size", type=_size, default=1024, help="request body bytes (echoed)")
    p.add_argument("--interval", type=_interval, default=1.0, help="status refresh (default 1s)")
    p.add_argument(
        "--pq-signatures",
        action="store_true",
        help="an ML-DSA-65 root, intermediate and workload SVIDs (FIPS 204) instead of ECDSA",
    )
    # Not add_logging_arguments: these reach only the children, whose logs are files, and
    # the help must say so (trellis up's own start-up and status lines are not log records).
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="format of the children's logs (CA, agent, sidecars, demo services) in the run"
        " directory's logs/: json, text, or auto (the default): text when this command's"
        " standard error is a terminal, else json",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="least severe level the children (CA, agent, sidecars, demo services) write to"
        " their logs in the run directory's logs/ (default info); what trellis up itself"
        " prints does not change",
    )
    p.set_defaults(handler=cmd_up)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    if args.base_dir is not None and not args.base_dir.is_dir():
        raise CliError(f"--base-dir {args.base_dir} is not a directory")
    # auto: as this command's own terminal suggests, though the children write to files.
    log_format = log_format_for(args.log_format, sys.stderr)
    config = MeshConfig(
        trust_domain=args.trust_domain,
        svid_ttl=args.svid_ttl,
        base_dir=args.base_dir,
        port_base=args.port_base,
        host=args.host,
        rate=args.rate,
        connections=args.connections,
        size=args.size,
        log_args=("--log-format", log_format, "--log-level", args.log_level),
        pq_signatures=args.pq_signatures,
    )
    mesh = Mesh(config, progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    live = sys.stdout.isatty()
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    error: CliError | None = None
    last: str | None = None
    try:
        print(
            "trellis up: starting the CA, agent, echo server, sidecars and load...", file=sys.stderr
        )
        mesh.start()
        last = _run(mesh, args.duration, args.interval, live)
    except KeyboardInterrupt:
        pass
    except StartupError as exc:
        error = CliError(str(exc))
    finally:
        load = mesh.children.get("load")
        # Ctrl-C pressed again during the shutdown must not skip the cleanup.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            mesh.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    if error is not None:
        raise error
    if live and last is not None:
        print(_CLEAR + last)
    report = _final_report(load)
    if report:
        print(report)
    removed = f"; removed {mesh.removed}" if mesh.removed is not None else ""
    print(f"stopped {len(mesh.stopped)} processes{removed}")
    return 0


def _run(mesh: Mesh, duration: dt.timedelta | None, interval: float, live: bool) -> str:
    view = mesh.status_view()
    if duration is not None:
        view = dataclasses.replace(view, stop_after=duration.total_seconds())
    started = time.monotonic()
    end = started + duration.total_seconds() if duration is not None else float("inf")
    before: Snapshot | None = None
    text = ""
    while True:
        now = time.monotonic()
        snapshot = collect(view, time.time(), now - started)
        text = render(view, snapshot, before)
        before = snapshot
        sys.stdout.write((_CLEAR + text + "\n") if live else (text + "\n\n"))
        sys.stdout.flush()
        failed = mesh.failed()
        if failed is not None:
            raise failed.failure("stopped unexpectedly")
        left = end - time.monotonic()
        if left <= 0:
            return text
        time.sleep(min(interval, left))


def _final_report(load: Any) -> str:
    if load is None:
        return ""
    report: dict[str, Any] | None = None
    with contextlib.suppress(Exception):
        while not load.events.empty():
            event = load.events.get_nowait()
            if event.get("event") == "report":
                report = event
    if report is None:
        return ""
    latency = report.get("latency_ms", {})
    return (
        f"load generator: {report.get('ok', 0):,} requests ok, {report.get('errors', 0):,} errors"
        f" in {report.get('elapsed_s', 0):.0f}s; latency p50 {latency.get('p50', '-')} ms,"
        f" p99 {latency.get('p99', '-')} ms"
    )
