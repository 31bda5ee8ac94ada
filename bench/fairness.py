"""Uneven participation on the virtual clock: each correction against its plain rule, per seed.

The fleet of docs/benchmarks.md "Uneven participation": 50 devices, digits split by Dirichlet
0.1, the devices whose most common label is 0, 1 or 2 made slow rare chargers (availability
correlated with data), 24 simulated hours. Every seed runs the plain rules and each correction
(FedAsync's default reweighting against ``fedasync+plain``, ``fedbuff+memory``,
``fedbuff+cap``) on the same fleet; the virtual
clock makes each run reproducible, so a difference is the correction's, not the machine's.

A fourth correction is the devices' own: ``+fit`` fits each device's local work into half of
its typical eligible window (agent/_budget.py), so rarely available devices finish an update
before they drop out.

Per run: global accuracy (held-out, the run's last tenth) and, over the models of that last
tenth, the mean accuracy of the worst-served 10% of devices on their own label mix. A
correction earns a default when it raises the median worst 10% over the seeds without costing
more than 1 point of median global accuracy (issue 16).

    python -m fedasync_iot.bench.fairness --seeds 1,2,3,4,5 --out runs/fairness [--resume]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedasync_iot.fleet import SimConfig, build_fleet, run_rule

# what is measured: against what. The product's defaults (FedAsync reweights; every agent fits
# its work to its windows) are the bare rule names; "+plain" turns both off, and a correction
# named with it turns on alone.
PAIRS = (("fedasync+plain+reweight", "fedasync+plain"), ("fedasync+plain+fit", "fedasync+plain"),
         ("fedasync", "fedasync+plain+reweight"), ("fedasync", "fedasync+plain"),
         ("fedbuff", "fedbuff+plain"), ("fedbuff+plain+memory", "fedbuff+plain"),
         ("fedbuff+plain+cap", "fedbuff+plain"))
RULES = ("fedasync+plain", "fedasync+plain+reweight", "fedasync+plain+fit", "fedasync",
         "fedbuff+plain", "fedbuff+plain+memory", "fedbuff+plain+cap", "fedbuff")


def fleet_config(seed: int) -> SimConfig:
    return replace(SimConfig(), seed=seed, correlate_labels=(0, 1, 2), dirichlet_alpha=0.1,
                   scale=1920.0, participation_cap=2)


def _figures(summary: dict[str, Any]) -> dict[str, float | None]:
    local = summary.get("local_accuracy") or {}
    constrained = (summary.get("participation") or {}).get("constrained") or {}
    return {"global": summary.get("final_metric"), "worst_10pct": local.get("worst_10pct"),
            "device_mean": local.get("mean"),
            "constrained": constrained.get("local_accuracy_mean"),
            "gini": (summary.get("participation") or {}).get("gini")}


def verdicts(per_seed: dict[int, dict[str, dict[str, float | None]]]) -> dict[str, Any]:
    """Per correction: median change of worst 10% and of global accuracy (points) against its
    plain rule, each seed's change, and whether it meets the bar for a default."""
    out: dict[str, Any] = {}
    for fixed, plain in PAIRS:
        worst, glob = [], []
        for runs in per_seed.values():
            if plain not in runs or fixed not in runs:
                continue
            a, b = runs[plain], runs[fixed]
            if None in (a["worst_10pct"], b["worst_10pct"], a["global"], b["global"]):
                continue
            worst.append(100 * (b["worst_10pct"] - a["worst_10pct"]))  # type: ignore[operator]
            glob.append(100 * (b["global"] - a["global"]))  # type: ignore[operator]
        if not worst:
            continue
        med_w, med_g = statistics.median(worst), statistics.median(glob)
        out[f"{fixed} vs {plain}"] = {
            "worst_10pct_points_median": round(med_w, 2), "global_points_median": round(med_g, 2),
            "worst_10pct_points": [round(x, 2) for x in worst],
            "global_points": [round(x, 2) for x in glob], "default": med_w > 0 and med_g >= -1.0}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.fairness",
                                description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3,4,5", help="comma-separated (1,2,3,4,5)")
    p.add_argument("--rules", default=",".join(RULES), help=f"({','.join(RULES)})")
    p.add_argument("--out", type=Path, default=Path("runs/fairness"))
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already in --out (the virtual clock makes a rerun "
                        "identical, as long as the code has not changed since)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    rules = [r for r in args.rules.split(",") if r]
    per_seed: dict[int, dict[str, dict[str, float | None]]] = {}
    for seed in seeds:
        config = fleet_config(seed)
        fleet = build_fleet(config)
        per_seed[seed] = {}
        for rule in rules:
            out = args.out / f"seed{seed}" / rule
            if args.resume and (out / "summary.json").is_file():
                summary = json.loads((out / "summary.json").read_text())
            else:
                print(f"[fairness] seed {seed}: {rule}", file=sys.stderr, flush=True)
                summary = run_rule(config, rule, out, fleet=fleet, progress=False).summary
            per_seed[seed][rule] = _figures(summary)
        (args.out / "fairness.json").write_text(json.dumps(
            {"per_seed": per_seed, "verdicts": verdicts(per_seed)}, indent=1))
    result = verdicts(per_seed)
    print(f"{'seed':>4} {'rule':<24} {'global':>7} {'worst 10%':>9} {'constrained':>11}")
    for seed, runs in per_seed.items():
        for rule, f in runs.items():
            cells = [f"{v:.3f}" if isinstance(v, float) else "-" for v in
                     (f["global"], f["worst_10pct"], f["constrained"])]
            print(f"{seed:>4} {rule:<24} {cells[0]:>7} {cells[1]:>9} {cells[2]:>11}")
    for rule, v in result.items():
        print(f"{rule}: worst 10% {v['worst_10pct_points_median']:+.1f} "
              f"points (median), global {v['global_points_median']:+.1f}; "
              f"{'meets' if v['default'] else 'does not meet'} the bar for a default")
    print(f"written: {args.out / 'fairness.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
