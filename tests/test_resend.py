"""Sessionless devices (issue 24): the broker keeps no session, acks come at QoS 0, and the
agent sends an unacked update again after a timeout that follows the measured acks
(agent/_resend.py). The estimator and its bounds on their own, then the real agent on a real
Mosquitto against a stand-in coordinator that loses acks on purpose (a broker does not lose
them on demand)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent._config import AgentConfig, load_config
from fedasync_iot.agent._readings import StaticReader
from fedasync_iot.agent._resend import MIN_TIMEOUT_S, ResendConfig, Resender
from fedasync_iot.agent._runner import PahoLink
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import Ack, ConfigError, Topics, UpdateMessage, encode_ack
from fedasync_iot.models._wire import update_label
from tests.helpers import Listener, wait_for
from tests.test_reliability import OPEN, ArrayData, RecordingAgent, StubTrainer, readings

# ------------------------------------------------------------------------------ the estimator


def test_the_first_timeout_is_the_configured_one_then_it_follows_the_acks() -> None:
    r = Resender(ResendConfig(initial_s=30.0, max_s=900.0))
    assert r.timeout() == 30.0
    r.sent("a", 0.0)
    r.acked("a", 2.0)  # first sample: srtt 2, rttvar 1 -> 2 + 4 x 1
    assert r.timeout() == pytest.approx(6.0)
    for i in range(50):  # steady 2 s acks: the variation decays, the timeout nears 2 s
        r.sent(f"b{i}", 100.0 * i)
        r.acked(f"b{i}", 100.0 * i + 2.0)
    assert 2.0 <= r.timeout() < 2.5
    assert r.status()["ack_latency_s"] == pytest.approx(2.0, abs=0.01)


def test_the_timeout_stays_within_its_bounds() -> None:
    fast = Resender(ResendConfig(initial_s=5.0, max_s=60.0))
    fast.sent("a", 0.0)
    fast.acked("a", 0.001)
    assert fast.timeout() == MIN_TIMEOUT_S  # a copy never goes within a second
    slow = Resender(ResendConfig(initial_s=5.0, max_s=60.0))
    slow.sent("a", 0.0)
    slow.acked("a", 500.0)
    assert slow.timeout() == 60.0


def test_an_ack_after_a_copy_is_no_sample() -> None:
    """Karn's rule: which copy the ack answers is unknown, so its latency is not measured."""
    r = Resender(ResendConfig(initial_s=10.0))
    r.sent("a", 0.0)
    assert r.due(10.0, {"a"}) == ["a"]
    r.acked("a", 10.5)
    assert r.srtt is None and r.timeout() == 10.0


def test_copies_back_off_and_only_a_few_wait_at_once() -> None:
    r = Resender(ResendConfig(initial_s=10.0, max_s=35.0, in_flight=2))
    ids = [f"u{i}" for i in range(5)]
    for i, u in enumerate(ids):
        r.sent(u, float(i) / 10)
    assert r.due(9.0, ids) == []  # none overdue yet
    assert r.due(11.0, ids) == ["u0", "u1"]  # oldest first, two copies at most
    assert r.due(12.0, ids) == []  # those two wait for their ack (20 s now: doubled)
    # At 31 u0's and u1's second waits are over too: the least recently sent go first.
    assert r.due(31.0, ids) == ["u2", "u3"]
    assert r.due(50.9, ids) == []  # u2, u3 wait until 51
    assert r.due(51.0, ids) == ["u4", "u0"]  # u0's third wait: 40 s, capped at 35
    assert r.due(70.0, ids) == []
    assert r.due(71.0, ids) == ["u1"]  # u4's wait is over: one slot
    r.acked("u0", 72.0)
    r.acked("u1", 72.0)
    assert r.due(72.0, ids) == ["u2", "u3"]
    assert r.resent == 9


def test_an_update_that_left_the_spool_or_went_on_a_reconnect_starts_over() -> None:
    r = Resender(ResendConfig(initial_s=10.0, in_flight=1))
    r.sent("a", 0.0)
    r.sent("b", 0.0)
    assert r.due(10.0, {"a", "b"}) == ["a"]
    assert r.due(10.0, {"b"}) == ["b"]  # "a" left the spool (dropped): forgotten, "b" may go
    r.sent("b", 11.0)  # a reconnect sent it again: a fresh wait, its ack a sample again
    assert r.due(20.9, {"b"}) == []
    r.acked("b", 12.0)
    assert r.srtt == pytest.approx(1.0)


def test_session_and_resend_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="session"):
        AgentConfig(device_id="d", session="sticky")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="initial_s"):
        ResendConfig(initial_s=100.0, max_s=10.0)
    with pytest.raises(ConfigError, match="in_flight"):
        ResendConfig(in_flight=0)
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d"\n[resend]\ninitial_s = 5\n')
    config = load_config(path, environ={"FEDASYNC_SESSION": "persistent"})
    assert config.session == "persistent" and config.resend.initial_s == 5.0
    assert AgentConfig(device_id="d").session == "sessionless"  # the default (docs/brokers.md)


# ------------------------------------------------------------------------------ on a broker


class StandIn:
    """A coordinator's place on the update topics: records each copy of each update and acks
    the copies the test says to (the others' acks are lost)."""

    def __init__(self, url: str, fleet: str) -> None:
        self.topics = Topics(fleet)
        self.listener = Listener(url, [self.topics.update("+")])
        self.copies: dict[str, int] = {}

    def next_copy(self, timeout: float = 30.0) -> tuple[str, str, int]:
        msg = self.listener.get(timeout)
        device = msg.topic.rsplit("/", 1)[1]
        update_id = update_label(msg.payload)[0]
        self.copies[update_id] = self.copies.get(update_id, 0) + 1
        return device, update_id, self.copies[update_id]

    def ack(self, device: str, update_id: str, status: str = "accepted") -> None:
        self.listener.publish(self.topics.ack(device), encode_ack(Ack(
            update_id=update_id, status=status, reason=None, version=1)))

    def close(self) -> None:
        self.listener.close()


def _agent(url: str, fleet: str, state: Path, session: str, *, device_id: str
           ) -> tuple[RecordingAgent, PahoLink]:
    config = AgentConfig(device_id=device_id, broker=url, fleet=fleet, state_dir=str(state),
                         policy=OPEN, train_in_subprocess=False, session=session,  # type: ignore[arg-type]
                         resend=ResendConfig(initial_s=30.0))
    link = PahoLink(config)
    agent = RecordingAgent(config, link=link, reader=StaticReader(readings()),
                           data=ArrayData(1), trainer=StubTrainer(1))
    agent.acks = []
    link.agent = agent
    link.start()
    assert link.wait_connected(30)
    assert wait_for(lambda: link.acks.refusals == 0 and link.acks._mid is None, timeout=30)
    return agent, link


def _update(device_id: str) -> UpdateMessage:
    return UpdateMessage(device_id=device_id, update_id=uuid.uuid4().hex, base_version=0,
                         n_samples=20, delta=np.zeros(27, dtype=np.float32),
                         created_at=time.time())


@pytest.mark.broker
def test_a_sessionless_agent_sends_an_update_again_when_its_ack_is_lost(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """The first ack is lost; after the ack timeout (the agent's network clock moved on
    instead of the test waiting for it) the update goes again, its ack empties the spool."""
    coordinator = StandIn(broker.url, fleet_name)
    agent, link = _agent(broker.url, fleet_name, tmp_path / "a", "sessionless",
                         device_id=f"{fleet_name[:40]}-d")
    now = [1000.0]
    agent.shared.net_clock = lambda: now[0]
    try:
        update = _update(agent.config.device_id)
        agent.deliver(update)
        device, update_id, copy = coordinator.next_copy()
        assert (update_id, copy) == (update.update_id, 1)  # its ack is "lost": none is sent
        now[0] += 29.0
        agent.resend_unacked()
        now[0] += 2.0  # past the 30 s timeout
        agent.resend_unacked()
        assert coordinator.next_copy() == (device, update_id, 2)
        coordinator.ack(device, update_id)
        assert wait_for(lambda: agent.counters.accepted == 1, timeout=30)
        assert len(agent.spool) == 0
        assert coordinator.copies == {update_id: 2}  # the copy at 29 s never went
        session = agent.status()["session"]
        assert session["mode"] == "sessionless" and session["resent"] == 1
    finally:
        link.stop()
        coordinator.close()


@pytest.mark.broker
@pytest.mark.parametrize("session", ["sessionless", "persistent"])
def test_an_ack_sent_while_the_device_is_away(broker: MosquittoBroker, fleet_name: str,
                                              tmp_path: Path, session: str) -> None:
    """Persistent: the broker keeps the ack and delivers it when the device is back.
    Sessionless: the broker keeps nothing; the agent sends its spooled update again when it
    is back, and the coordinator's "duplicate" empties the spool. Either way nothing is lost,
    and a persistent agent never sends a copy for want of an ack."""
    coordinator = StandIn(broker.url, fleet_name)
    device_id = f"{fleet_name[:40]}-d"
    agent, link = _agent(broker.url, fleet_name, tmp_path / "a", session, device_id=device_id)
    try:
        update = _update(device_id)
        agent.deliver(update)
        assert coordinator.next_copy()[1:] == (update.update_id, 1)
        link.stop()
        assert wait_for(lambda: not link.connected, timeout=30)
        coordinator.ack(device_id, update.update_id)  # while the device is away
        agent, link = _agent(broker.url, fleet_name, tmp_path / "a", session,
                             device_id=device_id)  # the same device, back (same spool)
        assert coordinator.next_copy()[1:] == (update.update_id, 2)  # sent again on connect
        if session == "sessionless":
            # A kept ack would have come at the connect, before this one could be sent.
            coordinator.ack(device_id, update.update_id, "duplicate")
        assert wait_for(lambda: len(agent.spool) == 0, timeout=30)
        first = agent.acks[0].status
        assert first == ("accepted" if session == "persistent" else "duplicate")
        agent.shared.net_clock = lambda: time.monotonic() + 10_000  # any timeout is over
        agent.resend_unacked()
        assert agent.status()["session"]["resent"] == 0
    finally:
        link.stop()
        coordinator.close()
