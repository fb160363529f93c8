"""``trellis``: dispatches to the subcommands each package registers.

Every subcommand reports a refused input as one line on stderr and a non-zero exit
(1 for a refused operation, 2 for a malformed command line), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["CliError", "main"]


class CliError(Exception):
    """A command failed for a reason the user can act on; the message is the whole story."""


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from ca import cli as ca_cli

    parser = argparse.ArgumentParser(prog="trellis", description="Trellis service mesh")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    ca_cli.register(commands)
    from ca.agent import cli as agent_cli

    agent_cli.register(commands)
    from mesh_operator import cli as operator_cli

    operator_cli.register(commands)
    from sidecar import debug_cli

    debug_cli.register(commands)
    from trellis.demo import cli as demo_cli

    demo_cli.register(commands)
    from sidecar import cli as sidecar_cli

    sidecar_cli.register(commands)
    from trellis.up import cli as up_cli

    up_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
