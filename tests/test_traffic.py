"""Communication cost: the topic classifier, the client-side counters, the broker's $SYS totals
and a small simulated run's `traffic` section against what the coordinator saw."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedasync_iot.fleet import build_fleet
from fedasync_iot.fleet._broker import MosquittoBroker, diff_counters, read_sys_counters
from fedasync_iot.fleet._sim import SimConfig, run_rule
from fedasync_iot.fleet._traces import FleetProfile
from fedasync_iot.fleet._traffic import (
    KINDS,
    TrafficCounter,
    attach,
    classify,
    direction,
    summarize_traffic,
    table_cells,
)
from fedasync_iot.models import Topics, build_model
from fedasync_iot.models._mqtt import Client, Message
from tests.helpers import Listener


def test_classify_follows_the_topic_layout() -> None:
    t = Topics("acc")
    assert classify(t.update("pi-1")) == "update"
    assert classify(t.status("pi-1")) == "status"
    assert classify(t.ack("pi-1")) == "ack"
    assert classify(t.model) == "snapshot"
    assert classify(f"{t.model}/v12") == "snapshot"  # anything under the model topic
    assert classify(t.weights) == classify(t.template) == "snapshot"  # compact snapshots
    assert classify(f"{t.prefix}/announce") == "announce"
    assert classify(t.coordinator_status) == "other"
    assert classify(Topics("acc", root="x").update("d")) == "other"  # another root
    for odd in ("", "fl", "fl/acc", "fl//update/d", "fl/acc/update", "fl/acc/update/",
                "fl/acc/update/d/extra", "fl/acc/announce/x", "fl/acc/unknown/d", "$SYS/x"):
        assert classify(odd) == "other", odd
    assert [direction(k) for k in KINDS] == ["uplink", "uplink", "downlink", "downlink",
                                             "downlink", "other"]


class _Info:
    """Stands for paho's MQTTMessageInfo: the packet id of a queued publish."""

    def __init__(self, mid: int) -> None:
        self.mid, self.rc = mid, 0


class _FakePaho:
    """Stands for the paho client inside our `Client`: records what it is asked to publish."""

    def __init__(self) -> None:
        self.published: list[tuple[str, Any]] = []

    def publish(self, topic: str, payload: Any = None, qos: int = 0, retain: bool = False
                ) -> _Info:
        self.published.append((topic, payload))
        return _Info(len(self.published))


class _PahoMessage:
    """Stands for paho's MQTTMessage, as its network thread hands it over."""

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic, self.payload = topic, payload
        self.qos, self.retain, self.mid, self.dup = 0, False, 0, False


def test_attach_counts_what_a_client_sends_and_receives_and_passes_it_on() -> None:
    paho = _FakePaho()
    client = Client(paho)  # type: ignore[arg-type]
    handled: list[Message] = []
    client.handle(handled.append)
    t = Topics("acc")
    counter = attach(client)
    assert client.send(t.update("d1"), b"x" * 100, qos=1).mid == 1  # paho's handle, passed on
    client.send(t.status("d1"), '{"state": "idle"}')
    client.send(t.status("d1"))  # no payload
    incoming = _PahoMessage(t.model, b"m" * 1000)
    paho.on_message(paho, None, incoming)  # type: ignore[attr-defined]  # as paho delivers
    paho.on_message(paho, None, _PahoMessage(t.ack("d1"), b"a" * 10))  # type: ignore[attr-defined]

    assert [p[0] for p in paho.published] == [t.update("d1"), t.status("d1"), t.status("d1")]
    assert handled == [Message(t.model, b"m" * 1000), Message(t.ack("d1"), b"a" * 10)]
    s = counter.stats()
    assert s["sent_update_msgs"] == 1
    assert s["sent_update_bytes"] == 100 + len(t.update("d1"))
    assert s["sent_status_msgs"] == 2
    assert s["sent_status_bytes"] == len('{"state": "idle"}') + 2 * len(t.status("d1"))
    assert s["received_snapshot_msgs"] == 1
    assert s["received_snapshot_bytes"] == 1000 + len(t.model)
    assert s["received_ack_bytes"] == 10 + len(t.ack("d1"))
    assert "sent_snapshot_msgs" not in s


def test_summary_figures_per_merged_update_and_per_device_hour() -> None:
    devices = TrafficCounter()
    t = Topics("acc")
    for _ in range(4):
        devices.count("sent", t.update("d"), 1000 - len(t.update("d")))  # 1,000 B each
    devices.count("sent", t.status("d"), 200 - len(t.status("d")))
    devices.count("received", t.model, 3000 - len(t.model))
    broker = {"bytes_received": 8000, "bytes_sent": 20000, "messages_received": 10,
              "messages_sent": 30}
    s = summarize_traffic(devices.stats(), broker=broker, merged_updates=4, n_devices=2,
                          sim_hours=5.0)
    assert s["uplink_bytes"] == 4200 and s["uplink_messages"] == 5
    assert s["downlink_bytes"] == 3000 and s["downlink_messages"] == 1
    assert s["devices"]["uplink"]["update"] == {"messages": 4, "bytes": 4000}
    assert s["per_merged_update"]["broker_bytes_sent"] == 5000
    assert s["per_merged_update"]["uplink_bytes"] == 1050
    assert s["per_device_hour"]["broker_bytes_received"] == 800  # 8000 / (2 devices x 5 h)
    assert table_cells(s) == ("5.0k", "2.0k", "2.8k")  # (20000 + 8000) / 10 device-hours
    none = summarize_traffic(devices.stats(), broker=None, merged_updates=0, n_devices=2,
                             sim_hours=5.0)
    assert none["broker"] is None and none["per_merged_update"]["uplink_bytes"] is None
    assert table_cells(none) == ("-", "-", "0.7k")  # client counts: (3000 + 4200) / 10
    assert table_cells(None) == ("-", "-", "-")


@pytest.mark.broker
def test_sys_counters_see_what_was_published(broker: MosquittoBroker, fleet_name: str) -> None:
    before = read_sys_counters(broker.url, timeout=30)
    assert before is not None
    listener = Listener(broker.url, [f"{fleet_name}/#"])
    try:
        for _ in range(20):
            listener.publish(f"{fleet_name}/x", b"p" * 5000)
        for _ in range(20):  # delivered back to the listener: the broker has sent them
            listener.get(timeout=30)
        after = read_sys_counters(broker.url, timeout=30)
    finally:
        listener.close()
    delta = diff_counters(before, after)
    assert delta is not None
    # Other tests may share the broker: at least what this one sent.
    assert delta["publish_bytes_received"] >= 20 * 5000
    assert delta["bytes_received"] >= 20 * (5000 + len(f"{fleet_name}/x"))
    assert delta["bytes_sent"] >= 20 * 5000  # delivered back to the listener


def test_sys_counters_none_without_a_broker() -> None:
    from fedasync_iot.fleet._broker import free_port

    assert read_sys_counters(f"mqtt://127.0.0.1:{free_port()}", timeout=2) is None
    assert diff_counters(None, {"bytes_sent": 1}) is None


@pytest.mark.broker
@pytest.mark.slow
def test_a_small_run_reports_its_traffic(tmp_path) -> None:
    # Its own Mosquitto (the simulator starts one), so the broker's totals are this run's.
    profile = FleetProfile(speed_median_s=300.0, mains_fraction=1.0, cellular_fraction=0.0,
                           late_join_fraction=0.0, early_leave_fraction=0.0, flap_fraction=0.0)
    # The wall clock: under the virtual one the broker's totals (which then also carry the
    # clock's markers) go to run.json, not to the summary checked here.
    config = replace(SimConfig(), devices=6, duration_s=6.0, scale=3000.0, workers=1,
                     broker_kind="mosquitto", profile=profile, clock="wall")
    fleet = build_fleet(config)
    result = run_rule(config, "fedasync", tmp_path / "fedasync", fleet=fleet, progress=False)
    traffic = result.summary["traffic"]
    up, down = traffic["devices"]["uplink"], traffic["devices"]["downlink"]
    coordinator = traffic["coordinator"]
    lineage = len(result.arrivals)
    merged = sum(1 for a in result.arrivals if a.outcome != "rejected")
    assert merged >= 1 and traffic["merged_updates"] == merged

    # Every update the coordinator recorded was sent by a device; a device may have sent one
    # more that was still in flight (or sent again after a reconnect) when the run stopped.
    assert lineage <= up["update"]["messages"] <= lineage + config.devices
    assert lineage <= coordinator["received"]["update"]["messages"] <= up["update"]["messages"]
    assert up["status"]["messages"] >= config.devices
    # Each update is acknowledged; a device receives at most what the coordinator sent.
    assert coordinator["sent"]["ack"]["messages"] >= lineage
    assert 1 <= down["ack"]["messages"] <= coordinator["sent"]["ack"]["messages"]
    # Snapshots (fetched on demand by the devices that train): each carries the weights, as
    # float16 at least (compact snapshots; the full ones and the template are larger).
    snapshots = down["snapshot"]["messages"]
    assert snapshots >= 1
    weights = build_model(fleet.spec).n_params * 2
    assert down["snapshot"]["bytes"] >= snapshots * weights
    assert coordinator["sent"]["snapshot"]["bytes"] >= (
        coordinator["sent"]["snapshot"]["messages"] * weights)

    # The broker's own totals hold every counted byte plus the protocol's framing.
    b = traffic["broker"]
    assert b is not None
    client_in = traffic["uplink_bytes"] + sum(v["bytes"] for v in coordinator["sent"].values())
    client_out = traffic["downlink_bytes"] + sum(v["bytes"]
                                                 for v in coordinator["received"].values())
    assert b["bytes_received"] >= client_in > 0
    assert b["bytes_sent"] >= client_out > 0
    assert b["messages_received"] >= up["update"]["messages"] + up["status"]["messages"]
    assert traffic["per_merged_update"]["broker_bytes_sent"] == pytest.approx(
        b["bytes_sent"] / merged, abs=0.01)
    device_hours = config.devices * config.duration_s * config.scale / 3600
    assert traffic["per_device_hour"]["uplink_bytes"] == pytest.approx(
        traffic["uplink_bytes"] / device_hours, abs=0.01)
    # On the wall clock the devices also time each update to its ack (fleet/_latency.py).
    latency = result.machine["ack_latency_ms"]
    assert latency is not None and 1 <= latency["n"] <= down["ack"]["messages"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] < 100_000
    # ... and the coordinator its part of it, every update it received (duplicates too).
    own = result.machine["coordinator_ack_ms"]
    assert own is not None and own["n"] >= lineage
    assert own["p50"] <= own["p99"] <= 60_000


def test_ack_latency_buckets_add_up_to_percentiles_within_a_bucket() -> None:
    from collections import Counter

    from fedasync_iot.fleet._latency import EDGES_MS, bucket, percentiles

    rng = np.random.default_rng(7)
    samples = rng.lognormal(mean=3.0, sigma=1.0, size=5000)  # ms, median ~20
    first, second = (Counter(bucket(x) for x in half) for half in np.split(samples, 2))
    got = percentiles(first + second)  # as two workers' reports add up
    assert got is not None and got["n"] == 5000
    step = EDGES_MS[1] / EDGES_MS[0]
    for q in (50, 90, 99):
        true = float(np.percentile(samples, q))
        assert true <= got[f"p{q}"] <= true * step * 1.01, (q, true, got)
    assert bucket(0.2) == "ack_ms_le_1" and bucket(10**6) == "ack_ms_le_inf"
    assert percentiles({"ack_ms_le_inf": 3})["p50"] == float("inf")  # type: ignore[index]
    assert percentiles({}) is None and percentiles({"sent_update_msgs": 4}) is None


def test_a_prometheus_histogram_reads_back_as_the_same_percentiles() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from fedasync_iot.fleet._latency import histogram_counts, percentiles

    h = Histogram("t_seconds", "t", registry=CollectorRegistry(), buckets=(0.01, 0.1, 1.0))
    for seconds in [0.005] * 50 + [0.05] * 40 + [0.5] * 9 + [5.0]:
        h.observe(seconds)
    counts = histogram_counts(h)
    assert counts == {"ack_ms_le_10": 50, "ack_ms_le_100": 40, "ack_ms_le_1000": 9,
                      "ack_ms_le_inf": 1}
    assert percentiles(counts) == {"n": 100, "p50": 10.0, "p90": 100.0, "p99": 1000.0}
