"""``-o text|json|yaml`` for commands that report: one document, three renderings.

A command builds one plain document (dicts, lists, strings, numbers, booleans, None) and
a function that renders it for people; ``emit`` prints whichever the user asked for. The
JSON and YAML are the same document, so a script may switch between them freely, and
neither ever carries the text rendering's abbreviations.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import yaml

__all__ = ["FORMATS", "add_output_argument", "emit"]

FORMATS = ("text", "json", "yaml")


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="text",
        help="text for people (the default), or json / yaml for scripts",
    )


def emit(
    document: Any,
    output: str,
    text: Callable[[Any], Iterable[str]],
    stream: TextIO | None = None,
) -> None:
    """Print ``document`` as JSON, YAML, or the lines ``text`` makes of it."""
    out = stream if stream is not None else sys.stdout
    if output == "json":
        out.write(json.dumps(document, indent=2, sort_keys=False) + "\n")
    elif output == "yaml":
        out.write(yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    else:
        for line in text(document):
            out.write(line + "\n")
    out.flush()
