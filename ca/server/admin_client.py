"""A client of the CA server's admin socket (``ca.server.admin``): plain HTTP/1.1 over a
Unix socket, with the standard library only, so a command that asks pays no aiohttp or
grpc import."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

__all__ = ["AdminClientError", "fetch_admin"]

DEFAULT_TIMEOUT = 5.0


class AdminClientError(Exception):
    """The admin socket could not be asked, or answered with an error; says which and why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _is_socket(path: Path) -> bool:
    try:
        return path.is_socket()
    except OSError:  # unreadable parent: let the caller's own message stand
        return True


def fetch_admin(path: Path, resource: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """``GET resource`` on the admin socket at ``path``, as the JSON object it answers."""
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("GET", resource)
        response = connection.getresponse()
        body = response.read()
    except FileNotFoundError as exc:
        raise AdminClientError(
            f"no CA admin socket at {path} (is ca serve running with --admin-socket?)"
        ) from exc
    except ConnectionRefusedError as exc:
        # connect(2) on a path that is not a socket fails with ECONNREFUSED as well, as if
        # a stopped server had left its socket file behind: tell the two apart.
        if not _is_socket(path):
            raise AdminClientError(
                f"{path} is not a socket (give the path ca serve --admin-socket names)"
            ) from exc
        raise AdminClientError(f"nothing listens on {path} (the CA server has stopped?)") from exc
    except PermissionError as exc:
        raise AdminClientError(
            f"cannot open {path}: permission denied (run as the CA's user or root)"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise AdminClientError(f"cannot ask the CA at {path}: {exc}") from exc
    finally:
        connection.close()
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise AdminClientError(
            f"the CA at {path} answered {resource} with something not JSON"
        ) from exc
    if response.status != 200 or not isinstance(document, dict):
        detail = document.get("error") if isinstance(document, dict) else None
        raise AdminClientError(f"the CA at {path} refused {resource}: {detail or response.status}")
    return document
