"""Fleet files: a user's own fleet for ``fedasync-sim --fleet-file``, and `export_fleet`, which
writes the synthetic fleet in the same format so a user can start from it and edit.

A fleet file (TOML, JSON or CSV; the format is in docs/fleet-files.md) lists one
entry per device: its data file, an optional test file, its compute time per local epoch and
optional trace CSVs of ``start,end`` intervals (online, Wi-Fi, charging, owner busy). Three steps:

- `parse_fleet_file`: the fleet file and every trace CSV into a frozen `FleetFile`. Pure
  validation: data files must exist but are not read. Every problem is collected and raised
  together as one `FleetFileError`, each naming its entry (``devices[2] (id "pi-kitchen", line
  14)`` or ``fleet.csv line 4 (id "pi-kitchen")``) and, inside a trace CSV, ``file:line``.
- `load_fleet`: data and test files read, compute times resolved (``epoch_multiplier`` is timed
  here, on this machine), into the simulator's `Fleet`, the same object `synthetic_fleet` makes for
  the synthetic fleet, so nothing downstream can tell the difference.
- `export_fleet`: the synthetic fleet written as a fleet file plus data and trace
  files; loading it back gives the same traces and data.

Paths inside a fleet file are relative to the fleet file's directory. Times in trace CSVs are sim
seconds since the run's start, or ISO-8601 timestamps when the fleet file sets ``[run] start``.

Besides the devices, a TOML or JSON fleet file may set the run (``[run]``, ``[model]``) and what
every simulated device's agent does: ``[agent]`` (its poll ``check_interval_s`` and
``min_train_interval_s``, sim seconds) and ``[policy]`` (the keys of the agent's
`PolicyConfig`, checked by it, over the simulator's default policy).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any

import numpy as np

from fedasync_iot.agent import PolicyConfig
from fedasync_iot.fleet._fairness import XY
from fedasync_iot.fleet._sim import Fleet, SimConfig, model_spec, synthetic_fleet
from fedasync_iot.fleet._traces import _TOPIC_UNSAFE, Battery, DeviceTrace, Intervals, Span
from fedasync_iot.models import (
    MODEL_KINDS,
    ConfigError,
    Dataset,
    FedAsyncError,
    ModelSpec,
    check_layer,
    load_toml,
    load_xy,
    read_utf8,
    save_npz,
)

FLEET_SUFFIXES = (".toml", ".json", ".csv")
TRACE_KINDS = ("online", "wifi", "charging", "busy")
_DEFAULT_START_MINUTES = 8 * 60  # DeviceTrace's default: local time 08:00 at sim time 0
_MEASURE_REPEATS = 3
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class FleetFileError(ConfigError):
    """A fleet file (or a file it names) with problems; `problems` lists every one of them,
    each starting with the entry it is about. One problem is one line: ``fleet file F:
    problem``; more are listed under a count."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = tuple(problems)
        n = len(self.problems)
        if n == 1:
            message = f"fleet file {path}: {self.problems[0]}"
        else:
            lines = "".join(f"\n  - {p}" for p in self.problems)
            message = f"fleet file {path}: {n} problems:{lines}"
        super().__init__(message, key="fleet_file")


class _Bad(Exception):
    """One problem with one value; collected, never escapes this module."""


# -- what a fleet file holds -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    """The fleet file's ``[run]`` and ``[model]`` tables; None where the file says nothing.
    Command-line flags override them (`replay_config`)."""

    model: str | None = None
    learning_rate: float | None = None
    local_epochs: int | None = None
    batch_size: int | None = None
    hidden: tuple[int, ...] | None = None
    l2: float | None = None
    test_file: Path | None = None
    seed: int | None = None
    duration_s: float | None = None
    scale: float | None = None
    target: float | None = None
    cohort_size: int | None = None
    deadline_min: float | None = None
    over_selection: float | None = None
    fedasync_alpha: float | None = None
    fedbuff_k: int | None = None
    # [agent]: the simulated agents' intervals, sim seconds.
    check_interval_s: float | None = None
    min_train_interval_s: float | None = None
    # [policy]: the PolicyConfig keys given (checked), applied over the simulator's policy.
    policy: Mapping[str, Any] | None = None

    def overrides(self, policy: PolicyConfig | None = None) -> dict[str, Any]:
        """The settings given, as `SimConfig` fields; ``[policy]`` over `policy` (default: the
        simulator's default policy)."""
        names = {"target": "target_accuracy", "deadline_min": "round_deadline_sim_s",
                 "check_interval_s": "check_interval_sim_s",
                 "min_train_interval_s": "min_train_interval_sim_s"}
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            if value is None:
                continue
            if key == "policy":
                value = replace(policy or SimConfig().policy, **value)
            elif key == "deadline_min":
                value = value * 60.0
            elif key == "test_file":
                value = str(value)
            out[names.get(key, key)] = value
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceEntry:
    """One device of a fleet file, validated: paths resolved, traces read.

    Exactly one of ``epoch_seconds`` (sim seconds per local epoch over the device's whole data)
    and ``epoch_multiplier`` (times this machine's measured time for that epoch) is set. No online
    or Wi-Fi trace means always; no charging trace and no battery settings mean mains power.
    """

    where: str  # how problems name this entry
    device_id: str
    data: Path
    test: Path | None = None
    epoch_seconds: float | None = None
    epoch_multiplier: float | None = None
    online: Intervals = field(default_factory=Intervals.always)
    wifi: Intervals = field(default_factory=Intervals.always)
    charging: Intervals = field(default_factory=Intervals)
    busy: Intervals = field(default_factory=Intervals)
    battery: Battery | None = None
    # Same defaults as DeviceTrace's.
    cellular: bool = False
    idle_cpu_percent: float = 5.0
    busy_cpu_percent: float = 85.0
    mem_available_mb: float = 512.0
    temperature_c: float = 45.0

    def __post_init__(self) -> None:
        if (self.epoch_seconds is None) == (self.epoch_multiplier is None):
            raise ConfigError("give exactly one of epoch_seconds and epoch_multiplier",
                              key="epoch_seconds")
        self.trace(1.0)  # DeviceTrace checks the id and every other value

    def trace(self, epoch_s_per_100: float, *,
              start_local_minutes: int = _DEFAULT_START_MINUTES) -> DeviceTrace:
        return DeviceTrace(
            device_id=self.device_id, epoch_s_per_100=epoch_s_per_100, online=self.online,
            wifi=self.wifi, charging=self.charging, busy=self.busy, battery=self.battery,
            cellular=self.cellular, idle_cpu_percent=self.idle_cpu_percent,
            busy_cpu_percent=self.busy_cpu_percent, mem_available_mb=self.mem_available_mb,
            temperature_c=self.temperature_c, start_local_minutes=start_local_minutes)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetFile:
    path: Path
    devices: tuple[DeviceEntry, ...]
    settings: RunSettings = field(default_factory=RunSettings)
    label: str = "label"  # the label column of CSV data files
    start_local_minutes: int = _DEFAULT_START_MINUTES

    def __post_init__(self) -> None:
        if not self.devices:
            raise ConfigError(f"fleet file {self.path} lists no devices", key="devices")
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"fleet file {self.path}: device ids repeat", key="devices")


# -- keys and their types ----------------------------------------------------------------------

# Per key: the type it must have. CSV cells are text and are read as that type first.
_DEVICE_KEYS: dict[str, str] = {
    "id": "str", "data": "path", "test": "path",
    "epoch_seconds": "positive", "epoch_multiplier": "positive",
    **dict.fromkeys(TRACE_KINDS, "path"),
    "battery_initial_percent": "number", "battery_drain_per_h": "number",
    "battery_charge_per_h": "number",
    "cellular": "bool", "idle_cpu_percent": "number", "busy_cpu_percent": "number",
    "mem_available_mb": "number", "temperature_c": "number",
}
_BATTERY_KEYS = {"battery_initial_percent": "initial_percent",
                 "battery_drain_per_h": "drain_per_h", "battery_charge_per_h": "charge_per_h"}
_HARDWARE_KEYS = ("cellular", "idle_cpu_percent", "busy_cpu_percent", "mem_available_mb",
                  "temperature_c")
_MODEL_KEYS: dict[str, tuple[str, str]] = {  # file key -> (RunSettings field, type)
    "kind": ("model", "kind"), "learning_rate": ("learning_rate", "positive"),
    "local_epochs": ("local_epochs", "count"), "batch_size": ("batch_size", "count"),
    "hidden": ("hidden", "layers"), "l2": ("l2", "non_negative"),
}
_RUN_KEYS: dict[str, tuple[str, str]] = {
    "test_file": ("test_file", "path"), "seed": ("seed", "seed"),
    "duration_s": ("duration_s", "positive"), "scale": ("scale", "positive"),
    "target": ("target", "number"), "cohort_size": ("cohort_size", "count"),
    "deadline_min": ("deadline_min", "positive"), "over_selection": ("over_selection", "number"),
    "fedasync_alpha": ("fedasync_alpha", "positive"), "fedbuff_k": ("fedbuff_k", "count"),
}
_RUN_ONLY = ("label", "start")  # [run] keys that are about reading the files, not SimConfig
_AGENT_KEYS: dict[str, tuple[str, str]] = {  # the simulated agents' intervals, sim seconds
    "check_interval_s": ("check_interval_s", "positive"),
    "min_train_interval_s": ("min_train_interval_s", "non_negative"),
}
_TABLES = ("run", "model", "agent", "policy")


def _typed(value: object, kind: str, *, text: bool = False) -> Any:
    """`value` as type `kind`, or `_Bad`. ``text``: a CSV cell, to be read as that type."""
    if text and isinstance(value, str):
        value = _from_text(value.strip(), kind)
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"must be a non-empty {'path' if kind == 'path' else 'string'}, "
                       f"got {value!r}")
        return value.strip()
    if kind == "bool":
        if not isinstance(value, bool):
            raise _Bad(f"must be true or false, got {value!r}")
        return value
    if kind == "kind":
        if value not in MODEL_KINDS:
            raise _Bad(f"must be one of {', '.join(MODEL_KINDS)}, got {value!r}")
        return value
    if kind in ("count", "seed"):
        lo = 1 if kind == "count" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise _Bad(f"must be an integer >= {lo}, got {value!r}")
        return value
    if kind == "layers":
        if not (isinstance(value, list) and value and all(
                isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in value)):
            raise _Bad(f"must be a list of positive layer sizes, e.g. [32, 16], got {value!r}")
        return tuple(value)
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value)):
        raise _Bad(f"must be a finite number, got {value!r}")
    number = float(value)
    if (kind == "positive" and number <= 0) or (kind == "non_negative" and number < 0):
        raise _Bad(f"must be {'> 0' if kind == 'positive' else '>= 0'}, got {value!r}")
    return number


def _from_text(cell: str, kind: str) -> object:
    if kind == "bool":
        return _BOOLS.get(cell.lower(), cell)
    if kind in ("number", "positive", "non_negative"):
        try:
            return float(cell)
        except ValueError:
            return cell
    return cell


# -- parsing -----------------------------------------------------------------------------------

# (where, raw values, values are CSV text, a problem that stops the entry being read)
Entry = tuple[str, Mapping[str, Any], bool, str | None]


def parse_fleet_file(path: Path) -> FleetFile:
    """Read and validate a fleet file and its trace CSVs; `FleetFileError` lists every problem."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FLEET_SUFFIXES:
        raise ConfigError(f"fleet file {path}: unsupported type {suffix!r} (use .toml, .json or "
                          f".csv)", key="fleet_file")
    if not path.is_file():
        raise ConfigError(f"fleet file {path} does not exist", key="fleet_file")
    problems: list[str] = []
    if suffix == ".csv":
        top: dict[str, Any] = {}
        entries = _csv_entries(path, problems)
    else:
        top = _read_toml_or_json(path, suffix)
        entries = _table_entries(path, top, problems)
    base = path.parent
    lines = _table_key_lines(path) if suffix == ".toml" else {}
    settings, label, start = _settings(top, base, problems, lines)
    start_minutes = (_DEFAULT_START_MINUTES if start is None
                     else start.hour * 60 + start.minute)
    start_at = start if isinstance(start, datetime) else None
    devices: list[DeviceEntry] = []
    for where, raw, text, unreadable in entries:  # in file order, so problems are too
        if unreadable is not None:
            problems.append(f"{where}: {unreadable}")
            continue
        device = _device(where, raw, base=base, start=start_at, text=text, problems=problems)
        if device is not None:
            devices.append(device)
    seen: dict[str, str] = {}
    for d in devices:
        if d.device_id in seen:
            problems.append(f"{d.where}: id {d.device_id!r} repeats {seen[d.device_id]}")
        seen.setdefault(d.device_id, d.where)
    if not entries and not problems:
        problems.append("no devices: add one entry per device "
                        "([[devices]] tables in TOML, a \"devices\" list in JSON, rows in CSV)")
    if problems:
        raise FleetFileError(path, problems)
    return FleetFile(path=path, devices=tuple(devices), settings=settings, label=label,
                     start_local_minutes=start_minutes)



def _read_toml_or_json(path: Path, suffix: str) -> dict[str, Any]:
    if suffix == ".toml":
        return load_toml(path)
    text = read_utf8(path, "fleet file", hint="JSON files must be UTF-8", key="fleet_file")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"fleet file {path} is not valid JSON: {exc}",
                          key="fleet_file") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"fleet file {path}: the top level must be an object with \"devices\"",
                          key="fleet_file")
    return data


def _table_entries(path: Path, top: Mapping[str, Any], problems: list[str]) -> list[Entry]:
    unknown = sorted(set(top) - {*_TABLES, "devices"})
    if unknown:
        problems.append(f"unknown top-level key(s) {', '.join(unknown)} "
                        f"(expected [run], [model], [agent], [policy] and [[devices]])")
    raw = top.get("devices", [])
    if not isinstance(raw, list):
        problems.append("devices must be a list of tables ([[devices]] in TOML)")
        return []
    # tomllib keeps no line numbers; the n-th [[devices]] header is the n-th entry, which is
    # worth showing in a long file. (An inline array of tables has no headers: no lines then.)
    lines = _devices_header_lines(path) if path.suffix.lower() == ".toml" else []
    entries: list[Entry] = []
    for i, item in enumerate(raw):
        line = f", line {lines[i]}" if len(lines) == len(raw) else ""
        ident = item.get("id") if isinstance(item, dict) else None
        name = f'id "{ident}"' if isinstance(ident, str) else "no id"
        where = f"devices[{i}] ({name}{line})"
        if not isinstance(item, dict):
            entries.append((where, {}, False, f"must be a table of settings, got {item!r}"))
            continue
        entries.append((where, item, False, None))
    return entries


def _devices_header_lines(path: Path) -> list[int]:
    header = re.compile(r"^\s*\[\[\s*devices\s*\]\]")
    with path.open(encoding="utf-8", errors="replace") as f:
        return [n for n, line in enumerate(f, start=1) if header.match(line)]


def _csv_entries(path: Path, problems: list[str]) -> list[Entry]:
    text = read_utf8(path, "fleet file", hint="CSV files must be UTF-8", key="fleet_file")
    try:
        rows = list(_csv_rows(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ConfigError(f"cannot read fleet file {path}: {exc}", key="fleet_file") from exc
    if not rows:
        problems.append(f"{path.name}: empty (need a header row: id,data,epoch_seconds,...)")
        return []
    header_line, header = rows[0]
    columns = [c.strip() for c in header]
    unknown = [c for c in columns if c not in _DEVICE_KEYS]
    if unknown:
        problems.append(f"{path.name} line {header_line}: unknown column(s) "
                        f"{', '.join(map(repr, unknown))}; known: {', '.join(_DEVICE_KEYS)}")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        problems.append(f"{path.name} line {header_line}: repeated column(s) "
                        f"{', '.join(repeated)}")
    if unknown or repeated:
        return []
    entries: list[Entry] = []
    for line, row in rows[1:]:
        ident = row[columns.index("id")].strip() if "id" in columns and len(row) == len(
            columns) else ""
        where = f"{path.name} line {line}" + (f' (id "{ident}")' if ident else "")
        if len(row) != len(columns):
            entries.append((where, {}, True, f"{len(row)} fields, the header has {len(columns)}"))
            continue
        # An empty cell is a setting not given.
        entries.append((where, {c: v for c, v in zip(columns, row, strict=True) if v.strip()},
                        True, None))
    return entries


def _csv_rows(f: Any) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of the rows that are not blank or ``#`` comments."""
    reader = csv.reader(f)
    for row in reader:
        if not row or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        yield reader.line_num, row


def _table_key_lines(path: Path) -> dict[tuple[str, str], int]:
    """(table, key) -> the line of ``key =`` under ``[table]`` in a TOML file: tomllib keeps no
    line numbers, and a problem is easier to find with one."""
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]")
    assignment = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
    found: dict[tuple[str, str], int] = {}
    table: str | None = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if line.lstrip().startswith("["):
                match = header.match(line)  # [[devices]] does not match: no table of ours
                table = match.group(1) if match else None
            elif table is not None and (match := assignment.match(line)):
                found.setdefault((table, match.group(1)), n)
    return found


def _settings(top: Mapping[str, Any], base: Path, problems: list[str],
              lines: Mapping[tuple[str, str], int]
              ) -> tuple[RunSettings, str, datetime | dtime | None]:
    """The ``[run]``, ``[model]``, ``[agent]`` and ``[policy]`` tables: (settings, CSV label
    column, start). Problems name the table, the key and (TOML) its line."""

    def named(table: str, key: str) -> str:
        line = lines.get((table, key))
        return f"{key} (line {line})" if line is not None else key

    values: dict[str, Any] = {}
    label, start = "label", None
    for table, keys in (("model", _MODEL_KEYS), ("run", _RUN_KEYS), ("agent", _AGENT_KEYS)):
        raw = top.get(table, {})
        if not isinstance(raw, dict):
            problems.append(f"[{table}] must be a table, got {raw!r}")
            continue
        extra = _RUN_ONLY if table == "run" else ()
        unknown = sorted(set(raw) - set(keys) - set(extra))
        if unknown:
            problems.append(f"[{table}]: unknown key(s) "
                            f"{', '.join(named(table, k) for k in unknown)}; known: "
                            f"{', '.join([*keys, *extra])}")
        for key, value in raw.items():
            if key not in keys:
                continue
            name, kind = keys[key]
            try:
                typed = _typed(value, kind)
            except _Bad as exc:
                problems.append(f"[{table}] {named(table, key)} {exc}")
                continue
            values[name] = base / typed if kind == "path" else typed
        if table == "run":
            try:
                label = _typed(raw.get("label", "label"), "str")
            except _Bad as exc:
                problems.append(f"[run] {named('run', 'label')} {exc}")
            try:
                start = _start(raw.get("start"))
            except _Bad as exc:
                problems.append(f"[run] {named('run', 'start')} {exc}")
    if "test_file" in values and not values["test_file"].is_file():
        problems.append(f"[run] {named('run', 'test_file')}: {values['test_file']} does not "
                        f"exist")
    if values.get("over_selection", 1.0) < 1.0:
        problems.append(f"[run] {named('run', 'over_selection')} must be >= 1")
    policy = _policy(top.get("policy", {}), problems, named)
    if policy:
        values["policy"] = policy
    return RunSettings(**values), label, start


def _policy(raw: object, problems: list[str], named: Callable[[str, str], str]
            ) -> dict[str, Any] | None:
    """``[policy]``: the `PolicyConfig` keys given, each of its field's type and together
    passing its checks (over the simulator's default policy); None after adding problems."""
    if not isinstance(raw, dict):
        problems.append(f"[policy] must be a table, got {raw!r}")
        return None
    before = len(problems)
    known = list(PolicyConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        problems.append(f"[policy]: unknown key(s) "
                        f"{', '.join(named('policy', k) for k in unknown)}; known: "
                        f"{', '.join(known)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            continue
        try:  # the agent's own config loader: lists become tuples, integers floats
            values.update(check_layer(PolicyConfig, {key: value}, source="policy"))
        except ConfigError as exc:
            problems.append(f"[policy] {named('policy', key)}"
                            f"{str(exc).removeprefix(f'policy: {key}')}")
    if len(problems) > before:
        return None
    try:
        replace(SimConfig().policy, **values)  # its range checks, one at a time
    except ConfigError as exc:
        key = exc.key or ""
        message = str(exc)
        if key and message.startswith(key):
            message = named("policy", key) + message[len(key):]
        problems.append(f"[policy] {message}")
        return None
    return values


def _start(value: object) -> datetime | dtime | None:
    """``[run] start``: a date-time (trace CSVs may then use ISO timestamps) or a time of day;
    either sets the devices' local time at sim time 0."""
    if value is None or isinstance(value, (datetime, dtime)):
        return value
    if isinstance(value, date):
        return datetime.combine(value, dtime())
    if isinstance(value, str):
        for parse in (_iso_datetime, dtime.fromisoformat):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    raise _Bad(f"must be an ISO date-time (2024-05-01T08:00:00) or a time of day (08:00), "
               f"got {value!r}")


def _iso_datetime(text: str) -> datetime:
    if "T" not in text and " " not in text:
        raise ValueError(f"not a date-time: {text!r}")
    # Python 3.10's fromisoformat does not read the "Z" suffix.
    return datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def _device(where: str, raw: Mapping[str, Any], *, base: Path, start: datetime | None,
            text: bool, problems: list[str]) -> DeviceEntry | None:
    """One entry, or None after adding its problems."""
    before = len(problems)

    def bad(message: str) -> None:
        problems.append(f"{where}: {message}")

    unknown = sorted(set(raw) - set(_DEVICE_KEYS))
    if unknown:
        bad(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(_DEVICE_KEYS)}")
    values: dict[str, Any] = {}
    for key, kind in _DEVICE_KEYS.items():
        if key not in raw:
            continue
        try:
            values[key] = _typed(raw[key], kind, text=text)
        except _Bad as exc:
            bad(f"{key} {exc}")
    for key in ("id", "data"):
        if key not in raw:
            bad(f"{key} is required")
    device_id = values.get("id")
    if isinstance(device_id, str) and (not device_id or _TOPIC_UNSAFE & set(device_id)):
        # Checked here too (DeviceEntry would say it) so it is listed with the other problems.
        bad(f"id must be a non-empty name without / + # or spaces, got {device_id!r}")
    if "epoch_seconds" in raw and "epoch_multiplier" in raw:
        bad("give one of epoch_seconds and epoch_multiplier, not both")
    elif "epoch_seconds" not in raw and "epoch_multiplier" not in raw:
        bad("needs a compute time: epoch_seconds (sim seconds per local epoch) or "
            "epoch_multiplier (times this machine's measured epoch)")
    for key in ("data", "test"):
        if key in values:
            values[key] = base / values[key]
            if not values[key].is_file():
                bad(f"{key} file {values[key]} does not exist")
    traces: dict[str, Intervals] = {}
    for kind in TRACE_KINDS:
        if kind in values:
            trace_path = base / values[kind]
            intervals, trace_problems = read_trace(trace_path, start=start)
            problems.extend(f"{where}: {kind}: {p}" for p in trace_problems)
            if intervals is not None:
                traces[kind] = intervals
    battery = None
    given = {_BATTERY_KEYS[k]: values[k] for k in _BATTERY_KEYS if k in values}
    if given or "charging" in raw:
        try:
            battery = Battery(**given)
        except ConfigError as exc:
            bad(f"battery_{exc.key}: {exc}")
    if len(problems) > before:
        return None
    always, never = Intervals.always(), Intervals()
    hardware: dict[str, Any] = {k: values[k] for k in _HARDWARE_KEYS if k in values}
    try:
        return DeviceEntry(
            where=where, device_id=values["id"], data=values["data"], test=values.get("test"),
            epoch_seconds=values.get("epoch_seconds"),
            epoch_multiplier=values.get("epoch_multiplier"), battery=battery,
            online=traces.get("online", always), wifi=traces.get("wifi", always),
            charging=traces.get("charging", never), busy=traces.get("busy", never), **hardware)
    except ConfigError as exc:
        bad(str(exc))
        return None


def read_trace(path: Path, *, start: datetime | None = None
               ) -> tuple[Intervals | None, list[str]]:
    """A trace CSV: a header with ``start`` and ``end`` columns (others are ignored), one
    interval per row. Returns (intervals, problems as ``file:line: ...``); intervals is None
    when there are problems.

    A time is sim seconds since the run's start, or an ISO-8601 timestamp when ``start`` is
    given (the fleet file's ``[run] start``). An empty end or ``inf`` means "until the end".
    Spans may overlap or touch (they are merged) and may begin before the start (they are cut
    there); blank lines and lines starting with ``#`` are skipped.
    """
    if not path.exists():
        return None, [f"{path} does not exist"]
    try:
        text = read_utf8(path, "trace file", hint="CSV files must be UTF-8")
        rows = list(_csv_rows(io.StringIO(text, newline="")))
    except ConfigError as exc:
        return None, [str(exc)]
    except csv.Error as exc:
        return None, [f"{path}: cannot read: {exc}"]
    if not rows:
        return None, [f"{path}: empty; need a header row \"start,end\""]
    header_line, header = rows[0]
    columns = [c.strip().lower() for c in header]
    if "start" not in columns or "end" not in columns:
        return None, [f"{path}:{header_line}: the header must name the columns start and end, "
                      f"got {','.join(header)!r}"]
    i_start, i_end = columns.index("start"), columns.index("end")
    spans: list[Span] = []
    problems: list[str] = []
    for line, row in rows[1:]:
        try:
            if len(row) <= max(i_start, i_end):
                raise _Bad(f"{len(row)} field(s), need start and end")
            s = _trace_time(row[i_start], start, what="start")
            e = _trace_time(row[i_end], start, what="end")
            if not e > s:
                raise _Bad(f"end {row[i_end].strip()!r} is not after start "
                           f"{row[i_start].strip()!r}")
        except _Bad as exc:
            problems.append(f"{path}:{line}: {exc}")
            continue
        if e > 0.0:
            spans.append((max(s, 0.0), e))
    return (None, problems) if problems else (Intervals.of(spans), [])


def _trace_time(cell: str, start: datetime | None, *, what: str) -> float:
    text = cell.strip()
    if what == "end" and text.lower() in ("", "inf", "infinity"):
        return math.inf
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise _Bad(f"{what} must be finite, got {text!r}")
        return value
    try:
        stamp = _iso_datetime(text)
    except ValueError:
        raise _Bad(f"{what} {text!r} is neither seconds nor an ISO-8601 timestamp") from None
    if start is None:
        raise _Bad(f"{what} {text!r} is a timestamp: set [run] start (a date-time) in the fleet "
                   f"file so it can be placed on the run's clock")
    try:
        return (stamp - start).total_seconds()
    except TypeError:
        raise _Bad(f"{what} {text!r} and [run] start must both have a time zone or both "
                   f"have none") from None


# -- loading -----------------------------------------------------------------------------------


def replay_config(path: Path, base: SimConfig | None = None, **flags: Any) -> SimConfig:
    """The `SimConfig` of a replay: `base` (defaults) < the fleet file's [run]/[model]/[agent]/
    [policy] < `flags` (the command line's, given ones only). ``[policy]`` changes only the keys
    it gives of `base`'s policy."""
    fleet_file = parse_fleet_file(path)
    settings = {**fleet_file.settings.overrides((base or SimConfig()).policy), **flags}
    return replace(base or SimConfig(), **settings, fleet_file=str(path),
                   devices=len(fleet_file.devices))


def load_fleet(fleet_file: FleetFile, config: SimConfig, *,
               timer: Callable[[], float] = time.perf_counter) -> Fleet:
    """The `Fleet` of a fleet file: every data and test file read and checked together (one
    `FleetFileError` with all problems), compute times resolved, the model spec derived.

    The coordinator's test set: ``config.test_file``, else every device's test file together.
    Classes: the union of the labels in all device data and the test set. ``epoch_multiplier``
    times one local epoch of that device's data with the real adapter on this machine (best of
    3, from the model's seeded initial weights): the replay then depends on this machine.
    """
    problems: list[str] = []
    devices = fleet_file.devices
    parts = [_load(d.where, "data", d.data, fleet_file.label, problems) for d in devices]
    local = [None if d.test is None else _load(d.where, "test", d.test, fleet_file.label,
                                               problems) for d in devices]
    if config.test_file is not None:
        test = _load("test file", "", Path(config.test_file), fleet_file.label, problems)
    elif any(d.test is not None for d in devices):
        given = [t for t in local if t is not None]
        test = (np.concatenate([X for X, _ in given]), np.concatenate([y for _, y in given])
                ) if len(given) == sum(d.test is not None for d in devices) else None
    else:
        problems.append("no held-out test set for the coordinator: pass --test-file, set "
                        "[run] test_file, or give devices a test file")
        test = None
    named = [(d.where, "data", xy) for d, xy in zip(devices, parts, strict=True)]
    named += [(d.where, "test", xy) for d, xy in zip(devices, local, strict=True)]
    named.append(("test file", "", test))
    _check_agreement(named, config.model, problems)
    if problems:
        raise FleetFileError(fleet_file.path, problems)
    assert test is not None  # no problems: every file loaded
    loaded = [(where, xy) for where, _, xy in named if xy is not None]
    n_features = loaded[0][1][0].shape[1]
    classifier = config.model != "linear"
    classes: tuple[int, ...] = ()
    if classifier:
        classes = tuple(int(c) for c in np.unique(np.concatenate(
            [np.asarray(y, dtype=np.int64) for _, (_, y) in loaded])))
        if len(classes) < 2:
            raise FleetFileError(fleet_file.path, [
                f"the data has only one class ({classes}); a classifier needs two or more"])
    try:
        spec = model_spec(config, n_features=n_features, classes=classes)
    except FedAsyncError as exc:
        raise FleetFileError(fleet_file.path, [f"model: {exc}"]) from exc

    def cast(xy: XY) -> XY:
        X, y = xy
        return (np.asarray(X, dtype=np.float32),
                np.asarray(y, dtype=np.int64 if classifier else np.float32))

    parts_ok = [cast(xy) for xy in parts if xy is not None]
    traces = [d.trace(_epoch_s_per_100(d, spec, xy, timer),
                      start_local_minutes=fleet_file.start_local_minutes)
              for d, xy in zip(devices, parts_ok, strict=True)]
    X_test, y_test = cast(test)
    return Fleet(traces, parts_ok, Dataset(X=X_test, y=y_test, name="test"), spec,
                 [None if t is None else cast(t) for t in local])


def _load(where: str, key: str, path: Path, label: str, problems: list[str]) -> XY | None:
    try:
        X, y = load_xy(path, label=label)
    except ConfigError as exc:
        problems.append(f"{where}: {key + ': ' if key else ''}{exc}")
        return None
    if len(y) == 0:
        problems.append(f"{where}: {key + ': ' if key else ''}{path} has no samples")
        return None
    return X, y


def _check_agreement(named: Sequence[tuple[str, str, XY | None]], model: str,
                     problems: list[str]) -> None:
    """Every file has the same feature count as the first, and labels the model can use."""
    widths = [(where, key, xy[0].shape[1]) for where, key, xy in named if xy is not None]
    if widths:
        first_where, first_key, n = widths[0]
        for where, key, width in widths[1:]:
            if width != n:
                problems.append(f"{where}: {key + ' ' if key else ''}has {width} feature(s), "
                                f"{first_where} {first_key} has {n}")
    for where, key, xy in named:
        if xy is None:
            continue
        y = np.asarray(xy[1])
        if y.dtype.kind not in "iufb":
            problems.append(f"{where}: {key + ' ' if key else ''}labels are not numeric")
        elif model != "linear" and not np.array_equal(y, np.round(y)):
            problems.append(f"{where}: {key + ' ' if key else ''}labels are not integers: a "
                            f"{model} model classifies (use --model linear for regression)")
        elif model == "linear" and key == "" and len(y) < 2:
            problems.append(f"{where}: R^2 needs at least 2 test samples")


def _epoch_s_per_100(d: DeviceEntry, spec: ModelSpec, xy: XY,
                     timer: Callable[[], float]) -> float:
    n = len(xy[1])
    if d.epoch_seconds is not None:
        seconds = d.epoch_seconds
    else:
        assert d.epoch_multiplier is not None  # DeviceEntry: exactly one is set
        seconds = d.epoch_multiplier * measure_epoch_s(spec, *xy, timer=timer)
    return seconds * 100.0 / n


def measure_epoch_s(spec: ModelSpec, X: Any, y: Any, *,
                    timer: Callable[[], float] = time.perf_counter) -> float:
    """Wall seconds of one local epoch over (X, y) with the real adapter, from the model's
    seeded initial weights: the best of a few runs after a warm-up (the first fit pays for
    scikit-learn's lazy set-up)."""
    from fedasync_iot.models import build_model

    adapter = build_model(spec)
    initial = adapter.get_params_vector()
    adapter.partial_fit(X, y, epochs=1)
    best = math.inf
    for _ in range(_MEASURE_REPEATS):
        adapter.set_params_vector(initial)
        t0 = timer()
        adapter.partial_fit(X, y, epochs=1)
        best = min(best, timer() - t0)
    return max(best, 1e-6)  # a clock too coarse to see it must not make compute free


# -- export ------------------------------------------------------------------------------------


def export_fleet(config: SimConfig, out: Path) -> Path:
    """Write `synthetic_fleet(config)` as a fleet file: ``out/fleet.toml``,
    ``out/data/<id>.npz`` (training data), ``out/data/test.npz`` (the coordinator's test set)
    and ``out/traces/<id>-<kind>.csv``. Returns the fleet file's path. Files of the same name
    are overwritten.

    Times are written with Python's shortest round-trip float text, so the traces load back
    exactly; a span running to the end of time is written with end ``inf``. Each device's test
    set (samples of the test set with its label mix, `fleet._fairness.local_test_sets`) goes to
    ``out/data/<id>-test.npz``.
    """
    if config.fleet_file is not None:
        raise ConfigError("export-fleet writes the synthetic fleet; it takes no fleet file",
                          key="fleet_file")
    fleet = synthetic_fleet(config)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    save_npz(out / "data" / "test.npz", fleet.test.X, fleet.test.y)
    start = fleet.traces[0].start_local_minutes
    lines = [
        f"# The synthetic fleet of `fedasync-sim export-fleet` ({len(fleet.traces)} devices, "
        f"seed {config.seed}), to edit.",
        "# Format: docs/fleet-files.md. Paths are relative to this file.",
        "",
        "[run]",
        'test_file = "data/test.npz"',
        f"start = {start // 60:02d}:{start % 60:02d}:00  # local time of day at sim time 0",
        f"seed = {config.seed}",
        f"scale = {config.scale!r}",
        f"duration_s = {config.duration_s!r}",
        f"target = {config.target_accuracy!r}",
        f"cohort_size = {config.cohort_size}",
        f"deadline_min = {config.round_deadline_sim_s / 60.0!r}",
        f"over_selection = {float(config.over_selection)!r}",
        f"fedasync_alpha = {config.fedasync_alpha!r}",
        f"fedbuff_k = {config.fedbuff_k}",
        "",
        "[model]",
        f"kind = {_toml_str(config.model)}",
        f"learning_rate = {config.learning_rate!r}",
        f"local_epochs = {config.local_epochs}",
        f"batch_size = {config.batch_size}",
        f"hidden = [{', '.join(str(h) for h in config.hidden)}]",
        f"l2 = {config.l2!r}",
        "",
        "[agent]                 # every device's agent; sim seconds",
        f"check_interval_s = {config.check_interval_sim_s!r}  # the poll",
        f"min_train_interval_s = {config.min_train_interval_sim_s!r}",
        "",
        "[policy]                # when a device may train (the agent's [policy] keys)",
        *_policy_lines(config.policy),
    ]
    for trace, (X, y), local in zip(fleet.traces, fleet.parts, fleet.local_tests, strict=True):
        lines += ["", *_export_device(out, trace, X, y, local)]
    path = out / "fleet.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _policy_lines(policy: PolicyConfig) -> list[str]:
    """Every key of `policy`, as ``[policy]`` lines that load back the same."""
    lines = []
    for name in policy.__dataclass_fields__:
        value = getattr(policy, name)
        if value is None:  # time_window: TOML has no null; leaving it out means the same
            lines.append(f"# {name} = [start, end]  # minutes since midnight; unset: any time")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return lines


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)  # shortest round-trip text; inf/nan are TOML's too
    return str(value)


def _export_device(out: Path, trace: DeviceTrace, X: Any, y: Any, local: XY | None
                   ) -> list[str]:
    name = trace.device_id
    save_npz(out / "data" / f"{name}.npz", X, y)
    lines = ["[[devices]]", f"id = {_toml_str(name)}", f'data = "data/{name}.npz"',
             f"epoch_seconds = {trace.epoch_s_per_100 * len(y) / 100.0!r}"]
    if local is not None:
        save_npz(out / "data" / f"{name}-test.npz", *local)
        lines.append(f'test = "data/{name}-test.npz"')
    kinds = [k for k in TRACE_KINDS if k != "charging" or trace.battery is not None]
    for kind in kinds:
        write_trace(out / "traces" / f"{name}-{kind}.csv", getattr(trace, kind))
        lines.append(f'{kind} = "traces/{name}-{kind}.csv"')
    if trace.battery is not None:
        b = trace.battery
        lines += [f"battery_initial_percent = {b.initial_percent!r}",
                  f"battery_drain_per_h = {b.drain_per_h!r}",
                  f"battery_charge_per_h = {b.charge_per_h!r}"]
    lines += [f"cellular = {'true' if trace.cellular else 'false'}"]
    lines += [f"{k} = {float(getattr(trace, k))!r}" for k in _HARDWARE_KEYS
              if k != "cellular" and getattr(trace, k) is not None]
    return lines


def write_trace(path: Path, intervals: Intervals) -> None:
    """A trace CSV `read_trace` reads back exactly (an open end is written ``inf``)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start", "end"])
        writer.writerows((repr(s), repr(e)) for s, e in intervals.spans)


def _toml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid TOML basic string
