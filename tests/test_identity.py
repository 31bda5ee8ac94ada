"""One identity per coordinator (issue 13 item 3): a client id per fleet, nothing merged from
another fleet's topics, and a second coordinator for the same fleet refused (or on standby)
instead of both taking the broker session back and forth.

Coordinators here are real services (or the real CLI) on the session's Mosquitto; devices are
plain MQTT clients publishing real update frames and reading their acks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig, load_config
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._identity import HOST, PID_NAMESPACE, Presence
from fedasync_iot.coordinator._provision import COORDINATOR_USER
from fedasync_iot.coordinator._rules import RuleConfig
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import ConfigError, ModelSpec, Topics, decode_ack
from fedasync_iot.models._mqtt import BrokerAddress, create_client
from tests.helpers import Listener, update_bytes, wait_for

SPEC = ModelSpec(kind="logistic", n_features=4, classes=(0, 1, 2))
N = 15
ROOT = Path(__file__).parents[1]


def config(broker: MosquittoBroker | None, fleet: str, state: Path, *, url: str = "",
           **changes: Any) -> CoordinatorConfig:
    return CoordinatorConfig(
        model=SPEC, broker=url or (broker.url if broker else ""), fleet=fleet,
        state_dir=str(state), http="",
        rule=RuleConfig(name="fedasync", alpha=0.5, staleness="constant"),
        guards=GuardConfig(max_norm=5.0, max_staleness=1000),
        snapshots=SnapshotConfig(min_interval_s=0.0, include_onnx=False), **changes)


def started(cfg: CoordinatorConfig, *, connected: bool = True,
            reset: bool = False) -> CoordinatorService:
    service = CoordinatorService(cfg, reset=reset)
    service.start()
    if connected:
        assert service.wait_connected(30), "the coordinator did not connect"
    return service


class Device(Listener):
    """A device of one fleet: publishes updates, collects its acks."""

    def __init__(self, broker: MosquittoBroker, fleet: str, name: str) -> None:
        self.topics = Topics(fleet)
        self.name = name
        super().__init__(broker.url, [self.topics.ack(name)])

    def send(self, update_id: str, *, base_version: int = 0) -> None:
        self.publish(self.topics.update(self.name),
                     update_bytes(0.01 * np.ones(N), device=self.name, update_id=update_id,
                                  base_version=base_version))

    def acks(self, n: int, timeout: float = 30.0) -> list[Any]:
        return [decode_ack(self.get(timeout).payload) for _ in range(n)]


def accepted_ids(service: CoordinatorService) -> set[str]:
    return {r.update_id for r in service.store.lineage() if r.outcome == "accepted"}


def run_cli(toml: Path) -> subprocess.CompletedProcess[str]:
    """`fedasync-coordinator run --config TOML` to its end (a refusal)."""
    return subprocess.run([sys.executable, "-m", "fedasync_iot.coordinator.cli",
                           "run", "--config", str(toml)],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120, check=False)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------ client id


def test_the_client_id_derives_from_the_fleet_unless_set(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('fleet = "acc"\n[model]\nkind = "linear"\nn_features = 2\n')
    assert load_config(toml).mqtt_client_id == "fedasync-coordinator-fl-acc"
    assert load_config(toml, overrides={"fleet": "accm", "topic_root": "plant"}
                       ).mqtt_client_id == "fedasync-coordinator-plant-accm"
    # An existing deployment keeps its broker session by naming the old id.
    assert load_config(toml, overrides={"client_id": "fedasync-coordinator"}
                       ).mqtt_client_id == "fedasync-coordinator"
    with pytest.raises(ConfigError, match="client_id"):
        load_config(toml, overrides={"client_id": "two words"})


@pytest.mark.broker
def test_coordinators_of_fleets_acc_and_accm_on_one_broker_each_ack_their_own(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """The filed case: with one client id for both, each took the other's session every 1-2 s
    and 4 of 5 updates for `acc` were consumed by the `accm` coordinator and lost."""
    acc, accm = fleet_name, f"{fleet_name}m"  # one fleet name a prefix of the other
    services = {f: started(config(broker, f, tmp_path / f)) for f in (acc, accm)}
    devices = {f: [Device(broker, f, f"{f[-12:]}-d{i}") for i in range(3)] for f in (acc, accm)}
    sent: dict[str, set[str]] = {acc: set(), accm: set()}
    try:
        for round_ in range(3):
            for fleet, devs in devices.items():
                for d in devs:
                    uid = f"{fleet}-{d.name}-{round_}"
                    d.send(uid)
                    sent[fleet].add(uid)
        acks = {f: [a for d in devs for a in d.acks(3)] for f, devs in devices.items()}
        statuses = {f: s.status() for f, s in services.items()}
        merged = {f: accepted_ids(s) for f, s in services.items()}
    finally:
        for devs in devices.values():
            for d in devs:
                d.close()
        for s in services.values():
            s.stop()
    for fleet in (acc, accm):
        assert {a.update_id for a in acks[fleet]} == sent[fleet]
        assert all(a.status == "accepted" for a in acks[fleet])
        assert merged[fleet] == sent[fleet]
        # Neither took the other's session: both stayed connected from the first attempt.
        link = statuses[fleet]["connection"]
        assert link["state"] == "online" and link["attempts"] == 0
        assert statuses[fleet]["foreign_messages"] == 0


@pytest.mark.broker
def test_messages_on_another_fleets_topics_are_acknowledged_never_merged(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A persistent session keeps subscriptions: an id once used for fleet `other` still gets
    its updates. They are not ours: PUBACKed (else they hold the in-flight window), counted,
    unsubscribed, never merged, never answered. And an update topic of our own fleet that names
    no device is rejected with the topic in the log."""
    caplog.set_level(logging.INFO, logger="fedasync")
    other = f"{fleet_name}-other"
    client_id = f"shared-{uuid.uuid4().hex[:8]}"
    address = BrokerAddress.parse(broker.url)
    leftover = create_client(address, client_id=client_id, persistent=True)
    leftover.on_connack = lambda connack: leftover.subscribe(Topics(other).all_updates, 1)
    subscribed: list[int] = []
    leftover.on_acked = lambda ack: subscribed.append(ack.mid) if ack.kind == "subscribe" \
        else None
    leftover.connect(address.host, address.port)
    leftover.loop_start()
    assert wait_for(lambda: bool(subscribed), 10)
    leftover.disconnect()
    leftover.loop_stop()

    service = started(config(broker, fleet_name, tmp_path, client_id=client_id))
    stranger = Device(broker, other, "dev-x")  # listens on fl/<other>/ack/dev-x
    ours = Device(broker, fleet_name, "dev-1")
    try:
        stranger.send("foreign-1")
        ours.send("ours-1")  # a barrier: the coordinator handles messages in order
        [ack] = ours.acks(1)
        assert wait_for(lambda: service.status()["foreign_messages"] == 1, 10)
        stranger.send("foreign-2")  # after the unsubscribe: not even delivered
        ours.send("ours-2")
        [ack2] = ours.acks(1)
        ours.publish(f"{Topics(fleet_name).prefix}/update/dev@1", b"x")
        assert wait_for(lambda: any("rejected message on" in r.getMessage()
                                    for r in caplog.records), 10)
        status = service.status()
        merged = accepted_ids(service)
    finally:
        stranger.close()
        ours.close()
        service.stop()
    assert (ack.update_id, ack.status, ack2.update_id) == ("ours-1", "accepted", "ours-2")
    assert stranger.messages.empty(), "no ack for another fleet's device"
    assert status["foreign_messages"] == 1
    assert merged == {"ours-1", "ours-2"}
    foreign = [r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING and "ignored a message on" in r.getMessage()]
    assert len(foreign) == 1 and f"{Topics(other).update('dev-x')}" in foreign[0]
    assert "unsubscribed" in foreign[0] and Topics(other).all_updates in foreign[0]
    bad = [r.getMessage() for r in caplog.records if "rejected message on" in r.getMessage()]
    assert bad == [f"rejected message on {Topics(fleet_name).prefix}/update/dev@1: bad_topic "
                   "(update topic does not name a device)"]


@pytest.mark.broker
def test_a_client_id_in_use_by_another_fleets_coordinator_is_refused(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """Issue 21, item 5: the same explicit client_id for two fleets took the session back and
    forth; each coordinator acked and dropped the other's updates and neither exited."""
    other = f"{fleet_name}-b"
    client_id = f"shared-{uuid.uuid4().hex[:8]}"
    first = started(config(broker, fleet_name, tmp_path / "a", client_id=client_id))
    device = Device(broker, fleet_name, "dev-1")
    toml = write_toml(tmp_path / "b.toml", broker, other, tmp_path / "b")
    toml.write_text(f'client_id = "{client_id}"\n{toml.read_text()}')
    try:
        second = run_cli(toml)
        device.send("after")
        [after] = device.acks(1)
        link = first.status()["connection"]
    finally:
        device.close()
        first.stop()
    assert second.returncode == 2, second.stderr
    assert "Traceback" not in second.stderr
    assert errors(second.stderr) == [
        f"error: client id {client_id!r} is in use by the coordinator of fleet {fleet_name!r} "
        f"(pid {os.getpid()} on host {HOST}, online since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(first.identity.since))}) on this "
        "broker: two fleets with one client id take one broker session from each other, and "
        "each receives the other's updates. Give this coordinator a client_id of its own (or "
        "leave client_id unset: it derives from the fleet)"]
    assert (after.update_id, after.status) == ("after", "accepted")
    assert link["state"] == "online" and link["attempts"] == 0  # its session was never taken


@pytest.mark.broker
def test_an_update_of_a_fleet_sharing_the_client_id_is_left_for_its_coordinator(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """Fleet a's coordinator is stopped; its update waits in the broker session of the client
    id that fleet b's coordinator uses too. B must not PUBACK it (that dropped it): it stops,
    and a's coordinator, started again, gets and merges it."""
    other = f"{fleet_name}-b"
    client_id = f"shared-{uuid.uuid4().hex[:8]}"
    first = started(config(broker, fleet_name, tmp_path / "a", client_id=client_id))
    first.stop()  # its retained status: offline, naming the client id
    device = Device(broker, fleet_name, "dev-1")
    try:
        device.send("waiting")  # queued in the session of `client_id`
        intruder = started(config(broker, other, tmp_path / "b", client_id=client_id),
                           connected=False)
        try:
            assert wait_for(lambda: intruder.failure is not None, 30)
        finally:
            intruder.stop()
        assert device.messages.empty()
        assert str(intruder.failure).startswith(
            f"received an update of fleet {fleet_name!r} "
            f"({Topics(fleet_name).update('dev-1')}): its coordinator (")
        assert "Left unacknowledged for it; this one stops" in str(intruder.failure)

        again = started(config(broker, fleet_name, tmp_path / "a", client_id=client_id))
        try:
            [ack] = device.acks(1)
            merged = accepted_ids(again)
        finally:
            again.stop()
    finally:
        device.close()
    assert (ack.update_id, ack.status) == ("waiting", "accepted")
    assert merged == {"waiting"}


# ------------------------------------------------------------------------------ one per fleet


def write_toml(path: Path, broker: MosquittoBroker, fleet: str, state: Path) -> Path:
    path.write_text(
        f'broker = "{broker.url}"\nfleet = "{fleet}"\nstate_dir = "{state}"\nhttp = ""\n'
        '[model]\nkind = "logistic"\nn_features = 4\nclasses = [0, 1, 2]\n'
        '[snapshots]\ninclude_onnx = false\n')
    return path


@pytest.mark.broker
def test_a_second_coordinator_for_the_fleet_is_refused_and_the_first_keeps_merging(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    first = started(config(broker, fleet_name, tmp_path / "first"))
    device = Device(broker, fleet_name, "dev-1")
    try:
        device.send("before")
        assert device.acks(1)[0].status == "accepted"
        second = run_cli(write_toml(tmp_path / "second.toml", broker, fleet_name,
                                    tmp_path / "second"))
        device.send("after")
        [after] = device.acks(1)
        link = first.status()["connection"]
        merged = accepted_ids(first)
    finally:
        device.close()
        first.stop()
    assert second.returncode == 2, second.stderr
    assert errors(second.stderr) == [
        f"error: another coordinator (pid {os.getpid()} on host {HOST}, online since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(first.identity.since))}) serves "
        f"fleet {fleet_name!r} on this broker; stop it first, or start this one with --standby "
        "(standby = true) to take over when it stops. If it crashed, its last will marks it "
        "offline within 45 s (1.5 x keepalive)"]
    assert "Traceback" not in second.stderr
    # The first never lost its session to the second, and went on merging.
    assert (after.update_id, after.status) == ("after", "accepted")
    assert link["state"] == "online" and link["attempts"] == 0
    assert merged == {"before", "after"}


@pytest.mark.broker
def test_a_standby_coordinator_takes_over_when_the_first_stops(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    first = started(config(broker, fleet_name, tmp_path / "first"))
    # A state directory of its own, at version 0 while the fleet is further: started over on
    # purpose (--reset), else it refuses on taking over (test_state_loss.py).
    standby = started(config(broker, fleet_name, tmp_path / "standby", standby=True),
                      connected=False, reset=True)
    device = Device(broker, fleet_name, "dev-1")
    try:
        assert wait_for(lambda: standby.status()["state"] == "standby", 30)
        device.send("to-first")
        assert device.acks(1)[0].status == "accepted"
        merged_by_first = accepted_ids(first)
        assert not standby.wait_connected(0.5)
        first.stop()
        assert standby.wait_connected(30)
        device.send("to-standby")
        [ack] = device.acks(1)
        merged_by_standby = accepted_ids(standby)
    finally:
        device.close()
        first.stop()
        standby.stop()
    assert (ack.update_id, ack.status) == ("to-standby", "accepted")
    assert merged_by_first == {"to-first"}
    assert merged_by_standby == {"to-standby"}


@pytest.mark.broker
def test_run_standby_on_the_same_state_directory_takes_over_where_the_first_stopped(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """A blue/green restart: `run --standby` waits before it opens the state directory (the
    first holds its lock), then continues the same model: the next version, not version 1."""
    state = tmp_path / "state"
    first = started(config(broker, fleet_name, state))
    device = Device(broker, fleet_name, "dev-1")
    log = tmp_path / "standby.log"
    with log.open("wb") as out:
        standby = subprocess.Popen(
            [sys.executable, "-m", "fedasync_iot.coordinator.cli", "run", "--standby", "--config",
             str(write_toml(tmp_path / "standby.toml", broker, fleet_name, state))],
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)
    try:
        for i in range(3):
            device.send(f"first-{i}", base_version=i)
        assert [a.version for a in device.acks(3)] == [1, 2, 3]
        assert wait_for(lambda: b"standby: another coordinator" in log.read_bytes(), 60)
        assert standby.poll() is None
        first.stop()
        assert wait_for(lambda: b"published snapshot of version 3" in log.read_bytes(), 60)
        device.send("second-0", base_version=3)
        [ack] = device.acks(1)
    finally:
        device.close()
        first.stop()
        standby.send_signal(signal.SIGTERM)
        code = standby.wait(30)
    assert (ack.update_id, ack.status, ack.version) == ("second-0", "accepted", 4)
    assert code == 0, log.read_text()
    text = log.read_text()
    assert "is offline: taking over" in text and "WARNING" not in text


def retain_status(broker: MosquittoBroker, fleet: str, status: Presence) -> None:
    publisher = Listener(broker.url, [Topics(fleet).coordinator_status])
    publisher.publish(Topics(fleet).coordinator_status, status.to_json(), retain=True)
    publisher.close()


@pytest.mark.broker
def test_a_crashed_coordinator_of_this_host_does_not_hold_up_its_restart(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """A SIGKILLed coordinator leaves "online" retained until its last will, 45 s later; a
    restart on the same host sees that its process is gone and starts at once."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)
    retain_status(broker, fleet_name, Presence(
        state="online", fleet=fleet_name, time=time.time(), instance="crashed", host=HOST,
        pid=gone.pid, pid_namespace=PID_NAMESPACE, since=time.time() - 60))
    service = started(config(broker, fleet_name, tmp_path))
    service.stop()
    assert service.failure is None


@pytest.mark.broker
def test_a_coordinator_online_on_another_host_is_named_in_the_refusal(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    retain_status(broker, fleet_name, Presence(
        state="online", fleet=fleet_name, time=time.time(), instance="elsewhere",
        host="edge-7", pid=4242, since=1_700_000_000.0))
    service = started(config(broker, fleet_name, tmp_path), connected=False)
    try:
        assert wait_for(lambda: service.failure is not None, 30)
        assert service.status()["state"] == "refused"
        assert not service.wait_connected(0.2)
    finally:
        service.stop()
    assert str(service.failure).startswith(
        "another coordinator (pid 4242 on host edge-7, online since 2023-11-14 22:13:20 UTC) "
        f"serves fleet {fleet_name!r} on this broker")


@pytest.mark.broker
def test_a_rival_that_comes_online_later_gives_up_and_an_earlier_one_wins(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """Two coordinators of one fleet under different client ids (one older, without the look
    before connecting) would both merge every update. Whoever serves since later stops."""
    service = started(config(broker, fleet_name, tmp_path))
    topics = Topics(fleet_name)
    watcher = Listener(broker.url, [topics.coordinator_status])
    device = Device(broker, fleet_name, "dev-1")
    try:
        later = Presence(state="online", fleet=fleet_name, time=time.time(), instance="later",
                         host="edge-7", pid=1, since=service.identity.since + 60)
        watcher.publish(topics.coordinator_status, later.to_json())
        # This one serves since earlier: it stays and says so again (retained).
        assert wait_for(lambda: _last_instance(watcher) == service.identity.instance, 30)
        device.send("kept")
        assert device.acks(1)[0].status == "accepted"
        assert accepted_ids(service) == {"kept"}

        earlier = Presence(state="online", fleet=fleet_name, time=time.time(),
                           instance="earlier", host="edge-7", pid=1,
                           since=service.identity.since - 60)
        watcher.publish(topics.coordinator_status, earlier.to_json())
        assert wait_for(lambda: service.failure is not None, 30)
        # It let go of the broker at once: nothing more reaches it, nothing more is merged.
        assert wait_for(lambda: service.status()["connection"]["state"] == "stopped", 10)
        assert service.status()["state"] == "refused"
    finally:
        watcher.close()
        device.close()
        service.stop()
    assert "under another client id" in str(service.failure)


def _last_instance(listener: Listener) -> str | None:
    last = None
    while not listener.messages.empty():
        status = Presence.parse(bytes(listener.messages.get_nowait().payload))
        last = status.instance if status is not None else last
    return last


def test_a_status_payload_round_trips_and_an_old_one_still_reads() -> None:
    p = Presence(state="online", fleet="acc", time=1.0, instance="i", host="h", pid=3,
                 pid_namespace="pid:[1]", since=0.5)
    assert Presence.parse(p.to_json()) == p
    old = Presence.parse(json.dumps({"state": "online", "fleet": "acc", "time": 5.0}).encode())
    assert old is not None and old.instance is None
    assert "older version" in old.describe()
    assert Presence.parse(b'{"state": "probe", "probe": "x"}') is None


# ------------------------------------------------------------------------------ shipped ACL


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Mosquitto with the shipped config, password file and ACL (tests/test_deploy.py)."""
    from tests.test_deploy import start_secure_broker

    b = start_secure_broker(tmp_path_factory.mktemp("secure"), [COORDINATOR_USER])
    yield b
    b.broker.close()


@pytest.mark.broker
def test_under_the_shipped_acl_the_look_works_and_a_bad_password_is_named(
        secure: Any, fleet_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The look before connecting publishes its marker on the coordinator status topic, which
    the shipped ACL already lets the coordinator account read and write: no ACL change."""
    caplog.set_level(logging.INFO, logger="fedasync")
    password = quote(secure.passwords[COORDINATOR_USER], safe="")
    url = f"mqtt://{COORDINATOR_USER}:{password}@127.0.0.1:{secure.port}"
    first = CoordinatorService(config(broker=None, fleet=fleet_name, state=tmp_path / "a",
                                      url=url))
    second = CoordinatorService(config(broker=None, fleet=fleet_name, state=tmp_path / "b",
                                       url=url))
    wrong = CoordinatorService(config(broker=None, fleet=f"{fleet_name}-w",
                                      state=tmp_path / "c",
                                      url=f"mqtt://{COORDINATOR_USER}:nope@127.0.0.1:"
                                          f"{secure.port}"))
    first.start()
    try:
        assert first.wait_connected(30)
        second.start()
        assert wait_for(lambda: second.failure is not None, 30)
        wrong.start()
        assert wait_for(lambda: any("refused the connection" in r.getMessage()
                                    for r in caplog.records), 30)
        wrong_status = wrong.status()["connection"]
    finally:
        wrong.stop()
        second.stop()
        first.stop()
    assert not [r for r in caplog.records if "could not check" in r.getMessage()]
    refusal = next(r.getMessage() for r in caplog.records
                   if "refused the connection" in r.getMessage())
    assert refusal.startswith(f"cannot connect to mqtt://{COORDINATOR_USER}:***@127.0.0.1:")
    assert "(check the user name and password in the broker URL)" in refusal
    assert "nope" not in refusal
    assert wrong_status["state"] == "connecting" and "not authori" in wrong_status["last_error"]


def test_topics_a_broker_rewrote_are_recognised(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """RabbitMQ's MQTT plugin delivers 'fl/t.dot/model' as 'fl/t/dot/model' (tests/
    test_rabbitmq.py): our own topics, rewritten, are told from another fleet's, and the agent
    says why once instead of handing an announcement to its ack handler."""
    from fedasync_iot.agent._agent import Agent
    from fedasync_iot.agent._config import AgentConfig
    from fedasync_iot.agent._data import CallableSource
    from fedasync_iot.agent._readings import StaticReader
    from tests.test_agent import readings
    from tests.test_models_on_demand import RecordingLink

    dotted, plain = Topics("t.dot"), Topics("acc")
    assert dotted.rewritten("fl/t/dot/announce") and dotted.rewritten("fl/t/dot/update/d-1")
    assert not dotted.rewritten(dotted.announce) and not dotted.rewritten("fl/t/other/model")
    assert plain.rewritten("fl/acc/update/pi/1")  # device id "pi.1"
    for ours in (plain.update("pi-1"), plain.ack("pi-1"), plain.coordinator_status,
                 plain.model, plain.weights, plain.template, "fl/accm/update/x"):
        assert not plain.rewritten(ours), ours

    agent = Agent(AgentConfig(device_id="pi-1", fleet="t.dot", state_dir=str(tmp_path),
                              train_in_subprocess=False),
                  link=RecordingLink(), reader=StaticReader(readings()),
                  data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))))
    caplog.set_level(logging.INFO, logger="fedasync")
    for _ in range(3):
        agent.on_message("fl/t/dot/announce", b"{}")
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "turned a '.'" in errors[0].getMessage()
    assert agent.announcement is None
