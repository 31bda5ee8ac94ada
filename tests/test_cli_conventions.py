"""What the three commands share (--version, --log-level, one-line errors, exit status 2) and
the agent's data source check, through the real CLIs: `main(argv)` in process, or a subprocess
where "no traceback" and the exit status of the process are the point."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent import cli as agent_cli
from fedasync_iot.agent._data import check_source, open_source
from fedasync_iot.coordinator import cli as coordinator_cli
from fedasync_iot.fleet import cli as fleet_cli
from fedasync_iot.models import ConfigError, Topics
from tests.helpers import Listener

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
MODULES = {"fedasync-agent": "fedasync_iot.agent.cli",
           "fedasync-coordinator": "fedasync_iot.coordinator.cli",
           "fedasync-sim": "fedasync_iot.fleet.cli"}
NOWHERE = "mqtt://127.0.0.1:9"  # the discard port: nothing here may connect anywhere


def cli(prog: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDASYNC_")}
    full_env.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", MODULES[prog], *args], check=False, env=full_env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture
def quiet_logging(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The CLIs' logging set-up would replace pytest's handlers: record the level instead."""
    levels: list[str] = []
    for module in (agent_cli, coordinator_cli, fleet_cli):
        monkeypatch.setattr(module, "setup_logging",
                            lambda level="INFO", fmt="text": levels.append(level))
    return levels


def one_line_error(text: str) -> str:
    assert "Traceback" not in text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    return lines[0]


# ---------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("prog", sorted(MODULES))
def test_version_on_all_three_commands(prog: str) -> None:
    done = cli(prog, "--version")

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{prog} {metadata.version('fedasync-iot')}\n"


def test_sim_help_lists_its_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        fleet_cli.main(["--help"])

    out = capsys.readouterr().out
    assert done.value.code == 0
    for command in ("run", "bench", "tune", "export-fleet"):
        assert f"\n    {command}" in out, out
    assert "--fleet-file" not in out  # the top-level help, not run's


@pytest.mark.parametrize(("main", "argv"), [
    (agent_cli.main, ["--log-level", "LOUD", "status"]),
    (coordinator_cli.main, ["versions", "--log-level", "LOUD"]),
    (fleet_cli.main, ["--log-level", "LOUD"]),
    (fleet_cli.main, ["bench", "--log-level", "LOUD"]),
])
def test_a_bad_log_level_is_a_one_line_error(main: Callable[[list[str]], int], argv: list[str],
                                             capsys: pytest.CaptureFixture[str],
                                             quiet_logging: list[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)

    assert done.value.code == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: --log-level: must be one of DEBUG, INFO, WARNING, ERROR, "
                           "CRITICAL, got 'LOUD' (see fedasync-")
    assert quiet_logging == []  # nothing ran


def test_log_level_is_case_insensitive(tmp_path: Path, quiet_logging: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_cli.main(["--log-level", "debug", "--state-dir", str(tmp_path), "status"]) == 0
    assert quiet_logging == ["DEBUG"]


def test_bad_seeds_are_a_one_line_error(capsys: pytest.CaptureFixture[str],
                                        quiet_logging: list[str]) -> None:
    with pytest.raises(SystemExit) as done:
        fleet_cli.main(["bench", "--seeds", "1,x"])

    assert done.value.code == 2
    assert one_line_error(capsys.readouterr().err) == (
        "error: --seeds: expected integers like 1,2,3, got '1,x' (see fedasync-sim bench --help)")


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("line", "drop", "expected"), [
    ("broker = 1883", "broker",
     'broker must be a string or an array of strings (e.g. "mqtt://127.0.0.1:1883"), got '
     'integer 1883'),
    ("fleet = 7", "fleet", 'fleet must be a string (e.g. "default"), got integer 7'),
    ('keep_checkpoints = "ten"', "keep_checkpoints",
     'keep_checkpoints must be an integer (e.g. 10), got string "ten"'),
])
def test_a_wrong_setting_stops_the_coordinator_with_one_line(tmp_path: Path, line: str,
                                                             drop: str, expected: str) -> None:
    text = "\n".join(x for x in (EXAMPLES / "coordinator.toml").read_text().splitlines()
                     if not x.startswith(drop + " "))
    config = tmp_path / "c.toml"
    config.write_text(f"{line}\n{text}\n")

    done = cli("fedasync-coordinator", "versions", "--config", str(config),
               "--state-dir", str(tmp_path / "state"))

    assert done.returncode == 2
    assert one_line_error(done.stderr) == f"error: config file {config}: {expected}"


def test_a_wrong_setting_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text('device_id = "pi-1"\nbroker = "mqtt://127.0.0.1:9"\n'
                      'spool_max_count = "many"\n')

    done = cli("fedasync-agent", "--config", str(config), "run")

    assert done.returncode == 2
    assert one_line_error(done.stderr) == (
        f"error: config file {config}: spool_max_count must be an integer (e.g. 100), got "
        f'string "many"')


@pytest.mark.parametrize(("prog", "argv"), [
    ("fedasync-agent", ["--config", "{config}", "run"]),
    ("fedasync-coordinator", ["run", "--config", "{config}"]),
    ("fedasync-coordinator", ["versions", "--config", "{config}"]),
    ("fedasync-sim", ["run", "--fleet-file", "{config}"]),
])
def test_a_config_file_that_is_not_utf8_is_one_line_naming_file_and_offset(
        tmp_path: Path, prog: str, argv: list[str]) -> None:
    # A file saved by a Latin-1 editor: one byte (0xe9, "é") in a comment on line 2.
    config = tmp_path / "settings.toml"
    config.write_bytes(f'broker = "{NOWHERE}"\n'.encode() + b"# caf\xe9\n")
    offset = len(f'broker = "{NOWHERE}"\n') + len("# caf")

    done = cli(prog, *(a.format(config=config) for a in argv))

    assert done.returncode == 2
    assert one_line_error(done.stderr) == (
        f"error: config file {config} is not UTF-8: byte 0xe9 at offset {offset} (line 2, "
        "column 6); TOML files must be UTF-8 (re-save it as UTF-8, e.g. iconv -f latin1 -t "
        "utf-8)")


def test_a_numeric_device_id_from_the_environment_is_a_string(
        broker, fleet_name: str, tmp_path: Path) -> None:
    data = write(tmp_path / "data" / "a.csv", "x1,label\n0.5,1\n").parent
    env = {"FEDASYNC_DEVICE_ID": "123", "FEDASYNC_BROKER": broker.url,
           "FEDASYNC_FLEET": fleet_name, "FEDASYNC_STATE_DIR": str(tmp_path / "state"),
           "FEDASYNC_DATA": str(data), "FEDASYNC_CHECK_INTERVAL_S": "0.2"}
    listener = Listener(broker.url, [Topics(fleet_name).status("123")])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDASYNC_")}
    proc = subprocess.Popen([sys.executable, "-m", "fedasync_iot.agent.cli", "run"], cwd=ROOT,
                            env={**full_env, "PYTHONPATH": str(ROOT), **env},
                            stderr=subprocess.PIPE, text=True)
    try:
        status = json.loads(listener.get(timeout=60).payload)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        listener.close()

    assert status["device_id"] == "123" and status["state"] == "online", err
    assert "Traceback" not in err


def test_the_coordinator_runs_beside_the_agents_variables(broker, fleet_name: str,
                                                         tmp_path: Path) -> None:
    # A host or a systemd EnvironmentFile shared with an agent: that used to stop the service
    # ("unknown setting(s) in config: device_id").
    config = write(tmp_path / "c.toml", f'broker = "{broker.url}"\nfleet = "{fleet_name}"\n'
                   f'state_dir = "{tmp_path / "state"}"\nhttp = ""\n'
                   '[model]\nkind = "logistic"\nn_features = 4\nclasses = [0, 1]\n'
                   '[snapshots]\ninclude_onnx = false\n')
    listener = Listener(broker.url, [Topics(fleet_name).model])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDASYNC_")}
    proc = subprocess.Popen([sys.executable, "-m", "fedasync_iot.coordinator.cli",
                             "run", "--config",
                             str(config)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**full_env, "PYTHONPATH": str(ROOT), "FEDASYNC_DEVICE_ID": "pi-1",
                                 "FEDASYNC_POLICY__MIN_BATTERY_PERCENT": "60"})
    try:
        listener.get(timeout=60)  # its first model snapshot: it is running
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        listener.close()

    assert ("ignoring FEDASYNC_DEVICE_ID, FEDASYNC_POLICY__MIN_BATTERY_PERCENT: not settings of "
            "the coordinator (another service's?)") in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- the agent's data


def agent_toml(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "pi-1"\nbroker = "{NOWHERE}"\ndata = "{data}"\n'
                    f'state_dir = "{tmp_path / "state"}"\n')
    return path


def test_check_with_a_missing_data_directory_is_not_eligible(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet_logging: list[str]) -> None:
    missing = tmp_path / "nope"

    code = agent_cli.main(["--config", str(agent_toml(tmp_path, str(missing))), "check",
                           "--json"])

    decision = json.loads(capsys.readouterr().out)
    data = next(c for c in decision["checks"] if c["name"] == "data")
    assert code == 1 and decision["eligible"] is False
    assert (data["passed"], data["reading"]) == (False, "missing")
    assert f"data directory {missing} does not exist" in decision["reason"]


def test_check_shows_usable_data(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 quiet_logging: list[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("x1,x2,label\n0.5,1.5,1\n")
    np.savez(data / "b.npz", X=np.zeros((2, 2)), y=np.zeros(2))

    agent_cli.main(["--config", str(agent_toml(tmp_path, str(data))), "check"])

    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("data "))
    assert f"2 data files in {data}" in row and row.endswith("PASS")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def npz_without_y(d: Path) -> Path:
    np.savez(d / "b.npz", X=np.zeros((2, 2)))
    return d / "b.npz"


# Each `make` returns the data setting; the problem names {d}, the test's directory.
@pytest.mark.parametrize(("make", "problem"), [
    (lambda d: d / "missing.csv", "data file {d}/missing.csv does not exist"),
    (lambda d: write(d / "x.txt", "a"), "data file {d}/x.txt is not .csv or .npz"),
    (lambda d: write(d / "data" / "a.csv", "x1,y\n1,2\n").parent,
     "data file {d}/data/a.csv has no label column 'label' (header: x1, y)"),
    (lambda d: write(d / "data" / "a.csv", "").parent, "data file {d}/data/a.csv is empty"),
    (lambda d: write(d / "data" / "a.npz", "not a zip").parent,
     "data file {d}/data/a.npz is not an NPZ (zip) file"),
    (npz_without_y, "data file {d}/b.npz has no arrays X and y"),
    (lambda d: "tests.no_such_module:load", "cannot load hook 'tests.no_such_module:load'"),
])
def test_an_unusable_data_source_is_found_without_loading_it(
        tmp_path: Path, make: Callable[[Path], object], problem: str) -> None:
    spec = str(make(tmp_path))

    status = check_source(spec)

    assert status.fatal and status.problem is not None
    assert problem.format(d=tmp_path) in status.problem
    assert not status.to_check()[0].passed
    with pytest.raises(ConfigError) as err:
        open_source(spec)
    assert (str(err.value), err.value.key) == (status.problem, "data")


def test_run_with_a_missing_data_directory_exits_2(tmp_path: Path) -> None:
    done = cli("fedasync-agent", "--config", str(agent_toml(tmp_path, str(tmp_path / "nope"))),
               "run", timeout=60)

    assert done.returncode == 2
    assert one_line_error(done.stderr).startswith(
        f"error: data directory {tmp_path / 'nope'} does not exist: create it or set data")


@pytest.mark.parametrize(("prog", "argv"), [
    ("fedasync-agent", ["--config", "{config}", "--state-dir", "{state}", "run"]),
    ("fedasync-coordinator", ["run", "--config", "{config}", "--state-dir", "{state}",
                              "--model", "logistic", "--http", ""]),
])
def test_a_state_directory_that_is_a_file_is_one_line(tmp_path: Path, prog: str,
                                                      argv: list[str]) -> None:
    # An operator's slip: --state-dir names a file (a backup archive, a config).
    state = write(tmp_path / "state.tar", "not a directory\n")
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "local.npz", X=np.zeros((20, 4)), y=np.arange(20) % 2)
    config = (agent_toml(tmp_path, str(data)) if prog == "fedasync-agent"
              else write(tmp_path / "coordinator.toml", f'broker = "{NOWHERE}"\n'))

    done = cli(prog, *(a.format(config=config, state=state) for a in argv), timeout=60)

    assert done.returncode == 2
    line = one_line_error(done.stderr)
    assert str(state) in line and "not a directory" in line.lower(), line
    assert state.read_text() == "not a directory\n"


def test_an_empty_data_directory_waits_with_a_warning(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    # The installer creates the directory empty and starts the agent; the data comes later.
    (tmp_path / "data").mkdir()
    with caplog.at_level(logging.WARNING, logger="fedasync.agent"):
        source = open_source(str(tmp_path / "data"))

    X, _ = source.load()
    assert len(X) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"no .csv or .npz files in data directory {tmp_path / 'data'} yet: nothing to train on "
        f"until some arrive"]
    status = check_source(str(tmp_path / "data"))
    assert (status.fatal, status.to_check()[0].passed) == (False, False)
