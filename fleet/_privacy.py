"""The privacy a simulated run gave: the summary's ``privacy`` object.

Local DP figures come from each device's own ledger (`<state>/<device>/privacy.json`, written
by the real agent code, agent/_privacy.py); the coordinator's from its central-DP accountant
(coordinator/_central_dp.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedasync_iot.agent import PrivacyConfig, PrivacyLedger
from fedasync_iot.coordinator import CentralDPConfig


def privacy_summary(*, local: PrivacyConfig, noise_multiplier: float, clip_norm: float,
                    central: CentralDPConfig, central_status: dict[str, Any] | None,
                    device_dirs: Sequence[Path]) -> dict[str, Any]:
    """mode, settings, each device's epsilon (median and max over all devices; a device that
    sent nothing spent 0), the devices that reached their budget, the coordinator's epsilon."""
    modes = [m for m, on in (("local", noise_multiplier > 0), ("central", central.enabled)) if on]
    spent: list[float] = []
    at_budget = 0
    for d in device_dirs:
        ledger = PrivacyLedger(d, local, noise_multiplier=noise_multiplier)
        spent.append(math.inf if ledger.spent is None else ledger.spent)
        at_budget += ledger.exhausted
    finite = all(math.isfinite(s) for s in spent)
    return {
        "mode": "+".join(modes) or "none",
        "noise_multiplier": noise_multiplier,
        "clip_norm": clip_norm,
        "delta": local.delta,
        "epsilon_budget": local.epsilon_budget,
        # null when some device sent an update without noise (its epsilon is unbounded)
        "device_epsilon": {"median": _round(float(np.median(spent))) if spent and finite
                           else None,
                           "max": _round(max(spent)) if spent and finite else None},
        "devices_at_budget": at_budget,
        "central": central_status if central.enabled else None,
    }


def _round(value: float) -> float:
    return round(value, 4)
