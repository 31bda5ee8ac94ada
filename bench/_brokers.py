"""The private brokers the broker benchmarks measure (bench/sessions.py, bench/fleet_brokers.py):
one `Target` per kind, started on free loopback ports, with its processes' memory, its logs and,
for NATS, the JetStream counters (over the NATS protocol) and consumer directories (on disk)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from fedasync_iot.fleet import MosquittoBroker, NatsCluster, RabbitNode

MIB = 1024 * 1024
# The machine's own brokers' ports: a private broker must never be reached on one of them.
RESERVED = frozenset({1883, 4222, 5672, 15672, 4369, 6222, 8222, 25672})
MQTT_STREAMS = ("$MQTT_sess", "$MQTT_msgs", "$MQTT_rmsgs")


@dataclass
class Target:
    """A private broker (one or more processes): its URLs, and how to start, stop, restart it."""

    urls: list[str]  # devices round robin over them; the coordinator on [0]
    start: Callable[[], None]
    close: Callable[[], None]
    pids: Callable[[], list[int]]
    # node indexes (into `urls`; None: every node) -> the indexes restarted
    restart: Callable[[Sequence[int] | None], list[int]]
    logs: Callable[[], str] = str
    stats: Callable[[], dict[str, Any]] = dict  # broker-side counters (NATS: JetStream)
    jetstream_dirs: list[Path] = field(default_factory=list)  # NATS: each node's store

    @property
    def ports(self) -> list[int]:
        return [int(u.rsplit(":", 1)[1]) for u in self.urls]

    def processes(self) -> list[psutil.Process]:
        """The broker's processes and their children."""
        out: list[psutil.Process] = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                out += [proc, *proc.children(recursive=True)]
        return out

    def rss(self) -> int:
        """Resident memory of the broker's processes and their children (bytes)."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def jetstream_store(self) -> dict[str, Any]:
        """Consumers of the MQTT message stream on disk (one per QoS 1 subscription and
        replica), summed over the nodes, and the JetStream store's size; {} without one."""
        if not self.jetstream_dirs:
            return {}
        consumers = 0
        size = 0
        for top in self.jetstream_dirs:
            # JetStream adds and removes files meanwhile: what vanishes is not counted
            for root, dirs, files in os.walk(top):
                if root.endswith(os.path.join("streams", "$MQTT_msgs", "obs")):
                    consumers += len(dirs)
                for name in files:
                    with contextlib.suppress(OSError):
                        size += os.stat(os.path.join(root, name)).st_size
        return {"js_consumer_dirs": consumers, "js_store_mb": round(size / MIB, 1)}


class RssSampler(threading.Thread):
    """The broker's RSS and CPU every `every` seconds: (monotonic time, bytes, % of one core)
    samples, the peak, and `over` once the RSS passes `limit`."""

    def __init__(self, target: Target, limit: int, every: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.target, self.limit, self.every = target, limit, every
        self.samples: list[tuple[float, int, float]] = []
        self.over = threading.Event()
        self.done = threading.Event()
        self._seen: dict[int, psutil.Process] = {}  # cpu_percent needs the same object

    def run(self) -> None:
        while not self.done.wait(self.every):
            rss, cpu = 0, 0.0
            try:
                for found in self.target.processes():
                    p = self._seen.setdefault(found.pid, found)
                    with contextlib.suppress(psutil.Error):
                        rss += p.memory_info().rss
                        cpu += p.cpu_percent(None)
            except Exception:  # a broker mid-restart  # noqa: S112
                continue
            self.samples.append((time.monotonic(), rss, cpu))
            if rss > self.limit:
                self.over.set()

    def peak(self, since: float | None = None) -> int:
        return max((r for t, r, _ in self.samples if since is None or t >= since), default=0)

    def cpu(self, since: float | None, until: float | None = None) -> dict[str, Any]:
        """Mean and max CPU (% of one core) of the samples in [since, until]."""
        got = [c for t, _, c in self.samples[1:]
               if (since is None or t >= since) and (until is None or t <= until)]
        if not got:
            return {"broker_cpu_mean": None, "broker_cpu_max": None}
        return {"broker_cpu_mean": round(sum(got) / len(got)), "broker_cpu_max": round(max(got))}


def open_target(kind: str, workdir: Path, res: dict[str, Any], **kw: Any) -> Target | None:
    """`make_target(kind, workdir / "broker", **kw)`, started and timed into `res`
    (``broker_start_s``); None, with ``res["skipped"]`` saying why and `workdir` removed, when it
    cannot be made, came up on one of the machine's own ports or did not start."""
    try:
        target = make_target(kind, workdir / "broker", **kw)
    except Exception as exc:
        res["skipped"] = f"{type(exc).__name__}: {exc}"
        shutil.rmtree(workdir, ignore_errors=True)
        return None
    if RESERVED & set(target.ports):  # free ports are ephemeral: never these
        res["skipped"] = f"a reserved port came up free: {target.urls}"
        shutil.rmtree(workdir, ignore_errors=True)
        return None
    t = time.monotonic()
    try:
        target.start()
    except Exception as exc:
        res["skipped"] = f"did not start: {type(exc).__name__}: {str(exc)[:300]}"
        target.close()
        shutil.rmtree(workdir, ignore_errors=True)
        return None
    res["broker_start_s"] = round(time.monotonic() - t, 1)
    return target


def make_target(kind: str, workdir: Path, *, cluster_name: str = "fedasync-bench",
                consumer_replicas: int | None = None, stream_replicas: int = 3,
                timeout: float = 120.0) -> Target:
    """A fresh broker of `kind` in `workdir` (not started): Mosquitto with persistence, a
    3-node NATS cluster (JetStream, the MQTT gateway) or one RabbitMQ node. Restarting
    Mosquitto or RabbitMQ restarts the broker; NATS the nodes asked for."""
    if kind == "mosquitto":
        broker = MosquittoBroker(workdir=workdir, persistence=True)

        def restart_mosquitto(_nodes: Sequence[int] | None = None) -> list[int]:
            broker.stop(timeout=timeout)
            broker.start(timeout=timeout)
            return [0]

        return Target([broker.url], partial(broker.start, timeout=timeout), broker.close,
                      lambda: [] if broker.pid is None else [broker.pid], restart_mosquitto,
                      lambda: tail(broker.log_path))
    if kind == "nats":
        cluster = NatsCluster(workdir, cluster_name=cluster_name,
                              consumer_replicas=consumer_replicas,
                              stream_replicas=stream_replicas)

        def restart_nats(nodes: Sequence[int] | None = None) -> list[int]:
            which = list(range(len(cluster.nodes))) if nodes is None else list(nodes)
            cluster.restart(which, timeout=timeout)
            return which

        return Target(cluster.urls, partial(cluster.start, timeout=timeout), cluster.close,
                      cluster.pids, restart_nats,
                      lambda: "\n".join(f"--- {n.name}\n{tail(n.log)}" for n in cluster.nodes),
                      partial(nats_js_stats, cluster.nodes[0].client_port),
                      [cluster.workdir / f"js-{n.name}" for n in cluster.nodes])
    if kind == "rabbitmq":
        node = RabbitNode(workdir)

        def restart_rabbit(_nodes: Sequence[int] | None = None) -> list[int]:
            node.close()
            node.start(timeout=timeout)
            return [0]

        return Target([node.url], partial(node.start, timeout=timeout), node.close, node.pids,
                      restart_rabbit, partial(node.logs, 200_000))
    raise ValueError(f"unknown broker {kind!r}")


def tail(path: Path, limit: int = 200_000) -> str:
    """The last `limit` bytes of a log as text ("" when it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def nats_request(port: int, subject: str, payload: bytes = b"", *, timeout: float = 10.0
                 ) -> dict[str, Any]:
    """One request over the NATS client protocol (no client library) on 127.0.0.1:`port`: the
    JSON reply, or {} when none comes in time."""
    inbox = f"_INBOX.bench.{os.getpid()}.{time.monotonic_ns()}"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        f = s.makefile("rb")
        f.readline()  # INFO {...}
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n'
                  + f"SUB {inbox} 1\r\nPUB {subject} {inbox} {len(payload)}\r\n".encode()
                  + payload + b"\r\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = f.readline()
            if not line:
                break
            if line.startswith(b"PING"):
                s.sendall(b"PONG\r\n")
            elif line.startswith((b"MSG", b"HMSG")):
                size = int(line.split()[-1])
                body = f.read(size + 2)[:size]
                if line.startswith(b"HMSG"):  # headers first: a status without a body
                    hdr = int(line.split()[-2])
                    body = body[hdr:]
                with contextlib.suppress(ValueError):
                    data = json.loads(body)
                    return data if isinstance(data, dict) else {}
                return {}
    return {}


def nats_js_stats(port: int) -> dict[str, Any]:
    """JetStream, as one node sees it: API requests served and failed (the account's, cluster
    wide) and, per MQTT stream, messages held and written ever (last sequence)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        info = nats_request(port, "$JS.API.INFO")
        api = info.get("api") or {}
        out["js_api_total"], out["js_api_errors"] = api.get("total"), api.get("errors")
        for stream in MQTT_STREAMS:
            state = (nats_request(port, f"$JS.API.STREAM.INFO.{stream}").get("state") or {})
            key = stream.removeprefix("$MQTT_")
            out[f"js_{key}_msgs"], out[f"js_{key}_writes"] = (state.get("messages"),
                                                              state.get("last_seq"))
            out[f"js_{key}_consumers"] = state.get("consumer_count")
    return out


def js_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The counters' growth over the run (None where either end is missing)."""
    out: dict[str, Any] = {}
    for k, v in after.items():
        b = before.get(k)
        if k.endswith(("_total", "_errors", "_writes")):
            out[k] = None if v is None or b is None else v - b
        else:
            out[k] = v
    return out
