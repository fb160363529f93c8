"""SSLKEYLOGFILE-format lines (NSS key log format) for Wireshark, opt-in only."""

from __future__ import annotations

from collections.abc import Callable

KeyLogCallback = Callable[[str], None]

CLIENT_HANDSHAKE = "CLIENT_HANDSHAKE_TRAFFIC_SECRET"
SERVER_HANDSHAKE = "SERVER_HANDSHAKE_TRAFFIC_SECRET"
CLIENT_TRAFFIC_0 = "CLIENT_TRAFFIC_SECRET_0"
SERVER_TRAFFIC_0 = "SERVER_TRAFFIC_SECRET_0"
EXPORTER = "EXPORTER_SECRET"
CLIENT_EARLY = "CLIENT_EARLY_TRAFFIC_SECRET"


def keylog_line(label: str, client_random: bytes, secret: bytes) -> str:
    return f"{label} {client_random.hex()} {secret.hex()}"


def file_key_log(path: str) -> KeyLogCallback:
    """A callback appending lines to `path` (the file holds secrets: created 0600)."""
    import os

    def write(line: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="ascii") as f:
            f.write(line + "\n")

    return write
