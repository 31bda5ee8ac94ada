"""Consecutive failures of one kind of work (commits to the state directory): how long to wait
before the next try, and when to say what.

A disk that is full stays full for minutes: retrying at once made ~3.5 ERRORs with tracebacks a
second (1 MB of log in 3.5 minutes) and hid the one line that said why. So: exponential backoff
(0.5 s doubling to 30 s, `models._backoff`), one line at the first failure, a summary every few
minutes, one line when it works again. No I/O here: the caller logs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from fedasync_iot.models import Backoff


@dataclass(frozen=True, slots=True)
class Recovery:
    failures: int
    seconds: float


class Retries:
    def __init__(self, *, first_s: float = 0.5, cap_s: float = 30.0,
                 summary_every_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < first_s <= cap_s or summary_every_s <= 0:
            raise ValueError("need 0 < first_s <= cap_s and summary_every_s > 0")
        self.first_s, self.cap_s, self.summary_every_s = first_s, cap_s, summary_every_s
        self._backoff = Backoff(first_s, cap_s)
        self._clock = clock
        self.failures = 0
        self.since: float | None = None  # the clock at the first failure of this run of them
        self.cause: str | None = None
        self._said_at = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    @property
    def delay(self) -> float:
        """The wait before the next try (0 while nothing fails)."""
        return self._backoff.delay(self.failures - 1) if self.failures else 0.0

    @property
    def elapsed(self) -> float:
        return 0.0 if self.since is None else self._clock() - self.since

    def failed(self, cause: str) -> bool:
        """Count a failure; True when it is time to say so (the first, then one summary per
        `summary_every_s`)."""
        now = self._clock()
        self.failures += 1
        self.cause = cause
        if self.failures == 1:
            self.since = self._said_at = now
            return True
        if now - self._said_at >= self.summary_every_s:
            self._said_at = now
            return True
        return False

    def succeeded(self) -> Recovery | None:
        """Reset; what the run of failures was, if there was one."""
        if not self.failures:
            return None
        recovery = Recovery(self.failures, self.elapsed)
        self.failures, self.since, self.cause = 0, None, None
        return recovery
