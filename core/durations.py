"""Go-style durations for CLI flags and config files: ``90s``, ``5m``, ``1h30m``, ``30d``."""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["format_duration", "parse_duration"]

_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = dt.timedelta(days=36600)


def parse_duration(text: str) -> dt.timedelta:
    text = text.strip()
    if not text:
        raise ValueError("empty duration")
    position, seconds = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != position:
            break
        seconds += int(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 5m, 1h30m, 720h, 30d)")
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    result = dt.timedelta(seconds=seconds)
    if result > MAX_DURATION:
        raise ValueError(f"duration {text!r} is absurdly long")
    return result


def format_duration(delta: dt.timedelta) -> str:
    total = int(delta.total_seconds())
    sign = "-" if total < 0 else ""
    total = abs(total)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")) if v]
    return sign + ("".join(parts) or "0s")
