"""What differential privacy costs: final accuracy and time to target against epsilon, for local
DP (the agents' noise and lifetime budget) and central DP (the coordinator's), on the bench
fleet, the virtual clock, median of seeds.

    nice -n 10 python -m fedasync_iot.bench.privacy [--seeds 1,2,3] [--rule fedbuff]
        [--out runs/privacy]

Calibration, on seed 0 (not reported), without DP: how many updates the median device sends
(T) and how many versions the busiest device shapes (V) in the run. At each epsilon, local DP
gets the smallest noise multiplier sigma that lets T updates through a budget of epsilon (the
device-level accountant, agent/_privacy.py), and that budget; central DP gets the multiplier z
whose V versions cost epsilon (coordinator/_central_dp.py). Each run reports what it actually
spent (summary.json 'privacy'). Writes docs/privacy.json and docs/privacy.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedasync_iot.agent import device_multiplier
from fedasync_iot.coordinator import Store, versions_per_device
from fedasync_iot.fleet import SimConfig, build_fleet, run_rule
from fedasync_iot.models import epsilon

# The 1-8, then where the accuracy comes back on a fleet this small.
EPSILONS = (1.0, 2.0, 4.0, 8.0, 64.0, 512.0)
DELTA = 1e-5
# About a third of a first update's L2 norm on this fleet (2.8 median) and above most later
# ones: smaller clips lose signal, larger ones need more noise for the same epsilon.
LOCAL_CLIP = 1.0
CENTRAL_CLIP = 1.0
CALIBRATION_SEED = 0


def smallest_multiplier(eps: float, cost: Callable[[float], float]) -> float:
    """The smallest multiplier m with cost(m) <= eps (cost decreasing in m), to 0.1%."""
    lo, hi = 0.01, 1.0
    while cost(hi) > eps:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= eps else (mid, hi)
    return hi


def local_sigma(eps: float, updates: int) -> float:
    return smallest_multiplier(eps, lambda s: epsilon([(device_multiplier(s), updates)], DELTA))


def central_z(eps: float, versions: int) -> float:
    return smallest_multiplier(eps, lambda z: epsilon([(z, versions)], DELTA))


def _lineage(out: Path) -> list[Any]:
    store = Store.open_readonly(out / "coordinator-state")
    try:
        return store.lineage()
    finally:
        store.close()


def _run(config: SimConfig, rule: str, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    result = run_rule(config, rule, out, fleet=build_fleet(config), progress=False)
    s = result.summary
    print(f"[privacy] {out.name}: final {s['final_accuracy']:.3f}, time to target "
          f"{s['time_to_target_s']}, {time.monotonic() - started:.0f} s wall", file=sys.stderr,
          flush=True)
    return {"final_accuracy": s["final_accuracy"], "time_to_target_s": s["time_to_target_s"],
            "updates_accepted": s["updates_accepted"], "versions": s["versions"],
            "privacy": s["privacy"]}


def _median(values: list[float | None]) -> float | None:
    """The median over seeds, None (target not reached) counted as slowest."""
    if sum(v is None for v in values) * 2 > len(values):
        return None
    ranked = sorted(values, key=lambda v: float("inf") if v is None else v)
    return ranked[len(ranked) // 2]


def measure(base: SimConfig, rule: str, seeds: list[int], out: Path) -> dict[str, Any]:
    calibration = replace(base, seed=CALIBRATION_SEED)
    _run(calibration, rule, out / "calibration")
    lineage = _lineage(out / "calibration")
    sent = Counter(r.device_id for r in lineage if r.outcome == "accepted")
    updates = int(statistics.median(sent.values()))
    versions = max(versions_per_device(lineage).values())
    settings = {"local": {str(e): local_sigma(e, updates) for e in EPSILONS},
                "central": {str(e): central_z(e, versions) for e in EPSILONS}}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"none": {"-": []}, "local": {},
                                                         "central": {}}
    for seed in seeds:
        config = replace(base, seed=seed)
        runs["none"]["-"].append(_run(config, rule, out / f"seed{seed}-none"))
        for e in EPSILONS:
            local = replace(config, noise_multiplier=settings["local"][str(e)],
                            clip_norm=LOCAL_CLIP, epsilon_budget=e, dp_delta=DELTA)
            runs["local"].setdefault(str(e), []).append(
                _run(local, rule, out / f"seed{seed}-local-{e:g}"))
            central = replace(config, central_noise_multiplier=settings["central"][str(e)],
                              central_clip_norm=CENTRAL_CLIP, dp_delta=DELTA)
            runs["central"].setdefault(str(e), []).append(
                _run(central, rule, out / f"seed{seed}-central-{e:g}"))
    table = []
    for mode, by_eps in runs.items():
        for key, rs in by_eps.items():
            central_eps = [r["privacy"]["central"]["epsilon"] for r in rs
                           if r["privacy"]["central"] is not None]
            table.append({
                "mode": mode, "epsilon": None if key == "-" else float(key),
                "multiplier": settings[mode][key] if mode != "none" else None,
                "final_accuracy": _median([r["final_accuracy"] for r in rs]),
                "final_accuracy_range": [min(r["final_accuracy"] for r in rs),
                                         max(r["final_accuracy"] for r in rs)],
                "time_to_target_s": _median([r["time_to_target_s"] for r in rs]),
                "target_reached": sum(r["time_to_target_s"] is not None for r in rs),
                "device_epsilon_max": max((r["privacy"]["device_epsilon"]["max"] or 0.0)
                                          for r in rs) if mode == "local" else None,
                "devices_at_budget": _median([r["privacy"]["devices_at_budget"] for r in rs])
                if mode == "local" else None,
                "coordinator_epsilon": max(central_eps) if central_eps else None,
                "updates_accepted": _median([r["updates_accepted"] for r in rs]),
            })
    return {"rule": rule, "seeds": seeds, "delta": DELTA, "local_clip": LOCAL_CLIP,
            "central_clip": CENTRAL_CLIP, "devices": base.devices,
            "duration_sim_h": base.duration_sim_s / 3600, "target": base.target_accuracy,
            "calibration": {"seed": CALIBRATION_SEED, "median_updates_per_device": updates,
                            "max_versions_per_device": versions},
            "table": table, "runs": runs}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("local", "o-"), ("central", "s-")):
        rows = [r for r in result["table"] if r["mode"] == mode]
        ax.plot([r["epsilon"] for r in rows], [r["final_accuracy"] for r in rows], style,
                label=f"{mode} DP")
    none = next(r for r in result["table"] if r["mode"] == "none")
    ax.axhline(none["final_accuracy"], ls="--", c="gray", label="no DP")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(EPSILONS), [f"{e:g}" for e in EPSILONS])
    ax.set_xlabel(f"epsilon (delta {result['delta']:g}): per device, lifetime")
    ax.set_ylabel("final held-out accuracy (median of seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['rule']}, {result['devices']} devices, "
                 f"{result['duration_sim_h']:g} simulated hours")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.privacy", description=__doc__)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--rule", default="fedbuff", choices=["fedbuff", "fedavg-sync"])
    p.add_argument("--out", type=Path, default=Path("runs/privacy"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = measure(SimConfig(), args.rule, seeds, args.out)
    (args.docs / "privacy.json").write_text(json.dumps(result, indent=1))
    plot(result, args.docs / "privacy.png")
    for r in result["table"]:
        print(json.dumps({k: v for k, v in r.items() if k != "final_accuracy_range"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
