"""Communication cost of a fleet run: messages and bytes by topic kind, counted at the clients,
next to the broker's own totals (`fleet._broker.read_sys_counters`).

Kinds follow the topic layout of `models._topics.Topics` (``<root>/<fleet>/<kind>[/<device>]``):
uplink is what devices send toward the coordinator (``update``, ``status``), downlink what the
coordinator sends toward devices (``snapshot``: the model topic and anything under it, and the
compact snapshot's ``weights`` and ``template`` topics; ``announce``; ``ack``); ``other`` is
the rest (the coordinator's presence, foreign topics).

A counted byte is one of the topic (UTF-8) or the payload: what a message costs whatever the
protocol. The MQTT framing on top (fixed header, topic length, packet id, PUBACK, pings) shows
only in the broker's totals.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedasync_iot.models import Topics

if TYPE_CHECKING:  # the MQTT client (paho) only where one is counted
    from fedasync_iot.models import Client

# The simulator's own control messages (its virtual clock's markers, fleet/_virtual.py) travel
# on topics under this root: not the product's traffic, never counted.
SIM_CONTROL_ROOT = "fedasync-sim/"

UPLINK = ("update", "status")
DOWNLINK = ("snapshot", "announce", "ack")
KINDS = (*UPLINK, *DOWNLINK, "other")

# The level after ``<root>/<fleet>/`` that names each kind, taken from the topic layout itself.
_PROBE = Topics("f")
_LEVELS = {
    _PROBE.update("d").split("/")[2]: "update",
    _PROBE.status("d").split("/")[2]: "status",
    _PROBE.ack("d").split("/")[2]: "ack",
    _PROBE.model.split("/")[2]: "snapshot",
    _PROBE.weights.split("/")[2]: "snapshot",  # compact snapshots and their template
    _PROBE.template.split("/")[2]: "snapshot",
    "announce": "announce",
}


def classify(topic: str, root: str = _PROBE.root) -> str:
    """The kind of a topic: one of `KINDS`. ``fl/acc/update/pi-1`` is "update", ``fl/acc/model``
    (and ``fl/acc/model/<anything>``) "snapshot", ``fl/acc/coordinator/status`` "other"."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != root or not parts[1]:
        return "other"
    kind = _LEVELS.get(parts[2], "other")
    if kind in ("update", "status", "ack"):  # per-device topics: exactly one device level
        return kind if len(parts) == 4 and parts[3] else "other"
    if kind == "announce" and len(parts) != 3:
        return "other"
    return kind


def direction(kind: str) -> str:
    """"uplink", "downlink" or "other"."""
    return "uplink" if kind in UPLINK else "downlink" if kind in DOWNLINK else "other"


class TrafficCounter:
    """Messages and bytes (topic + payload) sent and received, by kind. Thread-safe: a client
    publishes from one thread and receives on another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, way: str, topic: str, payload_len: int) -> None:
        """`way` is "sent" or "received" (from the counting client's side)."""
        if topic.startswith(SIM_CONTROL_ROOT):
            return
        kind = classify(topic)
        n = payload_len + len(topic.encode())
        with self._lock:
            self._counts[f"{way}_{kind}_msgs"] += 1
            self._counts[f"{way}_{kind}_bytes"] += n

    def stats(self) -> dict[str, int]:
        """Flat counts, e.g. ``{"sent_update_msgs": 3, "sent_update_bytes": 8400, ...}``: sums of
        these over clients are the fleet's counts."""
        with self._lock:
            return dict(self._counts)


def attach(client: Client, counter: TrafficCounter | None = None) -> TrafficCounter:
    """Count everything `client` publishes and every message it receives, however it
    dispatches them (its `meter`, `models._mqtt_client`). Attach before it connects; a meter
    already there keeps counting too."""
    counter = counter or TrafficCounter()
    before = client.meter

    def meter(way: str, topic: str, size: int) -> None:
        counter.count(way, topic, size)
        if before is not None:
            before(way, topic, size)

    client.meter = meter
    return counter


def _split(counts: Mapping[str, int], way: str) -> dict[str, dict[str, int]]:
    return {k: {"messages": int(counts.get(f"{way}_{k}_msgs", 0)),
                "bytes": int(counts.get(f"{way}_{k}_bytes", 0))}
            for k in KINDS if counts.get(f"{way}_{k}_msgs", 0)}


def _total(split: Mapping[str, Mapping[str, int]], kinds: tuple[str, ...], key: str) -> int:
    return sum(split.get(k, {}).get(key, 0) for k in kinds)


def summarize_traffic(devices: Mapping[str, int], *, broker: Mapping[str, int] | None,
                      coordinator: Mapping[str, int] | None = None, merged_updates: int,
                      n_devices: int, sim_hours: float) -> dict[str, Any]:
    """summary.json's ``traffic``: the broker's totals (None when they could not be read), what
    the devices sent (uplink) and received (downlink) by kind, what the coordinator sent and
    received, and the main figures per merged update and per device per simulated hour."""
    sent, received = _split(devices, "sent"), _split(devices, "received")
    uplink_b, uplink_m = _total(sent, UPLINK, "bytes"), _total(sent, UPLINK, "messages")
    down_b, down_m = _total(received, DOWNLINK, "bytes"), _total(received, DOWNLINK, "messages")
    figures: dict[str, int | None] = {
        "uplink_bytes": uplink_b, "uplink_messages": uplink_m,
        "downlink_bytes": down_b, "downlink_messages": down_m,
        "broker_bytes_received": None if broker is None else broker.get("bytes_received"),
        "broker_bytes_sent": None if broker is None else broker.get("bytes_sent"),
        "broker_messages_received": None if broker is None else broker.get("messages_received"),
        "broker_messages_sent": None if broker is None else broker.get("messages_sent"),
    }
    device_hours = n_devices * sim_hours

    def per(d: float) -> dict[str, float | None]:
        return {k: None if v is None or d <= 0 else round(v / d, 2) for k, v in figures.items()}

    out: dict[str, Any] = {
        "broker": None if broker is None else dict(broker),
        "devices": {"uplink": sent, "downlink": received},
        **figures,
        "merged_updates": merged_updates, "device_hours": round(device_hours, 3),
        "per_merged_update": per(merged_updates),
        "per_device_hour": per(device_hours),
    }
    if coordinator is not None:
        out["coordinator"] = {"sent": _split(coordinator, "sent"),
                              "received": _split(coordinator, "received")}
    return out


def table_cells(traffic: Mapping[str, Any] | None) -> tuple[str, str, str]:
    """The comparison table's traffic columns: broker bytes sent per merged update, received
    per merged update, and all broker bytes per device per simulated hour (client-counted
    bytes when the broker's totals are missing)."""
    if not traffic:
        return "-", "-", "-"
    pm, ph = traffic["per_merged_update"], traffic["per_device_hour"]
    sent = pm.get("broker_bytes_sent")
    recv = pm.get("broker_bytes_received")
    hourly = (None if ph.get("broker_bytes_sent") is None else
              ph["broker_bytes_sent"] + (ph.get("broker_bytes_received") or 0))
    if sent is None:  # no $SYS: what the clients counted
        sent, recv = pm.get("downlink_bytes"), pm.get("uplink_bytes")
        hourly = (ph.get("downlink_bytes") or 0) + (ph.get("uplink_bytes") or 0)
    return (_kb(sent), _kb(recv), _kb(hourly))


def _kb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:,.1f}k"


# -- each device's own downlink ----------------------------------------------------------------

# The per-device counts a simulated device reports (fleet/_worker.py `SimDevice.downlink`), by
# the topic level they came on: a snapshot download is a full snapshot (model) or a compact one
# (weights); templates come once per model spec.
_DOWNLOADS = ("model", "weights")


def snapshot_downloads(counts: Mapping[str, int]) -> int:
    """Full and compact snapshots one device received."""
    return sum(int(counts.get(f"received_{k}_msgs", 0)) for k in _DOWNLOADS)


def downlink_bound(counts: Mapping[str, int]) -> int:
    """What models on demand allow one device to download: one snapshot per training it
    started, one per refresh of its inference model, and one more (the model it holds at the
    end, fetched for a training or a refresh the run cut short)."""
    return (int(counts.get("trainings", 0)) + int(counts.get("fetched_for_refresh", 0)) + 1)


def device_downlink_bytes(counts: Mapping[str, int]) -> int:
    """All bytes (topic + payload) one device received from the coordinator's topics."""
    return sum(int(v) for k, v in counts.items()
               if k.startswith("received_") and k.endswith("_bytes")
               and k[len("received_"):-len("_bytes")] in (*_DOWNLOADS, "template", "announce",
                                                          "ack"))


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {"median": 0.0, "p90": 0.0, "max": 0.0}
    median, p90, top = np.percentile(values, [50, 90, 100])
    return {"median": round(float(median), 1), "p90": round(float(p90), 1), "max": float(top)}


def summarize_per_device(devices: Mapping[str, Mapping[str, int]], *, published: int
                         ) -> dict[str, Any]:
    """summary.json's ``traffic.per_device``: each device's downlink against its own work.

    `devices` maps a device id to its counts (`SimDevice.downlink`), `published` is how many
    snapshots the coordinator published (its announcements). Median, p90 and max over devices
    of downlink bytes, snapshot downloads, announcements and acks received, trainings started,
    updates sent and refreshes; ``over_bound``: the devices whose snapshot downloads exceed
    trainings + refreshes + 1 (0 when models come on demand), the first few named; and what
    following every version would have cost a device (``follow_bytes``: published snapshots x
    the full snapshot's size; ``follow_compact_bytes`` with compact ones)."""
    rows = list(devices.values())

    def col(key: str) -> list[int]:
        return [int(r.get(key, 0)) for r in rows]

    downloads = [snapshot_downloads(r) for r in rows]
    down_bytes = [device_downlink_bytes(r) for r in rows]
    over = sorted((dev for dev, r in devices.items() if snapshot_downloads(r) > downlink_bound(r)))
    full = max(col("announced_snapshot_bytes"), default=0)
    compact = max(col("announced_weights_bytes"), default=0)
    median_bytes = _spread(down_bytes)["median"]
    follow = published * full
    return {
        "devices": len(rows),
        "snapshots_published": published,
        "downlink_bytes": _spread(down_bytes),
        "snapshot_downloads": _spread(downloads),
        "template_downloads": _spread(col("received_template_msgs")),
        "announcements": _spread(col("received_announce_msgs")),
        "acks": _spread(col("received_ack_msgs")),
        "trainings": _spread(col("trainings")),
        "updates_sent": _spread(col("updates_sent")),
        "refreshes": _spread(col("fetched_for_refresh")),
        "over_bound": len(over),
        "over_bound_devices": over[:10],
        "snapshot_bytes": full,
        "weights_bytes": compact,
        "follow_bytes": follow,
        "follow_compact_bytes": published * compact,
        "median_vs_follow": None if follow <= 0 else round(median_bytes / follow, 4),
    }


def per_device_line(per_device: Mapping[str, Any] | None) -> str:
    """One line of `summarize_per_device` for the end of a run."""
    if not per_device or not per_device.get("devices"):
        return "per device: -"
    b, s, t = (per_device["downlink_bytes"], per_device["snapshot_downloads"],
               per_device["trainings"])
    ratio = per_device.get("median_vs_follow")
    return (f"per device downlink median/p90/max {_kb(b['median'])}/{_kb(b['p90'])}/"
            f"{_kb(b['max'])}B; snapshots {s['median']:g}/{s['p90']:g}/{s['max']:g} of "
            f"{per_device['snapshots_published']} published"
            + ("" if ratio is None else f" ({ratio:.1%} of following every version)")
            + f"; trainings {t['median']:g}/{t['p90']:g}/{t['max']:g}, refreshes "
            f"{per_device['refreshes']['median']:g}/{per_device['refreshes']['max']:g} "
            f"(median/max); over trainings + refreshes + 1: {per_device['over_bound']} devices")
