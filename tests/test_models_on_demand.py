"""Models on demand and reacting at once (issue 14, items 1 and 3).

Unit tests of the agent's decisions with a recording link (no network), the announcement's wire
format, then agents and a coordinator on the real Mosquitto fixture, counting what reaches each
agent's link on the model topic.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import CallableSource
from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.agent._readings import StaticReader
from fedasync_iot.agent._runner import AgentRunner, PahoLink
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._rules import RuleConfig
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import (
    ModelSpec,
    Snapshot,
    Topics,
    UnsupportedSchema,
    WireError,
    encode_snapshot,
)
from fedasync_iot.models._mqtt import Message
from fedasync_iot.models._signing import generate_keypair, split
from fedasync_iot.models._wire import (
    Ack,
    Announcement,
    decode_announcement,
    decode_snapshot,
    decode_weights,
    encode_ack,
    encode_announcement,
)
from tests.helpers import Listener, update_bytes, wait_for
from tests.test_agent import readings

OPEN = PolicyConfig(min_dwell_s=0.0)
SMALL = ModelSpec(kind="logistic", n_features=4, classes=(0, 1, 2))  # 15 parameters
UNPLUGGED = readings(battery_percent=20.0, charging=False)  # not eligible: power
METERED = readings(interfaces_up=("wwan0",))  # not eligible, and nothing may be fetched


def small_snapshot(version: int, cohort: tuple[str, ...] | None = None) -> bytes:
    return encode_snapshot(Snapshot(version=version, spec=SMALL,
                                    weights=np.zeros(15, np.float32), cohort=cohort))


def announce(payload: bytes, version: int, cohort: tuple[str, ...] | None = None) -> bytes:
    return encode_announcement(Announcement(
        version=version, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload),
        created_at=time.time(), cohort=cohort))


# ---------------------------------------------------------------------------- the wire


def test_announcement_round_trip_and_hostile_input() -> None:
    payload = small_snapshot(7, cohort=("pi-1", "pi-2"))
    raw = announce(payload, 7, cohort=("pi-1", "pi-2"))
    a = decode_announcement(raw)
    assert (a.version, a.size, a.cohort) == (7, len(payload), ("pi-1", "pi-2"))
    assert a.sha256 == hashlib.sha256(payload).hexdigest()
    assert len(announce(payload, 7)) < 200  # tens of bytes, not a snapshot
    assert b"cohort" not in announce(payload, 7)  # absent while anyone may train
    # A newer sender's extra key is ignored (docs/wire.md).
    assert decode_announcement(raw[:-1] + b',"hint":1}').version == 7
    for bad, why in [(b"[]", "JSON object"), (raw.replace(b'"version":7', b'"version":-1'),
                                                  "version"),
                     (raw.replace(b'"sha256":"', b'"sha256":"X'), "sha256"),
                     (raw.replace(b'"pi-1"', b'"a/b"'), "cohort device id"),
                     (b"x" * (64 * 1024 + 1), "limit")]:
        with pytest.raises(WireError, match=why):
            decode_announcement(bad)
    with pytest.raises(UnsupportedSchema):
        decode_announcement(raw.replace(b'"schema":1', b'"schema":2'))


# ---------------------------------------------------------------------------- decisions, no network


class RecordingLink:
    """A connected link that records what the agent subscribes to."""

    def __init__(self) -> None:
        self.connected = True
        self.subscribed: set[str] = set()
        self.log: list[tuple[str, str]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        pass

    def subscribe(self, topic: str, qos: int = 0) -> None:
        assert qos == 0, "announcements and snapshots must never queue in the session"
        self.subscribed.add(topic)
        self.log.append(("sub", topic.rsplit("/", 1)[1]))

    def unsubscribe(self, topic: str) -> None:
        self.subscribed.discard(topic)
        self.log.append(("unsub", topic.rsplit("/", 1)[1]))


def offline_agent(tmp_path: Path, reader: StaticReader, **changes: Any) -> Agent:
    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path), policy=OPEN,
                         min_train_interval_s=0.0, train_in_subprocess=False, **changes)
    return Agent(config, link=RecordingLink(), reader=reader,
                 data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))))


def topics_of(agent: Agent) -> set[str]:
    link = agent.link
    assert isinstance(link, RecordingLink)
    return {t.rsplit("/", 1)[1] for t in link.subscribed}


def test_the_agent_listens_fetches_and_stops_as_it_should(tmp_path: Path) -> None:
    reader = StaticReader(UNPLUGGED)
    agent = offline_agent(tmp_path, reader)
    agent.on_connected()
    # No model at all: the refresh wants one even though it cannot train.
    assert topics_of(agent) == {"announce"}
    v1 = small_snapshot(1)
    agent.on_announce(announce(v1, 1))
    assert topics_of(agent) == {"announce", "model"}
    agent.on_model(v1)
    # Fetched: the model is current, the refresh is done, nothing is listened to.
    assert topics_of(agent) == set() and agent.snapshot is not None
    assert agent.status()["last_fetch"]["version"] == 1 and agent.fetches == 1

    reader.readings = readings()  # eligible: listens for training
    decision = agent.check()
    assert topics_of(agent) == {"announce"}
    assert not agent.should_train(decision)  # not heard the announcement yet
    agent.on_announce(announce(v1, 1))
    assert topics_of(agent) == {"announce"} and agent.should_train(decision)
    v2 = small_snapshot(2, cohort=("pi-2",))
    agent.on_announce(announce(v2, 2, cohort=("pi-2",)))
    # A round that does not invite this device: no fetch, and no training on the old model.
    assert topics_of(agent) == {"announce"} and not agent.should_train(decision)
    v2b = small_snapshot(2, cohort=("pi-1", "pi-2"))
    agent.on_announce(announce(v2b, 2, cohort=("pi-1", "pi-2")))
    assert topics_of(agent) == {"announce", "model"}
    agent.on_model(v2b)
    assert agent.snapshot.version == 2 and agent.should_train(decision)

    reader.readings = METERED
    agent.check()
    assert topics_of(agent) == set()


def test_an_announcement_that_the_held_model_is_newest_wakes_the_agent(tmp_path: Path) -> None:
    """An eligible agent waits for the announcement before training; hearing that its model is
    the newest must step it at once (the simulator never polls in between)."""
    agent = offline_agent(tmp_path, StaticReader(readings()))
    woken: list[str] = []
    agent.wake = lambda: woken.append("wake")
    v1 = small_snapshot(1)
    agent.on_connected()
    agent.on_announce(announce(v1, 1))  # newer than nothing: a fetch starts, no wake yet
    assert topics_of(agent) == {"announce", "model"} and woken == []
    agent.on_model(v1)
    assert woken == ["wake"]  # the new model
    decision = agent.check()
    agent.on_announce(announce(v1, 1))  # the same version again: current
    assert woken == ["wake", "wake"] and agent.should_train(decision)


def test_a_metered_agent_subscribes_to_nothing_unless_configured(tmp_path: Path) -> None:
    metered = offline_agent(tmp_path / "a", StaticReader(METERED))
    metered.on_connected()
    metered.check()
    assert topics_of(metered) == set()
    allowed = offline_agent(tmp_path / "b", StaticReader(METERED), fetch_on_metered=True)
    allowed.on_connected()
    assert topics_of(allowed) == {"announce"}


def test_follow_mode_subscribes_to_the_model_while_the_network_allows(tmp_path: Path) -> None:
    reader = StaticReader(UNPLUGGED)
    agent = offline_agent(tmp_path, reader, model_refresh_s=0)
    agent.on_connected()
    assert topics_of(agent) == {"model"}
    reader.readings = METERED
    agent.check()
    assert topics_of(agent) == set()


def test_without_announcements_the_agent_follows_snapshots_until_one_is_heard(
        tmp_path: Path) -> None:
    """An agent upgraded before its coordinator (which announces nothing) must keep training."""
    import fedasync_iot.agent._fetch as fetch_module
    now = [0.0]
    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path), policy=OPEN,
                         min_train_interval_s=0.0, train_in_subprocess=False)
    agent = Agent(config, link=RecordingLink(), reader=StaticReader(readings()),
                  data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))),
                  net_clock=lambda: now[0])
    agent.on_connected()
    decision = agent.check()
    assert topics_of(agent) == {"announce"}
    now[0] = fetch_module.ANNOUNCE_WAIT_S - 1
    agent.check()
    assert topics_of(agent) == {"announce"}  # not yet: the retained one may be on its way
    now[0] = fetch_module.ANNOUNCE_WAIT_S + 1
    agent.check()
    assert topics_of(agent) == {"announce", "model"}  # follows, and still listens
    assert agent.status()["models"].startswith("follow (")
    agent.on_model(small_snapshot(3))
    assert agent.snapshot is not None and agent.should_train(decision)
    # The coordinator is upgraded: back to fetching on demand.
    agent.on_announce(announce(small_snapshot(3), 3))
    assert topics_of(agent) == {"announce"} and agent.status()["models"] == "on demand"


def test_an_unheard_announcement_subscription_is_made_again(tmp_path: Path) -> None:
    """A node of a clustered broker can miss the retained announcement (NATS: a CI run saw two
    of six agents never hear it): unheard for RELISTEN_S, the agent subscribes again, which
    makes the broker send it again; once heard, never again."""
    import fedasync_iot.agent._fetch as fetch_module
    now = [0.0]
    link = RecordingLink()
    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path), policy=OPEN,
                         min_train_interval_s=0.0, train_in_subprocess=False)
    agent = Agent(config, link=link, reader=StaticReader(readings()),
                  data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))),
                  net_clock=lambda: now[0])
    agent.on_connected()
    assert topics_of(agent) == {"announce"}
    link.log.clear()

    def subscriptions() -> int:
        return link.log.count(("sub", "announce"))

    first = subscriptions()
    now[0] = fetch_module.RELISTEN_S - 0.5
    agent.check()
    assert subscriptions() == first
    now[0] = fetch_module.RELISTEN_S + 0.5
    agent.check()
    agent.check()
    assert subscriptions() == first + 1  # once per RELISTEN_S, not per check
    now[0] = 2 * fetch_module.RELISTEN_S + 1.0
    agent.check()
    assert subscriptions() == first + 2
    assert ("unsub", "announce") not in link.log  # made again, never dropped meanwhile
    agent.on_announce(announce(small_snapshot(3), 3))
    assert "model" in topics_of(agent)  # heard: fetching
    now[0] = 20 * fetch_module.RELISTEN_S
    agent.check()
    assert subscriptions() == first + 2


def test_a_poll_waiting_for_an_announcement_subscribes_again_while_it_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's poll waits up to `model_wait_s` for the announcement: the subscription is
    made again within that wait, not only at the next poll."""
    import fedasync_iot.agent._fetch as fetch_module
    monkeypatch.setattr(fetch_module, "RELISTEN_S", 0.2)
    agent = offline_agent(tmp_path, StaticReader(readings()))
    link = agent.link
    assert isinstance(link, RecordingLink)
    agent.model_wait_s = 1.5
    agent.on_connected()
    first = link.log.count(("sub", "announce"))
    agent.poll()
    assert link.log.count(("sub", "announce")) >= first + 3  # about 7 in 1.5 s


def test_a_poll_waits_for_no_announcement_from_a_coordinator_that_does_not_announce(
        tmp_path: Path) -> None:
    """The poll's wait for the model ends where the announcement wait does, and once the agent
    follows snapshots it waits for no announcement at all (it waited `model_wait_s`, every
    poll)."""
    import fedasync_iot.agent._fetch as fetch_module
    offset = [0.0]
    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path), policy=OPEN,
                         min_train_interval_s=0.0, train_in_subprocess=False)
    agent = Agent(config, link=RecordingLink(), reader=StaticReader(readings()),
                  data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))),
                  net_clock=lambda: time.monotonic() + offset[0])
    agent.model_wait_s = 40.0
    agent.on_connected()
    assert topics_of(agent) == {"announce"}
    offset[0] = fetch_module.ANNOUNCE_WAIT_S - 0.2  # listening, unheard, for nearly as long
    started = time.monotonic()
    agent.poll()
    assert time.monotonic() - started < 20.0  # ~0.2 s; the whole model_wait_s before
    assert topics_of(agent) == {"announce", "model"}  # following, and still listening
    agent.on_model(small_snapshot(3))
    started = time.monotonic()
    agent.poll()
    assert time.monotonic() - started < 20.0


def test_a_stopping_agent_ends_its_wait_for_the_model_at_once(tmp_path: Path) -> None:
    """SIGTERM (AgentRunner.stop) while a poll waits for an announcement: the poll returns
    then, not `model_wait_s` later, and so do later polls."""
    agent = offline_agent(tmp_path, StaticReader(readings()))
    agent.model_wait_s = 40.0
    agent.on_connected()
    assert topics_of(agent) == {"announce"}  # unheard: a poll would wait for it
    poll = threading.Thread(target=agent.poll, daemon=True)
    poll.start()
    assert wait_for(lambda: agent.fetcher.subscriptions.listening_since is not None,
                    timeout=10)
    agent.interrupt()
    poll.join(20)
    assert not poll.is_alive()
    started = time.monotonic()
    agent.poll()
    assert time.monotonic() - started < 20.0


def test_bad_settings_are_refused() -> None:
    from fedasync_iot.models import ConfigError

    with pytest.raises(ConfigError, match="model_refresh_s"):
        AgentConfig(device_id="pi-1", model_refresh_s=-1)
    with pytest.raises(ConfigError, match="fetch_on_metered"):
        AgentConfig(device_id="pi-1", fetch_on_metered="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- real broker

DIGITS = ModelSpec(kind="logistic", n_features=64, classes=tuple(range(10)),
                   learning_rate=0.05)
N_DIGITS = 650


class CountingLink(PahoLink):
    """A PahoLink that records every message reaching it: topic kind, bytes, version."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        self.received: list[tuple[str, int, int | None]] = []

    def _on_message(self, msg: Message) -> None:
        kind = msg.topic.split("/")[2]
        version = None
        if kind in ("model", "weights"):
            frame = split(bytes(msg.payload))[0]
            try:
                version = (decode_snapshot(frame) if kind == "model"
                           else decode_weights(frame)).version
            except WireError:
                version = None
        self.received.append((kind, len(msg.payload), version))
        super()._on_message(msg)

    def models(self) -> list[int | None]:
        """The version of each snapshot received, full (model) or compact (weights)."""
        return [v for kind, _, v in self.received if kind in ("model", "weights")]

    def bytes_of(self, *kinds: str) -> int:
        return sum(n for kind, n, _ in self.received if kind in kinds)

    def sentinel(self, broker: MosquittoBroker, fleet: str) -> None:
        """Publish an ack to this device and wait for it: the broker sends one client its
        messages in order, so any snapshot routed to it before has arrived by then."""
        before = sum(kind == "ack" for kind, _, _ in self.received)
        sender = Listener(broker.url, [Topics(fleet).ack("sentinel-sender")])
        try:
            sender.publish(Topics(fleet).ack(self.device_id),
                           encode_ack(Ack(update_id="sentinel", status="accepted")))
        finally:
            sender.close()
        assert wait_for(lambda: sum(kind == "ack" for kind, _, _ in self.received) > before,
                        timeout=30)


def coordinator(broker: MosquittoBroker, fleet: str, state: Path, **changes: Any
                ) -> CoordinatorService:
    service = CoordinatorService(CoordinatorConfig(
        model=changes.pop("model", DIGITS), broker=broker.url, fleet=fleet,
        state_dir=str(state), client_id=f"coord-{fleet}", http="",
        rule=RuleConfig(name="fedasync", alpha=0.5),
        snapshots=changes.pop("snapshots", SnapshotConfig(min_interval_s=0, include_onnx=False)),
        **changes))
    service.start()
    assert service.wait_connected(30)
    assert wait_for(lambda: service.status()["published_version"] >= 0, timeout=30)
    return service


def new_versions(broker: MosquittoBroker, service: CoordinatorService, fleet: str,
                 count: int, n_params: int = N_DIGITS) -> int:
    """`count` more versions, each published (PUBACKed) before the next update is sent."""
    device = Listener(broker.url, [Topics(fleet).ack("other")])
    try:
        for _ in range(count):
            version = service.engine.version
            device.publish(Topics(fleet).update("other"), update_bytes(
                np.full(n_params, 0.01, np.float32), device="other", base_version=version))
            assert wait_for(lambda v=version: service.status()["published_version"] > v,
                            timeout=30)
    finally:
        device.close()
    return int(service.status()["published_version"])


def digits_data() -> CallableSource:
    from fedasync_iot.models.ml._datasets import load_digits

    train, _ = load_digits()
    return CallableSource(lambda: (train.X[:100], train.y[:100]))


def start_agent(broker: MosquittoBroker, fleet: str, state: Path, reader: StaticReader,
                **changes: Any) -> tuple[AgentRunner, CountingLink, threading.Thread]:
    state.mkdir(parents=True, exist_ok=True)  # also the data directory (replaced below)
    config = AgentConfig(device_id=changes.pop("device_id", f"{fleet[:40]}-a"),
                         broker=broker.url, fleet=fleet, state_dir=str(state), data=str(state),
                         min_new_samples=changes.pop("min_new_samples", 0),
                         min_train_interval_s=0.0,
                         check_interval_s=changes.pop("check_interval_s", 0.1), policy=OPEN,
                         train_in_subprocess=False, **changes)
    runner = AgentRunner(config, reader=reader)
    link = CountingLink(config)  # the same agent on a link that counts
    link.agent = runner.agent
    runner.link = link
    runner.agent.link = link
    runner.agent.data = digits_data()
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    assert wait_for(lambda: link.connected, timeout=30)
    return runner, link, thread


def stop_agent(runner: AgentRunner, thread: threading.Thread) -> None:
    runner.stop()
    thread.join(30)


@pytest.mark.broker
def test_the_coordinator_announces_the_snapshot_the_broker_holds(broker, fleet_name,
                                                                 tmp_path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord", model=SMALL)
    try:
        newest = new_versions(broker, service, fleet_name, 2, n_params=15)
        topics = Topics(fleet_name)
        late = Listener(broker.url, [topics.model, topics.announce])
        try:
            got = {m.topic: bytes(m.payload) for m in (late.get(), late.get())}
        finally:
            late.close()
        a = decode_announcement(got[topics.announce])
        assert a.version == newest == decode_snapshot(got[topics.model]).version
        assert (a.sha256, a.size) == (hashlib.sha256(got[topics.model]).hexdigest(),
                                      len(got[topics.model]))
    finally:
        service.stop()


@pytest.mark.broker
def test_with_republish_s_the_coordinator_publishes_the_same_model_again(
        broker, fleet_name, tmp_path) -> None:
    """`snapshots.republish_s`: with no new version, the retained model and its announcement
    are published again, unchanged, live to whoever listens (a clustered broker's node that
    missed or kept an old copy gets it again, docs/brokers.md)."""
    service = coordinator(broker, fleet_name, tmp_path / "coord", model=SMALL,
                          snapshots=SnapshotConfig(min_interval_s=0, include_onnx=False,
                                                   republish_s=0.3))
    try:
        newest = new_versions(broker, service, fleet_name, 1, n_params=15)
        topics = Topics(fleet_name)
        listener = Listener(broker.url, [topics.model, topics.announce])
        try:
            got: dict[tuple[str, bool], list[bytes]] = {}
            # Both kinds live twice: a republication racing the subscription can reach the
            # listener as its retained copy on one topic and live on the other.
            while min(len(got.get((t, False), [])) for t in (topics.announce, topics.model)) < 2:
                m = listener.get()  # queue.Empty after 30 s: nothing was republished
                got.setdefault((m.topic, bool(m.retain)), []).append(bytes(m.payload))
        finally:
            listener.close()
        retained = got[(topics.announce, True)]
        assert len(retained) == 1 and decode_announcement(retained[0]).version == newest
        # Live copies of the same bytes.
        assert set(got[(topics.announce, False)]) == set(retained)
        assert len(got.get((topics.model, False), [])) >= 2
        assert set(got[(topics.model, False)]) == set(got[(topics.model, True)])
        assert service.engine.version == newest
        assert service.metrics.republished._value.get() >= 2
    finally:
        service.stop()


@pytest.mark.broker
def test_an_ineligible_agent_gets_no_snapshot_then_fetches_only_the_newest(
        broker, fleet_name, tmp_path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    reader = StaticReader(UNPLUGGED)
    runner, link, thread = start_agent(broker, fleet_name, tmp_path / "agent", reader)
    try:
        # No model yet: it fetches one for inference, once.
        assert wait_for(lambda: runner.agent.snapshot is not None, timeout=30)
        link.sentinel(broker, fleet_name)  # what the first fetch brought has all arrived
        assert link.models() == [0]
        seen = len(link.received)
        newest = new_versions(broker, service, fleet_name, 4)
        link.sentinel(broker, fleet_name)
        assert link.models() == [0], "an agent that cannot train received snapshots"
        # Nothing but the sentinel ack since: no announcement either.
        assert [kind for kind, _, _ in link.received[seen:]] == ["ack"]

        reader.readings = readings()  # plugged in: eligible
        lineage = lambda: service.store.lineage(device_id=runner.config.device_id)  # noqa: E731
        assert wait_for(lambda: len(lineage()) >= 1, timeout=60)
        assert link.models()[:2] == [0, newest]  # one fetch, straight to the newest
        assert lineage()[0].base_version == newest
        assert runner.agent.status()["announced_version"] >= newest
    finally:
        stop_agent(runner, thread)
        service.stop()


@pytest.mark.broker
def test_an_agent_trains_under_a_coordinator_that_does_not_announce(
        broker, fleet_name, tmp_path, monkeypatch) -> None:
    import fedasync_iot.agent._fetch as fetch_module
    monkeypatch.setattr(fetch_module, "ANNOUNCE_WAIT_S", 0.5)  # 30 s in production
    old = Listener(broker.url, [Topics(fleet_name).ack("old-coordinator")])
    try:  # what an older coordinator leaves: a retained snapshot and no announcement
        weights = np.zeros(N_DIGITS, np.float32)
        old.publish(Topics(fleet_name).model, encode_snapshot(
            Snapshot(version=4, spec=DIGITS, weights=weights)), retain=True)
    finally:
        old.close()
    runner, _, thread = start_agent(broker, fleet_name, tmp_path / "a", StaticReader(readings()))
    try:
        assert wait_for(lambda: runner.agent.counters.trained >= 1, timeout=60)
        assert runner.agent.snapshot is not None and runner.agent.snapshot.version == 4
    finally:
        stop_agent(runner, thread)


@pytest.mark.broker
def test_a_metered_agent_downloads_nothing(broker, fleet_name, tmp_path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    runner, link, thread = start_agent(broker, fleet_name, tmp_path / "metered",
                                       StaticReader(METERED))
    allowed, _, allowed_thread = start_agent(
        broker, fleet_name, tmp_path / "allowed", StaticReader(METERED),
        device_id=f"{fleet_name[:40]}-b", fetch_on_metered=True)
    try:
        new_versions(broker, service, fleet_name, 2)
        # The same network with fetch_on_metered: it fetches (so the count below could fail).
        assert wait_for(lambda: allowed.agent.snapshot is not None, timeout=30)
        link.sentinel(broker, fleet_name)
        assert [kind for kind, _, _ in link.received] == ["ack"]  # the sentinel only
        assert runner.agent.snapshot is None and runner.agent.fetched_bytes == 0
    finally:
        stop_agent(runner, thread)
        stop_agent(allowed, allowed_thread)
        service.stop()


@pytest.mark.broker
def test_an_agent_back_from_offline_gets_no_backlog(broker, fleet_name, tmp_path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    # Eligible, so it is subscribed when it goes away, but never trains (no new samples and
    # a newer model is no reason): it only follows the announcements.
    settings = dict(min_new_samples=10**9, retrain_on_new_model=False,
                    device_id=f"{fleet_name[:40]}-a")
    runner, link, thread = start_agent(broker, fleet_name, tmp_path / "agent",
                                       StaticReader(readings()), **settings)
    assert wait_for(lambda: runner.agent.snapshot is not None, timeout=30)
    stop_agent(runner, thread)  # a clean disconnect: the broker keeps its session
    try:
        newest = new_versions(broker, service, fleet_name, 6)
        # Back, on the same persistent session (same client id).
        runner, link, thread = start_agent(broker, fleet_name, tmp_path / "agent",
                                           StaticReader(readings()), **settings)
        assert wait_for(lambda: runner.agent.snapshot is not None
                        and runner.agent.snapshot.version == newest, timeout=30)
        link.sentinel(broker, fleet_name)
        assert link.models() == [newest], "a backlog of snapshots was queued while offline"
    finally:
        stop_agent(runner, thread)
        service.stop()


@pytest.mark.broker
def test_a_wrongly_signed_snapshot_fetched_on_demand_is_refused(broker, fleet_name,
                                                                tmp_path) -> None:
    private, public = generate_keypair(tmp_path / "a")
    _, other_public = generate_keypair(tmp_path / "b")
    service = coordinator(broker, fleet_name, tmp_path / "coord", signing_key=str(private))
    good, _, good_thread = start_agent(
        broker, fleet_name, tmp_path / "good", StaticReader(UNPLUGGED),
        device_id=f"{fleet_name[:40]}-g", coordinator_public_keys=(str(public),))
    bad, bad_link, bad_thread = start_agent(
        broker, fleet_name, tmp_path / "bad", StaticReader(UNPLUGGED),
        device_id=f"{fleet_name[:40]}-b", coordinator_public_keys=(str(other_public),))
    try:
        assert wait_for(lambda: good.agent.snapshot is not None, timeout=30)
        assert wait_for(lambda: bad.agent.model_rejection is not None, timeout=30)
        assert bad.agent.snapshot is None and not (tmp_path / "bad" / "model.snapshot").exists()
        assert bad.agent.status()["last_fetch"]["refused"] is True
        bad_link.sentinel(broker, fleet_name)
        # Refused once (the template of the compact snapshot), not fetched again and again.
        assert [kind for kind, _, _ in bad_link.received
                if kind in ("model", "template", "weights")] == ["template"]
    finally:
        stop_agent(good, good_thread)
        stop_agent(bad, bad_thread)
        service.stop()


@pytest.mark.broker
def test_an_eligible_agent_trains_on_a_new_version_at_once(broker, fleet_name,
                                                           tmp_path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    # A poll an hour apart: every training after the first comes from an announcement. No new
    # data ever counts as enough: only a newer model is a reason to train (as in the simulator).
    runner, _, thread = start_agent(broker, fleet_name, tmp_path / "agent",
                                    StaticReader(readings()), check_interval_s=3600.0,
                                    min_new_samples=10**9, retrain_on_new_model=True)
    try:
        lineage = lambda: service.store.lineage(device_id=runner.config.device_id)  # noqa: E731
        started = time.monotonic()
        assert wait_for(lambda: len(lineage()) >= 3, timeout=60)
        assert time.monotonic() - started < 60 < runner.config.check_interval_s
        bases = [r.base_version for r in lineage()]
        assert bases == sorted(bases) and len(set(bases)) == len(bases)  # each on a newer one
    finally:
        stop_agent(runner, thread)
        service.stop()


@pytest.mark.broker
def test_model_refresh_zero_follows_every_version(broker, fleet_name, tmp_path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    runner, link, thread = start_agent(broker, fleet_name, tmp_path / "agent",
                                       StaticReader(UNPLUGGED), model_refresh_s=0)
    try:
        assert wait_for(lambda: runner.agent.snapshot is not None, timeout=30)
        newest = new_versions(broker, service, fleet_name, 4)
        assert wait_for(lambda: runner.agent.snapshot.version == newest, timeout=30)
        assert link.models() == list(range(newest + 1))
    finally:
        stop_agent(runner, thread)
        service.stop()
