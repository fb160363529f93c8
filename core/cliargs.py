"""Argument types for the command lines: a value parser's refusal becomes argparse's own
one-line error (``trellis ca serve: error: argument --ttl: ...``), never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from core.durations import parse_duration
from core.endpoints import parse_unix_socket

__all__ = ["argument_type", "duration", "seconds", "unix_socket"]

T = TypeVar("T")


def argument_type(parse: Callable[[str], T], *refusals: type[Exception]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type=``: the exceptions in ``refusals`` (``ValueError``
    when none are named) are reported with their own message."""
    caught = refusals or (ValueError,)

    def convert(text: str) -> T:
        try:
            return parse(text)
        except caught as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _seconds(text: str) -> float:
    return parse_duration(text).total_seconds()


duration = argument_type(parse_duration)
seconds = argument_type(_seconds)
unix_socket = argument_type(parse_unix_socket)
