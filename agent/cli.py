"""``fedasync-agent``: run the edge agent, check the device, predict, show local status."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedasync_iot.agent._config import AgentConfig, load_config
from fedasync_iot.models import FedAsyncError, add_version, log_level, make_parser, setup_logging

if TYPE_CHECKING:
    from fedasync_iot.agent._privacy import PrivacyLedger


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.log_level or "INFO", args.log_format)
    try:
        return int(args.func(args))
    except FedAsyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = make_parser(
        prog="fedasync-agent",
        description="Edge agent for asynchronous federated learning: trains on local data when "
                    "the device allows it and sends model updates over MQTT.",
        epilog="Settings come from --config (TOML), then FEDASYNC_* environment variables "
               "(FEDASYNC_DEVICE_ID, FEDASYNC_POLICY__MIN_BATTERY_PERCENT, ...), then flags.")
    add_version(p)
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--device-id")
    p.add_argument("--state-dir", help="spool, received model and progress")
    # No default here: a default would always override the config's log_level.
    p.add_argument("--log-level", type=log_level,
                   help="DEBUG, INFO, WARNING, ERROR or CRITICAL; overrides log_level in the "
                        "config (INFO)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the agent until stopped")
    run.add_argument("--broker", help="mqtt://[user:pass@]host[:port] or mqtts://...; "
                     "several, comma-separated, to fail over between (docs/brokers.md)")
    run.add_argument("--ca-file", help="CA certificate for mqtts://")
    run.add_argument("--fleet", help="fleet name (topic prefix fl/<fleet>)")
    run.add_argument("--data", help="directory/file of CSV or NPZ, or module:function")
    run.set_defaults(func=_run)

    check = sub.add_parser("check", help="would this device train now? every check explained, "
                                         "the data source's too")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=_check)

    predict = sub.add_parser("predict", help="run the newest received model on a file")
    predict.add_argument("--input", type=Path, required=True, help="CSV or NPZ of features")
    predict.add_argument("--proba", action="store_true", help="print class probabilities")
    predict.set_defaults(func=_predict)

    status = sub.add_parser("status", help="local state: model version, spool, progress")
    status.set_defaults(func=_status)

    held = sub.add_parser(
        "held", help="updates the approval hook refused and kept (on_refused = \"keep\")",
        description="Updates refused by the approval hook are never sent; with on_refused = "
                    "\"keep\" they wait in <state_dir>/held for an operator.")
    held_sub = held.add_subparsers(dest="held_command", required=True)
    held_sub.add_parser("list", help="held updates as JSON, oldest first, with the reason")
    release = held_sub.add_parser(
        "release", help="move into the spool, to be sent at the agent's next connect "
                        "(overrides the approval hook; logged)")
    release.add_argument("update_ids", nargs="+", metavar="ID")
    drop = held_sub.add_parser("drop", help="delete for good")
    drop.add_argument("update_ids", nargs="+", metavar="ID")
    held.set_defaults(func=_held)
    return p


def _config(args: argparse.Namespace, *, need_id: bool = True) -> AgentConfig:
    overrides: dict[str, Any] = {}
    for flag in ("device_id", "state_dir", "broker", "ca_file", "fleet", "data", "log_level"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    if not need_id:
        overrides.setdefault("device_id", "local")
    return load_config(args.config, overrides=overrides)


def _run(args: argparse.Namespace) -> int:
    from fedasync_iot.agent._runner import AgentRunner

    config = _config(args)
    setup_logging(config.log_level, args.log_format)  # the config's (or FEDASYNC_) log_level
    runner = AgentRunner(config)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: runner.stop(
            f"{signal.Signals(signum).name} received"))
    runner.run()
    return runner.exit_code


def _check(args: argparse.Namespace) -> int:
    from fedasync_iot.agent._data import check_source
    from fedasync_iot.agent._hooks import load_eligibility_hooks
    from fedasync_iot.agent._policy import evaluate, format_decision
    from fedasync_iot.agent._readings import PsutilReader

    config = _config(args, need_id=False)
    hooks = load_eligibility_hooks(config.eligibility_hooks)
    # Not a policy check (the running agent finds out when it loads the data), but the question
    # here is "would this device train now?", and without usable data it would not.
    data = check_source(config.data, label=config.label_column).to_check()
    reader = PsutilReader()
    threading.Event().wait(0.5)  # CPU load is a rate: measure it over half a second
    readings = reader.read()
    decision = evaluate(readings, config.policy,
                        extra=[data, _privacy_ledger(config).check(),
                               *(hook(readings) for hook in hooks)])
    if args.json:
        print(json.dumps(decision.to_dict(), indent=1))
    else:
        print(format_decision(decision))
    return 0 if decision.eligible else 1


def _privacy_ledger(config: AgentConfig) -> PrivacyLedger:
    """The device's lifetime privacy ledger, as its config reads it."""
    from fedasync_iot.agent._privacy import PrivacyLedger

    return PrivacyLedger(Path(config.state_dir), config.privacy,
                         noise_multiplier=config.training.noise_multiplier)


def _predict(args: argparse.Namespace) -> int:
    from fedasync_iot.agent._predict import Predictor
    from fedasync_iot.models import load_xy

    config = _config(args, need_id=False)
    X = _features(args.input, load_xy, config.label_column)
    predictor = Predictor(config.state_dir)
    out = predictor.predict_proba(X) if args.proba else predictor.predict(X)
    for row in out:
        print(",".join(f"{v:.6g}" for v in row) if out.ndim == 2 else f"{row}")
    print(f"# model version {predictor.version}, {len(X)} rows", file=sys.stderr)
    return 0


def _features(path: Path, load_xy: Any, label: str) -> Any:
    """Features from a file with or without a label column."""
    import numpy as np

    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["X"], dtype=np.float32)
    try:
        return load_xy(path, label=label)[0]
    except FedAsyncError:
        return np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)


def _status(args: argparse.Namespace) -> int:
    from fedasync_iot.agent._held import HeldUpdates
    from fedasync_iot.agent._model_cache import decode_saved
    from fedasync_iot.agent._spool import Spool

    config = _config(args, need_id=False)
    state = Path(config.state_dir)
    out: dict[str, Any] = {"state_dir": str(state)}
    try:
        snap = decode_saved((state / "model.snapshot").read_bytes())  # full or compact
        out["model_version"] = snap.version
        out["model_metrics"] = dict(snap.metrics)
    except (OSError, FedAsyncError):
        out["model_version"] = None
    spool = Spool(state / "spool")
    out["spool_depth"] = len(spool)
    out["spool_bytes"] = spool.total_bytes()
    out["held"] = len(HeldUpdates(state / "held"))
    out["privacy"] = _privacy_ledger(config).status()
    try:
        out["progress"] = json.loads((state / "progress.json").read_text())
    except (OSError, ValueError):
        out["progress"] = {}
    try:  # written by the running agent at each change (a killed one leaves its last state)
        out["connection"] = json.loads((state / "connection.json").read_text())
    except (OSError, ValueError):
        out["connection"] = None
    out["agent"] = _liveness(state, out["connection"])
    if out["connection"] is not None and out["agent"].startswith("not running"):
        # What the file says is what a dead process last knew: not the state now.
        out["connection"]["last_state"] = out["connection"].pop("state", None)
        out["connection"]["state"] = "not running"
    print(json.dumps(out, indent=1))
    return 0


def _liveness(state: Path, connection: Any) -> str:
    """"running (pid N)" when the process that wrote connection.json is alive (the same pid and
    start time), else "not running (last seen ...)": the newest write to the state directory.
    A killed agent (SIGKILL, power loss) leaves "online" in the file."""
    from fedasync_iot.agent._instance import process_identity, utc

    pid = connection.get("pid") if isinstance(connection, dict) else None
    if isinstance(pid, int):
        alive = process_identity(pid)
        started = connection.get("process_started")
        if alive and (not isinstance(started, (int, float))  # written by an older agent
                      or abs(alive["process_started"] - started) < 1.0):
            return f"running (pid {pid})"
    times = []
    for path in (state / "connection.json", state / "progress.json", state / "model.snapshot",
                 *state.glob("spool/*.upd")):
        with contextlib.suppress(OSError):  # gone meanwhile: an update acked, say
            times.append(path.stat().st_mtime)
    if not times:
        return "not running (never ran with this state directory)"
    return f"not running (last seen {utc(max(times))}{f', pid {pid}' if pid is not None else ''})"


def _held(args: argparse.Namespace) -> int:
    from fedasync_iot.agent._held import HeldUpdates
    from fedasync_iot.agent._spool import Spool

    config = _config(args, need_id=False)
    state = Path(config.state_dir)
    held = HeldUpdates(state / "held", max_count=config.spool_max_count,
                       max_bytes=config.spool_max_bytes)
    if args.held_command == "list":
        print(json.dumps(held.entries(), indent=1))
        return 0
    if args.held_command == "release":
        spool = Spool(state / "spool", max_count=config.spool_max_count,
                      max_bytes=config.spool_max_bytes)
        missing = [i for i in args.update_ids if not held.release(i, spool)]
    else:
        missing = [i for i in args.update_ids if not held.drop(i)]
    if missing:
        print(f"error: no held update {', '.join(missing)} in {state / 'held'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
