"""``fedasync-coordinator``: run the service and operate its state directory."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedasync_iot.coordinator._config import CoordinatorConfig, load_config
from fedasync_iot.coordinator._control import TOKEN_FILE, client_token, configured_token
from fedasync_iot.coordinator._device_privacy import DevicePrivacy, summary, with_local_privacy
from fedasync_iot.coordinator._engine import Engine, Evaluator
from fedasync_iot.coordinator._http import Rollback
from fedasync_iot.coordinator._lock import StateDirInUse
from fedasync_iot.coordinator._rules import build_rule
from fedasync_iot.coordinator._store import Store
from fedasync_iot.models import (
    ConfigError,
    FedAsyncError,
    ModelSpec,
    StateError,
    add_version,
    build_model,
    load_digits,
    load_xy,
    log_level,
    make_parser,
    setup_logging,
)

log = logging.getLogger("fedasync.coordinator")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", None) or "INFO",
                  getattr(args, "log_format", "text"))
    try:
        return int(args.func(args))
    except FedAsyncError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = make_parser(
        prog="fedasync-coordinator",
        description="Asynchronous federated learning coordinator: merges device updates from "
                    "MQTT as they arrive, versions the model durably and publishes snapshots.",
        epilog="Settings come from --config (TOML), then FEDASYNC_* environment variables "
               "(FEDASYNC_BROKER, FEDASYNC_RULE__NAME, ...), then these flags.")
    add_version(p)
    sub = p.add_subparsers(dest="command")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="TOML config file")
        sp.add_argument("--state-dir", help="state directory (SQLite + checkpoints)")
        sp.add_argument("--model", choices=["logistic", "mlp", "linear"],
                        help="model kind; n_features/classes come from --test-file")
        sp.add_argument("--test-file", help="held-out set: .npz/.csv or builtin:digits")
        # No default here: a default would always override the config's log_level.
        sp.add_argument("--log-level", type=log_level,
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL; overrides log_level in "
                             "the config (INFO)")
        sp.add_argument("--log-format", choices=["text", "json"], default="text")

    run = sub.add_parser("run", help="run the service (default)")
    common(run)
    run.add_argument("--broker", help="mqtt://[user:pass@]host[:port] or mqtts://...; "
                     "several, comma-separated, to fail over between (docs/brokers.md)")
    run.add_argument("--ca-file", help="CA certificate for mqtts://")
    run.add_argument("--fleet", help="fleet name (topic prefix fl/<fleet>)")
    run.add_argument("--rule", choices=["fedasync", "fedbuff", "fedavg-sync"])
    run.add_argument("--http", help="HOST:PORT for /metrics and /status ('' to disable)")
    run.add_argument("--standby", action="store_true", default=None,
                     help="if another coordinator serves the fleet, wait for it to stop")
    run.add_argument("--reset", action="store_true",
                     help="with a state at version 0 (a new or lost state directory), start "
                          "the fleet over at version 0 even if the broker holds it at a later "
                          "version (without it, run refuses: restore the state directory "
                          "instead). Ignored for a state past version 0")
    run.set_defaults(func=_run)

    versions = sub.add_parser("versions", help="table of model versions with metrics")
    common(versions)
    versions.add_argument("--limit", type=int, default=50)
    versions.add_argument("--json", action="store_true")
    versions.set_defaults(func=_versions)

    devices = sub.add_parser("devices", help="per-device participation and the fairness summary")
    common(devices)
    devices.add_argument("--window", type=float,
                         help="sliding window in seconds (default: participation.window_s)")
    devices.add_argument("--sort", choices=["share", "updates", "accepted", "device", "last",
                                            "epsilon"],
                         default="share", help="row order (%(default)s)")
    devices.add_argument("--limit", type=int, default=0, help="show at most N rows (0: all)")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(func=_devices)

    export = sub.add_parser("export", help="write one version's model as ONNX")
    common(export)
    export.add_argument("--version", type=int, help="version (default: current)")
    export.add_argument("file", type=Path)
    export.set_defaults(func=_export)

    rollback = sub.add_parser(
        "rollback", help="republish an earlier version as a new version",
        description="Roll back to an earlier version, published as a new version. Exit status: "
                    "0 done (published when a service runs; without one, when it starts), 3 "
                    "done in the state but the broker does not have it yet (the running "
                    "service publishes it when it can; do not run rollback again), 2 not "
                    "done.")
    common(rollback)
    rollback.add_argument("--to", type=int, required=True)
    rollback.add_argument("--http", help="address of the running service")
    rollback.set_defaults(func=_rollback)

    keygen = sub.add_parser("keygen", help="make the Ed25519 key pair that signs snapshots")
    keygen.add_argument("--out", type=Path, required=True, help="directory for .key and .pub")
    keygen.set_defaults(func=_keygen, log_level="INFO", log_format="text")

    from fedasync_iot.coordinator._provision import add_provision_parser

    add_provision_parser(sub)  # provision-device: broker accounts (coordinator/_provision.py)

    p.set_defaults(func=lambda a: _run(run.parse_args([])), command=None)
    return p


def config_from_args(args: argparse.Namespace, *,
                     stored_model: Callable[[Path], ModelSpec] | None = None
                     ) -> CoordinatorConfig:
    """The settings for one command; `stored_model` (the read commands) fills in [model] from
    the state directory when neither the config, the environment nor --model gives one."""
    overrides: dict[str, Any] = {}
    for flag, key in (("broker", "broker"), ("ca_file", "ca_file"), ("fleet", "fleet"),
                      ("state_dir", "state_dir"), ("http", "http"),
                      ("log_level", "log_level"), ("standby", "standby")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "rule", None):
        overrides["rule"] = {"name": args.rule}
    if getattr(args, "test_file", None):
        overrides["evaluation"] = {"test_file": args.test_file}
    if getattr(args, "model", None):
        X, y = load_test_set(args.test_file or "builtin:digits")
        model: dict[str, Any] = {"kind": args.model, "n_features": int(X.shape[1])}
        if args.model != "linear":
            model["classes"] = sorted(int(c) for c in np.unique(y))
        overrides["model"] = model
    return load_config(args.config, overrides=overrides, stored_model=stored_model)


def load_test_set(source: str) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    if source == "builtin:digits":
        test = load_digits()[1]
        return test.X, test.y
    return load_xy(Path(source))


def make_evaluator(config: CoordinatorConfig) -> Evaluator | None:
    if config.evaluation.test_file is None:
        return None
    X, y = load_test_set(config.evaluation.test_file)
    adapter = build_model(config.model)

    def evaluate(params: np.ndarray[Any, Any]) -> dict[str, float]:
        adapter.set_params_vector(params)
        metrics: dict[str, float] = adapter.evaluate(X, y)
        return metrics

    return evaluate


def _run(args: argparse.Namespace) -> int:
    from fedasync_iot.coordinator._lease import wait_as_standby
    from fedasync_iot.coordinator._service import CoordinatorService

    # Handlers first: a stop (systemd, ^C) while the service is still loading is a clean exit.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    config = config_from_args(args)
    setup_logging(config.log_level, args.log_format)  # the config's (or FEDASYNC_) log_level
    configured_token(config)  # an unreadable control_token_file: refuse before starting anything
    if config.standby and not wait_as_standby(config, stop):  # before touching the state dir
        log.info("stopped while on standby; nothing was changed")
        return 0
    # The service's store takes the state directory's lock: a second `run` on it stops here with
    # StateDirInUse (exit 2), naming the running one.
    service = CoordinatorService(config, evaluator=make_evaluator(config), reset=args.reset)
    if stop.is_set():
        log.info("stopped while starting; nothing was changed")
        service.store.close()
        return 0
    # StateError (exit 2): another coordinator serves the fleet (or uses its client id), the
    # broker holds the fleet at a later version than a state at version 0, the state is gone.
    service.run_until(stop)
    return 0


def _stored_spec(state_dir: Path) -> ModelSpec:
    """The model a state directory was made for, read without changing anything there."""
    store = Store.open_readonly(state_dir)
    try:
        spec = store.spec()
    finally:
        store.close()
    if spec is None:
        raise StateError(f"no state in {state_dir} (no model recorded yet)")
    return spec


def _reader(args: argparse.Namespace) -> tuple[CoordinatorConfig, Store]:
    """Settings and a read-only store for the commands that only look: no lock, no clean-up,
    no writes, so they are safe beside the running service (docs/architecture.md, State
    ownership)."""
    config = config_from_args(args, stored_model=_stored_spec)
    return config, Store.open_readonly(Path(config.state_dir))


def _versions(args: argparse.Namespace) -> int:
    from fedasync_iot.coordinator._central_dp import epsilon_by_version

    config, store = _reader(args)
    try:
        rows = store.versions(limit=args.limit)
        # Central DP: the coordinator's epsilon as of each version (delta in the config).
        eps = (epsilon_by_version(store.lineage(), config.central_dp)
               if config.central_dp.enabled else {})
    finally:
        store.close()
    if args.json:
        print(json.dumps([{"version": v.version, "created_at": v.created_at,
                           "n_updates": v.n_updates, "source": v.source, "metrics": v.metrics,
                           "checksum": v.checksum,
                           **({"epsilon": eps.get(v.version)} if eps else {})}
                          for v in rows], indent=1))
        return 0
    keys = sorted({k for v in rows for k in v.metrics})
    print(f"{'version':>8} {'created (UTC)':<20} {'updates':>7} {'source':<12} "
          + " ".join(f"{k:>9}" for k in keys) + (f" {'epsilon':>9}" if eps else ""))
    for v in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created_at))
        metrics = " ".join(f"{v.metrics[k]:>9.4f}" if k in v.metrics else f"{'-':>9}"
                           for k in keys)
        if eps:
            metrics += f" {eps[v.version]:>9.3f}" if v.version in eps else f" {'-':>9}"
        print(f"{v.version:>8} {created:<20} {v.n_updates:>7} {v.source:<12} {metrics}")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from fedasync_iot.coordinator._central_dp import device_epsilons
    from fedasync_iot.coordinator._store import load_ledger

    config, store = _reader(args)
    window = config.participation
    if args.window is not None:
        window = replace(window, window_s=args.window)
    try:
        now = time.time()
        report = load_ledger(store, window, now=now).report(now=now)
        # Central DP: each device's epsilon (delta in the config), from the versions it shaped.
        eps = (device_epsilons(store.lineage(), config.central_dp)
               if config.central_dp.enabled else None)
        # Local DP: each device's own ledger, as its last status claimed it.
        local = store.device_privacy()
    finally:
        store.close()

    def local_epsilon(device_id: str) -> float:
        found = local.get(device_id)
        return -1.0 if found is None else math.inf if found.epsilon is None else found.epsilon

    order = {"share": lambda r: (-r.window_share, -r.window_updates, r.device_id),
             "updates": lambda r: (-r.window_updates, r.device_id),
             "accepted": lambda r: (-r.accepted, r.device_id),
             "device": lambda r: r.device_id,
             "last": lambda r: -(r.last_at or 0.0),
             "epsilon": lambda r: (-local_epsilon(r.device_id), r.device_id)}[args.sort]
    rows = sorted(report.devices, key=order)[:args.limit or None]
    if args.json:
        out = with_local_privacy(report.to_dict(rows), local)
        if eps is not None:
            for row in out["devices"]:
                row["epsilon"] = eps.get(row["device_id"], 0.0)
        print(json.dumps(out, indent=1))
        return 0
    print(f"{'device':<24} {'accepted':>8} {'samples':>9} {'stale':>6} {'rejected':>8} "
          f"{'capped':>6} {'window':>6} {'share':>6}" + (f" {'epsilon':>8}" if eps is not None
                                                          else "")
          + (f" {'local eps':>9} {'budget':>7} {'reached':>7}" if local else "")
          + "  last seen (UTC)")
    for r in rows:
        stale = "-" if r.mean_staleness is None else f"{r.mean_staleness:.1f}"
        last = "-" if r.last_at is None else time.strftime("%Y-%m-%d %H:%M:%S",
                                                           time.gmtime(r.last_at))
        spent = "" if eps is None else f" {eps.get(r.device_id, 0.0):>8.3f}"
        if local:
            spent += _local_columns(local.get(r.device_id))
        print(f"{r.device_id:<24} {r.accepted:>8} {r.samples:>9} {stale:>6} {r.rejected:>8} "
              f"{r.capped:>6} {r.window_updates:>6} {r.window_share:>6.1%}{spent}  {last}")
    s = report.summary()
    ratio = "-" if s["max_median_ratio"] is None else f"{s['max_median_ratio']:.2f}"
    print(f"\n{s['devices_seen']} devices seen, {s['active_devices']} active in the last "
          f"{window.window_s:g} s; participation Gini {s['gini']:.3f} (0 = even), "
          f"max/median contribution {ratio}")
    if local:
        p = summary(local)
        top = "-" if p["max_epsilon"] is None else f"{p['max_epsilon']:.3g}"
        print(f"local privacy (each device's own claim): {p['devices']} devices report a ledger, "
              f"{len(p['reached_budget'])} at their budget, largest epsilon {top}, "
              f"{p['unbounded']} without a bound")
    return 0


def _local_columns(found: DevicePrivacy | None) -> str:
    """A device's local epsilon, budget and whether it reached it ('-': never reported)."""
    if found is None:
        return f" {'-':>9} {'-':>7} {'-':>7}"
    spent = "no bound" if found.epsilon is None else f"{found.epsilon:.4g}"
    budget = "-" if found.budget is None else f"{found.budget:g}"
    return f" {spent:>9} {budget:>7} {'yes' if found.reached else 'no':>7}"


def _export(args: argparse.Namespace) -> int:
    from fedasync_iot.models import export_onnx

    config, store = _reader(args)
    try:
        stored = store.spec()
        if stored is None:
            raise StateError(f"no state in {config.state_dir} (no model recorded yet)")
        differs = _spec_difference(config.model, stored, graph_only=True)
        if differs:
            # The weights only mean something with the stored spec: the same weights under
            # other (e.g. relabelled) classes gave an ONNX file that scored 0.0.
            raise ConfigError(
                f"the model settings differ from the model stored in {config.state_dir} "
                f"({differs}); export writes the stored model: leave out --model and [model], "
                "or make them match")
        if config.model != stored:
            log.info("training settings differ from the stored model's (%s); they do not "
                     "change the ONNX graph: exporting the stored model",
                     _spec_difference(config.model, stored, graph_only=False))
        version = store.current_version() if args.version is None else args.version
        if version is None:
            raise StateError(f"no state in {config.state_dir}")
        params = store.load_checkpoint(version)
    finally:
        store.close()
    adapter = build_model(stored)
    adapter.set_params_vector(params)
    args.file.write_bytes(export_onnx(adapter))
    print(f"wrote version {version} to {args.file}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from fedasync_iot.models import generate_keypair

    private, public = generate_keypair(args.out)
    print(f"private key (keep on the coordinator, set signing_key): {private}\n"
          f"public key (give to every agent, coordinator_public_keys): {public}")
    return 0


def _spec_difference(given: ModelSpec, stored: ModelSpec, *, graph_only: bool) -> str:
    """What differs, as ``kind mlp given, logistic stored; ...``; with `graph_only`, only what
    shapes the ONNX graph (kind, features, classes, an MLP's layers): training settings
    (learning rate, batch size, l2, seed) only changed how the stored weights were learnt."""
    a, b = given.to_dict(), stored.to_dict()
    keys = list(a)
    if graph_only:
        keys = ["kind", "n_features", "classes"]
        if given.kind == stored.kind == "mlp":  # the other kinds have no hidden layers
            keys.append("hidden")
    return "; ".join(f"{k} {a[k]} given, {b[k]} stored" for k in keys if a[k] != b[k])


def _rollback(args: argparse.Namespace) -> int:
    """Through the running service when there is one (it is the only writer), else directly,
    holding the state directory's lock so that no service starts meanwhile."""
    config = config_from_args(args, stored_model=_stored_spec)
    state = Path(config.state_dir)
    if args.http:  # the operator named the service
        done = _post_rollback(args.http, config, args.to)
        if done is not None:
            return _rolled_back(done, args.to)
        log.info("no service answers on %s; rolling back the state directory directly",
                 args.http)
    if not (state / "state.db").is_file():
        raise StateError(f"no state in {state} (pass the coordinator's --state-dir or --config)")
    try:
        store = Store(state, keep_checkpoints=config.keep_checkpoints)
    except StateDirInUse as exc:  # a service runs: ask it, at the address it recorded
        address = exc.holder.control
        if address is None:
            raise StateError(
                f"{exc.holder.describe()} holds {state} but serves no control endpoint (still "
                "starting, or http is off); try again once it is up, or stop it first") from exc
        done = None if address == args.http else _post_rollback(address, config, args.to)
        if done is None:
            raise StateError(
                f"{exc.holder.describe()} holds {state} but its control endpoint at {address} "
                "does not answer; stop it first, then run rollback again") from exc
        return _rolled_back(done, args.to)
    try:
        engine = Engine(store, build_rule(config.rule), config.guards, spec=config.model,
                        initial_params=build_model(config.model).get_params_vector,
                        participation=config.participation)
        version = engine.rollback(args.to)
    finally:
        store.close()
    return _rolled_back(Rollback(version, published=False), args.to, service=False)


def _post_rollback(address: str, config: CoordinatorConfig, to: int) -> Rollback | None:
    """Ask the service at `address` to roll back; None if nothing answers there."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind is reached on loopback
        host = "127.0.0.1"
    token = client_token(config)
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(f"http://{host}:{port}/rollback?to={to}", method="POST",
                                     headers=headers)
    try:
        # The service waits up to its snapshot interval + 10 s for the broker's PUBACK.
        with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 - http:// only
            body = json.loads(resp.read())
            return Rollback(int(body["version"]), published=bool(body.get("published", True)),
                            detail=str(body.get("detail") or ""))
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            how = ("the token it was given is not the service's" if token is not None else
                   f"none was found (no control_token, control_token_file or "
                   f"{Path(config.state_dir) / TOKEN_FILE})")
            raise ConfigError(f"the service at {address} needs the control token and {how}; "
                              "set control_token_file, or run as the coordinator's user with "
                              "its --state-dir") from exc
        raise FedAsyncError(f"the service refused: {_error_of(exc)}") from exc
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


def _error_of(exc: urllib.error.HTTPError) -> str:
    body = exc.read().decode(errors="replace")
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.strip() or f"HTTP {exc.code}"


def _rolled_back(done: Rollback, to: int, *, service: bool = True) -> int:
    """Say what happened; exit 3 when the running service could not publish it (yet)."""
    head = f"version {done.version} is now the model of version {to}"
    if done.published:
        print(f"{head}; published")
    elif not service:
        print(f"{head}; it is published when the coordinator starts")
    else:
        print(f"{head} in the state; not published: {done.detail}")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
