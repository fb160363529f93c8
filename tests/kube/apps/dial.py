"""One TCP call from inside a pod, as ``kubectl exec`` would run it: connect to HOST:PORT,
send a line, print the answer as one JSON line (``{"reply": ...}`` or ``{"error": ...}``).

Usage: ``python -m tests.kube.apps.dial HOST PORT TEXT``. Exits 0 when a line came back.
"""

from __future__ import annotations

import json
import socket
import sys

TIMEOUT = 8.0


def dial(host: str, port: int, text: str) -> dict[str, str]:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
            conn.sendall(text.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        return {"error": f"{type(exc).__name__}: {exc.strerror or exc}"}
    if not reply:
        return {"error": "closed without an answer"}
    return {"reply": reply.decode(errors="replace").strip()}


if __name__ == "__main__":
    result = dial(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print(json.dumps(result), flush=True)
    sys.exit(0 if "reply" in result else 1)
