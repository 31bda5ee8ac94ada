"""The real coordinator and agents on a clustered broker (issue 17, items 1 and 2): a private
3-node NATS cluster serving MQTT (fleet/_clusters.py), unchanged code, and failover between
broker URLs when a node dies.

Agents are the real `agent.Agent` on real `PahoLink`s with a stub trainer
(tests/test_reliability.py's `AgentFleet` parts); the coordinator is the real service in this
process. The claims are the ones of docs/architecture.md, "Durability": every update a device
finished is merged exactly once and the device hears about it, and the model is the replay of
its lineage; plus, here, that a SIGKILLed node costs only a failover.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent import Session
from fedasync_iot.fleet import NatsCluster
from fedasync_iot.models import Snapshot, Topics, decode_snapshot
from fedasync_iot.models._mqtt import BrokerAddress, Connack, PacketAck, create_client
from tests.helpers import wait_for
from tests.test_reliability import (
    AgentFleet,
    Pacer,
    check_lineage,
    replayable_coordinator,
    rounds_merged_once,
    undelivered,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]

SEED = 20261202


# Republished as docs/brokers.md advises for NATS: a node whose retained copy lags gets it again
# (a CI run had agents on such nodes wait in vain for their first model).
REPUBLISH_S = 2.0


def retained_model(url: str, fleet: str, *, version: int, timeout: float = 60.0) -> Snapshot:
    """The retained model a device fetching now gets from this node, as agents fetch it (QoS 0
    subscription, models on demand), waiting for `version`: each try is a fresh subscription,
    since a node still electing JetStream leaders may refuse one (SUBACK 0x80) or lag."""
    deadline = time.monotonic() + timeout
    last = "nothing"
    while time.monotonic() < deadline:
        got = _fetch_once(url, fleet)
        if isinstance(got, Snapshot) and got.version >= version:
            return got
        last = f"version {got.version}" if isinstance(got, Snapshot) else got
        time.sleep(0.2)  # the pace of the polling, not a wait for a state
    raise AssertionError(f"{url} did not serve version {version} of the model ({last})")


def _fetch_once(url: str, fleet: str) -> Snapshot | str:
    """One fresh QoS 0 subscription to the model topic: the retained snapshot, or why not."""
    got: queue.Queue[bytes] = queue.Queue()
    granted: queue.Queue[bool] = queue.Queue()
    address = BrokerAddress.parse(url)
    client = create_client(address, client_id=f"fetch-{uuid.uuid4().hex[:8]}", persistent=False)

    def connected(connack: Connack) -> None:
        client.subscribe(Topics(fleet).model, 0)

    def acked(ack: PacketAck) -> None:
        if ack.kind == "subscribe":
            granted.put(not ack.refused)

    client.on_connack = connected
    client.on_acked = acked
    client.handle(lambda m: got.put(m.payload))
    try:
        client.connect(address.host, address.port)
        client.loop_start()
        if not granted.get(timeout=10):
            return "subscription refused"
        return decode_snapshot(got.get(timeout=10))
    except (OSError, queue.Empty) as exc:
        return repr(exc)
    finally:
        client.loop_stop()
        client.disconnect()


def test_coordinator_and_agents_on_different_nodes_of_a_nats_cluster(
        nats_cluster: NatsCluster, fleet_name: str, tmp_path: Path) -> None:
    """Coordinator on node A, agents on B and C: updates merged exactly once, every one acked,
    the retained snapshot (a JetStream-backed retained message) reaches every node."""
    a, b, c = nats_cluster.urls
    service = replayable_coordinator(a, fleet_name, tmp_path / "coordinator",
                                     republish_s=REPUBLISH_S)
    fleet = AgentFleet(4, broker=[b, c, b, c], fleet=fleet_name, root=tmp_path / "agents",
                       seed=SEED)
    try:
        total = rounds_merged_once(service, fleet, tmp_path / "coordinator")
        # What a device connecting now to any node gets: the newest model, retained.
        for url in (b, c):
            snapshot = retained_model(url, fleet_name, version=total)
            assert snapshot.version == total == service.engine.version
            np.testing.assert_array_equal(snapshot.weights, service.engine.params)
        # The agents fetched models through their own nodes (models on demand).
        assert all(agent.snapshot is not None and agent.snapshot.version >= 1
                   for agent in fleet.agents)
    finally:
        fleet.close()
        service.stop()


@pytest.mark.parametrize("session", ["sessionless", "persistent"])
def test_sigkill_of_the_coordinators_node_fails_over_and_loses_nothing(
        nats_cluster: NatsCluster, fleet_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, session: Session) -> None:
    """Coordinator on A with [A, B, C]; agents spread over the nodes, each with its own list.
    SIGKILL A mid-stream: everyone fails over, no acked update is lost or merged twice, merging
    goes on; the time from the kill to the first merge after the failover is printed."""
    caplog.set_level(logging.INFO, logger="fedasync")
    a, b, c = nats_cluster.urls
    service = replayable_coordinator((a, b, c), fleet_name, tmp_path / "coordinator",
                                     republish_s=REPUBLISH_S)
    orders = [(a, b, c), (b, c, a), (c, a, b), (a, c, b), (b, a, c), (c, b, a)]
    fleet = AgentFleet(6, broker=orders, fleet=fleet_name, root=tmp_path / "agents",
                       seed=SEED + 1, session=session)
    link = service._link
    pacer: Pacer | None = None
    try:
        assert service.wait_connected(60)
        assert link.address.port == nats_cluster.nodes[0].mqtt_port
        assert wait_for(fleet.ready, timeout=60), fleet.waiting()
        fleet.train_round()
        assert wait_for(lambda: fleet.merged() == len(fleet.produced), timeout=120), undelivered(
            fleet, tmp_path / "coordinator")

        pacer = Pacer(fleet, rounds=6, every=0.5)  # a steady stream through the kill
        assert wait_for(lambda: service.engine.version >= 2 * len(fleet.agents), timeout=120)
        acked_before = {ack.update_id for ack in fleet.acks() if ack.status == "accepted"}
        version_at_kill = service.engine.version
        killed_at = time.monotonic()
        nats_cluster.kill(0)
        # Offline, nothing more arrives: what it merges from here came through the new node.
        # (Measured from the reconnection a CI-like run missed the merges: the backlog of the
        # outage was merged before the test looked.)
        assert wait_for(lambda: not link.online, timeout=60), link.info()
        offline = service.engine.version
        assert offline < 7 * len(fleet.agents), "everything merged before the kill: no test"

        assert wait_for(lambda: link.online and link.address.port != nats_cluster.nodes[0]
                        .mqtt_port, timeout=120), link.info()
        reconnected = time.monotonic() - killed_at
        assert wait_for(lambda: service.engine.version > offline, timeout=120, interval=0.005), (
            "no merge after the failover")
        recovered = time.monotonic() - killed_at
        print(f"\nNATS failover: coordinator online on another node {reconnected:.2f} s after "
              f"the SIGKILL of its node; first merge after it at {recovered:.2f} s")

        pacer.join(timeout=300)
        assert wait_for(fleet.all_delivered, timeout=180), undelivered(
            fleet, tmp_path / "coordinator")
        check_lineage(service.store, fleet)
        lineage = {r.update_id for r in service.store.lineage()}
        assert acked_before <= lineage  # what was acked before the kill is still there
        total = len(fleet.produced)
        assert total == 7 * len(fleet.agents)
        # Every agent that was on A moved on, and said where to and why.
        assert wait_for(lambda: all(lk.connected and lk.connection.address.port
                                    != nats_cluster.nodes[0].mqtt_port for lk in fleet.links),
                        timeout=60), [lk.connection_info() for lk in fleet.links]
        moves = [r.getMessage() for r in caplog.records if "failing over" in r.getMessage()]
        assert any(a.removeprefix("mqtt://") in m for m in moves), moves
        # Models still reach the devices after the failover: through the node the coordinator
        # now publishes on, the newest retained model, always; agents trained on models newer
        # than the kill. The other surviving node may lag (nats-server 2.9: a node's map of
        # retained messages can miss those published on another node after a leader change;
        # docs/brokers.md): reported, not asserted.
        home = link.address.redacted()
        snapshot = retained_model(home, fleet_name, version=total, timeout=120)
        assert snapshot.version == total == service.engine.version
        np.testing.assert_array_equal(snapshot.weights, service.engine.params)
        versions = [a.snapshot.version if a.snapshot else -1 for a in fleet.agents]
        assert any(v > version_at_kill for v in versions), (version_at_kill, versions)
        for url in {b, c} - {home}:
            other = _fetch_once(url, fleet_name)
            served = other.version if isinstance(other, Snapshot) else other
            print(f"NATS: coordinator's node {home} serves version {total}; {url} serves "
                  f"{served}; agents' models {versions} (kill at version {version_at_kill})")
    finally:
        if pacer is not None:
            pacer.stop()
        fleet.close()
        service.stop()
        nats_cluster.heal()  # node A back, for the next test of the module
