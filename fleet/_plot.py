"""Accuracy-over-time plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedasync_iot.fleet._sim import RunResult

COLORS = {"fedbuff": "tab:blue", "fedasync": "tab:green", "fedavg-sync": "tab:red"}


def plot_accuracy(results: Sequence[RunResult], path: Path, *, scale: float,
                  target: float | None = None, title: str = "", metric: str = "accuracy"
                  ) -> Path:
    """The held-out `metric` over time per rule (accuracy; R^2 for a regressor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    local = [r for r in results if r.summary.get("local_accuracy")]
    if local:  # a second panel: how the final model serves each device (its tail first)
        fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110,
                                       gridspec_kw={"width_ratios": [2, 1]})
        _plot_local(bars, local)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in results:
        if not r.evaluations:
            continue
        t = [max(e[0], 0.0) for e in r.evaluations]
        acc = [e[2] for e in r.evaluations]
        ttt = r.summary.get("time_to_target_s")
        label = f"{r.rule} (final {r.summary.get('final_metric')}"
        label += f", target at {ttt:.1f}s)" if ttt is not None else ", target not reached)"
        base, _, correction = r.rule.partition("+")
        ax.plot(t, acc, drawstyle="steps-post", color=COLORS.get(base),
                linestyle="--" if correction else "-", label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target}")
    ax.set_xlabel(f"seconds of the run's clock ({scale:g} simulated s each)")
    ax.set_ylabel(f"held-out {'R²' if metric == 'r2' else metric}")
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    else:  # R^2 starts far below 0 for an untrained model; show its useful range
        low = min((e[2] for r in results for e in r.evaluations), default=0.0)
        ax.set_ylim(max(low, -1.0) - 0.05, 1.0)
    ax.grid(alpha=0.3)
    def to_hours(s: Any) -> Any:
        return np.asarray(s) * scale / 3600

    def to_seconds(h: Any) -> Any:
        return np.asarray(h) * 3600 / scale

    sim = ax.secondary_xaxis("top", functions=(to_hours, to_seconds))
    sim.set_xlabel("simulated hours")
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_local(ax: Any, results: Sequence[RunResult]) -> None:
    names = [r.rule for r in results]
    x = np.arange(len(names))
    stats = [r.summary["local_accuracy"] for r in results]
    metric = stats[0].get("metric", "accuracy")
    for offset, key, label, alpha in ((-0.2, "mean", "mean over devices", 0.9),
                                      (0.2, "worst_10pct", "worst 10% of devices", 0.5)):
        values = [s[key] for s in stats]
        ax.bar(x + offset, values, width=0.4, alpha=alpha, label=label,
               color=[COLORS.get(n.partition("+")[0], "tab:grey") for n in names])
        for xi, v in zip(x + offset, values, strict=True):
            ax.text(xi, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ginis = [r.summary.get("participation", {}).get("gini") for r in results]
    ax.set_xticks(x, [f"{n}\nGini {g:.2f}" if g is not None else n
                      for n, g in zip(names, ginis, strict=True)], fontsize=7)
    ax.set_ylabel(f"final model's {metric} on each device's own test set")
    if metric == "accuracy":
        ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3, axis="y")
