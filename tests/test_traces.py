"""Device traces: intervals, battery, seeded fleets, readings through the real policy."""

from __future__ import annotations

import dataclasses
import math
import pickle
from typing import Any

import numpy as np
import pytest

from fedasync_iot.agent._policy import EligibilityGate, PolicyConfig, evaluate
from fedasync_iot.agent._readings import ReadingsSource
from fedasync_iot.fleet._traces import (
    DAY_S,
    Battery,
    DeviceTrace,
    FleetProfile,
    Intervals,
    SimClock,
    SimReader,
    generate_device,
    generate_fleet,
    summarize,
)
from fedasync_iot.models._errors import ConfigError, FedAsyncError

H = 3600.0
INF = math.inf


def trace(**changes: Any) -> DeviceTrace:
    """An always-online device on Wi-Fi, full battery, idle; each test changes what it is about."""
    base: dict[str, Any] = dict(
        device_id="d1", epoch_s_per_100=2.0, online=Intervals.always(), wifi=Intervals.always(),
        battery=Battery(initial_percent=100.0, drain_per_h=10.0, charge_per_h=30.0),
    )
    return DeviceTrace(**(base | changes))


# -- Intervals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spans",
    [
        ((5.0, 5.0),),  # empty
        ((5.0, 4.0),),  # reversed
        ((-1.0, 4.0),),  # before the run
        ((0.0, 2.0), (1.0, 3.0)),  # overlap
        ((0.0, 2.0), (2.0, 3.0)),  # touching: one span
        ((3.0, 4.0), (0.0, 1.0)),  # unsorted
        ((0.0, INF), (5.0, 6.0)),  # inf not last
        ((math.nan, 1.0),),
        ((0.0, 1.0, 2.0),),
        ((True, 2.0),),
        [(0.0, 1.0)],  # a list, not a tuple
    ],
)
def test_intervals_refuse_malformed_spans(spans: Any) -> None:
    with pytest.raises(ConfigError) as e:
        Intervals(spans)
    assert e.value.key == "spans"


def test_intervals_of_sorts_merges_and_drops_empty() -> None:
    iv = Intervals.of([(5, 6), (0, 2), (1, 3), (3, 4), (7, 7), (9, 8)])
    assert iv.spans == ((0.0, 4.0), (5.0, 6.0))
    assert Intervals.of([]) == Intervals() and len(Intervals()) == 0


def test_intervals_contains_is_half_open() -> None:
    iv = Intervals(((1.0, 2.0), (4.0, INF)))
    assert [iv.contains(t) for t in (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 1e12)] == [
        False, True, True, False, False, True, True]
    assert not Intervals().contains(0.0)


def test_intervals_next_change() -> None:
    iv = Intervals(((1.0, 2.0), (4.0, INF)))
    assert [iv.next_change(t) for t in (-1.0, 0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 99.0)] == [
        1.0, 1.0, 2.0, 2.0, 4.0, 4.0, None, None]
    assert Intervals(((1.0, 2.0),)).next_change(2.0) is None
    assert Intervals().next_change(0.0) is None


def test_intervals_measure_and_fraction() -> None:
    iv = Intervals(((1.0, 2.0), (4.0, 6.0), (10.0, INF)))
    assert iv.measure(0.0, 10.0) == 3.0
    assert iv.measure(1.5, 5.0) == 1.5
    assert iv.measure(2.0, 4.0) == 0.0
    assert iv.measure(0.0, 20.0) == 13.0
    assert iv.fraction(0.0, 20.0) == pytest.approx(0.65)
    assert Intervals.always().fraction(3.0, 7.0) == 1.0
    with pytest.raises(FedAsyncError):
        iv.fraction(5.0, 5.0)
    with pytest.raises(FedAsyncError):
        iv.fraction(0.0, INF)


# -- battery -----------------------------------------------------------------------------------


def test_battery_integrates_drain_and_charge_with_clamping() -> None:
    t = trace(charging=Intervals(((2 * H, 3 * H), (20 * H, 21 * H))))
    assert t.battery_at(0.0) == 100.0
    assert t.battery_at(1 * H) == pytest.approx(90.0)
    assert t.battery_at(2 * H) == pytest.approx(80.0)  # drained 10%/h for 2 h
    assert t.battery_at(2.5 * H) == pytest.approx(95.0)  # charging 30%/h
    assert t.battery_at(3 * H) == pytest.approx(100.0)  # 80 + 30 = 110, clamped
    assert t.battery_at(13 * H) == pytest.approx(0.0)  # 10 h of drain from 100
    assert t.battery_at(19 * H) == 0.0  # stays empty, never negative
    assert t.battery_at(20.5 * H) == pytest.approx(15.0)  # charging starts from 0, not below
    assert t.battery_at(22 * H) == pytest.approx(20.0)
    assert t.battery_at(-5.0) == 100.0


def test_mains_device_has_no_battery_reading() -> None:
    t = trace(battery=None, charging=Intervals(((0.0, 1.0),)))
    assert t.battery_at(10.0) is None
    r = t.readings_at(10.0, wall_time=1.0)
    assert r.battery_percent is None and r.charging is None
    assert evaluate(r, PolicyConfig()).eligible


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"device_id": "a/b"}, "device_id"),
        ({"device_id": ""}, "device_id"),
        ({"epoch_s_per_100": 0.0}, "epoch_s_per_100"),
        ({"wifi": ((0.0, 1.0),)}, "wifi"),
        ({"battery": 50.0}, "battery"),
        ({"idle_cpu_percent": 101.0}, "idle_cpu_percent"),
        ({"start_local_minutes": 1440}, "start_local_minutes"),
        ({"cellular": 1}, "cellular"),
    ],
)
def test_device_trace_validates(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        trace(**changes)
    assert e.value.key == key


def test_battery_validates() -> None:
    with pytest.raises(ConfigError) as e:
        Battery(initial_percent=101.0)
    assert e.value.key == "initial_percent"


# -- readings through the real policy ----------------------------------------------------------


def test_on_wifi_and_charging_is_eligible_at_once() -> None:
    t = trace(charging=Intervals.always(), battery=Battery(initial_percent=20.0))
    r = t.readings_at(600.0, wall_time=1.7e9)
    assert r.interfaces_up == ("wlan0",) and r.charging is True and r.taken_at == 1.7e9
    gate = EligibilityGate(PolicyConfig(min_dwell_s=0.0))
    assert gate.update(r, now=600.0).eligible


def test_wifi_off_fails_the_network_check_even_with_cellular() -> None:
    t = trace(wifi=Intervals(((0.0, 100.0),)), cellular=True)
    assert t.readings_at(50.0, wall_time=1.0).interfaces_up == ("wlan0", "wwan0")
    r = t.readings_at(150.0, wall_time=1.0)
    assert r.interfaces_up == ("wwan0",)
    d = evaluate(r, PolicyConfig())
    assert not d.eligible and [c.name for c in d.failed] == ["network"]
    assert trace(wifi=Intervals()).readings_at(0.0, wall_time=1.0).interfaces_up == ()


def test_low_battery_unplugged_fails_power_and_plugging_in_fixes_it() -> None:
    t = trace(battery=Battery(initial_percent=50.0, drain_per_h=5.0),
              charging=Intervals(((H, 2 * H),)))
    d = evaluate(t.readings_at(0.5 * H, wall_time=1.0), PolicyConfig())
    assert not d.eligible and [c.name for c in d.failed] == ["power"]
    assert evaluate(t.readings_at(1.5 * H, wall_time=1.0), PolicyConfig()).eligible


def test_owner_busy_fails_cpu() -> None:
    t = trace(busy=Intervals(((0.0, 60.0),)), idle_cpu_percent=5.0, busy_cpu_percent=90.0)
    assert [c.name for c in evaluate(t.readings_at(30.0, wall_time=1.0),
                                     PolicyConfig()).failed] == ["cpu"]
    assert t.readings_at(60.0, wall_time=1.0).cpu_percent == 5.0


def test_local_time_of_day_follows_sim_time() -> None:
    t = trace(start_local_minutes=23 * 60)
    assert t.readings_at(0.0, wall_time=1.0).local_minutes == 23 * 60
    assert t.readings_at(59.9, wall_time=1.0).local_minutes == 23 * 60
    assert t.readings_at(3600.0 + 90.0, wall_time=1.0).local_minutes == 1  # past midnight
    assert t.readings_at(DAY_S, wall_time=1.0).local_minutes == 23 * 60
    night = PolicyConfig(time_window=(0, 6 * 60))
    assert not evaluate(t.readings_at(0.0, wall_time=1.0), night).eligible
    assert evaluate(t.readings_at(2 * H, wall_time=1.0), night).eligible


def test_compute_seconds_is_linear() -> None:
    assert trace(epoch_s_per_100=2.0).compute_seconds(500, epochs=3) == pytest.approx(30.0)


# -- clock and reader --------------------------------------------------------------------------


class FakeWall:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_sim_clock_maps_wall_to_sim_and_back() -> None:
    wall = FakeWall(1000.0)
    clock = SimClock(1440.0, wall=wall)  # a day per wall minute
    assert clock.start_wall == 1000.0 and clock.sim_now() == 0.0
    wall.t = 1060.0
    assert clock.sim_now() == pytest.approx(DAY_S)
    assert clock.to_wall(DAY_S / 2) == pytest.approx(1030.0)
    assert clock.to_sim(clock.to_wall(1234.5)) == pytest.approx(1234.5)
    wall.t = 900.0
    assert clock.sim_now() == 0.0  # before the start: clamped
    assert SimClock(2.0, 50.0, wall=wall).start_wall == 50.0
    with pytest.raises(ConfigError) as e:
        SimClock(0.0)
    assert e.value.key == "scale"


def test_sim_reader_reads_the_trace_at_sim_now() -> None:
    wall = FakeWall(1e9)
    clock = SimClock(3600.0, wall=wall)  # an hour per wall second
    reader: ReadingsSource = SimReader(trace(wifi=Intervals(((0.0, H),))), clock)
    assert reader.read().interfaces_up == ("wlan0",)
    wall.t += 2.0
    r = reader.read()
    assert r.interfaces_up == () and r.taken_at == pytest.approx(1e9 + 2.0)
    assert r.battery_percent == pytest.approx(80.0)


# -- fleets ------------------------------------------------------------------------------------


def test_same_seed_same_fleet_other_seed_other_fleet() -> None:
    p = FleetProfile(n_devices=30, seed=7)
    assert generate_fleet(p) == generate_fleet(FleetProfile(n_devices=30, seed=7))
    other = generate_fleet(dataclasses.replace(p, seed=8))
    assert [t.epoch_s_per_100 for t in other] != [t.epoch_s_per_100 for t in generate_fleet(p)]
    assert all(a.wifi != b.wifi for a, b in zip(generate_fleet(p), other, strict=True))


def test_device_i_does_not_change_when_the_fleet_grows() -> None:
    small = generate_fleet(FleetProfile(n_devices=5, seed=3))
    big = generate_fleet(FleetProfile(n_devices=50, seed=3))
    assert big[:5] == small
    assert generate_device(FleetProfile(seed=3), 4) == small[4]
    assert len({t.device_id for t in big}) == 50


def test_changing_one_aspect_leaves_the_others_alone() -> None:
    p = FleetProfile(n_devices=20, seed=1)
    a = generate_fleet(p)
    b = generate_fleet(dataclasses.replace(p, wifi_on_mean_s=5 * H, flap_fraction=0.5))
    assert [t.epoch_s_per_100 for t in a] == [t.epoch_s_per_100 for t in b]
    assert [(t.battery, t.charging) for t in a] == [(t.battery, t.charging) for t in b]


def test_speed_distribution_has_the_configured_median_and_spread() -> None:
    p = FleetProfile(n_devices=2000, seed=11, speed_median_s=3.0, speed_sigma=0.6,
                     duration_s=H)  # short run: speeds do not depend on it, generation is quicker
    logs = np.log([t.epoch_s_per_100 for t in generate_fleet(p)])
    assert math.exp(float(np.median(logs))) == pytest.approx(3.0, rel=0.05)
    assert float(np.std(logs)) == pytest.approx(0.6, rel=0.05)
    fixed = generate_fleet(dataclasses.replace(p, n_devices=3, speed_sigma=0.0))
    assert all(t.epoch_s_per_100 == 3.0 for t in fixed)


def test_fleet_fractions_follow_the_profile() -> None:
    p = FleetProfile(n_devices=400, seed=5, mains_fraction=0.25, cellular_fraction=0.5,
                     late_join_fraction=0.0, early_leave_fraction=0.0, flap_fraction=0.0,
                     wifi_home_overnight=False)
    fleet = generate_fleet(p)
    assert sum(t.battery is None for t in fleet) / 400 == pytest.approx(0.25, abs=0.06)
    assert sum(t.cellular for t in fleet) / 400 == pytest.approx(0.5, abs=0.07)
    assert all(t.online == Intervals.always() for t in fleet)
    wifi = np.mean([t.wifi.fraction(0.0, p.duration_s) for t in fleet])
    assert wifi == pytest.approx(2 / (2 + 2 / 3), abs=0.04)  # on 2 h, off 40 min
    for t in fleet:
        if t.battery is None:
            assert t.charging == Intervals()
        for iv in (t.online, t.wifi, t.charging, t.busy):
            assert all(s < p.duration_s and e > 0.0 for s, e in iv.spans)


def test_churn_joins_late_leaves_early_and_flaps() -> None:
    p = FleetProfile(n_devices=200, seed=2, late_join_fraction=1.0, early_leave_fraction=1.0,
                     flap_fraction=1.0)
    for t in generate_fleet(p):
        if t.online.spans:
            assert 0.0 <= t.online.spans[0][0] <= p.duration_s / 2
            assert t.online.spans[-1][1] <= p.duration_s
    assert np.mean([len(t.online) for t in generate_fleet(p)]) > 2  # flapping splits presence


def test_overnight_charging_happens_at_night_on_wifi() -> None:
    fleet = generate_fleet(FleetProfile(n_devices=50, seed=4, rare_charger_fraction=0.0,
                                        night_charge_prob=1.0, day_charges_per_day=0.0,
                                        mains_fraction=0.0))
    for t in fleet:
        start, end = next((s, e) for s, e in t.charging.spans if s > 0.0)  # not cut at sim 0
        local_h = (8 + start / H) % 24
        assert local_h >= 20 or local_h <= 2  # plugged in 20:00..02:00
        assert 3 * H <= end - start <= 10 * H
        assert t.wifi.contains(start) and t.wifi.contains(end - 1.0)  # at home, on Wi-Fi
        assert not t.charging.contains((14 - 8) * H)  # 14:00: no daytime top-ups here


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"n_devices": -1}, "n_devices"),
        ({"seed": -1}, "seed"),
        ({"duration_s": 0.0}, "duration_s"),
        ({"speed_sigma": -0.1}, "speed_sigma"),
        ({"mains_fraction": 1.5}, "mains_fraction"),
        ({"drain_per_h": (5.0, 1.0)}, "drain_per_h"),
        ({"wifi_off_mean_s": 0.0}, "wifi_off_mean_s"),
        ({"id_prefix": "a/"}, "id_prefix"),
    ],
)
def test_fleet_profile_validates(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        FleetProfile(**changes)
    assert e.value.key == key


def test_summarize_reports_speed_availability_and_eligibility() -> None:
    always = trace(charging=Intervals.always())
    never = trace(device_id="d2", epoch_s_per_100=4.0, wifi=Intervals(),
                  online=Intervals(((0.0, 50.0),)))
    s = summarize([always, never], 100.0, step_s=10.0)
    assert s["speed_p50"] == pytest.approx(3.0)
    assert s["online"] == pytest.approx(0.75) and s["wifi"] == pytest.approx(0.5)
    assert s["eligible"] == pytest.approx(0.5)
    assert s["eligible_devices_mean"] == 1.0 and s["eligible_devices_min"] == 1
    strict = summarize([always], 100.0, step_s=10.0, policy=PolicyConfig(time_window=(0, 1)))
    assert strict["eligible"] == 0.0  # 08:00 is outside 00:00-00:01
    with pytest.raises(FedAsyncError):
        summarize([], 100.0)


def test_default_profile_summary_is_plausible() -> None:
    p = FleetProfile(n_devices=60)
    s = summarize(generate_fleet(p), p.duration_s, step_s=900.0)
    assert s["speed_p10"] < s["speed_p50"] < s["speed_p90"]
    assert 0.1 < s["eligible"] < 0.7
    assert 0.0 < s["charging"] < 0.6 and 0.5 < s["wifi"] < 1.0


def test_traces_pickle_with_their_precomputed_state() -> None:
    # The simulator may hand traces to worker processes.
    t = generate_device(FleetProfile(seed=9), 0)
    back = pickle.loads(pickle.dumps(t))
    assert back == t and back.battery_at(5 * H) == t.battery_at(5 * H)
    assert back.wifi.next_change(100.0) == t.wifi.next_change(100.0)


def test_readings_at_a_numpy_time_are_plain_python_values() -> None:
    # np.arange grids are a natural way to scan a trace; Readings refuses numpy bools.
    trace = generate_fleet(FleetProfile(n_devices=5, seed=1, duration_s=86_400.0))
    for tr in trace:
        for t in np.arange(0.0, 86_400.0, 3_600.0):
            r = tr.readings_at(t, wall_time=0.0)
            assert r.charging is None or type(r.charging) is bool
