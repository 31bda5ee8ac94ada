"""Communication cost of the simulated fleet, the same way for any version of the code:

    python -m fedasync_iot.bench.traffic --devices 50,200,1000 --seeds 1
    python -m fedasync_iot.bench.traffic --code /path/to/an/older/checkout --json before.json

Per device count and seed, one run of ``fedasync-sim --rule fedasync`` (the code under
``--code``, by default this checkout) against a fresh private Mosquitto with $SYS every second,
so its counters start at zero. Measured side by side on each run:

- the broker's $SYS totals (every second, followed from the start; the values after two
  fresh ticks once the run has ended): bytes and MQTT packets received and sent, PUBLISH
  packets and their payload bytes;
- a listener on ``fl/#`` that sees every message once as it was published, by kind
  (`fleet._traffic.classify`): uplink as the devices sent it, and what the coordinator sent
  (one snapshot per version, one ack per update). Its own share of the broker's output (these
  messages and the $SYS ones) is taken off the totals, exactly (QoS 0: fixed header + topic
  length + topic + payload).
  Delivered snapshots = PUBLISH packets the broker sent less everything else it forwarded
  (updates and statuses to the coordinator, acks to their device, presence);
- the run's summary.json: merged updates (accepted + buffered), versions, accuracy, and its
  own ``traffic`` section where the code has one.

Then per merged update and per device per simulated hour. With ``--accuracy-seeds`` it also runs
``--compare fedasync,fedbuff,fedavg-sync`` (default duration) per seed for time to target and
final accuracy. Runs are one at a time (they are CPU heavy).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedasync_iot.fleet import KINDS, MosquittoBroker, classify

if TYPE_CHECKING:
    from fedasync_iot.models import Message

HERE = Path(__file__).resolve().parent.parent


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


class Listener:
    """Every message on ``fl/#`` once, by kind; the broker's $SYS counters as they tick; and
    the bytes and packets the broker spent sending all that to this listener (to take off its
    totals)."""

    def __init__(self, url: str) -> None:
        from fedasync_iot.fleet import SYS_COUNTERS
        from fedasync_iot.models import BrokerAddress, create_client

        self.counts: dict[str, dict[str, int]] = {k: {"messages": 0, "bytes": 0,
                                                      "payload_bytes": 0} for k in KINDS}
        self.wire_bytes = 0
        self.packets = 0
        self.payload_bytes = 0
        self.sys: dict[str, int] = {}
        self.ticks: list[float] = []  # when each fresh $SYS uptime came
        self._names = SYS_COUNTERS
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        address = BrokerAddress.parse(url)
        self.client = create_client(address, client_id=f"traffic-listener-{os.getpid()}",
                                    persistent=False)
        self.client.handle(self._on_message)
        self.client.on_connack = lambda connack: self._subscribe()
        self.client.on_acked = lambda ack: self._subscribed.set() \
            if ack.kind == "subscribe" else None
        self.client.connect(address.host, address.port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(30):
            raise RuntimeError("the traffic listener could not subscribe")

    def _subscribe(self) -> None:
        self.client.subscribe([("fl/#", 0), *((f"$SYS/broker/{t}", 0)
                                              for t in (*self._names, "uptime"))])

    def _on_message(self, msg: Message) -> None:
        topic_len, n = len(msg.topic.encode()), len(msg.payload)
        remaining = 2 + topic_len + n  # QoS 0: no packet id
        with self._lock:
            self.wire_bytes += 1 + _varint_len(remaining) + remaining
            self.packets += 1
            self.payload_bytes += n
            if msg.topic.startswith("$SYS/"):
                name = msg.topic.removeprefix("$SYS/broker/")
                if name == "uptime":
                    if not msg.retain:
                        self.ticks.append(time.monotonic())
                elif name in self._names:
                    self.sys[self._names[name]] = int(float(msg.payload.decode()))
                return
            c = self.counts[classify(msg.topic)]
            c["messages"] += 1
            c["bytes"] += topic_len + n
            c["payload_bytes"] += n

    def final(self, timeout: float = 60.0) -> tuple[dict[str, int] | None, dict[str, Any]]:
        """The broker's totals less this listener's share, after two fresh ticks from now
        (or, if they do not come in `timeout`, as of the last tick seen); and how fresh."""
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if sum(t > since for t in self.ticks) >= 2:
                    break
            time.sleep(0.1)
        with self._lock:
            fresh = sum(t > since for t in self.ticks)
            info = {"ticks_after_end": fresh, "ticks": len(self.ticks),
                    "last_tick_age_s": round(time.monotonic() - self.ticks[-1], 1)
                    if self.ticks else None,
                    "longest_tick_gap_s": round(max((b - a for a, b in
                                                     zip(self.ticks, self.ticks[1:],
                                                         strict=False)),
                                                    default=0.0), 1)}
            if not all(k in self.sys for k in self._names.values()):
                return None, info
            totals = dict(self.sys)
            totals["bytes_sent"] -= self.wire_bytes
            totals["messages_sent"] -= self.packets
            totals["publish_messages_sent"] -= self.packets
            totals["publish_bytes_sent"] -= self.payload_bytes
            return totals, info

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _per(value: float | None, by: float) -> float | None:
    return None if value is None or by <= 0 else round(value / by, 1)


def _sim_module(code: Path) -> str:
    """The simulator's module in `code`: checkouts older than the one import name (issue 25)
    have it at the top."""
    return "fedasync_iot.fleet.cli" if (code / "fedasync_iot").is_dir() else "fleet.cli"


def measure(*, code: Path, devices: int, seed: int, rule: str, duration: float, out: Path,
            extra: list[str]) -> dict[str, Any]:
    """One run of the simulator under `code` against a fresh broker, measured."""
    run_dir = out / f"d{devices}-s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code)}
    broker = MosquittoBroker(workdir=run_dir / "broker", persistence=False)
    broker.start(timeout=30)
    listener: Listener | None = None
    try:
        listener = Listener(broker.url)
        cmd = [sys.executable, "-m", _sim_module(code), "run", "--devices", str(devices), "--rule",
               rule, "--duration", f"{duration:g}", "--seed", str(seed), "--broker",
               broker.url, "--out", str(run_dir / "sim"), *extra]
        t0 = time.monotonic()
        with (run_dir / "sim.log").open("wb") as log:
            # cwd: the code under test, so `-m` cannot pick up another checkout's package from
            # the current directory.
            rc = subprocess.run(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT,
                                check=False, timeout=duration * 10 + 600).returncode
        wall = time.monotonic() - t0
        broker_totals, sys_info = listener.final()
    finally:
        if listener is not None:
            listener.close()
        broker.close()
    summary_path = run_dir / "sim" / rule / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    # Merged: what lineage recorded as accepted or buffered by the coordinator's stop (the
    # window the broker's totals cover); summary.json's updates_accepted is sampled at the end.
    lineage = run_dir / "sim" / rule / "updates.csv"
    merged = (sum(1 for r in csv.DictReader(lineage.open()) if r["outcome"] != "rejected")
              if lineage.exists() else int(summary.get("updates_accepted", 0)))
    sim_hours = duration * float(summary.get("scale", 960.0)) / 3600
    lc = listener.counts if listener else {}
    published = {k: dict(v) for k, v in lc.items() if v["messages"]}
    delivered_snapshots: dict[str, int] | None = None
    if broker_totals is not None:
        # The broker forwards updates, statuses and presence to the coordinator (one
        # subscriber), each ack to its device; every other PUBLISH it sent is a snapshot
        # delivered to a device (retained on subscribe, or live).
        # Counted in payload bytes: Mosquitto 2.0's PUBLISH byte counters add up exactly to
        # what the listener saw, its PUBLISH message counters do not (retained publishes are
        # missing from them), so the count is the bytes over the mean snapshot size.
        forwarded = [lc[k] for k in ("update", "status", "ack", "other", "announce")]
        payload = broker_totals["publish_bytes_sent"] - sum(c["payload_bytes"]
                                                            for c in forwarded)
        snap = lc["snapshot"]
        mean = snap["payload_bytes"] / snap["messages"] if snap["messages"] else 0.0
        delivered_snapshots = {"messages": round(payload / mean) if mean else 0,
                               "payload_bytes": payload}
    device_hours = devices * sim_hours
    row: dict[str, Any] = {
        "devices": devices, "seed": seed, "rule": rule, "duration_s": duration,
        "sim_hours": round(sim_hours, 3), "exit_code": rc, "wall_s": round(wall, 1),
        "merged_updates": merged, "updates_accepted_at_end": summary.get("updates_accepted"),
        "versions": summary.get("versions"),
        "updates_rejected": summary.get("updates_rejected"),
        "final_accuracy": summary.get("final_metric"),
        "time_to_target_s": summary.get("time_to_target_s"),
        "rows_peak": summary.get("rows_peak"),
        "broker": broker_totals, "broker_sys": sys_info,
        "published_by_kind": published,
        "delivered_snapshots": delivered_snapshots,
    }
    if broker_totals is not None:
        sent, received = broker_totals["bytes_sent"], broker_totals["bytes_received"]
        row["per_merged_update"] = {
            "broker_bytes_sent": _per(sent, merged),
            "broker_bytes_received": _per(received, merged),
            "broker_messages_sent": _per(broker_totals["messages_sent"], merged),
            "broker_messages_received": _per(broker_totals["messages_received"], merged),
            "snapshots_delivered": _per(delivered_snapshots["messages"], merged)
            if delivered_snapshots else None}
        row["per_device_hour"] = {
            "broker_bytes_sent": _per(sent, device_hours),
            "broker_bytes_received": _per(received, device_hours),
            "broker_messages_sent": _per(broker_totals["messages_sent"], device_hours),
            "broker_messages_received": _per(broker_totals["messages_received"], device_hours)}
    if "traffic" in summary:
        row["sim_traffic"] = summary["traffic"]
    return row


def accuracy(*, code: Path, seed: int, devices: int, rules: str, out: Path,
             extra: list[str]) -> dict[str, Any]:
    run_dir = out / f"acc-s{seed}"
    cmd = [sys.executable, "-m", _sim_module(code), "run", "--devices", str(devices), "--compare",
           rules, "--seed", str(seed), "--out", str(run_dir), *extra]
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "sim.log").open("wb") as log:
        rc = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                            stdout=log, stderr=subprocess.STDOUT, check=False,
                            timeout=3600).returncode
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"rules": {}}
    return {"seed": seed, "exit_code": rc,
            "speedup_async_vs_sync": summary.get("speedup_async_vs_sync"),
            "rules": {r: {k: s.get(k) for k in ("time_to_target_s", "final_metric", "versions",
                                                  "updates_accepted", "duration_s")}
                      for r, s in summary["rules"].items()}}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _kb(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:,.1f}"


_FIGURES = (("merged updates", None, "merged_updates"),
            ("broker B sent / merged update", "per_merged_update", "broker_bytes_sent"),
            ("broker B received / merged update", "per_merged_update", "broker_bytes_received"),
            ("snapshots delivered / merged update", "per_merged_update", "snapshots_delivered"),
            ("broker B sent / device / sim h", "per_device_hour", "broker_bytes_sent"),
            ("broker B received / device / sim h", "per_device_hour", "broker_bytes_received"))


def _compare(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Each figure of runs with the same devices and seed: before, after, after/before."""
    old = {(r["devices"], r["seed"]): r for r in before.get("runs", [])}
    print(f"\n{'devices':>7} {'seed':>4} {'figure':<36} {'before':>12} {'after':>12} "
          f"{'ratio':>7}")
    for r in after["runs"]:
        b = old.get((r["devices"], r["seed"]))
        if b is None:
            continue
        for name, group, key in _FIGURES:
            x = b.get(key) if group is None else (b.get(group) or {}).get(key)
            y = r.get(key) if group is None else (r.get(group) or {}).get(key)
            ratio = "-" if not x or y is None else f"{y / x:.3f}"
            print(f"{r['devices']:>7} {r['seed']:>4} {name:<36} {x!s:>12} {y!s:>12} {ratio:>7}")
    acc_before = {a["seed"]: a for a in before.get("accuracy", [])}
    for a in after.get("accuracy", []):
        b = acc_before.get(a["seed"])
        if b is None:
            continue
        for rule, s in a["rules"].items():
            sb = b["rules"].get(rule, {})
            print(f"accuracy seed {a['seed']} {rule:<12} time to target "
                  f"{sb.get('time_to_target_s')} -> {s['time_to_target_s']}, final "
                  f"{sb.get('final_metric')} -> {s['final_metric']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=_ints, default=[50, 200, 1000])
    p.add_argument("--seeds", type=_ints, default=[1])
    p.add_argument("--rule", default="fedasync")
    p.add_argument("--duration", type=float, default=40.0, help="wall seconds per run (40)")
    p.add_argument("--code", type=Path, default=HERE,
                   help="the checkout whose simulator runs (default: this one)")
    p.add_argument("--accuracy-seeds", type=_ints, default=[],
                   help="also --compare the rules on 50 devices for these seeds")
    p.add_argument("--accuracy-devices", type=int, default=50)
    p.add_argument("--accuracy-rules", default="fedasync,fedbuff,fedavg-sync")
    p.add_argument("--out", type=Path, default=Path("runs/traffic"))
    p.add_argument("--json", type=Path, help="write the results here too")
    p.add_argument("--compare-to", type=Path,
                   help="an earlier result (e.g. docs/communication-before.json): print its "
                        "figures next to these, with the ratios")
    p.add_argument("sim_args", nargs="*", help="after --: more fedasync-sim flags")
    args = p.parse_args(argv)
    code = args.code.resolve()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sim = _sim_module(code).removesuffix(".cli")
    which = subprocess.run([sys.executable, "-c", f"import {sim}; print({sim}.__file__)"],
                           cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                           capture_output=True, text=True, check=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or None
    print(f"code: {which} (commit {commit})", file=sys.stderr)
    result: dict[str, Any] = {
        "code_commit": commit, "fleet_package": which,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "settings": {"rule": args.rule, "duration_s": args.duration, "fleet": "synthetic "
                     "default (logistic on digits, Dirichlet 0.5)", "sim_args": args.sim_args},
        "runs": [], "accuracy": []}

    def save() -> None:
        text = json.dumps(result, indent=1)
        (out / "traffic.json").write_text(text)
        if args.json:
            args.json.write_text(text + "\n")

    for devices in args.devices:
        for seed in args.seeds:
            print(f"{devices} devices, seed {seed} ...", file=sys.stderr, flush=True)
            row = measure(code=code, devices=devices, seed=seed, rule=args.rule,
                          duration=args.duration, out=out, extra=args.sim_args)
            result["runs"].append(row)
            save()
    for seed in args.accuracy_seeds:
        print(f"accuracy, seed {seed} ...", file=sys.stderr, flush=True)
        result["accuracy"].append(accuracy(code=code, seed=seed, devices=args.accuracy_devices,
                                           rules=args.accuracy_rules, out=out,
                                           extra=args.sim_args))
        save()
    print(f"{'devices':>7} {'seed':>4} {'merged':>7} {'kB sent/upd':>11} {'kB recv/upd':>11} "
          f"{'snap/upd':>8} {'kB sent/dev-h':>13} {'kB recv/dev-h':>13} {'rc':>3}")
    for r in result["runs"]:
        pm, ph = r.get("per_merged_update") or {}, r.get("per_device_hour") or {}
        print(f"{r['devices']:>7} {r['seed']:>4} {r['merged_updates']:>7} "
              f"{_kb(pm.get('broker_bytes_sent')):>11} {_kb(pm.get('broker_bytes_received')):>11} "
              f"{pm.get('snapshots_delivered', '-')!s:>8} "
              f"{_kb(ph.get('broker_bytes_sent')):>13} {_kb(ph.get('broker_bytes_received')):>13} "
              f"{r['exit_code']:>3}")
    for a in result["accuracy"]:
        for rule, s in a["rules"].items():
            print(f"seed {a['seed']} {rule:<12} time to target {s['time_to_target_s']} "
                  f"final {s['final_metric']}")
    if args.compare_to:
        _compare(json.loads(args.compare_to.read_text()), result)
    print(f"results: {out / 'traffic.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
