"""One log format for every long-running process, chosen the same way everywhere.

A record is an *event* (a short name or a sentence) plus *fields*
(``logger.info("access", extra={"fields": {...}})``). Two renderings of the same record:

* ``json``: one JSON object per line (``ts``, ``level``, ``logger``, ``event``, then the
  fields), what a log collector in a cluster parses. The default when standard error is
  not a terminal: a container's stderr, a file, a pipe.
* ``text``: ``ts LEVEL logger: event key=value ...`` for a person at a terminal, the
  default there.

Every long-running command (``ca serve``, ``agent``, ``sidecar``, ``operator run``, and so
``trellis up``'s children) takes ``--log-format auto|json|text`` and ``--log-level`` through
`add_logging_arguments`, and sets itself up with `configure_logging`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TextIO

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OWN_LOGGERS",
    "JsonLogFormatter",
    "TextLogFormatter",
    "add_logging_arguments",
    "configure_logging",
    "log_format_for",
]

LogFormat = Literal["json", "text"]
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
# The namespaces Trellis logs under; `--log-level` sets these. Libraries (grpc, asyncio,
# aiohttp's per-request access log) stay at WARNING unless debugging.
OWN_LOGGERS = ("trellis", "sidecar", "ca", "mesh_operator", "meshapi", "core", "kopf")


def _fields(record: logging.LogRecord) -> Mapping[str, Any]:
    fields = getattr(record, "fields", None)
    if not isinstance(fields, Mapping):
        return {}
    return {str(k): v for k, v in fields.items() if v is not None}


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event``, plus the
    record's ``fields`` (``logger.info(..., extra={"fields": {...}})``)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        # The four keys above are the format's: a field of the same name cannot hide them.
        doc.update({k: v for k, v in _fields(record).items() if k not in doc})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextLogFormatter(logging.Formatter):
    """``ts LEVEL logger: event key=value ...``; a value with spaces or quotes is quoted
    as JSON would, so a line still splits unambiguously."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"]
        for key, value in _fields(record).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            if not text or any(c in text for c in ' "=\\') or not text.isprintable():
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def add_logging_arguments(parser: argparse.ArgumentParser, *, default_level: str = "info") -> None:
    """``--log-format`` and ``--log-level``, the same on every long-running command."""
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="auto",
        help="json: one JSON object per line; text: for reading at a terminal; auto (the "
        "default): text when standard error is a terminal, else json (containers, files)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default_level,
        help=f"least severe level logged (default {default_level})",
    )


def log_format_for(requested: str, stream: TextIO) -> LogFormat:
    """What ``auto`` means for ``stream``: a terminal reads text, anything else JSON."""
    if requested == "json":
        return "json"
    if requested == "text":
        return "text"
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or odd stream: nobody is looking
        return "json"


def configure_logging(
    args: argparse.Namespace,
    *,
    stream: TextIO | None = None,
    loggers: Iterable[str] = OWN_LOGGERS,
) -> logging.Handler:
    """Send every record to ``stream`` (standard error) in the chosen format: Trellis's
    own loggers at ``--log-level``, libraries at WARNING (or DEBUG when debugging).
    Idempotent: a second call replaces the handler of the first."""
    out = stream if stream is not None else sys.stderr
    fmt = log_format_for(getattr(args, "log_format", "auto"), out)
    level = logging.getLevelName(str(getattr(args, "log_level", "info")).upper())
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLogFormatter() if fmt == "json" else TextLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if level == logging.DEBUG else max(level, logging.WARNING))
    for name in loggers:
        logger = logging.getLogger(name)
        logger.handlers.clear()  # an earlier set-up of its own would print every line twice
        logger.propagate = True
        logger.setLevel(level)
    return handler
