"""One simulated fleet run: broker, the real coordinator, worker processes of simulated devices,
a metrics sampler and a progress line; then outputs (metrics.csv, summary.json).

Everything is seeded: the same `SimConfig` gives the same devices, data and traces, so runs of
different rules are a fair comparison (docs/architecture.md, "Benchmark method"). With
``fleet_file`` set, the devices, data and traces come from a user's fleet file instead
(`fleet._fleetfile`).

The held-out metric is accuracy for the classifiers and R^2 for the ``linear`` regressor
(`metric_of`): both are "higher is better", so time to target, plots and summaries share one
code path, and summary.json names the metric it reports.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fedasync_iot.agent import PolicyConfig, PrivacyConfig, Session, TrainConfig
from fedasync_iot.coordinator import (
    CentralDPConfig,
    CoordinatorConfig,
    CoordinatorService,
    GuardConfig,
    ParticipationConfig,
    RuleConfig,
    SnapshotConfig,
    Stepped,
    privacy_status,
)
from fedasync_iot.fleet._broker import (
    EmbeddedBroker,
    MosquittoBroker,
    diff_counters,
    raise_fd_limit,
    read_sys_counters,
    start_broker,
)
from fedasync_iot.fleet._fairness import (
    XY,
    constrained_devices,
    constrained_profile,
    local_test_sets,
    participation_summary,
    worst_fraction_mean,
)
from fedasync_iot.fleet._latency import PREFIX as ACK_PREFIX
from fedasync_iot.fleet._latency import histogram_counts
from fedasync_iot.fleet._latency import percentiles as ack_percentiles
from fedasync_iot.fleet._privacy import privacy_summary
from fedasync_iot.fleet._traces import (
    DeviceTrace,
    FleetProfile,
    _int,
    _num,
    generate_device,
    summarize,
)
from fedasync_iot.fleet._traffic import (
    TrafficCounter,
    device_downlink_bytes,
    downlink_bound,
    snapshot_downloads,
    summarize_per_device,
    summarize_traffic,
)
from fedasync_iot.fleet._virtual import EPOCH, Controller, VirtualClock
from fedasync_iot.fleet._worker import DEVICE_PREFIX, WorkerSpec, run_virtual_worker, run_worker
from fedasync_iot.models import (
    ConfigError,
    Dataset,
    ModelSpec,
    broker_urls,
    build_model,
    dirichlet_partition,
    load_digits,
    make_synthetic,
)

if TYPE_CHECKING:
    from fedasync_iot.models import ModelAdapter

log = logging.getLogger("fedasync.fleet")

RULES = ("fedasync", "fedbuff", "fedavg-sync")
# An existing broker (`broker`) must be a Mosquitto too, whose max_inflight_messages no phase
# of the run fills (the markers would overtake messages it holds back).
_VIRTUAL_NEEDS_MOSQUITTO = ("the virtual clock needs Mosquitto (it relies on Mosquitto's "
                            "ordering of each connection's messages): install it (apt-get "
                            "install mosquitto), or use clock = wall (--clock wall)")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """A simulated fleet. Times are seconds of the run's clock (the wall clock, or the virtual
    clock's wall: sim seconds / scale) unless named ``*_sim_s`` (sim seconds)."""

    devices: int = 50
    seed: int = 0
    duration_s: float = 45.0  # per rule, on the run's clock
    scale: float = 960.0  # sim seconds per wall second (12 sim hours in 45 s)
    dataset: str = "digits"  # digits | synthetic; ignored with a fleet file
    model: str = "logistic"  # logistic | mlp | linear (linear: fleet files only)
    learning_rate: float = 0.05
    local_epochs: int = 2
    batch_size: int = 32
    hidden: tuple[int, ...] = (32,)  # mlp only
    l2: float = 1e-4
    # A user's own fleet (fleet/_fleetfile.py) instead of the synthetic one, and the held-out
    # test file for the coordinator's evaluation (None: the devices' test files together).
    fleet_file: str | None = None
    test_file: str | None = None
    encoding: str = "float32"
    dirichlet_alpha: float = 0.5
    check_interval_sim_s: float = 120.0  # the agents' poll
    min_train_interval_sim_s: float = 0.0  # the agents' least time between two trainings
    # The agents' model_refresh_s (sim s): how old their inference model may grow before they
    # fetch a newer one without training; 0 follows every version (every snapshot published).
    model_refresh_sim_s: float = 3600.0
    # The coordinator's snapshots.min_interval_s (wall s). None: its own default, 1 s, on the
    # simulated clock, but at least 0.05 wall s (`snapshot_wall_s`). A fixed 0.5 wall s was 8
    # simulated minutes between snapshots at 960x, and FedAsync trained from models that old
    # (time to 0.85 on the default fleet, seed 1: 18.1 s at 0.5 s, 6.7 s at 0.05 s).
    snapshot_interval_s: float | None = None
    workers: int = 0  # 0: one per core, less one for the coordinator, at least 1
    # "virtual": time moves when the system is quiescent, the same seed gives the same run at
    # any load (fleet/_virtual.py); "wall": the wall clock compressed by `scale`, for live demos
    # and soak tests.
    clock: str = "virtual"
    # The devices' MQTT sessions (the agent's `session`): "sessionless" or "persistent".
    session: Session = "sessionless"
    broker: str | None = None  # URL of an existing broker; None: start one
    broker_kind: str = "auto"  # auto | mosquitto | embedded
    profile: FleetProfile = field(default_factory=lambda: FleetProfile(speed_median_s=1200.0))
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig(min_dwell_s=300.0))
    # Rule settings: the best of `fedasync-sim tune --seed 100` (a seed not reported), which
    # are also the coordinator's defaults. staleness None: the coordinator's default for each
    # rule (coordinator/_rules.py default_staleness).
    fedasync_alpha: float = 0.6
    fedbuff_k: int = 5
    fedbuff_server_lr: float = 1.0
    staleness: str | None = None
    cohort_size: int = 5
    over_selection: float = 1.3
    round_deadline_sim_s: float = 1800.0
    target_accuracy: float = 0.85  # of the model's metric: accuracy, or R^2 for linear
    # Availability correlated with data (synthetic fleet): the devices whose most common label
    # is one of these are slow rare chargers (fleet/_fairness.py).
    correlate_labels: tuple[int, ...] = ()
    constrained_slowdown: float = 3.0
    local_test_size: int = 50  # per-device test samples with the device's label mix
    # The participation corrections (reweighting: FedAsync's default; "<rule>+cap" variants).
    participation_window_sim_s: float = 4 * 3600.0
    reweight_power: float = 1.0
    reweight_max_factor: float = 16.0
    reweight_max_boost: float = 4.0
    participation_cap: int = 3  # updates per window, "+cap" only
    fit_window_fraction: float = 0.5  # the agents' training.window_fraction (not with +plain)
    # Differential privacy (docs/privacy.md): local (the agents' training.noise_multiplier,
    # clip_norm and privacy.epsilon_budget) and central (the coordinator's [central_dp]; FedBuff
    # and synchronous FedAvg only). One delta for both.
    noise_multiplier: float = 0.0
    clip_norm: float = 5.0
    epsilon_budget: float | None = None
    central_noise_multiplier: float = 0.0
    central_clip_norm: float = 1.0
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError("devices must be >= 1", key="devices")
        if self.duration_s <= 0 or self.scale <= 0:
            raise ConfigError("duration_s and scale must be positive")
        if self.session not in ("sessionless", "persistent"):
            raise ConfigError(f"session must be sessionless or persistent, got "
                              f"{self.session!r}", key="session")
        if self.clock not in ("virtual", "wall"):
            raise ConfigError(f"clock must be virtual or wall, got {self.clock!r}", key="clock")
        if self.clock == "virtual" and self.broker_kind == "embedded":
            raise ConfigError(_VIRTUAL_NEEDS_MOSQUITTO, key="clock")
        if self.broker is not None and len(broker_urls(self.broker)) > 1 and (
                self.clock == "virtual"):
            raise ConfigError("the virtual clock takes one broker URL (a Mosquitto): several "
                              "(a cluster's nodes) need --clock wall", key="broker")
        if self.dataset not in ("digits", "synthetic"):
            raise ConfigError("dataset must be digits or synthetic", key="dataset")
        if self.model not in ("logistic", "mlp", "linear"):
            raise ConfigError("model must be logistic, mlp or linear", key="model")
        if self.fleet_file is None:
            # The built-in datasets are classification tasks; a regressor needs the user's data.
            if self.model == "linear":
                raise ConfigError("model linear needs a fleet file with regression data",
                                  key="model")
            if self.test_file is not None:
                raise ConfigError("a test file needs a fleet file (its features must match "
                                  "the devices' data)", key="test_file")
        if self.correlate_labels and self.fleet_file is not None:
            raise ConfigError("correlate_labels shapes the synthetic fleet; a fleet file has "
                              "its own traces", key="correlate_labels")
        _int("local_test_size", self.local_test_size, 1, math.inf)
        _num("check_interval_sim_s", self.check_interval_sim_s, 0.0, math.inf, lo_open=True)
        _num("min_train_interval_sim_s", self.min_train_interval_sim_s, 0.0, math.inf)
        _num("model_refresh_sim_s", self.model_refresh_sim_s, 0.0, math.inf)
        if self.snapshot_interval_s is not None:
            _num("snapshot_interval_s", self.snapshot_interval_s, 0.0, math.inf)
        _num("constrained_slowdown", self.constrained_slowdown, 0.0, math.inf, lo_open=True)
        _num("fit_window_fraction", self.fit_window_fraction, 0.0, 1.0, lo_open=True)
        _num("participation_window_sim_s", self.participation_window_sim_s, 0.0, math.inf,
             lo_open=True)
        _int("local_epochs", self.local_epochs, 1, math.inf)
        _int("batch_size", self.batch_size, 1, math.inf)
        _int("cohort_size", self.cohort_size, 1, math.inf)
        if not (isinstance(self.hidden, tuple) and self.hidden
                and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                        for h in self.hidden)):
            raise ConfigError(f"hidden must be one or more positive layer sizes, got "
                              f"{self.hidden!r}", key="hidden")
        _num("learning_rate", self.learning_rate, 0.0, math.inf, lo_open=True)
        _num("noise_multiplier", self.noise_multiplier, 0.0, math.inf)
        _num("clip_norm", self.clip_norm, 0.0, math.inf, lo_open=True)
        _ = self.local_privacy, self.central_dp  # validated on construction
        if self.epsilon_budget is not None and self.noise_multiplier <= 0:
            raise ConfigError("epsilon_budget needs noise_multiplier > 0 (local DP)",
                              key="epsilon_budget")
        _num("l2", self.l2, 0.0, math.inf)
        _num("round_deadline_sim_s", self.round_deadline_sim_s, 0.0, math.inf, lo_open=True)
        _num("target_accuracy", self.target_accuracy, -math.inf, math.inf)
        if not (isinstance(self.over_selection, (int, float)) and 1.0 <= self.over_selection
                <= 100.0):
            raise ConfigError("over_selection must be between 1 and 100", key="over_selection")

    @property
    def local_privacy(self) -> PrivacyConfig:
        return PrivacyConfig(epsilon_budget=self.epsilon_budget, delta=self.dp_delta)

    @property
    def central_dp(self) -> CentralDPConfig:
        # A fixed seed: noise a simulation can reproduce (never in service: _central_dp.py).
        return CentralDPConfig(noise_multiplier=self.central_noise_multiplier,
                               clip_norm=self.central_clip_norm, delta=self.dp_delta,
                               seed=self.seed)

    @property
    def duration_sim_s(self) -> float:
        return self.duration_s * self.scale

    @property
    def snapshot_wall_s(self) -> float:
        """The coordinator's snapshot interval, wall seconds."""
        if self.snapshot_interval_s is not None:
            return self.snapshot_interval_s
        return max(0.05, 1.0 / self.scale)


@dataclass(frozen=True, slots=True)
class Fleet:
    traces: list[DeviceTrace]
    parts: list[XY]
    test: Dataset
    spec: ModelSpec
    # Each device's own held-out set, same order as traces; None where it has none. For the
    # synthetic fleet: test samples with the device's label mix (fleet/_fairness.py).
    local_tests: list[XY | None] = field(default_factory=list)
    constrained: list[bool] = field(default_factory=list)  # correlated availability, if any


def metric_of(spec: ModelSpec) -> str:
    """The held-out metric runs are judged by: accuracy, or R^2 for the linear regressor."""
    return "accuracy" if spec.is_classifier else "r2"


def synthetic_fleet(config: SimConfig) -> Fleet:
    """The synthetic fleet (devices, their data and the held-out set) the config describes: a
    pure function of it. `fleet.build_fleet` also reads a user's fleet file."""
    profile = replace(config.profile, n_devices=config.devices, seed=config.seed,
                      duration_s=config.duration_sim_s)
    if config.dataset == "digits":
        train, test = load_digits(seed=config.seed)
    else:
        full = make_synthetic(n_samples=max(4000, 40 * config.devices), n_features=20,
                              n_classes=5, seed=config.seed)
        cut = len(full) // 5
        order = np.random.default_rng(config.seed).permutation(len(full))
        test, train = full.subset(order[:cut]), full.subset(order[cut:])
    idx = dirichlet_partition(train.y, config.devices, alpha=config.dirichlet_alpha,
                              seed=config.seed, min_size=min(5, len(train) // config.devices))
    classes = tuple(int(c) for c in np.unique(train.y))
    spec = model_spec(config, n_features=train.n_features, classes=classes)
    parts = [(train.X[i], train.y[i]) for i in idx]
    # Device i draws its traces from its own seeded streams either way, so correlating changes
    # only the constrained devices' availability, nothing else.
    constrained = constrained_devices(parts, config.correlate_labels)
    hard = constrained_profile(profile, slowdown=config.constrained_slowdown)
    traces = [generate_device(hard if c else profile, i) for i, c in enumerate(constrained)]
    local = local_test_sets(parts, (test.X, test.y), size=config.local_test_size,
                            seed=config.seed)
    return Fleet(traces, parts, test, spec, list(local), constrained)


def model_spec(config: SimConfig, *, n_features: int, classes: tuple[int, ...]) -> ModelSpec:
    return ModelSpec(kind=config.model, n_features=n_features, classes=classes,  # type: ignore[arg-type]
                     hidden=config.hidden, learning_rate=config.learning_rate,
                     batch_size=config.batch_size, l2=config.l2, seed=config.seed)


def device_scores(model: ModelAdapter, local_tests: Sequence[XY | None], *,
                  metric: str = "accuracy", params: Sequence[np.ndarray[Any, Any]] = ()
                  ) -> list[float | None]:
    """`metric` on each device's own test set (None: it has none). With `params`, a device's
    score is its mean over those models (the last few versions: one version of an asynchronous
    model is a noisy sample); without, the model as it is."""
    models: list[np.ndarray[Any, Any] | None] = [*params] if params else [None]
    batched = _accuracy_batch(model, local_tests) if metric == "accuracy" else None
    per_model = []
    for p in models:  # one parameter load per model, not one per device and model
        if p is not None:
            model.set_params_vector(p)
        if batched is not None:
            per_model.append(batched(model))
            continue
        per_model.append([None if t is None else float(model.evaluate(*t)[metric])
                          for t in local_tests])
    return [None if t is None else float(np.mean([m[i] for m in per_model]))
            for i, t in enumerate(local_tests)]


def _accuracy_batch(model: ModelAdapter, local_tests: Sequence[XY | None]
                    ) -> Callable[[ModelAdapter], list[float | None]] | None:
    """Accuracy on every device's test set from one prediction over all of them, as
    `evaluate` computes it per set (arg max of the probabilities against the label's class):
    10,000 devices cost one `predict_proba` per model, not 10,000 (seconds after a large run).
    None where it does not apply (a set without samples)."""
    sets = [(i, t) for i, t in enumerate(local_tests) if t is not None]
    present = [i for i, _ in sets]
    sizes = [len(t[1]) for _, t in sets]
    if not sets or min(sizes) == 0:
        return None
    X = np.concatenate([np.asarray(t[0]) for _, t in sets])
    y = np.concatenate([np.asarray(t[1]) for _, t in sets])
    classes = np.asarray(model.spec.classes)
    truth = np.argmax(y[:, None] == classes[None, :], axis=1)
    starts = np.cumsum([0, *sizes[:-1]])

    def score(m: ModelAdapter) -> list[float | None]:
        correct = (np.argmax(m.predict_proba(X), axis=1) == truth).astype(np.float64)
        means = np.add.reduceat(correct, starts) / np.asarray(sizes)
        out: list[float | None] = [None] * len(local_tests)
        for i, v in zip(present, means, strict=True):
            out[i] = float(v)
        return out

    return score


def summarize_scores(scores: Sequence[float | None], metric: str = "accuracy"
                     ) -> dict[str, Any] | None:
    """``mean`` over devices, ``worst_10pct`` the mean of the worst-scoring tenth of them (at
    least one device: the fleet's tail, which a mean hides), ``n_devices`` the devices scored.
    None when no device has a score. An undefined score (R^2 of fewer than two samples) is
    left out."""
    finite = sorted(s for s in scores if s is not None and math.isfinite(s))
    if not finite:
        return None
    return {"mean": float(np.mean(finite)), "worst_10pct": worst_fraction_mean(finite, 0.1),
            "n_devices": len(finite), "metric": metric}


def local_evaluation(model: ModelAdapter, local_tests: Sequence[XY | None], *,
                     metric: str = "accuracy", params: Sequence[np.ndarray[Any, Any]] = ()
                     ) -> dict[str, Any] | None:
    """How the global model serves each device: `summarize_scores` of `device_scores`."""
    return summarize_scores(device_scores(model, local_tests, metric=metric, params=params),
                            metric)


# "fit" is the devices' own: local work fitted to their eligible windows (agent/_budget.py).
# Reweighting (FedAsync) and fitted work are the product's defaults: "plain" turns both off, and
# the corrections named with it turn on again ("fedasync+plain+fit": fitted work alone).
CORRECTIONS = ("reweight", "cap", "memory", "fit", "plain")


def split_rule(rule: str) -> tuple[str, frozenset[str]]:
    """``"fedbuff+plain+memory"`` -> ("fedbuff", {"plain", "memory"}); a bare rule has
    none (it runs the defaults)."""
    base, *corrections = rule.split("+")
    if base not in RULES or any(c not in CORRECTIONS for c in corrections) or (
            corrections and base == "fedavg-sync") or len(set(corrections)) < len(corrections):
        raise ConfigError(f"unknown rule {rule!r}: use one of {', '.join(RULES)}, for fedasync "
                          f"and fedbuff optionally with any of +{', +'.join(CORRECTIONS)}",
                          key="rule")
    return base, frozenset(corrections)


def fit_fraction(config: SimConfig, rule: str) -> float:
    """The agents' ``training.window_fraction`` under `rule`."""
    corrections = split_rule(rule)[1]
    return (config.fit_window_fraction if "fit" in corrections or "plain" not in corrections
            else 0.0)


def participation_config(config: SimConfig, rule: str) -> ParticipationConfig:
    """The coordinator's participation settings for `rule` (the window in coordinator, i.e.
    wall, seconds)."""
    corrections = split_rule(rule)[1]
    return ParticipationConfig(
        window_s=config.participation_window_sim_s / config.scale,
        reweight=True if "reweight" in corrections else (False if "plain" in corrections
                                                          else None),
        power=config.reweight_power,
        max_factor=config.reweight_max_factor, max_boost=config.reweight_max_boost,
        cap=config.participation_cap if "cap" in corrections else 0)


def rule_config(config: SimConfig, rule: str) -> RuleConfig:
    rule, corrections = split_rule(rule)
    memory_s = (config.participation_window_sim_s / config.scale if "memory" in corrections
                else 0.0)
    if rule == "fedasync":
        return RuleConfig(name="fedasync", alpha=config.fedasync_alpha, memory_s=memory_s,
                          staleness=config.staleness)  # type: ignore[arg-type]
    if rule == "fedbuff":
        # A device trains once per model version it receives, so a buffer larger than the
        # fleet would never fill: at most one update per device.
        # Under central DP, equal shares: its noise follows the largest (_central_dp.py).
        return RuleConfig(name="fedbuff", buffer_size=min(config.fedbuff_k, config.devices),
                          server_lr=config.fedbuff_server_lr, memory_s=memory_s,
                          weight_by_samples=not config.central_dp.enabled,
                          staleness=config.staleness)  # type: ignore[arg-type]
    if rule == "fedavg-sync":
        return RuleConfig(name="fedavg-sync", cohort_size=config.cohort_size,
                          min_updates=max(1, config.cohort_size // 2),
                          over_selection=config.over_selection,
                          deadline_s=config.round_deadline_sim_s / config.scale)
    raise ConfigError(f"unknown rule {rule!r}; expected one of {RULES}", key="rule")


def _workers(config: SimConfig, devices: int) -> int:
    n = config.workers or max(1, (os.cpu_count() or 2) - 1)
    return max(1, min(n, devices))


class Arrival(NamedTuple):
    """One update as the coordinator's lineage recorded it, on the run's sim clock."""

    device_id: str
    sim_s: float  # when the coordinator received it, sim seconds since the run's start
    outcome: str  # accepted | buffered | rejected
    reason: str | None


@dataclass(slots=True)
class RunResult:
    rule: str
    out_dir: Path
    # (wall s since start, version, metric, loss); the metric is summary["metric"]
    evaluations: list[tuple[float, int, float, float]]
    summary: dict[str, Any]
    arrivals: list[Arrival] = field(default_factory=list)
    # The machine's side of the run (run.json): wall time, memory, CPU, the broker's totals.
    # Apart from summary.json, which a virtual-clock run reproduces exactly.
    machine: dict[str, Any] = field(default_factory=dict)


# Samples of the accuracy curve per run for the time to target.
TARGET_SAMPLES = 240


def time_to_target(evals: list[tuple[float, int, float, float]], target: float, *,
                   duration_s: float, window: int = 3) -> float | None:
    """First time the moving average of `window` samples of the model's metric reaches
    `target`: sampled every `duration_s` / TARGET_SAMPLES, each sample the newest version's
    evaluation at that time (as bench/robustness.py samples its runs).

    On a grid of time, not over the last `window` versions: three versions of synchronous
    FedAvg span three rounds, seconds, and three of an asynchronous rule a fraction of one, and
    on a rising curve the longer window reported synchronous FedAvg about a round late (the
    demo: 3.16x by versions, 2.77x by time; docs/benchmarks.md, "Benchmark")."""
    step = duration_s / TARGET_SAMPLES
    samples: list[tuple[float, float]] = []
    i = 0
    for k in range(1, TARGET_SAMPLES + 1):
        t = round(k * step, 6)
        while i < len(evals) and evals[i][0] <= t:
            i += 1
        if i:
            samples.append((t, evals[i - 1][2]))
    return first_reaching(samples, target, window)


def first_reaching(samples: Sequence[tuple[float, float]], target: float, window: int = 3
                   ) -> float | None:
    """The time of the first of `samples` (time, value) at which the mean of the last `window`
    values reaches `target`; None if none does."""
    for j in range(window - 1, len(samples)):
        if sum(a for _, a in samples[j - window + 1:j + 1]) / window >= target:
            return samples[j][0]
    return None


def run_rule(config: SimConfig, rule: str, out_dir: Path, *, fleet: Fleet,
             progress: bool = True) -> RunResult:
    """Run `fleet` (`fleet.build_fleet(config)`) under one rule for `config.duration_s`; write
    metrics.csv + summary.json."""
    if config.devices != len(fleet.traces):
        # A fleet file decides how many devices there are; the rule settings and the summary
        # must agree with it even when the config was not made by `replay_config`.
        config = replace(config, devices=len(fleet.traces))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Device spools and models on tmpfs: thousands of fsyncs a second would measure the disk.
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory inside it
    state_root = Path(tempfile.mkdtemp(prefix="fedasync-sim-",
                                       dir=shm if shm.is_dir() else None))
    broker: MosquittoBroker | EmbeddedBroker | None = None
    virtual = config.clock == "virtual"
    vclock = VirtualClock(config.scale) if virtual else None
    service: CoordinatorService | None = None
    # Traffic: the workers' latest counts, the broker's $SYS totals at both ends (our own
    # broker starts at zero; an existing one is diffed; None: no $SYS, e.g. the embedded one).
    latest: dict[int, dict[str, int]] = {}
    sys_start: dict[str, int] | None = None
    sys_end: dict[str, int] | None = None
    sampled = False
    wall_started = time.monotonic()
    machine: dict[str, Any] = {"clock": config.clock}
    try:
        if config.broker is None:
            # No in-flight window: the virtual clock's markers must not overtake held messages.
            broker = start_broker(prefer=config.broker_kind, workdir=state_root / "broker",
                                  max_inflight=0 if virtual else 1000)
        if virtual and isinstance(broker, EmbeddedBroker):
            raise ConfigError(_VIRTUAL_NEEDS_MOSQUITTO, key="clock")
        url = config.broker or (broker.url if broker else "")
        # Several URLs (a cluster's nodes): the coordinator fails over along them from the
        # first; the devices are spread over them (fleet/_worker.py).
        urls = broker_urls(url)
        if progress:
            kind = ("existing broker" if broker is None else "private Mosquitto"
                    if isinstance(broker, MosquittoBroker) else "embedded amqtt broker "
                    "(Mosquitto not installed)")
            print(f"[{rule:>11}] broker: {kind} at {url}; {config.clock} clock", file=sys.stderr)
        fleet_name = f"sim-{rule.replace('+', '-')}-{config.seed}-{os.getpid()}"
        coord_state = out_dir / "coordinator-state"
        shutil.rmtree(coord_state, ignore_errors=True)
        # The coordinator works on tmpfs too (each commit is fsync'd), copied out at the end.
        run_state = state_root / "coordinator"
        test = fleet.test
        n_devices = len(fleet.traces)
        evaluator_model = build_model(fleet.spec)

        def evaluate(params: np.ndarray[Any, Any]) -> dict[str, float]:
            evaluator_model.set_params_vector(params)
            return dict(evaluator_model.evaluate(test.X, test.y))

        # On the virtual clock the controller steps the coordinator (fleet/_virtual.py).
        stepper = None if vclock is None else Stepped()
        clocks: dict[str, Any] = ({} if vclock is None else
                                  {"clock": vclock, "scheduler": stepper})
        service = CoordinatorService(CoordinatorConfig(
            model=fleet.spec, broker=urls, fleet=fleet_name, state_dir=str(run_state),
            client_id=f"coordinator-{fleet_name}", http="", rule=rule_config(config, rule),
            central_dp=config.central_dp,
            participation=participation_config(config, rule), keep_checkpoints=_KEEP,
            guards=GuardConfig(max_norm=10.0),
            snapshots=SnapshotConfig(min_interval_s=config.snapshot_wall_s)),
            # Every run starts its fleet over on fresh state, also on a broker that holds an
            # earlier run's retained model under this name (the same seed and process).
            evaluator=evaluate, reset=True, **clocks)
        # What the coordinator publishes (snapshots, acks) and receives, as the devices count.
        coordinator_traffic = TrafficCounter()
        service.watch_traffic(
            sent=lambda topic, payload, _: coordinator_traffic.count("sent", topic, len(payload)),
            received=lambda topic, payload: coordinator_traffic.count("received", topic,
                                                                      len(payload)))
        sys_start = ({} if isinstance(broker, MosquittoBroker) else None if broker is not None
                     else read_sys_counters(urls[0], timeout=5))
        service.start()
        if not service.wait_connected(15):
            raise ConfigError(f"coordinator could not connect to {url}")
        shards = [tuple(int(i) for i in shard) for shard in
                  np.array_split(np.arange(n_devices), _workers(config, n_devices))]
        specs = [WorkerSpec(
            index=w, broker_url=url, fleet=fleet_name,
            traces=tuple(fleet.traces[i] for i in shard),
            data=tuple(fleet.parts[i] for i in shard),
            scale=config.scale, duration_s=config.duration_sim_s,
            state_root=str(state_root / "devices"), policy=config.policy,
            training=TrainConfig(
                local_epochs=config.local_epochs, encoding=config.encoding,  # type: ignore[arg-type]
                window_fraction=fit_fraction(config, rule),
                noise_multiplier=config.noise_multiplier, clip_norm=config.clip_norm),
            privacy=config.local_privacy,
            check_interval_s=config.check_interval_sim_s, seed=config.seed,
            min_train_interval_s=config.min_train_interval_sim_s,
            model_refresh_s=config.model_refresh_sim_s, session=config.session)
            for w, shard in enumerate(shards)]
        if vclock is not None and stepper is not None:
            start = EPOCH
            rows = _run_virtual(service, stepper, specs, vclock, config=config, rule=rule, url=url,
                                fleet_name=fleet_name, out_dir=out_dir, progress=progress,
                                n_devices=n_devices, latest=latest, machine=machine)
        else:
            start, rows = _run_wall(service, specs, config=config, rule=rule,
                                    out_dir=out_dir, progress=progress, n_devices=n_devices,
                                    latest=latest)
        sampled = True
    finally:
        if service is not None:
            service.stop()
            shutil.copytree(run_state, coord_state)
            privacy = privacy_summary(
                local=config.local_privacy, noise_multiplier=config.noise_multiplier,
                clip_norm=config.clip_norm, central=config.central_dp,
                central_status=privacy_status(service.engine.rule),
                device_dirs=[state_root / "devices" / t.device_id for t in fleet.traces])
        if sampled and sys_start is not None:  # everything has stopped but the broker
            sys_end = read_sys_counters(urls[0], timeout=30)
        if broker is not None:
            broker.close()
        shutil.rmtree(state_root, ignore_errors=True)

    metric = metric_of(fleet.spec)
    evals, arrivals, finals = _outcome(coord_state, start=start, scale=config.scale,
                                       metric=metric, duration_s=config.duration_s)
    _write_arrivals(out_dir / "updates.csv", arrivals)
    summary = _summarize(config, rule, fleet, evals, rows)
    scores = device_scores(evaluator_model, fleet.local_tests, metric=metric, params=finals)
    local = summarize_scores(scores, metric)
    summary["local_accuracy"] = None if local is None else {
        k: round(v, 4) if isinstance(v, float) else v for k, v in local.items()}
    summary["participation"] = _participation(fleet, arrivals, scores, metric)
    summary["privacy"] = privacy
    broker_totals = diff_counters(sys_start, sys_end)
    coordinator_stats = coordinator_traffic.stats()
    if virtual:  # its presence messages name its pid and host: the machine's side
        machine["coordinator_presence"] = {k: coordinator_stats.pop(k) for k in
                                           list(coordinator_stats) if "_other_" in k}
    # Under the virtual clock the broker also carried the clock's markers and keepalives that
    # depend on wall time: its totals go with the machine's figures, not the reproducible ones.
    summary["traffic"] = summarize_traffic(
        _device_traffic(latest), broker=None if virtual else broker_totals,
        coordinator=coordinator_stats,
        merged_updates=sum(1 for a in arrivals if a.outcome != "rejected"),
        n_devices=len(fleet.traces), sim_hours=config.duration_sim_s / 3600)
    # Each device's own downlink against its own trainings and refreshes; a row per device in
    # downlink.csv. Published snapshots: the coordinator's announcements (one per snapshot).
    per_device = _per_device(latest, [t.device_id for t in fleet.traces])
    summary["traffic"]["per_device"] = summarize_per_device(
        per_device, published=coordinator_traffic.stats().get("sent_announce_msgs", 0))
    _write_downlink(out_dir / "downlink.csv", per_device)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    machine.update(
        wall_s=round(time.monotonic() - wall_started, 2),
        peak_rss_mb=max((r["rss_mb"] for r in rows), default=0),
        mean_cpu_percent=round(float(np.mean([r["cpu_percent"] for r in rows[2:]])), 1)
        if len(rows) > 2 else None,
        broker=broker_totals)
    # The devices' sessions, the copies they sent again for want of an ack (agent._resend),
    # and the copies the coordinator had already (acked "duplicate").
    machine.update(session=config.session,
                   resent=sum(t.get("resent", 0) for t in latest.values()),
                   duplicates=int(service.metrics.registry.get_sample_value(
                       "fedasync_updates_total", {"status": "duplicate"}) or 0))
    if not virtual:  # update-to-ack latency at the devices, and its coordinator's part
        machine["ack_latency_ms"] = ack_percentiles(Counter(
            {k: v for totals in latest.values() for k, v in totals.items()
             if k.startswith(ACK_PREFIX)}))
        machine["coordinator_ack_ms"] = ack_percentiles(histogram_counts(
            service.metrics.ack_seconds))
    (out_dir / "run.json").write_text(json.dumps(machine, indent=1))
    return RunResult(rule, out_dir, evals, summary, arrivals, machine)


def _spawn_workers(specs: Sequence[WorkerSpec], target: Any, args: Any) -> list[Any]:
    # A socket per device in its worker: the workers inherit this process's raised limit.
    limit = raise_fd_limit()
    need = max((len(s.traces) for s in specs), default=0) + 64
    if 0 <= limit < need:
        log.warning("open-file limit %d is below the %d a worker needs (a socket per device): "
                    "raise the hard limit (ulimit -Hn) or use more --workers", limit, need)
    ctx = mp.get_context("spawn")
    procs = []
    for spec in specs:
        # The workers log at this process's level (--log-level): a device's INFO lines too.
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        p = ctx.Process(target=target, args=(spec, *args(spec), level), daemon=True,
                        name=f"fleet-worker-{spec.index}")
        p.start()
        procs.append(p)
    return procs


def _run_wall(service: CoordinatorService, specs: Sequence[WorkerSpec], *, config: SimConfig,
              rule: str, out_dir: Path, progress: bool, n_devices: int,
              latest: dict[int, dict[str, int]]) -> tuple[float, list[dict[str, Any]]]:
    """The wall-clock mode: workers run on their own, reporting every second; rows a second.
    Returns the wall time of sim time 0 and the rows."""
    ctx = mp.get_context("spawn")
    stop, go, start_at = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
    reports: Any = ctx.Queue()
    procs: list[Any] = []
    try:
        procs = _spawn_workers(specs, run_worker, lambda _: (go, start_at, stop, reports))
        # Sim time 0 starts when every worker has loaded its devices, not while they spawn.
        for _ in procs:
            reports.get(timeout=120)
        start = time.time() + 0.2
        start_at.value = start
        go.set()
        return start, _sample(service, reports, start=start, config=config, rule=rule,
                              out_dir=out_dir, progress=progress, n_devices=n_devices,
                              latest=latest)
    finally:
        stop.set()
        _join_reading(procs, reports, latest)


def _run_virtual(service: CoordinatorService, stepper: Stepped, specs: Sequence[WorkerSpec],
                 vclock: VirtualClock, *, config: SimConfig, rule: str, url: str,
                 fleet_name: str, out_dir: Path, progress: bool, n_devices: int,
                 latest: dict[int, dict[str, int]],
                 machine: dict[str, Any]) -> list[dict[str, Any]]:
    """The virtual-clock mode (fleet/_virtual.py): a row every `scale` sim seconds (one second
    of the run's clock), as in the wall-clock mode."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in specs]
    procs: list[Any] = []
    controller: Controller | None = None
    rows: list[dict[str, Any]] = []
    usage = _Usage()
    fields = [*_ROW_FIELDS]
    try:
        procs = _spawn_workers(specs, run_virtual_worker,
                               lambda spec: (pipes[spec.index][1],))
        for parent, _ in pipes:
            if not parent.poll(120) or parent.recv() != ("ready",):
                raise ConfigError("a simulator worker did not start")
        controller = Controller(service, stepper, [p for p, _ in pipes], vclock,
                                broker_url=url, fleet=fleet_name)
        shown = [time.monotonic()]
        with (out_dir / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()

            def sample(t: float) -> None:
                assert controller is not None
                latest.update(enumerate(controller.report()))
                row = _row(service, t / config.scale, config, latest, usage)
                writer.writerow(row)
                rows.append(row)

            def show() -> None:
                if progress and time.monotonic() - shown[0] >= 1.0:
                    shown[0] = time.monotonic()
                    _progress(service, rule, config, vclock.t / config.scale, rows, n_devices)

            controller.run(config.duration_sim_s, every=config.scale, on_sample=sample,
                           on_instant=show)
        latest.update(enumerate(controller.report(final=True)))
        if progress:
            _progress(service, rule, config, config.duration_s, rows, n_devices)
            print(file=sys.stderr)
        machine.update(phases=controller.phases, markers=controller.markers)
        return rows
    finally:
        if controller is not None:
            with contextlib.suppress(OSError, ValueError):
                controller.stop()
            controller.close()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


_ROW_FIELDS = ("time_s", "sim_hours", "version", "accuracy", "loss", "accepted", "buffered",
               "rejected", "online", "connected", "eligible", "training", "aborted",
               "rss_mb", "cpu_percent")


def _row(service: CoordinatorService, t: float, config: SimConfig,
         latest: dict[int, dict[str, int]], usage: _Usage) -> dict[str, Any]:
    """A metrics.csv row at `t` (the run's seconds). The metric column keeps its name for the
    regressor too (R^2 there); summary.json says which."""
    counts = service.metrics.counts()
    fleet_totals = {k: sum(t.get(k, 0) for t in latest.values())
                    for k in ("online", "connected", "eligible", "training", "aborted")}
    metrics = service.engine.metrics
    rejected = sum(v for k, v in counts.items() if k.startswith("rejected:"))
    return {"time_s": round(t, 2), "sim_hours": round(max(t, 0) * config.scale / 3600, 3),
            "version": service.engine.version,
            "accuracy": metrics.get(metric_of(service.config.model), ""),
            "loss": metrics.get("loss", ""),
            "accepted": counts.get("accepted", 0), "buffered": counts.get("buffered", 0),
            "rejected": rejected, **fleet_totals, **usage.sample()}


def _progress(service: CoordinatorService, rule: str, config: SimConfig, t: float,
              rows: list[dict[str, Any]], n_devices: int) -> None:
    metric = metric_of(service.config.model)
    acc = service.engine.metrics.get(metric)
    last = rows[-1] if rows else {}
    rate = 0.0
    if len(rows) >= 2:
        done = [r["accepted"] + r["buffered"] for r in rows[-2:]]
        rate = (done[1] - done[0]) / max(rows[-1]["time_s"] - rows[-2]["time_s"], 1e-6)
    print(f"\r[{rule:>11}] {max(t, 0):5.1f}/{config.duration_s:.0f}s  "
          f"sim {max(t, 0) * config.scale / 3600:5.1f}h  v{service.engine.version:<5} "
          f"{metric[:3]} {'-' if acc is None else f'{acc:.3f}':>5}  "
          f"eligible {last.get('eligible', 0):>4}/{n_devices}  "
          f"online {last.get('online', 0):>4}  {rate:6.1f} upd/s",
          end="", file=sys.stderr, flush=True)


def _sample(service: CoordinatorService, reports: Any, *, start: float, config: SimConfig,
            rule: str, out_dir: Path, progress: bool, n_devices: int,
            latest: dict[int, dict[str, int]]) -> list[dict[str, Any]]:
    """metrics.csv, a row a second, until the run's end; `latest` keeps each worker's last
    report."""
    rows: list[dict[str, Any]] = []
    end = start + config.duration_s
    usage = _Usage()
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(_ROW_FIELDS))
        writer.writeheader()
        while (now := time.time()) < end:
            deadline = now + 1.0
            while (left := deadline - time.time()) > 0:
                with contextlib.suppress(queue.Empty):
                    index, _, totals = reports.get(timeout=left)
                    latest[index] = totals
            row = _row(service, time.time() - start, config, latest, usage)
            writer.writerow(row)
            f.flush()  # followable while the run goes on (bench/fleet_brokers.py, tail -f)
            rows.append(row)
            if progress:
                _progress(service, rule, config, row["time_s"], rows, n_devices)
        if progress:
            print(file=sys.stderr)
    return rows


def _join_reading(procs: Sequence[Any], reports: Any, latest: dict[int, dict[str, int]],
                  timeout: float = 60.0) -> None:
    """Wait for the workers to exit, reading their reports meanwhile (the final ones, with
    every device's counts, into `latest`). A process does not exit before its queue's feeder
    has written everything to the pipe: joined without reading, a large final report filled
    the pipe, the join timed out, the kill left half a message, and reading it hung the run."""
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            index, _, totals = reports.get(timeout=0.2)
            if totals is not None:
                latest[index] = totals
    killed = [p.name for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(timeout=10)
    if killed:  # what they left in the pipe may be cut short: not read
        log.warning("workers %s did not stop in %.0f s and were killed: their last counts are "
                    "missing", ", ".join(killed), timeout)
        return
    with contextlib.suppress(queue.Empty, OSError, ValueError):
        while True:  # written before they exited
            index, _, totals = reports.get_nowait()
            if totals is not None:
                latest[index] = totals


def _device_traffic(latest: dict[int, dict[str, int]]) -> dict[str, int]:
    """The fleet's traffic counts (fleet/_traffic.py): the sum of the workers'."""
    out: Counter[str] = Counter()
    for totals in latest.values():
        out.update({k: v for k, v in totals.items() if k.startswith(("sent_", "received_"))})
    return dict(out)


def _per_device(latest: dict[int, dict[str, int]], device_ids: Sequence[str]
                ) -> dict[str, dict[str, int]]:
    """Each device's own counts (`SimDevice.downlink`), from the workers' reports' flat
    ``device/<id>/<key>`` entries; a device never reported has empty counts."""
    out: dict[str, dict[str, int]] = {d: {} for d in device_ids}
    for totals in latest.values():
        for k, v in totals.items():
            if k.startswith(DEVICE_PREFIX):
                device, _, key = k[len(DEVICE_PREFIX):].rpartition("/")
                out.setdefault(device, {})[key] = v
    return out


def _write_downlink(path: Path, per_device: dict[str, dict[str, int]]) -> None:
    keys = sorted({k for counts in per_device.values() for k in counts})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["device_id", "downlink_bytes", "snapshot_downloads", "bound", *keys])
        for device, counts in per_device.items():
            writer.writerow([device, device_downlink_bytes(counts), snapshot_downloads(counts),
                             downlink_bound(counts), *(counts.get(k, 0) for k in keys)])


class _Usage:
    """Memory and CPU of this process and its children (workers, Mosquitto) together."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self._seen: dict[int, Any] = {}

    def sample(self) -> dict[str, float]:
        import psutil

        procs = [self._me]
        with contextlib.suppress(psutil.Error):
            procs += self._me.children(recursive=True)
        rss = cpu = 0.0
        for found in procs:
            p = self._seen.setdefault(found.pid, found)  # cpu_percent needs the same object
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
                cpu += p.cpu_percent(None)
        return {"rss_mb": round(rss / 2**20, 1), "cpu_percent": round(cpu, 1)}


# Checkpoints the sim's coordinator keeps: enough to cover the last tenth of a run, from which
# up to _FINALS models, evenly spaced, stand for "the final model" in the local evaluation.
_KEEP, _FINALS = 400, 10


def _outcome(coord_state: Path, *, start: float, scale: float, metric: str, duration_s: float
             ) -> tuple[list[tuple[float, int, float, float]], list[Arrival],
                        list[np.ndarray[Any, Any]]]:
    """From the coordinator's store: evaluations, update arrivals and the final models (those
    of the last tenth of the run, like the final metric; one asynchronous version is noisy)."""
    from fedasync_iot.coordinator import Store

    store = Store(coord_state)
    try:
        evals = [(v.created_at - start, v.version, v.metrics[metric], v.metrics["loss"])
                 for v in store.versions() if metric in v.metrics]
        # received_at is the coordinator's wall clock, the same clock the workers' SimClock
        # runs on, so this is when the update reached the coordinator on the devices' sim clock.
        arrivals = [Arrival(u.device_id, round((u.received_at - start) * scale, 3), u.outcome,
                            u.reason) for u in store.lineage()]
        kept = set(store.checkpointed_versions())
        tail = [v.version for v in store.versions()
                if v.version in kept and v.created_at - start >= 0.9 * duration_s]
        tail = tail or sorted(kept)[-1:]
        pick = sorted({tail[round(i)] for i in np.linspace(0, len(tail) - 1, _FINALS)})
        finals = [store.load_checkpoint(v) for v in pick]
        return evals, arrivals, finals
    finally:
        store.close()


def _participation(fleet: Fleet, arrivals: Sequence[Arrival], scores: Sequence[float | None],
                   metric: str) -> dict[str, Any]:
    """Who shaped the model over the run, and (with correlated availability) how the final
    models serve the constrained devices against the others (`scores`: per device)."""
    merged = Counter(a.device_id for a in arrivals if a.outcome != "rejected")
    out: dict[str, Any] = participation_summary([merged[t.device_id] for t in fleet.traces])
    if any(fleet.constrained):
        for name, want in (("constrained", True), ("unconstrained", False)):
            group = [i for i, c in enumerate(fleet.constrained) if c == want]
            local = summarize_scores([scores[i] for i in group], metric)
            out[name] = {"devices": len(group),
                         "updates": sum(merged[fleet.traces[i].device_id] for i in group),
                         f"local_{metric}_mean": None if local is None
                         else round(local["mean"], 4)}
    return out


def _write_arrivals(path: Path, arrivals: Sequence[Arrival]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Arrival._fields)
        writer.writerows(arrivals)


def _summarize(config: SimConfig, rule: str, fleet: Fleet,
               evals: list[tuple[float, int, float, float]],
               rows: list[dict[str, Any]]) -> dict[str, Any]:
    # The last tenth of the run (at least 3 evaluations): one asynchronous version is noisy.
    tail = [e for e in evals if e[0] >= 0.9 * config.duration_s]
    last = tail if len(tail) >= 3 else evals[-3:]
    ttt = time_to_target(evals, config.target_accuracy, duration_s=config.duration_s)
    final = rows[-1] if rows else {}
    metric = metric_of(fleet.spec)
    final_metric = round(float(np.mean([e[2] for e in last])), 4) if last else None
    return {
        "rule": rule,
        "rule_settings": {k: (str(v) if not isinstance(v, (int, float, str, bool)) else v)
                          for k, v in asdict(rule_config(config, rule)).items()},
        "devices": len(fleet.traces), "seed": config.seed, "duration_s": config.duration_s,
        "scale": config.scale, "model": config.model, "encoding": config.encoding,
        "fleet_file": config.fleet_file,
        # Time to target and the final value are of `metric` ("accuracy" or "r2").
        "metric": metric,
        "target": config.target_accuracy,
        "final_metric": final_metric,
        "target_accuracy": config.target_accuracy if metric == "accuracy" else None,
        "time_to_target_s": ttt,
        "time_to_target_sim_h": None if ttt is None else round(ttt * config.scale / 3600, 3),
        "final_accuracy": final_metric if metric == "accuracy" else None,
        "versions": evals[-1][1] if evals else 0,
        "updates_accepted": final.get("accepted", 0) + final.get("buffered", 0),
        "updates_rejected": final.get("rejected", 0),
        "aborted_trainings": final.get("aborted", 0),
        "mean_eligible_devices": round(float(np.mean([r["eligible"] for r in rows])), 2)
        if rows else 0,
        "rows_peak": {"max_connected": max((r["connected"] for r in rows), default=0),
                      "max_online": max((r["online"] for r in rows), default=0)},
        "clock": config.clock,
    }


def fleet_summary(config: SimConfig, fleet: Fleet) -> dict[str, Any]:
    stats = summarize(fleet.traces, config.duration_sim_s, policy=config.policy,
                      # At least 10 samples: a run may be shorter than 300 sim seconds.
                      step_s=min(max(300.0, config.duration_sim_s / 100),
                                 config.duration_sim_s / 10))
    sizes = [len(y) for _, y in fleet.parts]
    return {**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()},
            "samples_per_device_median": int(np.median(sizes)),
            "samples_per_device_min": int(min(sizes)), "samples_per_device_max": int(max(sizes)),
            "dirichlet_alpha": None if config.fleet_file else config.dirichlet_alpha,
            "fleet_file": config.fleet_file, "n_params": build_model(fleet.spec).n_params}


def speedup(results: list[RunResult]) -> float | None:
    """Synchronous FedAvg's time to target over the best asynchronous rule's, same run."""
    sync: list[float | None] = [r.summary["time_to_target_s"] for r in results
                                if r.rule == "fedavg-sync"]
    asyn: list[float] = [r.summary["time_to_target_s"] for r in results
                         if r.rule != "fedavg-sync" and r.summary["time_to_target_s"] is not None]
    if not sync or not asyn:
        return None
    if sync[0] is None:
        return math.inf
    return round(sync[0] / min(asyn), 2)
