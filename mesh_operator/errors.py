"""Errors that carry their meaning: which field is wrong (``SpecError``) and whether
retrying can help (``TemporaryOperatorError`` vs ``PermanentOperatorError``).

The sans-I/O core raises only these; the kopf shell translates the last two into
``kopf.TemporaryError`` / ``kopf.PermanentError`` so the core never imports kopf.
"""

from __future__ import annotations

from core.errors import FieldError

__all__ = ["PermanentOperatorError", "SpecError", "TemporaryOperatorError"]


# A custom resource's spec is invalid; ``field`` is its JSON path, ``reason`` the rule. The
# same type as the label grammar's errors (``core.labels``), so one ``except`` covers both.
SpecError = FieldError


class TemporaryOperatorError(Exception):
    """Retrying later can succeed (API server unreachable, conflict, not yet scheduled)."""

    def __init__(self, message: str, *, delay: float = 10.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentOperatorError(Exception):
    """Retrying cannot succeed until a human changes something; the message says what."""
