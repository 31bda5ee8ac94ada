"""A worker process: a shard of simulated devices, each the real agent code (policy, trainer,
spool, protocol) on its own MQTT connection, all driven by one `NetLoop` thread.

Simulated compute time: a device trains for real (CPU) at the moment it starts, but its update is
delivered only after the trace's compute time for that work has passed on the sim clock; if the
device stops allowing training in between (unplugged, Wi-Fi gone, left the fleet), the work is
aborted, as `agent.Agent` does on a real device.

Two clocks: the wall clock compressed by the scale (`run_worker`), or the virtual clock
(`run_virtual_worker`, fleet/_virtual.py), where the parent process moves time and a device
handles what it received only in its phase.
"""

from __future__ import annotations

import logging
import multiprocessing.synchronize
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedasync_iot.agent import (
    Agent,
    AgentConfig,
    PolicyConfig,
    PrivacyConfig,
    Session,
    TrainConfig,
    train_update,
)
from fedasync_iot.fleet._latency import bucket
from fedasync_iot.fleet._netloop import NetLoop
from fedasync_iot.fleet._traces import DeviceTrace, SimClock, SimReader
from fedasync_iot.fleet._traffic import attach as count_traffic
from fedasync_iot.fleet._virtual import (
    DeviceTimers,
    Shard,
    Timers,
    VirtualClock,
    device_sync_topic,
    sync_topic,
)
from fedasync_iot.models import (
    MAX_RETRY_AFTER_S,
    BrokerAddress,
    Client,
    Connack,
    Features,
    Labels,
    Message,
    PacketAck,
    Topics,
    UpdateMessage,
    WireError,
    broker_urls,
    create_client,
    decode_ack,
    encode_ack,
)

log = logging.getLogger("fedasync.fleet.worker")

DEVICE_PREFIX = "device/"  # a worker report's per-device keys: device/<id>/<key>


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSpec:
    """Everything a worker needs, picklable (it crosses a local process boundary only)."""

    index: int
    broker_url: str  # one URL, or a cluster's nodes, comma-separated
    fleet: str
    traces: tuple[DeviceTrace, ...]
    data: tuple[tuple[Any, Any], ...]  # (X, y) per device, same order as traces
    scale: float
    duration_s: float  # sim
    state_root: str
    policy: PolicyConfig
    training: TrainConfig
    check_interval_s: float  # sim
    seed: int
    min_train_interval_s: float = 0.0  # sim; the agent's, between two trainings
    model_refresh_s: float = 3600.0  # sim; the agent's (0: follow every version)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # the agent's [privacy]
    session: Session = "sessionless"  # the agent's


class ArraySource:
    def __init__(self, X: Features, y: Labels) -> None:
        self._xy = (X, y)

    def load(self) -> tuple[Features, Labels]:
        return self._xy


class SimLink:
    """The agent's link. Under the virtual clock it tells the shard of every packet the broker
    has yet to acknowledge: a phase ends only when there is none (fleet/_virtual.py)."""

    def __init__(self, client: Client, shard: Shard | None = None,
                 device_id: str = "") -> None:
        self.client = client
        self.connected = False
        self.shard = shard
        self.device_id = device_id
        self._pending: set[int] = set()
        if shard is not None:
            client.on_acked = self._acked

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        # QoS 1 under the virtual clock: a QoS 0 message has no PUBACK to say the broker has it.
        info = self.client.send(topic, payload, qos=max(qos, 1) if self.shard else qos,
                                retain=retain)
        self._sent(info.mid if info.queued else None, published=True)  # an update or a status

    def subscribe(self, topic: str, qos: int = 0) -> None:
        """The agent fetches models on demand through these, as on a real device."""
        self._sent(self.client.subscribe(topic, qos))  # may bring a retained message

    def unsubscribe(self, topic: str) -> None:
        self._sent(self.client.unsubscribe(topic), needs_marker=False)

    def _sent(self, mid: int | None, *, published: bool = False,
              needs_marker: bool = True) -> None:
        """`mid`: the packet's id, None when it was not handed to the connection."""
        if self.shard is not None and mid is not None:
            self._pending.add(mid)
            self.shard.sent(self.device_id, published=published, needs_marker=needs_marker)

    def _acked(self, ack: PacketAck) -> None:
        if self.shard is not None and ack.mid in self._pending:
            self._pending.remove(ack.mid)
            self.shard.acknowledged()

    def forget_pending(self) -> None:
        """The connection closed: its unacknowledged packets will never be acknowledged."""
        if self.shard is not None:
            for _ in self._pending:
                self.shard.acknowledged()
        self._pending.clear()


class WallTimers:
    """Device timers on the wall clock, compressed by the scale."""

    def __init__(self, net: NetLoop, clock: SimClock) -> None:
        self.net = net
        self.clock = clock

    def at(self, sim_t: float, fn: Any) -> None:
        self.net.call_at(time.monotonic() + (self.clock.to_wall(sim_t) - time.time()), fn)

    def soon(self, fn: Any) -> None:
        self.net.call_later(0, fn)


class SimDevice:
    def __init__(self, trace: DeviceTrace, *, X: Features, y: Labels, spec: WorkerSpec,
                 net: NetLoop, clock: SimClock, address: BrokerAddress, index: int = 0,
                 timers: DeviceTimers | None = None, shard: Shard | None = None) -> None:
        self.trace = trace
        self.index = index  # in its worker: the order of same-time events (virtual clock)
        self.device_id = trace.device_id
        self.net = net
        self.clock = clock
        self.timers = timers or WallTimers(net, clock)
        self.shard = shard
        self.marker = -1  # the newest virtual-clock marker this connection has seen
        self.spec = spec
        self.address = address
        self.topics = Topics(spec.fleet)
        client = create_client(address, client_id=f"sim-{spec.fleet}-{trace.device_id}",
                               persistent=spec.session == "persistent")
        self.traffic = count_traffic(client)  # messages and bytes by kind (fleet/_traffic.py)
        self.link = SimLink(client, shard, trace.device_id)
        ids = np.random.default_rng([spec.seed, *trace.device_id.encode()])
        config = AgentConfig(
            device_id=trace.device_id, fleet=spec.fleet,
            state_dir=str(Path(spec.state_root) / trace.device_id),
            min_samples=1, min_new_samples=10**9, retrain_on_new_model=True,
            min_train_interval_s=spec.min_train_interval_s, check_interval_s=spec.check_interval_s,
            model_refresh_s=spec.model_refresh_s, policy=spec.policy, training=spec.training,
            privacy=spec.privacy, train_in_subprocess=False, session=spec.session)

        def trainer(*args: Any, **kwargs: Any) -> UpdateMessage | None:
            # Seeded update ids: the lineage of a virtual-clock run is the same every time.
            return train_update(*args, update_id=ids.bytes(16).hex(), **kwargs)

        self.agent = Agent(config, link=self.link, reader=SimReader(trace, clock),
                           data=ArraySource(X, y), clock=clock.wall, monotonic=clock.sim_now,
                           rng=np.random.default_rng([spec.seed, spec.index, len(trace.device_id)]),
                           trainer=trainer,
                           **({} if shard is None else {"net_clock": clock.wall}))
        client.will_set(self.topics.status(trace.device_id), b'{"state": "offline"}', qos=1,
                        retain=True)
        client.on_connack = self._on_connect
        client.on_closed = self._on_disconnect
        client.handle(self._on_message)
        if shard is not None:
            for topic in (sync_topic(spec.fleet), device_sync_topic(spec.fleet, trace.device_id)):
                client.route(topic, self._on_marker)
        net.attach(client)
        self.online = False
        self._closing = False
        self._connecting = False
        self._up = False
        self.job: UpdateMessage | None = None
        self.job_token = 0
        self.started = 0  # trainings started (delivered, aborted or still running at the end)
        # What this device received, by the topic's kind level (model, weights, template,
        # announce, ack): `per_device` in summary.json's traffic.
        self.received: Counter[str] = Counter()
        # Wall clock only: when each update in flight was handed to the client, and the acks'
        # latencies by bucket (fleet/_latency.py). Meaningless on the virtual clock.
        self.sent_at: dict[str, float] = {}
        self.ack_latency: Counter[str] = Counter()
        # A newer model arrived: step at once rather than at the next poll (120 sim s by
        # default, most of a fast fleet's wall time at --scale 1).
        self.agent.wake = lambda: self.timers.soon(self._step)

    # -- MQTT --------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """The MQTT connection is up (the agent may already count itself offline)."""
        return self._up

    def _on_connect(self, connack: Connack) -> None:
        if self.shard is not None and self._connecting:
            self._connecting = False
            self.shard.acknowledged()  # the CONNACK (`_presence` counted the connect)
        if not connack.accepted:
            return
        # Acks only: announcements and snapshots are the agent's to subscribe to (on demand).
        self.link.subscribe(self.topics.ack(self.trace.device_id),
                            1 if self.spec.session == "persistent" else 0)
        if self.shard is not None:
            self.link.subscribe(sync_topic(self.spec.fleet), 0)
            self.link.subscribe(device_sync_topic(self.spec.fleet, self.device_id), 0)
        self.link.connected = self._up = True
        self.agent.on_connected()

    def _on_disconnect(self, why: str) -> None:
        self.link.connected = self._up = False
        self.sent_at.clear()  # resent on reconnect: that wait is the outage's
        self.link.forget_pending()
        if self.shard is not None and self._closing:
            self._closing = False
            self.shard.acknowledged()  # the close `_presence` asked for

    def _on_marker(self, msg: Message) -> None:
        self.marker = max(self.marker, int(msg.payload))

    def _on_message(self, msg: Message) -> None:
        if self.shard is not None:  # handled in this device's next phase
            self.shard.received(self, msg.topic, msg.payload)
        else:
            self.handle(msg.topic, msg.payload)

    def handle(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        level = parts[2] if len(parts) > 2 else "other"
        self.received[f"{level}_msgs"] += 1
        self.received[f"{level}_bytes"] += len(payload) + len(topic.encode())
        if topic == self.topics.ack(self.trace.device_id):
            payload = self._on_ack(payload)
        self.agent.on_message(topic, payload)

    def _on_ack(self, ack: bytes) -> bytes:
        """Count the ack's latency, and scale its `retry_after_s`: the coordinator runs on wall
        seconds (its window is the sim window / scale), the agent on sim seconds, so a cap's
        `retry_after_s` must be scaled, or the device would back off for 1/scale of the time
        it was asked to."""
        try:
            decoded = decode_ack(ack)
        except WireError:
            return ack  # the agent logs it
        sent = self.sent_at.pop(decoded.update_id or "", None)
        if sent is not None:
            self.ack_latency[bucket(1000 * (time.monotonic() - sent))] += 1
        if decoded.retry_after_s is None:
            return ack
        return encode_ack(replace(decoded, retry_after_s=min(
            decoded.retry_after_s * self.spec.scale, MAX_RETRY_AFTER_S)))

    # -- the device's life, on the sim clock -------------------------------------------------
    def start(self) -> None:
        self.timers.at(0.0, self._presence)

    def _presence(self) -> None:
        t = self.clock.sim_now()
        online = self.trace.online.contains(t)
        if online and not self.online:
            self.online = True
            if self.shard is not None:
                self._connecting = True
                self.shard.sent(self.device_id)  # until the CONNACK
            self.net.connect(self.link.client, self.address.host, self.address.port)
            self._poll()
        elif not online and self.online:
            self.online = False
            self._abort("left the fleet")
            self.link.connected = False
            if self.shard is None:
                self.net.disconnect(self.link.client)
            else:
                self.shard.at_next_phase(self._close)
        change = self.trace.online.next_change(t)
        if change is not None and change < self.spec.duration_s:
            self.timers.at(change, self._presence)

    def _close(self) -> None:
        """Under the virtual clock: disconnect, counted until the socket has closed."""
        if self.online:  # back already
            return
        if self.link.client.socket() is not None:
            assert self.shard is not None
            self._closing = True
            self.shard.sent(self.device_id)
        self.net.disconnect(self.link.client)

    def _poll(self) -> None:
        if not self.online:
            return
        self._step()
        # Jitter: devices polling in lockstep would be an artefact of the simulation.
        jitter = 0.75 + 0.5 * self.agent.rng.random()
        self.timers.at(self.clock.sim_now() + self.spec.check_interval_s * jitter, self._poll)

    def _step(self) -> None:
        """Check the device; start training (real CPU now, delivered after the trace's compute
        time) when the agent should."""
        if not self.online:
            return
        t = self.clock.sim_now()
        decision = self.agent.check()
        self.agent.resend_unacked()
        if self.job is not None and not decision.eligible:
            self._abort(decision.reason)
        elif self.job is None and self.link.connected and self.agent.should_train(decision):
            update = self.agent.prepare_update()  # real training, now
            if update is not None:
                self.started += 1
                self.job = update
                self.job_token += 1
                # The work the agent did: its own, or fitted to its windows (agent/_budget.py).
                samples, epochs = self.agent.last_work
                done = t + self.trace.compute_seconds(samples, epochs)
                token = self.job_token
                self.timers.at(done, lambda: self._deliver(token))

    def _deliver(self, token: int) -> None:
        if self.job is None or token != self.job_token:
            return
        if not self.agent.check().eligible:
            self._abort(self.agent.decision.reason if self.agent.decision else "")
            return
        job, self.job = self.job, None
        if self.shard is None and self.link.connected:
            self.sent_at[job.update_id] = time.monotonic()
        self.agent.deliver(job)
        # Finished: a newer model that came meanwhile is trained on now, not at the next poll.
        self.timers.soon(self._step)

    def _abort(self, reason: str) -> None:
        if self.job is not None:
            self.job = None
            self.agent.abort(reason)

    def stats(self) -> dict[str, int]:
        d = self.agent.decision
        c = self.agent.counters
        return {"online": int(self.online), "connected": int(self.link.connected),
                "eligible": int(bool(self.online and d is not None and d.eligible)),
                "training": int(self.job is not None), "trained": c.trained,
                "accepted": c.accepted, "rejected": c.rejected, "aborted": c.aborted,
                "resent": self.agent.shared.resender.resent,
                **self.traffic.stats(), **self.ack_latency}

    def downlink(self) -> dict[str, int]:
        """This device's own counts (`fleet._sim.per_device_downlink`): messages and bytes
        received by topic kind (``received_<kind>_msgs|bytes``), trainings started and updates
        sent, and the agent's model fetches by reason."""
        c = self.agent.counters
        a = self.agent.announcement  # the sizes of what following every version would cost
        return {**{f"received_{k}": v for k, v in self.received.items()},
                "trainings": self.started, "updates_sent": c.sent,
                "fetched_for_training": c.fetched_for_training,
                "fetched_for_refresh": c.fetched_for_refresh,
                "announced_snapshot_bytes": 0 if a is None else a.size,
                "announced_weights_bytes": 0 if a is None or a.weights_size is None
                else a.weights_size}


def run_worker(spec: WorkerSpec, go: multiprocessing.synchronize.Event, start: Any,
               stop: multiprocessing.synchronize.Event, reports: Any,
               log_level: str = "WARNING") -> None:
    """Process entry point: report ready, wait for `go` (sim time 0 is `start.value`), then run
    the shard until `stop` is set, reporting stats every second."""
    logging.basicConfig(level=log_level, format=f"worker{spec.index} %(levelname)s %(message)s")
    # Pay scikit-learn's import (the adapters load it) before the clock starts.
    from fedasync_iot.models import build_model  # noqa: F401

    reports.put((spec.index, time.time(), None))
    if not go.wait(timeout=120):
        return
    clock = SimClock(spec.scale, start.value)
    net = NetLoop(seed=spec.seed + spec.index)
    devices = _load_devices(spec, net, clock)
    for d in devices:
        d.start()

    def report(*, final: bool = False) -> None:
        reports.put((spec.index, time.time(), _totals(devices, final=final)))
        if not final:
            net.call_later(1.0, report)

    net.call_later(0.5, report)
    try:
        net.run(until=stop.is_set)
        # The final counts, traffic to the end, with every device's own: the parent reads them
        # while it waits for this process to exit (per device only here: every second, a
        # worker of 500 devices pickled ~8,500 entries for nothing).
        report(final=True)
    finally:
        net.close()


def _load_devices(spec: WorkerSpec, net: NetLoop, clock: SimClock, shard: Shard | None = None,
                  timers: Timers | None = None) -> list[SimDevice]:
    # A cluster's nodes: spread round robin, each worker starting one node further, as a load
    # balancer would (one URL: every device on it).
    nodes = [BrokerAddress.parse(u) for u in broker_urls(spec.broker_url)]
    return [SimDevice(trace, X=np.asarray(X, dtype=np.float32), y=np.asarray(y), spec=spec,
                      net=net, clock=clock, address=nodes[(spec.index + i) % len(nodes)],
                      index=i, shard=shard,
                      timers=None if timers is None else timers.of_device(i))
            for i, (trace, (X, y)) in enumerate(zip(spec.traces, spec.data, strict=True))]


def _totals(devices: list[SimDevice], *, final: bool) -> dict[str, int]:
    totals: dict[str, int] = {}
    for d in devices:
        for k, v in d.stats().items():
            totals[k] = totals.get(k, 0) + v
        if final:  # each device's own downlink, flat: "device/<id>/<key>" (no "/" in ids)
            for k, v in d.downlink().items():
                totals[f"{DEVICE_PREFIX}{d.trace.device_id}/{k}"] = v
    return totals


def run_virtual_worker(spec: WorkerSpec, conn: Any, log_level: str = "WARNING") -> None:
    """Process entry point under the virtual clock: load the shard, say ("ready",), then serve
    the controller's commands on `conn` (fleet/_virtual.py) until it says stop."""
    logging.basicConfig(level=log_level, format=f"worker{spec.index} %(levelname)s %(message)s")
    # Pay scikit-learn's import (the adapters load it) before the clock starts.
    from fedasync_iot.models import build_model  # noqa: F401

    clock = VirtualClock(spec.scale)
    timers = Timers(clock)
    net = NetLoop(seed=spec.seed + spec.index)
    devices: list[SimDevice] = []
    shard = Shard(conn, clock, timers, lambda final: _totals(devices, final=final))
    devices.extend(_load_devices(spec, net, clock, shard, timers))
    shard.devices.extend(devices)
    for d in devices:
        d.start()
    net.watch(conn, shard.on_command)
    conn.send(("ready",))
    try:
        net.run(until=lambda: shard.stopped, after_io=shard.check)
    finally:
        net.close()
