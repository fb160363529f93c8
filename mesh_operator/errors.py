"""Errors that carry their meaning: which field is wrong (``SpecError``) and whether
retrying can help (``TemporaryOperatorError`` vs ``PermanentOperatorError``).

The sans-I/O core raises only these; the kopf shell translates the last two into
``kopf.TemporaryError`` / ``kopf.PermanentError`` so the core never imports kopf.
"""

from __future__ import annotations

__all__ = ["PermanentOperatorError", "SpecError", "TemporaryOperatorError"]


class SpecError(ValueError):
    """A custom resource's spec is invalid; ``field`` is its JSON path, ``reason`` the rule."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class TemporaryOperatorError(Exception):
    """Retrying later can succeed (API server unreachable, conflict, not yet scheduled)."""

    def __init__(self, message: str, *, delay: float = 10.0) -> None:
        super().__init__(message)
        self.delay = delay


class PermanentOperatorError(Exception):
    """Retrying cannot succeed until a human changes something; the message says what."""
