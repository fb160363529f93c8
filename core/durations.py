"""One duration syntax for every flag and config file: Go's ``time.ParseDuration`` units
plus days, and a bare number meaning seconds.

``90``, ``2.5``, ``90s``, ``500ms``, ``5m``, ``1h30m``, ``48h`` and ``30d`` are all accepted;
durations are printed the way Go prints them (``48h``, ``1h30m``, ``500ms``), never as
``str(timedelta)``'s ``2 days, 0:00:00``: what a command prints can be pasted back into a
flag, a CRD or a config file unchanged.
"""

from __future__ import annotations

import datetime as dt
import re

__all__ = ["MAX_DURATION", "DurationError", "format_duration", "parse_duration"]

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_BARE_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_EXAMPLES = "e.g. 30 (seconds), 500ms, 90s, 5m, 1h30m, 48h"
MAX_DURATION = dt.timedelta(days=36600)


class DurationError(ValueError):
    """Text that is not a duration; the message says what was wrong and what would do."""


def parse_duration(text: str) -> dt.timedelta:
    """A positive duration from ``text``; a bare number is seconds."""
    text = text.strip()
    if not text:
        raise DurationError(f"empty duration ({_EXAMPLES})")
    if _BARE_SECONDS.fullmatch(text):
        seconds = float(text)
    else:
        position, seconds = 0, 0.0
        for match in _PART.finditer(text):
            if match.start() != position:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            position = match.end()
        if position != len(text):
            raise DurationError(f"invalid duration {text!r} ({_EXAMPLES})")
    if seconds <= 0:
        raise DurationError(f"duration {text!r} must be positive")
    if seconds > MAX_DURATION.total_seconds():
        raise DurationError(f"duration {text!r} is longer than {format_duration(MAX_DURATION)}")
    return dt.timedelta(seconds=seconds)


def format_duration(delta: dt.timedelta | float) -> str:
    """``48h``, ``1h30m``, ``90s`` → ``1m30s``, ``500ms``: hours are the largest unit, as in
    Go, so a day-long TTL reads ``24h`` whatever flag or field it came from."""
    seconds = delta.total_seconds() if isinstance(delta, dt.timedelta) else float(delta)
    sign = "-" if seconds < 0 else ""
    millis = round(abs(seconds) * 1000)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{sign}{millis}ms"
    whole, millis = divmod(millis, 1000)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    second_text = f"{secs}.{millis:03d}".rstrip("0").rstrip(".") if millis else str(secs)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    parts.append(f"{second_text}s" if secs or millis else "")
    return sign + "".join(parts)
