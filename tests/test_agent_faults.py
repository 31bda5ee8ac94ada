"""An agent facing an operator's mistakes (issue 21): a coordinator that went back (state reset,
or restored from an older backup), an update the coordinator cannot read, two agents with one
device id, a killed agent, a stopped one. Real Mosquitto, real coordinator, real agent CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent._instance import Instance, TwinWatch
from fedasync_iot.agent._readings import StaticReader
from fedasync_iot.agent._runner import AgentRunner
from fedasync_iot.agent._spool import Spool
from fedasync_iot.fleet import clear_retained
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import Topics
from tests.helpers import Listener, update_bytes, wait_for
from tests.test_agent import agent_config, coordinator, digits_dir, readings

pytestmark = pytest.mark.broker
__all__ = ["digits_dir"]  # a fixture, used by name

ROOT = Path(__file__).parents[1]


class Running:
    """Agent runners, each on a thread of its own, stopped and joined together."""

    def __init__(self) -> None:
        self.threads: dict[AgentRunner, threading.Thread] = {}

    def start(self, runner: AgentRunner) -> AgentRunner:
        self.threads[runner] = threading.Thread(target=runner.run, daemon=True)
        self.threads[runner].start()
        return runner

    def stop(self) -> None:
        for runner in self.threads:
            runner.stop()
        for thread in self.threads.values():
            thread.join(30)
        self.threads.clear()


@pytest.fixture
def running() -> Iterator[Running]:
    """Stopped at the test's end whatever happens."""
    runners = Running()
    yield runners
    runners.stop()


def test_a_coordinator_that_went_back_gets_every_update_and_leads_the_agent(
        broker, fleet_name, tmp_path, digits_dir, running) -> None:
    """Item 1: after a reset the coordinator is at version 0, below the agent's model and its
    spooled updates' base. The agent keeps those updates (rejected future_version), takes the
    coordinator's older model, trains on it, and sends the kept ones once the coordinator
    reaches their base: none is lost and the fleet trains on."""
    first = coordinator(broker, fleet_name, tmp_path / "coord")
    config = agent_config(broker, fleet_name, tmp_path / "agent", digits_dir)
    runner = running.start(AgentRunner(config, reader=StaticReader(readings())))
    try:
        assert wait_for(lambda: runner.agent.snapshot is not None
                        and runner.agent.snapshot.version >= 3, timeout=120)
    finally:
        running.stop()
        first.stop()
    held = runner.agent.snapshot.version
    # Start over: what `run --reset` allows on a broker that holds the fleet's retained state.
    topics = Topics(fleet_name)
    for topic in (topics.model, topics.announce, topics.weights, topics.template,
                  topics.coordinator_status):
        clear_retained(broker.port, topic)
    second = coordinator(broker, fleet_name, tmp_path / "coord-new")
    try:
        assert second.engine.version == 0
        again = running.start(AgentRunner(config, reader=StaticReader(readings())))
        assert wait_for(lambda: again.agent.status()["spool_waiting"] > 0, timeout=120)
        kept = again.agent.waiting
        assert all(base is not None and 0 < base <= held for base in kept.values())
        assert wait_for(lambda: second.engine.version >= 1, timeout=120), "the fleet stopped"

        # The agent took the coordinator's model although older, and trains on it...
        assert wait_for(lambda: again.agent.snapshot is not None
                        and again.agent.snapshot.version < held, timeout=120)
        # ...until the coordinator reaches the kept updates' base: then they are merged.
        merged = lambda: {r.update_id for r in second.store.lineage()  # noqa: E731
                          if r.outcome == "accepted"}
        assert wait_for(lambda: kept.keys() <= merged(), timeout=240), (kept, merged())
        assert second.engine.version > max(b for b in kept.values() if b is not None)
        assert again.agent.status()["spool_waiting"] == 0
    finally:
        running.stop()
        second.stop()


def test_an_update_of_a_newer_schema_leaves_the_spool(broker, fleet_name, tmp_path,
                                                      digits_dir) -> None:
    """Item 3: the coordinator cannot read a newer schema major, but its ack names the update
    the header names, so the agent clears it instead of sending it at every reconnect."""
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    config = agent_config(broker, fleet_name, tmp_path / "agent", digits_dir)
    newer = update_bytes(np.ones(650), device="pi-1", update_id="from-the-future").replace(
        b'"schema":1', b'"schema":2')
    Spool(tmp_path / "agent" / "spool").put("from-the-future", newer)
    runner = AgentRunner(config, reader=StaticReader(readings()))
    runner.link.start()  # connects and sends the spool; no training loop
    try:
        # Both: the network thread unspools, then records the rejection.
        assert wait_for(lambda: len(runner.agent.spool) == 0
                        and runner.agent.last_rejection is not None, timeout=60)
        assert runner.agent.last_rejection.startswith("from-the-future: unsupported_schema")
    finally:
        runner.link.stop()
        service.stop()


# -- two agents with one device id, a killed agent, a stopped one: the real CLI --------------


class AgentProcess:
    """`python -m fedasync_iot.agent.cli run` with its own config and log file."""

    def __init__(self, broker: MosquittoBroker, fleet: str, root: Path, data: Path,
                 name: str, device_id: str, session: str = "sessionless") -> None:
        self.state = root / name
        self.config = root / f"{name}.toml"
        self.log = root / f"{name}.log"
        self.config.write_text(
            f'device_id = "{device_id}"\nbroker = "{broker.url}"\nfleet = "{fleet}"\n'
            f'state_dir = "{self.state}"\ndata = "{data}"\nmin_samples = 100000\n'
            f'check_interval_s = 0.2\ntrain_in_subprocess = false\nsession = "{session}"\n')
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fedasync_iot.agent.cli", "--config", str(self.config), *args]

    def start(self) -> AgentProcess:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.cli("run"), env=self.env, stderr=log)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def connection_state(self) -> str | None:
        try:
            return json.loads((self.state / "connection.json").read_text()).get("state")
        except (OSError, ValueError):
            return None

    def status(self) -> dict:
        done = subprocess.run(self.cli("status"), env=self.env, capture_output=True, timeout=120,
                              check=True)
        return json.loads(done.stdout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def processes() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for p in started:
        p.kill()


@pytest.mark.parametrize("session", ["sessionless", "persistent"])
def test_the_newer_of_two_agents_with_one_device_id_stops_with_exit_2(
        broker, fleet_name, tmp_path, digits_dir, processes, session) -> None:
    """Item 4: they would take the broker session from each other at every reconnect. Each
    mode shows it its own way: persistent, by the other's online status; sessionless, also by
    the will Mosquitto publishes for the connection taken over."""
    status_topic = Topics(fleet_name).status("pi-dup")
    listener = Listener(broker.url, [status_topic])
    try:
        older = AgentProcess(broker, fleet_name, tmp_path, digits_dir, "older", "pi-dup",
                             session)
        processes.append(older.start())
        first = json.loads(listener.get(timeout=120).payload)  # its retained status: online
        assert first["state"] == "online"
        newer = AgentProcess(broker, fleet_name, tmp_path, digits_dir, "newer", "pi-dup",
                             session)
        processes.append(newer.start())

        assert newer.proc is not None and newer.proc.wait(timeout=120) == 2
        [error] = [line for line in newer.text().splitlines()
                   if " ERROR " in line and "device id 'pi-dup' is used by another agent" in line]
        assert f"instance {first['instance']}" in error and "exit 2" in error
        # The older runs on, online again once the newer has gone, and said so too.
        assert older.proc is not None and older.proc.poll() is None
        assert wait_for(lambda: older.connection_state() == "online", timeout=60)
        assert wait_for(lambda: "device id 'pi-dup' is used by another agent too" in
                        older.text(), timeout=30)
        assert older.text().count("lost the connection") <= 5  # not a takeover loop
    finally:
        listener.close()


def test_status_of_a_killed_agent_says_not_running(broker, fleet_name, tmp_path, digits_dir,
                                                   processes) -> None:
    """Item 6: a SIGKILL leaves "online" in connection.json; the command checks the process."""
    agent = AgentProcess(broker, fleet_name, tmp_path, digits_dir, "agent", "pi-k")
    processes.append(agent.start())
    assert wait_for(lambda: agent.connection_state() == "online", timeout=120)
    assert agent.proc is not None
    live = agent.status()
    assert live["agent"] == f"running (pid {agent.proc.pid})"
    assert live["connection"]["state"] == "online"

    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(30)

    dead = agent.status()
    assert dead["agent"].startswith("not running (last seen ")
    assert f"pid {agent.proc.pid}" in dead["agent"]
    assert dead["connection"]["state"] == "not running"
    assert dead["connection"]["last_state"] == "online"


def test_sigterm_says_at_info_what_the_agent_does(broker, fleet_name, tmp_path, digits_dir,
                                                  processes) -> None:
    """Item 6: the stop is logged (why, and what stays in the spool), and the exit is 0."""
    agent = AgentProcess(broker, fleet_name, tmp_path, digits_dir, "agent", "pi-t")
    Spool(agent.state / "spool").put("kept-1", update_bytes(np.ones(4), device="pi-t"))
    processes.append(agent.start())
    assert wait_for(lambda: agent.connection_state() == "online", timeout=120)
    assert agent.proc is not None

    agent.proc.send_signal(signal.SIGTERM)

    assert agent.proc.wait(timeout=60) == 0
    info = [line for line in agent.text().splitlines() if " INFO " in line]
    assert any("SIGTERM received: stopping" in line for line in info), info
    assert any("stopped: 1 update(s) kept in the spool" in line for line in info), info
    assert not agent.status()["agent"].startswith("running")


# -- the detection itself, pure ------------------------------------------------------------


def status(instance: Instance, at: float, state: str = "online") -> bytes:
    return json.dumps({"state": state, "device_id": "d", "time": at,
                       **instance.fields()}).encode()


def test_another_instance_counts_only_in_a_status_newer_than_this_one() -> None:
    me, previous, other = Instance("me", 200.0), Instance("gone", 100.0), Instance("b", 300.0)
    watch = TwinWatch(me)
    # The last word of a previous run on this device (killed): published before this one began.
    assert watch.observe(status(previous, at=150.0)) is None
    assert watch.observe(status(me, at=201.0)) is None
    assert watch.observe(status(other, at=301.0, state="offline")) is None  # a will
    assert watch.observe(b"{not json") is None
    assert watch.observe(b'{"state": "online", "time": 400}') is None  # an older build
    older = Instance("a", 50.0)  # started first, but publishing still
    assert watch.observe(status(older, at=250.0)) == older
    assert watch.observe(status(other, at=301.0)) == other
    assert watch.observe(status(other, at=302.0)) is None  # said once
    # The will of a connection taken over (sessionless: Mosquitto publishes it): it shows the
    # other alive when that connection was made after this agent started.
    def will(who: Instance, connected_at: float) -> bytes:
        return json.dumps({"state": "offline", **who.fields(),
                           "connected_at": connected_at}).encode()

    assert watch.observe(will(Instance("zombie", 10.0), 150.0)) is None  # a previous run's
    third = Instance("c", 20.0)
    assert watch.observe(will(third, 210.0)) == third
    assert other.newer_than(me) and not me.newer_than(other) and me.newer_than(older)
