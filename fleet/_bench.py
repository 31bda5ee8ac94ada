"""``fedasync-sim bench``: every headline figure, measured side by side, into bench.json.

- time to target and final accuracy per rule, on several seeds (median, min, max), and the
  speed-up of the best asynchronous rule over synchronous FedAvg, per seed and its median;
- update size per encoding with the final accuracy each reaches (FedBuff, same fleet);
- the coordinator's ingest ratio (bench.ingest) and the agent's footprint
  (bench.agent);
- the largest fleet kept connected on one broker, with its CPU and memory.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedasync_iot.fleet._compare import compare
from fedasync_iot.fleet._fleets import build_fleet
from fedasync_iot.fleet._sim import RULES, SimConfig, run_rule


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def _say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _bench_json(name: str, *args: str) -> dict[str, Any]:
    """`python -m fedasync_iot.bench.<name> ARGS --json FILE`, and what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", f"fedasync_iot.bench.{name}", *args, "--json",
                        f"{tmp}/out.json"], check=True, stdout=subprocess.DEVNULL)
        result: dict[str, Any] = json.loads(Path(f"{tmp}/out.json").read_text())
    return result


def run_bench(config: SimConfig, *, out: Path, seeds: list[int], quick: bool = False
              ) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        config = replace(config, duration_s=min(config.duration_s, 15.0))
    result: dict[str, Any] = {"config": {"devices": config.devices, "duration_s":
                                         config.duration_s, "scale": config.scale,
                                         "model": config.model, "dataset": config.dataset,
                                         "target_accuracy": config.target_accuracy,
                                         "seeds": seeds}}
    # 1. Rules on each seed.
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        _say(f"rules on seed {seed}")
        _, summary = compare(replace(config, seed=seed), RULES, out / f"seed{seed}")
        per_seed[seed] = summary
    ttt = {r: [s["rules"][r]["time_to_target_s"] for s in per_seed.values()] for r in RULES}
    result["time_to_target_s"] = {r: _stats([v for v in vs if v is not None]) for r, vs in
                                  ttt.items()}
    result["target_not_reached"] = {r: sum(v is None for v in vs) for r, vs in ttt.items()}
    result["final_accuracy"] = {r: _stats([s["rules"][r]["final_accuracy"] for s in
                                           per_seed.values()]) for r in RULES}
    speedups = [s["speedup_async_vs_sync"] for s in per_seed.values()
                if s["speedup_async_vs_sync"] is not None]
    result["speedup_async_vs_sync"] = _stats(speedups)
    result["speedup_per_seed"] = {seed: s["speedup_async_vs_sync"] for seed, s in
                                  per_seed.items()}
    result["fleet"] = per_seed[seeds[0]]["fleet"]
    _write(out, result)

    # 2. Encodings, FedBuff on the first seed.
    import numpy as np

    from fedasync_iot.models import UpdateMessage, build_model, encode_update

    enc_config = replace(config, seed=seeds[0])
    fleet = build_fleet(enc_config)
    n = build_model(fleet.spec).n_params
    delta = np.random.default_rng(0).normal(size=n).astype(np.float32)
    result["update_bytes"] = {}
    for encoding in ("float32", "float16", "int8", "topk"):
        _say(f"encoding {encoding}")
        size = len(encode_update(UpdateMessage(device_id="d", update_id="u", base_version=0,
                                               n_samples=1, delta=delta,
                                               encoding=encoding)))
        r = run_rule(replace(enc_config, encoding=encoding), "fedbuff",
                     out / "encodings" / encoding, fleet=fleet)
        result["update_bytes"][encoding] = {"bytes": size,
                                            "final_accuracy": r.summary["final_accuracy"]}
    f32 = result["update_bytes"]["float32"]
    for v in result["update_bytes"].values():
        v["smaller_than_float32"] = round(f32["bytes"] / v["bytes"], 2)
        v["accuracy_change_points"] = round(100 * (v["final_accuracy"] -
                                                   f32["final_accuracy"]), 2)
    _write(out, result)

    # 3. Coordinator ingest and agent footprint.
    # Both in fresh processes, through their command lines: bench sits above fleet (it may use
    # the simulator; the simulator never imports a benchmark), and ru_maxrss of children would
    # otherwise include the sim's workers.
    _say("coordinator ingest benchmark")
    ingest = _bench_json("ingest", "--updates", str(600 if quick else 3000))
    result["coordinator_ingest"] = ingest
    result["coordinator_ingest_ratio"] = ingest.get("ratio") or ingest.get(
        "coordinator_ingest_ratio")
    _say("agent footprint")
    agent = _bench_json("agent")
    result.update({k: agent[k] for k in ("agent_idle_rss_mb", "agent_idle_cpu_percent",
                                         "agent_train_peak_rss_mb",
                                         "inprocess_rss_after_train_mb")})
    _write(out, result)

    # 4. Scale: a large fleet on one broker.
    devices = 200 if quick else 1000
    _say(f"scale: {devices} devices")
    # Everyone present all the time: this measures connections, not churn.
    present = replace(config.profile, late_join_fraction=0.0, early_leave_fraction=0.0,
                      flap_fraction=0.0)
    # On the wall clock: this measures how many connections one broker keeps up in real
    # time; on the virtual clock 16 simulated hours of 1,000 devices take as long as their work.
    scale_cfg = replace(config, devices=devices, dataset="synthetic", seed=seeds[0],
                        duration_s=20.0 if quick else 60.0, check_interval_sim_s=600.0,
                        profile=present, clock="wall")
    r = run_rule(scale_cfg, "fedbuff", out / "scale", fleet=build_fleet(scale_cfg))
    rows = r.summary.get("rows_peak", {})
    machine = {k: r.machine.get(k) for k in ("peak_rss_mb", "mean_cpu_percent", "wall_s")}
    result["scale"] = {"devices": devices, **rows, **machine, "final_accuracy":
                       r.summary["final_accuracy"], "updates": r.summary["updates_accepted"]}
    result["max_devices_connected"] = rows.get("max_connected")
    _write(out, result)
    _say(f"done: {out / 'bench.json'}")
    return result


def _write(out: Path, result: dict[str, Any]) -> None:
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))


GRID: dict[str, list[dict[str, Any]]] = {
    "fedasync": [{"fedasync_alpha": a} for a in (0.3, 0.6, 0.9)],
    "fedbuff": [{"fedbuff_k": k} for k in (3, 5, 10)],
    "fedavg-sync": [{"cohort_size": c, "round_deadline_sim_s": d}
                    for c in (5, 10) for d in (1800.0, 3600.0)],
}


def tune(config: SimConfig, *, out: Path, seed: int = 100) -> dict[str, Any]:
    """Small grid per rule on a seed kept out of the reported ones; best = earliest time to
    target, then highest final accuracy."""
    config = replace(config, seed=seed)
    fleet = build_fleet(config)
    best: dict[str, Any] = {}
    trials: list[dict[str, Any]] = []
    for rule, grid in GRID.items():
        for settings in grid:
            _say(f"tune {rule} {settings}")
            r = run_rule(replace(config, **settings), rule,
                         out / "tune" / f"{rule}-{len(trials)}", fleet=fleet)
            ttt = r.summary["time_to_target_s"]
            trial = {"rule": rule, **settings, "time_to_target_s": ttt,
                     "final_accuracy": r.summary["final_accuracy"]}
            trials.append(trial)
            key = (ttt if ttt is not None else float("inf"), -(trial["final_accuracy"] or 0))
            if rule not in best or key < best[rule]["_key"]:
                best[rule] = {**trial, "_key": key}
    result = {"seed": seed, "trials": trials,
              "best": {r: {k: v for k, v in b.items() if k != "_key"} for r, b in best.items()}}
    (out / "tune.json").write_text(json.dumps(result, indent=1))
    return result
