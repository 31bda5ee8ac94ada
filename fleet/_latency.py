"""Update-to-ack latency of a wall-clock run, counted at the devices: from handing an update to
the MQTT client to receiving its end-to-end ack, in log-spaced buckets that add up across
devices and workers (a worker's report is a flat dict of counts), read back as percentiles.
The coordinator's own part (arrival to ack) comes from its Prometheus histogram, read the same
way (`histogram_counts`).

Ten buckets a decade from 1 ms to 100 s: a percentile is the upper edge of its bucket, at most
26% above the true value. An update resent after a reconnect is not counted (its wait is the
outage, not the coordinator).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from typing import Any

PREFIX = "ack_ms_le_"
# Upper edges, ms: 1, 1.26, 1.58, ..., 100,000; a last bucket above.
EDGES_MS = tuple(round(10 ** (i / 10), 3) for i in range(0, 51))


def bucket(latency_ms: float) -> str:
    """The count key of a latency."""
    i = bisect.bisect_left(EDGES_MS, latency_ms)
    return f"{PREFIX}{EDGES_MS[i]:g}" if i < len(EDGES_MS) else f"{PREFIX}inf"


def percentiles(counts: Mapping[str, int], qs: tuple[float, ...] = (50, 90, 99)
                ) -> dict[str, float | int] | None:
    """``{"n": acks, "p50": ms, ...}`` from the summed bucket counts, None if there are none."""
    hist = sorted((math.inf if k == f"{PREFIX}inf" else float(k.removeprefix(PREFIX)), v)
                  for k, v in counts.items() if k.startswith(PREFIX) and v > 0)
    n = sum(v for _, v in hist)
    if n == 0:
        return None
    out: dict[str, float | int] = {"n": n}
    for q in qs:
        rank, seen = math.ceil(q / 100 * n), 0
        for edge, v in hist:
            seen += v
            if seen >= rank:
                out[f"p{q:g}"] = edge
                break
    return out


def histogram_counts(histogram: Any) -> dict[str, int]:
    """A prometheus_client Histogram (seconds) as bucket counts for `percentiles`."""
    counts: dict[str, int] = {}
    below = 0.0
    for metric in histogram.collect():
        for sample in metric.samples:
            if not sample.name.endswith("_bucket"):
                continue
            le = float(sample.labels["le"])
            key = f"{PREFIX}inf" if math.isinf(le) else f"{PREFIX}{le * 1000:g}"
            counts[key] = int(sample.value - below)  # cumulative in Prometheus
            below = sample.value
    return counts
