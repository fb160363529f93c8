"""``trellis``: dispatches to the subcommands each package registers.

Every subcommand reports a refused input as one line on stderr and a non-zero exit
(1 for a refused operation, 2 for a malformed command line), never a traceback. Every
flag has help, and the help shows its default (``TrellisParser``); ``--version`` names the
build (``core.buildinfo``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import enum
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.buildinfo import describe
from core.durations import format_duration
from core.errors import CliError, one_line

__all__ = ["TrellisParser", "build_parser", "main", "show_default"]


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
    "completion": "trellis.completion",
    "check": "trellis.diagnose.check",
    "proxy": "trellis.diagnose.proxy",
    "policy": "trellis.diagnose.policy_explain",
    "ech": "trellis.ech_cli",
}


def show_default(value: Any) -> str | None:
    """A flag's default as the user would type it (``1h``, ``p256``, ``127.0.0.1:8089``),
    or None when there is nothing worth showing (no default, off, an empty list)."""
    if value is None or value is False or value is argparse.SUPPRESS:
        return None
    if isinstance(value, (list, tuple, set, frozenset)) and not value:
        return None
    if isinstance(value, dt.timedelta):
        return format_duration(value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        return f"{value[0]}:{value[1]}"  # a (host, port) address
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: …)`` to a flag's help unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "default" in text or text == argparse.SUPPRESS:
            return text
        shown = show_default(action.default)
        if shown is None or action.nargs == 0:  # store_true/store_const: presence is the value
            return text
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class TrellisParser(argparse.ArgumentParser):
    """Every parser of the tree: subcommands' parsers are made of the same class
    (``add_subparsers`` uses the class of the parser it is called on), so the help of every
    flag of every subcommand shows its default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or only for ``command`` when it is a known one."""
    parser = TrellisParser(prog="trellis", description="Trellis service mesh")
    parser.add_argument(
        "--version", action="version", version=describe(), help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = (
        [_COMMAND_MODULES[command]] if command in _COMMAND_MODULES else _COMMAND_MODULES.values()
    )
    for module in dict.fromkeys(wanted):
        importlib.import_module(module).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments == ["--version"]:
        print(describe())  # without importing every command's package
        return 0
    parser = build_parser(arguments[0] if arguments else None)
    args = parser.parse_args(arguments)
    handler: Handler = args.handler
    try:
        return handler(args)
    except CliError as exc:
        print(f"trellis: error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
