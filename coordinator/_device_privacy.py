"""What each device says it spent of its local privacy budget (issue 23).

An agent publishes its lifetime privacy ledger (agent/_privacy.py, `PrivacyLedger.status`) in
its retained status, key ``privacy``. The coordinator keeps the newest figures per device in
its store, so that `fedasync-coordinator devices` (read-only, also with no service running) and
/devices show them. They are the device's own claim: the coordinator never sees a device's data
or its noise, so it cannot verify them; a device that lies about its ledger is out of reach of
any check here.

A status is device-controlled input. `from_status` takes only the expected types, finite
numbers in range and consistent flags; anything else is `BadStatus` with a short reason, which
the service counts and logs and never stores.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from fedasync_iot.models import WireError

# Far past any epsilon that states a guarantee (a device with almost no noise can claim 1e6
# honestly); beyond, a figure is a broken or hostile status.
MAX_EPSILON = 1e9
MAX_UPDATES = 10**12


class BadStatus(WireError):
    """A device status whose privacy figures cannot be taken; `reason` names why, briefly."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class DevicePrivacy:
    """One device's ledger as it last reported it."""

    epsilon: float | None  # spent over its life; None: no bound (no noise) or unknown to it
    delta: float
    budget: float | None  # None: the device counts but enforces nothing
    reached: bool  # it sends no more updates (the ledger's `exhausted`)
    updates: int  # updates it let out
    reported_at: float  # coordinator time these figures were first heard

    def __post_init__(self) -> None:
        if not _within(self.epsilon, 0.0, MAX_EPSILON, optional=True):
            raise BadStatus("epsilon", f"epsilon_spent must be null or a number in "
                            f"[0, {MAX_EPSILON:g}], got {self.epsilon!r}")
        if not _within(self.delta, 0.0, 1.0) or self.delta in (0.0, 1.0):
            raise BadStatus("delta", f"delta must be in (0, 1), got {self.delta!r}")
        if not _within(self.budget, 0.0, MAX_EPSILON, optional=True) or self.budget == 0:
            raise BadStatus("budget", f"epsilon_budget must be null or a number in "
                            f"(0, {MAX_EPSILON:g}], got {self.budget!r}")
        if not isinstance(self.reached, bool):
            raise BadStatus("exhausted", f"exhausted must be true or false, got "
                            f"{self.reached!r}")
        if self.reached and self.budget is None:
            raise BadStatus("exhausted", "exhausted without a budget")
        if (isinstance(self.updates, bool) or not isinstance(self.updates, int)
                or not 0 <= self.updates <= MAX_UPDATES):
            raise BadStatus("updates", f"updates must be an integer in [0, {MAX_UPDATES}], "
                            f"got {self.updates!r}")
        if not _within(self.reported_at, 0.0, math.inf):
            raise BadStatus("time", f"reported_at must be a time, got {self.reported_at!r}")

    def same_figures(self, other: DevicePrivacy | None) -> bool:
        """Whether `other` says the same (its time aside): then nothing needs writing."""
        return other is not None and (self.epsilon, self.delta, self.budget, self.reached,
                                      self.updates) == (other.epsilon, other.delta,
                                                        other.budget, other.reached,
                                                        other.updates)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _within(x: object, low: float, high: float, *, optional: bool = False) -> bool:
    if x is None:
        return optional
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and low <= x <= high)


def from_status(status: Mapping[str, Any], *, now: float) -> DevicePrivacy | None:
    """The privacy figures of a decoded device status; None when it has none (an agent from
    before issue 23, or a last will). Raises `BadStatus` when they cannot be taken."""
    ledger = status.get("privacy")
    if ledger is None:
        return None
    if not isinstance(ledger, dict):
        raise BadStatus("type", f"privacy must be an object, got {type(ledger).__name__}")
    absent: Any = None  # a missing key reads as null, which the checks below refuse or allow
    return DevicePrivacy(epsilon=ledger.get("epsilon_spent", absent),
                         delta=ledger.get("delta", absent),
                         budget=ledger.get("epsilon_budget", absent),
                         reached=ledger.get("exhausted", absent),
                         updates=ledger.get("updates", absent), reported_at=now)


class PrivacyBook:
    """The newest figures per device (read by /devices) and those not yet in the store.

    The network thread observes statuses; the service's single writer writes what changed
    (`unwritten`, then `written`), so SQLite is never written from paho's thread. Bounded by
    the devices the broker lets publish a status (one account each)."""

    def __init__(self, known: Mapping[str, DevicePrivacy]) -> None:
        self._latest = dict(known)
        self._unwritten: dict[str, DevicePrivacy] = {}
        self._lock = threading.Lock()

    def observe(self, device_id: str, report: DevicePrivacy) -> bool:
        """Keep `report`; True when its figures differ from the last known (to be written)."""
        with self._lock:
            if report.same_figures(self._latest.get(device_id)):
                return False
            self._latest[device_id] = self._unwritten[device_id] = report
            return True

    def unwritten(self) -> dict[str, DevicePrivacy]:
        with self._lock:
            return dict(self._unwritten)

    def written(self, done: Mapping[str, DevicePrivacy]) -> None:
        """`done` is durable; a report that arrived meanwhile stays to be written."""
        with self._lock:
            for device_id, report in done.items():
                if self._unwritten.get(device_id) is report:
                    del self._unwritten[device_id]

    def latest(self) -> dict[str, DevicePrivacy]:
        with self._lock:
            return dict(self._latest)


def with_local_privacy(report: dict[str, Any],
                       known: Mapping[str, DevicePrivacy]) -> dict[str, Any]:
    """A participation report (`Report.to_dict`) with each row's ``local_privacy`` (None for a
    device that never reported one) and a summary over every device that did, rows or not."""
    for row in report["devices"]:
        found = known.get(row["device_id"])
        row["local_privacy"] = None if found is None else found.to_dict()
    report["local_privacy"] = summary(known)
    return report


def summary(known: Mapping[str, DevicePrivacy]) -> dict[str, Any]:
    """Devices that report a ledger, those at their budget, and the largest epsilon claimed."""
    bounded = [p.epsilon for p in known.values() if p.epsilon is not None]
    return {"devices": len(known), "reached_budget": sorted(d for d, p in known.items()
                                                            if p.reached),
            "max_epsilon": max(bounded, default=None),
            "unbounded": sum(1 for p in known.values() if p.epsilon is None)}
