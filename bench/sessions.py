"""Broker sessions at fleet scale (issue 24 spike): what a device's MQTT session costs a broker,
persistent versus sessionless, with bare project MQTT clients (``create_client``'s ``Client`` on
``NetLoop``; no agent, no coordinator).

    cd <checkout> && PYTHONPATH=$PWD nice -n 10 python -m fedasync_iot.bench.sessions \\
        [--devices 500,2000] [--brokers mosquitto,nats,rabbitmq] \\
        [--modes persistent,sessionless] [--json OUT]

Brokers, all private, on free loopback ports (never the machine's 1883/4222/5672):

- ``mosquitto``: ``fedasync_iot.fleet.MosquittoBroker`` (persistence on);
- ``nats``: three clustered nats-server processes with JetStream and the MQTT gateway
  (``fedasync_iot.fleet.NatsCluster``); devices spread round robin over the three nodes, the
  coordinator on node A;
- ``rabbitmq``: one node with the MQTT plugin (``fedasync_iot.fleet.RabbitNode``).

A broker that is not installed or does not start is skipped with a line saying why.

Modes: ``persistent`` (clean_session False, the ack subscription at QoS 1, acks published at
QoS 1: today's device) and ``sessionless`` (clean_session True, ack subscription at QoS 0,
acks published at QoS 0). Updates are always published at QoS 1.

Each (broker, mode, N) gets a fresh broker and runs four phases, each with a timeout (what was
reached is reported when it runs out):

1. setup: N clients connect (paced in batches) and subscribe to ``fl/bench/<id>/ack``: sessions
   set up (CONNACK and SUBACK) per second; broker RSS (every broker process, psutil) before and
   after, so KB per connected session; on NATS the JetStream consumer directories on disk.
2. round trip: each device publishes one QoS 1 message on ``fl/bench/<id>/update``; one
   "coordinator" client (persistent session, QoS 1 subscription to ``fl/bench/+/update``)
   answers each on the device's ack topic: round trips per second, acks arrived, p50/p99.
3. restart: every device publishes a second update and the broker restarts at once (with
   ``--restart-at F``: once the coordinator has seen that fraction of them, or 5 s passed):
   Mosquitto stopped and started on the same port; NATS every node, or node B alone with
   ``--nats-restart one``; RabbitMQ the node. Time until every dropped device is connected and
   subscribed again (the client re-sends its unacknowledged QoS 1 update; reconnects back off as
   the simulator's do, 0.25-0.75 s then doubling, with jitter); then how many of the N devices
   never get the ack of the second update ("lost"), and how many still none after each such
   device re-sends it once, as the agent does after its ack timeout ("after resend"). A device
   whose ack subscription was refused (SUBACK 0x80, "sub failed") counts as not set up.

Clients run in child processes (at most ``--per-worker`` each, 1,000 by default, over one epoll
loop: ``NetLoop``), never more than 12 children including the coordinator's. A run
stops when the brokers' RSS passes ``--rss-limit-gb`` (6).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedasync_iot.bench._brokers import MIB, RssSampler, open_target
from fedasync_iot.fleet import NetLoop, raise_fd_limit
from fedasync_iot.models import BrokerAddress, Client, Connack, Message, PacketAck, create_client

MODES = ("persistent", "sessionless")
BROKERS = ("mosquitto", "nats", "rabbitmq")
MAX_CHILDREN = 12
POLL_S = 0.25


# -- the clients (child processes) ---------------------------------------------------------------
def _client(client_id: str, port: int, *, persistent: bool, max_inflight: int = 20) -> Client:
    """A project MQTT client for 127.0.0.1:`port` (MQTT 3.1.1, TCP_NODELAY, no queue limit)."""
    return create_client(BrokerAddress(host="127.0.0.1", port=port), client_id=client_id,
                         persistent=persistent, max_inflight=max_inflight)


class _Devices:
    """Up to --per-worker device clients on one NetLoop, driven by the parent over a pipe."""

    def __init__(self, conn: Connection, spec: dict[str, Any]) -> None:
        self.conn = conn
        self.persistent = spec["mode"] == "persistent"
        self.qos = 1 if self.persistent else 0
        self.loop = NetLoop(seed=spec["seed"])
        self.ports: dict[int, int] = spec["ports"]  # device index -> MQTT port
        self.clients: dict[int, Client] = {}
        self.ready: set[int] = set()
        self.ever_ready: set[int] = set()
        self.connected: set[int] = set()  # a CONNACK without error, ever
        self.last_first_ready = 0.0
        self.subscribed_once: set[int] = set()
        self.marked = False
        self.dropped: set[int] = set()
        self.reready: set[int] = set()
        self.last_reready = 0.0
        self.sent: dict[tuple[int, int], float] = {}  # (device, seq) -> first publish time
        self.acks: dict[int, dict[int, float]] = {}  # seq -> device -> arrival time
        self.dup_acks = 0
        self.refused = 0
        self.sub_failed = 0
        self.stopping = False
        for idx, port in self.ports.items():
            client = _client(f"bench-{spec['tag']}-{idx}", port, persistent=self.persistent)
            client.on_connack = partial(self._on_connack, idx)
            client.on_acked = partial(self._on_acked, idx)
            client.on_closed = partial(self._on_closed, idx)
            client.handle(partial(self._on_message, idx))
            self.loop.attach(client)
            self.clients[idx] = client
        self.loop.watch(conn, self._command)

    # the clients' events (on this loop's thread)
    def _on_connack(self, idx: int, connack: Connack) -> None:
        if not connack.accepted:
            self.refused += 1
            return
        self.connected.add(idx)
        if self.persistent and connack.session_present and idx in self.subscribed_once:
            self._set_ready(idx)
        else:
            self.clients[idx].subscribe(f"fl/bench/{idx}/ack", self.qos)

    def _on_acked(self, idx: int, ack: PacketAck) -> None:
        if ack.kind != "subscribe":
            return
        if ack.refused:  # SUBACK 0x80
            self.sub_failed += 1
            return
        self.subscribed_once.add(idx)
        self._set_ready(idx)

    def _set_ready(self, idx: int) -> None:
        now = time.monotonic()
        self.ready.add(idx)
        if idx not in self.ever_ready:
            self.ever_ready.add(idx)
            self.last_first_ready = now
        if self.marked and idx in self.dropped and idx not in self.reready:
            self.reready.add(idx)
            self.last_reready = now

    def _on_closed(self, idx: int, _why: str) -> None:
        self.ready.discard(idx)
        if self.marked:
            self.dropped.add(idx)
            self.reready.discard(idx)

    def _on_message(self, idx: int, msg: Message) -> None:
        with contextlib.suppress(ValueError):
            seq = int(msg.payload)
            got = self.acks.setdefault(seq, {})
            if idx in got:
                self.dup_acks += 1
            else:
                got[idx] = time.monotonic()

    # commands from the parent
    def _command(self) -> None:
        cmd, *rest = self.conn.recv()
        reply: Any = "ok"
        if cmd == "connect":
            self._connect_paced(list(self.clients))
        elif cmd == "publish":
            self._publish(rest[0], list(self.clients))
        elif cmd == "resend":
            seq = rest[0]
            missing = [i for i in self.clients if i not in self.acks.get(seq, {})]
            self._publish(seq, missing)
            reply = len(missing)
        elif cmd == "mark":
            self.marked, self.dropped, self.reready = True, set(), set()
        elif cmd == "stats":
            reply = self._stats()
        elif cmd == "rtts":
            seq = rest[0]
            reply = [t - self.sent[(i, seq)] for i, t in self.acks.get(seq, {}).items()]
        elif cmd == "stop":
            self.stopping = True
        self.conn.send(reply)

    def _connect_paced(self, idxs: list[int], batch: int = 50, every: float = 0.02) -> None:
        for k in range(0, len(idxs), batch):
            chunk = idxs[k:k + batch]

            def go(chunk: list[int] = chunk) -> None:
                for i in chunk:
                    self.loop.connect(self.clients[i], "127.0.0.1", self.ports[i], keepalive=60)

            self.loop.call_later(k // batch * every, go)

    def _publish(self, seq: int, idxs: list[int]) -> None:
        now = time.monotonic()
        for i in idxs:
            self.sent.setdefault((i, seq), now)
            self.clients[i].send(f"fl/bench/{i}/update", str(seq).encode(), qos=1)

    def _stats(self) -> dict[str, Any]:
        return {
            "ready": len(self.ready), "ever_ready": len(self.ever_ready),
            "connected": len(self.connected),
            "last_first_ready": self.last_first_ready, "dropped": len(self.dropped),
            "reready": len(self.reready), "last_reready": self.last_reready,
            "acks": {s: len(v) for s, v in self.acks.items()},
            "last_ack": {s: max(v.values()) for s, v in self.acks.items() if v},
            "dup_acks": self.dup_acks, "refused": self.refused, "sub_failed": self.sub_failed,
        }

    def run(self) -> None:
        self.loop.run(lambda: self.stopping)
        self.loop.close()


class _Coordinator:
    """One client: a persistent session, QoS 1 on fl/bench/+/update, an ack for every update."""

    def __init__(self, conn: Connection, spec: dict[str, Any]) -> None:
        self.conn = conn
        self.ack_qos = 1 if spec["mode"] == "persistent" else 0
        self.loop = NetLoop(seed=spec["seed"])
        self.port: int = spec["port"]
        self.client = _client(f"bench-{spec['tag']}-coordinator", self.port, persistent=True,
                              max_inflight=1000)
        self.client.on_connack = self._on_connack
        self.client.on_acked = self._on_acked
        self.client.on_closed = self._on_closed
        self.client.handle(self._on_message)
        self.loop.attach(self.client)
        self.loop.watch(conn, self._command)
        self.ready = False
        self.seen: dict[int, set[int]] = {}
        self.updates = 0
        self.stopping = False

    def _on_connack(self, connack: Connack) -> None:
        if not connack.accepted:
            return
        if connack.session_present:
            self.ready = True
        else:
            self.client.subscribe("fl/bench/+/update", 1)

    def _on_acked(self, ack: PacketAck) -> None:
        if ack.kind == "subscribe":
            self.ready = not ack.refused

    def _on_closed(self, _why: str) -> None:
        self.ready = False

    def _on_message(self, msg: Message) -> None:
        parts = msg.topic.split("/")
        with contextlib.suppress(ValueError, IndexError):
            idx, seq = int(parts[2]), int(msg.payload)
            self.updates += 1
            self.seen.setdefault(seq, set()).add(idx)
            self.client.send(f"fl/bench/{idx}/ack", msg.payload, qos=self.ack_qos)

    def _command(self) -> None:
        cmd, *_ = self.conn.recv()
        reply: Any = "ok"
        if cmd == "connect":
            self.loop.connect(self.client, "127.0.0.1", self.port, keepalive=60)
        elif cmd == "stats":
            reply = {"ready": self.ready, "updates": self.updates,
                     "seen": {s: len(v) for s, v in self.seen.items()}}
        elif cmd == "stop":
            self.stopping = True
        self.conn.send(reply)

    def run(self) -> None:
        self.loop.run(lambda: self.stopping)
        self.loop.close()


def _child_main(conn: Connection, spec: dict[str, Any]) -> None:
    raise_fd_limit()
    role: _Devices | _Coordinator = (_Coordinator(conn, spec) if spec["role"] == "coordinator"
                                     else _Devices(conn, spec))
    role.run()


class _Child:
    def __init__(self, ctx: Any, spec: dict[str, Any]) -> None:
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(theirs, spec), daemon=True)
        self.proc.start()
        theirs.close()

    def ask(self, *cmd: Any, timeout: float = 60.0) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"child {self.proc.pid} did not answer {cmd[0]!r}")
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError):
            self.ask("stop", timeout=10)
        self.proc.join(timeout=15)
        if self.proc.is_alive():
            self.proc.terminate()  # only the PID we started
            self.proc.join(timeout=10)


# -- one cell: a broker, a mode, N devices -------------------------------------------------------
def _sum_stats(kids: list[_Child]) -> dict[str, Any]:
    total: dict[str, Any] = {"ready": 0, "ever_ready": 0, "connected": 0, "dropped": 0,
                             "reready": 0,
                             "dup_acks": 0, "refused": 0, "sub_failed": 0,
                             "last_first_ready": 0.0, "last_reready": 0.0,
                             "acks": {}, "last_ack": {}}
    for kid in kids:
        s = kid.ask("stats")
        for k in ("ready", "ever_ready", "dropped", "reready", "dup_acks", "refused",
                  "sub_failed"):
            total[k] += s[k]
        total["connected"] += s.get("connected", 0)
        for k in ("last_first_ready", "last_reready"):
            total[k] = max(total[k], s[k])
        for seq, n in s["acks"].items():
            total["acks"][seq] = total["acks"].get(seq, 0) + n
        for seq, t in s["last_ack"].items():
            total["last_ack"][seq] = max(total["last_ack"].get(seq, 0.0), t)
    return total


def _wait(cond: Callable[[], bool], timeout: float, watch: RssSampler,
          *, quiet: Callable[[], Any] | None = None, quiet_s: float = 10.0) -> str:
    """Poll `cond` until true ("done"), `timeout` ("timeout"), the RSS limit ("rss limit") or,
    with `quiet`, `quiet_s` without a change in what it returns ("quiet")."""
    deadline = time.monotonic() + timeout
    last, last_change = None, time.monotonic()
    while True:
        if cond():
            return "done"
        if watch.over.is_set():
            return "rss limit"
        now = time.monotonic()
        if now >= deadline:
            return "timeout"
        if quiet is not None:
            value = quiet()
            if value != last:
                last, last_change = value, now
            elif now - last_change >= quiet_s:
                return "quiet"
        time.sleep(POLL_S)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_cell(kind: str, mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"broker": kind, "mode": mode, "devices": n}
    if kind == "nats":
        res["consumer_replicas"] = args.consumer_replicas or 3
        res["restart"] = args.nats_restart
    res["restart_at"] = args.restart_at
    workdir = Path(tempfile.mkdtemp(prefix=f"fedasync-sessions-{kind}-"))
    target = open_target(kind, workdir, res, cluster_name="fedasync-sessions",
                         consumer_replicas=args.consumer_replicas)
    if target is None:
        return res
    kids: list[_Child] = []
    watch = RssSampler(target, int(args.rss_limit_gb * 1024 * MIB), 1.0)
    ctx = mp.get_context("spawn")
    tag = f"{kind[:2]}{mode[:1]}{n}-{os.getpid()}"
    timeout = args.phase_timeout
    try:
        watch.start()
        ports = target.ports
        n_workers = max(1, min(MAX_CHILDREN - 1, math.ceil(n / args.per_worker)))
        coord = _Child(ctx, {"role": "coordinator", "mode": mode, "tag": tag, "seed": 0,
                             "port": ports[0]})
        kids.append(coord)
        workers = []
        for w in range(n_workers):
            mine = {i: ports[i % len(ports)] for i in range(w, n, n_workers)}
            workers.append(_Child(ctx, {"role": "devices", "mode": mode, "tag": tag,
                                        "seed": w + 1, "ports": mine}))
        kids.extend(workers)
        for kid in workers:
            kid.ask("stats", timeout=120)  # imported and built
        coord.ask("connect")
        if _wait(lambda: bool(coord.ask("stats")["ready"]), 60, watch) != "done":
            res["skipped"] = "the coordinator did not connect"
            return res
        time.sleep(1.0)
        rss0 = target.rss()
        res["rss_before_mb"] = round(rss0 / MIB, 1)

        # 1. setup
        stats: dict[str, Any] = {}

        def refresh() -> dict[str, Any]:
            stats.clear()
            stats.update(_sum_stats(workers))
            return stats

        t0 = time.monotonic()
        for kid in workers:
            kid.ask("connect")
        how = _wait(lambda: refresh()["ever_ready"] >= n, timeout, watch,
                    quiet=lambda: stats.get("ever_ready"), quiet_s=max(30.0, timeout / 3))
        ready = stats["ever_ready"]
        setup_s = (stats["last_first_ready"] - t0) if ready else time.monotonic() - t0
        res.update(setup=how, connected=stats["connected"], ready=ready,
                   setup_s=round(setup_s, 2),
                   setup_per_s=round(ready / setup_s, 1) if setup_s > 0 else None,
                   refused=stats["refused"], sub_failed=stats["sub_failed"])
        time.sleep(2.0)
        rss1 = target.rss()
        res["rss_after_mb"] = round(rss1 / MIB, 1)
        # per connected session (a device whose subscription was refused still has one)
        conn = stats["connected"]
        res["kb_per_device"] = round((rss1 - rss0) / 1024 / conn, 1) if conn else None
        try:
            res.update(target.jetstream_store())
        except OSError as exc:  # a measurement on the side must not end the run
            res["extra_error"] = str(exc)
        print(f"  setup: {how}, {ready}/{n} in {setup_s:.1f} s, "
              f"{res['kb_per_device']} KB/device", flush=True)
        if how == "rss limit" or ready == 0:
            return res

        # 2. round trip
        t1 = time.monotonic()
        for kid in workers:
            kid.ask("publish", 1)
        how = _wait(lambda: refresh()["acks"].get(1, 0) >= ready, timeout, watch,
                    quiet=lambda: stats["acks"].get(1, 0), quiet_s=20.0)
        acks = stats["acks"].get(1, 0)
        rt_s = (stats["last_ack"].get(1, t1) - t1) if acks else time.monotonic() - t1
        rtts = [x for kid in workers for x in kid.ask("rtts", 1)]
        res.update(roundtrip=how, acks=acks, rt_s=round(rt_s, 2),
                   rt_per_s=round(acks / rt_s, 1) if rt_s > 0 else None,
                   rtt_p50_ms=None if not rtts else round(1000 * (_pct(rtts, 0.5) or 0), 1),
                   rtt_p99_ms=None if not rtts else round(1000 * (_pct(rtts, 0.99) or 0), 1))
        print(f"  round trip: {how}, {acks} acks in {rt_s:.1f} s", flush=True)

        # 3. restart with updates in flight
        for kid in workers:
            kid.ask("mark")
        for kid in workers:
            kid.ask("publish", 2)
        if args.restart_at > 0:
            _wait(lambda: coord.ask("stats")["seen"].get(2, 0) >= ready * args.restart_at, 5.0,
                  watch)
        res["seen_before_restart"] = coord.ask("stats")["seen"].get(2, 0)
        t2 = time.monotonic()
        restarted = target.restart(None if args.nats_restart == "all" else [1])
        res["restart_s"] = round(time.monotonic() - t2, 1)
        expected = sum(1 for i in range(n) if i % len(ports) in restarted)
        how = _wait(lambda: (refresh()["dropped"] >= min(expected, ready)
                             and stats["reready"] >= stats["dropped"]
                             and stats["ready"] >= ready), timeout, watch,
                    quiet=lambda: (stats["dropped"], stats["reready"]),
                    quiet_s=max(60.0, timeout / 2))
        reconnect_s = (stats["last_reready"] - t2) if stats["reready"] else None
        res.update(reconnect=how, dropped=stats["dropped"], reconnected=stats["reready"],
                   reconnect_s=None if reconnect_s is None else round(reconnect_s, 1),
                   reconnect_per_s=(round(stats["reready"] / reconnect_s, 1)
                                    if reconnect_s else None))
        print(f"  restart: {how}, {stats['reready']}/{stats['dropped']} back in "
              f"{res['reconnect_s']} s", flush=True)
        def second_acks() -> int:  # until all, 60 s, or 15 s without a new one
            _wait(lambda: refresh()["acks"].get(2, 0) >= ready, 60.0, watch,
                  quiet=lambda: stats["acks"].get(2, 0), quiet_s=15.0)
            return int(stats["acks"].get(2, 0))

        res["acks2"] = second_acks()
        res["lost"] = n - res["acks2"]
        res["resent"] = sum(kid.ask("resend", 2) for kid in workers)
        res["lost_after_resend"] = n - second_acks()
        res["dup_acks"] = stats["dup_acks"]
        res["coordinator_updates"] = coord.ask("stats")["updates"]
        print(f"  acks of the in-flight update: {res['acks2']} ({res['lost']} lost), "
              f"{res['lost_after_resend']} lost after one resend", flush=True)
    except (TimeoutError, OSError, EOFError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        watch.done.set()
        if watch.is_alive():
            watch.join(timeout=5)
        res["rss_peak_mb"] = round(watch.peak() / MIB, 1)
        res["rss_limit_hit"] = watch.over.is_set()
        for kid in kids:
            kid.stop()
        target.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return res


# -- output --------------------------------------------------------------------------------------
COLUMNS = [
    ("broker", "broker"), ("mode", "mode"), ("devices", "N"), ("connected", "conn"),
    ("ready", "ready"),
    ("setup_s", "setup s"), ("setup_per_s", "setup/s"), ("rss_before_mb", "RSS0 MB"),
    ("sub_failed", "sub failed"), ("rss_after_mb", "RSS1 MB"), ("kb_per_device", "KB/dev"),
    ("js_consumer_dirs", "JS cons"),
    ("acks", "acks"), ("rt_per_s", "rt/s"), ("rtt_p50_ms", "p50 ms"), ("rtt_p99_ms", "p99 ms"),
    ("restart_s", "restart s"), ("dropped", "dropped"), ("reconnected", "back"),
    ("reconnect_s", "reconn s"),
    ("lost", "lost"), ("lost_after_resend", "lost2"), ("rss_peak_mb", "peak MB"),
]


def table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['broker']} | {r['mode']} | {r['devices']} | skipped: "
                         f"{r['skipped']} |")
            continue
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key)
            cells.append("-" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedasync_iot.bench.sessions",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--devices", default="500,2000", help="comma-separated fleet sizes")
    ap.add_argument("--brokers", default=",".join(BROKERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--per-worker", type=int, default=1000,
                    help="devices per child process (at most 11 device children)")
    ap.add_argument("--phase-timeout", type=float, default=180.0,
                    help="seconds for setup, round trip and reconnect, each")
    ap.add_argument("--nats-restart", choices=("all", "one"), default="all")
    ap.add_argument("--consumer-replicas", type=int, default=None,
                    help="NATS mqtt consumer_replicas (unset: the streams', 3)")
    ap.add_argument("--restart-at", type=float, default=0.0,
                    help="restart once the coordinator has seen this fraction of the second "
                         "updates (0: right after the devices publish them)")
    ap.add_argument("--rss-limit-gb", type=float, default=6.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    limit = raise_fd_limit()
    sizes = [int(x) for x in args.devices.split(",") if x]
    brokers = [b for b in args.brokers.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    if max(sizes) > args.per_worker * (MAX_CHILDREN - 1):
        ap.error(f"at most {args.per_worker * (MAX_CHILDREN - 1)} devices with --per-worker "
                 f"{args.per_worker}")
    for port in (1883, 4222, 5672):  # ours are on free ports; say when the machine's exist
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            print(f"(the machine's own broker on {port} is left alone)")
    print(f"fd limit {limit}, {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"paho-mqtt {version('paho-mqtt')}", flush=True)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        for kind in brokers:
            for mode in modes:
                # a broker that could not be set up once is not tried again
                skip = next((r["skipped"] for r in rows
                             if r["broker"] == kind and "skipped" in r), None)
                print(f"{kind}, {mode}, {n} devices", flush=True)
                if skip is not None:
                    rows.append({"broker": kind, "mode": mode, "devices": n, "skipped": skip})
                    print(f"  skipped: {skip}")
                    continue
                row = run_cell(kind, mode, n, args)
                rows.append(row)
                if "skipped" in row:
                    print(f"  skipped: {row['skipped']}", flush=True)
                if args.json is not None:
                    args.json.write_text(json.dumps({"rows": rows, "argv": sys.argv}, indent=1))
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "argv": sys.argv,
                                         "median_kb_per_device": {
                                             f"{k}/{m}": statistics.median(v) for k in brokers
                                             for m in modes
                                             if (v := [r["kb_per_device"] for r in rows
                                                       if r["broker"] == k and r["mode"] == m
                                                       and r.get("kb_per_device")])}},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
