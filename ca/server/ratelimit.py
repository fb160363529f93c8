"""Per-caller token buckets, sans I/O: the caller passes ``now`` (monotonic seconds).

Each key (an agent's node name, or a peer address for attestation) gets a bucket of
``burst`` tokens refilled at ``rate`` per second; a request costs one token per SVID it asks
for. A node that restarts with a thousand pods gets its burst; one that loops forever is
held to the sustained rate, and other nodes never notice.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["RateLimiter"]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it has them."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # the least recently used caller
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.stamp = now
        if cost > bucket.tokens:
            return False
        bucket.tokens -= cost
        return True

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens will be there (as of the last ``allow``)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        return max(0.0, (cost - bucket.tokens) / self.rate)
