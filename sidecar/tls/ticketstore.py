"""The client's tickets: per (endpoint, expected SPIFFE ID), each used once.

RFC 8446 §C.4: a client SHOULD NOT reuse a ticket, or a passive observer can link its
connections; and a ticket is only good for the server identity that issued it, which is
why the store is keyed by the SPIFFE ID the caller expects at that endpoint as well as
the endpoint. A ticket is dropped when its lifetime ends and when the trust bundles
change (`TLSConfig.trust_generation` moves on): a resumed connection skips certificate
checks, so it must not outlive the bundles the original one was checked against.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from .events import SessionTicket

__all__ = ["StoredTicket", "TicketStore"]

# Servers send two tickets per connection by default; a few spare cover a burst of
# parallel connections to one peer.
DEFAULT_PER_KEY = 4
DEFAULT_KEYS = 1024

Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class StoredTicket:
    ticket: SessionTicket
    received: float  # Unix seconds, the client's clock
    generation: int

    def alive(self, now: float, generation: int) -> bool:
        return generation == self.generation and now < self.received + self.ticket.lifetime


class TicketStore:
    """Bounded, in memory; `take` removes the ticket it returns (single use)."""

    __slots__ = ("_by_key", "max_keys", "per_key")

    def __init__(self, per_key: int = DEFAULT_PER_KEY, max_keys: int = DEFAULT_KEYS) -> None:
        self.per_key = per_key
        self.max_keys = max_keys
        self._by_key: OrderedDict[Key, deque[StoredTicket]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_key.values())

    def put(self, key: Key, ticket: SessionTicket, now: float, generation: int) -> None:
        if ticket.lifetime <= 0:
            return
        queue = self._by_key.get(key)
        if queue is None:
            if len(self._by_key) >= self.max_keys:
                self._by_key.popitem(last=False)
            queue = self._by_key[key] = deque(maxlen=self.per_key)
        self._by_key.move_to_end(key)
        queue.append(StoredTicket(ticket, now, generation))

    def take(self, key: Key, now: float, generation: int) -> StoredTicket | None:
        queue = self._by_key.get(key)
        while queue:
            stored = queue.pop()  # the newest first
            if stored.alive(now, generation):
                if not queue:
                    del self._by_key[key]
                return stored
        self._by_key.pop(key, None)
        return None

    def clear(self) -> None:
        self._by_key.clear()
