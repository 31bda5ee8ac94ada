"""Eligibility policy: truth tables per check, hysteresis, dwell, config validation, output."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from fedasync_iot.agent._policy import (
    Check,
    Decision,
    EligibilityGate,
    PolicyConfig,
    evaluate,
    format_decision,
)
from fedasync_iot.agent._readings import Readings
from fedasync_iot.models._errors import ConfigError, FedAsyncError

# A device that passes every default check; each test changes only what it is about.
GOOD = Readings(
    battery_percent=None, charging=None, interfaces_up=("eth0",), cpu_percent=10.0,
    mem_available_mb=400.0, temperature_c=50.0, local_minutes=12 * 60, taken_at=1.7e9,
)


def rd(**changes: Any) -> Readings:
    return dataclasses.replace(GOOD, **changes)


def check(decision: Decision, name: str) -> Check:
    return next(c for c in decision.checks if c.name == name)


def test_good_device_is_eligible_with_one_check_per_condition() -> None:
    d = evaluate(GOOD, PolicyConfig())
    assert d.eligible and not d.held and d.failed == ()
    assert d.reason == "all checks passed"
    assert [c.name for c in d.checks] == [
        "power", "network", "cpu", "memory", "temperature", "time_window"]


@pytest.mark.parametrize(
    ("battery", "charging", "require_charging", "passed", "reading"),
    [
        (None, None, False, True, "mains"),
        (None, None, True, True, "mains"),  # require_charging is about batteries
        (90.0, False, False, True, "90%, not charging"),
        (80.0, False, False, True, "80%, not charging"),  # boundary passes
        (79.9, False, False, False, "79.9%, not charging"),
        (64.0, False, False, False, "64%, not charging"),
        (20.0, True, False, True, "20%, charging"),
        (64.0, None, False, False, "64%, charging unknown"),  # unknown = not charging
        (90.0, None, False, True, "90%, charging unknown"),
        (95.0, False, True, False, "95%, not charging"),
        (10.0, True, True, True, "10%, charging"),
    ],
)
def test_power(battery: float | None, charging: bool | None, require_charging: bool,
               passed: bool, reading: str) -> None:
    d = evaluate(rd(battery_percent=battery, charging=charging),
                 PolicyConfig(require_charging=require_charging))
    c = check(d, "power")
    assert (c.passed, c.reading, d.eligible) == (passed, reading, passed)


def test_power_failure_reason() -> None:
    d = evaluate(rd(battery_percent=64.0, charging=False, cpu_percent=45.0), PolicyConfig())
    assert d.reason == "battery 64% < 80% and not charging; cpu 45% > 30%"
    assert check(d, "power").threshold == ">= 80% or charging"


@pytest.mark.parametrize(
    ("interfaces", "config", "passed"),
    [
        (("eth0",), {}, True),
        (("enp3s0",), {}, True),
        (("wlan0",), {}, True),
        (("wlp2s0",), {}, True),
        (("wwan0",), {}, False),  # cellular only: metered
        (("wlan0", "wwan0"), {}, True),
        (("usb0",), {}, False),  # phone tethering
        (("ppp0", "rmnet_data0"), {}, False),
        (("lo",), {}, False),
        ((), {}, False),
        (("ETH0",), {}, False),  # patterns are case-sensitive, like Linux names
        (("wlan0",), {"allowed_interfaces": ("eth*",)}, False),
        (("wwan0",), {"allowed_interfaces": ("wwan*",), "denied_interfaces": ()}, True),
        (("eth0",), {"denied_interfaces": ("eth0",)}, False),  # deny wins over allow
    ],
)
def test_network(interfaces: tuple[str, ...], config: dict[str, Any], passed: bool) -> None:
    d = evaluate(rd(interfaces_up=interfaces), PolicyConfig(**config))
    assert check(d, "network").passed is passed
    assert d.eligible is passed


@pytest.mark.parametrize(
    ("field", "value", "name", "passed", "reading"),
    [
        ("cpu_percent", 30.0, "cpu", True, "30%"),
        ("cpu_percent", 30.1, "cpu", False, "30.1%"),
        ("cpu_percent", None, "cpu", False, "unavailable"),  # fails closed
        ("mem_available_mb", 150.0, "memory", True, "150 MB"),
        ("mem_available_mb", 149.5, "memory", False, "149.5 MB"),
        ("mem_available_mb", None, "memory", False, "unavailable"),  # fails closed
        ("temperature_c", 70.0, "temperature", True, "70 C"),
        ("temperature_c", 70.5, "temperature", False, "70.5 C"),
        ("temperature_c", None, "temperature", True, "unavailable"),  # many boards: no sensor
    ],
)
def test_resource_thresholds(field: str, value: float | None, name: str, passed: bool,
                             reading: str) -> None:
    d = evaluate(rd(**{field: value}), PolicyConfig())
    c = check(d, name)
    assert (c.passed, c.reading, d.eligible) == (passed, reading, passed)


H = 60


@pytest.mark.parametrize(
    ("window", "minutes", "passed"),
    [
        (None, 0, True),
        ((9 * H, 17 * H), 9 * H, True),  # start inclusive
        ((9 * H, 17 * H), 17 * H - 1, True),
        ((9 * H, 17 * H), 17 * H, False),  # end exclusive
        ((9 * H, 17 * H), 9 * H - 1, False),
        ((22 * H, 6 * H), 22 * H, True),  # wraps past midnight
        ((22 * H, 6 * H), 23 * H + 59, True),
        ((22 * H, 6 * H), 0, True),
        ((22 * H, 6 * H), 6 * H - 1, True),
        ((22 * H, 6 * H), 6 * H, False),
        ((22 * H, 6 * H), 12 * H, False),
        ((22 * H, 6 * H), 22 * H - 1, False),
        ((22 * H, 0), 23 * H, True),  # until midnight
        ((22 * H, 0), 0, False),
    ],
)
def test_time_window(window: tuple[int, int] | None, minutes: int, passed: bool) -> None:
    d = evaluate(rd(local_minutes=minutes), PolicyConfig(time_window=window))
    assert check(d, "time_window").passed is passed


def test_time_window_texts() -> None:
    d = evaluate(rd(local_minutes=12 * H + 5), PolicyConfig(time_window=(22 * H, 6 * H)))
    c = check(d, "time_window")
    assert (c.reading, c.threshold) == ("12:05", "22:00-06:00")
    assert d.reason == "time 12:05 outside 22:00-06:00"


@pytest.mark.parametrize(
    ("changes", "fresh", "training"),
    [
        ({"battery_percent": 80.0, "charging": False}, True, True),
        ({"battery_percent": 77.0, "charging": False}, False, True),
        ({"battery_percent": 75.0, "charging": False}, False, True),
        ({"battery_percent": 74.9, "charging": False}, False, False),
        ({"cpu_percent": 35.0}, False, True),
        ({"cpu_percent": 40.1}, False, False),
        ({"temperature_c": 73.0}, False, True),
        ({"temperature_c": 75.1}, False, False),
        ({"mem_available_mb": 149.0}, False, False),  # no margin: memory is a hard limit
    ],
)
def test_hysteresis(changes: dict[str, Any], fresh: bool, training: bool) -> None:
    r = rd(**changes)
    assert evaluate(r, PolicyConfig()).eligible is fresh
    d = evaluate(r, PolicyConfig(), was_eligible=True)
    assert d.eligible is training
    assert d.held is (training and not fresh)


def test_hysteresis_reason_and_threshold() -> None:
    d = evaluate(rd(battery_percent=77.0, charging=False), PolicyConfig(), was_eligible=True)
    assert d.reason == "all checks passed; kept by hysteresis: battery 77% < 80% and not charging"
    assert check(d, "power").threshold == ">= 75% or charging (hysteresis)"


def test_gate_dwell_before_becoming_eligible() -> None:
    gate = EligibilityGate(PolicyConfig(min_dwell_s=60.0))
    first = gate.update(GOOD, now=1000.0)
    assert not first.eligible and first.held and first.failed == ()
    assert "waiting for dwell: 0s of 60s" in first.reason
    assert not gate.update(GOOD, now=1059.9).eligible
    assert gate.changed_at is None
    d = gate.update(GOOD, now=1060.0)
    assert d.eligible and not d.held
    assert (gate.eligible, gate.changed_at, gate.last) == (True, 1060.0, d)


def test_gate_failure_restarts_dwell() -> None:
    gate = EligibilityGate(PolicyConfig(min_dwell_s=60.0))
    gate.update(GOOD, now=0.0)
    gate.update(rd(cpu_percent=90.0), now=30.0)  # busy for a moment
    assert not gate.update(GOOD, now=61.0).eligible  # count restarted at 61
    assert not gate.update(GOOD, now=120.0).eligible
    assert gate.update(GOOD, now=121.0).eligible


def test_gate_unplug_below_threshold_blocks_immediately_then_dwells() -> None:
    gate = EligibilityGate(PolicyConfig(min_dwell_s=60.0))
    plugged = rd(battery_percent=50.0, charging=True)
    gate.update(plugged, now=0.0)
    assert gate.update(plugged, now=60.0).eligible
    d = gate.update(rd(battery_percent=50.0, charging=False), now=61.0)  # unplugged
    assert not d.eligible and not d.held
    assert d.reason == "battery 50% < 75% and not charging"
    assert gate.changed_at == 61.0
    assert not gate.update(plugged, now=62.0).eligible  # plugged back: dwell again
    assert not gate.update(plugged, now=121.0).eligible
    assert gate.update(plugged, now=122.0).eligible


@pytest.mark.parametrize(
    "bad",
    [
        {"interfaces_up": ("wwan0",)},
        {"temperature_c": 76.0},
        {"cpu_percent": 41.0},
        {"mem_available_mb": 100.0},
        {"cpu_percent": None},
    ],
)
def test_gate_any_failure_ends_eligibility_at_once(bad: dict[str, Any]) -> None:
    gate = EligibilityGate(PolicyConfig(min_dwell_s=60.0))
    gate.update(GOOD, now=0.0)
    assert gate.update(GOOD, now=60.0).eligible
    assert not gate.update(rd(**bad), now=60.5).eligible


def test_gate_keeps_eligibility_within_margins_and_zero_dwell() -> None:
    gate = EligibilityGate(PolicyConfig(min_dwell_s=0.0))
    assert gate.update(rd(battery_percent=81.0, charging=False), now=0.0).eligible
    d = gate.update(rd(battery_percent=77.0, charging=False), now=1.0)
    assert d.eligible and d.held
    assert not gate.update(rd(battery_percent=74.0, charging=False), now=2.0).eligible
    assert not gate.update(rd(battery_percent=77.0, charging=False), now=3.0).eligible  # strict


def test_gate_clock_going_backwards_restarts_dwell() -> None:
    gate = EligibilityGate(PolicyConfig(min_dwell_s=60.0))
    gate.update(GOOD, now=1000.0)
    assert not gate.update(GOOD, now=10.0).eligible
    assert not gate.update(GOOD, now=69.0).eligible
    assert gate.update(GOOD, now=70.0).eligible


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"min_battery_percent": 101.0}, "min_battery_percent"),
        ({"min_battery_percent": -1}, "min_battery_percent"),
        ({"min_battery_percent": float("nan")}, "min_battery_percent"),
        ({"min_battery_percent": "80"}, "min_battery_percent"),
        ({"require_charging": "yes"}, "require_charging"),
        ({"allowed_interfaces": ()}, "allowed_interfaces"),
        ({"allowed_interfaces": ["eth*"]}, "allowed_interfaces"),
        ({"allowed_interfaces": ("eth*", "")}, "allowed_interfaces"),
        ({"denied_interfaces": (1,)}, "denied_interfaces"),
        ({"max_cpu_percent": 150.0}, "max_cpu_percent"),
        ({"max_cpu_percent": True}, "max_cpu_percent"),
        ({"min_mem_available_mb": -5.0}, "min_mem_available_mb"),
        ({"max_temperature_c": float("inf")}, "max_temperature_c"),
        ({"time_window": (60, 60)}, "time_window"),
        ({"time_window": (0, 1440)}, "time_window"),
        ({"time_window": (-1, 60)}, "time_window"),
        ({"time_window": (1.5, 60)}, "time_window"),
        ({"time_window": (60,)}, "time_window"),
        ({"battery_margin": -1.0}, "battery_margin"),
        ({"temperature_margin": float("nan")}, "temperature_margin"),
        ({"cpu_margin": -0.1}, "cpu_margin"),
        ({"min_dwell_s": -1.0}, "min_dwell_s"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        PolicyConfig(**kwargs)
    assert err.value.key == key


def test_config_accepts_ints_and_empty_deny_list() -> None:
    c = PolicyConfig(min_battery_percent=50, max_cpu_percent=100, denied_interfaces=(),
                     time_window=(0, 1439), min_dwell_s=0)
    assert c.max_cpu_percent == 100


def test_decision_to_dict_is_json_and_failed() -> None:
    d = evaluate(rd(cpu_percent=45.0), PolicyConfig())
    data = json.loads(json.dumps(d.to_dict()))
    assert data["eligible"] is False and data["held"] is False
    assert data["reason"] == "cpu 45% > 30%"
    assert data["checks"][2] == {"name": "cpu", "passed": False, "reading": "45%",
                                 "threshold": "<= 30%"}
    assert [c.name for c in d.failed] == ["cpu"]


def test_decision_cannot_be_eligible_with_failures() -> None:
    with pytest.raises(FedAsyncError):
        Decision(True, (Check("cpu", False, "45%", "<= 30%"),), "oops")


def test_format_decision_table() -> None:
    d = evaluate(rd(battery_percent=64.0, charging=False), PolicyConfig())
    lines = format_decision(d).splitlines()
    assert lines[0] == "eligible: no (battery 64% < 80% and not charging)"
    assert lines[1].split() == ["check", "reading", "threshold", "result"]
    assert lines[2].startswith("power") and lines[2].endswith("FAIL")
    assert "64%, not charging" in lines[2] and ">= 80% or charging" in lines[2]
    assert all(line.endswith("PASS") for line in lines[3:])
    assert len(lines) == 2 + len(d.checks)
    assert len({line.index(" PASS") for line in lines[3:]}) == 1  # aligned columns
