"""Coordinator ingest against a bare MQTT subscriber, side by side on one private broker (issue 3).

    python -m fedasync_iot.bench.ingest [--updates N] [--devices D] [--rule fedasync|fedbuff|both]
                                  [--publisher raw|paho|both] [--repeats R] [--json OUT]

Load: D device connections in a child process publish N pre-encoded float32 updates of the MLP on
digits (2410 parameters, ~9.9 KB) as fast as the broker takes them: QoS 1, round robin over the
devices, at most 100 unacked per device. Two receivers take turns on the same broker,
alternating bare, coordinator, bare, coordinator, ... after one untimed warm-up of each:

(a) bare: one paho-mqtt 2.x subscriber on ``update/+`` at QoS 1 that only counts messages; its
    rate is N / (last message received - first publish).
(b) coordinator: the real `CoordinatorService` with durability as deployed (SQLite WAL,
    synchronous=FULL, an fsync'd checkpoint per group commit, PUBACK only after the commit), a
    fresh state directory per run, evaluation off, snapshots (with ONNX) at most every
    ``--snapshot-interval`` s; its rate is N / (last end-to-end ack received by the devices -
    first publish). Every ack must say "accepted" or "buffered" (FedBuff's buffer is committed).

The ratio is taken per pair (each coordinator run over the bare run just before it), so drift of
a noisy shared machine cancels; we report median, min and max, never one time.

Publishers. ``raw`` (default) writes pre-built MQTT packets from one selector loop and costs
little CPU, so the bare figure is what paho can receive. ``paho`` uses one paho client per
device, as an agent would; in one Python process that costs more CPU per message than the
subscriber spends, so its bare figure is the publishers' limit, not the receiver's: a flattering
denominator. Guards allow any staleness: payloads are encoded before the clock starts, so they
cannot know the version they will meet, and a rejected update is not a merged one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import platform
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt  # its version, in the report: the bare figure is paho's

from fedasync_iot.coordinator import (
    CoordinatorConfig,
    CoordinatorService,
    EvalConfig,
    GuardConfig,
    Incoming,
    RuleConfig,
    SnapshotConfig,
)
from fedasync_iot.fleet import MosquittoBroker, mosquitto_path
from fedasync_iot.models import (
    BrokerAddress,
    Client,
    Connack,
    Message,
    ModelSpec,
    PacketAck,
    Topics,
    UpdateMessage,
    create_client,
    decode_ack,
    encode_update,
)

SPEC = ModelSpec(kind="mlp", n_features=64, classes=tuple(range(10)), hidden=(32,))
N_PARAMS = 64 * 32 + 32 + 32 * 10 + 10  # 2410
RULES = ("fedasync", "fedbuff")
PUBLISHERS = ("raw", "paho")
BROKER_INFLIGHT = 1000  # the launcher's max_inflight_messages (the default 20 caps a batch)
PUBLISHER_INFLIGHT = 100  # unacked updates per device; 10 devices: up to 1000 on the wire
ROUND_TIMEOUT_S = 180.0

log = logging.getLogger("fedasync.bench")


# ------------------------------------------------------------------------------ publishers
# These run in the child process.


def _payloads(updates: int, devices: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(updates):
        device = f"dev-{i % devices:03d}"
        delta = rng.normal(0.0, 1e-3, N_PARAMS).astype(np.float32)
        out.append((device, encode_update(UpdateMessage(
            device_id=device, update_id=f"u{i:07d}", base_version=0, n_samples=32,
            delta=delta, created_at=time.time()))))
    return out


class _RawDevice:
    """One device connection speaking just enough MQTT 3.1.1 to publish pre-built QoS 1
    packets and take the coordinator's QoS 1 acks."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        # CONNECT: protocol MQTT level 4, clean session, keepalive 0 (off: rounds are short).
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack(">H", len(cid)) + cid
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        self.inbuf = bytearray()
        self._expect(0x20)
        self.out: deque[memoryview] = deque()  # bytes to send, in order
        self.todo: deque[tuple[bytes, bytes]] = deque()  # PUBLISHes the window holds back
        self.inflight = 0

    def subscribe(self, topic: str) -> None:
        t = topic.encode()
        body = b"\x00\x01" + struct.pack(">H", len(t)) + t + b"\x01"
        self.sock.sendall(b"\x82" + _varint(len(body)) + body)
        self._expect(0x90)

    def _expect(self, packet_type: int) -> None:
        while True:
            for first, _ in self.packets():
                if first & 0xF0 == packet_type:
                    return
                raise RuntimeError(f"unexpected MQTT packet type {first:#x}")
            data = self.sock.recv(4096)
            if not data:
                raise RuntimeError("broker closed the connection")
            self.inbuf += data

    def packets(self) -> Iterator[tuple[int, bytes]]:
        """Complete packets in `inbuf` as (first byte, rest after the length), consumed as
        they are yielded."""
        buf, pos = self.inbuf, 0
        try:
            while len(buf) - pos >= 2:
                length, shift, i = 0, 0, pos + 1
                while True:
                    if i >= len(buf):
                        return
                    byte = buf[i]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not byte & 0x80:
                        break
                if len(buf) - i < length:
                    return
                first, body = buf[pos], bytes(buf[i:i + length])
                pos = i + length
                yield first, body
        finally:
            del buf[:pos]

    def flush(self) -> None:
        with contextlib.suppress(BlockingIOError):
            sent = self.sock.sendmsg(list(itertools.islice(self.out, 128)))
            while sent and sent >= len(self.out[0]):
                sent -= len(self.out.popleft())
            if sent:
                self.out[0] = self.out[0][sent:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish_header(topic: bytes, packet_id: int, payload_len: int) -> bytes:
    """A QoS 1 PUBLISH up to its payload, which is sent from its own buffer (no copy)."""
    return b"".join((b"\x32", _varint(2 + len(topic) + 2 + payload_len),
                     struct.pack(">H", len(topic)), topic, struct.pack(">H", packet_id)))


def _raw_round(url: str, fleet: str, payloads: Sequence[tuple[str, bytes]], devices: int,
               *, want_acks: bool) -> dict[str, Any]:
    address = BrokerAddress.parse(url)
    topics = Topics(fleet)
    conns = {f"dev-{d:03d}": _RawDevice(address.host, address.port, f"bench-{fleet}-{d}")
             for d in range(devices)}
    sel = selectors.DefaultSelector()
    try:
        for name, conn in conns.items():
            if want_acks:
                conn.subscribe(topics.ack(name))
            conn.sock.setblocking(False)
            sel.register(conn.sock, selectors.EVENT_READ, conn)
        for i, (device, payload) in enumerate(payloads):  # built before the clock starts
            packet_id = i % 65_000 + 1  # unique within any window of PUBLISHER_INFLIGHT
            header = _publish_header(topics.update(device).encode(), packet_id, len(payload))
            conns[device].todo.append((header, payload))
        n = len(payloads)
        pubacks = acks = 0
        statuses: Counter[str] = Counter()
        t_published = t_last_ack = 0.0
        t0 = time.monotonic()
        deadline = t0 + ROUND_TIMEOUT_S
        while (pubacks < n or (want_acks and acks < n)) and time.monotonic() < deadline:
            for conn in conns.values():
                while conn.todo and conn.inflight < PUBLISHER_INFLIGHT:
                    conn.out.extend(map(memoryview, conn.todo.popleft()))
                    conn.inflight += 1
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
                sel.modify(conn.sock, events, conn)
            for key, mask in sel.select(timeout=1.0):
                conn = key.data
                if mask & selectors.EVENT_WRITE:
                    conn.flush()
                if not mask & selectors.EVENT_READ:
                    continue
                try:
                    data = conn.sock.recv(1 << 18)
                except BlockingIOError:
                    continue
                if not data:
                    raise RuntimeError("broker closed a publisher connection")
                conn.inbuf += data
                now = time.monotonic()
                for first, body in conn.packets():
                    if first & 0xF0 == 0x40:  # PUBACK of one of our updates
                        conn.inflight -= 1
                        pubacks += 1
                        if pubacks == n:
                            t_published = now
                    elif first & 0xF0 == 0x30:  # an end-to-end ack; QoS 1: PUBACK it
                        topic_end = 2 + int.from_bytes(body[:2], "big")
                        start = topic_end + (2 if first & 0x06 else 0)
                        if first & 0x06:
                            conn.out.append(memoryview(b"\x40\x02" + body[topic_end:start]))
                        statuses[decode_ack(body[start:]).status] += 1
                        acks += 1
                        if acks == n:
                            t_last_ack = now
        return {"ok": pubacks == n and (acks == n or not want_acks), "t0": t0,
                "t_published": t_published, "t_last_ack": t_last_ack, "pubacks": pubacks,
                "acks": acks, "statuses": dict(statuses)}
    finally:
        sel.close()
        for conn in conns.values():
            conn.close()


class _PahoDevices:
    """One paho client per device, as the agent would use, counting PUBACKs and acks."""

    def __init__(self, url: str, fleet: str, devices: int, expected: int, *,
                 want_acks: bool) -> None:
        self.topics = Topics(fleet)
        self.expected = expected
        self.want_acks = want_acks
        self._lock = threading.Lock()
        self.statuses: Counter[str] = Counter()
        self.acks = self.pubacks = 0
        self.t_last_ack = self.t_last_puback = 0.0
        self.acked = threading.Event()
        self.published = threading.Event()
        self._ready = threading.Barrier(devices + 1, timeout=30)
        address = BrokerAddress.parse(url)
        self.clients: dict[str, Client] = {}
        for d in range(devices):
            name = f"dev-{d:03d}"
            c = create_client(address, client_id=f"bench-{fleet}-{d}", persistent=False,
                              max_inflight=PUBLISHER_INFLIGHT)
            c.on_connack = self._on_connect(c, name)
            c.on_acked = self._on_acked
            c.handle(self._on_message)
            c.connect(address.host, address.port, keepalive=60)
            c.loop_start()
            self.clients[name] = c
        self._ready.wait()

    def _on_connect(self, c: Client, name: str) -> Callable[[Connack], None]:
        def on_connect(connack: Connack) -> None:
            if self.want_acks:
                c.subscribe(self.topics.ack(name), qos=1)  # _on_subscribe meets the barrier
            else:
                self._ready.wait()
        return on_connect

    def _on_acked(self, ack: PacketAck) -> None:
        if ack.kind == "subscribe":
            self._ready.wait()
        elif ack.kind == "publish":
            self._on_publish()

    def _on_message(self, msg: Message) -> None:
        status = decode_ack(msg.payload).status
        now = time.monotonic()
        with self._lock:
            self.statuses[status] += 1
            self.acks += 1
            if self.acks == self.expected:
                self.t_last_ack = now
                self.acked.set()

    def _on_publish(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.pubacks += 1
            if self.pubacks == self.expected:
                self.t_last_puback = now
                self.published.set()

    def close(self) -> None:
        for c in self.clients.values():
            c.disconnect()
            c.loop_stop()


def _paho_round(url: str, fleet: str, payloads: Sequence[tuple[str, bytes]], devices: int,
                *, want_acks: bool) -> dict[str, Any]:
    pubs = _PahoDevices(url, fleet, devices, len(payloads), want_acks=want_acks)
    try:
        t0 = time.monotonic()
        for device, payload in payloads:
            pubs.clients[device].send(pubs.topics.update(device), payload, qos=1)
        ok = pubs.published.wait(ROUND_TIMEOUT_S)
        if ok and want_acks:
            ok = pubs.acked.wait(ROUND_TIMEOUT_S)
    finally:
        pubs.close()
    return {"ok": ok, "t0": t0, "t_published": pubs.t_last_puback,
            "t_last_ack": pubs.t_last_ack, "pubacks": pubs.pubacks, "acks": pubs.acks,
            "statuses": dict(pubs.statuses)}


def _publisher_main(conn: Connection, url: str, updates: int, devices: int, seed: int) -> None:
    """The child process: encode once, then run one round per command until told None."""
    payloads = _payloads(updates, devices, seed)
    conn.send({"payload_bytes": len(payloads[0][1])})
    while (command := conn.recv()) is not None:
        fleet, publisher, want_acks = command
        round_ = _raw_round if publisher == "raw" else _paho_round
        conn.send(round_(url, fleet, payloads, devices, want_acks=want_acks))


# ------------------------------------------------------------------------------ receivers


class _BareSubscriber:
    """What the broker and paho deliver to one Python client that does nothing else."""

    def __init__(self, url: str, fleet: str, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.t_last = 0.0
        self.done = threading.Event()
        subscribed = threading.Event()
        address = BrokerAddress.parse(url)
        self.client = create_client(address, client_id=f"bench-bare-{fleet}", persistent=False)
        topic = Topics(fleet).all_updates

        def on_connack(connack: Connack) -> None:
            self.client.subscribe(topic, qos=1)

        self.client.on_connack = on_connack
        self.client.on_acked = lambda ack: subscribed.set()
        self.client.handle(self._on_message)
        self.client.connect(address.host, address.port, keepalive=60)
        self.client.loop_start()
        if not subscribed.wait(30):
            raise RuntimeError("bare subscriber did not subscribe")

    def _on_message(self, msg: Message) -> None:
        self.count += 1  # only the network thread writes it
        if self.count == self.expected:
            self.t_last = time.monotonic()
            self.done.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class _MeasuredService(CoordinatorService):
    """The service unchanged, remembering the size of each group commit."""

    batch_sizes: list[int]

    def _process(self, batch: list[Incoming]) -> None:
        self.batch_sizes.append(len(batch))
        super()._process(batch)


def coordinator_settings(snapshot_interval_s: float) -> dict[str, Any]:
    """How `running_coordinator` runs the service, for a benchmark's JSON."""
    return {"model": "mlp 64-32-10 (digits)", "n_params": N_PARAMS, "encoding": "float32",
            "durability": "SQLite WAL synchronous=FULL + fsync'd checkpoint per group commit, "
                          "PUBACK and acks after the commit",
            "snapshot_min_interval_s": snapshot_interval_s, "snapshot_onnx": True,
            "evaluation": "off", "fedasync_alpha": 0.5, "fedbuff_k": 10,
            "batch_max": CoordinatorConfig(model=SPEC).batch_max}


@contextlib.contextmanager
def running_coordinator(url: str, fleet: str, state: Path, *, rule: str, max_staleness: int,
                        snapshot_interval_s: float) -> Iterator[_MeasuredService]:
    """The real `CoordinatorService` with durability as deployed, on `fleet` with a fresh
    `state` directory, evaluation off; yielded once connected and past its first snapshot (the
    first export may load skl2onnx: not timed), then stopped and its state removed."""
    service = _MeasuredService(CoordinatorConfig(
        model=SPEC, broker=url, fleet=fleet, state_dir=str(state),
        client_id=f"bench-coord-{fleet}", http="",
        rule=RuleConfig(name=rule, alpha=0.5, buffer_size=10),  # type: ignore[arg-type]
        guards=GuardConfig(max_norm=10.0, norm_policy="clip", max_staleness=max_staleness),
        snapshots=SnapshotConfig(min_interval_s=snapshot_interval_s, include_onnx=True),
        evaluation=EvalConfig(test_file=None)))
    service.batch_sizes = []
    service.start()
    try:
        if not service.wait_connected(30):
            raise RuntimeError("coordinator did not connect")
        deadline = time.monotonic() + 60
        while service.status()["published_version"] < 0:
            if time.monotonic() > deadline:
                raise RuntimeError("coordinator did not publish its first snapshot")
            time.sleep(0.05)
        yield service
    finally:
        service.stop()
        shutil.rmtree(state, ignore_errors=True)


# ------------------------------------------------------------------------------ rounds


class _Bench:
    def __init__(self, broker: MosquittoBroker, workdir: Path, conn: Connection, *,
                 updates: int, snapshot_interval_s: float) -> None:
        self.broker = broker
        self.workdir = workdir
        self.conn = conn
        self.updates = updates
        self.snapshot_interval_s = snapshot_interval_s
        self._rounds = itertools.count(1)

    def _fleet(self) -> str:  # a topic prefix per round: nothing retained leaks between rounds
        return f"bench{next(self._rounds)}-{uuid.uuid4().hex[:6]}"

    def _publish(self, fleet: str, publisher: str, *, want_acks: bool) -> dict[str, Any]:
        self.conn.send((fleet, publisher, want_acks))
        if not self.conn.poll(2 * ROUND_TIMEOUT_S + 30):
            raise RuntimeError("the publisher process did not answer")
        result: dict[str, Any] = self.conn.recv()
        if not result["ok"]:
            raise RuntimeError(f"round {fleet} did not finish in {ROUND_TIMEOUT_S} s: "
                               f"{result['pubacks']} PUBACKs, {result['acks']} acks")
        return result

    def bare(self, publisher: str) -> dict[str, Any]:
        fleet = self._fleet()
        sub = _BareSubscriber(self.broker.url, fleet, self.updates)
        try:
            pub = self._publish(fleet, publisher, want_acks=False)
            if not sub.done.wait(ROUND_TIMEOUT_S):
                raise RuntimeError(f"bare subscriber got {sub.count} of {self.updates}")
        finally:
            sub.close()
        return {"rate": self.updates / (sub.t_last - pub["t0"]),
                "publish_rate": self.updates / (pub["t_published"] - pub["t0"])}

    def coordinator(self, publisher: str, rule: str) -> dict[str, Any]:
        fleet = self._fleet()
        with running_coordinator(self.broker.url, fleet, self.workdir / f"state-{fleet}",
                                 rule=rule, max_staleness=self.updates,
                                 snapshot_interval_s=self.snapshot_interval_s) as service:
            snapshots = service.metrics.registry.get_sample_value
            before = snapshots("fedasync_snapshots_published_total") or 0.0
            pub = self._publish(fleet, publisher, want_acks=True)
            exported = (snapshots("fedasync_snapshots_published_total") or 0.0) - before
            version = service.engine.version
            lineage = len(service.store.lineage())
            sizes = list(service.batch_sizes)
        statuses: dict[str, int] = pub["statuses"]
        merged = statuses.get("accepted", 0) + statuses.get("buffered", 0)
        if merged != self.updates or lineage != self.updates:
            raise RuntimeError(f"{rule}: {merged} of {self.updates} merged, {lineage} lineage "
                               f"rows: {statuses}")
        return {"rate": self.updates / (pub["t_last_ack"] - pub["t0"]),
                "publish_rate": self.updates / (pub["t_published"] - pub["t0"]),
                "version": version, "statuses": statuses, "batch_sizes": sizes,
                "snapshots": int(exported)}


# ------------------------------------------------------------------------------ reporting


def _summary(values: Sequence[float], digits: int = 0) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "runs": [round(v, digits) for v in values]}


def _batches(sizes: Sequence[int]) -> dict[str, Any]:
    s = sorted(sizes)
    return {"commits": len(s), "mean": round(sum(s) / len(s), 1), "median": statistics.median(s),
            "p90": s[int(0.9 * (len(s) - 1))], "max": s[-1]}


def _environment() -> dict[str, Any]:
    exe = mosquitto_path()
    mosquitto = "?"
    if exe is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
            out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
            mosquitto = out.splitlines()[0]
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "paho_mqtt": paho.mqtt.__version__, "mosquitto": mosquitto,
            "loadavg_at_start": round(os.getloadavg()[0], 2)}


def run(*, updates: int = 10_000, devices: int = 10, rules: Sequence[str] = ("fedasync",),
        publishers: Sequence[str] = ("raw",), repeats: int = 3,
        snapshot_interval_s: float = 1.0, warmup: bool = True, seed: int = 0) -> dict[str, Any]:
    """Measure bare and coordinator ingest alternately, `repeats` times each per publisher and
    rule, and return the figures. ``coordinator_ingest_ratio`` is the median paired ratio of
    the first publisher and the first rule."""
    if min(updates, devices, repeats) < 1 or not rules or not publishers:
        raise ValueError("updates, devices and repeats must be >= 1, with a rule and publisher")
    if unknown := (set(rules) - set(RULES)) | (set(publishers) - set(PUBLISHERS)):
        raise ValueError(f"unknown rule or publisher: {sorted(unknown)}")
    env = _environment()
    ctx = mp.get_context("spawn")  # a clean interpreter: no paho threads or locks inherited
    parent, child = ctx.Pipe()
    bare: dict[str, list[dict[str, Any]]] = {p: [] for p in publishers}
    coord: dict[tuple[str, str], list[dict[str, Any]]] = {
        (p, r): [] for p in publishers for r in rules}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedasync-bench-ingest-") as tmp, \
            MosquittoBroker(workdir=Path(tmp) / "broker", max_inflight=BROKER_INFLIGHT) as broker:
        proc = ctx.Process(target=_publisher_main, name="bench-publishers", daemon=True,
                           args=(child, broker.url, updates, devices, seed))
        proc.start()
        try:
            if not parent.poll(120):
                raise RuntimeError("the publisher process did not start")
            payload_bytes = parent.recv()["payload_bytes"]
            bench = _Bench(broker, Path(tmp), parent, updates=updates,
                           snapshot_interval_s=snapshot_interval_s)
            if warmup:  # first-use costs (imports, caches) out of the first timed pair
                for r in rules:
                    bench.bare(publishers[0])
                    bench.coordinator(publishers[0], r)
            for i in range(repeats):
                for p in publishers:
                    bare[p].append(bench.bare(p))
                    log.info("%d %s bare: %.0f/s", i + 1, p, bare[p][-1]["rate"])
                    for r in rules:
                        coord[p, r].append(bench.coordinator(p, r))
                        log.info("%d %s %s: %.0f/s", i + 1, p, r, coord[p, r][-1]["rate"])
        finally:
            with contextlib.suppress(OSError):
                parent.send(None)
            proc.join(30)
            if proc.is_alive():
                proc.terminate()

    results: dict[str, Any] = {}
    for p in publishers:
        entry: dict[str, Any] = {
            "bare": {"rate_per_s": _summary([b["rate"] for b in bare[p]]),
                     "publish_rate_per_s": _summary([b["publish_rate"] for b in bare[p]])}}
        for r in rules:
            runs = coord[p, r]
            entry[r] = {
                "rate_per_s": _summary([c["rate"] for c in runs]),
                "publish_rate_per_s": _summary([c["publish_rate"] for c in runs]),
                "ratio": _summary([c["rate"] / b["rate"] for c, b in zip(runs, bare[p],
                                                                        strict=True)], 3),
                "batch_size": _batches([s for c in runs for s in c["batch_sizes"]]),
                "final_version": [c["version"] for c in runs],
                "snapshots_during_run": [c["snapshots"] for c in runs],
            }
        results[p] = entry
    return {
        "benchmark": "coordinator_ingest",
        "coordinator_ingest_ratio": results[publishers[0]][rules[0]]["ratio"]["median"],
        "settings": {
            "updates": updates, "devices": devices, "repeats": repeats, "warmup": warmup,
            "rules": list(rules), "publishers": list(publishers),
            "payload_bytes": payload_bytes, "qos": 1, "publisher_inflight": PUBLISHER_INFLIGHT,
            "broker_max_inflight": BROKER_INFLIGHT, **coordinator_settings(snapshot_interval_s),
            "elapsed_s": round(time.monotonic() - started, 1), **env,
        },
        "results": results,
    }


def _table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"{s['updates']} updates of {s['payload_bytes']} B from {s['devices']} devices, QoS 1; "
        f"{s['repeats']} alternating runs each, median [min-max]; {s['cpus']} CPUs, "
        f"{s['mosquitto']}, paho {s['paho_mqtt']}",
        f"coordinator: {s['durability']}; snapshots with ONNX every >= "
        f"{s['snapshot_min_interval_s']} s; evaluation off",
        "",
        f"{'publisher':9} {'receiver':21} {'updates/s':>22} {'ratio to bare':>22}  "
        "batch mean/p90/max",
    ]

    def span(x: dict[str, Any], fmt: str) -> str:
        return f"{x['median']:{fmt}} [{x['min']:{fmt}}-{x['max']:{fmt}}]"

    for p, entry in result["results"].items():
        bare = span(entry["bare"]["rate_per_s"], ".0f")
        lines.append(f"{p:9} {'bare paho subscriber':21} {bare:>22}")
        for r in result["settings"]["rules"]:
            c, b = entry[r], entry[r]["batch_size"]
            lines.append(f"{p:9} {'coordinator ' + r:21} {span(c['rate_per_s'], '.0f'):>22} "
                         f"{span(c['ratio'], '.3f'):>22}  {b['mean']}/{b['p90']}/{b['max']}")
    lines.append(f"\ncoordinator_ingest_ratio = {result['coordinator_ingest_ratio']}  "
                 f"({s['elapsed_s']} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fedasync_iot.bench.ingest",
        description="Durably merged-and-acked updates per second of the coordinator against a "
                    "bare paho subscriber's receive rate, side by side on one private Mosquitto.")
    p.add_argument("--updates", type=int, default=10_000,
                   help="updates per run (default 10000: a coordinator run spans a few "
                        "snapshot intervals)")
    p.add_argument("--devices", type=int, default=10, help="device connections (default 10)")
    p.add_argument("--rule", choices=[*RULES, "both"], default="fedasync",
                   help="merge rule: FedAsync (alpha 0.5) or FedBuff (K=10) (default fedasync)")
    p.add_argument("--publisher", choices=[*PUBLISHERS, "both"], default="raw",
                   help="load generator: 'raw' pre-built MQTT packets from one loop, cheap "
                        "enough that the bare subscriber is the limit (default); 'paho' one paho "
                        "client per device, which is slower than the subscriber")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    p.add_argument("--snapshot-interval", type=float, default=1.0, metavar="S",
                   help="coordinator snapshots.min_interval_s (default 1.0)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    p.add_argument("-v", "--verbose", action="store_true", help="log each run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    result = run(updates=args.updates, devices=args.devices,
                 rules=RULES if args.rule == "both" else (args.rule,),
                 publishers=PUBLISHERS if args.publisher == "both" else (args.publisher,),
                 repeats=args.repeats, snapshot_interval_s=args.snapshot_interval)
    print(_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
