"""Eligibility policy: the agent trains only when the device allows it.

`evaluate` is a pure function of one `Readings`; `EligibilityGate` adds the memory that keeps
the decision from flapping. The rule, in full:

* Checks: power, network, cpu, memory, temperature, time window. Eligible iff all pass.
  Boundaries pass (battery == min, cpu == max, ...); a time window is [start, end).
* Hysteresis: while eligible, the battery, cpu and temperature thresholds are relaxed by their
  margins (80% -> 75%, 30% -> 40%, 70 C -> 75 C), so training's own drain and heat, or a noisy
  reading, do not stop it at the first wobble. A fresh device gets the strict thresholds.
* Leaving is immediate: any failed check (with the relaxed thresholds) ends eligibility at the
  next `update`, with no dwell: unplugged below the threshold, metered network only, too hot,
  busy, low memory, outside the window all mean "stop now".
* Entering needs dwell: checks must pass (strict thresholds) at every `update` for at least
  ``min_dwell_s`` in a row; one failure restarts the count. So a loose charger or a device that
  hovers at the threshold cannot make training start and stop every few seconds. At start-up
  the count starts at the first passing `update` (``min_dwell_s=0`` makes it immediate).

* Site checks (`agent._hooks`, the config's ``eligibility_hooks``) are extra rows computed by
  the caller and passed to `evaluate` (or given to the gate), so `evaluate` stays pure. They
  have no margins; otherwise they count like any other check, dwell included.

Missing readings: no battery means mains power (passes); no temperature sensor passes (many
boards have none) and says "unavailable"; unknown charging counts as not charging; missing cpu
or memory fails closed: training on a device we cannot see could harm its real work.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from fedasync_iot.agent._readings import Readings
from fedasync_iot.models import ConfigError, FedAsyncError, bounds, check_fields

_DAY = 24 * 60
# Written [0, inf] in messages, as fleet files and operators have long read it.
_AT_LEAST_0 = bounds(ge=0, le=math.inf)


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """When a device may train; the rules are in the module docstring."""

    # On battery and not charging.
    min_battery_percent: float = field(default=80.0, metadata=bounds(ge=0, le=100))
    require_charging: bool = False  # battery devices train only while charging
    # Case-sensitive fnmatch patterns; a name matching a denied pattern is never usable (metered:
    # cellular, tethering), whatever the allowed ones say.
    allowed_interfaces: tuple[str, ...] = ("eth*", "en*", "wlan*", "wl*")
    denied_interfaces: tuple[str, ...] = ("wwan*", "ppp*", "usb*", "rmnet*")
    max_cpu_percent: float = field(default=30.0, metadata=bounds(ge=0, le=100))
    min_mem_available_mb: float = field(default=150.0, metadata=_AT_LEAST_0)
    max_temperature_c: float = field(default=70.0, metadata=bounds(ge=-273.15, le=math.inf))
    time_window: tuple[int, int] | None = None  # minutes since midnight [start, end); may wrap
    battery_margin: float = field(default=5.0, metadata=_AT_LEAST_0)
    temperature_margin: float = field(default=5.0, metadata=_AT_LEAST_0)
    cpu_margin: float = field(default=10.0, metadata=_AT_LEAST_0)
    min_dwell_s: float = field(default=60.0, metadata=_AT_LEAST_0)

    def __post_init__(self) -> None:
        if not isinstance(self.require_charging, bool):
            raise ConfigError("require_charging must be true or false", key="require_charging")
        check_fields(self)
        for name in ("allowed_interfaces", "denied_interfaces"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(p, str) and p for p in value):
                raise ConfigError(f"{name} must be a list of name patterns, got {value!r}",
                                  key=name)
        if not self.allowed_interfaces:
            raise ConfigError("allowed_interfaces is empty: the device could never train",
                              key="allowed_interfaces")
        w = self.time_window
        if w is not None and not (
            isinstance(w, tuple) and len(w) == 2
            and all(isinstance(m, int) and not isinstance(m, bool) and 0 <= m < _DAY for m in w)
            and w[0] != w[1]
        ):
            raise ConfigError(
                f"time_window must be [start, end] minutes since midnight, each 0..1439 and "
                f"different (omit it for any time), got {w!r}", key="time_window")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    passed: bool
    reading: str  # e.g. "64%, not charging"
    threshold: str  # e.g. ">= 80% or charging"


@dataclass(frozen=True, slots=True)
class Decision:
    eligible: bool
    checks: tuple[Check, ...]
    reason: str  # one line: the failures, or "all checks passed" (+ why it was held)
    held: bool = False  # the previous state was kept by dwell or hysteresis

    def __post_init__(self) -> None:
        if self.eligible and self.failed:
            raise FedAsyncError(f"a decision cannot be eligible with failed checks: {self.reason}")

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "eligible": self.eligible,
            "held": self.held,
            "reason": self.reason,
            "checks": [
                {"name": c.name, "passed": c.passed, "reading": c.reading, "threshold": c.threshold}
                for c in self.checks
            ],
        }


def _n(x: float) -> str:
    """64.0 -> "64", 72.25 -> "72.2": readings are for humans."""
    return f"{x:.1f}".removesuffix(".0")


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


# Each check returns (Check, phrase for the reason line when it fails).
def _power(r: Readings, c: PolicyConfig, relax: bool) -> tuple[Check, str]:
    if r.battery_percent is None:
        return Check("power", True, "mains", _power_threshold(c, relax)), ""
    pct, charging = r.battery_percent, r.charging is True
    state = {True: "charging", False: "not charging", None: "charging unknown"}[r.charging]
    reading = f"{_n(pct)}%, {state}"
    if c.require_charging:
        return (Check("power", charging, reading, "charging"),
                f"battery {_n(pct)}% {state}, charging required")
    limit = c.min_battery_percent - (c.battery_margin if relax else 0.0)
    return (Check("power", charging or pct >= limit, reading, _power_threshold(c, relax)),
            f"battery {_n(pct)}% < {_n(limit)}% and {state}")


def _power_threshold(c: PolicyConfig, relax: bool) -> str:
    if c.require_charging:
        return "charging"
    limit = c.min_battery_percent - (c.battery_margin if relax else 0.0)
    return f">= {_n(limit)}% or charging" + (" (hysteresis)" if relax else "")


def _network(r: Readings, c: PolicyConfig, relax: bool) -> tuple[Check, str]:
    def usable(name: str) -> bool:
        return (any(fnmatchcase(name, p) for p in c.allowed_interfaces)
                and not any(fnmatchcase(name, p) for p in c.denied_interfaces))

    reading = ", ".join(r.interfaces_up) or "none up"
    threshold = "|".join(c.allowed_interfaces)
    if c.denied_interfaces:
        threshold += ", not " + "|".join(c.denied_interfaces)
    return (Check("network", any(map(usable, r.interfaces_up)), reading, threshold),
            f"no allowed network ({reading})")


def _cpu(r: Readings, c: PolicyConfig, relax: bool) -> tuple[Check, str]:
    limit = c.max_cpu_percent + (c.cpu_margin if relax else 0.0)
    threshold = f"<= {_n(limit)}%" + (" (hysteresis)" if relax else "")
    if r.cpu_percent is None:
        return Check("cpu", False, "unavailable", threshold), "cpu unavailable"
    return (Check("cpu", r.cpu_percent <= limit, f"{_n(r.cpu_percent)}%", threshold),
            f"cpu {_n(r.cpu_percent)}% > {_n(limit)}%")


def _memory(r: Readings, c: PolicyConfig, relax: bool) -> tuple[Check, str]:
    threshold = f">= {_n(c.min_mem_available_mb)} MB"
    if r.mem_available_mb is None:
        return Check("memory", False, "unavailable", threshold), "memory unavailable"
    mem = r.mem_available_mb
    return (Check("memory", mem >= c.min_mem_available_mb, f"{_n(mem)} MB", threshold),
            f"memory {_n(mem)} MB < {_n(c.min_mem_available_mb)} MB")


def _temperature(r: Readings, c: PolicyConfig, relax: bool) -> tuple[Check, str]:
    limit = c.max_temperature_c + (c.temperature_margin if relax else 0.0)
    threshold = f"<= {_n(limit)} C" + (" (hysteresis)" if relax else "")
    if r.temperature_c is None:
        return Check("temperature", True, "unavailable", threshold), ""
    t = r.temperature_c
    return (Check("temperature", t <= limit, f"{_n(t)} C", threshold),
            f"temperature {_n(t)} C > {_n(limit)} C")


def _window(r: Readings, c: PolicyConfig, relax: bool) -> tuple[Check, str]:
    now = _hhmm(r.local_minutes)
    if c.time_window is None:
        return Check("time_window", True, now, "any time"), ""
    start, end = c.time_window
    m = r.local_minutes
    inside = start <= m < end if start < end else (m >= start or m < end)  # wraps midnight
    span = f"{_hhmm(start)}-{_hhmm(end)}"
    return Check("time_window", inside, now, span), f"time {now} outside {span}"


_CHECKS = (_power, _network, _cpu, _memory, _temperature, _window)


# A check computed outside the policy (a site hook): readings -> (Check, phrase when it fails).
ExtraCheck = Callable[[Readings], tuple[Check, str]]


def evaluate(readings: Readings, config: PolicyConfig, *, was_eligible: bool = False,
             extra: Sequence[tuple[Check, str]] = ()) -> Decision:
    """One `Check` per condition, then the `extra` ones (already computed, e.g. site hooks);
    ``was_eligible`` relaxes the built-in thresholds by the margins.

    ``held`` is True when the device passes only thanks to the margins (it would not start now).
    """
    results = [check(readings, config, was_eligible) for check in _CHECKS] + list(extra)
    failures = [why for chk, why in results if not chk.passed]
    checks = tuple(chk for chk, _ in results)
    if failures:
        return Decision(False, checks, "; ".join(failures))
    if was_eligible:  # the extra checks have no margins: they passed strictly already
        strict = [why for chk, why in (f(readings, config, False) for f in _CHECKS)
                  if not chk.passed]
        if strict:
            return Decision(True, checks, "all checks passed; kept by hysteresis: "
                            + "; ".join(strict), held=True)
    return Decision(True, checks, "all checks passed")


class EligibilityGate:
    """The last decision plus the dwell rule (module docstring); safe to share between threads.

    Call `update` before training and between epochs, and also periodically (every few seconds)
    while idle: the dwell counts consecutive passing updates, so it is only as fine as the polling.
    ``now`` should be ``time.monotonic()`` (immune to clock changes); if it goes backwards the
    dwell count restarts. ``extra_checks`` (site hooks) are called once per `update`.
    """

    def __init__(self, config: PolicyConfig, *, extra_checks: Sequence[ExtraCheck] = ()) -> None:
        self.config = config
        self.extra_checks = tuple(extra_checks)
        self._lock = threading.Lock()
        self._eligible = False
        self._passing_since: float | None = None
        self._changed_at: float | None = None
        self._last: Decision | None = None

    @property
    def eligible(self) -> bool:
        return self._eligible

    @property
    def last(self) -> Decision | None:
        return self._last

    @property
    def changed_at(self) -> float | None:
        """``now`` of the update that last flipped `eligible` (None: never)."""
        return self._changed_at

    def update(self, readings: Readings, *, now: float) -> Decision:
        with self._lock:
            d = self._decide(readings, now)
            if d.eligible != self._eligible:
                self._eligible, self._changed_at = d.eligible, now
            self._last = d
            return d

    def _decide(self, readings: Readings, now: float) -> Decision:
        extra = [check(readings) for check in self.extra_checks]
        d = evaluate(readings, self.config, was_eligible=self._eligible, extra=extra)
        if not d.eligible:  # leaving is immediate
            self._passing_since = None
            return d
        if self._eligible:
            return d
        if self._passing_since is None or now < self._passing_since:
            self._passing_since = now
        waited = now - self._passing_since
        if waited >= self.config.min_dwell_s:
            return d
        return Decision(False, d.checks, f"all checks passed; waiting for dwell: "
                        f"{waited:.0f}s of {_n(self.config.min_dwell_s)}s", held=True)


def format_decision(decision: Decision) -> str:
    """A small table for the CLI: one row per check with reading, threshold and PASS/FAIL."""
    head = f"eligible: {'yes' if decision.eligible else 'no'} ({decision.reason})"
    rows = [("check", "reading", "threshold", "result")] + [
        (c.name, c.reading, c.threshold, "PASS" if c.passed else "FAIL") for c in decision.checks
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    ]
    return "\n".join([head, *lines])
