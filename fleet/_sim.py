"""One simulated fleet run: broker, the real coordinator, worker processes of simulated devices,
a metrics sampler and a progress line; then outputs (metrics.csv, summary.json).

Everything is seeded: the same `SimConfig` gives the same devices, data and traces, so runs of
different rules are a fair comparison (DESIGN.md "Benchmark method"). With ``fleet_file`` set,
the devices, data and traces come from a user's fleet file instead (`fleet._fleetfile`).

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from agent._policy import PolicyConfig
from agent._trainer import TrainConfig
from coordinator._config import CoordinatorConfig, SnapshotConfig
from coordinator._guards import GuardConfig
from coordinator._rules import RuleConfig
from coordinator._service import CoordinatorService
from fleet._broker import EmbeddedBroker, MosquittoBroker, start_broker
from fleet._traces import DeviceTrace, FleetProfile, generate_fleet, summarize
from fleet._worker import WorkerSpec, run_worker
from models import ConfigError, ModelSpec, build_model
from models._datasets import Dataset, dirichlet_partition, load_digits, make_synthetic

if TYPE_CHECKING:
    from models import ModelAdapter

log = logging.getLogger("fedasync.fleet")

RULES = ("fedasync", "fedbuff", "fedavg-sync")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    """A simulated fleet. Times are wall seconds unless named ``*_sim_s`` (sim seconds)."""

    devices: int = 50
    seed: int = 0
    duration_s: float = 45.0  # wall seconds per rule
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
    check_interval_sim_s: float = 120.0
    workers: int = 0  # 0: one per core, less one for the coordinator, at least 1
    broker: str | None = None  # URL of an existing broker; None: start one
    broker_kind: str = "auto"  # auto | mosquitto | embedded
    profile: FleetProfile = field(default_factory=lambda: FleetProfile(speed_median_s=1200.0))
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig(min_dwell_s=300.0))
    # Rule settings: the best of `fedasync-sim tune --seed 100` (a seed not reported):
    fedasync_alpha: float = 0.6
    fedbuff_k: int = 5
    fedbuff_server_lr: float = 1.0
    staleness: str = "polynomial:0.5"
    cohort_size: int = 5
    over_selection: float = 1.3
    round_deadline_sim_s: float = 1800.0
    target_accuracy: float = 0.85  # of the model's metric: accuracy, or R^2 for linear

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError("devices must be >= 1", key="devices")
        if self.duration_s <= 0 or self.scale <= 0:
            raise ConfigError("duration_s and scale must be positive")
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
        _check_int("local_epochs", self.local_epochs)
        _check_int("batch_size", self.batch_size)
        _check_int("cohort_size", self.cohort_size)
        if not (isinstance(self.hidden, tuple) and self.hidden
                and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                        for h in self.hidden)):
            raise ConfigError(f"hidden must be one or more positive layer sizes, got "
                              f"{self.hidden!r}", key="hidden")
        _check_number("learning_rate", self.learning_rate, positive=True)
        _check_number("l2", self.l2, positive=False)
        _check_number("round_deadline_sim_s", self.round_deadline_sim_s, positive=True)
        _check_number("target_accuracy", self.target_accuracy, positive=False, signed=True)
        if not (isinstance(self.over_selection, (int, float)) and 1.0 <= self.over_selection
                <= 100.0):
            raise ConfigError("over_selection must be between 1 and 100", key="over_selection")

    @property
    def duration_sim_s(self) -> float:
        return self.duration_s * self.scale


def _check_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {value!r}", key=key)


def _check_number(key: str, value: object, *, positive: bool, signed: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (signed or (value > 0 if positive else value >= 0)))
    if not ok:
        need = "finite" if signed else "> 0" if positive else ">= 0"
        raise ConfigError(f"{key} must be a number {need}, got {value!r}", key=key)


XY = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class Fleet:
    traces: list[DeviceTrace]
    parts: list[XY]
    test: Dataset
    spec: ModelSpec
    # Each device's own held-out set, same order as traces; None where it has none. Empty for
    # the synthetic fleet.
    local_tests: list[XY | None] = field(default_factory=list)


def metric_of(spec: ModelSpec) -> str:
    """The held-out metric runs are judged by: accuracy, or R^2 for the linear regressor."""
    return "accuracy" if spec.is_classifier else "r2"


def build_fleet(config: SimConfig) -> Fleet:
    """The devices, their data and the held-out set: a pure function of the config (and, with
    ``fleet_file``, of the files it names)."""
    if config.fleet_file is not None:
        from fleet._fleetfile import load_fleet, parse_fleet_file

        return load_fleet(parse_fleet_file(Path(config.fleet_file)), config)
    profile = replace(config.profile, n_devices=config.devices, seed=config.seed,
                      duration_s=config.duration_sim_s)
    traces = generate_fleet(profile)
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
    return Fleet(traces, [(train.X[i], train.y[i]) for i in idx], test, spec)


def model_spec(config: SimConfig, *, n_features: int, classes: tuple[int, ...]) -> ModelSpec:
    return ModelSpec(kind=config.model, n_features=n_features, classes=classes,  # type: ignore[arg-type]
                     hidden=config.hidden, learning_rate=config.learning_rate,
                     batch_size=config.batch_size, l2=config.l2, seed=config.seed)


def local_evaluation(model: ModelAdapter, local_tests: Sequence[XY | None], *,
                     metric: str = "accuracy") -> dict[str, Any] | None:
    """How one global model serves each device: `metric` on every device's own test set.

    ``mean`` over devices, ``worst_10pct`` the mean of the worst-scoring tenth of them (at least
    one device: the fleet's tail, which a mean hides), ``n_devices`` the devices scored. None
    when no device has a test set. A device whose score is undefined (R^2 of fewer than two
    samples) is left out.
    """
    scores = sorted(s for s in (float(model.evaluate(X, y)[metric])
                                for X, y in (t for t in local_tests if t is not None))
                    if math.isfinite(s))
    if not scores:
        return None
    worst = scores[:max(1, len(scores) // 10)]
    return {"mean": float(np.mean(scores)), "worst_10pct": float(np.mean(worst)),
            "n_devices": len(scores), "metric": metric}


def rule_config(config: SimConfig, rule: str) -> RuleConfig:
    if rule == "fedasync":
        return RuleConfig(name="fedasync", alpha=config.fedasync_alpha,
                          staleness=config.staleness)  # type: ignore[arg-type]
    if rule == "fedbuff":
        # A device trains once per model version it receives, so a buffer larger than the
        # fleet would never fill: at most one update per device.
        return RuleConfig(name="fedbuff", buffer_size=min(config.fedbuff_k, config.devices),
                          server_lr=config.fedbuff_server_lr,
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


def time_to_target(evals: list[tuple[float, int, float, float]], target: float,
                   window: int = 3) -> float | None:
    """First time the moving average of the last `window` evaluations reaches `target`."""
    accs = [e[2] for e in evals]
    for i in range(window - 1, len(accs)):
        if sum(accs[i - window + 1:i + 1]) / window >= target:
            return evals[i][0]
    return None


def run_rule(config: SimConfig, rule: str, out_dir: Path, *, fleet: Fleet | None = None,
             progress: bool = True) -> RunResult:
    """Run the fleet under one rule for `config.duration_s`; write metrics.csv + summary.json."""
    fleet = fleet or build_fleet(config)
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
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    reports: Any = ctx.Queue()
    procs: list[Any] = []
    service: CoordinatorService | None = None
    try:
        if config.broker is None:
            broker = start_broker(prefer=config.broker_kind, workdir=state_root / "broker")
        url = config.broker or (broker.url if broker else "")
        if progress:
            kind = ("existing broker" if broker is None else "private Mosquitto"
                    if isinstance(broker, MosquittoBroker) else "embedded amqtt broker "
                    "(Mosquitto not installed)")
            print(f"[{rule:>11}] broker: {kind} at {url}", file=sys.stderr)
        fleet_name = f"sim-{rule}-{config.seed}-{os.getpid()}"
        coord_state = out_dir / "coordinator-state"
        shutil.rmtree(coord_state, ignore_errors=True)
        test = fleet.test
        n_devices = len(fleet.traces)
        evaluator_model = build_model(fleet.spec)

        def evaluate(params: np.ndarray[Any, Any]) -> dict[str, float]:
            evaluator_model.set_params_vector(params)
            return dict(evaluator_model.evaluate(test.X, test.y))

        service = CoordinatorService(CoordinatorConfig(
            model=fleet.spec, broker=url, fleet=fleet_name, state_dir=str(coord_state),
            client_id=f"coordinator-{fleet_name}", http="", rule=rule_config(config, rule),
            guards=GuardConfig(max_norm=10.0, max_staleness=50),
            snapshots=SnapshotConfig(min_interval_s=0.5)), evaluator=evaluate)
        service.start()
        if not service.wait_connected(15):
            raise ConfigError(f"coordinator could not connect to {url}")
        go, start_at = ctx.Event(), ctx.Value("d", 0.0)
        shards = np.array_split(np.arange(n_devices), _workers(config, n_devices))
        for w, shard in enumerate(shards):
            spec = WorkerSpec(
                index=w, broker_url=url, fleet=fleet_name,
                traces=tuple(fleet.traces[i] for i in shard),
                data=tuple(fleet.parts[i] for i in shard),
                scale=config.scale, duration_s=config.duration_sim_s,
                state_root=str(state_root / "devices"), policy=config.policy,
                training=TrainConfig(local_epochs=config.local_epochs,
                                     encoding=config.encoding),  # type: ignore[arg-type]
                check_interval_s=config.check_interval_sim_s, seed=config.seed)
            p = ctx.Process(target=run_worker, args=(spec, go, start_at, stop, reports),
                            daemon=True, name=f"fleet-worker-{w}")
            p.start()
            procs.append(p)
        # Sim time 0 starts when every worker has loaded its devices, not while they spawn.
        for _ in procs:
            reports.get(timeout=120)
        start = time.time() + 0.2
        start_at.value = start
        go.set()
        rows = _sample(service, reports, start=start, config=config, rule=rule,
                       out_dir=out_dir, progress=progress, n_devices=n_devices)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if service is not None:
            service.stop()
        if broker is not None:
            broker.close()
        shutil.rmtree(state_root, ignore_errors=True)

    metric = metric_of(fleet.spec)
    evals, arrivals, final = _outcome(coord_state, start=start, scale=config.scale, metric=metric)
    _write_arrivals(out_dir / "updates.csv", arrivals)
    summary = _summarize(config, rule, fleet, evals, rows)
    evaluator_model.set_params_vector(final)
    local = local_evaluation(evaluator_model, fleet.local_tests, metric=metric)
    summary["local_accuracy"] = None if local is None else {
        k: round(v, 4) if isinstance(v, float) else v for k, v in local.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return RunResult(rule, out_dir, evals, summary, arrivals)


def _sample(service: CoordinatorService, reports: Any, *, start: float, config: SimConfig,
            rule: str, out_dir: Path, progress: bool, n_devices: int) -> list[dict[str, Any]]:
    latest: dict[int, dict[str, int]] = {}
    rows: list[dict[str, Any]] = []
    end = start + config.duration_s
    fields = ["time_s", "sim_hours", "version", "accuracy", "loss", "accepted", "buffered",
              "rejected", "online", "connected", "eligible", "training", "aborted",
              "rss_mb", "cpu_percent"]
    usage = _Usage()
    # The column keeps its name for the regressor too (R^2 there); summary.json says which.
    metric = metric_of(service.config.model)
    with (out_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        last_accepted, last_t = 0, time.time()
        while (now := time.time()) < end:
            deadline = now + 1.0
            while (left := deadline - time.time()) > 0:
                with contextlib.suppress(queue.Empty):
                    index, _, totals = reports.get(timeout=left)
                    latest[index] = totals
            counts = service.metrics.counts()
            fleet_totals = {k: sum(t.get(k, 0) for t in latest.values())
                            for k in ("online", "connected", "eligible", "training", "aborted")}
            metrics = service.engine.metrics
            t = time.time() - start
            rejected = sum(v for k, v in counts.items() if k.startswith("rejected:"))
            row = {"time_s": round(t, 2), "sim_hours": round(max(t, 0) * config.scale / 3600, 3),
                   "version": service.engine.version,
                   "accuracy": metrics.get(metric, ""), "loss": metrics.get("loss", ""),
                   "accepted": counts.get("accepted", 0), "buffered": counts.get("buffered", 0),
                   "rejected": rejected, **fleet_totals, **usage.sample()}
            writer.writerow(row)
            rows.append(row)
            if progress:
                accepted = counts.get("accepted", 0) + counts.get("buffered", 0)
                rate = (accepted - last_accepted) / max(time.time() - last_t, 1e-6)
                last_accepted, last_t = accepted, time.time()
                acc = metrics.get(metric)
                print(f"\r[{rule:>11}] {max(t, 0):5.1f}/{config.duration_s:.0f}s  "
                      f"sim {row['sim_hours']:5.1f}h  v{service.engine.version:<5} "
                      f"{metric[:3]} {'-' if acc is None else f'{acc:.3f}':>5}  "
                      f"eligible {fleet_totals['eligible']:>4}/{n_devices}  "
                      f"online {fleet_totals['online']:>4}  {rate:6.1f} upd/s",
                      end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    return rows


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


def _outcome(coord_state: Path, *, start: float, scale: float, metric: str
             ) -> tuple[list[tuple[float, int, float, float]], list[Arrival],
                        np.ndarray[Any, Any]]:
    """From the coordinator's store: evaluations, update arrivals and the final model."""
    from coordinator._store import Store

    store = Store(coord_state)
    try:
        evals = [(v.created_at - start, v.version, v.metrics[metric], v.metrics["loss"])
                 for v in store.versions() if metric in v.metrics]
        # received_at is the coordinator's wall clock, the same clock the workers' SimClock
        # runs on, so this is when the update reached the coordinator on the devices' sim clock.
        arrivals = [Arrival(u.device_id, round((u.received_at - start) * scale, 3), u.outcome,
                            u.reason) for u in store.lineage()]
        version = store.current_version()
        final = store.load_checkpoint(0 if version is None else version)
        return evals, arrivals, final
    finally:
        store.close()


def _write_arrivals(path: Path, arrivals: Sequence[Arrival]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Arrival._fields)
        writer.writerows(arrivals)


def _summarize(config: SimConfig, rule: str, fleet: Fleet,
               evals: list[tuple[float, int, float, float]],
               rows: list[dict[str, Any]]) -> dict[str, Any]:
    last = evals[-3:]
    ttt = time_to_target(evals, config.target_accuracy)
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
                      "max_online": max((r["online"] for r in rows), default=0),
                      "peak_rss_mb": max((r["rss_mb"] for r in rows), default=0),
                      "mean_cpu_percent": round(float(np.mean([r["cpu_percent"]
                                                               for r in rows[2:]])), 1)
                      if len(rows) > 2 else None},
    }


def fleet_summary(config: SimConfig, fleet: Fleet) -> dict[str, Any]:
    stats = summarize(fleet.traces, config.duration_sim_s, policy=config.policy,
                      step_s=max(300.0, config.duration_sim_s / 100))
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
