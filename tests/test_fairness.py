"""The simulator's fairness measurements: correlated availability, local test sets, summaries."""

from __future__ import annotations

import numpy as np
import pytest

from fedasync_iot.fleet._fairness import (
    constrained_devices,
    constrained_profile,
    dominant_labels,
    local_test_sets,
    participation_summary,
    worst_fraction_mean,
)
from fedasync_iot.fleet._traces import FleetProfile, generate_device


def part(*labels: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((len(labels), 2), dtype=np.float32), np.array(labels)


def test_constrained_devices_follow_their_dominant_label() -> None:
    parts = [part(0, 0, 1), part(2, 2, 0), part(1, 1, 2), part(0, 1)]
    assert dominant_labels(parts) == [0, 2, 1, 0]
    assert constrained_devices(parts, [0]) == [True, False, False, True]
    assert constrained_devices(parts, []) == [False] * 4


def test_a_constrained_device_is_a_slow_rare_charger() -> None:
    base = FleetProfile(n_devices=50, seed=1, duration_s=86_400.0 * 3)
    hard = constrained_profile(base, slowdown=3.0)
    plain = [generate_device(base, i) for i in range(50)]
    rare = [generate_device(hard, i) for i in range(50)]
    assert all(t.battery is not None for t in rare)
    charging = sum(t.charging.measure(0, 3 * 86_400) for t in plain if t.battery)
    assert sum(t.charging.measure(0, 3 * 86_400) for t in rare) < 0.5 * charging
    # Same per-device random stream: exactly 3x the compute cost.
    assert [t.epoch_s_per_100 for t in rare] == pytest.approx(
        [3 * t.epoch_s_per_100 for t in plain])


def test_local_test_sets_match_each_devices_label_mix_without_its_training_data() -> None:
    rng = np.random.default_rng(0)
    test_y = np.repeat(np.arange(3), 40)
    test = (rng.normal(size=(120, 2)).astype(np.float32), test_y)
    parts = [part(*([0] * 30 + [1] * 10)), part(*([2] * 5)), part(1, 2), part()]
    *sets, empty = local_test_sets(parts, test, size=20, seed=3)
    assert empty is None  # a device without data (more devices than samples) has no label mix
    assert [len(y) for _, y in sets] == [20, 20, 20]
    assert np.bincount(sets[0][1], minlength=3).tolist() == [15, 5, 0]
    assert set(sets[1][1].tolist()) == {2}
    assert np.bincount(sets[2][1], minlength=3).tolist() == [0, 10, 10]
    for X, _ in sets:  # rows really come from the test set, with their own labels
        rows = {tuple(r) for r in test[0].tolist()}
        assert all(tuple(r) in rows for r in X.tolist())
    again = local_test_sets(parts, test, size=20, seed=3)[:3]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(sets, again, strict=True))  # type: ignore[index]


def test_worst_fraction_and_participation_summary() -> None:
    assert worst_fraction_mean([0.9, 0.1, 0.5, 0.7] * 5, 0.1) == pytest.approx(0.1)
    assert worst_fraction_mean([0.3], 0.1) == 0.3
    s = participation_summary([0, 0, 2, 2, 8])
    assert s["devices_contributing"] == 3
    assert s["max_median_ratio"] == 4.0
    assert 0.5 < s["gini"] < 0.8
    assert participation_summary([3, 3, 3])["gini"] == 0.0


# -- in the simulator --------------------------------------------------------------------------


def test_rule_variants_parse_and_map_to_participation_settings() -> None:
    from fedasync_iot.fleet._sim import (
        SimConfig,
        fit_fraction,
        participation_config,
        rule_config,
        split_rule,
    )
    from fedasync_iot.models import ConfigError

    assert split_rule("fedbuff+reweight") == ("fedbuff", {"reweight"})
    assert split_rule("fedasync+plain+fit") == ("fedasync", {"plain", "fit"})
    assert split_rule("fedavg-sync") == ("fedavg-sync", set())
    for bad in ("fedbuff+magic", "fedavg-sync+cap", "nope", "fedasync+", "fedasync+fit+fit"):
        with pytest.raises(ConfigError, match="unknown rule"):
            split_rule(bad)
    config = SimConfig(scale=1000.0, participation_window_sim_s=7200.0, participation_cap=4)
    p = participation_config(config, "fedasync+cap")
    # The coordinator's default: reweighting decided by the rule (on for FedAsync).
    assert (p.window_s, p.cap, p.reweight) == (7.2, 4, None)
    assert p.for_rule("fedasync").reweight and not p.for_rule("fedbuff").reweight
    assert participation_config(config, "fedasync+plain").for_rule("fedasync").reweight is False
    assert participation_config(config, "fedasync+plain+reweight").reweight is True
    # Fitted work is the agents' default too: off with +plain, unless +fit names it again.
    assert [fit_fraction(config, r) for r in ("fedbuff", "fedavg-sync", "fedbuff+plain",
                                              "fedbuff+plain+fit")] == [0.5, 0.5, 0.0, 0.5]
    p = participation_config(config, "fedbuff+reweight")
    assert (p.cap, p.reweight) == (0, True)
    assert participation_config(config, "fedbuff") == participation_config(config, "fedasync")
    assert rule_config(config, "fedbuff+reweight") == rule_config(config, "fedbuff")


def test_correlated_fleet_changes_only_the_constrained_devices() -> None:
    from dataclasses import replace

    from fedasync_iot.fleet import build_fleet
    from fedasync_iot.fleet._sim import SimConfig

    plain = build_fleet(SimConfig(devices=30, seed=2))
    tied = build_fleet(replace(SimConfig(devices=30, seed=2), correlate_labels=(0, 1, 2)))
    assert tied.constrained == constrained_devices(tied.parts, [0, 1, 2])
    assert 0 < sum(tied.constrained) < 30
    for c, a, b in zip(tied.constrained, plain.traces, tied.traces, strict=True):
        assert (a == b) != c  # same trace unless constrained
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(plain.parts, tied.parts, strict=True))
    assert len(tied.local_tests) == 30 and all(t is not None and len(t[1]) == 50
                                               for t in tied.local_tests)


def test_correlation_needs_the_synthetic_fleet() -> None:
    from fedasync_iot.fleet._sim import SimConfig
    from fedasync_iot.models import ConfigError

    with pytest.raises(ConfigError, match="correlate_labels"):
        SimConfig(correlate_labels=(1,), fleet_file="examples/fleet/fleet.toml")


@pytest.mark.broker
@pytest.mark.slow
def test_a_capped_run_holds_every_device_to_the_cap_and_agents_back_off(broker, tmp_path
                                                                        ) -> None:
    """Checked on the coordinator's lineage, with what the run guarantees however fast the
    machine is: the cap holds in every window, and an agent told `retry_after_s` trains no more
    until then. How many updates a run of fixed wall length holds does depend on the machine;
    the fleet is sized so that a starved one still has several times the demand the cap allows:
    sim time runs at 1000x (a 1 s stall is 17 sim minutes, not the hour it was at 3000x), every
    device is always eligible (mains, Wi-Fi, never busy, never leaving), and its compute time,
    1300-2800 sim s, makes it try 3-5 times per 2-hour window against a cap of 2."""
    from dataclasses import replace

    from fedasync_iot.fleet import build_fleet
    from fedasync_iot.fleet._sim import SimConfig, run_rule

    profile = FleetProfile(speed_median_s=300.0, mains_fraction=1.0, cellular_fraction=0.0,
                           late_join_fraction=0.0, early_leave_fraction=0.0, flap_fraction=0.0,
                           wifi_on_mean_s=1e12, wifi_off_mean_s=1.0,
                           busy_mean_s=1.0, idle_mean_s=1e12)
    window, cap = 7200.0, 2
    config = replace(SimConfig(), devices=6, duration_s=18.0, scale=1000.0, broker=broker.url,
                     workers=1, profile=profile, participation_window_sim_s=window,
                     participation_cap=cap)
    result = run_rule(config, "fedasync+cap", tmp_path, fleet=build_fleet(config),
                      progress=False)

    arrivals = result.arrivals
    capped = [a for a in arrivals if a.reason == "participation_cap"]
    assert capped, "an always-available fleet must hit a cap of 2 per 2 sim hours"
    for device in {a.device_id for a in arrivals}:
        mine = sorted((a for a in arrivals if a.device_id == device), key=lambda a: a.sim_s)
        taken = [a.sim_s for a in mine if a.outcome != "rejected"]
        # Never more than `cap` updates in any window (1 ms of slack for rounding): the cap
        # counts arrival times, the ones lineage records.
        assert all(t2 - t1 >= window - 1e-3 * config.scale
                   for t1, t2 in zip(taken, taken[cap:], strict=False)), (device, taken)
        # Backing off: between two updates taken, at most two refusals, the one that brought
        # retry_after_s and one already in training when it came back. An agent that ignored
        # retry_after_s would be refused at every new model until the window let it in.
        gaps = [sum(1 for a in mine if a.reason == "participation_cap" and t1 < a.sim_s < t2)
                for t1, t2 in zip(taken, [*taken[1:], float("inf")], strict=True)]
        assert max(gaps) <= 2, (device, [(round(a.sim_s), a.outcome) for a in mine])
        refused = sum(1 for a in capped if a.device_id == device)
        assert refused <= 2 * (config.duration_sim_s / window + 1), (device, refused)
    p = result.summary["participation"]
    assert p["devices_contributing"] == 6 and 0 <= p["gini"] < 0.5
    assert result.summary["local_accuracy"]["n_devices"] == 6
