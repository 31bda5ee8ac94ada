"""The simulator's privacy flags and summary: real agents, coordinator and Mosquitto on the
virtual clock."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fedasync_iot.coordinator._central_dp import versions_per_device
from fedasync_iot.coordinator._store import Store
from fedasync_iot.fleet._fleets import build_fleet
from fedasync_iot.fleet._sim import SimConfig, run_rule
from fedasync_iot.fleet._traces import FleetProfile
from fedasync_iot.models import ConfigError
from fedasync_iot.models.ml._dp import epsilon
from tests.test_privacy import budget_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Fast devices, mostly on mains power: several updates each in a few seconds.
SMALL = replace(SimConfig(), devices=8, duration_s=3.0, scale=3000.0, workers=1, seed=5,
                profile=FleetProfile(speed_median_s=300.0, mains_fraction=0.6))


def lineage(out: Path):
    store = Store.open_readonly(out / "coordinator-state")
    try:
        return store.lineage()
    finally:
        store.close()


def test_local_budget_caps_every_device(tmp_path) -> None:
    budget = budget_for(2, sigma=8.0)
    config = replace(SMALL, noise_multiplier=8.0, clip_norm=1.0, epsilon_budget=budget)
    result = run_rule(config, "fedasync", tmp_path, fleet=build_fleet(config), progress=False)

    sent = Counter(r.device_id for r in lineage(tmp_path))
    assert sent and max(sent.values()) <= 2
    privacy = result.summary["privacy"]
    assert privacy["mode"] == "local" and privacy["epsilon_budget"] == budget
    assert privacy["devices_at_budget"] == sum(n == 2 for n in sent.values()) >= 1
    assert privacy["device_epsilon"]["max"] == pytest.approx(epsilon([(4.0, 2)], 1e-5),
                                                             rel=1e-4)


def test_central_dp_reports_the_coordinators_epsilon(tmp_path) -> None:
    config = replace(SMALL, central_noise_multiplier=1.0, central_clip_norm=0.5, fedbuff_k=2)
    result = run_rule(config, "fedbuff", tmp_path, fleet=build_fleet(config), progress=False)

    most = max(versions_per_device(lineage(tmp_path)).values())
    central = result.summary["privacy"]["central"]
    assert result.summary["privacy"]["mode"] == "central"
    assert central["max_versions_per_device"] == most >= 1
    assert central["epsilon"] == pytest.approx(epsilon([(1.0, most)], 1e-5), rel=1e-5)
    assert result.summary["rule_settings"]["weight_by_samples"] is False  # equal shares


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier > 0"):
        replace(SMALL, epsilon_budget=4.0)
    with pytest.raises(ConfigError, match="delta"):
        replace(SMALL, dp_delta=2.0)
