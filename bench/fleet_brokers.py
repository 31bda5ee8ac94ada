"""The real fleet through each broker (issue 24, item 2): the project's agent and coordinator, run
by the fleet simulator on the wall clock (``fedasync-sim run --clock wall``), through a private
Mosquitto, a 3-node NATS cluster and a RabbitMQ node, with devices sessionless or persistent.

    cd <checkout> && PYTHONPATH=$PWD nice -n 10 python -m fedasync_iot.bench.fleet_brokers \\
        [--devices 2000,5000,10000] [--brokers mosquitto,nats,rabbitmq] \\
        [--modes sessionless,persistent] [--duration 60] [--restart-at S] \\
        [--json OUT] [--keep DIR]
    ... python -m fedasync_iot.bench.fleet_brokers --nats-op-costs

For each N x broker x mode (in that order), one cell:

1. a fresh private broker on free loopback ports (never the machine's 1883/4222/5672/15672):
   ``fedasync_iot.fleet.MosquittoBroker`` (persistence on), ``NatsCluster`` (three nodes,
   JetStream, the MQTT gateway) or ``RabbitNode`` (the MQTT plugin); a broker that is not
   installed or does not start is skipped with a line saying why;
2. one simulation as a subprocess, in a process group of its own: ``fedasync-sim run --clock
   wall --dataset synthetic --rule fedasync --workers 2 --devices N --duration D --session MODE
   --broker URL[,URL,URL] --seed SEED --out DIR`` (several URLs: the simulator spreads the
   devices round robin over the NATS nodes, the coordinator on the first with the others as its
   failover list); the same seed in every cell;
3. meanwhile the broker's resident memory (psutil, its processes and their children) every
   ``--sample-s`` seconds; afterwards the run's ``metrics.csv`` (a row a second: merged updates,
   devices connected), ``updates.csv`` (each update's arrival), ``run.json`` (copies resent,
   duplicates, update-to-ack latency) and ``summary.json``;
4. with ``--restart-at S``: the broker restarted S seconds into the run (Mosquitto stopped and
   started on its port; NATS all three nodes, ``NatsCluster.restart``; RabbitMQ the node), and
   how long until the connected count is back to 95% of what it was just before, and whether
   updates were merged again afterwards.

Per cell (stdout, a markdown table; ``--json`` keeps every figure): devices connected (peak);
session setup (seconds from the run's start until 90% of that peak is connected, and that count
over that time); merged updates and merged per second over the run; the first merge; copies
resent for want of an ack and duplicates the coordinator already had (and per merged update);
update-to-ack latency at the devices and the coordinator's part (p50/p99, bucket edges: "at
most"); the broker's RSS when the run starts (coordinator connected, no device yet) and at its
peak, and so KB per connected device; the cell's wall time. Then, per N and mode, NATS's and
RabbitMQ's merge rate over Mosquitto's in the same series.

``--nats-op-costs`` (no simulation): what each MQTT operation a device makes (CONNECT,
SUBSCRIBE, UNSUBSCRIBE, retained and plain PUBLISH at QoS 0 and 1, DISCONNECT) costs the NATS
gateway in JetStream API requests and stream writes, with 50 bare clean-session clients.
``--reread JSON --keep DIR`` prints an earlier series' tables again from its kept files.

Bounds: one simulation at a time, 2 worker processes; a cell is stopped (SIGTERM to the
simulator, then SIGKILL to its process group: only what this benchmark started) when it runs
past D + ``--grace`` seconds (300) or the broker's RSS passes ``--rss-limit-gb`` (8); what it
reached is reported. Brokers' and runs' directories are removed afterwards (``--keep DIR``
copies each cell's metrics, run.json, summary.json, the simulator's output and the broker's
log tails there first).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedasync_iot.bench._brokers import (
    MIB,
    RssSampler,
    Target,
    js_delta,
    make_target,
    open_target,
    tail,
)
from fedasync_iot.fleet import raise_fd_limit

MODES = ("sessionless", "persistent")
BROKERS = ("mosquitto", "nats", "rabbitmq")
POLL_S = 0.25
SETUP_FRACTION = 0.9  # session setup: until this fraction of the peak is connected
BACK_FRACTION = 0.95  # after a restart: back to this fraction of the count before it
RULE = "fedasync"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- reading a run (pure: tests/test_fleet_brokers.py) ------------------------------------------
def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv rows as numbers (empty cells, e.g. no accuracy yet, are left out)."""
    rows: list[dict[str, float]] = []
    with contextlib.suppress(OSError), path.open(newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, float] = {}
            for k, v in raw.items():
                with contextlib.suppress(TypeError, ValueError):
                    row[k] = float(v)
            if "time_s" in row:
                rows.append(row)
    return rows


def read_arrivals(path: Path, scale: float) -> list[tuple[float, str]]:
    """updates.csv as (the run's wall seconds, outcome), in order of arrival."""
    out: list[tuple[float, str]] = []
    with contextlib.suppress(OSError), path.open(newline="") as f:
        for raw in csv.DictReader(f):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out.append((float(raw["sim_s"]) / scale, raw["outcome"]))
    return sorted(out)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _merged(row: dict[str, float]) -> float:
    return row.get("accepted", 0.0) + row.get("buffered", 0.0)


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def session_setup(rows: Sequence[dict[str, float]], fraction: float = SETUP_FRACTION
                  ) -> dict[str, Any]:
    """The connected count's peak; when `fraction` of it was first connected (the run's
    seconds) and that count over that time (sessions set up per second). The peak itself
    follows the devices' traces (more come online as the run goes on), so also: when
    `fraction` of the devices online were first connected (``setup_online_s``), the broker's
    part."""
    peak = max((r.get("connected", 0.0) for r in rows), default=0.0)
    out: dict[str, Any] = {"connected_peak": int(peak), "setup_s": None, "sessions_per_s": None,
                           "setup_online_s": None}
    if peak <= 0:
        return out
    for r in rows:
        if r.get("connected", 0.0) >= fraction * peak:
            t = r["time_s"]
            out["setup_s"] = _r(t)
            out["sessions_per_s"] = _r(r["connected"] / t) if t > 0 else None
            break
    out["setup_online_s"] = next(
        (_r(r["time_s"]) for r in rows
         if r.get("online", 0.0) > 0 and r.get("connected", 0.0) >= fraction * r["online"]),
        None)
    return out


def recovery(rows: Sequence[dict[str, float]], arrivals: Sequence[tuple[float, str]], *,
             began: float, ended: float, fraction: float = BACK_FRACTION) -> dict[str, Any]:
    """After a broker restart that `began` and `ended` (the run's seconds): the connected count
    just before it, its low after, the time from `began` until it is back to `fraction` of the
    count before (None: never in the run), and the updates merged after `ended`."""
    before_rows = [r for r in rows if r["time_s"] <= began]
    before = before_rows[-1].get("connected", 0.0) if before_rows else 0.0
    after = [r for r in rows if r["time_s"] > began]
    low = min((r.get("connected", 0.0) for r in after), default=None)
    # back: the first row after the count dropped (or after the restart ended, if the rows
    # missed the drop) that reaches the mark again
    dropped_at = next((r["time_s"] for r in after
                       if r.get("connected", 0.0) < fraction * before), None)
    start_looking = ended if dropped_at is None else dropped_at
    back = next((r["time_s"] for r in after if r["time_s"] >= start_looking
                 and r.get("connected", 0.0) >= fraction * before), None)
    merged_after = [t for t, outcome in arrivals if t > ended and outcome != "rejected"]
    end_row = before_rows[-1] if before_rows else {}
    return {
        "restart_began_s": _r(began), "restart_took_s": _r(ended - began),
        "connected_before": int(before), "connected_low": None if low is None else int(low),
        "back_s": None if back is None or before <= 0 else _r(back - began),
        "merged_before_restart": int(_merged(end_row)) if end_row else 0,
        "merged_after_restart": len(merged_after),
        "first_merge_after_s": _r(merged_after[0] - ended) if merged_after else None,
        "merging_resumed": bool(merged_after),
    }


def summarize_cell(rows: Sequence[dict[str, float]], run: dict[str, Any],
                   summary: dict[str, Any], arrivals: Sequence[tuple[float, str]], *,
                   rss_before: int | None = None, rss_peak: int | None = None
                   ) -> dict[str, Any]:
    """The cell's figures from what the simulation wrote and the broker's RSS."""
    out: dict[str, Any] = session_setup(rows)
    last = rows[-1] if rows else {}
    run_s = last.get("time_s")
    merged_rows = int(_merged(last)) if last else 0
    merged = int(summary.get("updates_accepted", merged_rows)) if summary else merged_rows
    out.update(run_s=_r(run_s), merged=merged,
               merged_per_s=_r(merged / run_s, 2) if run_s else None,
               rejected=int(summary.get("updates_rejected", last.get("rejected", 0)) or 0))
    firsts = [t for t, outcome in arrivals if outcome != "rejected"]
    if firsts:
        out["first_merge_s"] = _r(firsts[0])
    else:
        out["first_merge_s"] = next((_r(r["time_s"]) for r in rows if _merged(r) > 0), None)
    out["final_accuracy"] = summary.get("final_metric") if summary else None
    out["resent"] = run.get("resent")
    out["duplicates"] = run.get("duplicates")
    dups = run.get("duplicates")
    out["dup_per_merged"] = round(dups / merged, 3) if dups is not None and merged else None
    for key, name in (("ack_latency_ms", "ack"), ("coordinator_ack_ms", "coord_ack")):
        pct = run.get(key) or {}
        out[f"{name}_n"] = pct.get("n")
        out[f"{name}_p50_ms"] = pct.get("p50")
        out[f"{name}_p99_ms"] = pct.get("p99")
    # What the devices and the coordinator counted (summary.json "traffic"): the devices'
    # retained status messages (a JetStream write or two each on NATS), and acks sent against
    # acks the devices got (QoS 0 acks to a device offline at that moment are lost)
    traffic = summary.get("traffic") or {} if summary else {}
    devices, coord = traffic.get("devices") or {}, traffic.get("coordinator") or {}
    out["status_msgs"] = ((devices.get("uplink") or {}).get("status") or {}).get("messages")
    out["acks_received"] = ((devices.get("downlink") or {}).get("ack") or {}).get("messages")
    out["acks_sent"] = ((coord.get("sent") or {}).get("ack") or {}).get("messages")
    out["sim_peak_rss_mb"] = run.get("peak_rss_mb")
    out["sim_wall_s"] = run.get("wall_s")
    if rss_before is not None:
        out["rss_before_mb"] = round(rss_before / MIB, 1)
    if rss_peak is not None:
        out["rss_peak_mb"] = round(rss_peak / MIB, 1)
    if rss_before is not None and rss_peak is not None and out["connected_peak"]:
        out["kb_per_device"] = round((rss_peak - rss_before) / 1024 / out["connected_peak"], 1)
    return out


def ratios(rows: Sequence[dict[str, Any]], base: str = "mosquitto") -> list[dict[str, Any]]:
    """Each broker's merged/s over `base`'s at the same N and mode (cells of one series)."""
    out = []
    for r in rows:
        if r.get("broker") == base or r.get("merged_per_s") is None:
            continue
        ref = next((b for b in rows if b.get("broker") == base
                    and b.get("devices") == r.get("devices") and b.get("mode") == r.get("mode")
                    and b.get("restart_at") == r.get("restart_at")), None)
        if ref is None or not ref.get("merged_per_s"):
            continue
        out.append({"devices": r["devices"], "mode": r["mode"], "broker": r["broker"],
                    "merged_per_s": r["merged_per_s"], f"{base}_merged_per_s":
                    ref["merged_per_s"], "ratio": round(r["merged_per_s"] / ref["merged_per_s"],
                                                        3)})
    return out


# -- one cell ------------------------------------------------------------------------------------
@dataclass
class SimRun:
    """The simulator subprocess and what is known of it while it runs."""

    proc: subprocess.Popen[bytes]
    out: Path
    began: float  # monotonic
    run_start: float | None = None  # monotonic, the run's second 0 (metrics.csv opened)
    state_roots: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> Path:
        return self.out / RULE / "metrics.csv"


_SHM_ROOT = re.compile(r"^(/dev/shm/fedasync-sim-[^/]+)/")


def _state_roots(pid: int) -> set[str]:
    """The simulator's tmpfs state directories, from the files its processes hold open."""
    roots: set[str] = set()
    with contextlib.suppress(psutil.Error):
        me = psutil.Process(pid)
        for p in (me, *me.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                for f in p.open_files():
                    if m := _SHM_ROOT.match(f.path):
                        roots.add(m.group(1))
    return roots


def sim_command(args: argparse.Namespace, *, n: int, mode: str, urls: Sequence[str],
                out: Path) -> list[str]:
    return [sys.executable, "-m", "fedasync_iot.fleet.cli", "run", "--clock", "wall",
            "--dataset", "synthetic", "--rule", RULE, "--workers", str(args.workers),
            "--devices", str(n), "--duration", f"{args.duration:g}", "--session", mode,
            "--seed", str(args.seed), "--broker", ",".join(urls), "--out", str(out),
            "--log-level", args.log_level]


def _stop_sim(sim: SimRun) -> None:
    """SIGTERM the simulator (it stops its workers), then SIGKILL its process group."""
    proc = sim.proc
    if proc.poll() is None:
        sim.state_roots |= _state_roots(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    # the group is the one this benchmark started (start_new_session): its workers
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run_cell(kind: str, mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"broker": kind, "mode": mode, "devices": n,
                           "duration_s": args.duration, "seed": args.seed,
                           "restart_at": args.restart_at}
    if kind == "nats":
        res["stream_replicas"] = args.nats_stream_replicas
    cell_began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"fedasync-fleet-brokers-{kind}-"))
    target = open_target(kind, workdir, res, cluster_name="fedasync-fleet-brokers",
                         stream_replicas=args.nats_stream_replicas, timeout=180)
    if target is None:
        return res
    sampler = RssSampler(target, int(args.rss_limit_gb * 1024 * MIB), args.sample_s)
    sim: SimRun | None = None
    restart: tuple[float, float] | None = None  # (began, ended), the run's seconds
    try:
        res["rss_idle_mb"] = round(target.rss() / MIB, 1)
        sampler.start()
        out = workdir / "sim"
        cmd = sim_command(args, n=n, mode=mode, urls=target.urls, out=out)
        res["command"] = " ".join(cmd[3:])
        with (workdir / "sim.stdout").open("wb") as so, (workdir / "sim.stderr").open("wb") as se:
            sim = SimRun(subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                                          start_new_session=True), out, time.monotonic())
        log(f"  sim pid {sim.proc.pid}: {res['command']}")
        deadline = sim.began + args.duration + args.grace
        rss_before: int | None = None
        js_before: dict[str, Any] = {}
        stopped: str | None = None
        while sim.proc.poll() is None:
            now = time.monotonic()
            if sim.run_start is None and sim.metrics.exists():
                sim.run_start = now + 0.2  # the simulator opens it 0.2 s before second 0
                rss_before = target.rss()
                js_before = target.stats()
                sim.state_roots |= _state_roots(sim.proc.pid)
                log(f"  run started {now - sim.began:.0f} s after launch; broker RSS "
                    f"{rss_before / MIB:.0f} MB")
            if (args.restart_at is not None and restart is None and sim.run_start is not None
                    and now - sim.run_start >= args.restart_at):
                began = now - sim.run_start
                log(f"  restarting the broker at {began:.1f} s into the run")
                try:
                    target.restart(None)
                except Exception as exc:
                    res["restart_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    log(f"  restart failed: {res['restart_error']}")
                restart = (began, time.monotonic() - sim.run_start)
                log(f"  broker back after {restart[1] - restart[0]:.1f} s")
            if now > deadline:
                stopped = f"time limit ({args.duration:g} + {args.grace:g} s)"
            elif sampler.over.is_set():
                stopped = f"broker RSS over {args.rss_limit_gb:g} GB"
            if stopped:
                log(f"  stopping the simulation: {stopped}")
                _stop_sim(sim)
                break
            time.sleep(POLL_S)
        res["sim_exit"] = sim.proc.wait(timeout=120)
        res["load_avg_1m_end"] = round(os.getloadavg()[0], 2)  # the machine is shared
        if js_before:  # the broker as the run left it (its sessions gone with the devices)
            res.update(js_delta(js_before, target.stats()))
        res["stopped"] = stopped
        res["cell_wall_s"] = round(time.monotonic() - cell_began, 1)
        res["sim_launch_to_start_s"] = (None if sim.run_start is None
                                        else round(sim.run_start - sim.began, 1))
        if rss_before is None:  # the run never started: the idle broker
            rss_before = int(res["rss_idle_mb"] * MIB)
        rows = read_metrics(sim.metrics)
        run = read_json(out / RULE / "run.json")
        summary = read_json(out / RULE / "summary.json")
        scale = float(summary.get("scale", 960.0))
        arrivals = read_arrivals(out / RULE / "updates.csv", scale)
        since = sim.run_start
        res.update(summarize_cell(rows, run, summary, arrivals, rss_before=rss_before,
                                  rss_peak=max(sampler.peak(since), rss_before)))
        run_end = None if sim.run_start is None else sim.run_start + args.duration
        res.update(sampler.cpu(since, run_end))
        if restart is not None:
            res.update(recovery(rows, arrivals, began=restart[0], ended=restart[1]))
        if res["sim_exit"] != 0:
            res["sim_error"] = tail(workdir / "sim.stderr", 1500).split("\r")[-1][-1500:]
        if args.keep is not None:
            _keep(args.keep / f"{kind}-{mode}-{n}", workdir, out, target)
    except (OSError, subprocess.SubprocessError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if sim is not None and sim.proc.poll() is None:
            _stop_sim(sim)
        sampler.done.set()
        if sampler.is_alive():
            sampler.join(timeout=10)
        target.close()
        if sim is not None:  # a stopped simulator leaves its tmpfs state behind
            for root in sim.state_roots:
                shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def _keep(dest: Path, workdir: Path, out: Path, target: Target) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.csv", "run.json", "summary.json", "updates.csv"):
        with contextlib.suppress(OSError):
            shutil.copy2(out / RULE / name, dest / name)
    for name in ("sim.stdout", "sim.stderr"):
        with contextlib.suppress(OSError):
            shutil.copy2(workdir / name, dest / name)
    with contextlib.suppress(OSError):
        (dest / "broker.log").write_text(target.logs())


# -- output --------------------------------------------------------------------------------------
def _pair(a: Any, b: Any) -> str:
    return "-" if a is None and b is None else f"{'-' if a is None else a} / " \
        f"{'-' if b is None else b}"


def _s(ms: Any) -> Any:
    return None if ms is None else round(ms / 1000, 1)


COLUMNS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("broker", lambda r: r["broker"]), ("mode", lambda r: r["mode"]),
    ("N", lambda r: f"{r['devices']:,}"),
    ("connected (peak)", lambda r: r.get("connected_peak")),
    ("setup s (90%)", lambda r: r.get("setup_s")),
    ("sessions/s", lambda r: r.get("sessions_per_s")),
    ("90% of online s", lambda r: r.get("setup_online_s")),
    ("merged", lambda r: r.get("merged")), ("merged/s", lambda r: r.get("merged_per_s")),
    ("first merge s", lambda r: r.get("first_merge_s")),
    ("resent", lambda r: r.get("resent")), ("duplicates", lambda r: r.get("duplicates")),
    ("dup/merged", lambda r: r.get("dup_per_merged")),
    ("acks got / sent", lambda r: _pair(r.get("acks_received"), r.get("acks_sent"))),
    ("status msgs", lambda r: r.get("status_msgs")),
    ("ack p50 / p99 s (devices)", lambda r: _pair(_s(r.get("ack_p50_ms")),
                                                   _s(r.get("ack_p99_ms")))),
    ("coordinator p50 / p99 ms", lambda r: _pair(r.get("coord_ack_p50_ms"),
                                                  r.get("coord_ack_p99_ms"))),
    ("broker RSS before / peak MB", lambda r: _pair(r.get("rss_before_mb"),
                                                     r.get("rss_peak_mb"))),
    ("KB/device", lambda r: r.get("kb_per_device")),
    ("broker CPU mean / max %", lambda r: _pair(r.get("broker_cpu_mean"),
                                                 r.get("broker_cpu_max"))),
    ("cell wall s", lambda r: r.get("cell_wall_s")),
]
RESTART_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("restart at / took s", lambda r: _pair(r.get("restart_began_s"), r.get("restart_took_s"))),
    ("connected before / low", lambda r: _pair(r.get("connected_before"),
                                                r.get("connected_low"))),
    ("back to 95% s", lambda r: r.get("back_s") if r.get("back_s") is not None else "never"),
    ("merged before / after restart", lambda r: _pair(r.get("merged_before_restart"),
                                                       r.get("merged_after_restart"))),
    ("first merge after s", lambda r: r.get("first_merge_after_s")),
]


def _status(r: dict[str, Any]) -> str:
    bits = [str(r[k]) for k in ("stopped", "error", "restart_error") if r.get(k)]
    if r.get("sim_exit") not in (None, 0):
        bits.append(f"sim exit {r['sim_exit']}")
    return "; ".join(bits) or "ok"


def table(rows: Sequence[dict[str, Any]]) -> str:
    cols = list(COLUMNS)
    if any(r.get("restart_at") is not None for r in rows):
        cols += RESTART_COLUMNS
    cols.append(("status", _status))
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['broker']} | {r['mode']} | {r['devices']:,} | skipped: "
                         f"{r['skipped']} |")
            continue
        cells = []
        for _, get in cols:
            v = get(r)
            cells.append("-" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


JS_COLUMNS = [("JS API requests", "js_api_total"), ("API errors", "js_api_errors"),
              ("$MQTT_sess writes", "js_sess_writes"), ("$MQTT_rmsgs writes", "js_rmsgs_writes"),
              ("$MQTT_msgs writes", "js_msgs_writes"),
              ("$MQTT_msgs consumers", "js_msgs_consumers")]


def js_table(rows: Sequence[dict[str, Any]]) -> str:
    """NATS cells: what JetStream did during the run (node A's view; writes = the streams'
    sequence growth), and API requests per merged update."""
    nats = [r for r in rows if r.get("js_api_total") is not None]
    if not nats:
        return ""
    head = ["broker", "mode", "N", *(h for h, _ in JS_COLUMNS), "API requests / merged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in nats:
        per = (round(r["js_api_total"] / r["merged"], 1) if r.get("merged") else None)
        cells = [r["broker"], r["mode"], f"{r['devices']:,}",
                 *(r.get(k) for _, k in JS_COLUMNS), per]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in cells) + " |")
    return "\n".join(lines)


def ratio_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [f"- {q['broker']} / mosquitto, {q['devices']:,} devices, {q['mode']}: "
            f"{q['merged_per_s']} / {q['mosquitto_merged_per_s']} merged/s = {q['ratio']}"
            for q in ratios(rows)]


def nats_op_costs(clients: int = 50) -> list[dict[str, Any]]:
    """What each MQTT operation costs the NATS MQTT gateway in JetStream, per client: `clients`
    bare clean-session clients on a fresh 3-node cluster do each operation once; the counters'
    growth (``nats_js_stats``, which itself adds a few API requests) divided by `clients`."""
    import uuid

    from fedasync_iot.models import BrokerAddress, Client, Connack, create_client

    workdir = Path(tempfile.mkdtemp(prefix="fedasync-fleet-brokers-ops-"))
    target = make_target("nats", workdir / "broker", cluster_name="fedasync-fleet-brokers")
    port = target.ports[0]
    cs: list[Client] = []
    out: list[dict[str, Any]] = []
    tag = uuid.uuid4().hex[:6]

    def connect() -> None:
        for i in range(clients):
            c = create_client(BrokerAddress(host="127.0.0.1", port=port),
                              client_id=f"ops-{tag}-{i}", persistent=False)
            up = threading.Event()

            def on_connack(_: Connack, up: threading.Event = up) -> None:
                up.set()

            c.on_connack = on_connack
            c.connect("127.0.0.1", port, keepalive=30)
            c.loop_start()
            up.wait(10)
            cs.append(c)

    def each(fn: Callable[[int, Client], Any]) -> Callable[[], None]:
        def run() -> None:
            for i, c in enumerate(cs):
                fn(i, c)
        return run

    def bye() -> None:
        for c in cs:
            c.disconnect()
            c.loop_stop()

    steps: list[tuple[str, Callable[[], None]]] = [
        ("CONNECT (clean session)", connect),
        ("SUBSCRIBE, 1 topic, QoS 0", each(lambda i, c: c.subscribe(f"x/{i}/a", 0))),
        ("SUBSCRIBE, 3 topics in one packet, QoS 0",
         each(lambda i, c: c.subscribe([(f"y/{i}/{k}", 0) for k in "abc"]))),
        ("UNSUBSCRIBE a subscribed topic", each(lambda i, c: c.unsubscribe(f"x/{i}/a"))),
        ("UNSUBSCRIBE a topic never subscribed", each(lambda i, c: c.unsubscribe(f"z/{i}"))),
        ("PUBLISH retained, QoS 1 (a status)",
         each(lambda i, c: c.send(f"s/{i}", b"x" * 1500, qos=1, retain=True))),
        ("PUBLISH retained, QoS 1, replacing one",
         each(lambda i, c: c.send(f"s/{i}", b"y" * 1500, qos=1, retain=True))),
        ("PUBLISH retained, QoS 0, replacing one",
         each(lambda i, c: c.send(f"s/{i}", b"z" * 1500, qos=0, retain=True))),
        ("PUBLISH QoS 1 (an update)", each(lambda i, c: c.send(f"u/{i}", b"u" * 700, qos=1))),
        ("PUBLISH QoS 0", each(lambda i, c: c.send(f"u/{i}", b"u" * 700, qos=0))),
        ("DISCONNECT", bye),
    ]
    try:
        target.start()
        for name, fn in steps:
            before = target.stats()
            fn()
            time.sleep(1.5)
            grew = js_delta(before, target.stats())
            out.append({"operation": name, **{
                k.removeprefix("js_"): round(v / clients, 2) for k, v in grew.items()
                if k.endswith(("_total", "_errors", "_writes")) and v is not None}})
    finally:
        with contextlib.suppress(Exception):
            bye()
        target.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def reread(path: Path, keep: Path | None, out: Path | None) -> int:
    """The tables of an earlier run, its figures recomputed from the kept run files (a row
    without them stays as it was)."""
    data = read_json(path)
    rows: list[dict[str, Any]] = data.get("rows", [])
    for r in rows:
        cell = None if keep is None else keep / f"{r['broker']}-{r['mode']}-{r['devices']}"
        if "skipped" in r or cell is None or not (cell / "metrics.csv").exists():
            continue
        mib = {k: None if r.get(k) is None else int(r[k] * MIB)
               for k in ("rss_before_mb", "rss_peak_mb")}
        summary = read_json(cell / "summary.json")
        arrivals = read_arrivals(cell / "updates.csv", float(summary.get("scale", 960.0)))
        metrics = read_metrics(cell / "metrics.csv")
        r.update(summarize_cell(metrics, read_json(cell / "run.json"), summary, arrivals,
                                rss_before=mib["rss_before_mb"], rss_peak=mib["rss_peak_mb"]))
        if r.get("restart_began_s") is not None:
            began = float(r["restart_began_s"])
            r.update(recovery(metrics, arrivals, began=began,
                              ended=began + float(r.get("restart_took_s") or 0.0)))
    print(table(rows))
    if lines := ratio_lines(rows):
        print("\nmerged/s against Mosquitto's in this series:")
        print("\n".join(lines))
    if js := js_table(rows):
        print("\nJetStream during the NATS runs:")
        print(js)
    if out is not None:
        out.write_text(json.dumps({**data, "rows": rows, "ratios": ratios(rows)}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.fleet_brokers",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--devices", default="2000,5000,10000",
                    help="comma-separated fleet sizes (%(default)s)")
    ap.add_argument("--brokers", default=",".join(BROKERS),
                    help=f"comma-separated, out of {', '.join(BROKERS)} (%(default)s)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="the devices' sessions, comma-separated (%(default)s)")
    ap.add_argument("--duration", type=float, default=60.0,
                    help="each simulation's --duration, wall seconds (%(default)s)")
    ap.add_argument("--restart-at", type=float, default=None,
                    help="restart the broker this many wall seconds into each run (default: "
                         "no restart)")
    ap.add_argument("--seed", type=int, default=1, help="the simulations' seed (%(default)s)")
    ap.add_argument("--workers", type=int, default=2,
                    help="the simulator's device processes (%(default)s)")
    ap.add_argument("--grace", type=float, default=300.0,
                    help="a cell is stopped after duration + this many seconds (%(default)s)")
    ap.add_argument("--rss-limit-gb", type=float, default=8.0,
                    help="a cell is stopped when the broker's RSS passes this (%(default)s)")
    ap.add_argument("--sample-s", type=float, default=1.5,
                    help="broker RSS sampling interval, seconds (%(default)s)")
    ap.add_argument("--log-level", default="WARNING", help="the simulator's (%(default)s)")
    ap.add_argument("--nats-stream-replicas", type=int, default=3,
                    help="the NATS MQTT gateway's stream_replicas (%(default)s; an experiment: "
                         "1 keeps each MQTT stream on one node)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    ap.add_argument("--keep", type=Path, default=None,
                    help="copy each cell's run files, simulator output and broker log tails "
                         "into DIR/<broker>-<mode>-<N>/")
    ap.add_argument("--reread", type=Path, default=None,
                    help="no runs: recompute the figures of an earlier --json from the files "
                         "its --keep DIR holds, and print the tables again")
    ap.add_argument("--nats-op-costs", action="store_true",
                    help="no simulation: what each MQTT operation costs the NATS gateway in "
                         "JetStream requests and writes, per client (bare clients)")
    args = ap.parse_args(argv)
    if args.nats_op_costs:
        costs = nats_op_costs()
        keys = ["api_total", "api_errors", "sess_writes", "rmsgs_writes", "msgs_writes"]
        print("| operation (per client) | " + " | ".join(keys) + " |")
        print("|" + "---|" * (len(keys) + 1))
        for c in costs:
            print(f"| {c['operation']} | " + " | ".join(str(c.get(k, "-")) for k in keys) + " |")
        if args.json is not None:
            args.json.write_text(json.dumps({"nats_op_costs": costs}, indent=1))
        return 0
    if args.reread is not None:
        return reread(args.reread, args.keep, args.json)
    sizes = [int(x) for x in args.devices.split(",") if x]
    brokers = [b for b in args.brokers.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    for b in brokers:
        if b not in BROKERS:
            ap.error(f"unknown broker {b!r} (out of {', '.join(BROKERS)})")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} (out of {', '.join(MODES)})")
    limit = raise_fd_limit()
    for port in (1883, 4222, 5672):  # ours are on free ports; say when the machine's exist
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            log(f"(the machine's own broker on {port} is left alone)")
    log(f"fd limit {limit}, {os.cpu_count()} cores, python {sys.version.split()[0]}, "
        f"nice {os.nice(0)}")
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps({"rows": rows, "ratios": ratios(rows),
                                             "argv": sys.argv}, indent=1))

    for n in sizes:
        for kind in brokers:
            for mode in modes:
                # a broker that could not be set up once is not tried again
                skip = next((r["skipped"] for r in rows
                             if r["broker"] == kind and "skipped" in r), None)
                log(f"{kind}, {mode}, {n} devices")
                if skip is not None:
                    rows.append({"broker": kind, "mode": mode, "devices": n, "skipped": skip})
                    log(f"  skipped: {skip}")
                    continue
                row = run_cell(kind, mode, n, args)
                rows.append(row)
                if "skipped" in row:
                    log(f"  skipped: {row['skipped']}")
                else:
                    log(f"  connected {row.get('connected_peak')}, merged {row.get('merged')} "
                        f"({row.get('merged_per_s')}/s), status {_status(row)}")
                save()
    print(table(rows))
    lines = ratio_lines(rows)
    if lines:
        print("\nmerged/s against Mosquitto's in this series:")
        print("\n".join(lines))
    if js := js_table(rows):
        print("\nJetStream during the NATS runs:")
        print(js)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
