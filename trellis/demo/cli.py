"""``trellis demo echo`` and ``trellis demo load``: the services ``trellis up`` runs.

``echo`` prints ``{"event": "ready", "listen": "HOST:PORT"}`` on stdout once bound and
serves until SIGTERM/SIGINT. ``load`` prints one JSON report on stdout when its
``--duration`` ends (or when stopped by SIGTERM/SIGINT); with ``--metrics-listen`` it also
serves live counters on ``/metrics`` and prints a ready line first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from typing import Any

from core.cliargs import seconds as _seconds
from core.errors import CliError
from core.logs import add_logging_arguments, configure_logging
from trellis.demo.echo import start_echo_server
from trellis.demo.load import LoadConfig, LoadGenerator, start_metrics_server

__all__ = ["register"]

_log = logging.getLogger("trellis.demo")


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return int(text)


def _size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2}
    number = text.rstrip("kKmMiIbB")
    unit = text[len(number) :].lower()
    if not number.isdigit() or unit not in units:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1024, 1KiB or 4MiB")
    return int(number) * units[unit]


def register(commands: Any) -> None:
    demo = commands.add_parser("demo", help="demo services: HTTP echo server, load generator")
    sub = demo.add_subparsers(dest="demo_command", metavar="DEMO_COMMAND", required=True)

    p = sub.add_parser("echo", help="HTTP/1.1 echo server (keep-alive)")
    p.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="address to serve on",
    )
    add_logging_arguments(p)
    p.set_defaults(handler=cmd_echo)

    p = sub.add_parser("load", help="HTTP/1.1 load generator (open loop, keep-alive)")
    p.add_argument(
        "--target", type=_address, required=True, metavar="HOST:PORT", help="the echo server"
    )
    p.add_argument("--rate", type=_non_negative, default=100.0, help="requests/s (0: max)")
    p.add_argument("--duration", type=_seconds, help="e.g. 10s (default: until stopped)")
    p.add_argument("--size", type=_size, default=1024, help="request body (echoed back)")
    p.add_argument("--connections", type=_count, default=8, help="keep-alive connections")
    p.add_argument("--timeout", type=_seconds, default="5s", help="per request")
    p.add_argument(
        "--metrics-listen",
        type=_address,
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here (default: off)",
    )
    add_logging_arguments(p)
    p.set_defaults(handler=cmd_load)


async def _until_signalled(work: asyncio.Future[Any] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    pending = {waiter} if work is None else {waiter, work}
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def cmd_echo(args: argparse.Namespace) -> int:
    configure_logging(args)

    async def main() -> None:
        server = await start_echo_server(*args.listen)
        listen = f"{args.listen[0]}:{server.port}"
        print(json.dumps({"event": "ready", "listen": listen}))
        sys.stdout.flush()
        _log.info("echo server listening", extra={"fields": {"listen": listen}})
        await _until_signalled()
        await server.close()
        stats = server.stats
        _log.info(
            "echo server stopped",
            extra={
                "fields": {
                    "requests": stats.requests,
                    "refused": stats.errors,
                    "connections": stats.connections,
                }
            },
        )

    try:
        asyncio.run(main())
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}") from exc
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    configure_logging(args)
    try:
        config = LoadConfig(
            host=args.target[0],
            port=args.target[1],
            rate=args.rate,
            duration=args.duration,
            size=args.size,
            connections=args.connections,
            timeout=args.timeout,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc

    async def main() -> dict[str, Any]:
        generator = LoadGenerator(config)
        server = None
        if args.metrics_listen is not None:
            host, port = args.metrics_listen
            server = await start_metrics_server(host, port, generator.stats.exposition)
            bound = int(server.sockets[0].getsockname()[1])
            print(json.dumps({"event": "ready", "metrics_listen": f"{host}:{bound}"}))
            sys.stdout.flush()
        run = asyncio.ensure_future(generator.run())
        await _until_signalled(run)
        generator.stop()
        report = await run
        if server is not None:
            server.close()
        return report.as_dict()

    try:
        report = asyncio.run(main())
    except OSError as exc:
        raise CliError(f"cannot start the load generator: {exc}") from exc
    fields = {k: report[k] for k in ("sent", "ok", "errors", "errors_by_kind", "elapsed_s")}
    # Failed requests are what someone watching the demo's logs needs to see at WARNING.
    level = logging.WARNING if report["errors"] else logging.INFO
    _log.log(level, "load generator stopped", extra={"fields": fields})
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps({"event": "report", **report}))
    return 0
