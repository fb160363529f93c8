"""Banned agents: the nodes an operator has cut off, kept in a small YAML file.

The file is a YAML list of node names (``[]`` or an empty file bans nobody)::

    - node-a
    - worker-17.example

``trellis ca serve --banned-agents FILE`` reads it at start-up (a bad file stops the
server with one line naming the problem) and re-reads it whenever its mtime, size or inode
changes; a bad file on reload keeps the previous list and is reported. ``trellis ca
ban``/``unban`` edit the file (write a temporary file, then rename it over the old one, so
the server never reads half a list).

What a ban means is decided in ``service.py``: PERMISSION_DENIED for every call of the
node's agent, and no attestation for the node. A ban does not revoke SVIDs already issued:
they stay valid until they expire (at most the entry's TTL), which is why TTLs are short.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from ca.entries import file_stamp
from ca.server.attestation import is_node_name

__all__ = ["BanListError", "BanListFile", "load_ban_list", "parse_ban_list", "write_ban_list"]

# A list of node names, not a database: a file above this is a mistake, not a big cluster.
MAX_BAN_FILE_BYTES = 1024 * 1024


class BanListError(ValueError):
    """The ban list cannot be used; the message names the file and the problem."""


def parse_ban_list(text: str, source: str = "banned agents") -> frozenset[str]:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise BanListError(f"{source}: not YAML{where}") from exc
    except RecursionError as exc:  # PyYAML recurses once per nesting level
        raise BanListError(f"{source}: nested too deeply") from exc
    if document is None:
        return frozenset()
    if not isinstance(document, list):
        raise BanListError(f"{source}: must be a YAML list of node names")
    for index, node in enumerate(document):
        if not isinstance(node, str) or not is_node_name(node):
            shown = repr(node)[:80]
            raise BanListError(f"{source}: [{index}]: {shown} is not a node name")
    return frozenset(document)


def load_ban_list(path: Path) -> frozenset[str]:
    """The nodes listed in ``path``; ``BanListError`` for anything unusable."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BAN_FILE_BYTES + 1)
    except OSError as exc:
        raise BanListError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) > MAX_BAN_FILE_BYTES:
        raise BanListError(f"{path}: larger than {MAX_BAN_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BanListError(f"{path}: not UTF-8") from exc
    return parse_ban_list(text, str(path))


def write_ban_list(path: Path, nodes: frozenset[str]) -> None:
    """Replace ``path`` with ``nodes`` (sorted) in one rename."""
    # safe_dump quotes the names YAML would read as something else (a node named 123, null,
    # true, 0x10 or 2024-01-01), which parse_ban_list would refuse as "not a node name": the
    # CA would then not start, or keep its previous list. An empty list is written "[]".
    body = yaml.safe_dump(sorted(nodes), default_flow_style=False)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    temporary = Path(name)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
        temporary.chmod(0o644)  # not secret; mkstemp's 0600 would hide it from readers
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class BanListFile:
    """The ban list in ``path``, re-read when the file changes (see the module docs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = file_stamp(self.path)
        self._nodes = load_ban_list(path)  # the first load raises: never start on a bad file
        self.reloads = 0

    def current(self) -> frozenset[str]:
        return self._nodes

    def refresh(self) -> BanListError | None:
        """Re-read the file if it changed; on failure keep the previous list."""
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            nodes = load_ban_list(self.path)
        except BanListError as exc:
            return exc
        changed = nodes != self._nodes
        self._nodes = nodes
        if changed:
            self.reloads += 1
        return None
