"""Capped exponential backoff with full jitter (sans-I/O: the RNG is passed in).

Full jitter (a uniform delay in [0, min(cap, base * 2^n)]) because every agent of a
cluster loses the CA at the same moment; equal delays would bring them back together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    floor: float = 0.05
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        """Seconds to wait after one more consecutive failure."""
        ceiling = min(self.cap, self.base * (2 ** min(self.failures, 32)))
        self.failures += 1
        return max(self.floor, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.failures = 0
