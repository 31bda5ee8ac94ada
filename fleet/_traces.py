"""Seeded device traces for the fleet simulator: what each simulated device is doing, and when.

Time is *sim seconds since the start of the run* (a float). Traces know nothing of the wall clock;
`SimClock` maps wall time to sim time with a scale factor (1440: a simulated day per minute), and
`SimReader` turns a trace into the agent's `ReadingsSource`, so simulated devices go through the
same `agent._policy` code as real ones.

A `DeviceTrace` is plain data: explicit `Intervals` (online, Wi-Fi, charging, owner busy), a battery
model and a few constants. `generate_fleet` draws them from a `FleetProfile`; files with recorded
intervals (issue 9) can build the same objects, and nothing downstream can tell the difference.

Determinism: device ``i`` of seed ``s`` draws each aspect (speed, power, Wi-Fi, busy, churn,
hardware) from its own stream ``SeedSequence(s, spawn_key=(i, aspect))``. So device ``i`` is the
same whatever ``n_devices`` is, and changing, say, the Wi-Fi means does not reshuffle speeds or
batteries: an ablation changes only what it is about.

Traces are defined on ``[0, duration_s)``; past the horizon they show whatever the generator last
drew (a run that overshoots a little still gets sensible readings).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedasync_iot.agent import PolicyConfig, Readings, ReadingsSource, evaluate
from fedasync_iot.models import Bounds, ConfigError, FedAsyncError, bounds, check_fields

DAY_S = 86_400.0
_HOUR = 3_600.0
_INF = math.inf
_TOPIC_UNSAFE = frozenset("/+#\0 ")  # a device id ends up in MQTT topics and broker ACLs

# Charging habits. Nights: plugged in around 22:30 (sd 1 h, 20:00..02:00) for about 7 h
# (sd 1 h, 3..10 h). Daytime top-ups start uniformly in 08:00..20:00 and last Exp(45 min),
# 5 min..3 h. A "rare charger" plugs in on 20% of nights and never by day.
_NIGHT_START_H, _NIGHT_START_SD_H, _NIGHT_START_RANGE_H = 22.5, 1.0, (20.0, 26.0)
_NIGHT_LEN_H, _NIGHT_LEN_SD_H, _NIGHT_LEN_RANGE_H = 7.0, 1.0, (3.0, 10.0)
_DAY_WINDOW_H, _DAY_LEN_MEAN_H, _DAY_LEN_RANGE_H = (8.0, 20.0), 0.75, (5 / 60, 3.0)
_RARE_NIGHT_PROB = 0.2

# One stream per aspect of a device (values are part of the seed contract: do not renumber).
_SPEED, _POWER, _WIFI, _BUSY, _CHURN, _HARDWARE = range(6)

Span = tuple[float, float]


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num(key: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """The range check of an argument (a field declares its range with `_range`)."""
    (Bounds(gt=lo, le=hi) if lo_open else Bounds(ge=lo, le=hi)).check(key, value)


def _int(key: str, value: object, lo: int, hi: float) -> None:
    """The range check of an integer argument (`hi` may be math.inf)."""
    Bounds(ge=lo, le=None if math.isinf(hi) else hi, integer=True).check(key, value)


def _range(lo: float, hi: float, *, lo_open: bool = False,
           optional: bool = False) -> Mapping[str, Bounds]:
    """A number field's range, `lo` excluded where `lo_open`."""
    return (bounds(gt=lo, le=hi, optional=optional) if lo_open else
            bounds(ge=lo, le=hi, optional=optional))


_FRACTION = _range(0.0, 1.0)
_MEAN_S = _range(0.0, 1e12, lo_open=True)
_MINUTE_OF_DAY = bounds(ge=0, le=24 * 60 - 1, integer=True)


# -- intervals ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Intervals:
    """Sorted, disjoint half-open ``[start, end)`` spans of sim seconds; the last may end at inf.

    Spans must not touch (``end < next start``): touching spans are one span, and keeping them
    apart would make `next_change` report a change that is none. `Intervals.of` sorts and merges
    arbitrary pairs (recorded traces); the constructor only validates. Queries are O(log n).
    """

    spans: tuple[Span, ...] = ()
    _starts: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _ends: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _covered: tuple[float, ...] = field(init=False, repr=False, compare=False)  # before span i

    def __post_init__(self) -> None:
        if not isinstance(self.spans, tuple):
            raise ConfigError(f"spans must be a tuple of (start, end), got {self.spans!r}",
                              key="spans")
        prev_end = -_INF
        for i, span in enumerate(self.spans):
            if not (isinstance(span, tuple) and len(span) == 2 and all(map(_real, span))):
                raise ConfigError(f"span {i} must be (start, end) numbers, got {span!r}",
                                  key="spans")
            start, end = span
            last = i == len(self.spans) - 1
            if not (math.isfinite(start) and start >= 0.0 and end > start
                    and (math.isfinite(end) or (last and end == _INF))):
                raise ConfigError(f"span {i} {span!r}: need 0 <= start < end, end finite "
                                  f"(inf only for the last span)", key="spans")
            if start <= prev_end:
                raise ConfigError(f"span {i} {span!r} overlaps or touches the one before "
                                  f"(use Intervals.of to merge)", key="spans")
            prev_end = end
        covered, acc = [], 0.0
        for s, e in self.spans:
            covered.append(acc)
            acc += e - s  # inf only after the last span, never read
        object.__setattr__(self, "_starts", tuple(float(s) for s, _ in self.spans))
        object.__setattr__(self, "_ends", tuple(float(e) for _, e in self.spans))
        object.__setattr__(self, "_covered", tuple(covered))

    @classmethod
    def of(cls, pairs: Iterable[Span]) -> Intervals:
        """Sorted and merged (overlapping or touching pairs become one); empty pairs dropped."""
        merged: list[list[float]] = []
        for start, end in sorted((float(s), float(e)) for s, e in pairs):
            if end <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return cls(tuple((s, e) for s, e in merged))

    @classmethod
    def always(cls) -> Intervals:
        return cls(((0.0, _INF),))

    def __len__(self) -> int:
        return len(self.spans)

    def contains(self, t: float) -> bool:
        i = bisect_right(self._starts, t) - 1
        return i >= 0 and t < self._ends[i]

    def next_change(self, t: float) -> float | None:
        """The first time after ``t`` at which `contains` flips; None if it never does."""
        i = bisect_right(self._starts, t) - 1
        if i >= 0 and t < self._ends[i]:
            return None if self._ends[i] == _INF else self._ends[i]
        return self._starts[i + 1] if i + 1 < len(self._starts) else None

    def measure(self, t0: float, t1: float) -> float:
        """Seconds covered within ``[t0, t1)``."""
        _window(t0, t1)
        return self._covered_before(t1) - self._covered_before(t0)

    def fraction(self, t0: float, t1: float) -> float:
        """Share of ``[t0, t1)`` covered, 0..1."""
        return self.measure(t0, t1) / (t1 - t0)

    def _covered_before(self, t: float) -> float:
        i = bisect_right(self._starts, t) - 1
        if i < 0:
            return 0.0
        return self._covered[i] + min(t, self._ends[i]) - self._starts[i]


def _window(t0: float, t1: float) -> None:
    if not (_real(t0) and _real(t1) and math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
        raise FedAsyncError(f"need a finite window t0 < t1, got [{t0!r}, {t1!r})")


# -- one device --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Battery:
    """Linear battery: drains while not charging, charges while charging, clamped to 0..100%."""

    initial_percent: float = field(default=100.0, metadata=_range(0.0, 100.0))
    # Percentage points per hour, off the charger (idle device).
    drain_per_h: float = field(default=5.0, metadata=_range(0.0, 1e6))
    # Percentage points per hour, on the charger.
    charge_per_h: float = field(default=40.0, metadata=_range(0.0, 1e6))

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceTrace:
    """One simulated device over the run. Only the intervals are required; the rest has defaults.

    ``epoch_s_per_100`` is compute cost, not a multiplier: sim seconds one local epoch over 100
    samples takes on this device (`compute_seconds`). Absolute, so a trace file can state it and
    the simulator needs no reference device; the simulator scales it per model if it must.

    ``online``: the device (its agent process) is present and connected; the simulator starts and
    stops the agent on its boundaries, and readings outside it are meaningless. ``charging`` is
    ignored when ``battery`` is None (mains-powered: readings say no battery, which the policy
    passes). ``busy``: the owner's own workload runs (cpu at ``busy_cpu_percent``).
    """

    device_id: str
    epoch_s_per_100: float = field(metadata=_range(0.0, 1e9, lo_open=True))
    online: Intervals
    wifi: Intervals
    charging: Intervals = field(default_factory=Intervals)
    busy: Intervals = field(default_factory=Intervals)
    battery: Battery | None = None
    cellular: bool = False  # a wwan0 modem is up all the time (metered: the policy refuses it)
    idle_cpu_percent: float = field(default=5.0, metadata=_range(0.0, 100.0))
    busy_cpu_percent: float = field(default=85.0, metadata=_range(0.0, 100.0))
    mem_available_mb: float = field(default=512.0, metadata=_range(0.0, 1e9))
    temperature_c: float | None = field(default=45.0,
                                        metadata=_range(-273.15, 1e4, optional=True))
    # Local time of day at sim time 0.
    start_local_minutes: int = field(default=8 * 60, metadata=_MINUTE_OF_DAY)
    # Battery breakpoints (every charging boundary): time, level there, slope %/s after it.
    _bp_t: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _bp_level: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _bp_slope: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (not isinstance(self.device_id, str) or not self.device_id
                or _TOPIC_UNSAFE & set(self.device_id)):
            raise ConfigError(f"device_id must be a non-empty name without / + # or spaces, "
                              f"got {self.device_id!r}", key="device_id")
        check_fields(self)
        for key in ("online", "wifi", "charging", "busy"):
            if not isinstance(getattr(self, key), Intervals):
                raise ConfigError(f"{key} must be Intervals, got {getattr(self, key)!r}", key=key)
        if self.battery is not None and not isinstance(self.battery, Battery):
            raise ConfigError(f"battery must be a Battery or None, got {self.battery!r}",
                              key="battery")
        if not isinstance(self.cellular, bool):
            raise ConfigError("cellular must be true or false", key="cellular")
        self._precompute_battery()

    def _precompute_battery(self) -> None:
        ts: list[float] = []
        levels: list[float] = []
        slopes: list[float] = []
        b = self.battery
        if b is not None:
            charge, drain = b.charge_per_h / _HOUR, -b.drain_per_h / _HOUR
            ts = [0.0] + [x for s, e in self.charging.spans for x in (s, e) if 0.0 < x < _INF]
            level = b.initial_percent
            for i, t in enumerate(ts):
                if i:  # integrate the previous segment; clamping at its end is exact (monotone)
                    level = min(max(level + slopes[-1] * (t - ts[i - 1]), 0.0), 100.0)
                levels.append(level)
                slopes.append(charge if self.charging.contains(t) else drain)
        object.__setattr__(self, "_bp_t", tuple(ts))
        object.__setattr__(self, "_bp_level", tuple(levels))
        object.__setattr__(self, "_bp_slope", tuple(slopes))

    def battery_at(self, t: float) -> float | None:
        """Battery percent at sim time ``t`` (the initial level before 0); None when mains."""
        if self.battery is None:
            return None
        i = max(bisect_right(self._bp_t, t) - 1, 0)
        level = self._bp_level[i] + self._bp_slope[i] * max(t - self._bp_t[i], 0.0)
        return min(max(level, 0.0), 100.0)

    def compute_seconds(self, n_samples: int, epochs: int = 1) -> float:
        """Sim seconds of local training: linear in samples and epochs."""
        return self.epoch_s_per_100 * epochs * n_samples / 100.0

    def local_minutes_at(self, t: float) -> int:
        return int((self.start_local_minutes * 60.0 + t) // 60.0) % (24 * 60)

    def readings_at(self, t: float, *, wall_time: float) -> Readings:
        """What a psutil reader on this device would report at sim time ``t``."""
        if not (_real(t) and math.isfinite(t)):
            raise FedAsyncError(f"sim time must be a finite number, got {t!r}")
        t = float(t)  # a numpy scalar would make every comparison below a numpy bool
        wifi = ("wlan0",) if self.wifi.contains(t) else ()
        mains = self.battery is None
        return Readings(
            battery_percent=self.battery_at(t),
            charging=None if mains else self.charging.contains(t),  # as psutil: no battery, None
            interfaces_up=wifi + (("wwan0",) if self.cellular else ()),
            cpu_percent=self.busy_cpu_percent if self.busy.contains(t) else self.idle_cpu_percent,
            mem_available_mb=self.mem_available_mb,
            temperature_c=self.temperature_c,
            local_minutes=self.local_minutes_at(t),
            taken_at=wall_time,
        )


# -- the fleet ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetProfile:
    """How `generate_fleet` draws a fleet. Durations are sim seconds; fractions are of devices.

    Every device: compute cost log-normal (median ``speed_median_s``, log-sd ``speed_sigma``: a
    heavy right tail of stragglers); Wi-Fi on/off periods Exp(``wifi_on_mean_s``) /
    Exp(``wifi_off_mean_s``), and with ``wifi_home_overnight`` also on while charging overnight
    (at home); owner busy periods Exp(``busy_mean_s``) every Exp(``idle_mean_s``). Churn: a
    ``late_join_fraction`` joins uniformly in the first half of the run, an
    ``early_leave_fraction`` leaves uniformly between joining and the end, a ``flap_fraction``
    drops out for Exp(``flap_off_mean_s``) after every Exp(``flap_on_mean_s``) online.
    Power: ``mains_fraction`` has no battery; of the rest, ``rare_charger_fraction`` charge on 20%
    of nights only, the others on a ``night_charge_prob`` of nights (~22:30 for ~7 h) plus
    Poisson(``day_charges_per_day``) daytime top-ups; drain and charge rates uniform in the
    given ranges, initial level uniform in 30..100%.
    """

    n_devices: int = field(default=100, metadata=bounds(ge=0, le=10_000_000, integer=True))
    # SeedSequence entropy must be non-negative.
    seed: int = field(default=0, metadata=bounds(ge=0, integer=True))
    duration_s: float = field(default=DAY_S, metadata=_range(0.0, 1e12, lo_open=True))
    start_local_minutes: int = field(default=8 * 60, metadata=_MINUTE_OF_DAY)
    id_prefix: str = "sim-"
    # Sim s per local epoch per 100 samples.
    speed_median_s: float = field(default=2.0, metadata=_range(0.0, 1e9, lo_open=True))
    # p90/p50 = exp(1.28 * sigma) = 2.8x
    speed_sigma: float = field(default=0.8, metadata=_range(0.0, 10.0))
    mains_fraction: float = field(default=0.2, metadata=_FRACTION)
    cellular_fraction: float = field(default=0.3, metadata=_FRACTION)
    rare_charger_fraction: float = field(default=0.15, metadata=_FRACTION)
    night_charge_prob: float = field(default=0.9, metadata=_FRACTION)
    day_charges_per_day: float = field(default=0.5, metadata=_range(0.0, 1e3))
    drain_per_h: tuple[float, float] = (3.0, 10.0)
    charge_per_h: tuple[float, float] = (25.0, 60.0)
    wifi_on_mean_s: float = field(default=2 * _HOUR, metadata=_MEAN_S)
    wifi_off_mean_s: float = field(default=40 * 60.0, metadata=_MEAN_S)
    wifi_home_overnight: bool = True
    busy_mean_s: float = field(default=15 * 60.0, metadata=_MEAN_S)
    idle_mean_s: float = field(default=2 * _HOUR, metadata=_MEAN_S)
    late_join_fraction: float = field(default=0.2, metadata=_FRACTION)
    early_leave_fraction: float = field(default=0.1, metadata=_FRACTION)
    flap_fraction: float = field(default=0.2, metadata=_FRACTION)
    flap_on_mean_s: float = field(default=_HOUR, metadata=_MEAN_S)
    flap_off_mean_s: float = field(default=10 * 60.0, metadata=_MEAN_S)

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.id_prefix, str) or _TOPIC_UNSAFE & set(self.id_prefix):
            raise ConfigError(f"id_prefix must be a name without / + # or spaces, "
                              f"got {self.id_prefix!r}", key="id_prefix")
        for key in ("drain_per_h", "charge_per_h"):
            r = getattr(self, key)
            if not (isinstance(r, tuple) and len(r) == 2 and all(map(_real, r))
                    and 0.0 <= r[0] <= r[1] < 1e6):
                raise ConfigError(f"{key} must be [low, high] with 0 <= low <= high, got {r!r}",
                                  key=key)
        if not isinstance(self.wifi_home_overnight, bool):
            raise ConfigError("wifi_home_overnight must be true or false",
                              key="wifi_home_overnight")


def generate_fleet(profile: FleetProfile) -> list[DeviceTrace]:
    """``profile.n_devices`` traces; the same profile always gives the same fleet."""
    return [generate_device(profile, i) for i in range(profile.n_devices)]


def generate_device(profile: FleetProfile, index: int) -> DeviceTrace:
    """Device ``index`` of the fleet, independent of ``profile.n_devices``."""
    _int("index", index, 0, math.inf)
    p, horizon = profile, profile.duration_s

    def rng(aspect: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(p.seed, spawn_key=(index, aspect)))

    speed = p.speed_median_s * math.exp(p.speed_sigma * float(rng(_SPEED).standard_normal()))
    battery, charging, nights = _power(p, rng(_POWER))
    wifi = _renewal(rng(_WIFI), p.wifi_on_mean_s, p.wifi_off_mean_s, 0.0, horizon)
    if p.wifi_home_overnight:
        wifi += nights
    busy = _renewal(rng(_BUSY), p.busy_mean_s, p.idle_mean_s, 0.0, horizon)

    g = rng(_CHURN)
    # Fixed number of draws before the variable-length flapping, so each fraction changes only
    # the devices it is about.
    late, join_u, leaves, leave_u, flaps = g.random(5).tolist()
    join = join_u * horizon / 2 if late < p.late_join_fraction else 0.0
    leave = join + leave_u * (horizon - join) if leaves < p.early_leave_fraction else _INF
    if flaps < p.flap_fraction:
        online = _renewal(g, p.flap_on_mean_s, p.flap_off_mean_s, join, min(leave, horizon),
                          start_on=True)
        if leave < _INF:
            online = [(s, min(e, leave)) for s, e in online]
    else:
        online = [(join, leave)]

    h = rng(_HARDWARE)
    cellular, idle_cpu, busy_cpu, mem, temp = h.random(5).tolist()
    return DeviceTrace(
        device_id=f"{p.id_prefix}{index:05d}",
        epoch_s_per_100=speed,
        online=Intervals.of(online),
        wifi=Intervals.of(wifi),
        charging=charging,
        busy=Intervals.of(busy),
        battery=battery,
        cellular=cellular < p.cellular_fraction,
        idle_cpu_percent=round(2.0 + 13.0 * idle_cpu, 1),  # background load, under the 30% limit
        busy_cpu_percent=round(60.0 + 35.0 * busy_cpu, 1),
        mem_available_mb=round(200.0 + 1300.0 * mem),  # Pi Zero 2 .. Pi 4: plenty for a fit
        temperature_c=round(35.0 + 20.0 * temp, 1),  # modest: under the 70 C limit
        start_local_minutes=p.start_local_minutes,
    )


def _renewal(g: np.random.Generator, on_mean: float, off_mean: float, t0: float, t1: float,
             *, start_on: bool | None = None) -> list[Span]:
    """Alternating Exp(on_mean) on / Exp(off_mean) off periods covering [t0, t1).

    Starts in the stationary state unless told (exponential periods are memoryless, so the
    first period needs no special length). The last on-span may run past ``t1``.
    """
    on = bool(g.random() < on_mean / (on_mean + off_mean)) if start_on is None else start_on
    spans, t = [], t0
    while t < t1:
        d = float(g.exponential(on_mean if on else off_mean))
        if on:
            spans.append((t, t + d))
        t, on = t + d, not on
    return spans


def _power(p: FleetProfile, g: np.random.Generator) -> tuple[Battery | None, Intervals,
                                                             list[Span]]:
    """(battery, charging intervals, overnight charging spans) for one device."""
    # Fixed draws first (see generate_device).
    mains, rare, initial, drain, charge = g.random(5).tolist()
    if mains < p.mains_fraction:
        return None, Intervals(), []
    is_rare = rare < p.rare_charger_fraction
    night_prob = _RARE_NIGHT_PROB if is_rare else p.night_charge_prob
    day_rate = 0.0 if is_rare else p.day_charges_per_day
    # Local day k starts (midnight) at sim time k*DAY - offset; cover the night before sim 0.
    offset = p.start_local_minutes * 60.0
    days = range(-1, math.floor((p.duration_s + offset) / DAY_S) + 1)  # local days in the run
    # All nights first, then the variable number of top-ups: the top-up rate cannot move nights.
    n = len(days)
    use, start_z, len_z = g.random(n), g.standard_normal(n), g.standard_normal(n)
    start_h = np.clip(_NIGHT_START_H + _NIGHT_START_SD_H * start_z, *_NIGHT_START_RANGE_H)
    len_h = np.clip(_NIGHT_LEN_H + _NIGHT_LEN_SD_H * len_z, *_NIGHT_LEN_RANGE_H)
    midnights = [k * DAY_S - offset for k in days]
    nights = [(m + s * _HOUR, m + (s + d) * _HOUR) for m, u, s, d in zip(
        midnights, use.tolist(), start_h.tolist(), len_h.tolist(), strict=True) if u < night_prob]
    tops = []
    for m in midnights:
        for _ in range(int(g.poisson(day_rate))):
            s = float(g.uniform(*_DAY_WINDOW_H))
            d = min(max(float(g.exponential(_DAY_LEN_MEAN_H)), _DAY_LEN_RANGE_H[0]),
                    _DAY_LEN_RANGE_H[1])
            tops.append((m + s * _HOUR, m + (s + d) * _HOUR))
    nights = _clip(nights, p.duration_s)
    battery = Battery(
        initial_percent=round(30.0 + 70.0 * initial, 1),
        drain_per_h=p.drain_per_h[0] + (p.drain_per_h[1] - p.drain_per_h[0]) * drain,
        charge_per_h=p.charge_per_h[0] + (p.charge_per_h[1] - p.charge_per_h[0]) * charge,
    )
    return battery, Intervals.of(nights + _clip(tops, p.duration_s)), nights


def _clip(spans: Sequence[Span], horizon: float) -> list[Span]:
    """Spans that overlap [0, horizon), cut at 0 (a span may run past the horizon)."""
    return [(max(s, 0.0), e) for s, e in spans if e > 0.0 and s < horizon]


# -- clock and reader --------------------------------------------------------------------------


class SimClock:
    """Wall time <-> sim time: ``sim = (wall - start_wall) * scale``; one clock per simulation.

    ``scale`` is sim seconds per wall second (1440: a day per minute). Give the agents
    `sim_now` as their monotonic clock too, so the policy's dwell and the training interval are
    sim durations like everything else. ``wall`` is injectable for tests.
    """

    __slots__ = ("scale", "start_wall", "wall")

    def __init__(self, scale: float, start_wall: float | None = None, *,
                 wall: Callable[[], float] = time.time) -> None:
        _num("scale", scale, 0.0, 1e9, lo_open=True)
        self.scale = float(scale)
        self.wall = wall
        self.start_wall = wall() if start_wall is None else float(start_wall)

    def sim_now(self) -> float:
        # Clamped: before the start every trace shows its state at 0, not a negative time.
        return max((self.wall() - self.start_wall) * self.scale, 0.0)

    def to_wall(self, sim_s: float) -> float:
        return self.start_wall + sim_s / self.scale

    def to_sim(self, wall_t: float) -> float:
        return (wall_t - self.start_wall) * self.scale


class SimReader(ReadingsSource):
    """The agent's `ReadingsSource` for a simulated device: its trace at the clock's sim time."""

    def __init__(self, trace: DeviceTrace, clock: SimClock) -> None:
        self.trace = trace
        self.clock = clock

    def read(self) -> Readings:
        t = self.clock.sim_now()
        return self.trace.readings_at(t, wall_time=self.clock.to_wall(t))


# -- summary -----------------------------------------------------------------------------------


def summarize(traces: Sequence[DeviceTrace], duration_s: float, *,
              policy: PolicyConfig | None = None, step_s: float = 300.0) -> dict[str, float]:
    """Fleet statistics over ``[0, duration_s)``, for the benchmark reports (docs/benchmarks.md).

    Fractions are means over devices of the share of time in each state (``charging``: battery
    devices only). ``eligible``: share of device-time online and passing `evaluate` with its
    strict thresholds (no dwell, no hysteresis: "could start training now"), sampled at the
    midpoints of a ``step_s`` grid; ``eligible_devices_mean`` / ``_min``: devices eligible at
    once, over the same grid (what a synchronous round can hope to recruit).
    """
    if not traces:
        raise FedAsyncError("summarize needs at least one trace")
    _window(0.0, duration_s)
    _num("step_s", step_s, 0.0, duration_s, lo_open=True)
    policy = policy or PolicyConfig()
    grid = [(j + 0.5) * step_s for j in range(math.ceil(duration_s / step_s))]
    grid = [t for t in grid if t < duration_s]
    eligible = np.array([[tr.online.contains(t) and evaluate(
        tr.readings_at(t, wall_time=0.0), policy).eligible for t in grid] for tr in traces])
    p10, p50, p90 = np.percentile([tr.epoch_s_per_100 for tr in traces], [10, 50, 90])
    battery = [tr for tr in traces if tr.battery is not None]

    def mean_fraction(items: Sequence[DeviceTrace], attr: str) -> float:
        return float(np.mean([getattr(tr, attr).fraction(0.0, duration_s) for tr in items])
                     ) if items else 0.0

    per_t = eligible.sum(axis=0)
    return {
        "n_devices": len(traces),
        "duration_s": float(duration_s),
        "speed_p10": float(p10), "speed_p50": float(p50), "speed_p90": float(p90),
        "mains": 1.0 - len(battery) / len(traces),
        "online": mean_fraction(traces, "online"),
        "wifi": mean_fraction(traces, "wifi"),
        "charging": mean_fraction(battery, "charging"),
        "busy": mean_fraction(traces, "busy"),
        "eligible": float(eligible.mean()),
        "eligible_devices_mean": float(per_t.mean()),
        "eligible_devices_min": int(per_t.min()),
    }
