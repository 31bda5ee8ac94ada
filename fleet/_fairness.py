"""What the participation bias does to the devices, measured: availability that correlates with
data, per-device local test sets, and the fleet's participation over a run. Pure functions.

Why a correlated fleet: with availability independent of data, the frequent devices hold the
same mix of labels as the rare ones and the bias costs little. In a real fleet it is not
independent (the sites that are rarely plugged in are a kind of site, with their own data), and
that is where an uncorrected asynchronous model fails the rare devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fedasync_iot.coordinator import gini, max_median_ratio
from fedasync_iot.fleet._traces import FleetProfile

XY = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


def dominant_labels(parts: Sequence[XY]) -> list[Any]:
    """Each device's most common training label (ties: the smallest)."""
    out = []
    for _, y in parts:
        values, counts = np.unique(y, return_counts=True)
        out.append(values[int(np.argmax(counts))] if len(values) else None)
    return out


def constrained_devices(parts: Sequence[XY], labels: Sequence[Any]) -> list[bool]:
    """True for the devices whose most common label is one of `labels`."""
    wanted = set(np.asarray(labels).tolist())
    return [d is not None and np.asarray(d).item() in wanted for d in dominant_labels(parts)]


def constrained_profile(profile: FleetProfile, *, slowdown: float = 3.0) -> FleetProfile:
    """The availability of a constrained device: battery-powered, a rare charger (plugged in on
    one night in five, never by day) and `slowdown` times slower (older hardware)."""
    return replace(profile, mains_fraction=0.0, rare_charger_fraction=1.0,
                   speed_median_s=profile.speed_median_s * slowdown)


def local_test_sets(parts: Sequence[XY], test: XY, *, size: int = 50,
                    seed: int = 0) -> list[XY | None]:
    """For each device, `size` held-out samples with its own label mix: what "accuracy for this
    device" means when the device keeps no test data of its own. Drawn from the shared test set
    (never from training data), per label in proportion to the device's training labels. None
    for a device without training data (a fleet larger than the dataset has some): it has no
    label mix to be judged on."""
    X, y = test
    by_label = {label: np.flatnonzero(y == label) for label in np.unique(y)}
    out: list[XY | None] = []
    for i, (_, y_train) in enumerate(parts):
        if len(y_train) == 0:
            out.append(None)
            continue
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, 7)))
        values, counts = np.unique(y_train, return_counts=True)
        share = counts / counts.sum()
        take = np.floor(share * size).astype(int)
        take[np.argsort(-(share * size - take))[:size - take.sum()]] += 1  # largest remainders
        idx = [rng.choice(by_label[v], size=k, replace=k > len(by_label[v]))
               for v, k in zip(values.tolist(), take.tolist(), strict=True)
               if k and v in by_label]
        chosen = np.concatenate(idx) if idx else np.zeros(0, dtype=int)
        out.append((X[chosen], y[chosen]))
    return out


def worst_fraction_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the lowest `fraction` of the values (at least one)."""
    if not values:
        raise ValueError("no values")
    k = max(1, math.ceil(fraction * len(values)))
    return float(np.mean(sorted(values)[:k]))


def participation_summary(counts: Sequence[int]) -> dict[str, float | int]:
    """Updates merged per device over a run (every device of the fleet, silent ones as 0)."""
    ratio = max_median_ratio(counts)
    return {"gini": round(gini(counts), 4),
            "devices_contributing": sum(1 for c in counts if c > 0),
            "max_median_ratio": 0.0 if ratio is None else round(ratio, 3)}
