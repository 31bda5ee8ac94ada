"""Several broker URLs (issue 17 item 2): parsed from a TOML array, FEDASYNC_BROKER or --broker
as comma-separated text; a `Connection` moves round robin to the next on a failure or a lost
connection, with a backoff that doubles once per round. One URL works as before.
The cluster itself is in tests/test_nats_cluster.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedasync_iot.agent._config import load_config as load_agent_config
from fedasync_iot.coordinator._config import load_config as load_coordinator_config
from fedasync_iot.fleet._broker import MosquittoBroker, free_port
from fedasync_iot.models import ConfigError
from fedasync_iot.models._mqtt import BrokerAddress, Connection, broker_urls, create_client
from tests.helpers import wait_for
from tests.test_connection_state import agent_on


def test_one_url_parses_as_before() -> None:
    address = BrokerAddress.parse("mqtt://u:p@hub:1884")
    assert (address.host, address.port, address.username, address.alternates) == (
        "hub", 1884, "u", ())
    assert address.candidates() == (address,)


@pytest.mark.parametrize("setting", [
    "mqtt://a:1,mqtt://b:2,mqtt://c",
    "mqtt://a:1, mqtt://b:2 , mqtt://c",
    ["mqtt://a:1", "mqtt://b:2", "mqtt://c"],
    ("mqtt://a:1", "mqtt://b:2", "mqtt://c"),
])
def test_several_urls_in_order(setting: str | list[str]) -> None:
    address = BrokerAddress.parse(setting, ca_file="ca.pem")
    assert [(a.host, a.port) for a in address.candidates()] == [("a", 1), ("b", 2), ("c", 1883)]
    assert all(a.ca_file == "ca.pem" and not a.alternates for a in address.candidates())
    assert address.redacted() == "mqtt://a:1"


def test_a_comma_inside_a_password_is_not_a_separator() -> None:
    assert broker_urls("mqtts://u:p,w@a,mqtts://b") == ("mqtts://u:p,w@a", "mqtts://b")
    first, second = BrokerAddress.parse("mqtts://u:p,w@a,mqtts://v:q@b").candidates()
    assert (first.password, second.username, second.password) == ("p,w", "v", "q")


@pytest.mark.parametrize(("setting", "message"), [
    (["mqtt://a", "mqtts://b"], "mix mqtt:// and mqtts://"),
    ("mqtt://a:1,mqtt://a:1", "listed twice"),
    ([], "no broker URL"),
    ("mqtt://a,http://b", "must start with mqtt://"),
    ("mqtt://127.0.0.1:", "empty port in broker URL 'mqtt://127.0.0.1:'.*default 1883"),
    ("mqtts://u:p@hub:", "empty port .*default 8883"),
])
def test_bad_lists_are_refused(setting: str | list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BrokerAddress.parse(setting)


def test_the_settings_take_a_list_from_toml_env_or_flag(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('device_id = "pi-1"\nbroker = ["mqtt://a:1883", "mqtt://b:1883"]\n')
    assert load_agent_config(toml, environ={}).broker == ("mqtt://a:1883", "mqtt://b:1883")
    env = {"FEDASYNC_DEVICE_ID": "pi-1", "FEDASYNC_BROKER": "mqtt://a:1883,mqtt://b:1883"}
    assert BrokerAddress.parse(load_agent_config(environ=env).broker).alternates[0].host == "b"
    flags = load_coordinator_config(environ={}, overrides={
        "model": {"kind": "linear", "n_features": 2}, "broker": "mqtt://a,mqtt://c"})
    assert [a.host for a in BrokerAddress.parse(flags.broker).candidates()] == ["a", "c"]
    toml.write_text('device_id = "pi-1"\nbroker = []\n')
    with pytest.raises(ConfigError, match="names no URL"):
        load_agent_config(toml, environ={})


def _connection(setting: str, *, logger: logging.Logger) -> Connection:
    address = BrokerAddress.parse(setting)
    return Connection(create_client(address, client_id="t", persistent=False), address,
                      logger=logger, keepalive=30, min_delay_s=1.0, max_delay_s=30.0)


def test_round_robin_with_the_backoff_doubling_per_round(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    caplog.set_level(logging.WARNING, logger="t")
    link = _connection("mqtt://a,mqtt://b,mqtt://c", logger=logging.getLogger("t"))
    seen, delays = [link.address.host], []
    for _ in range(7):
        link.failed("refused")
        seen.append(link.address.host)
        target, delay = link.next_attempt
        delays.append(delay)
        assert target == link.address
    assert seen == ["a", "b", "c", "a", "b", "c", "a", "b"]
    assert delays == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0]
    assert link.info()["broker"] == "mqtt://b:1883"
    assert "cannot connect to mqtt://a:1883: refused; failing over: next attempt on " \
           "mqtt://b:1883 in 1.0 s" in caplog.records[0].getMessage()


def test_one_url_keeps_its_backoff_and_its_words(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="t")
    link = _connection("mqtt://a", logger=logging.getLogger("t"))
    delays = []
    for _ in range(4):
        link.failed("refused")
        delays.append(link.next_attempt[1])
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert link.address.host == "a" and link.next_attempt[0].host == "a"
    assert caplog.records[0].getMessage() == ("cannot connect to mqtt://a:1883: refused; next "
                                              "attempt in 1.0 s (1 failed so far)")


@pytest.mark.broker
def test_an_agent_skips_a_dead_url_and_connects_to_the_next(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedasync")
    dead = f"mqtt://127.0.0.1:{free_port()}"  # bound and closed: nothing listens there
    _, link = agent_on(f"{dead},{broker.url}", fleet_name, tmp_path)
    link.start()
    try:
        assert wait_for(lambda: link.connected, timeout=30)
        assert link.connection_info()["broker"] == broker.url
        messages = [r.getMessage() for r in caplog.records]
        assert any("connection refused" in m and f"failing over: next attempt on {broker.url}"
                   in m for m in messages), messages
    finally:
        link.stop()


def test_the_coordinator_logs_each_urls_own_failure(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Its check for another coordinator runs before each attempt, on the URL that attempt
    uses: a failure is logged against that URL with that URL's reason (it probed every URL
    once, and a dead node's attempt was blamed on the last URL's unresolvable name)."""
    from fedasync_iot.coordinator._config import CoordinatorConfig
    from fedasync_iot.coordinator._service import CoordinatorService
    from fedasync_iot.models import ModelSpec

    caplog.set_level(logging.INFO, logger="fedasync")
    dead = f"mqtt://127.0.0.1:{free_port()}"  # bound and closed: nothing listens there
    nowhere = "mqtt://nohost.invalid:1883"
    service = CoordinatorService(CoordinatorConfig(
        model=ModelSpec(kind="linear", n_features=3), broker=(dead, nowhere),
        fleet="failover-names", state_dir=str(tmp_path / "state"), http=""))

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.getMessage().startswith("cannot connect to")]

    service.start()
    try:
        assert wait_for(lambda: len(failures()) >= 3, timeout=60), failures()
        for m in failures():
            if m.startswith(f"cannot connect to {dead}"):
                assert "connection refused" in m, m
            else:
                assert m.startswith(f"cannot connect to {nowhere}: the name 'nohost.invalid' "
                                    "does not resolve"), m
    finally:
        service.stop()
