"""``trellis``: dispatches to the subcommands each package registers.

Every subcommand reports a refused input as one line on stderr and a non-zero exit
(1 for a refused operation, 2 for a malformed command line), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from core.errors import CliError

__all__ = ["main"]


Handler = Callable[[argparse.Namespace], int]


# Each top-level command lives with its package; a command line that names one loads only
# that package's CLI (the others pull in grpc, kopf, aiohttp, ... and cost a second of start-up).
_COMMAND_MODULES: dict[str, str] = {
    "ca": "ca.cli",
    "agent": "ca.agent.cli",
    "svid": "ca.agent.cli",
    "sidecar": "sidecar.cli",
    "debug": "sidecar.debug_cli",
    "operator": "mesh_operator.cli",
    "up": "trellis.up.cli",
    "demo": "trellis.demo.cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or only for ``command`` when it is a known one."""
    parser = argparse.ArgumentParser(prog="trellis", description="Trellis service mesh")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = (
        [_COMMAND_MODULES[command]] if command in _COMMAND_MODULES else _COMMAND_MODULES.values()
    )
    for module in dict.fromkeys(wanted):
        importlib.import_module(module).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(arguments[0] if arguments else None)
    args = parser.parse_args(arguments)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CliError as exc:
        print(f"trellis: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
