"""Join tokens created out of band (``trellis ca token create``), kept as hashes on disk.

``DIR/clusters/NAME/join-tokens/<sha256>.json`` holds ``{"node": ..., "expires_at": ...}``
(mode 0600). The token itself is never written here: the file's name is its SHA-256, so
the directory tells a reader which nodes may join, not how. ``token create`` hands the
token over once, on its stdout or in its ``--out`` file (0600) for the agent's
``--join-token-file``. The server looks a
presented token's hash up here when it is not one it issued itself, and deletes the file
when the token is redeemed (single use survives a server restart). Files of tokens that
expired unredeemed are deleted at start and then every ``token_purge_interval`` seconds
(``ca/server/app.py``); a late agent then hears "not valid" rather than "expired".
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

from ca.keys import write_private_file
from ca.server.attestation import (
    JoinTokenRecord,
    agent_spiffe_id,
    hash_join_token,
    new_join_token,
)
from ca.spiffeid import TrustDomain

__all__ = ["JoinTokenStore"]

_HASH = re.compile(r"^[0-9a-f]{64}$")


class JoinTokenStore:
    def __init__(self, cluster_dir: Path) -> None:
        self.directory = cluster_dir / "join-tokens"

    def create(self, node: str, *, ttl: float, now: float | None = None) -> tuple[str, float]:
        """A new token for ``node``; returns (token, expires_at). Only the hash is stored."""
        agent_spiffe_id(TrustDomain("example.org"), node)  # validates the node name
        now = time.time() if now is None else now
        token = new_join_token()
        expires_at = now + ttl
        record = {"node": node, "expires_at": expires_at}
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        write_private_file(
            self.directory / f"{hash_join_token(token)}.json", json.dumps(record).encode()
        )
        return token, expires_at

    def lookup(self, token_hash: str) -> JoinTokenRecord | None:
        if not _HASH.match(token_hash):
            return None
        try:
            doc = json.loads((self.directory / f"{token_hash}.json").read_bytes())
            return JoinTokenRecord(str(doc["node"]), float(doc["expires_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove(self, token_hash: str) -> None:
        if _HASH.match(token_hash):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / f"{token_hash}.json").unlink()

    def purge_expired(self, now: float) -> int:
        """Delete the files of tokens expired at ``now`` (and of unreadable records, which
        no agent could redeem); returns how many were deleted. ``ca serve`` calls this at
        start and on a timer: a token nobody redeems would otherwise stay forever."""
        removed = 0
        for path in self.directory.glob("*.json"):
            if not _HASH.match(path.stem):
                continue  # not a token file: not ours to delete
            try:
                doc = json.loads(path.read_bytes())
                expired = float(doc["expires_at"]) <= now
            except OSError:
                continue  # redeemed meanwhile, or unreadable now: try again next time
            except (ValueError, KeyError, TypeError):
                expired = True
            if expired:
                path.unlink(missing_ok=True)
                removed += 1
        return removed
