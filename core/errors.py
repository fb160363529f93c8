"""Errors every layer raises and the command line turns into one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import yaml

__all__ = ["CliError", "FieldError", "one_line", "yaml_problem"]


class CliError(Exception):
    """A command failed for a reason the user can act on; the message is the whole story."""


class FieldError(ValueError):
    """A value in a document is wrong: ``field`` says where (a JSON path such as
    ``spec.selector.matchLabels``), ``reason`` which rule it breaks."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line, ``line 2, column 1: expected ..., but found ...``: its
    ``str()`` spans four lines (the context, the problem, the position and a caret)."""
    import yaml

    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f" ({exc.context})" if exc.context else ""
        return f"{where}{exc.problem}{context}"
    return one_line(str(exc))


def one_line(text: str) -> str:
    """``text`` with its lines joined, for a message that must stay on one line of stderr
    (a library's multi-line message would otherwise end up in it as is)."""
    parts = (line.strip() for line in text.splitlines())
    return " ".join(part for part in parts if part and part.strip("^ ") != "")
