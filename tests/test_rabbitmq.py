"""The real coordinator and agents on RabbitMQ 3.10 with its MQTT plugin (issue 17, item 1:
broker-neutral): a private node (fleet/_clusters.py), unchanged code.

Agents are the real `agent.Agent` on real `PahoLink`s with a stub trainer
(tests/test_reliability.py's `AgentFleet` parts); the coordinator is the real service in this
process. The claims are the ones of docs/architecture.md, "Durability": every update a device
finished is merged exactly once and the device hears about it, and the model is the replay of
its lineage; on RabbitMQ also across a coordinator restart, with the updates published while
it was away kept by its persistent session (a durable queue on RabbitMQ).

The last test pins a RabbitMQ 3.10 behaviour our topic names must avoid: the plugin maps MQTT
`/` to AMQP `.`, so a `.` inside a topic level comes back as a level separator.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.fleet import RabbitError, RabbitNode, rabbitmq_server_path
from fedasync_iot.models import Snapshot, Topics, decode_snapshot
from fedasync_iot.models._mqtt import BrokerAddress, Connack, PacketAck, create_client
from tests.helpers import wait_for
from tests.test_reliability import (
    AgentFleet,
    check_lineage,
    replayable_coordinator,
    rounds_merged_once,
    undelivered,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(300)]

SEED = 20261217


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """One private RabbitMQ node (MQTT plugin) for the module; never the machine's node, its
    data or its ports. Skips when RabbitMQ is not installed or the node does not come up."""
    if rabbitmq_server_path() is None:
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    try:
        node.start(timeout=90)  # an Erlang VM and Mnesia first: ~15 s on a quiet 2-core machine
    except RabbitError as exc:
        pytest.skip(f"the private RabbitMQ node did not start: {str(exc)[-3000:]}")
    print(f"\nRabbitMQ: private node {node.nodename} ready in {node.started_in:.1f} s")
    try:
        yield node
    finally:
        node.close()


def retained_model(url: str, fleet: str, *, version: int, timeout: float = 30.0) -> Snapshot:
    """The retained model a device fetching now gets (QoS 0 subscription, a fresh client each
    try, as agents fetch it on demand), waiting for `version`."""
    deadline = time.monotonic() + timeout
    last = "nothing"
    while time.monotonic() < deadline:
        got = _fetch_once(url, Topics(fleet).model)
        if isinstance(got, bytes):
            snapshot = decode_snapshot(got)
            if snapshot.version >= version:
                return snapshot
            last = f"version {snapshot.version}"
        else:
            last = got
        time.sleep(0.2)  # the pace of the polling, not a wait for a state
    raise AssertionError(f"{url} did not serve version {version} of the model ({last})")


def _fetch_once(url: str, topic: str, *, wait: float = 5.0) -> bytes | str:
    """One fresh QoS 0 subscription to `topic`: the retained payload, or why not."""
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    granted: queue.Queue[bool] = queue.Queue()
    address = BrokerAddress.parse(url)
    client = create_client(address, client_id=f"fetch-{uuid.uuid4().hex[:8]}", persistent=False)

    def connected(connack: Connack) -> None:
        client.subscribe(topic, 0)

    def acked(ack: PacketAck) -> None:
        if ack.kind == "subscribe":
            granted.put(not ack.refused)

    client.on_connack = connected
    client.on_acked = acked
    client.handle(lambda m: got.put((m.topic, m.payload)))
    try:
        client.connect(address.host, address.port)
        client.loop_start()
        if not granted.get(timeout=10):
            return "subscription refused"
        came, payload = got.get(timeout=wait)
        return payload if came == topic else f"delivered on {came!r}, not {topic!r}"
    except (OSError, queue.Empty) as exc:
        return repr(exc)
    finally:
        client.loop_stop()
        client.disconnect()


def test_coordinator_and_agents_on_a_rabbitmq_node(
        rabbit: RabbitNode, fleet_name: str, tmp_path: Path) -> None:
    """Coordinator and 4 agents on one RabbitMQ node: updates merged exactly once, every one
    acked, the retained snapshot (the plugin's DETS store) served to a fresh client."""
    service = replayable_coordinator(rabbit.url, fleet_name, tmp_path / "coordinator")
    fleet = AgentFleet(4, broker=rabbit.url, fleet=fleet_name, root=tmp_path / "agents",
                       seed=SEED)
    try:
        total = rounds_merged_once(service, fleet, tmp_path / "coordinator")
        # What a device connecting now gets: the newest model, retained, the coordinator's.
        snapshot = retained_model(rabbit.url, fleet_name, version=total)
        assert snapshot.version == total == service.engine.version
        np.testing.assert_array_equal(snapshot.weights, service.engine.params)
        assert all(agent.snapshot is not None and agent.snapshot.version >= 1
                   for agent in fleet.agents)
    finally:
        fleet.close()
        service.stop()


def test_coordinator_restart_on_rabbitmq_keeps_its_state_and_its_session(
        rabbit: RabbitNode, fleet_name: str, tmp_path: Path) -> None:
    """Stop the coordinator, let the agents train and publish while it is away, start it
    again on the same state: it resumes at its version, its persistent session (a durable
    queue on RabbitMQ) hands it the updates of the outage, each merged once, and the agents
    go on training on the models it publishes after."""
    state = tmp_path / "coordinator"
    service = replayable_coordinator(rabbit.url, fleet_name, state)
    fleet = AgentFleet(4, broker=rabbit.url, fleet=fleet_name, root=tmp_path / "agents",
                       seed=SEED + 1)
    try:
        assert service.wait_connected(60)
        assert wait_for(fleet.ready, timeout=60), fleet.waiting()
        fleet.train_round()
        assert wait_for(fleet.all_delivered, timeout=120), undelivered(fleet, state)
        before = service.engine.version
        assert before == 4
        service.stop()

        fleet.train_round()  # published while no coordinator is connected
        assert all(len(a.spool) == 1 for a in fleet.agents)  # unacked: nobody merged them
        assert fleet.merged() == before

        service = replayable_coordinator(rabbit.url, fleet_name, state)
        assert service.wait_connected(60)
        assert wait_for(fleet.all_delivered, timeout=120), undelivered(fleet, state)
        assert service.engine.version == 8
        fleet.train_round()  # on the models of the restarted coordinator
        assert wait_for(fleet.all_delivered, timeout=120), undelivered(fleet, state)
        total = len(fleet.produced)
        assert total == 12 == service.engine.version
        check_lineage(service.store, fleet)
        assert all(agent.snapshot is not None and agent.snapshot.version > before
                   for agent in fleet.agents), [a.snapshot and a.snapshot.version
                                                for a in fleet.agents]
        snapshot = retained_model(rabbit.url, fleet_name, version=total)
        np.testing.assert_array_equal(snapshot.weights, service.engine.params)
    finally:
        fleet.close()
        service.stop()


def test_rabbitmq_turns_a_dot_in_a_topic_level_into_a_separator(rabbit: RabbitNode) -> None:
    """RabbitMQ 3.10's MQTT plugin routes by AMQP topic keys (MQTT `/` -> `.`) and maps back
    `.` -> `/` on delivery: a retained message on `fl/a.b/model` reaches a subscriber to that
    very topic as `fl/a/b/model`, and a `+` stands for one of the dotted halves only. Our
    topic levels (`models.Topics`: fleet, root, device ids) allow `.`: on RabbitMQ they must
    not use it (docs/brokers.md). Retained messages also skip wildcard subscriptions."""
    topic = f"fl/dotted.{uuid.uuid4().hex[:6]}/model"
    client = create_client(BrokerAddress.parse(rabbit.url),
                           client_id=f"dot-{uuid.uuid4().hex[:8]}", persistent=False)
    client.connect("127.0.0.1", rabbit.mqtt_port)
    client.loop_start()
    try:
        info = client.send(topic, b"kept", qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
        assert _fetch_once(rabbit.url, topic) == (
            f"delivered on {topic.replace('.', '/')!r}, not {topic!r}")
        plain = f"fl/plain-{uuid.uuid4().hex[:6]}_x/model"  # '-' and '_' pass unchanged
        client.send(plain, b"kept", qos=1, retain=True).wait_for_publish(10)
        assert _fetch_once(rabbit.url, plain) == b"kept"
        # No retained message for a wildcard subscription (3.10: exact topics only).
        assert _fetch_once(rabbit.url, plain.rsplit("/", 1)[0] + "/+", wait=2.0) == "Empty()"
        for t in (topic, plain):
            client.send(t, b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_dotted_fleet_on_rabbitmq_is_refused_with_a_clear_error(
        rabbit: RabbitNode, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The product's side of the test above: a coordinator whose fleet name has a '.' gets its
    updates on rewritten topics; it says why, once, counts them, and merges nothing (it used to
    take them for another fleet's and drop them with a misleading warning)."""
    from tests.helpers import update_bytes

    caplog.set_level(logging.INFO, logger="fedasync")
    fleet = f"t.dot-{uuid.uuid4().hex[:6]}"
    service = replayable_coordinator(rabbit.url, fleet, tmp_path / "coordinator")
    client = create_client(BrokerAddress.parse(rabbit.url),
                           client_id=f"dev-{uuid.uuid4().hex[:8]}", persistent=False)
    client.connect("127.0.0.1", rabbit.mqtt_port)
    client.loop_start()
    try:
        assert service.wait_connected(30)
        for _ in range(2):
            client.send(Topics(fleet).update("dev-1"), update_bytes(np.zeros(27, np.float32)),
                        qos=1).wait_for_publish(10)
        rejected = service.metrics.rejected.labels("rewritten_topic")
        assert wait_for(lambda: rejected._value.get() >= 2, timeout=30)
        errors = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.ERROR and "turned a '.'" in r.getMessage()]
        assert len(errors) == 1 and fleet in errors[0], errors
        assert service.engine.version == 0
    finally:
        client.loop_stop()
        client.disconnect()
        service.stop()
