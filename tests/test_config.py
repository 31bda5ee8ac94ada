"""Config files and environment overrides, including the shipped examples."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedasync_iot.agent._config import load_config as load_agent
from fedasync_iot.coordinator._config import load_config as load_coordinator
from fedasync_iot.models import ConfigError

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_shipped_examples_load() -> None:
    c = load_coordinator(EXAMPLES / "coordinator.toml", environ={})
    a = load_agent(EXAMPLES / "agent.toml", environ={})
    assert (c.rule.name, c.rule.buffer_size, c.model.hidden) == ("fedbuff", 5, (32,))
    assert (a.training.encoding, a.policy.denied_interfaces[0]) == ("int8", "wwan*")


def test_environment_overrides_file_and_flags_override_environment() -> None:
    env = {"FEDASYNC_FLEET": "lab", "FEDASYNC_RULE__BUFFER_SIZE": "3",
           "FEDASYNC_GUARDS__NORM_POLICY": "reject"}
    c = load_coordinator(EXAMPLES / "coordinator.toml", environ=env,
                         overrides={"fleet": "cli"})
    assert (c.fleet, c.rule.buffer_size, c.guards.norm_policy) == ("cli", 3, "reject")


@pytest.mark.parametrize(("env", "key"), [
    ({"FEDASYNC_RULE__BUFER_SIZE": "3"}, "bufer_size"),
    ({"FEDASYNC_GUARDS__MAX_NORM": "-1"}, "max_norm"),
    ({"FEDASYNC_POLICY__MAX_CPU_PERCENT": "500"}, "max_cpu_percent"),
])
def test_typos_and_bad_values_are_errors_naming_the_key(env, key) -> None:
    loader = load_agent if "POLICY" in next(iter(env)) else load_coordinator
    example = "agent.toml" if loader is load_agent else "coordinator.toml"
    with pytest.raises(ConfigError) as err:
        loader(EXAMPLES / example, environ=env)
    assert key in str(err.value) or err.value.key == key


def test_missing_file_and_bad_toml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent(tmp_path / "nope.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent(bad, environ={})
