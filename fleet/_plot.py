"""Accuracy-over-time plots (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fleet._sim import RunResult

COLORS = {"fedbuff": "tab:blue", "fedasync": "tab:green", "fedavg-sync": "tab:red"}


def plot_accuracy(results: Sequence[RunResult], path: Path, *, scale: float,
                  target: float | None = None, title: str = "", metric: str = "accuracy"
                  ) -> Path:
    """The held-out `metric` over time per rule (accuracy; R^2 for a regressor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in results:
        if not r.evaluations:
            continue
        t = [max(e[0], 0.0) for e in r.evaluations]
        acc = [e[2] for e in r.evaluations]
        ttt = r.summary.get("time_to_target_s")
        label = f"{r.rule} (final {r.summary.get('final_metric')}"
        label += f", target at {ttt:.1f}s)" if ttt is not None else ", target not reached)"
        ax.plot(t, acc, drawstyle="steps-post", color=COLORS.get(r.rule), label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target}")
    ax.set_xlabel("wall-clock seconds")
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
