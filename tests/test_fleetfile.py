"""Fleet files: parsing and validation (every problem, named), loading into a `Fleet`, the
export round trip, local evaluation, and a replayed 3-device fleet on a real broker."""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.fleet import build_fleet
from fedasync_iot.fleet._fleetfile import (
    FleetFileError,
    export_fleet,
    load_fleet,
    parse_fleet_file,
    read_trace,
    replay_config,
)
from fedasync_iot.fleet._sim import SimConfig, fleet_summary, local_evaluation, metric_of
from fedasync_iot.fleet._traces import Battery, Intervals
from fedasync_iot.fleet.cli import compare, main
from fedasync_iot.models import ConfigError
from fedasync_iot.models._files import save_npz

INF = math.inf
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fleet" / "fleet.toml"
CENTERS = np.array([[2.0, 0.0, 1.0], [-1.0, 2.0, 0.0], [0.0, -2.0, -1.5]])


def blobs(n: int, seed: int, classes: tuple[int, ...] = (0, 1, 2)) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    y = np.array([classes[i % len(classes)] for i in range(n)])
    return (CENTERS[y] + rng.normal(0, 0.7, size=(n, 3))).astype(np.float32), y


def write_csv(path: Path, X: Any, y: Any) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "label"])
        w.writerows([*map(float, x), v] for x, v in zip(X, y, strict=True))
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fleet_dir(tmp_path: Path) -> Path:
    """Data and trace files for devices a, b, c (b: its own test set and a battery)."""
    d = tmp_path / "fleet"
    (d / "data").mkdir(parents=True)
    write_csv(d / "data" / "a.csv", *blobs(30, 1))
    save_npz(d / "data" / "b.npz", *blobs(24, 2, classes=(0, 1)))
    write_csv(d / "data" / "b-test.csv", *blobs(9, 3))
    write_csv(d / "data" / "c.csv", *blobs(20, 4, classes=(1, 2)))
    write_csv(d / "data" / "test.csv", *blobs(30, 5))
    write(d / "traces" / "b-online.csv", "start,end\n0,3000\n6000,\n")
    write(d / "traces" / "b-charging.csv", "# plugged in\nstart,end\n0,5000\n4000,\n")
    write(d / "traces" / "c-wifi.csv", "start,end,note\n-50,60,before the start\n90,inf,\n")
    return d


TOML = """
[run]
test_file = "data/test.csv"
seed = 3

[model]
kind = "logistic"
learning_rate = 0.1
local_epochs = 1
batch_size = 8

[[devices]]
id = "a"
data = "data/a.csv"
epoch_seconds = 30

[[devices]]
id = "b"
data = "data/b.npz"
test = "data/b-test.csv"
epoch_seconds = 12
online = "traces/b-online.csv"
charging = "traces/b-charging.csv"
battery_initial_percent = 50

[[devices]]
id = "c"
data = "data/c.csv"
epoch_multiplier = 2.5
wifi = "traces/c-wifi.csv"
cellular = true
"""


# -- parsing -----------------------------------------------------------------------------------


def test_a_toml_fleet_file_gives_entries_with_defaults_for_what_it_omits(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    ff = parse_fleet_file(write(d / "fleet.toml", TOML))

    a, b, c = ff.devices
    assert [e.device_id for e in ff.devices] == ["a", "b", "c"]
    assert a.data == d / "data" / "a.csv" and a.test is None  # relative to the fleet file
    assert a.online == a.wifi == Intervals.always() and a.battery is None  # always there, mains
    assert b.online.spans == ((0.0, 3000.0), (6000.0, INF))
    assert b.charging.spans == ((0.0, INF),)  # overlapping spans merged
    assert b.battery == Battery(initial_percent=50.0)  # a charging trace makes a battery device
    assert c.wifi.spans == ((0.0, 60.0), (90.0, INF))  # cut at the start; extra columns ignored
    assert c.epoch_multiplier == 2.5 and c.epoch_seconds is None and c.cellular
    assert ff.settings.test_file == d / "data" / "test.csv"
    assert ff.settings.overrides() == {
        "model": "logistic", "learning_rate": 0.1, "local_epochs": 1, "batch_size": 8,
        "test_file": str(d / "data" / "test.csv"), "seed": 3}
    assert "line 12" in a.where and a.where.startswith('devices[0] (id "a"')


def test_json_and_csv_fleet_files_mean_the_same_as_toml(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    toml = parse_fleet_file(write(d / "fleet.toml", TOML))
    raw = {"devices": [
        {"id": "a", "data": "data/a.csv", "epoch_seconds": 30},
        {"id": "b", "data": "data/b.npz", "test": "data/b-test.csv", "epoch_seconds": 12,
         "online": "traces/b-online.csv", "charging": "traces/b-charging.csv",
         "battery_initial_percent": 50},
        {"id": "c", "data": "data/c.csv", "epoch_multiplier": 2.5, "wifi": "traces/c-wifi.csv",
         "cellular": True}]}
    js = parse_fleet_file(write(d / "fleet.json", json.dumps(raw)))
    table = parse_fleet_file(write(d / "fleet.csv", (
        "id,data,test,epoch_seconds,epoch_multiplier,online,charging,wifi,"
        "battery_initial_percent,cellular\n"
        "a,data/a.csv,,30,,,,,,\n"
        "# a comment line\n"
        "b,data/b.npz,data/b-test.csv,12,,traces/b-online.csv,traces/b-charging.csv,,50,\n"
        "c,data/c.csv,,,2.5,,,traces/c-wifi.csv,,yes\n")))

    def same(e: Any) -> Any:
        return replace(e, where="")

    assert [same(e) for e in js.devices] == [same(e) for e in toml.devices]
    assert [same(e) for e in table.devices] == [same(e) for e in toml.devices]
    assert table.devices[1].where == 'fleet.csv line 4 (id "b")'


def test_trace_times_may_be_iso_timestamps_after_a_start(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    write(d / "traces" / "a-wifi.csv", "start,end\n2024-05-01T07:00:00,2024-05-01T09:00:00\n"
                                       "2024-05-01T09:30:00,\n")
    ff = parse_fleet_file(write(d / "fleet.toml", """
        [run]
        start = 2024-05-01T08:00:00
        [[devices]]
        id = "a"
        data = "data/a.csv"
        epoch_seconds = 1
        wifi = "traces/a-wifi.csv"
        """))

    assert ff.devices[0].wifi.spans == ((0.0, 3600.0), (5400.0, INF))
    assert ff.start_local_minutes == 8 * 60
    assert ff.devices[0].trace(1.0, start_local_minutes=ff.start_local_minutes).local_minutes_at(
        3600.0) == 9 * 60


@pytest.mark.parametrize(("text", "expected"), [
    ("start,end\n0,10\n20,5\n", "t.csv:3: end '5' is not after start '20'"),
    ("start,end\n0,soon\n", "t.csv:2: end 'soon' is neither seconds nor an ISO-8601 timestamp"),
    ("start,end\nnan,10\n", "t.csv:2: start must be finite"),
    ("start,end\n,10\n", "t.csv:2: start '' is neither seconds"),
    ("from,to\n0,10\n", "t.csv:1: the header must name the columns start and end"),
    ("start,end\n5\n", "t.csv:2: 1 field(s), need start and end"),
    ("start,end\n2024-05-01T08:00:00,\n", "t.csv:2: start '2024-05-01T08:00:00' is a timestamp:"
                                          " set [run] start"),
    ("# only a comment\n", "t.csv: empty"),
])
def test_trace_problems_name_the_file_and_line(tmp_path, text: str, expected: str) -> None:
    intervals, problems = read_trace(write(tmp_path / "t.csv", text))
    assert intervals is None
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_malformed_fleet_file_reports_every_problem_with_its_entry(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    write(d / "traces" / "bad.csv", "start,end\n0,10\n30,20\n")
    path = write(d / "fleet.toml", """
        [model]
        kind = "forest"
        [[devices]]
        id = "ok"
        data = "data/a.csv"
        epoch_seconds = 3
        [[devices]]
        id = "two-speeds"
        data = "data/a.csv"
        epoch_seconds = 3
        epoch_multiplier = 2
        [[devices]]
        data = "data/missing.csv"
        epoch_seconds = -1
        [[devices]]
        id = "bad trace"
        data = "data/a.csv"
        epoch_seconds = 3
        online = "traces/bad.csv"
        wifi = "traces/nowhere.csv"
        colour = "red"
        [[devices]]
        id = "ok"
        data = "data/a.csv"
        epoch_seconds = 3
        battery_initial_percent = 120
        """)

    with pytest.raises(FleetFileError) as e:
        parse_fleet_file(path)

    problems = e.value.problems
    expected = [
        "[model] kind (line 3) must be one of logistic, mlp, linear, got 'forest'",
        'devices[1] (id "two-speeds", line 8): give one of epoch_seconds and epoch_multiplier',
        "devices[2] (no id, line 13): epoch_seconds must be > 0, got -1",
        "devices[2] (no id, line 13): id is required",
        "devices[2] (no id, line 13): data file " + str(d / "data" / "missing.csv"),
        'devices[3] (id "bad trace", line 16): unknown key(s) colour',
        'devices[3] (id "bad trace", line 16): online: ' + str(d / "traces" / "bad.csv")
        + ":3: end '20' is not after start '30'",
        'devices[3] (id "bad trace", line 16): wifi: ' + str(d / "traces" / "nowhere.csv")
        + " does not exist",
        'devices[4] (id "ok", line 23): battery_initial_percent: initial_percent must be',
    ]
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    # An id that cannot be an MQTT topic level is refused by DeviceTrace's own rule.
    bad_id = [p for p in problems if p.startswith('devices[3]') and "device_id must be" in p]
    assert not bad_id  # it has other problems, so it is not built: no second-hand noise
    assert str(e.value).startswith(f"fleet file {path}: {len(problems)} problems:")
    assert isinstance(e.value, ConfigError)


def test_bad_ids_and_repeated_ids_are_named(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    path = write(d / "fleet.toml", "".join(
        f'[[devices]]\nid = "{i}"\ndata = "data/a.csv"\nepoch_seconds = 1\n'
        for i in ("x", "has space", "x")))

    with pytest.raises(FleetFileError) as e:
        parse_fleet_file(path)

    assert e.value.problems[0].startswith('devices[1] (id "has space", line 5): id must')
    assert e.value.problems[1] == ('devices[2] (id "x", line 9): id \'x\' repeats '
                                   'devices[0] (id "x", line 1)')


def test_a_malformed_csv_fleet_file_names_its_lines(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    path = write(d / "fleet.csv", "id,data,epoch_seconds,cellular\n"
                                  "a,data/a.csv,10,no\n"
                                  "\n"
                                  "b,data/a.csv,fast,no\n"
                                  "c,data/a.csv,10\n"
                                  "d,data/a.csv,10,maybe\n")

    with pytest.raises(FleetFileError) as e:
        parse_fleet_file(path)

    assert e.value.problems == (
        "fleet.csv line 4 (id \"b\"): epoch_seconds must be a finite number, got 'fast'",
        "fleet.csv line 5: 3 fields, the header has 4",
        "fleet.csv line 6 (id \"d\"): cellular must be true or false, got 'maybe'",
    )
    with pytest.raises(FleetFileError, match=r"line 1: unknown column\(s\) 'speed'"):
        parse_fleet_file(write(d / "f2.csv", "id,data,speed\na,data/a.csv,1\n"))


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("f.toml", "[run]\nstart = 1\n", "[run] start (line 2) must be an ISO date-time"),
    ("f.toml", "[[devices]]\n", "devices[0] (no id, line 1): id is required"),
    ("f.toml", "[runs]\n", "unknown top-level key(s) runs"),
    ("f.toml", "[run]\nduration = 3\n", "[run]: unknown key(s) duration"),
    ("f.toml", "", "no devices"),
    ("f.json", '{"devices": {}}', "devices must be a list"),
])
def test_fleet_level_problems(tmp_path, name: str, text: str, expected: str) -> None:
    with pytest.raises(FleetFileError) as e:
        parse_fleet_file(write(tmp_path / name, text))
    assert any(expected in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("f.toml", "[run\n", "is not valid TOML"),
    ("f.json", "{", "is not valid JSON"),
    ("f.yaml", "", "unsupported type"),
    ("missing.toml", None, "does not exist"),
])
def test_unreadable_fleet_files(tmp_path, name: str, text: str | None, expected: str) -> None:
    path = tmp_path / name if text is None else write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=expected):
        parse_fleet_file(path)


@pytest.mark.parametrize("name", ["f.json", "f.csv"])
def test_a_fleet_file_that_is_not_utf8_is_one_error_naming_the_byte(tmp_path, name: str) -> None:
    # One Latin-1 byte (e acute) where a device id goes: once a UnicodeDecodeError's own words.
    text = ('{"devices": [{"id": "caf\xe9"}]}' if name.endswith(".json")
            else "id,data,epoch_seconds\ncaf\xe9,a.csv,2\n")
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    offset = text.index("\xe9")
    with pytest.raises(ConfigError, match=rf"fleet file .*{name} is not UTF-8: byte 0xe9 at "
                                          rf"offset {offset} .*iconv"):
        parse_fleet_file(path)


def test_a_trace_that_is_not_utf8_is_one_problem_naming_the_byte(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes("start,end\n0,10 \xe9\n".encode("latin-1"))
    intervals, problems = read_trace(path)
    assert intervals is None
    assert len(problems) == 1 and "is not UTF-8: byte 0xe9 at offset 15" in problems[0], problems


# Two always-online, mains-powered devices and no traces: eligible from the start, so when they
# train is up to the policy's dwell and the agent's poll.
MAINS = """{tables}
[run]
test_file = "data/test.csv"

[[devices]]
id = "a"
data = "data/a.csv"
epoch_seconds = 2

[[devices]]
id = "c"
data = "data/c.csv"
epoch_seconds = 2
"""
ALWAYS_ON = """
[agent]
check_interval_s = 5
min_train_interval_s = 60

[policy]
min_dwell_s = 0
allowed_interfaces = ["eth*", "wlan*"]
max_temperature_c = 60
"""


def test_agent_and_policy_tables_set_every_devices_agent_over_the_sim_defaults(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    sim = SimConfig()

    config = replay_config(write(d / "fleet.toml", MAINS.format(tables=ALWAYS_ON)))
    plain = replay_config(write(d / "plain.toml", MAINS.format(tables="")))
    js = replay_config(write(d / "fleet.json", json.dumps({
        "run": {"test_file": "data/test.csv"},
        "agent": {"check_interval_s": 5, "min_train_interval_s": 60},
        "policy": {"min_dwell_s": 0, "allowed_interfaces": ["eth*", "wlan*"],
                   "max_temperature_c": 60},
        "devices": [{"id": "a", "data": "data/a.csv", "epoch_seconds": 2}]})))

    # Only the keys given change; the rest stay the simulator's (its dwell is 300 s, not 60).
    assert config.policy == replace(sim.policy, min_dwell_s=0.0, max_temperature_c=60.0,
                                    allowed_interfaces=("eth*", "wlan*"))
    assert (config.check_interval_sim_s, config.min_train_interval_sim_s) == (5.0, 60.0)
    assert (js.policy, js.check_interval_sim_s, js.min_train_interval_sim_s) == (
        config.policy, 5.0, 60.0)
    # Absent, nothing changes.
    assert plain.policy == sim.policy and plain.policy.min_dwell_s == 300.0
    assert (plain.check_interval_sim_s, plain.min_train_interval_sim_s) == (
        sim.check_interval_sim_s, sim.min_train_interval_sim_s)
    # Over a caller's base policy, the same: only the keys given.
    base = replace(sim, policy=PolicyConfig(max_cpu_percent=55.0))
    assert replay_config(d / "fleet.toml", base).policy == replace(
        base.policy, min_dwell_s=0.0, max_temperature_c=60.0,
        allowed_interfaces=("eth*", "wlan*"))
    # A night window: TOML's array becomes the policy's (start, end) minutes.
    night = replay_config(write(d / "night.toml", MAINS.format(
        tables="[policy]\ntime_window = [1320, 360]\n")))
    assert night.policy == replace(sim.policy, time_window=(1320, 360))


@pytest.mark.parametrize(("tables", "expected"), [
    ("[policy]\nmin_dwel_s = 0\n",
     "[policy]: unknown key(s) min_dwel_s (line 2); known: min_battery_percent, "),
    ('[policy]\nmin_dwell_s = "soon"\n',
     '[policy] min_dwell_s (line 2) must be a number (e.g. 60.0), got string "soon"'),
    ("[policy]\nmax_cpu_percent = 30\nmin_dwell_s = -5\n",
     "[policy] min_dwell_s (line 3) must be a number in [0, inf], got -5"),
    ("[policy]\ntime_window = [60]\n",
     "[policy] time_window (line 2) must be an array of 2 integers, got array [60]"),
    ("[policy]\nrequire_charging = 1\n",
     "[policy] require_charging (line 2) must be true or false, got integer 1"),
    ("[policy]\nallowed_interfaces = []\n",
     "[policy] allowed_interfaces (line 2) is empty: the device could never train"),
    ("policy = 3\n", "[policy] must be a table, got 3"),
    ("[agent]\ncheck_interval_s = 0\n", "[agent] check_interval_s (line 2) must be > 0, got 0"),
    ("[agent]\nmin_train_interval_s = -1\n",
     "[agent] min_train_interval_s (line 2) must be >= 0, got -1"),
    ("[agent]\npoll_s = 5\n",
     "[agent]: unknown key(s) poll_s (line 2); known: check_interval_s, min_train_interval_s"),
])
def test_a_bad_policy_or_agent_key_is_one_line_naming_the_key_and_file(
        tmp_path, tables: str, expected: str) -> None:
    path = write(fleet_dir(tmp_path) / "fleet.toml", MAINS.format(tables=tables))

    with pytest.raises(FleetFileError) as e:
        parse_fleet_file(path)

    assert e.value.problems[0].startswith(expected), e.value.problems
    assert str(e.value) == f"fleet file {path}: {e.value.problems[0]}"  # one problem, one line
    assert "\n" not in str(e.value)


def test_the_cli_stops_on_a_bad_policy_key_with_one_line_and_status_2(tmp_path, capsys) -> None:
    path = write(fleet_dir(tmp_path) / "fleet.toml",
                 MAINS.format(tables="[policy]\nmin_dwell = 0\n"))

    assert main(["--fleet-file", str(path), "--out", str(tmp_path / "out")]) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"error: fleet file {path}: [policy]: unknown key(s) min_dwell (line "
                          f"2); known: ") and "min_dwell_s" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # stopped before anything ran


def test_a_json_fleet_files_policy_problems_name_the_key_without_a_line(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    path = write(d / "fleet.json", json.dumps({
        "policy": {"cpu_margin": -1, "min_dwel_s": 0},
        "devices": [{"id": "a", "data": "data/a.csv", "epoch_seconds": 2}]}))

    with pytest.raises(FleetFileError) as e:
        parse_fleet_file(path)

    assert e.value.problems[0].startswith("[policy]: unknown key(s) min_dwel_s; known: ")
    assert len(e.value.problems) == 1  # the range checks wait until the keys are right
    fixed = write(d / "fixed.json", path.read_text().replace(', "min_dwel_s": 0', ""))
    with pytest.raises(FleetFileError) as e:
        parse_fleet_file(fixed)
    assert e.value.problems == ("[policy] cpu_margin must be a number in [0, inf], got -1.0",)


def test_a_run_shorter_than_300_sim_seconds_is_summarised(tmp_path) -> None:
    # `fedasync-sim --fleet-file F --scale 1 --duration 200` stopped here: "step_s must be a
    # number in (0, 200], got 300.0". Device a is online for the run's first 50 sim seconds.
    d = fleet_dir(tmp_path)
    write(d / "traces" / "a-online.csv", "start,end\n0,50\n")
    path = write(d / "fleet.toml", MAINS.format(tables="").replace(
        'id = "a"\n', 'id = "a"\nonline = "traces/a-online.csv"\n'))
    for duration_s, scale in ((200.0, 1.0), (2.0, 100.0), (0.5, 1.0)):
        config = replay_config(path, duration_s=duration_s, scale=scale)

        summary = fleet_summary(config, build_fleet(config))

        assert summary["duration_s"] == config.duration_sim_s < 300.0
        assert summary["online"] == pytest.approx(
            (min(50.0, config.duration_sim_s) / config.duration_sim_s + 1.0) / 2)
        if config.duration_sim_s == 200.0:
            # Sampled every 20 sim s (10 points, not one at 100 s): a is eligible at 10 and 30.
            assert summary["eligible"] == pytest.approx((2 / 10 + 1.0) / 2)
            assert summary["eligible_devices_min"] == 1
            assert summary["eligible_devices_mean"] == pytest.approx(1.2)


# -- loading -----------------------------------------------------------------------------------


def test_loading_builds_traces_data_spec_and_local_tests(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    path = write(d / "fleet.toml", TOML)
    clock = iter(np.arange(0.0, 100.0, 0.004).tolist())  # every timed epoch "takes" 4 ms
    config = replay_config(path)

    fleet = load_fleet(parse_fleet_file(path), config, timer=lambda: next(clock))

    a, b, c = fleet.traces
    assert a.epoch_s_per_100 == pytest.approx(30 * 100 / 30)  # 30 sim s over 30 samples
    assert b.epoch_s_per_100 == pytest.approx(12 * 100 / 24)
    assert c.epoch_s_per_100 == pytest.approx(2.5 * 0.004 * 100 / 20)
    assert b.battery_at(0.0) == 50.0 and a.battery_at(0.0) is None
    assert fleet.spec.classes == (0, 1, 2) and fleet.spec.n_features == 3
    assert (fleet.spec.learning_rate, fleet.spec.batch_size, fleet.spec.seed) == (0.1, 8, 3)
    assert [None if t is None else len(t[1]) for t in fleet.local_tests] == [None, 9, None]
    assert len(fleet.test) == 30 and fleet.parts[1][1].dtype == np.int64
    assert config.devices == 3 and config.model == "logistic"


def test_without_a_test_file_the_devices_test_files_are_the_test_set(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    path = write(d / "fleet.toml", TOML.replace('test_file = "data/test.csv"', ""))

    fleet = build_fleet(replay_config(path))

    assert len(fleet.test) == 9  # b's

    no_tests = write(d / "bare.toml", '[[devices]]\nid = "a"\ndata = "data/a.csv"\n'
                                      'epoch_seconds = 1\n')
    with pytest.raises(FleetFileError, match="pass --test-file"):
        build_fleet(replay_config(no_tests))
    given = build_fleet(replay_config(no_tests, test_file=str(d / "data" / "test.csv")))
    assert len(given.test) == 30


def test_data_that_does_not_fit_together_is_reported_per_entry(tmp_path) -> None:
    d = fleet_dir(tmp_path)
    save_npz(d / "data" / "wide.npz", np.zeros((5, 4), np.float32), np.arange(5))
    save_npz(d / "data" / "soft.npz", np.zeros((5, 3), np.float32), np.full(5, 0.5))
    write(d / "data" / "broken.csv", "a,b,c,label\n1,2,x,0\n")
    path = write(d / "fleet.toml", """
        [run]
        test_file = "data/test.csv"
        [[devices]]
        id = "wide"
        data = "data/wide.npz"
        epoch_seconds = 1
        [[devices]]
        id = "soft"
        data = "data/soft.npz"
        epoch_seconds = 1
        [[devices]]
        id = "broken"
        data = "data/broken.csv"
        epoch_seconds = 1
        """)

    with pytest.raises(FleetFileError) as e:
        build_fleet(replay_config(path))

    problems = e.value.problems
    assert any(p.startswith('devices[2] (id "broken", line 12): data: ') and "broken.csv:2" in p
               for p in problems), problems
    assert any(p.startswith('devices[1] (id "soft", line 8): data labels are not integers')
               for p in problems), problems
    assert any(p.startswith('devices[1] (id "soft", line 8): data has 3 feature(s), '
                            'devices[0] (id "wide", line 4) data has 4') for p in problems)


def test_a_regression_fleet_uses_the_linear_model_and_r2(tmp_path) -> None:
    d = tmp_path
    rng = np.random.default_rng(0)
    for name, n in (("a", 40), ("b", 30), ("test", 20)):
        X = rng.normal(size=(n, 2)).astype(np.float32)
        save_npz(d / f"{name}.npz", X, (X @ np.array([1.5, -2.0]) + 0.3).astype(np.float32))
    path = write(d / "fleet.toml", '[model]\nkind = "linear"\n[run]\ntest_file = "test.npz"\n'
                 + "".join(f'[[devices]]\nid = "{n}"\ndata = "{n}.npz"\nepoch_seconds = 5\n'
                           f'test = "test.npz"\n' for n in ("a", "b")))

    fleet = build_fleet(replay_config(path))

    assert fleet.spec.kind == "linear" and fleet.spec.classes == ()
    assert metric_of(fleet.spec) == "r2"
    from fedasync_iot.models import build_model

    model = build_model(fleet.spec)
    model.partial_fit(*fleet.parts[0], epochs=30)
    local = local_evaluation(model, fleet.local_tests, metric="r2")
    assert local is not None and local["n_devices"] == 2 and local["mean"] > 0.9
    with pytest.raises(ConfigError, match="needs a fleet file"):
        SimConfig(model="linear")


def test_flags_override_the_fleet_file(tmp_path) -> None:
    path = write(fleet_dir(tmp_path) / "fleet.toml", TOML)

    config = replay_config(path, learning_rate=0.5, cohort_size=2)

    assert (config.learning_rate, config.cohort_size, config.local_epochs) == (0.5, 2, 1)


def test_the_cli_refuses_synthetic_options_with_a_fleet_file(tmp_path, capsys) -> None:
    path = write(fleet_dir(tmp_path) / "fleet.toml", TOML)

    assert main(["--fleet-file", str(path), "--devices", "5", "--out", str(tmp_path)]) == 2
    assert "--devices describe the synthetic fleet" in capsys.readouterr().err
    assert main(["--test-file", "x.csv", "--out", str(tmp_path)]) == 2
    assert "a test file needs a fleet file" in capsys.readouterr().err


def test_the_shipped_example_fleet_loads() -> None:
    config = replay_config(EXAMPLE)
    fleet = build_fleet(config)

    assert [t.device_id for t in fleet.traces] == ["pi-kitchen", "pi-garden", "phone-old"]
    assert config.cohort_size == 2 and config.round_deadline_sim_s == 900.0
    assert fleet.traces[0].wifi.spans == ((0.0, 3600.0), (4800.0, INF))
    assert sum(t is not None for t in fleet.local_tests) == 2
    assert config.policy == SimConfig().policy  # no [policy]: the simulator's


def test_the_shipped_always_on_example_sets_the_agents_policy() -> None:
    config = replay_config(EXAMPLE.with_name("always-on.toml"))
    fleet = build_fleet(config)

    assert config.policy == replace(SimConfig().policy, min_dwell_s=0.0)
    assert (config.check_interval_sim_s, config.min_train_interval_sim_s) == (5.0, 0.0)
    assert all(t.battery is None and t.online == t.wifi == Intervals.always()
               and not t.busy.spans for t in fleet.traces)
    assert fleet_summary(config, fleet)["eligible"] == 1.0


# -- export ------------------------------------------------------------------------------------


def test_an_exported_synthetic_fleet_loads_back_the_same(tmp_path) -> None:
    out = tmp_path / "exported"
    assert main(["export-fleet", "--out", str(out), "--devices", "6", "--seed", "2",
                 "--model", "mlp", "--hidden", "16,8", "--cohort", "3"]) == 0
    original = build_fleet(SimConfig(devices=6, seed=2, model="mlp", hidden=(16, 8)))

    config = replay_config(out / "fleet.toml")
    loaded = build_fleet(config)

    assert config.cohort_size == 3 and config.seed == 2
    assert loaded.spec == original.spec
    assert len(loaded.traces) == 6
    assert any(t.battery is not None for t in loaded.traces)
    assert any(t.battery is None for t in loaded.traces)
    for a, b in zip(original.traces, loaded.traces, strict=True):
        assert b.epoch_s_per_100 == pytest.approx(a.epoch_s_per_100, rel=1e-12)
        for kind in ("online", "wifi", "charging", "busy"):
            spans_a, spans_b = getattr(a, kind).spans, getattr(b, kind).spans
            assert len(spans_a) == len(spans_b)
            assert np.allclose(spans_a, spans_b, rtol=1e-12, atol=0), kind
        assert replace(b, epoch_s_per_100=a.epoch_s_per_100) == a
    for (Xa, ya), (Xb, yb) in zip(original.parts, loaded.parts, strict=True):
        assert np.array_equal(Xa, Xb) and np.array_equal(ya, yb)
    assert np.array_equal(original.test.X, loaded.test.X)
    assert np.array_equal(original.test.y, loaded.test.y)
    assert len(loaded.local_tests) == 6
    for a, b in zip(original.local_tests, loaded.local_tests, strict=True):
        assert a is not None and b is not None
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert config.policy == SimConfig().policy  # written in full, read back the same
    assert config.check_interval_sim_s == SimConfig().check_interval_sim_s
    with pytest.raises(ConfigError, match="takes no fleet file"):
        export_fleet(config, tmp_path / "again")


def test_export_writes_the_agent_and_policy_tables_and_they_load_back(tmp_path) -> None:
    policy = PolicyConfig(min_dwell_s=0.0, require_charging=True, time_window=(1320, 360),
                          allowed_interfaces=("eth*",), denied_interfaces=(),
                          max_temperature_c=62.5)
    config = SimConfig(devices=3, seed=4, policy=policy, check_interval_sim_s=7.5,
                       min_train_interval_sim_s=40.0)

    path = export_fleet(config, tmp_path / "out")
    loaded = replay_config(path)

    assert loaded.policy == policy
    assert (loaded.check_interval_sim_s, loaded.min_train_interval_sim_s) == (7.5, 40.0)
    text = path.read_text()
    assert "\n[policy]" in text and "\nmin_dwell_s = 0.0\n" in text
    assert "\ntime_window = [1320, 360]\n" in text and "\ndenied_interfaces = []\n" in text


# -- local evaluation --------------------------------------------------------------------------


class _Scores:
    """A model whose score on a device's test set is written in that set (a metric other than
    accuracy: that one is computed for all devices at once, tested below)."""

    def evaluate(self, X: Any, y: Any) -> dict[str, float]:
        return {"score": float(X[0, 0]), "loss": 0.0}


def _tests(*scores: float) -> list[Any]:
    return [(np.array([[s]]), np.array([0])) for s in scores]


def test_local_evaluation_reports_the_mean_and_the_worst_tenth() -> None:
    scores = [0.9] * 18 + [0.2, 0.4]
    result = local_evaluation(_Scores(), [None, *_tests(*scores)],  # type: ignore[arg-type]
                              metric="score")

    assert result is not None
    assert result["n_devices"] == 20
    assert result["mean"] == pytest.approx(np.mean(scores))
    assert result["worst_10pct"] == pytest.approx(0.3)  # 2 of 20 devices
    few = local_evaluation(_Scores(), _tests(0.8, 0.5, 0.7), metric="score")  # type: ignore[arg-type]
    assert few is not None and few["worst_10pct"] == 0.5  # at least one device
    assert local_evaluation(_Scores(), [None, None]) is None  # type: ignore[arg-type]
    assert local_evaluation(_Scores(), []) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_device_accuracies_computed_at_once_equal_one_evaluation_per_device(kind: str) -> None:
    """`device_scores` scores every device's set with one prediction per model: the same
    figures as `evaluate` on each set, devices without a set left out."""
    from fedasync_iot.fleet._sim import device_scores
    from fedasync_iot.models import ModelSpec, build_model

    rng = np.random.default_rng(3)
    model = build_model(ModelSpec(kind=kind, n_features=6, classes=(0, 1, 2, 5), hidden=(8,)))
    params = [rng.standard_normal(model.n_params).astype(np.float32) for _ in range(3)]
    tests = [None if i % 7 == 3 else (rng.standard_normal((int(rng.integers(1, 30)), 6)),
                                      rng.choice([0, 1, 2, 5], int(rng.integers(1, 30))))
             for i in range(40)]
    tests = [None if t is None else (t[0], rng.choice([0, 1, 2, 5], len(t[0]))) for t in tests]

    got = device_scores(model, tests, params=params)

    expected: list[float | None] = []
    for t in tests:
        if t is None:
            expected.append(None)
            continue
        scores = []
        for p in params:
            model.set_params_vector(p)
            scores.append(model.evaluate(*t)["accuracy"])
        expected.append(float(np.mean(scores)))
    assert [g is None for g in got] == [e is None for e in expected]
    np.testing.assert_allclose([g for g in got if g is not None],
                               [e for e in expected if e is not None], rtol=0, atol=1e-12)


# -- a replay on a real broker -----------------------------------------------------------------


@pytest.mark.broker
def test_a_replayed_fleet_runs_and_an_offline_device_sends_nothing(broker, tmp_path) -> None:
    # b is offline over [3000, 6000) sim s (2 wall s). An update published just before 3000 may
    # still be on its way then (the coordinator stamps arrivals from a busy thread): allow
    # `slack` for that, 0.4 wall s.
    d = fleet_dir(tmp_path)
    path = write(d / "fleet.toml", TOML.replace("epoch_multiplier = 2.5", "epoch_seconds = 8"))
    scale = 1500.0
    config = replace(replay_config(path), duration_s=5.5, scale=scale, broker=broker.url,
                     workers=1, cohort_size=2, round_deadline_sim_s=600.0, fedasync_alpha=0.5)
    slack = 0.4 * scale

    results, summary = compare(config, ["fedasync", "fedavg-sync"], tmp_path / "out",
                               progress=False)

    for r in results:
        s = r.summary
        assert s["versions"] >= 3, s
        assert s["metric"] == "accuracy" and s["fleet_file"] == str(path)
        assert s["local_accuracy"]["n_devices"] == 1, s  # only b has a test file
        assert 0.0 <= s["local_accuracy"]["worst_10pct"] <= 1.0
        by_device: dict[str, list[float]] = {}
        for a in r.arrivals:
            by_device.setdefault(a.device_id, []).append(a.sim_s)
        assert set(by_device) == {"a", "b", "c"}, by_device.keys()
        b = by_device["b"]
        assert not [t for t in b if 3000.0 + slack <= t < 6000.0], b
        assert any(t < 3000.0 for t in b) and any(t >= 6000.0 for t in b), b
        # The others kept sending meanwhile: the gap is b's, not the run's.
        assert any(3000.0 + slack <= t < 6000.0 for t in by_device["a"]), by_device["a"]
        rows = list(csv.DictReader((r.out_dir / "updates.csv").open()))
        assert len(rows) == len(r.arrivals)
    assert summary["fleet"]["n_devices"] == 3 and summary["fleet"]["dirichlet_alpha"] is None


@pytest.mark.broker
def test_an_always_available_fleet_trains_at_once_in_a_run_under_300_sim_seconds(
        broker, tmp_path) -> None:
    # 4 wall s x 50 = 200 sim s, through the command line as a user runs it. Under the
    # simulator's policy a device must pass its checks for 300 sim s before it trains, so no
    # update can arrive; with [policy] min_dwell_s = 0 and a 5 s poll they train at once.
    d = fleet_dir(tmp_path)
    runs = {}
    for name, tables in (("default", ""), ("always-on", ALWAYS_ON)):
        path = write(d / f"{name}.toml", MAINS.format(tables=tables))
        out = tmp_path / name
        assert main(["--fleet-file", str(path), "--duration", "4", "--scale", "50",
                     "--rule", "fedasync", "--workers", "1", "--broker", broker.url,
                     "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["fleet"]["duration_s"] == 200.0
        runs[name] = list(csv.DictReader((out / "fedasync" / "updates.csv").open()))

    assert runs["default"] == []
    arrivals = runs["always-on"]
    assert {a["device_id"] for a in arrivals} == {"a", "c"}, arrivals
    # min_train_interval_s = 60: a device starts training at least 60 sim s after it last
    # did. Arrivals also carry the real training's and the network's wall time (x 50 here):
    # allow 0.3 wall s of that. Without the interval the gaps here are about 25 sim s.
    slack = 0.3 * 50
    for device in ("a", "c"):
        times = sorted(float(a["sim_s"]) for a in arrivals if a["device_id"] == device)
        assert len(times) >= 2, (device, times)
        assert all(b - a >= 60.0 - slack for a, b in itertools.pairwise(times)), (device, times)
