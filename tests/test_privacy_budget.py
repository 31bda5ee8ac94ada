"""An agent at its lifetime privacy budget sends nothing more: real Mosquitto, real coordinator,
a restart included; the coordinator's `devices` table (CLI and /devices) shows it, also after
the coordinator restarts."""

from __future__ import annotations

import json
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from fedasync_iot.agent._privacy import PrivacyConfig
from fedasync_iot.agent._readings import Readings, StaticReader
from fedasync_iot.agent._runner import AgentRunner
from fedasync_iot.agent._trainer import TrainConfig
from fedasync_iot.coordinator.cli import main as coordinator_cli
from fedasync_iot.models import Topics
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


def served_devices(service) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/devices",
                                timeout=30) as answer:
        return json.loads(answer.read())


def stored_devices(state: Path, capsys) -> dict:
    """`fedasync-coordinator devices --json`: the store, read-only, with or without a service."""
    capsys.readouterr()
    assert coordinator_cli(["devices", "--state-dir", str(state), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def local(table: dict, device: str) -> dict | None:
    return next(r["local_privacy"] for r in table["devices"] if r["device_id"] == device)


def shows_reached(table: dict) -> bool:
    row = local(table, "pi-1")
    return row is not None and row["reached"]


@pytest.mark.timeout(600)
def test_an_agent_at_its_budget_sends_no_more_even_after_a_restart(broker, fleet_name, tmp_path,
                                                                   digits_dir: Path,
                                                                   capsys) -> None:
    state = tmp_path / "coord"
    service = coordinator(broker, fleet_name, state, http="127.0.0.1:0")
    budget = budget_for(ALLOWED, sigma=SIGMA)
    private = agent_config(broker, fleet_name, tmp_path / "pi-1", digits_dir,
                           model_refresh_s=0.0,  # follows every version: inference goes on
                           training=TrainConfig(noise_multiplier=SIGMA),
                           privacy=PrivacyConfig(epsilon_budget=budget))
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
        # The coordinator's devices table says so: /devices at once, the CLI from the store.
        assert wait_for(lambda: shows_reached(served_devices(service)), timeout=60)
        shown = local(served_devices(service), "pi-1")
        assert shown is not None and runner.agent.privacy.spent is not None
        assert shown["epsilon"] == pytest.approx(runner.agent.privacy.spent, abs=1e-6)
        assert shown["budget"] == budget and shown["updates"] == ALLOWED
        assert wait_for(lambda: shows_reached(stored_devices(state, capsys)), timeout=60)
        assert local(stored_devices(state, capsys), "pi-1") == shown
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

        # The coordinator restarts: its table still says so, with the figures first heard (the
        # agent's restart repeated them, and nothing was written again).
        service.stop()
        service = None
        offline = stored_devices(state, capsys)
        assert local(offline, "pi-1") == shown
        assert local(offline, "pi-2")["budget"] is None and not local(offline, "pi-2")["reached"]
        assert offline["local_privacy"]["reached_budget"] == ["pi-1"]
        assert coordinator_cli(["devices", "--state-dir", str(state), "--json",
                                "--sort", "epsilon"]) == 0
        # Most spent first: pi-2 sends without noise, which no epsilon bounds.
        assert [r["device_id"] for r in json.loads(capsys.readouterr().out)["devices"]] == [
            "pi-2", "pi-1"]
        assert coordinator_cli(["devices", "--state-dir", str(state)]) == 0
        table = capsys.readouterr().out.splitlines()
        assert "local eps" in table[0] and "reached" in table[0]
        pi1 = next(line for line in table if line.startswith("pi-1 "))
        assert f"{shown['epsilon']:.4g}" in pi1 and pi1.split()[-3] == "yes"
        service = coordinator(broker, fleet_name, state, http="127.0.0.1:0")
        assert local(served_devices(service), "pi-1") == shown
    finally:
        stop(runner, thread)
        stop(helper, helper_thread)
        listener.close()
        if service is not None:
            service.stop()
