"""The single-use cache behind 0-RTT (RFC 8446 §8.1, §8.2).

Early data has no replay protection of its own: anyone who saw a ClientHello with
early data can send it again. A server accepts early data for a ticket only once, by
remembering each ticket identity it accepted early data for until the ticket-age window
(§8.3) would refuse the same ClientHello anyway. The cache is in memory and bounded:
when it is full of live entries, early data is *rejected* (the connection falls back to
1-RTT), never accepted unchecked. It is only complete for the tickets one replica
issued, which is why `TLSConfig.early_data_strict` (the default) accepts early data
only at the issuing replica.

The engine is sans-I/O: `now` is passed in; the cache draws nothing itself.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

__all__ = ["ReplayCache"]

DEFAULT_CAPACITY = 100_000


class ReplayCache:
    """Ticket identities that already carried accepted early data, each until its expiry."""

    __slots__ = ("_entries", "capacity", "full_rejections")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("a replay cache holds at least one entry")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, float] = OrderedDict()
        self.full_rejections = 0

    def __len__(self) -> int:
        return len(self._entries)

    def admit(self, identity: bytes, now: float, keep_until: float) -> bool:
        """True the first time `identity` is seen (and remember it until `keep_until`);
        False for a replay, or when the cache is full of entries still live."""
        key = hashlib.sha256(identity).digest()[:16]
        entries = self._entries
        expires = entries.get(key)
        if expires is not None and expires > now:
            return False
        self._evict(now)
        if len(entries) >= self.capacity:
            self.full_rejections += 1
            return False
        entries[key] = keep_until
        entries.move_to_end(key)
        return True

    def _evict(self, now: float) -> None:
        # Entries go in with keep_until = now + a fixed window, so insertion order is
        # expiry order; stop at the first one still live.
        entries = self._entries
        while entries:
            key, expires = next(iter(entries.items()))
            if expires > now:
                return
            del entries[key]
