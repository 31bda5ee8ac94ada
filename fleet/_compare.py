"""Run one fleet under several rules, side by side: the runs, their plot and their summary."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedasync_iot.fleet._fleets import build_fleet
from fedasync_iot.fleet._plot import plot_accuracy
from fedasync_iot.fleet._sim import (
    RunResult,
    SimConfig,
    fleet_summary,
    metric_of,
    run_rule,
    speedup,
)


def compare(config: SimConfig, rules: Sequence[str], out: Path, *, progress: bool = True
            ) -> tuple[list[RunResult], dict[str, Any]]:
    """Run the same fleet under each rule, then plot and summarise them together."""
    fleet = build_fleet(config)
    profile = fleet_summary(config, fleet)
    if progress:
        print(f"fleet: {len(fleet.traces)} devices, {profile['eligible']:.0%} of device-time "
              f"eligible, compute p10/p50/p90 {profile['speed_p10']:.0f}/"
              f"{profile['speed_p50']:.0f}/{profile['speed_p90']:.0f} sim s per epoch per 100 "
              f"samples; {config.duration_s:.0f}s per rule", file=sys.stderr)
    results = [run_rule(config, rule, out / rule, fleet=fleet, progress=progress)
               for rule in rules]
    summary = {"rules": {r.rule: r.summary for r in results},
               "speedup_async_vs_sync": speedup(results), "fleet": profile}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    data = Path(config.fleet_file).name if config.fleet_file else config.dataset
    plot_accuracy(results, out / "accuracy.png", scale=config.scale,
                  target=config.target_accuracy, metric=metric_of(fleet.spec),
                  title=f"{len(fleet.traces)} devices, {config.model} on {data}, "
                        f"seed {config.seed}")
    return results, summary
