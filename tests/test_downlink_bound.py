"""Models on demand, per device: in a real-time run (scale 1, a snapshot allowed every second)
each device fetches snapshots only for its own trainings and refreshes, while the coordinator
publishes many more versions than any one device fetches (issue 14's done-when; the 10-minute,
50-device figure is in docs/benchmarks.md "Communication").

The bound: one fetch per training or refresh (the agent's decision, exact), and per fetch the
retained snapshot plus any newer one published while the fetch is still subscribed (MQTT has no
"get": a fetch is subscribe, take, unsubscribe, a round trip). So a device receives at most
about twice as many snapshots as it trains and refreshes, however many versions are published;
in the 10-minute run 8.7% more than fetches."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedasync_iot.fleet import build_fleet
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.fleet._fleetfile import replay_config
from fedasync_iot.fleet._sim import run_rule
from fedasync_iot.fleet._traffic import (
    downlink_bound,
    per_device_line,
    snapshot_downloads,
    summarize_per_device,
)

DEVICES = 12
CENTERS = np.array([[2.0, 0.0, 1.0], [-1.0, 2.0, 0.0], [0.0, -2.0, -1.5]])

# Always-available, mains-powered devices (no traces) that train as soon as a newer model is
# out: 2 local epochs of 4 to 15 sim s, no two alike (alike, they would train in lockstep, all on
# the same versions), so the fleet sends about 0.7 updates a second and its fastest device one
# every 8 s.
FLEET = """
[run]
test_file = "test.csv"

[model]
kind = "logistic"
learning_rate = 0.1
local_epochs = 2
batch_size = 8

[agent]
check_interval_s = 5
min_train_interval_s = 0

[policy]
min_dwell_s = 0
"""


def _write_csv(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = CENTERS[y] + rng.normal(0, 0.7, size=(n, 3))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "c", "label"])
        w.writerows([*map(float, x), int(v)] for x, v in zip(X, y, strict=True))


def _fleet_file(d: Path) -> Path:
    _write_csv(d / "test.csv", 60, 0)
    entries = []
    for i in range(DEVICES):
        _write_csv(d / f"d{i}.csv", 30, i + 1)
        entries.append(f'[[devices]]\nid = "d{i}"\ndata = "d{i}.csv"\nepoch_seconds = {4 + i}\n')
    path = d / "fleet.toml"
    path.write_text(FLEET + "\n" + "\n".join(entries))
    return path


def test_per_device_summary_counts_downloads_against_trainings_and_refreshes() -> None:
    def device(weights: int, model: int, trainings: int, refreshes: int) -> dict[str, int]:
        return {"received_weights_msgs": weights, "received_weights_bytes": 1800 * weights,
                "received_model_msgs": model, "received_model_bytes": 7200 * model,
                "received_template_msgs": 1, "received_template_bytes": 2400,
                "received_announce_msgs": 20, "received_announce_bytes": 20 * 380,
                "received_ack_msgs": trainings, "received_ack_bytes": 150 * trainings,
                "received_other_msgs": 5, "received_other_bytes": 10**6,  # not the downlink
                "trainings": trainings, "updates_sent": trainings,
                "fetched_for_training": trainings, "fetched_for_refresh": refreshes,
                "announced_snapshot_bytes": 7200, "announced_weights_bytes": 1800}

    devices = {"a": device(3, 0, 2, 0), "b": device(2, 1, 1, 1), "c": device(5, 0, 3, 0),
               "d": {}}
    assert [snapshot_downloads(c) for c in devices.values()] == [3, 3, 5, 0]
    assert [downlink_bound(c) for c in devices.values()] == [3, 3, 4, 1]
    s = summarize_per_device(devices, published=40)
    assert s["devices"] == 4 and s["snapshots_published"] == 40
    assert s["over_bound"] == 1 and s["over_bound_devices"] == ["c"]
    assert s["snapshot_downloads"] == {"median": 3.0, "p90": 4.4, "max": 5.0}
    # b: 2 x 1800 + 7200 + 2400 + 20 x 380 + 150 bytes; "other" topics are not counted.
    assert s["downlink_bytes"]["max"] == 2 * 1800 + 7200 + 2400 + 7600 + 150
    assert s["downlink_bytes"]["median"] == (15_700 + 19_450) / 2  # a and c; d has 0
    assert s["follow_bytes"] == 40 * 7200 and s["follow_compact_bytes"] == 40 * 1800
    assert s["median_vs_follow"] == round(s["downlink_bytes"]["median"] / (40 * 7200), 4)
    assert "of 40 published" in per_device_line(s) and "1 devices" in per_device_line(s)
    assert per_device_line(None) == "per device: -"


@pytest.mark.broker
@pytest.mark.slow
def test_each_device_downloads_only_for_its_own_trainings_in_a_real_time_run(
        broker: MosquittoBroker, tmp_path: Path) -> None:
    # Scale 1: sim seconds are wall seconds, as on real devices; one snapshot a second at most
    # (the coordinator's default). 45 s are enough for each device to train even on a busy
    # machine; nothing here depends on how many times.
    # The wall clock: the real-time path, where polls and the snapshot interval run in real
    # seconds (the virtual clock, the simulator's default, is tested in test_virtual_clock.py).
    config = replace(replay_config(_fleet_file(tmp_path)), duration_s=45.0, scale=1.0,
                     workers=1, broker=broker.url, snapshot_interval_s=1.0, clock="wall")
    assert config.model_refresh_sim_s == 3600.0  # no refresh is due within the run
    fleet = build_fleet(config)

    result = run_rule(config, "fedasync", tmp_path / "out", fleet=fleet, progress=False)

    per = result.summary["traffic"]["per_device"]
    rows = {r["device_id"]: r for r in csv.DictReader((result.out_dir / "downlink.csv").open())}
    assert set(rows) == {f"d{i}" for i in range(DEVICES)}
    counts: dict[str, dict[str, Any]] = {d: {k: int(v) for k, v in r.items() if k != "device_id"}
                                         for d, r in rows.items()}
    published = per["snapshots_published"]
    assert published >= 5, per
    assert sum(c["trainings"] for c in counts.values()) >= DEVICES, counts  # devices trained
    for device, c in counts.items():
        downloads = snapshot_downloads(c)
        assert downloads == c["snapshot_downloads"]
        assert downloads >= 1, (device, c)  # each fetched the model it trained on
        # The agent's decisions: a fetch per training started, one per refresh, one more (a
        # fetch the run's end cut short of its training).
        assert c["fetched_for_training"] <= c["trainings"] + 1, (device, c)
        assert c["received_template_msgs"] <= 1, (device, c)  # once per model spec
        # What arrives: the fetched (retained) snapshot, and a newer one published while the
        # fetch is still subscribed (often the version the device's own update made, published
        # as it fetches), at most one a second.
        assert downloads <= 2 * downlink_bound(c), (device, c)
    # Following every version, each device would have received all of them.
    most = max(snapshot_downloads(c) for c in counts.values())
    assert published >= 2 * most, (published, counts)
    assert per["downlink_bytes"]["max"] < per["follow_bytes"], per
    # The summary's count of devices above one snapshot per fetch (+1) matches the rows.
    over = {d for d, c in counts.items() if snapshot_downloads(c) > downlink_bound(c)}
    assert per["over_bound"] == len(over), (per, over)
