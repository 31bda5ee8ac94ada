"""Honest connection state (issue 13 item 4, part of 7): agent and coordinator say at once, and
at every retry, that they cannot reach the broker and why; "published" means the broker has it;
/status and the agent's status carry the connection; a clean stop is not a WARNING.

Real parts throughout: a port where nothing listens (bound, then closed), a name under the
reserved `.invalid` domain, a private Mosquitto started later on that very port.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent import _runner as runner_module
from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import CallableSource
from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.agent._readings import Readings, StaticReader
from fedasync_iot.agent._runner import AgentRunner, PahoLink
from fedasync_iot.agent.cli import main as agent_main
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.fleet._broker import MosquittoBroker, free_port
from fedasync_iot.models import Backoff, ModelSpec, Topics, decode_snapshot
from fedasync_iot.models._files import save_npz
from fedasync_iot.models._mqtt import BrokerAddress, PacketAck, create_client
from tests.helpers import Listener, wait_for

SPEC = ModelSpec(kind="logistic", n_features=4, classes=(0, 1, 2))
NOTHING = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)


def readings() -> Readings:
    return Readings(battery_percent=None, charging=None, interfaces_up=("eth0",),
                    cpu_percent=1.0, mem_available_mb=1000.0, temperature_c=None,
                    local_minutes=600, taken_at=time.time())


def agent_on(url: str, fleet: str, state: Path, device: str = "pi-1") -> tuple[Agent, PahoLink]:
    config = AgentConfig(device_id=device, broker=url, fleet=fleet, state_dir=str(state),
                         policy=PolicyConfig(min_dwell_s=0.0))
    link = PahoLink(config)
    agent = Agent(config, link=link, reader=StaticReader(readings()),
                  data=CallableSource(lambda: NOTHING))
    link.agent = agent
    return agent, link


def coordinator_config(url: str, fleet: str, state: Path, **changes: object
                       ) -> CoordinatorConfig:
    return CoordinatorConfig(model=SPEC, broker=url, fleet=fleet, state_dir=str(state),
                             snapshots=SnapshotConfig(min_interval_s=0.0, include_onnx=False),
                             **{"http": "", **changes})  # type: ignore[arg-type]


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


@pytest.mark.broker
def test_a_refused_ack_subscription_is_asked_again_until_granted(
        private_broker: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NATS refuses subscriptions it cannot back with a JetStream consumer in time
    (docs/scaling.md); Mosquitto never does, so the first SUBACK is turned into a refusal."""
    caplog.set_level(logging.INFO, logger="fedasync")
    monkeypatch.setattr(runner_module, "ACK_SUBSCRIBE_BACKOFF", Backoff(0.2, 0.2))
    agent, link = agent_on(private_broker.url, "refused", tmp_path)
    got: list[str] = []
    agent.on_message = lambda topic, payload: got.append(topic)  # type: ignore[method-assign]
    genuine = link.client.on_acked
    assert genuine is not None
    refused_once: list[PacketAck] = []

    def refuse_first(ack: PacketAck) -> None:
        if ack.kind == "subscribe" and not refused_once:
            refused_once.append(ack)
            ack = PacketAck("subscribe", ack.mid, ("Unspecified error",))
        genuine(ack)

    link.client.on_acked = refuse_first
    link.start()
    try:
        assert wait_for(lambda: warnings_with(caplog, "refused the subscription to acks"), 30)
        assert link.connection_info()["ack_subscription_refusals"] == 1
        assert wait_for(lambda: any("granted the subscription to acks after 1 refusal" in
                                    r.getMessage() for r in caplog.records), 30)
        assert "ack_subscription_refusals" not in link.connection_info()
        # Granted for real: an ack published now reaches the agent.
        topic = Topics("refused").ack("pi-1")
        client = create_client(BrokerAddress.parse(private_broker.url), client_id="acker",
                               persistent=False)
        client.connect("127.0.0.1", private_broker.port)
        client.loop_start()
        try:
            assert wait_for(client.is_connected, 10)
            client.send(topic, b"x", qos=1).wait_for_publish(timeout=10)
            assert wait_for(lambda: topic in got, 10)
        finally:
            client.disconnect()
            client.loop_stop()
    finally:
        link.stop()
    assert len(warnings_with(caplog, "refused the subscription to acks")) == 1


def test_agent_says_at_once_and_at_each_retry_that_nothing_listens(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG, logger="fedasync")
    port = free_port()  # bound and closed: nothing listens there
    agent, link = agent_on(f"mqtt://127.0.0.1:{port}", "f", tmp_path)
    started = time.monotonic()
    link.start()
    try:
        assert wait_for(lambda: len(warnings_with(caplog, "connection refused")) >= 1, 10)
        first = time.monotonic() - started
        # The next attempt comes after a jittered 0.5-1 s, then 1-2 s: two more within 10 s.
        assert wait_for(lambda: len(warnings_with(caplog, "connection refused")) >= 3, 10)
        status = agent.status()
    finally:
        link.stop()
    assert first < 5, f"the first failure was logged after {first:.1f} s"
    refused = warnings_with(caplog, "connection refused")
    assert f"cannot connect to mqtt://127.0.0.1:{port}" in refused[0].getMessage()
    assert "nothing listens on" in refused[0].getMessage()
    assert "next attempt in" in refused[0].getMessage()
    delays = [float(r.getMessage().split("next attempt in ")[1].split(" s")[0])
              for r in refused[:3]]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    connection = status["connection"]
    assert connection["state"] == "connecting"
    assert connection["attempts"] >= 3
    assert "connection refused" in connection["last_error"]
    assert connection["broker"] == f"mqtt://127.0.0.1:{port}"
    # `fedasync-agent status` shows the latest state, written by the running agent.
    assert agent_main(["--state-dir", str(tmp_path), "status"]) == 0
    shown = json.loads(capsys.readouterr().out)["connection"]
    assert shown["state"] == "stopped" and "connection refused" in shown["last_error"]
    assert shown["attempts"] >= 3


def test_a_name_that_does_not_resolve_is_named(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedasync")
    service = CoordinatorService(coordinator_config("mqtt://nohost.invalid:1883", "f", tmp_path))
    service.start()
    try:
        assert wait_for(lambda: warnings_with(caplog, "does not resolve"), 15)
        message = warnings_with(caplog, "does not resolve")[0].getMessage()
        assert "cannot connect to mqtt://nohost.invalid:1883: the name 'nohost.invalid' does " \
               "not resolve" in message
        assert service.status()["connection"]["state"] == "connecting"
    finally:
        service.stop()


@pytest.mark.broker
def test_coordinator_publishes_only_once_a_broker_has_the_snapshot(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedasync")
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    # The broker's port stays free until the broker starts: an HTTP server on port 0 could be
    # given it (it was, once) and take the connection attempts meant to be refused.
    http_port = next(p for p in iter(free_port, None) if p != port)
    service = CoordinatorService(coordinator_config(url, "late", tmp_path / "coord",
                                                    http=f"127.0.0.1:{http_port}"))
    broker = MosquittoBroker(workdir=tmp_path / "mosquitto", port=port)
    service.start()
    try:
        assert wait_for(lambda: len(warnings_with(caplog, "connection refused")) >= 2, 15)
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/status",
                                    timeout=10) as resp:
            down = json.loads(resp.read())
        assert wait_for(lambda: any("snapshot of version 0 waits for the broker" in
                                    r.getMessage() for r in caplog.records), 10)
        assert not [r for r in caplog.records if "published snapshot" in r.getMessage()]

        broker.start()
        assert wait_for(lambda: any("published snapshot of version 0" in r.getMessage()
                                    for r in caplog.records), 30)
        up = service.status()
        # The broker does have it: a newcomer gets the retained snapshot.
        late = Listener(url, [Topics("late").model])
        assert decode_snapshot(late.get().payload).version == 0
        late.close()
    finally:
        service.stop()
        broker.close()
    assert down["state"] == "connecting" and down["published_version"] == -1
    assert down["connection"]["state"] == "connecting"
    assert down["connection"]["attempts"] >= 2
    assert "connection refused" in down["connection"]["last_error"]
    assert up["connection"]["state"] == "online" and up["connection"]["attempts"] == 0
    assert up["published_version"] == 0
    connected = [r.getMessage() for r in caplog.records if "connected to" in r.getMessage()]
    assert len(connected) == 1 and "after" in connected[0] and "failed attempt" in connected[0]


@pytest.mark.broker
def test_a_lost_broker_is_reported_and_the_reconnect_counted(
        private_broker: MosquittoBroker, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedasync")
    agent, link = agent_on(private_broker.url, "lost", tmp_path)
    link.start()
    try:
        assert link.wait_connected(30)
        private_broker.stop()
        assert wait_for(lambda: warnings_with(caplog, "lost the connection to"), 30)
        assert wait_for(lambda: agent.status()["connection"]["state"] == "disconnected", 10)
        private_broker.start()
        assert wait_for(lambda: link.connected, 60)
        assert wait_for(lambda: any("reconnected to" in r.getMessage()
                                    for r in caplog.records), 10)
        assert agent.status()["connection"]["state"] == "online"
    finally:
        link.stop()
    assert "reconnecting in" in warnings_with(caplog, "lost the connection to")[0].getMessage()


@pytest.mark.broker
def test_a_clean_stop_logs_no_warning(broker: MosquittoBroker, fleet_name: str, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fedasync")
    service = CoordinatorService(coordinator_config(broker.url, fleet_name, tmp_path / "c"))
    service.start()
    save_npz(tmp_path / "data.npz", *NOTHING)  # below min_samples: it never trains
    config = AgentConfig(device_id=f"{fleet_name[:40]}-pi", broker=broker.url, fleet=fleet_name,
                         state_dir=str(tmp_path / "a"), policy=PolicyConfig(min_dwell_s=0.0),
                         data=str(tmp_path / "data.npz"), check_interval_s=0.1)
    runner = AgentRunner(config, reader=StaticReader(readings()))
    thread = threading.Thread(target=runner.run)
    try:
        assert service.wait_connected(30)
        thread.start()
        assert wait_for(lambda: runner.link.connected and runner.agent.snapshot is not None, 30)
        caplog.clear()
    finally:
        runner.stop()  # what SIGTERM does (agent/cli.py)
        thread.join(30)
        service.stop()
    assert not thread.is_alive()
    loud = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    assert runner.link.connection_info()["state"] == "stopped"


@pytest.mark.broker
def test_a_client_disconnected_on_purpose_connects_again(broker: MosquittoBroker) -> None:
    """A disconnect stops the client's retries, not the client: the simulator takes its devices
    offline and back with the same client (fleet/_netloop.py)."""
    address = BrokerAddress.parse(broker.url)
    client = create_client(address, client_id=f"again-{time.monotonic_ns()}", persistent=False)
    connects: list[int] = []
    client.on_connack = lambda connack: connects.append(1)
    for n in (1, 2):
        client.connect(address.host, address.port)
        client.loop_start()
        assert wait_for(lambda: len(connects) == n, 10)  # noqa: B023 - waited on at once
        client.disconnect()
        client.loop_stop()
