"""Central DP at the coordinator: clipped contributions, noise calibrated to the largest share,
the per-device accountant (unit), and its figures in /status and `versions` (real Mosquitto)."""

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest

from fedasync_iot.coordinator._central_dp import (
    CentralDP,
    CentralDPConfig,
    central_epsilon,
    epsilon_by_version,
    noise_std,
    versions_per_device,
    with_central_dp,
)
from fedasync_iot.coordinator._config import CoordinatorConfig
from fedasync_iot.coordinator._rules import Contribution, FedAvgSync, FedBuff, Merge, RuleConfig
from fedasync_iot.coordinator._staleness import Staleness
from fedasync_iot.models import ConfigError, ModelSpec
from fedasync_iot.models.ml._dp import epsilon
from tests.helpers import update_bytes, wait_for

SPEC = ModelSpec(kind="logistic", n_features=4, classes=(0, 1, 2))
DP = CentralDPConfig(noise_multiplier=0.8, clip_norm=0.5, delta=1e-5, seed=7)


def contribution(device: str, delta, *, uid: str | None = None, n: int = 10) -> Contribution:
    return Contribution(update_id=uid or f"{device}-{np.random.default_rng().integers(1e9)}",
                        device_id=device, base_version=0, staleness=0, n_samples=n,
                        delta=np.asarray(delta, dtype=np.float32))


def fedbuff(k: int) -> FedBuff:
    return FedBuff(buffer_size=k, server_lr=0.5, staleness=Staleness(kind="constant"),
                   weight_by_samples=False)


def test_noise_follows_the_largest_device_share() -> None:
    d = np.zeros(3, dtype=np.float32)
    merge = Merge(params=d, included=(contribution("a", d, uid="1"), contribution("a", d, uid="2"),
                                      contribution("b", d, uid="3")),
                  weights=(0.25, 0.25, 0.5), scale=2.0)
    # a holds 0.25 + 0.25 and b 0.5: either moves the model by at most S x 2 x 0.5.
    assert noise_std(merge, DP) == pytest.approx(0.8 * 0.5 * 2.0 * 0.5)


def test_a_merge_is_the_clipped_mean_plus_seeded_gaussian_noise() -> None:
    model = np.zeros(4, dtype=np.float32)
    big, small = np.array([3.0, 4.0, 0, 0]), np.array([0, 0, 0.1, 0.2])  # norms 5 and 0.22
    rule = CentralDP(fedbuff(2), DP, rng=np.random.default_rng(1))
    assert rule.offer(model, contribution("a", big), now=0.0) is None
    merge = rule.offer(model, contribution("b", small), now=0.0)
    assert merge is not None

    clipped = big * (0.5 / 5.0)
    mean = 0.5 * (clipped + small) / 2  # server_lr x the mean of the clipped deltas
    sigma = 0.8 * 0.5 * 0.5 * 0.5  # z S scale (largest share 1/2)
    expected = mean + np.random.default_rng(1).normal(0.0, sigma, size=4)
    np.testing.assert_allclose(merge.params, expected.astype(np.float32), rtol=1e-6, atol=1e-7)
    assert rule.versions == {"a": 1, "b": 1}


def test_the_noise_has_the_calibrated_spread() -> None:
    model = np.zeros(200_000, dtype=np.float32)
    rule = CentralDP(FedAvgSync(cohort_size=4, deadline_s=60.0), DP)
    merge = None
    for i in range(4):
        merge = rule.offer(model, contribution(f"d{i}", np.zeros(model.size), n=10), now=0.0)
    assert merge is not None
    # Equal samples: each device's share is 1/4, scale 1.
    assert float(np.std(merge.params)) == pytest.approx(0.8 * 0.5 / 4, rel=0.01)


def test_restored_pending_updates_are_clipped_too() -> None:
    rule = CentralDP(fedbuff(2), DP, rng=np.random.default_rng(0))
    rule.restore([contribution("a", [30.0, 40.0, 0, 0], uid="p")], now=0.0)
    assert float(np.linalg.norm(rule.pending()[0].delta)) == pytest.approx(0.5, rel=1e-6)


def test_the_accountant_counts_versions_per_device() -> None:
    model = np.zeros(2, dtype=np.float32)
    rule = CentralDP(fedbuff(2), DP, versions={"a": 3})
    for uid, device in enumerate("abab"):
        rule.offer(model, contribution(device, [0.1, 0.1], uid=str(uid)), now=0.0)
    assert rule.versions == {"a": 5, "b": 2}
    assert rule.epsilon() == pytest.approx(epsilon([(0.8, 5)], 1e-5))
    status = rule.status()
    assert status["max_versions_per_device"] == 5 and status["mode"] == "central"
    assert status["epsilon"] == pytest.approx(central_epsilon({"a": 5, "b": 2}, DP), rel=1e-5)


def record(device: str, version: int | None, outcome: str = "accepted") -> SimpleNamespace:
    return SimpleNamespace(device_id=device, version=version, outcome=outcome)


def test_counts_and_epsilon_by_version_from_lineage() -> None:
    lineage = [record("a", 1), record("b", 1), record("a", 2), record("a", None, "buffered"),
               record("c", None, "rejected"), record("b", 3), record("a", 3)]
    assert versions_per_device(lineage) == {"a": 3, "b": 2}
    by_version = epsilon_by_version(lineage, DP)
    assert by_version == pytest.approx({v: epsilon([(0.8, v)], 1e-5) for v in (1, 2, 3)})
    rule = with_central_dp(fedbuff(2), DP, lambda: lineage)
    assert isinstance(rule, CentralDP) and rule.versions == {"a": 3, "b": 2}
    plain = fedbuff(2)
    assert with_central_dp(plain, CentralDPConfig(), lambda: lineage) is plain


def test_config_refuses_what_the_guarantee_does_not_cover() -> None:
    with pytest.raises(ConfigError, match="fedbuff or fedavg-sync"):
        CoordinatorConfig(model=SPEC, central_dp=DP)  # the default rule is FedAsync
    with pytest.raises(ConfigError, match="memory_s"):
        CoordinatorConfig(model=SPEC, rule=RuleConfig(name="fedbuff", memory_s=60.0),
                          central_dp=DP)
    with pytest.raises(ConfigError, match="clip_norm"):
        CentralDPConfig(noise_multiplier=1.0, clip_norm=0.0)
    CoordinatorConfig(model=SPEC, rule=RuleConfig(name="fedbuff"), central_dp=DP)
    CoordinatorConfig(model=SPEC, central_dp=CentralDPConfig())  # off: any rule


@pytest.mark.broker
def test_status_and_versions_report_the_coordinators_epsilon(broker, fleet_name, tmp_path,
                                                             capsys) -> None:
    from fedasync_iot.coordinator.cli import main
    from tests.test_coordinator_service import Device, N, make_service

    rule = RuleConfig(name="fedbuff", buffer_size=2, weight_by_samples=False)
    service = make_service(broker, fleet_name, tmp_path, rule=rule, central_dp=DP)
    a, b = Device(broker, fleet_name, "dev-a"), Device(broker, fleet_name, "dev-b")
    try:
        for base in range(3):  # dev-a in versions 1-3, dev-b in 1 and 2
            assert a.send(update_bytes(np.ones(N), device="dev-a", base_version=base)
                          ).status in ("accepted", "buffered")
            sender = b if base < 2 else a
            assert sender.send(update_bytes(np.ones(N), device=sender.name,
                                            base_version=base)).status == "accepted"
        assert wait_for(lambda: service.engine.version == 3)
        status = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{service.http_port}/status", timeout=30).read())
    finally:
        a.close()
        b.close()
        service.stop()
    expected = epsilon([(0.8, 3)], 1e-5)
    assert status["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-5)
    assert status["privacy"]["max_versions_per_device"] == 3

    config = tmp_path / "coordinator.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[rule]\nname = "fedbuff"\nbuffer_size = 2\n'
                      "[central_dp]\nnoise_multiplier = 0.8\nclip_norm = 0.5\n")
    assert main(["versions", "--config", str(config), "--json"]) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[3]["epsilon"] == pytest.approx(expected)
    assert rows[1]["epsilon"] == pytest.approx(epsilon([(0.8, 1)], 1e-5))
    assert "epsilon" not in rows[0] or rows[0]["epsilon"] is None
    assert main(["devices", "--config", str(config), "--json"]) == 0
    spent = {r["device_id"]: r["epsilon"] for r in json.loads(capsys.readouterr().out)["devices"]}
    assert spent == pytest.approx({"dev-a": expected, "dev-b": epsilon([(0.8, 2)], 1e-5)})
    assert main(["devices", "--config", str(config)]) == 0
    assert "epsilon" in capsys.readouterr().out.splitlines()[0]

    # Restarted, the coordinator counts from the lineage.
    again = make_service(broker, fleet_name, tmp_path, rule=rule, central_dp=DP)
    try:
        assert again.status()["privacy"]["max_versions_per_device"] == 3
    finally:
        again.stop()
