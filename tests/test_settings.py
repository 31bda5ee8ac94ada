"""The settings loader (models/_config.py): every value checked against its field's type, the
environment converted by the field's type, each service reading only its own variables."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from fedasync_iot.agent._config import load_config as load_agent
from fedasync_iot.coordinator._config import load_config as load_coordinator
from fedasync_iot.models import ConfigError
from fedasync_iot.models._config import build, env_layer

EXAMPLES = Path(__file__).parents[1] / "examples"
COORDINATOR = (EXAMPLES / "coordinator.toml").read_text()


def coordinator_file(tmp_path: Path, top: str = "", *, drop: str = "", tables: str = "") -> Path:
    """The shipped coordinator example with `top` lines first (and its `drop` line removed)."""
    text = COORDINATOR
    if drop:
        text = "\n".join(line for line in text.splitlines() if not line.startswith(drop + " "))
    path = tmp_path / "coordinator.toml"
    path.write_text(f"{top}\n{text}\n{tables}\n")
    return path


# ---------------------------------------------------------------------------- the file


@pytest.mark.parametrize(("top", "drop", "expected"), [
    ("broker = 1883", "broker",
     'broker must be a string or an array of strings (e.g. "mqtt://127.0.0.1:1883"), got '
     'integer 1883'),
    ("fleet = 7", "fleet", 'fleet must be a string (e.g. "default"), got integer 7'),
    ('keep_checkpoints = "ten"', "keep_checkpoints",
     'keep_checkpoints must be an integer (e.g. 10), got string "ten"'),
    ("keep_checkpoints = true", "keep_checkpoints",
     "keep_checkpoints must be an integer (e.g. 10), got boolean true"),
    ('http = ["a"]', "http", 'http must be a string (e.g. "127.0.0.1:9464"), got array ["a"]'),
])
def test_a_wrong_type_in_the_file_names_the_file_key_type_and_value(
        tmp_path: Path, top: str, drop: str, expected: str) -> None:
    path = coordinator_file(tmp_path, top, drop=drop)

    with pytest.raises(ConfigError) as err:
        load_coordinator(path, environ={})

    assert str(err.value) == f"config file {path}: {expected}"
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("toml", "expected"), [
    ("[policy]\nallowed_interfaces = \"eth0\"",
     'policy.allowed_interfaces must be an array of strings (e.g. ["eth*", "en*", "wlan*", '
     '"wl*"]), got string "eth0"'),
    ("[policy]\ntime_window = [60, \"120\"]",
     'policy.time_window must be an array of 2 integers, got array [60, "120"]'),
    ("[policy]\nmax_cpu_percent = \"30\"",
     'policy.max_cpu_percent must be a number (e.g. 30.0), got string "30"'),
    ("retrain_on_new_model = \"yes\"",
     'retrain_on_new_model must be true or false, got string "yes"'),
    ("on_refused = \"hold\"", 'on_refused must be one of "keep", "drop", got string "hold"'),
    ("[training]\nencoding = 8",
     'training.encoding must be one of "float32", "float16", "int8", "topk", got integer 8'),
    ("policy = 3", "policy must be a table, got integer 3"),
    ("[policy]\nmax_cpu_prcent = 30", "unknown setting policy.max_cpu_prcent "
                                      "(did you mean max_cpu_percent?)"),
    ("log_level = \"LOUD\"",
     "log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'"),
])
def test_agent_file_errors(tmp_path: Path, toml: str, expected: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "pi-1"\n{toml}\n')

    with pytest.raises(ConfigError) as err:
        load_agent(path, environ={})

    assert str(err.value) == f"config file {path}: {expected}"


def test_right_types_are_normalised(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\nlog_level = "debug"\ncheck_interval_s = 3\n'
                    '[policy]\ntime_window = [1320, 360]\nmax_cpu_percent = 50\n')

    config = load_agent(path, environ={})

    assert config.log_level == "DEBUG"
    assert config.check_interval_s == 3.0 and isinstance(config.check_interval_s, float)
    assert config.policy.time_window == (1320, 360)
    assert isinstance(config.policy.max_cpu_percent, float)


def test_a_table_missing_a_required_key_names_it(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[model]\nkind = "mlp"\nclasses = [0, 1]\n')

    with pytest.raises(ConfigError, match=r"model\.n_features is required \(an integer\)"):
        load_coordinator(path, environ={})


def test_a_range_error_of_a_table_names_the_table(tmp_path: Path) -> None:
    path = coordinator_file(tmp_path, tables="")
    with pytest.raises(ConfigError, match=r"^\[guards\] max_norm must be finite"):
        load_coordinator(path, environ={"FEDASYNC_GUARDS__MAX_NORM": "-1"})


# ---------------------------------------------------------------------------- the environment


def test_environment_values_are_converted_by_the_field_type() -> None:
    env = {
        "FEDASYNC_DEVICE_ID": "123",  # a string field keeps the text: not the integer 123
        "FEDASYNC_FLEET": "true",
        "FEDASYNC_MIN_SAMPLES": "5",
        "FEDASYNC_CHECK_INTERVAL_S": "2",
        "FEDASYNC_RETRAIN_ON_NEW_MODEL": "no",
        "FEDASYNC_TRAIN_IN_SUBPROCESS": "0",
        "FEDASYNC_POLICY__ALLOWED_INTERFACES": "eth*, wl*",
        "FEDASYNC_POLICY__DENIED_INTERFACES": '["ppp*"]',
        "FEDASYNC_POLICY__TIME_WINDOW": "60,120",
        "FEDASYNC_APPROVAL_HOOK": "cmd:/bin/true --x 1",
        "FEDASYNC_LOG_LEVEL": "warning",
    }

    config = load_agent(None, environ=env)

    assert (config.device_id, config.fleet) == ("123", "true")
    assert (config.min_samples, config.check_interval_s) == (5, 2.0)
    assert (config.retrain_on_new_model, config.train_in_subprocess) == (False, False)
    assert config.policy.allowed_interfaces == ("eth*", "wl*")
    assert config.policy.denied_interfaces == ("ppp*",)
    assert config.policy.time_window == (60, 120)
    assert config.approval_hook == "cmd:/bin/true --x 1"
    assert config.log_level == "WARNING"


def test_an_empty_variable_unsets_an_optional_field(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "pi-1"\n[policy]\ntime_window = [60, 120]\n')

    assert load_agent(path, environ={"FEDASYNC_POLICY__TIME_WINDOW": ""}).policy.time_window is None


@pytest.mark.parametrize(("env", "expected"), [
    ({"FEDASYNC_SPOOL_MAX_COUNT": "ten"},
     "FEDASYNC_SPOOL_MAX_COUNT: spool_max_count must be an integer (e.g. 100), got 'ten'"),
    ({"FEDASYNC_CHECK_INTERVAL_S": "soon"},
     "FEDASYNC_CHECK_INTERVAL_S: check_interval_s must be a number (e.g. 15.0), got 'soon'"),
    ({"FEDASYNC_RETRAIN_ON_NEW_MODEL": "perhaps"},
     "FEDASYNC_RETRAIN_ON_NEW_MODEL: retrain_on_new_model must be true or false, got 'perhaps'"),
    ({"FEDASYNC_POLICY__TIME_WINDOW": "60,x"},
     "FEDASYNC_POLICY__TIME_WINDOW: policy.time_window must be an array of 2 integers, got "
     "'60,x'"),
    ({"FEDASYNC_ON_REFUSED": "hold"},
     "FEDASYNC_ON_REFUSED: on_refused must be one of \"keep\", \"drop\", got 'hold'"),
    ({"FEDASYNC_POLICY__MAX_CPU_PRCENT": "3"},
     "FEDASYNC_POLICY__MAX_CPU_PRCENT: unknown setting policy.max_cpu_prcent (did you mean "
     "max_cpu_percent?)"),
    ({"FEDASYNC_POLICY": "3"},
     "FEDASYNC_POLICY: policy is a table: set its keys one by one, e.g. "
     "FEDASYNC_POLICY__MIN_BATTERY_PERCENT"),
    ({"FEDASYNC_BROKER__HOST": "x"}, "FEDASYNC_BROKER__HOST: broker is not a table, so it has "
                                     "no host"),
    ({"FEDASYNC_LOG_LEVEL": "loud"},
     "FEDASYNC_LOG_LEVEL: log_level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got "
     "'loud'"),
])
def test_a_bad_environment_value_names_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_agent(None, environ={"FEDASYNC_DEVICE_ID": "pi-1", **env})
    assert str(err.value) == expected


def test_each_service_reads_only_its_own_variables(caplog: pytest.LogCaptureFixture) -> None:
    shared = {"FEDASYNC_BROKER": "mqtt://hub:1883", "FEDASYNC_DEVICE_ID": "pi-1",
              "FEDASYNC_POLICY__MIN_BATTERY_PERCENT": "60", "FEDASYNC_RULE__NAME": "fedasync",
              "FEDASYNC_MODEL__N_FEATURES": "64"}
    with caplog.at_level(logging.INFO, logger="fedasync.config"):
        coordinator = load_coordinator(EXAMPLES / "coordinator.toml", environ=shared)
        agent = load_agent(None, environ=shared)

    assert (coordinator.broker, coordinator.rule.name) == ("mqtt://hub:1883", "fedasync")
    assert (agent.broker, agent.policy.min_battery_percent) == ("mqtt://hub:1883", 60.0)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "ignoring FEDASYNC_DEVICE_ID, FEDASYNC_POLICY__MIN_BATTERY_PERCENT: not settings of the "
        "coordinator (another service's?)",
        "ignoring FEDASYNC_MODEL__N_FEATURES, FEDASYNC_RULE__NAME: not settings of the agent "
        "(another service's?)"]


def test_an_ignored_variable_that_looks_like_a_typo_is_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fedasync.config"):
        config = load_agent(None, environ={"FEDASYNC_DEVICE_ID": "pi-1", "FEDASYNC_FLET": "lab"})

    assert config.fleet == "default"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "ignoring FEDASYNC_FLET: not a setting of the agent (did you mean "
                    "FEDASYNC_FLEET?)")]


def test_the_layer_that_gave_a_bad_value_is_named(tmp_path: Path) -> None:
    good = coordinator_file(tmp_path)
    with pytest.raises(ConfigError, match=r"^command line: fleet must be a string"):
        load_coordinator(good, environ={}, overrides={"fleet": 3})
    with pytest.raises(ConfigError, match=r"^FEDASYNC_RULE__BUFFER_SIZE: rule\.buffer_size"):
        load_coordinator(good, environ={"FEDASYNC_RULE__BUFFER_SIZE": "3.5"})


# ---------------------------------------------------------------------------- any dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Inner:
    ratio: float = 0.5
    tags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Inner:
        ratio, _, tags = text.partition(":")
        return cls(ratio=float(ratio), tags=tuple(tags.split(",")) if tags else ())


@dataclass(frozen=True, slots=True, kw_only=True)
class Plain:
    count: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Everything:
    name: str
    nickname: str | None = None
    enabled: bool = False
    count: int = 3
    rate: float = 1.5
    hosts: tuple[str, ...] = ("a",)
    weights: tuple[float, ...] = (1.0,)
    window: tuple[int, int] | None = None
    mode: Literal["fast", "slow"] = "fast"
    inner: Inner = field(default_factory=Inner)
    plain: Plain = field(default_factory=Plain)


def test_build_takes_every_supported_type() -> None:
    built = build(Everything, {
        "name": "x", "nickname": "y", "enabled": True, "count": 4, "rate": 2,
        "hosts": ["h1", "h2"], "weights": [1, 0.5], "window": [1, 2], "mode": "slow",
        "inner": "0.25:a,b", "plain": {"count": 7}})

    assert built == Everything(name="x", nickname="y", enabled=True, count=4, rate=2.0,
                               hosts=("h1", "h2"), weights=(1.0, 0.5), window=(1, 2), mode="slow",
                               inner=Inner(ratio=0.25, tags=("a", "b")), plain=Plain(count=7))
    assert isinstance(built.weights[0], float)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("name", 1, "name must be a string, got integer 1"),
    ("nickname", False, "nickname must be a string, got boolean false"),
    ("enabled", 1, "enabled must be true or false, got integer 1"),
    ("count", True, "count must be an integer (e.g. 3), got boolean true"),
    ("count", 2.5, "count must be an integer (e.g. 3), got float 2.5"),
    ("rate", "fast", 'rate must be a number (e.g. 1.5), got string "fast"'),
    ("hosts", ["a", 2], 'hosts must be an array of strings (e.g. ["a"]), got array ["a", 2]'),
    ("weights", ["1"], 'weights must be an array of numbers (e.g. [1.0]), got array ["1"]'),
    ("window", [1, 2, 3], "window must be an array of 2 integers, got array [1, 2, 3]"),
    ("mode", "FAST", 'mode must be one of "fast", "slow", got string "FAST"'),
    ("inner", 3, "inner must be a table or its text form, got integer 3"),
    ("plain", "7", 'plain must be a table, got string "7"'),
    ("plain", {"count": "7"}, 'plain.count must be an integer (e.g. 1), got string "7"'),
    ("plain", {"cnt": 7}, "unknown setting plain.cnt (did you mean count?)"),
])
def test_build_names_key_type_and_value(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(Everything, {"name": "x", key: value})
    assert str(err.value) == f"config: {expected}"
    assert err.value.key == (key if "plain." not in expected else f"plain.{next(iter(value))}")


def test_text_form_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^config: inner: could not convert"):
        build(Everything, {"name": "x", "inner": "lots"})


def test_environment_layer_for_any_dataclass() -> None:
    env = {"FEDASYNC_NAME": "007", "FEDASYNC_NICKNAME": "", "FEDASYNC_ENABLED": "Yes",
           "FEDASYNC_COUNT": "12", "FEDASYNC_RATE": "1e-3", "FEDASYNC_HOSTS": "",
           "FEDASYNC_WEIGHTS": "0.5, 2", "FEDASYNC_MODE": "slow", "FEDASYNC_INNER": "0.1:z",
           "FEDASYNC_PLAIN__COUNT": "9", "FEDASYNC_OTHER": "x", "PATH": "/bin"}

    values, ignored = env_layer(Everything, env)

    assert values == {"name": "007", "nickname": "", "enabled": True, "count": 12, "rate": 1e-3,
                      "hosts": (), "weights": (0.5, 2.0), "mode": "slow", "inner": "0.1:z",
                      "plain": {"count": 9}}
    assert ignored == ["FEDASYNC_OTHER"]
    assert build(Everything, values).inner == Inner(ratio=0.1, tags=("z",))


def test_a_variable_and_its_table_keys_conflict() -> None:
    with pytest.raises(ConfigError, match="conflicts"):
        env_layer(Everything, {"FEDASYNC_INNER": "0.1", "FEDASYNC_INNER__RATIO": "0.2"})

