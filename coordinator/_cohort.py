"""Who is asked to train in a synchronous round.

Devices announce on their status topic whether they may train now (they "check in"); for each
round the coordinator invites ``ceil(over_selection * cohort_size)`` of the eligible ones at
random, names them in the snapshot, and closes the round at ``cohort_size`` updates or the
deadline. A round that reaches its deadline without enough updates invites more devices while
keeping the earlier invitees (they may still be training). With nobody checked in yet the round
is open to all.
"""

from __future__ import annotations

import json
import math
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from fedasync_iot.models import MAX_COHORT, validate_id

MAX_STATUS_BYTES = 16 * 1024


def decode_status(payload: bytes) -> dict[str, Any] | None:
    """A device's status JSON as a dict; None when oversized, unreadable or not an object (a
    status is advisory: a garbled one must never break the coordinator)."""
    if len(payload) > MAX_STATUS_BYTES:
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def eligible_of(status: dict[str, Any] | None) -> bool | None:
    """The ``eligible`` flag of a decoded status: False when offline, None when absent."""
    if status is None:
        return None
    if status.get("state") == "offline":
        return False
    eligible = status.get("eligible")
    return eligible if isinstance(eligible, bool) else None


def parse_status(payload: bytes) -> bool | None:
    """The ``eligible`` flag of a device's status JSON; None when absent or unreadable."""
    return eligible_of(decode_status(payload))


@dataclass(slots=True)
class CohortSelector:
    cohort_size: int
    over_selection: float
    deadline_s: float
    seed: int = 0
    eligible: set[str] = field(default_factory=set)
    cohort: tuple[str, ...] | None = None
    version: int = -1
    chosen_at: float = 0.0
    # Check-ins arrive on the network thread, selections happen on the publisher's.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, device_id: str, eligible: bool | None) -> None:
        if eligible is None:
            return
        validate_id(device_id, "device id")
        with self._lock:
            if eligible:
                self.eligible.add(device_id)
            else:
                self.eligible.discard(device_id)

    def for_version(self, version: int, now: float) -> tuple[str, ...] | None:
        """The cohort for `version`: chosen once per version, widened after each deadline."""
        if version != self.version:
            self.version, self.cohort = version, self._pick(set(), now)
        elif now >= self.chosen_at + self.deadline_s and self.cohort is not None:
            self.cohort = self._pick(set(self.cohort), now)
        return self.cohort

    def due(self, version: int, now: float) -> bool:
        """Whether `for_version` would now give a different cohort (time to republish)."""
        return version != self.version or (
            # The same sum as the service's next_due: `now - chosen_at >= deadline_s` could
            # round the other way at the very time next_due named.
            self.cohort is not None and now >= self.chosen_at + self.deadline_s)

    def _pick(self, keep: set[str], now: float) -> tuple[str, ...] | None:
        self.chosen_at = now
        with self._lock:
            candidates = sorted(self.eligible - keep)
        if not candidates and not keep:
            return None
        k = math.ceil(self.over_selection * self.cohort_size)
        rng = random.Random(f"{self.seed}:{self.version}:{len(keep)}")
        chosen = rng.sample(candidates, min(k, len(candidates)))
        return tuple(sorted(keep | set(chosen)))[:MAX_COHORT]
