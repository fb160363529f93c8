"""GET a JSON document from an admin port (the agent's or a sidecar's), one line on failure."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from core.errors import CliError

__all__ = ["AdminUnreachable", "fetch_json", "parse_address"]

TIMEOUT = 5.0


class AdminUnreachable(CliError):
    """An admin endpoint did not answer with JSON; the message says where and why."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too); ValueError names what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _url(host: str, port: int, path: str) -> str:
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def fetch_json(host: str, port: int, path: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    url = _url(host, port, path)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http only)
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminUnreachable(f"no answer from {url}: {reason}") from exc
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise AdminUnreachable(f"{url} did not answer JSON (not a Trellis admin port?)") from exc
    if not isinstance(document, dict):
        raise AdminUnreachable(f"{url} did not answer a JSON object")
    return document
