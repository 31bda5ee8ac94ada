"""Readings validation, StaticReader, and PsutilReader on this machine and with faults injected."""

from __future__ import annotations

import dataclasses
import time
from collections import namedtuple
from typing import Any

import psutil
import pytest

from fedasync_iot.agent._readings import PsutilReader, Readings, ReadingsSource, StaticReader
from fedasync_iot.models._errors import FedAsyncError

GOOD = Readings(
    battery_percent=55.0, charging=True, interfaces_up=("wlan0",), cpu_percent=12.5,
    mem_available_mb=300.0, temperature_c=48.0, local_minutes=0, taken_at=1.7e9,
)


@pytest.mark.parametrize(
    "changes",
    [
        {"battery_percent": 100.1},
        {"battery_percent": -1.0},
        {"battery_percent": float("nan")},
        {"cpu_percent": 101.0},
        {"cpu_percent": float("inf")},
        {"mem_available_mb": -1.0},
        {"temperature_c": float("nan")},
        {"temperature_c": -300.0},
        {"local_minutes": 1440},
        {"local_minutes": -1},
        {"local_minutes": 1.5},
        {"taken_at": float("nan")},
        {"charging": "yes"},
        {"interfaces_up": ["eth0"]},
        {"interfaces_up": ("",)},
    ],
)
def test_readings_reject_nonsense(changes: dict[str, Any]) -> None:
    with pytest.raises(FedAsyncError):
        dataclasses.replace(GOOD, **changes)


def test_readings_accept_missing_values_and_boundaries() -> None:
    r = dataclasses.replace(GOOD, battery_percent=None, charging=None, cpu_percent=None,
                            mem_available_mb=None, temperature_c=None, interfaces_up=(),
                            local_minutes=1439)
    assert r.battery_percent is None and r.local_minutes == 1439


def test_static_reader() -> None:
    src: ReadingsSource = StaticReader(GOOD)
    assert src.read() is GOOD


def _sane(r: Readings) -> None:
    assert r.battery_percent is None or 0.0 <= r.battery_percent <= 100.0
    assert r.charging is None or isinstance(r.charging, bool)
    assert isinstance(r.interfaces_up, tuple) and "lo" not in r.interfaces_up
    assert r.cpu_percent is not None and 0.0 <= r.cpu_percent <= 100.0
    assert r.mem_available_mb is not None and r.mem_available_mb > 0
    assert r.temperature_c is None or -50.0 < r.temperature_c < 150.0
    assert 0 <= r.local_minutes < 1440
    assert abs(r.taken_at - time.time()) < 60


@pytest.mark.parametrize("exclude_self", [True, False])
def test_psutil_reader_on_this_machine(exclude_self: bool) -> None:
    reader = PsutilReader(exclude_self=exclude_self)
    time.sleep(0.05)  # a few clock ticks for the CPU delta
    first = reader.read()
    _sane(first)
    lt = time.localtime(first.taken_at)
    assert first.local_minutes == lt.tm_hour * 60 + lt.tm_min
    time.sleep(0.02)
    _sane(reader.read())


def test_psutil_reader_subtracts_its_own_cpu() -> None:
    own, everyone = PsutilReader(exclude_self=True), PsutilReader(exclude_self=False)
    end = time.process_time() + 0.2
    while time.process_time() < end:  # burn ~0.2 s of this process's CPU
        pass
    mine, total = own.read().cpu_percent, everyone.read().cpu_percent
    assert mine is not None and total is not None
    assert total > mine  # our busy loop counts in total only (other load is the same for both)


def _boom(*_: object, **__: object) -> Any:
    raise OSError("sysfs went away")


@pytest.mark.parametrize(
    ("function", "field"),
    [
        ("sensors_temperatures", "temperature_c"),
        ("sensors_battery", "battery_percent"),
        ("net_if_stats", "interfaces_up"),
        ("virtual_memory", "mem_available_mb"),
    ],
)
@pytest.mark.parametrize("fault", ["raise", "missing", "not_implemented"])
def test_psutil_faults_give_none_not_a_crash(monkeypatch: pytest.MonkeyPatch, function: str,
                                             field: str, fault: str) -> None:
    reader = PsutilReader()
    if fault == "missing":  # e.g. sensors_temperatures on macOS / Windows
        monkeypatch.delattr(psutil, function)
    elif fault == "raise":
        monkeypatch.setattr(psutil, function, _boom)
    else:
        def nope() -> Any:
            raise NotImplementedError
        monkeypatch.setattr(psutil, function, nope)
    r = reader.read()
    assert getattr(r, field) in (None, ())
    assert r.local_minutes >= 0  # the rest is still read


@pytest.mark.parametrize("missing", [False, True])
def test_psutil_cpu_fault_gives_none(monkeypatch: pytest.MonkeyPatch, missing: bool) -> None:
    reader = PsutilReader()
    if missing:
        monkeypatch.delattr(psutil, "cpu_times")
    else:
        monkeypatch.setattr(psutil, "cpu_times", _boom)
    assert reader.read().cpu_percent is None
    monkeypatch.undo()
    reader.read()  # re-primes after the fault
    time.sleep(0.03)
    assert reader.read().cpu_percent is not None


Battery = namedtuple("Battery", "percent secsleft power_plugged")
Temp = namedtuple("Temp", "label current high critical")
Nic = namedtuple("Nic", "isup duplex speed mtu flags")


def test_psutil_values_are_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = PsutilReader()
    monkeypatch.setattr(psutil, "sensors_battery", lambda: Battery(100.4, 3600, None))
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {
        "cpu_thermal": [Temp("", 61.5, None, None)],
        "nvme": [Temp("Composite", 44.0, 80.0, 90.0), Temp("x", float("nan"), None, None)],
    })
    monkeypatch.setattr(psutil, "net_if_stats", lambda: {
        "lo": Nic(True, 0, 0, 65536, "up,loopback,running"),
        "wlan0": Nic(True, 0, 0, 1500, "up,broadcast,running"),
        "eth0": Nic(False, 0, 0, 1500, "broadcast"),
        "lowpan0": Nic(True, 0, 0, 1280, "up,running"),
    })
    r = reader.read()
    assert r.battery_percent == 100.0  # clamped
    assert r.charging is None  # the OS could not tell
    assert r.temperature_c == 61.5  # hottest finite sensor
    assert r.interfaces_up == ("lowpan0", "wlan0")  # sorted, up only, no loopback


def test_no_battery_and_no_sensors(monkeypatch: pytest.MonkeyPatch) -> None:
    reader = PsutilReader()
    monkeypatch.setattr(psutil, "sensors_battery", lambda: None)
    monkeypatch.setattr(psutil, "sensors_temperatures", dict)
    r = reader.read()
    assert (r.battery_percent, r.charging, r.temperature_c) == (None, None, None)
