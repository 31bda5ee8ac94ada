"""Local work fitted to the device's eligible windows (``training.window_fraction``).

A device that is allowed to train only in short windows (a phone on a charger for twenty
minutes) may never finish a full local update: its work is aborted when the window closes, and
the model never hears from it. With ``window_fraction`` f > 0 the agent learns how long its
eligible windows last (the median of the last few it saw end) and what a sample-epoch costs it
(measured on its own trainings), and plans each training to fit in f of a typical window:
fewer epochs first, then a random subset of its samples (never fewer than
`MIN_FITTED_SAMPLES`). Until it has seen `MIN_WINDOWS` windows end and timed one training it
does the full work; a device that never stops being eligible always does.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

MIN_WINDOWS = 3
MIN_FITTED_SAMPLES = 8


def fit_work(samples: int, epochs: int, *, budget_s: float, cost_s: float,
             min_samples: int = MIN_FITTED_SAMPLES) -> tuple[int, int]:
    """(samples, epochs) to train so that ``samples x epochs x cost_s`` stays within
    `budget_s`: fewer epochs first, then fewer samples (at least `min_samples`)."""
    if samples * epochs * cost_s <= budget_s:
        return samples, epochs
    fitted_epochs = max(1, min(epochs, math.floor(budget_s / (samples * cost_s))))
    if samples * fitted_epochs * cost_s <= budget_s:
        return samples, fitted_epochs
    return min(samples, max(min_samples, math.floor(budget_s / cost_s))), 1


class WorkBudget:
    """What the agent learns of its windows and its speed (times on the agent's monotonic
    clock)."""

    def __init__(self, fraction: float, *, remember: int = 16) -> None:
        self.fraction = fraction
        self.windows: deque[float] = deque(maxlen=remember)
        self.cost_s: float | None = None  # per sample-epoch, smoothed
        self._since: float | None = None  # start of the current eligible window

    def observe(self, eligible: bool, now: float) -> None:
        """The policy's latest decision."""
        if eligible and self._since is None:
            self._since = now
        elif not eligible and self._since is not None:
            self.windows.append(now - self._since)
            self._since = None

    def trained(self, samples: int, epochs: int, elapsed_s: float) -> None:
        """A training of `samples` x `epochs` took `elapsed_s`, start to delivery."""
        if samples < 1 or epochs < 1 or not elapsed_s > 0:
            return
        cost = elapsed_s / (samples * epochs)
        self.cost_s = cost if self.cost_s is None else 0.5 * self.cost_s + 0.5 * cost

    def fit(self, samples: int, epochs: int) -> tuple[int, int]:
        """The work to do now: all of it until enough is known, or with the feature off."""
        if self.fraction <= 0 or self.cost_s is None or len(self.windows) < MIN_WINDOWS:
            return samples, epochs
        budget = self.fraction * statistics.median(self.windows)
        return fit_work(samples, epochs, budget_s=budget, cost_s=self.cost_s)
