"""The edge agent end to end: real Mosquitto, real coordinator, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import DirectorySource
from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.agent._predict import Predictor
from fedasync_iot.agent._readings import Readings, StaticReader
from fedasync_iot.agent._runner import AgentRunner
from fedasync_iot.coordinator._config import CoordinatorConfig, EvalConfig, SnapshotConfig
from fedasync_iot.coordinator._rules import RuleConfig
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import ModelSpec, build_model, decode_snapshot
from fedasync_iot.models._files import save_npz
from fedasync_iot.models.ml._datasets import load_digits
from tests.helpers import wait_for

pytestmark = pytest.mark.broker

SPEC = ModelSpec(kind="logistic", n_features=64, classes=tuple(range(10)), learning_rate=0.05)
OPEN = PolicyConfig(min_dwell_s=0.0)


def readings(**changes) -> Readings:
    base = dict(battery_percent=None, charging=None, interfaces_up=("eth0",), cpu_percent=1.0,
                mem_available_mb=1000.0, temperature_c=None, local_minutes=600,
                taken_at=time.time())
    return Readings(**{**base, **changes})


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    train, _ = load_digits()
    d = tmp_path_factory.mktemp("data")
    save_npz(d / "local.npz", train.X[:200], train.y[:200])
    return d


def coordinator(broker: MosquittoBroker, fleet: str, state: Path, *,
                http: str = "") -> CoordinatorService:
    service = CoordinatorService(CoordinatorConfig(
        model=SPEC, broker=broker.url, fleet=fleet, state_dir=str(state),
        client_id=f"coord-{fleet}", http=http,
        rule=RuleConfig(name="fedasync", alpha=0.5), snapshots=SnapshotConfig(min_interval_s=0),
        evaluation=EvalConfig(test_file="builtin:digits")),
        evaluator=None)
    service.start()
    assert service.wait_connected(30)
    return service


def agent_config(broker: MosquittoBroker, fleet: str, state: Path, data: Path,
                 **changes) -> AgentConfig:
    return AgentConfig(device_id=changes.pop("device_id", "pi-1"), broker=broker.url,
                       fleet=fleet, state_dir=str(state), data=str(data), min_new_samples=0,
                       min_train_interval_s=0.0, check_interval_s=0.1, policy=OPEN,
                       train_in_subprocess=changes.pop("train_in_subprocess", False), **changes)


def test_agent_trains_and_its_update_moves_the_version(broker, fleet_name, tmp_path,
                                                       digits_dir) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord")
    runner = AgentRunner(agent_config(broker, fleet_name, tmp_path / "agent", digits_dir),
                         reader=StaticReader(readings()))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: service.engine.version >= 2, timeout=30)
        lineage = service.store.lineage(device_id="pi-1")
        assert lineage[0].outcome == "accepted" and lineage[0].base_version == 0
        assert wait_for(lambda: runner.agent.counters.accepted >= 1, timeout=60)
        # Models on demand: the agent holds a newer version only once it fetches again (right
        # before its next training), and its first two updates may both be built on version 0.
        assert wait_for(lambda: runner.agent.snapshot is not None
                        and runner.agent.snapshot.version >= 1, timeout=60)
    finally:
        runner.stop()
        thread.join(10)
        service.stop()


def test_training_stops_when_the_device_is_unplugged(tmp_path, digits_dir) -> None:
    class Unplugging:
        """Eligible for the first few reads, then on a low battery without power."""

        def __init__(self) -> None:
            self.reads = 0

        def read(self) -> Readings:
            self.reads += 1
            if self.reads <= 2:
                return readings()
            return readings(battery_percent=20.0, charging=False)

    class Offline:
        connected = False

        def publish(self, *a, **k) -> None:
            raise AssertionError("nothing is sent while offline")

    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path), data=str(digits_dir),
                         min_new_samples=0, policy=OPEN, train_in_subprocess=False)
    agent = Agent(config, link=Offline(), reader=Unplugging(), data=DirectorySource(digits_dir))
    agent.snapshot = _snapshot()

    assert agent.poll().eligible
    assert agent.counters.aborted == 1
    assert len(agent.spool) == 0
    assert [c.name for c in agent.decision.failed] == ["power"]


def test_updates_survive_a_broker_outage(private_broker, fleet_name, tmp_path,
                                         digits_dir) -> None:
    service = coordinator(private_broker, fleet_name, tmp_path / "coord")
    config = agent_config(private_broker, fleet_name, tmp_path / "agent", digits_dir)
    runner = AgentRunner(config, reader=StaticReader(readings()))
    runner.link.start()
    try:
        assert wait_for(lambda: runner.agent.snapshot is not None, timeout=15)
        private_broker.stop()
        assert wait_for(lambda: not runner.link.connected)
        ids = [runner.agent.train_once().update_id for _ in range(3)]
        assert [e.update_id for e in runner.agent.spool.entries()] == ids

        private_broker.start()
        assert wait_for(lambda: len(runner.agent.spool) == 0, timeout=60)
        accepted = {r.update_id for r in service.store.lineage() if r.outcome == "accepted"}
        assert set(ids) <= accepted
    finally:
        runner.link.stop()
        service.stop()


@pytest.mark.timeout(600)  # above the sum of the bounded waits below
def test_killed_agent_delivers_its_spool_after_restart(broker, fleet_name, tmp_path,
                                                       digits_dir) -> None:
    coord_state = tmp_path / "coord"
    first_run = coordinator(broker, fleet_name, coord_state)
    # Stopped once the broker has its snapshot (and so its announcement): a retained model and
    # a session are left behind.
    assert wait_for(lambda: first_run.status()["published_version"] >= 0, timeout=60)
    first_run.stop()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "pi-9"\nbroker = "{broker.url}"\nfleet = "{fleet_name}"\n'
        f'state_dir = "{tmp_path / "agent"}"\ndata = "{digits_dir}"\nmin_new_samples = 0\n'
        'min_train_interval_s = 0.0\ncheck_interval_s = 0.2\ntrain_in_subprocess = false\n'
        '[policy]\nmin_dwell_s = 0.0\nmax_cpu_percent = 100.0\nallowed_interfaces = ["*"]\n'
        'denied_interfaces = []\nmin_mem_available_mb = 0.0\nmax_temperature_c = 500.0\n')
    spool = tmp_path / "agent" / "spool"
    cmd = [sys.executable, "-m", "fedasync_iot.agent.cli", "--config", str(config), "run"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    first = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: spool.is_dir() and len(list(spool.glob("*.upd"))) >= 2,
                        timeout=120)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    spooled = {p.name.split("-", 1)[1][:-4] for p in spool.glob("*.upd")}

    service = coordinator(broker, fleet_name, coord_state)
    second = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        merged = lambda: {r.update_id for r in service.store.lineage()}  # noqa: E731
        assert wait_for(lambda: spooled <= merged(), timeout=60)
        lineage = [r.update_id for r in service.store.lineage()]
        assert len(lineage) == len(set(lineage)), "an update was merged twice"
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)
        service.stop()
    status = json.loads(subprocess.run([*cmd[:-1], "status"], env=env, capture_output=True,
                                       check=True).stdout)
    assert status["model_version"] is not None


def test_predict_matches_scikit_learn_on_the_same_weights(tmp_path) -> None:
    from fedasync_iot.models.ml._onnx import export_onnx

    train, test = load_digits()
    adapter = build_model(SPEC)
    adapter.partial_fit(train.X, train.y, epochs=2)
    snapshot = _snapshot(adapter.get_params_vector(), export_onnx(adapter))
    from fedasync_iot.models import encode_snapshot

    (tmp_path / "model.snapshot").write_bytes(encode_snapshot(snapshot))

    predictor = Predictor(tmp_path)

    np.testing.assert_array_equal(predictor.predict(test.X), adapter.predict(test.X))
    np.testing.assert_allclose(predictor.predict_proba(test.X), adapter.predict_proba(test.X),
                               atol=1e-5)
    assert predictor.version == 3


def test_check_command_explains_each_check(capsys) -> None:
    from fedasync_iot.agent.cli import main

    code = main(["check", "--json"])

    decision = json.loads(capsys.readouterr().out)
    assert code == (0 if decision["eligible"] else 1)
    assert {c["name"] for c in decision["checks"]} >= {"power", "network", "cpu", "memory"}


def _snapshot(weights=None, onnx: bytes = b""):
    from fedasync_iot.models import Snapshot

    w = build_model(SPEC).get_params_vector() if weights is None else weights
    return decode_snapshot(__import__("models").encode_snapshot(
        Snapshot(version=3, spec=SPEC, weights=w, onnx=onnx)))


def test_training_in_a_child_process(tmp_path) -> None:
    from fedasync_iot.agent._child import train_in_child
    from fedasync_iot.agent._trainer import TrainConfig

    train, _ = load_digits()
    snapshot = _snapshot()
    rng = np.random.default_rng(0)

    update = train_in_child(snapshot, train.X[:100], train.y[:100], device_id="pi-1",
                            config=TrainConfig(encoding="int8"), rng=rng, now=time.time())
    stopped = train_in_child(snapshot, train.X[:100], train.y[:100], device_id="pi-1",
                             config=TrainConfig(), rng=rng, should_stop=lambda: True,
                             now=time.time())

    assert update is not None
    assert (update.base_version, update.n_samples, update.encoding) == (3, 100, "int8")
    assert update.delta.shape == snapshot.weights.shape
    assert 0 < np.linalg.norm(update.delta) <= TrainConfig().clip_norm + 1e-4
    assert stopped is None
