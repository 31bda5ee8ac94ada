"""Exponential backoff: how long to wait before the next try of something that keeps failing.

One schedule for every retry in the project (broker reconnects, the simulator's reconnects,
commits to a full disk): wait `first_s`, then `factor` times longer each time, never more than
`cap_s`. With `jitter` each wait is a random share of that (a fleet does not retry in step after
a broker restart); the caller passes the random source, so a seeded run repeats its waits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Beyond this many doublings the wait is the cap anyway; it keeps the power finite.
_MAX_EXPONENT = 60


@dataclass(frozen=True, slots=True)
class Backoff:
    """The wait before try number `n + 1` after `n` failures (`delay(n)`, n from 0)."""

    first_s: float
    cap_s: float
    factor: float = 2.0
    # (low, high): each wait is the nominal one times a uniform draw in [low, high].
    jitter: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.cap_s or self.factor < 1:
            raise ValueError("a backoff needs 0 < first_s <= cap_s and factor >= 1")
        if self.jitter is not None and not 0 <= self.jitter[0] <= self.jitter[1]:
            raise ValueError("backoff jitter must be (low, high) with 0 <= low <= high")

    def nominal(self, n: int) -> float:
        """The wait without jitter: `first_s * factor**n`, capped."""
        return min(self.cap_s, self.first_s * self.factor ** min(max(n, 0), _MAX_EXPONENT))

    def delay(self, n: int, rng: random.Random | None = None) -> float:
        """The wait after `n` earlier waits; jittered when the backoff has jitter (then `rng`
        is required: the caller owns the randomness)."""
        nominal = self.nominal(n)
        if self.jitter is None:
            return nominal
        if rng is None:
            raise ValueError("a jittered backoff needs a random source")
        low, high = self.jitter
        return nominal * rng.uniform(low, high)
