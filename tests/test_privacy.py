"""The privacy accountant against published values, and the device's durable ledger (unit)."""

from __future__ import annotations

import json
import logging
import math

import pytest

from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._privacy import (
    LEDGER_FILE,
    PrivacyConfig,
    PrivacyLedger,
    account_here,
    account_in_child,
    device_multiplier,
)
from fedasync_iot.agent._trainer import TrainConfig
from fedasync_iot.models import ConfigError, FedAsyncError
from fedasync_iot.models.ml._dp import epsilon

DELTA = 1e-5


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism with sensitivity / sigma = mu at `delta`
    (Balle & Wang 2018, Theorem 8): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu),
    decreasing in eps; solved by bisection. T compositions of noise multiplier z are exactly the
    Gaussian mechanism with mu = sqrt(T) / z (Dong, Roth, Su 2019, Corollary 3.3)."""
    def delta_at(eps: float) -> float:
        return _phi(mu / 2 - eps / mu) - math.exp(eps) * _phi(-mu / 2 - eps / mu)

    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z", [0.8, 1.0, 2.0, 5.0])
def test_one_gaussian_step_is_sound_and_near_the_exact_closed_form(z) -> None:
    exact = exact_gaussian_epsilon(1 / z, DELTA)
    accounted = epsilon([(z, 1)], DELTA)
    # RDP's conversion to (epsilon, delta) is an upper bound: never below the exact figure,
    # and for one step within 30% of it.
    assert exact <= accounted <= 1.3 * exact


def test_one_step_is_within_the_classic_bound() -> None:
    """Dwork & Roth 2014, Theorem A.1: sigma = sqrt(2 ln(1.25/delta)) / eps gives (eps, delta)
    for eps < 1; the accountant must not report more for that sigma."""
    for eps in (0.5, 0.9):
        z = math.sqrt(2 * math.log(1.25 / DELTA)) / eps
        assert epsilon([(z, 1)], DELTA) <= eps


def test_composition_matches_the_exact_gaussian_composition() -> None:
    # 100 releases at z = 2: exactly the Gaussian mechanism with mu = 5 (epsilon 33.1).
    exact = exact_gaussian_epsilon(math.sqrt(100) / 2, DELTA)
    assert exact == pytest.approx(33.1, abs=0.1)
    assert exact <= epsilon([(2.0, 100)], DELTA) <= 1.08 * exact
    # Mixed noise composes as one Gaussian with mu^2 summed.
    mixed = epsilon([(1.0, 10), (2.0, 40)], DELTA)
    exact_mixed = exact_gaussian_epsilon(math.sqrt(10 / 1 + 40 / 4), DELTA)
    assert exact_mixed <= mixed <= 1.1 * exact_mixed


def test_subsampled_gaussian_matches_abadi_et_al() -> None:
    """Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, delta = 1e-5, 10,000 steps: the
    moments accountant gives epsilon 1.26 (strong composition 9.34). RDP with the tighter
    conversion the library uses must give at most that, and not much less."""
    accounted = epsilon([(4.0, 10_000)], DELTA, sampling_rate=0.01)
    assert 0.9 <= accounted <= 1.26


def test_trivial_compositions() -> None:
    assert epsilon([], DELTA) == 0.0
    assert epsilon([(1.0, 0)], DELTA) == 0.0
    assert epsilon([(0.0, 1), (2.0, 3)], DELTA) == math.inf
    with pytest.raises(ConfigError, match="delta"):
        epsilon([(1.0, 1)], 0.0)


def test_the_child_process_accountant_agrees() -> None:
    steps = [(1.5, 7), (3.0, 2)]
    assert account_in_child(steps, DELTA) == pytest.approx(account_here(steps, DELTA))
    assert account_in_child([(0.0, 1)], DELTA) == math.inf


def test_device_level_sensitivity_halves_the_multiplier() -> None:
    # Two datasets give clipped updates anywhere in the same C-ball: sensitivity 2C.
    assert device_multiplier(4.0) == 2.0


# -- the ledger ------------------------------------------------------------------------------

class Counting:
    """The real accountant, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, mechanisms, delta) -> float:
        self.calls += 1
        return account_here(mechanisms, delta)


def budget_for(n: int, *, sigma: float) -> float:
    """A budget that lets exactly `n` updates at noise multiplier `sigma` through."""
    z = device_multiplier(sigma)
    return (epsilon([(z, n)], DELTA) + epsilon([(z, n + 1)], DELTA)) / 2


def test_the_budget_lets_exactly_its_updates_through(tmp_path) -> None:
    config = PrivacyConfig(epsilon_budget=budget_for(3, sigma=4.0), delta=DELTA)
    ledger = PrivacyLedger(tmp_path, config, noise_multiplier=4.0)
    sent = 0
    while ledger.allows_next():
        ledger.record()
        sent += 1
    assert sent == 3
    status = ledger.status()
    assert status["exhausted"] and status["updates"] == 3
    assert status["epsilon_spent"] == pytest.approx(epsilon([(2.0, 3)], DELTA), rel=1e-5)
    assert status["epsilon_spent"] <= config.epsilon_budget < status["next_epsilon"]
    row, why = ledger.check()
    assert not row.passed and row.name == "privacy" and "no more updates" in why


def test_the_ledger_is_durable_and_continues_across_settings(tmp_path) -> None:
    config = PrivacyConfig(delta=DELTA)
    first = PrivacyLedger(tmp_path, config, noise_multiplier=2.0)
    for _ in range(4):
        first.record()
    doc = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert doc["releases"] == [[1.0, 4]]

    # Restarted: the cached figures are used, the accountant is not asked.
    counting = Counting()
    again = PrivacyLedger(tmp_path, config, noise_multiplier=2.0, accountant=counting)
    assert counting.calls == 0 and again.count == 4
    assert again.spent == pytest.approx(first.spent, rel=1e-5)

    # A new noise setting continues the same count: the earlier releases still count.
    louder = PrivacyLedger(tmp_path, config, noise_multiplier=6.0, accountant=counting)
    louder.record()
    assert counting.calls > 0
    assert louder.count == 5
    assert louder.spent == pytest.approx(epsilon([(1.0, 4), (3.0, 1)], DELTA))


def test_updates_without_noise_make_the_loss_unbounded(tmp_path) -> None:
    ledger = PrivacyLedger(tmp_path, PrivacyConfig(), noise_multiplier=0.0)
    assert ledger.spent == 0.0 and ledger.allows_next()  # no budget: counted, never enforced
    ledger.record()
    status = ledger.status()
    assert status["epsilon_spent"] is None and status["bounded"] is False
    json.dumps(status, allow_nan=False)  # what the agent publishes stays valid JSON
    # and a budget set later cannot be met by this device's history
    later = PrivacyLedger(tmp_path, PrivacyConfig(epsilon_budget=100.0), noise_multiplier=4.0)
    assert not later.allows_next()


def test_an_unreadable_ledger_stops_sending_and_is_never_overwritten(tmp_path, caplog) -> None:
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="fedasync.agent.privacy"):
        ledger = PrivacyLedger(tmp_path, PrivacyConfig(epsilon_budget=8.0),
                               noise_multiplier=4.0)
    assert "not a privacy ledger" in caplog.text
    assert not ledger.allows_next()
    assert ledger.status()["error"] is not None and ledger.status()["exhausted"]
    ledger.record()
    assert (tmp_path / LEDGER_FILE).read_text() == "{not json"


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="epsilon_budget"):
        PrivacyConfig(epsilon_budget=0.0)
    with pytest.raises(ConfigError, match="delta"):
        PrivacyConfig(delta=1.0)
    with pytest.raises(ConfigError, match="noise_multiplier > 0"):
        AgentConfig(device_id="pi-1", privacy=PrivacyConfig(epsilon_budget=4.0))
    AgentConfig(device_id="pi-1", privacy=PrivacyConfig(epsilon_budget=4.0),
                training=TrainConfig(noise_multiplier=1.0))


def test_check_command_shows_the_spent_budget(tmp_path, capsys) -> None:
    from fedasync_iot.agent.cli import main

    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n'
                      "[training]\nnoise_multiplier = 4.0\n"
                      f"[privacy]\nepsilon_budget = {budget_for(2, sigma=4.0)}\ndelta = {DELTA}\n")
    (tmp_path / "state").mkdir()
    ledger = PrivacyLedger(tmp_path / "state", PrivacyConfig(delta=DELTA), noise_multiplier=4.0)
    ledger.record()

    assert main(["--config", str(config), "check", "--json"]) in (0, 1)
    row = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "privacy")
    assert row["passed"] and "over 1 update(s)" in row["reading"]

    ledger.record()
    assert main(["--config", str(config), "check", "--json"]) == 1
    decision = json.loads(capsys.readouterr().out)
    row = next(c for c in decision["checks"] if c["name"] == "privacy")
    assert not row["passed"] and "over 2 update(s)" in row["reading"]
    assert "privacy budget spent" in decision["reason"]

    assert main(["--config", str(config), "status"]) == 0
    privacy = json.loads(capsys.readouterr().out)["privacy"]
    assert privacy["updates"] == 2 and privacy["exhausted"]


def test_the_benchmarks_calibration_finds_the_least_noise() -> None:
    from fedasync_iot.bench.privacy import central_z, local_sigma

    sigma = local_sigma(8.0, 20)
    assert epsilon([(sigma / 2, 20)], DELTA) <= 8.0 < epsilon([(0.99 * sigma / 2, 20)], DELTA)
    z = central_z(2.0, 50)
    assert epsilon([(z, 50)], DELTA) <= 2.0 < epsilon([(0.99 * z, 50)], DELTA)


def test_an_accountant_that_fails_stops_sending_under_a_budget(tmp_path, caplog) -> None:
    """A fault a real accountant does not produce on demand: its child process failing."""
    def failing(mechanisms, delta) -> float:
        raise FedAsyncError("privacy accountant failed (1): ImportError")

    config = PrivacyConfig(epsilon_budget=8.0)
    with caplog.at_level(logging.WARNING, logger="fedasync.agent.privacy"):
        ledger = PrivacyLedger(tmp_path, config, noise_multiplier=4.0, accountant=failing)
        assert not ledger.allows_next()
    assert "ImportError" in caplog.text and "could not say" in caplog.text
    assert ledger.status()["exhausted"] and ledger.status()["epsilon_spent"] is None
    # Without a budget nothing is enforced: the update goes, and is counted.
    free = PrivacyLedger(tmp_path, PrivacyConfig(), noise_multiplier=4.0, accountant=failing)
    assert free.allows_next()
    free.record()
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["releases"] == [[2.0, 1]]
