"""The model fetcher's explicit state (agent._fetch.FetchState), as the status shows it, and the
poll's wait for the model on the agent's injected network clock. No network."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import CallableSource
from fedasync_iot.agent._fetch import FetchState, Mode
from fedasync_iot.agent._readings import StaticReader
from fedasync_iot.models._wire import Snapshot
from tests.test_agent import readings
from tests.test_models_on_demand import (
    OPEN,
    UNPLUGGED,
    RecordingLink,
    announce,
    offline_agent,
    small_snapshot,
    topics_of,
)


def test_the_state_follows_listening_fetching_and_back(tmp_path: Path) -> None:
    agent = offline_agent(tmp_path, StaticReader(UNPLUGGED))
    assert agent.status()["model_fetch"] == "idle"
    agent.on_connected()  # no model at all: the refresh listens
    assert agent.fetcher.state is FetchState.LISTENING
    assert agent.status()["model_fetch"] == "listening"
    v1 = small_snapshot(1)
    agent.on_announce(announce(v1, 1))
    assert agent.fetcher.state is FetchState.FETCHING and topics_of(agent) == {"announce",
                                                                              "model"}
    agent.on_model(v1)
    assert agent.fetcher.state is FetchState.IDLE and topics_of(agent) == set()
    assert agent.status()["model_fetch"] == "idle"


def test_following_and_a_plain_link_have_their_states(tmp_path: Path) -> None:
    follow = offline_agent(tmp_path / "f", StaticReader(UNPLUGGED), model_refresh_s=0)
    follow.on_connected()
    assert (follow.fetcher.mode, follow.fetcher.state) == (Mode.FOLLOW, FetchState.FOLLOWING)

    class PlainLink:
        connected = True

        def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                    retain: bool = False) -> None:
            pass

    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path / "p"), policy=OPEN,
                         train_in_subprocess=False)
    plain = Agent(config, link=PlainLink(), reader=StaticReader(readings()),
                  data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))))
    plain.on_connected()
    plain.on_model(small_snapshot(2))
    assert plain.snapshot is not None and plain.snapshot.version == 2
    assert plain.status()["models"] == "link" and plain.status()["model_fetch"] == "idle"


def test_no_second_fetch_starts_while_a_snapshot_is_verified(tmp_path: Path) -> None:
    """A check on the agent's thread while the network thread verifies the fetched snapshot
    must not subscribe to it again: the broker would send the same retained snapshot twice."""
    agent = offline_agent(tmp_path, StaticReader(UNPLUGGED))
    agent.on_connected()
    v1 = small_snapshot(1)
    agent.on_announce(announce(v1, 1))
    assert "model" in topics_of(agent)
    seen: list[tuple[FetchState, set[str]]] = []
    full = agent.intake.receipt.full

    def slow_verification(payload: bytes) -> tuple[Snapshot, bytes]:
        agent.check()  # as the poll thread would, meanwhile
        seen.append((agent.fetcher.state, topics_of(agent)))
        return full(payload)

    agent.intake.receipt.full = slow_verification  # type: ignore[method-assign]
    agent.on_model(v1)
    assert seen == [(FetchState.VERIFYING, {"announce"})]
    assert agent.snapshot is not None and agent.snapshot.version == 1
    assert agent.fetcher.state is FetchState.IDLE and agent.fetches == 1


class _ClockedEvent:
    """An event whose waits pass on a fake clock, at once."""

    def __init__(self, now: list[float]) -> None:
        self.now = now
        self.waits: list[float] = []

    def clear(self) -> None:
        pass

    def set(self) -> None:
        pass

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.now[0] += timeout
        return False


def test_a_poll_waits_for_the_model_on_the_injected_network_clock(tmp_path: Path) -> None:
    now = [0.0]
    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path), policy=OPEN,
                         min_train_interval_s=0.0, train_in_subprocess=False)
    agent = Agent(config, link=RecordingLink(), reader=StaticReader(readings()),
                  data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))),
                  net_clock=lambda: now[0])
    event = _ClockedEvent(now)
    agent.fetcher._news = event  # type: ignore[assignment]
    agent.model_wait_s = 12.0
    agent.on_connected()
    assert agent.fetcher.state is FetchState.LISTENING  # unheard: a poll waits for it
    started = time.monotonic()
    agent.poll()
    assert time.monotonic() - started < 5.0  # no wall time waited
    assert sum(event.waits) == 12.0 and now[0] == 12.0  # model_wait_s on the fake clock
