"""Errors every layer raises and the command line turns into one line."""

from __future__ import annotations

__all__ = ["CliError", "FieldError"]


class CliError(Exception):
    """A command failed for a reason the user can act on; the message is the whole story."""


class FieldError(ValueError):
    """A value in a document is wrong: ``field`` says where (a JSON path such as
    ``spec.selector.matchLabels``), ``reason`` which rule it breaks."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
