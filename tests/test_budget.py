"""Local work fitted to a device's eligible windows (agent/_budget.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._budget import MIN_FITTED_SAMPLES, MIN_WINDOWS, WorkBudget, fit_work
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.agent._readings import Readings, StaticReader
from fedasync_iot.agent._trainer import TrainConfig
from fedasync_iot.models import ConfigError, ModelSpec, Snapshot, UpdateMessage


def test_work_that_fits_is_left_alone() -> None:
    assert fit_work(100, 2, budget_s=300.0, cost_s=1.0) == (100, 2)


def test_epochs_go_first_then_samples() -> None:
    assert fit_work(100, 4, budget_s=250.0, cost_s=1.0) == (100, 2)
    assert fit_work(100, 4, budget_s=60.0, cost_s=1.0) == (60, 1)
    # Never fewer than a handful of samples, however short the window.
    assert fit_work(100, 4, budget_s=1.0, cost_s=1.0) == (MIN_FITTED_SAMPLES, 1)
    assert fit_work(5, 4, budget_s=1.0, cost_s=1.0) == (5, 1)


def _seen(budget: WorkBudget, windows: list[float]) -> None:
    t = 0.0
    for w in windows:
        budget.observe(True, t)
        budget.observe(True, t + w / 2)  # still eligible: the same window
        budget.observe(False, t + w)
        t += w + 100.0


def test_full_work_until_enough_is_known() -> None:
    budget = WorkBudget(0.5)
    assert budget.fit(100, 2) == (100, 2)  # nothing known
    budget.trained(100, 2, elapsed_s=200.0)  # 1 s per sample-epoch
    _seen(budget, [60.0] * (MIN_WINDOWS - 1))
    assert budget.fit(100, 2) == (100, 2)  # too few windows seen end
    _seen(budget, [60.0])
    assert budget.fit(100, 2) == (30, 1)  # half of a 60 s window


def test_the_median_window_and_a_smoothed_cost_decide() -> None:
    budget = WorkBudget(0.5)
    _seen(budget, [40.0, 400.0, 400.0, 10_000.0])
    budget.trained(50, 1, elapsed_s=50.0)
    budget.trained(50, 1, elapsed_s=150.0)  # slower now: 1 and 3 s, smoothed to 2 s
    assert budget.cost_s == pytest.approx(2.0)
    # Median window 400 s, half of it 200 s, at 2 s a sample-epoch: 100 sample-epochs.
    assert budget.fit(50, 2) == (50, 2)
    assert budget.fit(80, 2) == (80, 1)
    assert budget.fit(300, 2) == (100, 1)


def test_off_and_always_eligible_devices_do_the_full_work() -> None:
    off = WorkBudget(0.0)
    _seen(off, [10.0] * 5)
    off.trained(100, 1, elapsed_s=1000.0)
    assert off.fit(100, 2) == (100, 2)
    plugged_in = WorkBudget(0.5)
    plugged_in.observe(True, 0.0)
    plugged_in.observe(True, 1e6)  # a window that never closes is not a short one
    plugged_in.trained(100, 1, elapsed_s=1000.0)
    assert plugged_in.fit(100, 2) == (100, 2)


def test_a_training_that_took_no_time_teaches_nothing() -> None:
    budget = WorkBudget(0.5)
    budget.trained(100, 1, elapsed_s=0.0)
    budget.trained(0, 1, elapsed_s=5.0)
    assert budget.cost_s is None


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_window_fraction_is_checked(bad: float) -> None:
    with pytest.raises(ConfigError, match="window_fraction"):
        TrainConfig(window_fraction=bad)


def test_an_agent_trains_on_the_fitted_work_and_learns_its_speed(tmp_path: Path) -> None:
    """Through the agent: a subset of its samples, one epoch, recorded in `last_work`; the
    elapsed time from training to delivery teaches it its cost."""
    class Offline:
        connected = False

        def publish(self, *a: object, **k: object) -> None:
            pass

    class Data:
        def load(self) -> tuple[np.ndarray, np.ndarray]:
            return np.arange(200, dtype=np.float32).reshape(100, 2), np.arange(100) % 2

    seen: dict[str, object] = {}

    def trainer(snapshot: Snapshot, X: np.ndarray, y: np.ndarray, *, config: TrainConfig,
                **kw: object) -> UpdateMessage:
        seen.update(rows=X[:, 0] / 2, epochs=config.local_epochs)
        return UpdateMessage(device_id="pi-1", update_id=f"u{len(seen)}", base_version=0,
                             n_samples=len(X), delta=np.zeros(3, np.float32), created_at=0.0)

    readings = Readings(battery_percent=None, charging=None, interfaces_up=("eth0",),
                        cpu_percent=1.0, mem_available_mb=1000.0, temperature_c=None,
                        local_minutes=600, taken_at=time.time())
    now = [0.0]
    agent = Agent(AgentConfig(device_id="pi-1", state_dir=str(tmp_path), min_new_samples=0,
                              policy=PolicyConfig(min_dwell_s=0.0),
                              training=TrainConfig(local_epochs=2, window_fraction=0.5)),
                  link=Offline(), reader=StaticReader(readings), data=Data(), trainer=trainer,
                  monotonic=lambda: now[0], rng=np.random.default_rng(0))
    spec = ModelSpec(kind="logistic", n_features=2, classes=(0, 1))
    agent.snapshot = Snapshot(version=0, spec=spec, weights=np.zeros(3, np.float32), onnx=b"",
                              created_at=0.0)
    update = agent.prepare_update()
    assert update is not None and agent.last_work == (100, 2)  # nothing known yet
    now[0] += 200.0  # delivered 200 s later: 1 s per sample-epoch
    agent.deliver(update)
    assert agent.budget.cost_s == pytest.approx(1.0)
    _seen(agent.budget, [60.0] * MIN_WINDOWS)

    update = agent.prepare_update()

    assert update is not None and agent.last_work == (30, 1) and update.n_samples == 30
    assert seen["epochs"] == 1
    rows = np.asarray(seen["rows"])
    assert len(set(rows.tolist())) == 30 and set(rows.tolist()) <= set(range(100))
