"""The simulator's virtual clock: the real agents, coordinator and broker, but time moves only
when the whole system is quiescent, so one seed gives one result at any machine load.

- Every component reads time from a `VirtualClock`: sim seconds, and a "wall" clock that is a
  fixed epoch plus sim / scale. The scale is the wall-clock mode's, so every duration the
  coordinator and the agents know (snapshot interval, retry-after, round deadline) keeps its
  meaning and the outputs keep their units: a run's "45 s" is 45 s of that clock.
- The controller (`Controller`, in the parent process, which hosts the coordinator) runs each
  instant in phases. A device phase: every worker (`Shard`) fires its devices' timers that are
  due and hands them the messages they received. A coordinator phase: the service's `Stepped`
  scheduler (coordinator/_scheduling.py) merges what it received, sorted by topic and payload,
  and publishes a due snapshot. Devices and coordinator never act at once, so which snapshot a
  fetch finds retained, or which updates one batch holds, cannot depend on timing.
- Quiescence between phases: a component reports its phase done only once the broker has
  acknowledged everything it sent (PUBACK, SUBACK, UNSUBACK, CONNACK; Mosquitto handles one
  connection's packets in order and queues a message to its subscribers before it
  acknowledges it). Then a marker published to every connection arrives after everything the
  broker queued for that connection before it (no in-flight window holds messages back:
  `max_inflight_messages 0`), so once every connection has seen it, every message of the phase
  sits in its receiver's inbox. A device phase that only published (updates, statuses: each
  goes to the coordinator alone) needs a marker to the coordinator alone. Markers to every
  device follow what may reach devices: the coordinator's acks and snapshots, retained messages
  on a new subscription, a session's queue on a reconnect. (Counting what the coordinator
  received instead was not exact: a message paho sent again after a reconnect counted twice,
  and from then on the count said "all there" one message early.)
- When an instant needs no more phases, the clock jumps to the earliest timer of any worker or
  of the coordinator. Ties: by time, then device index, then the order they were set.

Training stays real (real SGD on real data); how long it takes comes from the device's compute
profile, as in the wall-clock mode (fleet/_worker.py).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fedasync_iot.fleet._traces import SimClock
from fedasync_iot.fleet._traffic import SIM_CONTROL_ROOT
from fedasync_iot.models import BrokerAddress, StateError, create_client

if TYPE_CHECKING:
    from fedasync_iot.coordinator import CoordinatorService, Stepped

log = logging.getLogger("fedasync.fleet.virtual")

EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the virtual wall clock at sim time 0
QUIET_TIMEOUT_S = 120.0  # wall seconds a phase or a marker may take before the run fails


def sync_topic(fleet: str) -> str:
    """Markers to every connection; the coordinator's alone go to a level below it."""
    return f"{SIM_CONTROL_ROOT}{fleet}/sync"


def device_sync_topic(fleet: str, device_id: str) -> str:
    """Markers to one device (and the coordinator, subscribed to everything below `sync`)."""
    return f"{sync_topic(fleet)}/d/{device_id}"


class VirtualClock(SimClock):
    """A `SimClock` whose time is set, not read: ``t`` sim seconds."""

    __slots__ = ("t",)

    def __init__(self, scale: float) -> None:
        self.t = 0.0
        super().__init__(scale, EPOCH, wall=self._wall)

    def _wall(self) -> float:
        return EPOCH + self.t / self.scale

    def sim_now(self) -> float:
        return self.t

    # The coordinator's clock (coordinator/_scheduling.py's Clock): both read the virtual wall,
    # so every interval it knows is one of this clock.
    def time(self) -> float:
        return self._wall()

    def monotonic(self) -> float:
        return self._wall()

    def sim_at(self, wall: float) -> float:
        """The earliest sim time whose wall time is `wall` or later (exact: no rounding below
        a due time, or the clock would stop just short of it)."""
        t = (wall - EPOCH) * self.scale
        while EPOCH + t / self.scale < wall:
            t = math.nextafter(t, math.inf)
        return t


class DeviceTimers(Protocol):
    """When a simulated device's code runs next: on the wall clock or the virtual one."""

    def at(self, sim_t: float, fn: Callable[[], None]) -> None: ...

    def soon(self, fn: Callable[[], None]) -> None: ...


class Timers:
    """A worker's timers on the virtual clock, released in (time, device, order set) order."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def of_device(self, index: int) -> DeviceTimers:
        return _OfDevice(self, index)

    def at(self, index: int, sim_t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(sim_t, self.clock.t), index, next(self._seq), fn))

    def pop_due(self) -> list[Callable[[], None]]:
        due = []
        while self._heap and self._heap[0][0] <= self.clock.t:
            due.append(heapq.heappop(self._heap)[3])
        return due

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None


class _OfDevice:
    def __init__(self, timers: Timers, index: int) -> None:
        self._timers = timers
        self._index = index

    def at(self, sim_t: float, fn: Callable[[], None]) -> None:
        self._timers.at(self._index, sim_t, fn)

    def soon(self, fn: Callable[[], None]) -> None:
        self._timers.at(self._index, self._timers.clock.t, fn)


class Device(Protocol):
    """What a shard needs of a simulated device (fleet/_worker.py's SimDevice)."""

    index: int
    device_id: str
    marker: int

    @property
    def connected(self) -> bool: ...

    def handle(self, topic: str, payload: bytes) -> None: ...


class Shard:
    """A worker's side of the virtual clock: runs its devices' phases on command from the
    controller (a pipe, served on the worker's network thread) and says when the broker has
    everything they sent, and when every connection has seen a marker.

    Commands: ("phase", t) -> ("done", to_mark, published, queued, next_timer), `to_mark`
    the ids of the devices that may have been sent something (sorted);
    ("marker", k, ids) -> ("synced", queued) once each connected device of `ids` (None: every
    one) has seen marker k; ("report", final) -> ("report", totals); ("stop",)."""

    def __init__(self, conn: Any, clock: VirtualClock, timers: Timers,
                 report: Callable[[bool], dict[str, int]]) -> None:
        self.conn = conn
        self.clock = clock
        self.timers = timers
        self.devices: list[Device] = []
        self.stopped = False
        self._report = report
        self._inbox: list[tuple[int, int, Device, str, bytes]] = []
        self._arrival = itertools.count()
        self._outstanding = 0  # packets sent and not yet acknowledged by the broker
        self._published = False  # in this phase (devices publish only to the coordinator)
        self._to_mark: set[str] = set()  # devices that may get messages from this phase
        # ("done", 0, None) or ("synced", marker, the devices to see it; None: all)
        self._awaiting: tuple[str, int, frozenset[str] | None] | None = None
        self._next_phase: list[Callable[[], None]] = []

    # -- from the devices (network thread) ---------------------------------------------------
    def sent(self, device_id: str, *, published: bool = False,
             needs_marker: bool = True) -> None:
        self._outstanding += 1
        self._published |= published
        if needs_marker and not published:
            self._to_mark.add(device_id)

    def acknowledged(self) -> None:
        self._outstanding -= 1

    def at_next_phase(self, fn: Callable[[], None]) -> None:
        """Run `fn` first thing in the next phase (at this same instant), once everything sent
        to the devices until now has been read: a device closes its connection there. Closed
        earlier, with a SUBACK or a retained message still unread, the socket ends in a reset
        rather than a clean close; Mosquitto may then drop the DISCONNECT it had not read and
        publish the device's last will, or not, depending on timing."""
        self._next_phase.append(fn)

    def received(self, device: Device, topic: str, payload: bytes) -> None:
        self._inbox.append((device.index, next(self._arrival), device, topic, payload))

    # -- commands ----------------------------------------------------------------------------
    def on_command(self) -> None:
        command = self.conn.recv()
        kind = command[0]
        if kind == "phase":
            self.clock.t = command[1]
            self._published, self._to_mark = False, set()
            first, self._next_phase = self._next_phase, []
            for fn in first:
                fn()
            self._run_phase()
            self._awaiting = ("done", 0, None)
        elif kind == "marker":
            ids = command[2]
            self._awaiting = ("synced", command[1], None if ids is None else frozenset(ids))
        elif kind == "report":
            self.conn.send(("report", self._report(command[1])))
        elif kind == "stop":
            self.stopped = True
        self.check()

    def _run_phase(self) -> None:
        """Messages received (by device, in arrival order), then timers due, until neither is
        left: handling one may set a timer for now, a timer may wake a device at once."""
        while True:
            inbox, self._inbox = sorted(self._inbox, key=lambda m: m[:2]), []
            for _, _, device, topic, payload in inbox:
                device.handle(topic, payload)
            due = self.timers.pop_due()
            for fn in due:
                try:
                    fn()
                except Exception:  # one device's bug must not stop the fleet
                    log.exception("timer callback failed")
            if not inbox and not due:
                return

    def check(self) -> None:
        """After every round of network events: answer what the controller waits for."""
        if self._awaiting is None:
            return
        kind, marker, ids = self._awaiting
        if kind == "done" and self._outstanding == 0:
            self._awaiting = None
            self.conn.send(("done", sorted(self._to_mark), self._published, len(self._inbox),
                            self.clock.t if self._next_phase else self.timers.next_time()))
        elif kind == "synced" and all(d.marker >= marker for d in self.devices if d.connected
                                      and (ids is None or d.device_id in ids)):
            self._awaiting = None
            self.conn.send(("synced", len(self._inbox)))


class Controller:
    """Drives a virtual-clock run from the parent process: the coordinator (its `Stepped`
    scheduler), the workers' shards (through `conns`) and the clock."""

    def __init__(self, service: CoordinatorService, stepper: Stepped, conns: Sequence[Any],
                 clock: VirtualClock, *, broker_url: str, fleet: str) -> None:
        self.service = service
        self.stepper = stepper
        self.conns = list(conns)
        self.clock = clock
        self.fleet = fleet
        self.topic = sync_topic(fleet)
        self._marker = 0
        self._seen = -1
        self._seen_changed = threading.Condition()
        self._next_timer: list[float | None] = [0.0] * len(self.conns)
        self._queued = [0] * len(self.conns)
        self.phases = 0
        self.markers = 0
        # The coordinator's own connection carries its markers: ordered after what it got.
        service.add_handler(f"{self.topic}/#", self._on_marker)  # "#": the level above it too
        self._client = create_client(BrokerAddress.parse(broker_url),
                                     client_id=f"sim-clock-{fleet}", persistent=False)
        self._client.connect(*_host_port(broker_url))
        self._client.loop_start()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def _on_marker(self, topic: str, payload: bytes) -> None:
        with self._seen_changed:
            self._seen = max(self._seen, int(payload))
            self._seen_changed.notify_all()

    # -- the clock ---------------------------------------------------------------------------
    def run(self, end_t: float, *, every: float, on_sample: Callable[[float], None],
            on_instant: Callable[[], None] | None = None) -> None:
        """Run until sim time `end_t`; `on_sample(t)` at 0, `every`, 2 x `every`, ... (before
        the instant at that time runs)."""
        next_sample = 0.0
        while True:
            t = self._next_time()
            while next_sample <= min(t, end_t):
                self.clock.t = next_sample
                on_sample(next_sample)
                next_sample += every
            if t > end_t:
                self.clock.t = end_t
                return
            self.clock.t = t
            self._instant(t)
            if on_instant is not None:
                on_instant()

    def _next_time(self) -> float:
        times = [x for x in self._next_timer if x is not None]
        due = self.stepper.next_due()
        # A coordinator time already reached had its step in that instant. One can stay in the
        # past: a synchronous round past its deadline with too few updates to close, which only
        # a new update (its own event) can change.
        if due is not None and (at := self.clock.sim_at(due)) > self.clock.t:
            times.append(at)
        return max(self.clock.t, min(times, default=math.inf))

    def _instant(self, t: float) -> None:
        """Phases at `t` until none has anything left to do."""
        while True:
            busy = False
            replies = self._ask_all(("phase", t), "done")
            self.phases += 1
            self._next_timer = [r[4] for r in replies]
            self._queued = [r[3] for r in replies]
            to_mark = frozenset(d for r in replies for d in r[1])
            if to_mark or any(r[2] for r in replies):  # updates, statuses: to the coordinator
                self._quiesce(to_mark)
                busy = True
            happened, reached = self.stepper.step()
            if happened:
                self._quiesce(reached)
                busy = True
            if not busy and not any(self._queued) and not any(
                    x is not None and x <= t for x in self._next_timer):
                return

    def _quiesce(self, devices: frozenset[str] | None) -> None:
        """Until the coordinator's connection and those of `devices` (None: every device) have
        seen a new marker. A marker goes to the devices that may have been sent something
        (an ack goes to one device): a 1,000-device fleet then reads one marker per ack
        rather than a thousand."""
        self._marker += 1
        self.markers += 1
        marker = self._marker
        ids = None if devices is None else tuple(sorted(devices))
        if ids != ():
            for conn in self.conns:
                conn.send(("marker", marker, ids))
        topics = ([self.topic] if ids is None else
                  [device_sync_topic(self.fleet, d) for d in ids] or [f"{self.topic}/coordinator"])
        deadline = time.monotonic() + QUIET_TIMEOUT_S
        with self._seen_changed:
            while self._seen < marker:
                # Again every second: the first may precede the coordinator's subscription.
                for topic in topics:
                    self._client.send(topic, str(marker).encode(), qos=0)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StateError(f"the coordinator did not see marker {marker} in "
                                     f"{QUIET_TIMEOUT_S:g} s")
                self._seen_changed.wait(min(1.0, left))
        if ids != ():
            for i, conn in enumerate(self.conns):
                self._queued[i] = self._recv(conn, "synced")[1]

    def _ask_all(self, command: tuple[Any, ...], answer: str) -> list[tuple[Any, ...]]:
        for conn in self.conns:
            conn.send(command)
        return [self._recv(conn, answer) for conn in self.conns]

    def report(self, final: bool = False) -> list[dict[str, int]]:
        return [r[1] for r in self._ask_all(("report", final), "report")]

    def stop(self) -> None:
        for conn in self.conns:
            conn.send(("stop",))

    def _recv(self, conn: Any, answer: str) -> tuple[Any, ...]:
        if not conn.poll(QUIET_TIMEOUT_S):
            raise StateError(f"a worker did not answer {answer!r} in {QUIET_TIMEOUT_S:g} s")
        reply: tuple[Any, ...] = conn.recv()
        if reply[0] != answer:
            raise StateError(f"a worker answered {reply[0]!r}, expected {answer!r}")
        return reply


def _host_port(url: str) -> tuple[str, int]:
    address = BrokerAddress.parse(url)
    return address.host, address.port
