"""Issue 22's straggler fleet as a fleet file:
``python -m fedasync_iot.bench.stragglers --out DIR``; or one of bench/robustness.py's map fleets,
exactly (its data split, device speeds and system settings for a seed), to run through the real
system: ``python -m fedasync_iot.bench.stragglers --map-fleet "straggler s1 x20 1s" --seed 1
--out DIR``.

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
from dataclasses import replace
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
    return _write_always_on(
        out / name, run=["seed = 1", "scale = 1.0", f"target = {target}", *run],
        model=["learning_rate = 0.05", "local_epochs = 1"], check_interval_s=f"{check_interval_s}",
        devices=[[f'id = "sim-{i:05d}"', f'data = "data/sim-{i:05d}.npz"',
                  f'test = "data/sim-{i:05d}-test.npz"', f"epoch_seconds = {epoch:.3f}"]
                 for i, epoch in enumerate(epochs)])


def _write_always_on(path: Path, *, run: Sequence[str], model: Sequence[str],
                     check_interval_s: str, devices: Sequence[Sequence[str]]) -> Path:
    """A fleet file of always-available devices (no traces) of the logistic model, training as
    soon as a newer model is out (no dwell, no minimum interval); test set data/test.npz."""
    lines = ["[run]", 'test_file = "data/test.npz"', *run, "",
             "[model]", 'kind = "logistic"', *model, "",
             "[agent]", f"check_interval_s = {check_interval_s}", "min_train_interval_s = 0.0",
             "", "[policy]", "min_dwell_s = 0.0", ""]
    for device in devices:
        lines += ["[[devices]]", *device, ""]
    path.write_text("\n".join(lines))
    return path


def straggler_fleet(out: Path, devices: int = 20) -> Path:
    epochs = np.exp(np.random.default_rng(22).normal(0.0, 1.0, size=devices))
    return always_on_fleet(out, "stragglers.toml", list(epochs), check_interval_s=1.0,
                           target=0.9, run=["duration_s = 150.0", "deadline_min = 1.0",
                                            f"cohort_size = {devices // 2}"])


def map_fleet_file(name: str, seed: int, out: Path) -> Path:
    """Write `out/fleet.toml` and its data: the map fleet `name` of bench/robustness.py for
    `seed`, device for device (its Dirichlet share of the digits, its epoch), with the harness's
    system settings where the real system has them (a check interval of the harness's poll, or
    half a median epoch on slow fleets, where a periodic check only adds events; the
    synchronous cohort and deadline) and its duration. Devices always available: a map fleet
    whose devices pause between trainings (`idle_mean_s`) has no fleet-file form."""
    from fedasync_iot.bench.robustness import _Data, device_epochs, map_fleets

    fleets = map_fleets()
    if name not in fleets:
        raise ValueError(f"unknown map fleet {name!r}; the map has {list(fleets)}")
    fleet = replace(fleets[name], seed=seed)
    if fleet.idle_mean_s:
        raise ValueError(f"{name!r}: devices that pause between trainings have no fleet file")
    data = _Data(fleet)
    (out / "data").mkdir(parents=True, exist_ok=True)
    np.savez(out / "data" / "test.npz", X=data.test[0].astype(np.float32),
             y=data.test[1].astype(np.int64))
    deadline_min = fleet.deadline_s / 60 if fleet.deadline_s else 10 * fleet.epoch_max_s / 60
    devices = []
    for i, ((X, y), epoch) in enumerate(zip(data.parts, device_epochs(fleet), strict=True)):
        np.savez(out / "data" / f"d{i}.npz", X=X.astype(np.float32), y=y.astype(np.int64))
        devices.append([f'id = "d{i}"', f'data = "data/d{i}.npz"',
                        f"epoch_seconds = {float(epoch)!r}"])
    return _write_always_on(
        out / "fleet.toml",
        run=[f"seed = {seed}", "scale = 1.0", "target = 0.9",  # issue 22's target
             f"duration_s = {fleet.duration_s}", f"deadline_min = {deadline_min!r}",
             *([f"cohort_size = {fleet.sync_cohort}"] if fleet.sync_cohort else [])],
        model=[f"learning_rate = {fleet.learning_rate}", f"local_epochs = {fleet.local_epochs}",
               f"batch_size = {fleet.batch_size}", f"l2 = {fleet.l2}"],
        check_interval_s=f"{max(fleet.poll_s, fleet.median_epoch_s / 2):.6g}", devices=devices)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.stragglers",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the fleet file")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--map-fleet", metavar="NAME", default=None,
                   help="instead: this fleet of bench/robustness.py's map, exactly")
    p.add_argument("--seed", type=int, default=1, help="the map fleet's seed (1)")
    args = p.parse_args(argv)
    if args.map_fleet is None:
        print(straggler_fleet(args.out, args.devices))
        return 0
    try:
        path = map_fleet_file(args.map_fleet, args.seed, args.out)
    except ValueError as e:
        p.error(str(e))
    print(f"{path}\nthen: fedasync-sim --fleet-file {path} --compare "
          "fedasync,fedbuff,fedavg-sync --out DIR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
