"""An agent at its lifetime privacy budget sends nothing more: real Mosquitto, real coordinator,
a restart included."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from agent._privacy import PrivacyConfig
from agent._readings import Readings, StaticReader
from agent._runner import AgentRunner
from agent._trainer import TrainConfig
from models import Topics
from tests.helpers import Listener, wait_for
from tests.test_agent import agent_config, coordinator, digits_dir, readings
from tests.test_privacy import budget_for

pytestmark = pytest.mark.broker
__all__ = ["digits_dir"]  # the module fixture, shared

SIGMA = 4.0
ALLOWED = 3


class CountingReader(StaticReader):
    """Counts the agent's checks: proof that it went on running, not that time passed."""

    def __init__(self, r: Readings) -> None:
        super().__init__(r)
        self.reads = 0

    def read(self) -> Readings:
        self.reads += 1
        return super().read()


def start(config, reader) -> tuple[AgentRunner, threading.Thread]:
    runner = AgentRunner(config, reader=reader)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    return runner, thread


def stop(runner: AgentRunner, thread: threading.Thread) -> None:
    runner.stop()
    thread.join(30)
    assert not thread.is_alive()


@pytest.mark.timeout(600)
def test_an_agent_at_its_budget_sends_no_more_even_after_a_restart(broker, fleet_name, tmp_path,
                                                                   digits_dir: Path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    private = agent_config(broker, fleet_name, tmp_path / "pi-1", digits_dir,
                           model_refresh_s=0.0,  # follows every version: inference goes on
                           training=TrainConfig(noise_multiplier=SIGMA),
                           privacy=PrivacyConfig(epsilon_budget=budget_for(ALLOWED, sigma=SIGMA)))
    # Another device without a budget keeps the fleet's model moving.
    other = replace(agent_config(broker, fleet_name, tmp_path / "pi-2", digits_dir,
                                 device_id="pi-2"), min_train_interval_s=0.5)
    status_topic = Topics(fleet_name).status("pi-1")
    listener = Listener(broker.url, [status_topic])

    def updates_from_pi1() -> int:
        return len(service.store.lineage(device_id="pi-1"))

    def reported_exhausted() -> bool:
        while not listener.messages.empty():
            body = json.loads(listener.get().payload)
            if body.get("privacy", {}).get("exhausted"):
                return True
        return False

    reader = CountingReader(readings())
    runner, thread = start(private, reader)
    helper, helper_thread = start(other, StaticReader(readings()))
    try:
        assert wait_for(lambda: runner.agent.privacy.exhausted, timeout=180)
        assert wait_for(lambda: updates_from_pi1() == ALLOWED, timeout=60)
        assert wait_for(reported_exhausted, timeout=60)
        # It keeps checking, and keeps taking the fleet's newer models, but sends nothing.
        reads, version = reader.reads, runner.agent.snapshot.version
        assert wait_for(lambda: reader.reads >= reads + 30
                        and runner.agent.snapshot.version > version, timeout=120)
        assert runner.agent.counters.trained == ALLOWED
        assert updates_from_pi1() == ALLOWED
        stop(runner, thread)

        # Restarted on the same state directory: the ledger is the same, whatever model comes.
        reader = CountingReader(readings())
        runner, thread = start(private, reader)
        assert runner.agent.privacy.count == ALLOWED and runner.agent.privacy.exhausted
        assert wait_for(lambda: runner.agent.snapshot is not None, timeout=60)
        version = runner.agent.snapshot.version
        assert wait_for(lambda: reader.reads >= 30
                        and runner.agent.snapshot.version > version, timeout=120)
        assert wait_for(reported_exhausted, timeout=60)
        assert runner.agent.counters.trained == 0
        assert updates_from_pi1() == ALLOWED
        assert service.engine.version > ALLOWED  # the other device's updates were merged
    finally:
        stop(runner, thread)
        stop(helper, helper_thread)
        listener.close()
        service.stop()
