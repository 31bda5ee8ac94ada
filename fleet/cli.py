"""``fedasync-sim``: simulate a fleet on a local broker and compare merge rules; replay a user's
own fleet from a fleet file (``--fleet-file``) or write the synthetic one as such a file
(``export-fleet``)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from fedasync_iot.fleet._compare import compare
from fedasync_iot.fleet._sim import (
    RULES,
    SimConfig,
    split_rule,
)
from fedasync_iot.fleet._traffic import per_device_line, table_cells
from fedasync_iot.models import (
    ConfigError,
    FedAsyncError,
    add_version,
    log_level,
    make_parser,
    setup_logging,
)

log = logging.getLogger("fedasync.fleet")


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the console script, not a caller in a process of its own
        # SIGTERM (kill, timeout, systemd) ends a run as Ctrl-C does: the finally blocks stop
        # the workers and the private Mosquitto, which Python's default handler leaves running.
        signal.signal(signal.SIGTERM, _terminated)
    argv = list(sys.argv[1:] if argv is None else argv)
    # No command is `run`, so `fedasync-sim --devices 20` works; --help and --version are the
    # top-level ones, which list the commands.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
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


# Flags that set a SimConfig field: (flag's dest, field). Their argparse default is None, so
# only flags actually given override a fleet file's settings.
_FIELDS = (("devices", "devices"), ("duration", "duration_s"), ("scale", "scale"),
           ("seed", "seed"), ("model", "model"), ("dataset", "dataset"),
           ("encoding", "encoding"), ("alpha", "dirichlet_alpha"), ("target", "target_accuracy"),
           ("workers", "workers"), ("lr", "learning_rate"), ("local_epochs", "local_epochs"),
           ("batch_size", "batch_size"), ("hidden", "hidden"), ("l2", "l2"),
           ("cohort", "cohort_size"), ("over_selection", "over_selection"),
           ("fedasync_alpha", "fedasync_alpha"), ("fedbuff_k", "fedbuff_k"),
           ("fedbuff_lr", "fedbuff_server_lr"),
           ("correlate", "correlate_labels"), ("window", "participation_window_sim_s"),
           ("cap", "participation_cap"), ("reweight_max", "reweight_max_factor"),
           ("reweight_boost", "reweight_max_boost"), ("model_refresh", "model_refresh_sim_s"),
           ("snapshot_interval", "snapshot_interval_s"), ("clock", "clock"),
           ("noise_multiplier", "noise_multiplier"), ("clip_norm", "clip_norm"),
           ("epsilon_budget", "epsilon_budget"), ("dp_delta", "dp_delta"),
           ("central_noise_multiplier", "central_noise_multiplier"),
           ("central_clip_norm", "central_clip_norm"), ("session", "session"))
_SYNTHETIC_ONLY = {"devices": "--devices", "dataset": "--dataset", "dirichlet_alpha": "--alpha",
                   "correlate_labels": "--correlate"}


def _ints(example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated integers, e.g. ``_ints("64,32")``."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like {example}, got {text!r}"
                                             ) from None
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    d = SimConfig()
    p.add_argument("--devices", type=int, help=f"simulated devices ({d.devices})")
    p.add_argument("--duration", type=float,
                   help=f"seconds per rule on the run's clock ({d.duration_s:g}); simulated "
                        f"time is duration x scale")
    p.add_argument("--scale", type=float,
                   help=f"simulated seconds per second of the run's clock ({d.scale:g}: 12 sim "
                        f"hours in 45 s)")
    p.add_argument("--clock", choices=["virtual", "wall"],
                   help=f"virtual: time moves when every device and the coordinator are done, "
                        f"the same seed gives the same run at any load, and a run takes as "
                        f"long as its work; wall: the wall clock compressed by --scale, for live "
                        f"demos and soak tests ({d.clock})")
    p.add_argument("--seed", type=int, help=f"({d.seed})")
    p.add_argument("--dataset", choices=["digits", "synthetic"], help=f"({d.dataset})")
    p.add_argument("--encoding", choices=["float32", "float16", "int8", "topk"],
                   help=f"({d.encoding})")
    p.add_argument("--alpha", type=float,
                   help=f"Dirichlet alpha of the non-IID split ({d.dirichlet_alpha}; smaller = "
                        f"more skew)")
    p.add_argument("--target", type=float,
                   help=f"held-out accuracy (R^2 for --model linear) for time-to-target "
                        f"({d.target_accuracy})")
    p.add_argument("--workers", type=int, help="device processes (0: auto)")
    m = p.add_argument_group("model (override a fleet file's [model])")
    m.add_argument("--model", choices=["logistic", "mlp", "linear"],
                   help=f"({d.model}; linear: regression, fleet files only)")
    m.add_argument("--lr", type=float, help=f"learning rate ({d.learning_rate})")
    m.add_argument("--local-epochs", type=int, help=f"({d.local_epochs})")
    m.add_argument("--batch-size", type=int, help=f"({d.batch_size})")
    m.add_argument("--hidden", type=_ints("32 or 64,32"),
                   help=f"mlp hidden layer sizes, e.g. 64,32 ({','.join(map(str, d.hidden))})")
    m.add_argument("--l2", type=float, help=f"L2 penalty ({d.l2:g})")
    r = p.add_argument_group("rule settings (override a fleet file's [run])")
    r.add_argument("--fedasync-alpha", type=float, help=f"FedAsync mixing ({d.fedasync_alpha})")
    r.add_argument("--fedbuff-lr", type=float,
                   help=f"FedBuff server learning rate ({d.fedbuff_server_lr:g})")
    r.add_argument("--fedbuff-k", type=int,
                   help=f"FedBuff buffer size ({d.fedbuff_k}; at most the number of devices)")
    s = p.add_argument_group("synchronous FedAvg")
    s.add_argument("--cohort", type=int, help=f"updates that close a round ({d.cohort_size})")
    s.add_argument("--deadline", type=float,
                   help=f"round deadline in sim minutes ({d.round_deadline_sim_s / 60:g})")
    s.add_argument("--over-selection", type=float,
                   help=f"invite this many times the cohort ({d.over_selection})")
    f = p.add_argument_group("participation (reweighting, FedAsync's default, and the +cap and "
                             "+memory rule variants)")
    f.add_argument("--correlate", type=_ints("0,1,2"),
                   help="make availability follow data: devices whose most common label is one "
                        "of these (e.g. 0,1,2) are slow rare chargers")
    f.add_argument("--window", type=lambda h: float(h) * 3600.0,
                   help=f"participation window (and +memory's length) in sim hours "
                        f"({d.participation_window_sim_s / 3600:g})")
    f.add_argument("--cap", type=int,
                   help=f"+cap: updates per device per window ({d.participation_cap})")
    f.add_argument("--reweight-max", type=float,
                   help=f"reweighting: a frequent device keeps at least 1/this of its weight "
                        f"({d.reweight_max_factor:g})")
    f.add_argument("--reweight-boost", type=float,
                   help=f"reweighting: a rare device gets at most this times its weight "
                        f"({d.reweight_max_boost:g}; 1: damp only)")
    c = p.add_argument_group("communication")
    c.add_argument("--model-refresh", type=float,
                   help=f"the agents' model_refresh_s, sim seconds: fetch a newer model without "
                        f"training when the held one is this old; 0 follows every version "
                        f"({d.model_refresh_sim_s:g})")
    c.add_argument("--snapshot-interval", type=float,
                   help="the coordinator's snapshots.min_interval_s, wall seconds: at most one "
                        "snapshot per this long (1 simulated second, at least 0.05)")
    dp = p.add_argument_group("differential privacy (docs/privacy.md; summary.json 'privacy')")
    dp.add_argument("--noise-multiplier", type=float,
                    help="local DP: the agents add N(0, (S x clip)^2) to each update "
                         f"({d.noise_multiplier:g}: off)")
    dp.add_argument("--clip-norm", type=float,
                    help=f"local DP: the agents' L2 clip ({d.clip_norm:g})")
    dp.add_argument("--epsilon-budget", type=float,
                    help="local DP: each device's lifetime epsilon; at it, it sends no more")
    dp.add_argument("--central-noise-multiplier", type=float,
                    help="central DP at the coordinator, fedbuff and fedavg-sync: noise on each "
                         f"aggregate ({d.central_noise_multiplier:g}: off)")
    dp.add_argument("--central-clip-norm", type=float,
                    help=f"central DP: each contribution's L2 clip ({d.central_clip_norm:g})")
    dp.add_argument("--dp-delta", type=float, help=f"delta of both ({d.dp_delta:g})")
    p.add_argument("--broker", help="use this broker (mqtt://host:port) instead of starting one; "
                   "several comma-separated URLs (a cluster's nodes, --clock wall) spread the "
                   "devices over them")
    p.add_argument("--session", choices=["sessionless", "persistent"],
                   help=f"the devices' MQTT sessions: sessionless (the broker keeps nothing "
                        f"between connections; an unacked update is sent again) or persistent "
                        f"(the broker queues acks for absent devices) ({d.session})")
    p.add_argument("--embedded-broker", action="store_true",
                   help="use the pure-Python broker even if Mosquitto is installed")
    p.add_argument("--log-level", type=log_level, default="WARNING",
                   help="DEBUG, INFO, WARNING, ERROR or CRITICAL (%(default)s)")


def _parser() -> argparse.ArgumentParser:
    p = make_parser(
        prog="fedasync-sim",
        description="Simulate a fleet of devices (real agent code, real MQTT) with uneven "
                    "speed, battery and connectivity, and compare merge rules.",
        epilog="With no command: `run`, and with no options the demo (50 devices, FedAsync vs "
               "synchronous FedAvg); `fedasync-sim COMMAND --help` for a command's options.")
    add_version(p)
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    run = sub.add_parser("run", help="run one rule or compare several (default)")
    _common(run)
    run.add_argument("--fleet-file", type=Path,
                     help="replay your own fleet: devices, data and traces from this TOML, JSON "
                          "or CSV file (format: docs/fleet-files.md)")
    run.add_argument("--test-file", type=Path,
                     help="held-out CSV/NPZ for the coordinator's evaluation (with "
                          "--fleet-file; default: its [run] test_file, else the devices' test "
                          "files together)")
    run.add_argument("--compare", default="fedasync,fedavg-sync",
                     help=f"comma-separated rules out of {', '.join(RULES)}; fedasync and "
                          f"fedbuff also with corrections: +reweight (FedAsync's default), "
                          f"+cap, +memory, +fit (devices fit their work to their windows), "
                          f"+plain (none of the defaults), e.g. fedbuff+memory+fit "
                          f"(%(default)s)")
    run.add_argument("--rule", help="a single rule (overrides --compare)")
    run.add_argument("--out", type=Path, default=Path("runs/demo"),
                     help="output directory (%(default)s)")
    run.set_defaults(func=_run)
    bench = sub.add_parser("bench", help="the full benchmark: bench.json with every figure")
    _common(bench)
    bench.add_argument("--out", type=Path, default=Path("runs/bench"))
    bench.add_argument("--seeds", type=_ints("1,2,3"), default="1,2,3",
                       help="reported seeds, comma-separated (%(default)s)")
    bench.add_argument("--quick", action="store_true", help="short runs, for a smoke check")
    bench.set_defaults(func=_bench)
    tune = sub.add_parser("tune", help="grid-search each rule's settings on a held-out seed")
    _common(tune)
    tune.add_argument("--out", type=Path, default=Path("runs/tune"))
    tune.set_defaults(func=_tune)
    export = sub.add_parser(
        "export-fleet", help="write the synthetic fleet as a fleet file, to start from and edit",
        description="Write the synthetic fleet these options describe as OUT/fleet.toml, "
                    "OUT/data/<id>.npz and OUT/traces/<id>-<kind>.csv; run it with "
                    "`fedasync-sim --fleet-file OUT/fleet.toml`.")
    _common(export)
    export.add_argument("--out", type=Path, required=True, help="directory to write into")
    export.set_defaults(func=_export)
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Defaults < the fleet file's [run]/[model] (with --fleet-file) < the flags given."""
    flags = {name: getattr(args, dest) for dest, name in _FIELDS
             if getattr(args, dest, None) is not None}
    if getattr(args, "deadline", None) is not None:
        flags["round_deadline_sim_s"] = args.deadline * 60.0
    flags["broker"] = args.broker
    flags["broker_kind"] = "embedded" if args.embedded_broker else "auto"
    fleet_file = getattr(args, "fleet_file", None)
    if getattr(args, "test_file", None) is not None:
        flags["test_file"] = str(args.test_file)
    if fleet_file is None:
        return replace(SimConfig(), **flags)
    from fedasync_iot.fleet._fleetfile import replay_config

    clash = [flag for name, flag in _SYNTHETIC_ONLY.items() if name in flags]
    if clash:
        raise ConfigError(f"{', '.join(clash)} describe the synthetic fleet; a fleet file "
                          f"brings its own devices and data", key="fleet_file")
    return replay_config(fleet_file, **flags)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    rules = [args.rule] if args.rule else [r.strip() for r in args.compare.split(",") if r]
    for rule in rules:
        split_rule(rule)  # a clear error before anything starts
    args.out.mkdir(parents=True, exist_ok=True)
    results, summary = compare(config, rules, args.out)
    print()
    metric = results[0].summary["metric"] if results else "accuracy"
    local = any(r.summary.get("local_accuracy") for r in results)
    print(f"{'rule':<16} {'final ' + metric[:3]:>9} {'time to ' + str(config.target_accuracy):>14} "
          f"{'versions':>8} {'updates':>8} {'Gini':>5}" + (f" {'local mean':>10} {'worst 10%':>9}"
                                                          if local else "")
          # Broker bytes out and in per merged update, all bytes per device per sim hour.
          + f" {'out/upd':>9} {'in/upd':>8} {'per dev-h':>9}")
    for r in results:
        s = r.summary
        ttt = "not reached" if s["time_to_target_s"] is None else f"{s['time_to_target_s']:.1f}s"
        line = (f"{r.rule:<16} {s['final_metric'] or 0:>9.3f} {ttt:>14} {s['versions']:>8} "
                f"{s['updates_accepted']:>8} {s['participation']['gini']:>5.2f}")
        if local:
            la = s.get("local_accuracy") or {}
            line += f" {la.get('mean', 0):>10.3f} {la.get('worst_10pct', 0):>9.3f}"
        out_upd, in_upd, dev_h = table_cells(s.get("traffic"))
        print(f"{line} {out_upd:>9} {in_upd:>8} {dev_h:>9}")
    if config.clock == "wall":
        print("traffic: the broker's bytes sent (out) and received (in) per merged update, and "
              "both per device per simulated hour; summary.json \"traffic\" splits them by kind")
    else:
        print("traffic: bytes to devices (out) and from them (in) per merged update, and both "
              "per device per simulated hour, counted at the clients; summary.json \"traffic\" "
              "splits them by kind (the broker's totals, which also carry the virtual clock's "
              "markers: <rule>/run.json)")
    for r in results:  # each device's downlink against its own trainings and refreshes
        print(f"{r.rule}: {per_device_line((r.summary.get('traffic') or {}).get('per_device'))}")
    speedup = summary["speedup_async_vs_sync"]
    if speedup == math.inf:
        print("speed-up of asynchronous over synchronous: synchronous FedAvg did not reach the "
              "target in this run (an asynchronous rule did)")
    elif speedup is not None:
        print(f"speed-up of asynchronous over synchronous: {speedup}x")
    print(f"\nplot:    {args.out / 'accuracy.png'}\nsummary: {args.out / 'summary.json'}\n"
          f"metrics: {args.out}/<rule>/metrics.csv")
    return 0


def _export(args: argparse.Namespace) -> int:
    from fedasync_iot.fleet._fleetfile import export_fleet

    config = config_from_args(args)
    path = export_fleet(config, args.out)
    print(f"wrote {path} ({config.devices} devices), with data/ and traces/ beside it\n"
          f"run it:  fedasync-sim --fleet-file {path} --compare {','.join(RULES)}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from fedasync_iot.fleet._bench import tune

    config = config_from_args(args)
    result = tune(config, out=args.out, seed=config.seed)
    for rule, best in result["best"].items():
        print(f"{rule:<12} {best}")
    print(f"all trials: {args.out / 'tune.json'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fedasync_iot.fleet._bench import run_bench

    run_bench(config_from_args(args), out=args.out,
              seeds=list(args.seeds), quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
