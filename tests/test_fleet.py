"""The fleet simulator: many clients on one loop, a whole (small) run, determinism."""

from __future__ import annotations

import csv
import json
import queue
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from fedasync_iot.fleet import build_fleet
from fedasync_iot.fleet._broker import (
    EmbeddedBroker,
    MosquittoBroker,
    mosquitto_path,
    raise_fd_limit,
)
from fedasync_iot.fleet._netloop import NetLoop
from fedasync_iot.fleet._sim import SimConfig, time_to_target
from fedasync_iot.fleet._traces import FleetProfile
from fedasync_iot.fleet.cli import compare
from fedasync_iot.models._mqtt import BrokerAddress, Client, Connack, create_client
from tests.helpers import Listener, wait_for


@pytest.mark.broker
def test_many_clients_on_one_thread_reconnect_after_a_broker_restart(private_broker) -> None:
    n = 150
    address = BrokerAddress.parse(private_broker.url)
    got: queue.Queue[str] = queue.Queue()
    connects = {"n": 0}
    net = NetLoop()
    clients = []
    def subscriber(client: Client) -> Callable[[Connack], None]:
        def on_connack(connack: Connack) -> None:
            connects["n"] += 1
            client.subscribe("many/retained", qos=1)
        return on_connack

    for i in range(n):
        c = create_client(address, client_id=f"many-{i}", persistent=False)
        c.on_connack = subscriber(c)
        c.handle(lambda m: got.put(m.payload.decode()))
        net.attach(c)
        clients.append(c)
    Listener(private_broker.url, ["x"]).publish("many/retained", b"hello", retain=True)
    stop = threading.Event()

    def start() -> None:
        for c in clients:
            net.connect(c, address.host, address.port)

    net.call_later(0, start)
    thread = threading.Thread(target=net.run, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: got.qsize() >= n, timeout=30)
        private_broker.stop()
        private_broker.start()
        assert wait_for(lambda: connects["n"] >= 2 * n, timeout=60), connects
    finally:
        stop.set()
        thread.join(10)
        net.close()


def test_same_seed_same_fleet() -> None:
    a, b = build_fleet(SimConfig(devices=8, seed=3)), build_fleet(SimConfig(devices=8, seed=3))
    c = build_fleet(SimConfig(devices=8, seed=4))

    assert a.traces == b.traces
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a.parts, b.parts, strict=True))
    assert a.traces != c.traces


def test_time_to_target_uses_a_moving_average() -> None:
    evals = [(1.0, 1, 0.9, 0), (2.0, 2, 0.5, 0), (3.0, 3, 0.9, 0), (4.0, 4, 0.9, 0),
             (5.0, 5, 0.9, 0)]
    # one sample a second (240 over 240 s): the newest version's accuracy at each
    assert time_to_target(evals, 0.85, duration_s=240.0) == 5.0
    assert time_to_target(evals, 0.95, duration_s=240.0) is None


def test_time_to_target_is_the_same_for_few_versions_as_for_many_on_one_curve() -> None:
    """A rule with one version every 4 s (synchronous rounds) and one with a version every
    0.1 s, whose accuracy follows the same curve, reach the target at the same time: the window
    spans time, not versions (over three versions, the sparse one was a round late)."""
    def curve(t: float) -> float:
        return 0.8 if t < 4.0 else 0.95

    sparse = [(t, v, curve(t), 0.0) for v, t in enumerate((1.0, 4.0, 8.0, 12.0, 16.0), 1)]
    dense = [(k / 10, k, curve(k / 10), 0.0) for k in range(10, 200)]
    assert time_to_target(sparse, 0.9, duration_s=24.0) == time_to_target(
        dense, 0.9, duration_s=24.0) == 4.1  # samples at 3.9, 4.0, 4.1: 0.8, 0.95, 0.95


@pytest.mark.broker
@pytest.mark.slow
def test_a_small_comparison_runs_end_to_end(broker, tmp_path) -> None:
    # A small, mostly available fleet: enough merges in a few seconds to check the plumbing.
    profile = FleetProfile(speed_median_s=300.0, mains_fraction=1.0, cellular_fraction=0.0,
                           late_join_fraction=0.0, early_leave_fraction=0.0, flap_fraction=0.0)
    config = replace(SimConfig(), devices=8, duration_s=6.0, scale=3000.0, broker=broker.url,
                     workers=1, round_deadline_sim_s=1800.0, cohort_size=3, fedbuff_k=2,
                     profile=profile)

    results, summary = compare(config, ["fedbuff", "fedavg-sync"], tmp_path, progress=False)

    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["rules"]) == {"fedbuff", "fedavg-sync"}
    for r in results:
        assert r.summary["versions"] >= 1, r.summary
        assert r.evaluations[-1][2] > 0.2  # better than chance on 10 classes
        rows = list(csv.DictReader((r.out_dir / "metrics.csv").open()))
        assert len(rows) >= 4
        assert int(rows[-1]["online"]) >= 1
    assert summary["fleet"]["n_devices"] == 8


def test_embedded_broker_carries_messages() -> None:
    pytest.importorskip("amqtt")
    broker = EmbeddedBroker()
    broker.start()
    try:
        inbox: queue.Queue[bytes] = queue.Queue()
        subscribed = threading.Event()
        c = create_client(BrokerAddress.parse(broker.url), client_id="emb", persistent=False)
        c.handle(lambda m: inbox.put(m.payload))
        c.on_connack = lambda connack: c.subscribe("e/#", qos=1)
        c.on_acked = lambda ack: subscribed.set() if ack.kind == "subscribe" else None
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert subscribed.wait(10)
        c.send("e/x", b"ok", qos=1, retain=True).wait_for_publish(5)
        assert inbox.get(timeout=10) == b"ok"
        c.loop_stop()
        c.disconnect()
    finally:
        broker.stop()


def _open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return tuple(-1 if v == "unlimited" else int(v) for v in (soft, hard))  # type: ignore[return-value]


@pytest.mark.skipif(mosquitto_path() is None, reason="needs mosquitto")
def test_the_broker_and_workers_get_the_hard_open_file_limit(tmp_path) -> None:
    """A socket per device in its worker and in the broker: at a soft limit of 1,024 a fleet of
    a few thousand could not connect. The private broker (and the workers, spawned after the
    same call) run with the soft limit raised to the hard one."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("hard open-file limit too low to lower the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    broker = MosquittoBroker(workdir=tmp_path / "broker")
    try:
        broker.start()
        assert broker._proc is not None
        b_soft, b_hard = _open_files_limit(broker._proc.pid)
        assert b_soft > 256
        assert b_soft == (b_hard if hard != resource.RLIM_INFINITY else 1 << 20)
        assert raise_fd_limit() == b_soft  # already raised: unchanged
    finally:
        broker.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

