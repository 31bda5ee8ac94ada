"""What the device reports about itself, for the eligibility policy.

`Readings` is one snapshot; a `ReadingsSource` produces them: `PsutilReader` from the real machine,
`StaticReader` (and later the fleet simulator's trace-driven source) without touching it.
psutil is imported inside `PsutilReader` only, so the policy and the simulator run without it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fedasync_iot.models import ConfigError, FedAsyncError

log = logging.getLogger(__name__)
T = TypeVar("T")
_MIB = 1024 * 1024
_LOOPBACK = re.compile(r"lo\d*")  # Linux "lo", BSD/macOS "lo0"; not "lowpan0" (6LoWPAN radios)


@dataclass(frozen=True, slots=True, kw_only=True)
class Readings:
    """One snapshot of the device. ``None`` means "this device cannot tell" (see each field)."""

    battery_percent: float | None  # None: no battery, mains-powered
    charging: bool | None  # on external power; None: unknown (or mains)
    interfaces_up: tuple[str, ...]  # up interfaces, loopback excluded
    cpu_percent: float | None  # system-wide 0..100 (PsutilReader: excluding the agent itself)
    mem_available_mb: float | None  # MiB available to new work without swapping
    temperature_c: float | None  # hottest sensor; None: no sensors
    local_minutes: int  # minutes since local midnight, 0..1439
    taken_at: float  # unix time

    def __post_init__(self) -> None:
        # A simulated or faulty source can produce nonsense; refuse it here rather than let a
        # NaN silently pass (NaN compares False both ways) or fail every check.
        _check_range("battery_percent", self.battery_percent, 0.0, 100.0)
        _check_range("cpu_percent", self.cpu_percent, 0.0, 100.0)
        _check_range("mem_available_mb", self.mem_available_mb, 0.0, math.inf)
        _check_range("temperature_c", self.temperature_c, -273.15, math.inf)
        _check_range("taken_at", self.taken_at, 0.0, math.inf)
        if self.charging is not None and not isinstance(self.charging, bool):
            raise FedAsyncError(f"readings: charging must be a bool or None, got {self.charging!r}")
        if not isinstance(self.interfaces_up, tuple) or not all(
            isinstance(n, str) and n for n in self.interfaces_up
        ):
            raise FedAsyncError(
                f"readings: interfaces_up must be a tuple of names, got {self.interfaces_up!r}"
            )
        if (
            isinstance(self.local_minutes, bool)
            or not isinstance(self.local_minutes, int)
            or not 0 <= self.local_minutes < 24 * 60
        ):
            raise FedAsyncError(
                f"readings: local_minutes must be an int in 0..1439, got {self.local_minutes!r}"
            )


def _check_range(name: str, value: float | None, lo: float, hi: float) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise FedAsyncError(f"readings: {name} must be a number in [{lo}, {hi}], got {value!r}")


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


class ReadingsSource(Protocol):
    def read(self) -> Readings: ...


class StaticReader(ReadingsSource):
    """Always returns `readings` (tests, demos); assign the attribute to change what it reports."""

    def __init__(self, readings: Readings) -> None:
        self.readings = readings

    def read(self) -> Readings:
        return self.readings


class PsutilReader(ReadingsSource):
    """Readings from this machine through psutil; never raises once constructed.

    Each reading is taken separately: a psutil call that fails (``OSError``, a function missing
    on this platform, ``NotImplementedError``, ``psutil.Error``) gives ``None`` for that reading
    and a debug log, so a broken sensor degrades one check instead of stopping the agent.

    CPU: the percentage is the average since the previous `read` (the constructor takes the first
    sample), from ``psutil.cpu_times()`` deltas kept in this object. Not
    ``psutil.cpu_percent(interval=None)``: its previous sample is kept per calling thread (a
    constructor on one thread primes nothing for a reader on another; the first call returns a
    meaningless 0.0) and shared with any other caller on that thread. Poll every few seconds; a
    `read` within the same clock tick as the previous one repeats the last value; the first `read`
    after ``cpu_times`` failed gives None (no previous sample to compare with).

    With ``exclude_self`` (the default) CPU time used by this process and its children (a
    training subprocess) is subtracted: the policy
    asks "is the device busy with other work", and the agent's own training must not make it
    stop itself (a single-threaded fit is 100% of a Pi Zero).
    """

    def __init__(self, *, exclude_self: bool = True) -> None:
        try:
            import psutil  # lazy: the policy and the simulator run without psutil
        except ImportError as exc:
            raise ConfigError(
                "PsutilReader needs psutil: install fedasync-iot[agent]", key="psutil"
            ) from exc
        self._ps: Any = psutil
        self._errors: tuple[type[BaseException], ...] = (
            OSError, AttributeError, NotImplementedError, ValueError, psutil.Error,
        )
        self._proc: Any = self._safe("process", psutil.Process) if exclude_self else None
        self._last_cpu: float | None = None
        self._prev = self._cpu_sample()

    def read(self) -> Readings:
        now = time.time()
        lt = time.localtime(now)
        battery = self._ps_call("sensors_battery")  # None: no battery
        return Readings(
            # Clamped: some firmware reports 100.4% (energy_now > energy_full).
            battery_percent=None if battery is None else _clamp(float(battery.percent), 0.0, 100.0),
            # power_plugged is None when the OS cannot tell: "unknown", which the policy treats
            # as not charging.
            charging=None if battery is None else battery.power_plugged,
            interfaces_up=self._safe("interfaces", self._interfaces) or (),
            cpu_percent=self._cpu_percent(),
            mem_available_mb=self._safe(
                "memory", lambda: max(self._ps.virtual_memory().available, 0) / _MIB
            ),
            temperature_c=self._safe("temperature", self._temperature),
            local_minutes=lt.tm_hour * 60 + lt.tm_min,
            taken_at=now,
        )

    def _ps_call(self, name: str) -> Any:
        """``psutil.<name>()``, or None; looked up in here, as some are missing on some OSes."""
        def call() -> Any:
            return getattr(self._ps, name)()

        return self._safe(name, call)

    def _safe(self, what: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except self._errors as exc:
            log.debug("reading %s unavailable: %s: %s", what, type(exc).__name__, exc)
            return None

    def _interfaces(self) -> tuple[str, ...]:
        stats = self._ps.net_if_stats()
        return tuple(
            sorted(
                name for name, st in stats.items()
                if st.isup and not _LOOPBACK.fullmatch(name)
                and "loopback" not in getattr(st, "flags", "").split(",")
            )
        )

    def _temperature(self) -> float | None:
        # AttributeError on platforms without sensors_temperatures (macOS, Windows): see _safe.
        currents = [
            float(t.current)
            for entries in self._ps.sensors_temperatures().values()
            for t in entries
            if t.current is not None and math.isfinite(t.current) and t.current > -273.15
        ]
        return max(currents) if currents else None

    def _cpu_sample(self) -> tuple[float, float, float] | None:
        """(total, busy, own) CPU seconds summed over all CPUs, or None when unreadable."""
        t = self._ps_call("cpu_times")
        if t is None:
            return None
        # As psutil does: on Linux guest time is already inside user/nice; iowait is idle.
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        busy = total - t.idle - getattr(t, "iowait", 0.0)
        own = 0.0
        if self._proc is not None:
            pt = self._safe("own cpu", self._proc.cpu_times)
            if pt is None:
                return None
            own = pt.user + pt.system + pt.children_user + pt.children_system
            # A training child process still running: its time is not in children_* yet.
            for child in self._safe("children", lambda: self._proc.children(recursive=True)) or ():
                ct = self._safe("child cpu", child.cpu_times)
                if ct is not None:
                    own += ct.user + ct.system
        return total, busy, own

    def _cpu_percent(self) -> float | None:
        cur, prev = self._cpu_sample(), self._prev
        if cur is None:
            return None
        self._prev = cur
        if prev is None:
            return None
        d_total = cur[0] - prev[0]
        if d_total <= 0:  # same tick as the previous read
            return self._last_cpu
        other = (cur[1] - prev[1]) - (cur[2] - prev[2])
        self._last_cpu = round(_clamp(100.0 * other / d_total, 0.0, 100.0), 1)
        return self._last_cpu
