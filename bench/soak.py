"""Soak: a fleet runs for minutes while the memory of every process is sampled; resident memory
must not keep growing once warmed up.

    python -m fedasync_iot.bench.soak --minutes 10 [--devices 50] [--bound 0.2] [--out runs/soak]

What runs: a private Mosquitto (loopback, free port); the real coordinator as its own process
(``python -m fedasync_iot.coordinator.cli run --config soak.toml``: FedBuff, held-out evaluation,
ONNX
snapshots, as deployed); the fleet simulator's worker processes (the real agent code on seeded
simulated devices with uneven speed, battery, Wi-Fi and flapping connections: fleet/_worker.py).
Nobody joins late or leaves for good, so the load stays steady.

Every `sample_s` seconds the RSS of the coordinator, of each worker and of Mosquitto is sampled.
Growth of a process = median RSS over the last `window` of the run / median RSS over the
`window` right after warm-up - 1; it must stay <= `bound` (default 20%). Warm-up (the first
`warmup` of the run) covers imports, the first ONNX export, SQLite's page cache filling and the
fleet connecting. Writes soak.csv (every sample) and soak.json (the summary) into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedasync_iot.agent import TrainConfig
from fedasync_iot.fleet import (
    FleetProfile,
    MosquittoBroker,
    SimConfig,
    WorkerSpec,
    build_fleet,
    free_port,
    run_worker,
)
from fedasync_iot.models import ConfigError, ModelSpec

MIB = 2**20


@dataclass(frozen=True, slots=True, kw_only=True)
class SoakConfig:
    minutes: float = 10.0
    devices: int = 50
    seed: int = 0
    workers: int = 0  # 0: one per core, less one for the coordinator, at least 1
    sample_s: float = 5.0
    scale: float = 480.0  # sim seconds per wall second: 10 minutes = 80 sim hours
    warmup: float = 0.25  # fraction of the run before the baseline window
    window: float = 0.15  # fraction of the run each median is taken over
    bound: float = 0.20  # allowed growth
    model: str = "logistic"

    def __post_init__(self) -> None:
        if not 0 < self.minutes <= 24 * 60 or self.devices < 1 or self.sample_s <= 0:
            raise ConfigError("minutes must be in (0, 1440], devices >= 1, sample_s > 0")
        if not (0 < self.warmup < 1 and self.window > 0 and self.warmup + 2 * self.window <= 1):
            raise ConfigError("need 0 < warmup, window and warmup + 2 * window <= 1")


def _coordinator_toml(path: Path, *, broker: str, fleet: str, state: Path, spec: ModelSpec,
                      http: str) -> None:
    classes = ", ".join(str(c) for c in spec.classes)
    hidden = ", ".join(str(h) for h in spec.hidden)
    path.write_text(
        f'broker = "{broker}"\nfleet = "{fleet}"\nclient_id = "soak-coordinator"\n'
        f'state_dir = "{state}"\nhttp = "{http}"\nlog_level = "WARNING"\n'
        f'[model]\nkind = "{spec.kind}"\nn_features = {spec.n_features}\n'
        f"classes = [{classes}]\nhidden = [{hidden}]\nlearning_rate = {spec.learning_rate}\n"
        f"seed = {spec.seed}\n"
        '[rule]\nname = "fedbuff"\nbuffer_size = 5\nstaleness = "polynomial:1.0"\n'
        "[guards]\nmax_norm = 10.0\n"
        "[snapshots]\nmin_interval_s = 0.5\n"
        '[evaluation]\ntest_file = "builtin:digits"\n')


def _status(http: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{http}/status", timeout=2) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (OSError, ValueError):
        return {}


def _rss(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / MIB
    except psutil.Error:
        return float("nan")


def _child_named(name: str) -> int:
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.name() == name:
                return int(child.pid)
    return -1


def growth(samples: list[float], *, warmup: float, window: float) -> dict[str, float]:
    """Median RSS just after warm-up and at the end of the run, and the relative growth."""
    n = len(samples)
    w = max(1, round(n * window))
    first = max(0, min(round(n * warmup), n - 2 * w))
    base = float(np.nanmedian(samples[first:first + w]))
    end = float(np.nanmedian(samples[n - w:]))
    return {"baseline_mb": round(base, 1), "final_mb": round(end, 1),
            "peak_mb": round(float(np.nanmax(samples)), 1),
            "growth": round(end / base - 1, 4)}


def run_soak(config: SoakConfig, *, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run the soak; write soak.csv and soak.json into `out`; return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    duration = config.minutes * 60
    sim = replace(SimConfig(), devices=config.devices, seed=config.seed, duration_s=duration,
                  scale=config.scale, model=config.model, workers=config.workers,
                  profile=FleetProfile(speed_median_s=1200.0, late_join_fraction=0.0,
                                       early_leave_fraction=0.0))
    fleet = build_fleet(sim)
    # Device state on tmpfs: thousands of fsyncs would measure the disk, not the software.
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private directory inside it
    root = Path(tempfile.mkdtemp(prefix="fedasync-soak-", dir=shm if shm.is_dir() else None))
    broker = MosquittoBroker(workdir=root / "broker")
    ctx = mp.get_context("spawn")
    stop, go = ctx.Event(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    reports: Any = ctx.Queue()
    workers: list[Any] = []
    coordinator: subprocess.Popen[bytes] | None = None
    fleet_name = f"soak-{config.seed}"
    http = f"127.0.0.1:{free_port()}"
    rows: list[dict[str, Any]] = []
    try:
        broker.start()
        state = out / "coordinator-state"
        shutil.rmtree(state, ignore_errors=True)
        toml = out / "coordinator.toml"
        _coordinator_toml(toml, broker=broker.url, fleet=fleet_name, state=state,
                          spec=fleet.spec, http=http)
        with (out / "coordinator.log").open("wb") as log:
            coordinator = subprocess.Popen(
                [sys.executable, "-m", "fedasync_iot.coordinator.cli",
                 "run", "--config", str(toml)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        deadline = time.monotonic() + 60
        while _status(http).get("state") != "online":
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"the coordinator did not come up; see {out}/coordinator.log")
            time.sleep(0.2)
        n_workers = config.workers or max(1, (os.cpu_count() or 2) - 1)
        for w, shard in enumerate(np.array_split(np.arange(config.devices),
                                                 min(n_workers, config.devices))):
            spec = WorkerSpec(
                index=w, broker_url=broker.url, fleet=fleet_name,
                traces=tuple(fleet.traces[i] for i in shard),
                data=tuple(fleet.parts[i] for i in shard), scale=config.scale,
                duration_s=sim.duration_sim_s, state_root=str(root / "devices"),
                policy=sim.policy, training=TrainConfig(local_epochs=sim.local_epochs),
                check_interval_s=sim.check_interval_sim_s, seed=config.seed)
            p = ctx.Process(target=run_worker, args=(spec, go, start_at, stop, reports),
                            daemon=True, name=f"soak-worker-{w}")
            p.start()
            workers.append(p)
        for _ in workers:
            reports.get(timeout=120)  # each worker has loaded its devices
        start = time.time() + 0.2
        start_at.value = start
        go.set()
        rows = _sample(config, start=start, duration=duration, http=http, reports=reports,
                       pids={"coordinator": coordinator.pid,
                             **{f"worker{i}": p.pid for i, p in enumerate(workers)},
                             "mosquitto": _child_named("mosquitto")},
                       out=out, progress=progress)
    finally:
        stop.set()
        for p in workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if coordinator is not None and coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(20)
            except subprocess.TimeoutExpired:
                coordinator.kill()
        broker.close()
        shutil.rmtree(root, ignore_errors=True)

    names = [k for k in rows[0] if k.endswith("_mb")] if rows else []
    result: dict[str, Any] = {
        "config": asdict(config),
        "samples": len(rows),
        "updates_accepted": rows[-1]["accepted"] if rows else 0,
        "final_version": rows[-1]["version"] if rows else 0,
        "bound": config.bound,
        "memory": {n[:-3]: growth([r[n] for r in rows], warmup=config.warmup,
                                  window=config.window) for n in names},
    }
    result["growth"] = {k: v["growth"] for k, v in result["memory"].items()}
    result["ok"] = all(g <= config.bound for g in result["growth"].values())
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    return result


def _sample(config: SoakConfig, *, start: float, duration: float, http: str, reports: Any,
            pids: dict[str, int], out: Path, progress: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    online: dict[int, int] = {}
    with (out / "soak.csv").open("w", newline="") as f:
        writer: csv.DictWriter[str] | None = None
        next_at = time.time()
        while (now := time.time()) < start + duration:
            # Drain the workers' reports (they would block on a full pipe otherwise).
            with contextlib.suppress(queue.Empty):
                while True:
                    index, _, totals = reports.get(timeout=max(0.0, next_at - time.time()))
                    if totals:
                        online[index] = int(totals.get("connected", 0))
            if time.time() < next_at:
                continue
            next_at += config.sample_s
            status = _status(http)
            counts = status.get("counts", {})
            row: dict[str, Any] = {
                "time_s": round(now - start, 1), "version": status.get("version", ""),
                "accepted": counts.get("accepted", 0) + counts.get("buffered", 0),
                "connected": sum(online.values()),
                **{f"{name}_mb": round(_rss(pid), 1) for name, pid in pids.items()},
            }
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            rows.append(row)
            if progress:
                mem = "  ".join(f"{k[:-3]} {v:.0f}" for k, v in row.items() if k.endswith("_mb"))
                print(f"[soak] {row['time_s']:6.0f}/{duration:.0f}s  v{row['version']:<6} "
                      f"updates {row['accepted']:<6} connected {row['connected']:<4} "
                      f"RSS MB: {mem}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.soak",
                                description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--sample-s", type=float, default=d.sample_s)
    p.add_argument("--scale", type=float, default=d.scale)
    p.add_argument("--bound", type=float, default=d.bound, help="allowed RSS growth (0.2 = 20%%)")
    p.add_argument("--model", choices=["logistic", "mlp"], default=d.model)
    p.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = p.parse_args(argv)
    config = SoakConfig(minutes=args.minutes, devices=args.devices, seed=args.seed,
                        workers=args.workers, sample_s=args.sample_s, scale=args.scale,
                        bound=args.bound, model=args.model)
    result = run_soak(config, out=args.out)
    print(f"\n{'process':<12} {'after warm-up':>13} {'end':>8} {'peak':>8} {'growth':>8}")
    for name, m in result["memory"].items():
        print(f"{name:<12} {m['baseline_mb']:>10.1f} MB {m['final_mb']:>5.1f} MB "
              f"{m['peak_mb']:>5.1f} MB {m['growth']:>+8.1%}")
    print(f"{result['updates_accepted']} updates merged into {result['final_version']} versions "
          f"in {config.minutes:g} min; bound {config.bound:.0%}: "
          f"{'OK' if result['ok'] else 'EXCEEDED'}\nsummary: {args.out / 'soak.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
