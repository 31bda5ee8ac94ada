"""``fedasync-sim``: simulate a fleet on a local broker and compare merge rules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fleet._sim import RULES, RunResult, SimConfig, build_fleet, fleet_summary, run_rule, speedup
from models import FedAsyncError
from models._logging import setup_logging

log = logging.getLogger("fedasync.fleet")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except FedAsyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; nothing is left running", file=sys.stderr)
        return 130


def _common(p: argparse.ArgumentParser) -> None:
    d = SimConfig()
    p.add_argument("--devices", type=int, default=d.devices, help="simulated devices (%(default)s)")
    p.add_argument("--duration", type=float, default=d.duration_s,
                   help="wall seconds per rule (%(default)s)")
    p.add_argument("--scale", type=float, default=d.scale,
                   help="simulated seconds per wall second (%(default)s: 12 sim hours in 45 s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", choices=["logistic", "mlp"], default=d.model)
    p.add_argument("--dataset", choices=["digits", "synthetic"], default=d.dataset)
    p.add_argument("--encoding", choices=["float32", "float16", "int8", "topk"],
                   default=d.encoding)
    p.add_argument("--alpha", type=float, default=d.dirichlet_alpha,
                   help="Dirichlet alpha of the non-IID split (%(default)s; smaller = more skew)")
    p.add_argument("--target", type=float, default=d.target_accuracy,
                   help="accuracy for time-to-target (%(default)s)")
    p.add_argument("--workers", type=int, default=0, help="device processes (0: auto)")
    p.add_argument("--broker", help="use this broker (mqtt://host:port) instead of starting one")
    p.add_argument("--embedded-broker", action="store_true",
                   help="use the pure-Python broker even if Mosquitto is installed")
    p.add_argument("--log-level", default="WARNING")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedasync-sim",
        description="Simulate a fleet of devices (real agent code, real MQTT) with uneven "
                    "speed, battery and connectivity, and compare merge rules.",
        epilog="With no command: `run` with the defaults, i.e. the demo (50 devices, FedBuff "
               "vs synchronous FedAvg).")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one rule or compare several (default)")
    _common(run)
    run.add_argument("--compare", default="fedbuff,fedavg-sync",
                     help=f"comma-separated rules out of {', '.join(RULES)} (%(default)s)")
    run.add_argument("--rule", help="a single rule (overrides --compare)")
    run.add_argument("--out", type=Path, default=Path("runs/demo"),
                     help="output directory (%(default)s)")
    run.set_defaults(func=_run)
    bench = sub.add_parser("bench", help="the full benchmark: bench.json with every figure")
    _common(bench)
    bench.add_argument("--out", type=Path, default=Path("runs/bench"))
    bench.add_argument("--seeds", default="1,2,3", help="reported seeds (%(default)s)")
    bench.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    bench.set_defaults(func=_bench)
    tune = sub.add_parser("tune", help="grid-search each rule's settings on a held-out seed")
    _common(tune)
    tune.add_argument("--out", type=Path, default=Path("runs/tune"))
    tune.set_defaults(func=_tune)
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return replace(SimConfig(), devices=args.devices, duration_s=args.duration,
                   scale=args.scale, seed=args.seed, model=args.model, dataset=args.dataset,
                   encoding=args.encoding, dirichlet_alpha=args.alpha,
                   target_accuracy=args.target, workers=args.workers, broker=args.broker,
                   broker_kind="embedded" if args.embedded_broker else "auto")


def compare(config: SimConfig, rules: Sequence[str], out: Path, *, progress: bool = True
            ) -> tuple[list[RunResult], dict[str, Any]]:
    """Run the same fleet under each rule, then plot and summarise them together."""
    from fleet._plot import plot_accuracy

    fleet = build_fleet(config)
    profile = fleet_summary(config, fleet)
    if progress:
        print(f"fleet: {config.devices} devices, {profile['eligible']:.0%} of device-time "
              f"eligible, compute p10/p50/p90 {profile['speed_p10']:.0f}/"
              f"{profile['speed_p50']:.0f}/{profile['speed_p90']:.0f} sim s per epoch per 100 "
              f"samples; {config.duration_s:.0f}s per rule", file=sys.stderr)
    results = [run_rule(config, rule, out / rule, fleet=fleet, progress=progress)
               for rule in rules]
    summary = {"rules": {r.rule: r.summary for r in results},
               "speedup_async_vs_sync": speedup(results), "fleet": profile}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_accuracy(results, out / "accuracy.png", scale=config.scale,
                  target=config.target_accuracy,
                  title=f"{config.devices} devices, {config.model} on {config.dataset}, "
                        f"seed {config.seed}")
    return results, summary


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    rules = [args.rule] if args.rule else [r.strip() for r in args.compare.split(",") if r]
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise FedAsyncError(f"unknown rule(s) {unknown}; choose from {', '.join(RULES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results, summary = compare(config, rules, args.out)
    print()
    print(f"{'rule':<12} {'final acc':>9} {'time to ' + str(config.target_accuracy):>14} "
          f"{'versions':>8} {'updates':>8}")
    for r in results:
        s = r.summary
        ttt = "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.1f}s"
        print(f"{r.rule:<12} {s['final_accuracy'] or 0:>9.3f} {ttt:>14} {s['versions']:>8} "
              f"{s['updates_accepted']:>8}")
    if summary["speedup_async_vs_sync"] is not None:
        print(f"speed-up of asynchronous over synchronous: {summary['speedup_async_vs_sync']}x")
    print(f"\nplot:    {args.out / 'accuracy.png'}\nsummary: {args.out / 'summary.json'}\n"
          f"metrics: {args.out}/<rule>/metrics.csv")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from fleet._bench import tune

    result = tune(config_from_args(args), out=args.out, seed=args.seed)
    for rule, best in result["best"].items():
        print(f"{rule:<12} {best}")
    print(f"all trials: {args.out / 'tune.json'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fleet._bench import run_bench

    run_bench(config_from_args(args), out=args.out,
              seeds=[int(s) for s in args.seeds.split(",")], quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
