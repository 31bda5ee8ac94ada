"""Issue 22's straggler fleet as a fleet file:
``python -m fedasync_iot.bench.stragglers --out DIR``.

Exports the synthetic fleet's data (20 devices, digits split Dirichlet 0.5, seed 1) and writes
``DIR/stragglers.toml``: every device always available (no traces, no battery), epochs
log-normal(0, 1) seconds (seed 22: 0.18-8.6 s), the logistic model, one local epoch, a 1 s poll,
no dwell, synchronous FedAvg with a cohort of 10, target 0.90, 150 s per rule. Then::

    fedasync-sim --fleet-file DIR/stragglers.toml --compare fedasync,fedbuff,fedavg-sync
    fedasync-sim --fleet-file DIR/stragglers.toml --clock wall --duration 90 ...  # real time
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedasync_iot.fleet.cli import main as sim


def always_on_fleet(out: Path, name: str, epochs: Sequence[float], *, check_interval_s: float,
                    target: float, run: Sequence[str] = ()) -> Path:
    """Export the synthetic fleet's data for ``len(epochs)`` devices (seed 1) into `out` and
    write `out/name`: always-available devices training at once, device i one local epoch of
    ``epochs[i]`` sim seconds, `check_interval_s` poll, no dwell; `run`: more ``[run]`` lines."""
    if sim(["export-fleet", "--devices", str(len(epochs)), "--dataset", "digits", "--seed", "1",
            "--out", str(out)]) != 0:
        raise RuntimeError(f"export-fleet into {out} failed")
    lines = ["[run]", 'test_file = "data/test.npz"', "seed = 1", "scale = 1.0",
             f"target = {target}", *run, "",
             "[model]", 'kind = "logistic"', "learning_rate = 0.05", "local_epochs = 1", "",
             "[agent]", f"check_interval_s = {check_interval_s}", "min_train_interval_s = 0.0",
             "", "[policy]", "min_dwell_s = 0.0", ""]
    for i, epoch in enumerate(epochs):
        lines += ["[[devices]]", f'id = "sim-{i:05d}"', f'data = "data/sim-{i:05d}.npz"',
                  f'test = "data/sim-{i:05d}-test.npz"', f"epoch_seconds = {epoch:.3f}", ""]
    path = out / name
    path.write_text("\n".join(lines))
    return path


def straggler_fleet(out: Path, devices: int = 20) -> Path:
    epochs = np.exp(np.random.default_rng(22).normal(0.0, 1.0, size=devices))
    return always_on_fleet(out, "stragglers.toml", list(epochs), check_interval_s=1.0,
                           target=0.9, run=["duration_s = 150.0", "deadline_min = 1.0",
                                            f"cohort_size = {devices // 2}"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.stragglers",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the fleet file")
    p.add_argument("--devices", type=int, default=20)
    args = p.parse_args(argv)
    print(straggler_fleet(args.out, args.devices))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
