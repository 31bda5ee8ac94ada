"""Who shapes the model: per-device participation over a sliding window, a fairness summary, and
two of the corrections (a per-device cap and inverse-participation reweighting; the third, a
per-device memory, is a rule setting: `coordinator._rules.FedBuff`).

Why: under asynchronous merging, devices that are fast, usually plugged in and on Wi-Fi send
many more updates than the others, and the model drifts toward their data. The window is what
"recent" means for both the accounting and the correction (``window_s``, coordinator seconds).

The math (`gini`, `max_median_ratio`, `participation_factor`) is pure. `Ledger` is plain
in-memory bookkeeping with the time passed in; the engine feeds it and seeds it from lineage at
start, so nothing here needs its own persistence.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

from fedasync_iot.models import ConfigError, Rejection, bounds, check_fields


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipationConfig:
    """The ``[participation]`` table.

    ``cap``: updates a device may have taken (accepted or buffered) per window; more are
    rejected with reason ``participation_cap`` and a ``retry_after_s`` so its agent stops
    training until a slot frees up. 0: no cap.
    ``reweight``: multiply each update's merge weight by `participation_factor` with
    ``power``, ``max_factor`` and ``max_boost`` (composed with the staleness weight of FedAsync
    and FedBuff; synchronous FedAvg, the baseline, is left as is: its cohort selection already
    spreads the rounds). Unset, it is on for FedAsync only (`for_rule`): on a fleet whose
    availability follows its data it raised the worst-served 10% of devices by 26 points and
    global accuracy by 5.8 (median of 5 seeds, docs/benchmarks.md "Uneven participation"), and
    moved final accuracy by at most a point across the fleet speeds of bench/robustness.py;
    FedBuff was not measured with it.
    The defaults (4 h window, boost 4, max 16) are the measured ones.
    """

    window_s: float = field(default=4 * 3600.0,
                            metadata=bounds(gt=0, le=366 * 86_400, rule="in (0, 1 year]"))
    cap: int = field(default=0, metadata=bounds(ge=0, integer=True,
                                                rule="an integer >= 0 (0: no cap)"))
    reweight: bool | None = None
    power: float = field(default=1.0, metadata=bounds(ge=0, le=4))
    # A frequent device's update keeps at least 1/max_factor of its weight.
    max_factor: float = field(default=16.0, metadata=bounds(ge=1, le=100))
    # A rare device's update gets at most this much more (1: damp only).
    max_boost: float = field(default=4.0, metadata=bounds(ge=1, le=100))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.reweight is not None and not isinstance(self.reweight, bool):
            raise ConfigError("reweight must be true or false (unset: on for fedasync)",
                              key="reweight")

    def for_rule(self, rule: str) -> ParticipationConfig:
        """This table with ``reweight`` decided for `rule`: when unset, on for FedAsync only."""
        return self if self.reweight is not None else replace(self, reweight=rule == "fedasync")


# -- the math ----------------------------------------------------------------------------------


def gini(values: Iterable[float]) -> float:
    """Gini coefficient of non-negative amounts: 0 when all are equal, (n-1)/n when one device
    has everything; 0 for no devices or all zero."""
    x = np.sort(np.asarray(list(values), dtype=np.float64))
    if x.size == 0 or x.sum() <= 0:
        return 0.0
    if (x < 0).any():
        raise ValueError("gini needs non-negative values")
    n = x.size
    # Mean absolute difference over twice the mean, from the sorted cumulative form.
    return float((2.0 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def max_median_ratio(values: Iterable[float]) -> float | None:
    """Largest over median of the positive amounts; None when there are none."""
    x = [v for v in values if v > 0]
    return float(max(x) / np.median(x)) if x else None


def participation_factor(count: float, mean_count: float, *, power: float = 1.0,
                         max_factor: float = 4.0, max_boost: float = 1.0) -> float:
    """``(mean_count / count) ** power`` clipped to ``[1/max_factor, max_boost]``.

    A device with the mean number of updates in the window keeps its weight; one sending four
    times as often gets a quarter of it for each, so per window every device shapes the model
    about equally. Boosting the rarer ones (``max_boost`` > 1) is the other half of that, but
    one update of a rare device, trained on its skewed data, can then pull the whole model
    toward it: off by default (measured: docs/benchmarks.md, "Uneven participation").
    """
    if count <= 0 or mean_count <= 0:
        return 1.0
    return float(min(max((mean_count / count) ** power, 1.0 / max_factor), max_boost))


# -- the ledger --------------------------------------------------------------------------------


@dataclass(slots=True)
class DeviceStats:
    """One device: totals since the state began, and its recent (in-window) activity."""

    accepted: int = 0  # updates merged into a version
    samples: int = 0  # training samples behind the merged updates
    staleness_sum: int = 0
    rejected: int = 0
    capped: int = 0  # rejections by the participation cap (also counted in `rejected`)
    last_at: float | None = None
    recent_taken: deque[float] = field(default_factory=deque)  # admission times
    recent_merged: deque[tuple[float, float]] = field(default_factory=deque)  # (time, weight)

    def expire(self, horizon: float) -> None:
        while self.recent_taken and self.recent_taken[0] < horizon:
            self.recent_taken.popleft()
        while self.recent_merged and self.recent_merged[0][0] < horizon:
            self.recent_merged.popleft()


class Totals(NamedTuple):
    """One device's lineage, aggregated: what the ledger's totals start from."""

    device_id: str
    accepted: int
    samples: int
    staleness_sum: int
    rejected: int
    capped: int
    last_at: float | None


class Seed(NamedTuple):
    """A recent lineage row (taken or merged within the window) the ledger starts from."""

    device_id: str
    received_at: float
    weight: float | None
    merged_at: float | None  # creation time of the version that merged it, if merged


class Ledger:
    """Per-device participation. Fed by the engine's single writer; read by status and metrics
    from other threads, hence the lock (held for microseconds)."""

    def __init__(self, config: ParticipationConfig) -> None:
        self.config = config
        self._devices: dict[str, DeviceStats] = {}
        self._window: deque[tuple[float, str]] = deque()  # every admission in the window
        self._window_counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def _device(self, device_id: str) -> DeviceStats:
        d = self._devices.get(device_id)
        if d is None:
            d = self._devices[device_id] = DeviceStats()
        return d

    def seed(self, totals: Iterable[Totals], recent: Iterable[Seed], *, now: float) -> None:
        """Rebuild from lineage (`Store.participation`); `recent` in arrival order."""
        horizon = now - self.config.window_s
        with self._lock:
            for t in totals:
                d = self._device(t.device_id)
                d.accepted, d.samples, d.staleness_sum = t.accepted, t.samples, t.staleness_sum
                d.rejected, d.capped, d.last_at = t.rejected, t.capped, t.last_at
            for r in recent:
                d = self._device(r.device_id)
                if r.received_at >= horizon:
                    self._take(d, r.device_id, r.received_at)
                if r.merged_at is not None and r.merged_at >= horizon:
                    d.recent_merged.append((r.merged_at, r.weight or 0.0))
            for d in self._devices.values():  # merges are not in arrival order
                d.recent_merged = deque(sorted(d.recent_merged))

    @staticmethod
    def _count_merge(d: DeviceStats, staleness: int, n_samples: int) -> None:
        d.accepted += 1
        d.samples += n_samples
        d.staleness_sum += staleness

    # -- the writer's side -------------------------------------------------------------------
    def retry_after(self, device_id: str, *, now: float) -> float | None:
        """None if the cap lets `device_id` in now; else seconds until it would."""
        if not self.config.cap:
            return None
        with self._lock:
            d = self._device(device_id)
            d.expire(now - self.config.window_s)
            if len(d.recent_taken) < self.config.cap:
                return None
            # The slot frees when the cap-th newest admission leaves the window.
            oldest_blocking = d.recent_taken[-self.config.cap]
            return max(oldest_blocking + self.config.window_s - now, 0.0) + 1e-3

    def factor(self, device_id: str, *, now: float) -> float:
        """The reweighting factor of an update arriving now (counting itself); 1 when off."""
        c = self.config
        if not c.reweight:
            return 1.0
        with self._lock:
            self._expire_window(now)
            own = self._window_counts.get(device_id, 0) + 1
            devices = len(self._window_counts) + (device_id not in self._window_counts)
            mean = (len(self._window) + 1) / devices
        return participation_factor(own, mean, power=c.power, max_factor=c.max_factor,
                                    max_boost=c.max_boost)

    def _expire_window(self, now: float) -> None:
        # Fleet-wide counts kept incrementally: O(1) per update however many devices there are.
        horizon = now - self.config.window_s
        while self._window and self._window[0][0] < horizon:
            _, name = self._window.popleft()
            left = self._window_counts[name] - 1
            if left:
                self._window_counts[name] = left
            else:
                del self._window_counts[name]

    def taken(self, device_id: str, *, now: float) -> None:
        """The rule took an update (merged or buffered)."""
        with self._lock:
            d = self._device(device_id)
            d.last_at = now
            self._take(d, device_id, now)

    def _take(self, d: DeviceStats, device_id: str, t: float) -> None:
        d.expire(t - self.config.window_s)  # bounded memory even if no one reads a report
        d.recent_taken.append(t)
        self._window.append((t, device_id))
        self._window_counts[device_id] = self._window_counts.get(device_id, 0) + 1

    def merged(self, device_id: str, *, now: float, weight: float, staleness: int,
               n_samples: int) -> None:
        with self._lock:
            d = self._device(device_id)
            self._count_merge(d, staleness, n_samples)
            d.expire(now - self.config.window_s)
            d.recent_merged.append((now, weight))

    def rejected(self, device_id: str, reason: str, *, now: float) -> None:
        with self._lock:
            d = self._device(device_id)
            d.rejected += 1
            d.capped += reason == Rejection.PARTICIPATION_CAP
            d.last_at = now

    # -- the readers' side -------------------------------------------------------------------
    def report(self, *, now: float) -> Report:
        horizon = now - self.config.window_s
        with self._lock:
            rows = []
            for name, d in self._devices.items():
                d.expire(horizon)
                rows.append(DeviceRow(
                    device_id=name, accepted=d.accepted, samples=d.samples,
                    mean_staleness=d.staleness_sum / d.accepted if d.accepted else None,
                    rejected=d.rejected, capped=d.capped, last_at=d.last_at,
                    window_updates=len(d.recent_taken),
                    window_weight=sum(w for _, w in d.recent_merged)))
        return Report.of(rows, window_s=self.config.window_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRow:
    device_id: str
    accepted: int
    samples: int
    mean_staleness: float | None
    rejected: int
    capped: int
    last_at: float | None
    window_updates: int
    window_weight: float
    window_share: float = 0.0  # this device's part of all merge weight in the window


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """The fleet's participation: one row per device seen, and the fairness summary."""

    window_s: float
    devices: tuple[DeviceRow, ...]
    gini: float  # over every device seen: its updates taken in the window (silent ones count 0)
    max_median_ratio: float | None  # over devices with merge weight in the window
    active_devices: int  # devices with an update taken in the window

    @classmethod
    def of(cls, rows: Sequence[DeviceRow], *, window_s: float) -> Report:
        total = sum(r.window_weight for r in rows)
        shared = sorted(
            (replace(r, window_share=r.window_weight / total if total else 0.0) for r in rows),
            key=lambda r: (-r.window_share, -r.window_updates, r.device_id))
        return cls(window_s=window_s, devices=tuple(shared),
                   gini=gini(r.window_updates for r in rows),
                   max_median_ratio=max_median_ratio(r.window_weight for r in rows),
                   active_devices=sum(1 for r in rows if r.window_updates))

    def to_dict(self, devices: Sequence[DeviceRow] | None = None) -> dict[str, object]:
        """The summary and the rows (`devices`: a selection of them, default all)."""
        rows = self.devices if devices is None else devices
        return {**self.summary(), "devices": [asdict(r) for r in rows]}

    def summary(self) -> dict[str, object]:
        return {"window_s": self.window_s, "devices_seen": len(self.devices),
                "active_devices": self.active_devices, "gini": round(self.gini, 4),
                "max_median_ratio": None if self.max_median_ratio is None
                else round(self.max_median_ratio, 3)}
