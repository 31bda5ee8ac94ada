"""Update-to-end-to-end-ack latency of the coordinator at paced offered rates (issue 17, item 4).

    python -m fedasync_iot.bench.latency [--rule fedasync|fedbuff|both] [--rates 100,300,1000,...]
                            [--duration S] [--warmup S] [--devices D] [--json OUT]

What is measured: for each update, the time from the moment its MQTT PUBLISH has been written
to the device's socket to the moment that device receives the coordinator's end-to-end ack on
``fl/<fleet>/ack/<device>`` (the ack names the update id, `decode_ack`). Both stamps are taken
in the same process (the publisher) on the same monotonic clock.

Set-up, all borrowed from `bench.ingest`: a private Mosquitto (`MosquittoBroker`, with
``set_tcp_nodelay true``; never the machine's broker), the real `CoordinatorService` with
durability as deployed (SQLite WAL, synchronous=FULL, an fsync'd checkpoint per group commit,
PUBACK and acks only after the commit; snapshots with ONNX every >= 1 s; evaluation off; a fresh
coordinator and state directory per rate) and the same pre-encoded MLP updates (2,410 float32
parameters, ~9.9 KB), built before the clock starts. The load comes from a child process that
writes pre-built QoS 1 packets from one selector loop over D device connections (default 50),
round robin, **paced**: update i is due at t0 + i/rate and is written when due, never in a
burst and with no in-flight window, so a slow coordinator shows as latency, not as a slower
publisher. Its lag behind the schedule is reported, so a publisher that could not keep up is
visible.

Each rate runs ``warmup + duration`` seconds of updates; the warm-up's updates are discarded.
Of the rest we report the latency p50/p90/p99/max, the sent rate, the achieved rate (acked
updates over first write to last ack), the ack statuses (every ack must be accepted or
buffered), and the CPU% (100 = one core) of the coordinator (this process: it runs the service),
the broker and the publisher over the measured sending window (psutil), with the time their
threads waited runnable for a CPU (Linux schedstat: what a busy neighbour takes; the load
average and CPU pressure before each rate are recorded too). A rate is *sustained*
when every measured update was acked (within ``--drain`` s after the last write), none was
rejected, the achieved rate is >= 95% of the offered one and p99 <= 1 s. The rates are stepped
up until one is not sustained (100 and 1,000 are always run), then ``--refine`` midpoints are
tried between the last sustained and the first failed rate; the highest sustained one is
reported. The machine is shared: the CPU count and load average are recorded with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import selectors
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedasync_iot.bench.ingest import (
    BROKER_INFLIGHT,
    RULES,
    _environment,
    _payloads,
    _publish_header,
    _RawDevice,
    coordinator_settings,
    running_coordinator,
)
from fedasync_iot.fleet import MosquittoBroker
from fedasync_iot.models import BrokerAddress, Topics, decode_ack

DEFAULT_RATES = (100, 300, 1000, 2000, 3000, 4000, 5000, 6000, 8000, 10_000)
REQUIRED_RATES = (100, 1000)  # the two fixed points: run even after a failure
P99_LIMIT_S = 1.0
ACHIEVED_MIN = 0.95

log = logging.getLogger("fedasync.bench")


# ------------------------------------------------------------------------------ publisher
# This runs in the child process.


class _PacedDevice(_RawDevice):
    """A `_RawDevice` whose output queue remembers which update each buffer is, so the time a
    PUBLISH has been completely written to the socket is stamped (-1: a PUBACK of ours)."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        super().__init__(host, port, client_id)
        self.ids: deque[int] = deque()
        self.writing = False  # registered for EVENT_WRITE

    def queue(self, packet: bytes, index: int) -> None:
        self.out.append(memoryview(packet))
        self.ids.append(index)

    def flush_stamped(self, sent_at: np.ndarray[Any, np.dtype[np.float64]]) -> None:
        try:
            sent = self.sock.sendmsg(list(itertools.islice(self.out, 64)))
        except BlockingIOError:
            return
        now = time.monotonic()
        while self.out and sent >= len(self.out[0]):
            sent -= len(self.out.popleft())
            if (index := self.ids.popleft()) >= 0:
                sent_at[index] = now
        if sent:
            self.out[0] = self.out[0][sent:]


def _paced_round(conn: Connection, url: str, fleet: str, *, rate: float, updates: int,
                 warmup: int, devices: int, drain_s: float, seed: int) -> dict[str, Any]:
    topics = Topics(fleet)
    packets = [_publish_header(topics.update(device).encode(), i % 65_000 + 1, len(payload))
               + payload for i, (device, payload) in enumerate(_payloads(updates, devices, seed))]
    address = BrokerAddress.parse(url)
    conns = [_PacedDevice(address.host, address.port, f"lat-{fleet}-{d}") for d in range(devices)]
    sel = selectors.DefaultSelector()
    sent_at = np.full(updates, np.nan)
    acked_at = np.full(updates, np.nan)
    statuses: Counter[str] = Counter()
    acks = 0

    def want_write(dev: _PacedDevice) -> None:
        if bool(dev.out) != dev.writing:
            dev.writing = bool(dev.out)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if dev.writing else 0)
            sel.modify(dev.sock, events, dev)

    try:
        for d, dev in enumerate(conns):
            dev.subscribe(topics.ack(f"dev-{d:03d}"))
            dev.sock.setblocking(False)
            sel.register(dev.sock, selectors.EVENT_READ, dev)
        t0 = time.monotonic() + 0.05
        i, stop = 0, float("inf")
        while acks < updates:
            now = time.monotonic()
            while i < updates and t0 + i / rate <= now:  # everything due, one at a time
                if i == warmup:
                    conn.send("measure")
                dev = conns[i % devices]
                dev.queue(packets[i], i)
                dev.flush_stamped(sent_at)
                want_write(dev)
                i += 1
                if i == updates:
                    conn.send("sent")
                    stop = now + drain_s
            if now > stop:
                break
            timeout = t0 + i / rate - now if i < updates else min(0.2, stop - now)
            for key, mask in sel.select(max(timeout, 0.0)):
                dev = key.data
                if mask & selectors.EVENT_READ:
                    with contextlib.suppress(BlockingIOError):
                        data = dev.sock.recv(1 << 18)
                        if not data:
                            raise RuntimeError("broker closed a publisher connection")
                        dev.inbuf += data
                        t = time.monotonic()
                        for first, body in dev.packets():
                            if first & 0xF0 != 0x30:  # PUBACKs of our updates: nothing to do
                                continue
                            topic_end = 2 + int.from_bytes(body[:2], "big")
                            start = topic_end + (2 if first & 0x06 else 0)
                            if first & 0x06:  # the ack came at QoS 1: PUBACK it
                                dev.queue(b"\x40\x02" + body[topic_end:start], -1)
                            ack = decode_ack(body[start:])
                            if ack.update_id is None:
                                statuses[ack.status] += 1
                                continue
                            index = int(ack.update_id[1:])
                            if np.isnan(acked_at[index]):  # a redelivery is not a second ack
                                acked_at[index] = t
                                statuses[ack.status] += 1
                                acks += 1
                if dev.out:
                    dev.flush_stamped(sent_at)
                want_write(dev)
        scheduled = t0 + np.arange(updates) / rate
        return {"sent_at": sent_at, "acked_at": acked_at, "scheduled": scheduled,
                "statuses": dict(statuses), "written": i}
    finally:
        sel.close()
        for dev in conns:
            dev.close()


def _publisher_main(conn: Connection, url: str, devices: int, seed: int) -> None:
    """The child process: one paced round per command until told None."""
    conn.send("ready")
    while (command := conn.recv()) is not None:
        fleet, rate, updates, warmup, drain_s = command
        conn.send(_paced_round(conn, url, fleet, rate=rate, updates=updates, warmup=warmup,
                               devices=devices, drain_s=drain_s, seed=seed))


# ------------------------------------------------------------------------------ one rate


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """CPU seconds used, and seconds its threads waited runnable for a CPU (Linux schedstat;
    0 elsewhere): on a shared machine the second says how much the neighbours took."""
    t = proc.cpu_times()
    waited = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                waited += int((task / "schedstat").read_text().split()[1])
    return float(t.user + t.system), waited / 1e9


def _cpu_pressure() -> float | None:
    """The share of the last 10 s some runnable task waited for a CPU (Linux PSI), %."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return float(Path("/proc/pressure/cpu").read_text().split()[1].split("=")[1])
    return None


def _one_rate(broker: MosquittoBroker, workdir: Path, conn: Connection,
              procs: dict[str, psutil.Process], *, rule: str, rate: int, warmup_s: float,
              duration_s: float, drain_s: float, snapshot_interval_s: float) -> dict[str, Any]:
    fleet = f"lat{rate}-{uuid.uuid4().hex[:6]}"
    warmup = round(rate * warmup_s)
    updates = warmup + max(1, round(rate * duration_s))
    load_before = os.getloadavg()[0], _cpu_pressure()
    with running_coordinator(broker.url, fleet, workdir / f"state-{fleet}", rule=rule,
                             max_staleness=updates,
                             snapshot_interval_s=snapshot_interval_s) as service:
        conn.send((fleet, float(rate), updates, warmup, drain_s))
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in procs}
        wall: list[float] = []
        for mark in ("measure", "sent"):
            if not conn.poll(120 + warmup_s + duration_s):
                raise RuntimeError(f"the publisher did not say {mark!r}")
            if (said := conn.recv()) != mark:
                raise RuntimeError(f"the publisher said {said!r}, not {mark!r}")
            wall.append(time.monotonic())
            for name, proc in procs.items():
                cpu[name].append(_cpu(proc))
        if not conn.poll(drain_s + 60):
            raise RuntimeError("the publisher did not finish")
        pub: dict[str, Any] = conn.recv()
        version = service.engine.version
        batches = list(service.batch_sizes)
    return _figures(pub, rate=rate, warmup=warmup, cpu=cpu, wall=wall, version=version,
                    batches=batches, load_before=load_before)


def _figures(pub: dict[str, Any], *, rate: int, warmup: int,
             cpu: dict[str, list[tuple[float, float]]], wall: list[float], version: int,
             batches: list[int], load_before: tuple[float, float | None]) -> dict[str, Any]:
    sent = pub["sent_at"][warmup:]
    acked = pub["acked_at"][warmup:]
    lat_ms = (acked - sent)[~np.isnan(acked)] * 1e3
    missing = int(np.isnan(acked).sum())
    got = len(lat_ms)
    span = float(np.nanmax(acked) - np.nanmin(sent)) if got else float("inf")
    send_span = float(np.nanmax(sent) - np.nanmin(sent))
    lag_ms = (sent - pub["scheduled"][warmup:]) * 1e3
    statuses = {k: pub["statuses"].get(k, 0) for k in ("accepted", "buffered", "rejected")}
    pct = ({f"p{q}": round(float(np.percentile(lat_ms, q)), 2) for q in (50, 90, 99)}
           | {"max": round(float(lat_ms.max()), 2)}) if got else {}
    achieved = got / span if got else 0.0
    window = wall[1] - wall[0]
    sustained = bool(missing == 0 and statuses["rejected"] == 0 and achieved >= ACHIEVED_MIN * rate
                 and pct.get("p99", float("inf")) <= P99_LIMIT_S * 1e3)
    return {
        "offered_per_s": rate, "measured_updates": len(sent),
        "sent_per_s": round(len(sent) / send_span, 1) if send_span > 0 else None,
        "achieved_per_s": round(achieved, 1), "latency_ms": pct, "missing_acks": missing,
        "statuses": statuses,
        "publisher_lag_ms": {"p99": round(float(np.nanpercentile(lag_ms, 99)), 2),
                             "max": round(float(np.nanmax(lag_ms)), 2)},
        "cpu_percent": {name: round(100 * (c[1][0] - c[0][0]) / window, 1)
                        for name, c in cpu.items()},
        "cpu_wait_percent": {name: round(100 * (c[1][1] - c[0][1]) / window, 1)
                             for name, c in cpu.items()},
        "commits": len(batches),
        "batch_mean": round(sum(batches) / len(batches), 1) if batches else 0,
        "final_version": version, "loadavg_before": round(load_before[0], 2),
        "cpu_pressure_avg10_before": load_before[1],
        "sustained": sustained,
    }


# ------------------------------------------------------------------------------ the run


def _steps(rates: Sequence[int], run_rate: Any, refine: int) -> list[dict[str, Any]]:
    """Step up through `rates` (stopping after the first failure, except for the required
    ones), then bisect `refine` times between the last sustained and the first failed rate."""
    done: list[dict[str, Any]] = []
    failed: int | None = None
    for rate in sorted(rates):
        if failed is not None and rate not in REQUIRED_RATES:
            continue
        done.append(run_rate(rate))
        if not done[-1]["sustained"] and failed is None:
            failed = rate
    for _ in range(refine):
        ok = [r["offered_per_s"] for r in done if r["sustained"]]
        bad = [r["offered_per_s"] for r in done if not r["sustained"]
               and r["offered_per_s"] > max(ok, default=0)]
        if not ok or not bad:
            break
        mid = round((max(ok) + min(bad)) / 2, -2)
        if mid in (max(ok), min(bad)):
            break
        done.append(run_rate(int(mid)))
    return sorted(done, key=lambda r: r["offered_per_s"])


def run(*, rules: Sequence[str] = ("fedasync",), rates: Sequence[int] = DEFAULT_RATES,
        duration_s: float = 10.0, warmup_s: float = 2.0, drain_s: float = 10.0,
        devices: int = 50, refine: int = 1, snapshot_interval_s: float = 1.0,
        seed: int = 0) -> dict[str, Any]:
    if min(duration_s, devices, *rates) <= 0 or warmup_s < 0 or not rules:
        raise ValueError("rates, duration and devices must be > 0, warmup >= 0, with a rule")
    if unknown := set(rules) - set(RULES):
        raise ValueError(f"unknown rule: {sorted(unknown)}")
    env = _environment() | {"loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    started = time.monotonic()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedasync-bench-latency-") as tmp, \
            MosquittoBroker(workdir=Path(tmp) / "broker", max_inflight=BROKER_INFLIGHT) as broker:
        proc = ctx.Process(target=_publisher_main, name="bench-latency-publisher", daemon=True,
                           args=(child, broker.url, devices, seed))
        proc.start()
        try:
            if not parent.poll(120) or parent.recv() != "ready":
                raise RuntimeError("the publisher process did not start")
            me = psutil.Process()
            mosquitto = next(p for p in me.children() if str(broker.conf_path) in p.cmdline())
            assert proc.pid is not None
            procs = {"coordinator": me, "broker": mosquitto, "publisher": psutil.Process(proc.pid)}
            for rule in rules:
                def run_rate(rate: int, rule: str = rule) -> dict[str, Any]:
                    r = _one_rate(broker, Path(tmp), parent, procs, rule=rule, rate=rate,
                                  warmup_s=warmup_s, duration_s=duration_s, drain_s=drain_s,
                                  snapshot_interval_s=snapshot_interval_s)
                    log.info("%s %d/s: %s", rule, rate, r)
                    return r
                steps = _steps(rates, run_rate, refine)
                ok = [r["offered_per_s"] for r in steps if r["sustained"]]
                results[rule] = {"highest_sustained_per_s": max(ok, default=None),
                                 "rates": steps}
        finally:
            with contextlib.suppress(OSError):
                parent.send(None)
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    return {
        "benchmark": "update_to_ack_latency",
        "target": "p99 <= 50 ms at 1,000 updates/s",
        "settings": {
            "rules": list(rules), "rates": list(rates), "duration_s": duration_s,
            "warmup_s": warmup_s, "drain_s": drain_s, "devices": devices, "refine": refine,
            "qos": 1, "pacing": "update i written at t0 + i/rate, round robin over devices",
            **coordinator_settings(snapshot_interval_s),
            "sustained_if": f"all acked, none rejected, achieved >= {ACHIEVED_MIN:.0%} of "
                            f"offered, p99 <= {P99_LIMIT_S:g} s",
            "elapsed_s": round(time.monotonic() - started, 1), **env,
        },
        "results": results,
    }


def _table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"update -> end-to-end ack latency, MLP {s['n_params']} params, {s['devices']} devices, "
        f"QoS 1, {s['warmup_s']:g} s warm-up + {s['duration_s']:g} s measured per rate",
        f"{s['cpus']} CPUs, load average at start {s['loadavg_at_start']}, {s['mosquitto']}",
        f"coordinator: {s['durability']}",
        "",
        f"{'rule':8} {'offered':>7} {'sent':>7} {'achieved':>8} {'p50':>7} {'p90':>7} "
        f"{'p99':>7} {'max':>7} {'lag99':>6}  {'acc/buf/rej/miss':>18}  "
        f"{'cpu% coord/broker/pub':>21} {'wait%':>5} {'load':>5}  ok",
    ]
    for rule, entry in result["results"].items():
        for r in entry["rates"]:
            lat, st, c = r["latency_ms"], r["statuses"], r["cpu_percent"]
            counts = f"{st['accepted']}/{st['buffered']}/{st['rejected']}/{r['missing_acks']}"
            cpu = f"{c['coordinator']:.0f}/{c['broker']:.0f}/{c['publisher']:.0f}"
            lines.append(
                f"{rule:8} {r['offered_per_s']:>7} {r['sent_per_s'] or 0:>7.0f} "
                f"{r['achieved_per_s']:>8.0f} "
                + " ".join(f"{lat.get(k, float('nan')):>7.1f}" for k in ("p50", "p90", "p99",
                                                                        "max"))
                + f" {r['publisher_lag_ms']['p99']:>6.1f}  {counts:>18}  {cpu:>21} "
                  f"{r['cpu_wait_percent']['coordinator']:>5.0f} {r['loadavg_before']:>5.2f}  "
                  f"{'yes' if r['sustained'] else 'NO'}")
        lines.append(f"{rule}: highest sustained rate {entry['highest_sustained_per_s']}/s")
    lines.append(f"(latencies and publisher lag in ms; wait%: the coordinator's threads "
                 f"runnable but waiting for a CPU; {s['elapsed_s']} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedasync_iot.bench.latency",
        description="Update-to-end-to-end-ack latency of the durable coordinator at paced "
                    "offered rates, and the highest rate it sustains, on a private Mosquitto.")
    p.add_argument("--rule", choices=[*RULES, "both"], default="fedasync",
                   help="merge rule: FedAsync (alpha 0.5) or FedBuff (K=10) (default fedasync)")
    p.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)),
                   help="offered rates to step through, updates/s (default %(default)s)")
    p.add_argument("--duration", type=float, default=10.0, metavar="S",
                   help="measured seconds per rate (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, metavar="S",
                   help="seconds of updates sent first and discarded (default 2)")
    p.add_argument("--drain", type=float, default=10.0, metavar="S",
                   help="wait for acks this long after the last write (default 10)")
    p.add_argument("--devices", type=int, default=50, help="device connections (default 50)")
    p.add_argument("--refine", type=int, default=1,
                   help="midpoints tried between the last sustained and first failed rate "
                        "(default 1)")
    p.add_argument("--snapshot-interval", type=float, default=1.0, metavar="S",
                   help="coordinator snapshots.min_interval_s (default 1.0, as deployed)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    p.add_argument("-v", "--verbose", action="store_true", help="log each rate")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    result = run(rules=RULES if args.rule == "both" else (args.rule,),
                 rates=[int(r) for r in args.rates.split(",")], duration_s=args.duration,
                 warmup_s=args.warmup, drain_s=args.drain, devices=args.devices,
                 refine=args.refine, snapshot_interval_s=args.snapshot_interval)
    print(_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
