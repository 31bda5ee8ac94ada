"""Message intake: what arrives on the coordinator's subscriptions, and the writer that merges it.

Paho's network thread sorts each message (`on_message`): an update goes to the inbox, a device
status feeds the cohort selector and the privacy book, a coordinator status goes to the lease,
another fleet's or a rewritten topic is refused. The writer (`run`, on a thread; or
`merge_received`, stepped) takes the inbox in batches, commits them through the engine, then
sends each update's end-to-end ack and PUBACKs it.

An update is PUBACKed only after its batch is committed. Until then the broker keeps it in our
persistent session and redelivers it after a crash; the engine recognises it by update_id. A
batch whose commit fails (a full disk) is kept and tried again with backoff on the same
connection (coordinator/_retries.py); a state directory deleted under us stops the service.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from fedasync_iot.coordinator._cohort import CohortSelector, decode_status, eligible_of
from fedasync_iot.coordinator._config import CoordinatorConfig
from fedasync_iot.coordinator._device_privacy import BadStatus, PrivacyBook, from_status
from fedasync_iot.coordinator._engine import Engine, Incoming, Outcome
from fedasync_iot.coordinator._lease import FleetLease
from fedasync_iot.coordinator._metrics import Metrics
from fedasync_iot.coordinator._retries import Retries
from fedasync_iot.coordinator._scheduling import Clock
from fedasync_iot.coordinator._store import StateLost, Store
from fedasync_iot.coordinator._transport import Transport
from fedasync_iot.models import Message, Rejection, StateError, Topics, encode_ack

log = logging.getLogger("fedasync.coordinator")

# The writer records changed privacy figures (one small transaction) at most this often, and
# after a failure waits longer: a full disk shows in the updates' commits already.
PRIVACY_WRITE_S = 1.0
PRIVACY_RETRY_S = 30.0


class _Token(NamedTuple):
    """Which message to PUBACK: a mid means something only on the connection it came on."""

    generation: int
    mid: int
    qos: int


class Intake:
    """The inbox, the writer, and the end-to-end acks."""

    def __init__(self, config: CoordinatorConfig, *, engine: Engine, engine_lock: threading.Lock,
                 store: Store, transport: Transport, lease: FleetLease, metrics: Metrics,
                 clock: Clock, cohorts: CohortSelector | None, stop: threading.Event,
                 on_new_version: Callable[[], None],
                 merge: Callable[[list[Incoming]], None] | None = None) -> None:
        """`merge(batch)`: how the writer merges a batch; `process` unless given."""
        self.config = config
        self.topics = Topics(config.fleet, config.topic_root)
        self._engine = engine
        self._engine_lock = engine_lock
        self._store = store
        self._transport = transport
        self._lease = lease
        self._metrics = metrics
        self._clock = clock
        self._cohorts = cohorts
        self._stop = stop
        self._on_new_version = on_new_version
        self._merge = merge or self.process
        # SimpleQueue: C-implemented, ~25x cheaper per put/get than Queue (1 us), twice per update.
        self._inbox: queue.SimpleQueue[Incoming] = queue.SimpleQueue()
        self.generation = 0  # bumps on every (re)connect: a mid is only valid in its connection
        # Each device's local privacy ledger as its status claims it: observed on the network
        # thread, written by the writer when the figures change (coordinator/_device_privacy.py).
        self.privacy = PrivacyBook(store.device_privacy())
        self._privacy_due = -float("inf")  # monotonic: when the writer next records them
        self._bad_status_seen: set[str] = set()  # devices whose bad status was logged
        self.commits = Retries(first_s=0.5, cap_s=30.0, summary_every_s=300.0,
                               clock=clock.monotonic)
        self._state_checked = -float("inf")  # monotonic
        self.foreign = 0  # messages on other fleets' topics: never merged (see _on_foreign)
        self._foreign_seen: set[str] = set()
        self._rewritten_seen = False  # a topic rewritten by the broker, logged once

    @property
    def version(self) -> int:
        return self._engine.version

    def next_deadline(self) -> float | None:
        """When the rule closes a round by time (a synchronous round's deadline), if it will."""
        return self._engine.rule.next_deadline()

    # -- the MQTT client's thread ------------------------------------------------------------
    def on_message(self, msg: Message) -> None:
        topic = msg.topic
        if topic == self.topics.coordinator_status:
            if msg.qos > 0:  # kept by the session from an earlier QoS 1 subscription: old news
                self._transport.ack(msg.mid, msg.qos)
                return
            self._lease.on_coordinator_status(msg.payload, msg.retain)
            return
        if self.topics.rewritten(topic):
            self._on_rewritten(msg)
            return
        if not self.topics.owns(topic):
            self._on_foreign(msg)
            return
        device = self.topics.device_of(topic, "status")
        if device is not None:  # a device checking in (synchronous rounds), and its privacy
            if msg.payload:  # empty: a retained status cleared
                status = decode_status(msg.payload)
                if self._cohorts is not None:
                    self._cohorts.observe(device, eligible_of(status))
                self._observe_privacy(device, status)
            return
        if self._lease.failure is not None:
            return  # not ours to merge any more; unacked, the broker keeps it
        self._inbox.put(Incoming(self.topics.device_of(topic), msg.payload,
                                 self._clock.time(), _Token(self.generation, msg.mid, msg.qos),
                                 topic=topic))

    def _on_rewritten(self, msg: Message) -> None:
        """A message of this fleet whose topic the broker rewrote ('.' -> '/'): it cannot be
        told apart from another fleet's or device's, so it is refused (acknowledged, never
        merged: the broker would only deliver it again), loudly the first time."""
        if msg.qos > 0:
            self._transport.ack(msg.mid, msg.qos)
        self._metrics.rejected.labels(Rejection.REWRITTEN_TOPIC).inc()
        first, self._rewritten_seen = not self._rewritten_seen, True
        (log.error if first else log.debug)(
            "refused a message on %s: the broker turned a '.' of one of fleet %r's topic levels "
            "into '/' (RabbitMQ's MQTT plugin does). On such a broker the fleet name, the topic "
            "root and every device id must be letters, digits, '-' and '_' only "
            "(docs/brokers.md)", msg.topic, self.config.fleet)

    def _on_foreign(self, msg: Message) -> None:
        """A message on another fleet's topic: the broker session of our client id still holds
        a subscription from another configuration, or another fleet's coordinator uses our
        client id (its status names it). Never merged or answered. An update of a fleet whose
        coordinator shares the id is that coordinator's only copy: left unacknowledged (the
        broker keeps it in the session for it) and this coordinator stops. Anything else is a
        leftover subscription of this session alone (the fleet's coordinator has a session of
        its own): acknowledged, or it would hold a slot of the broker's in-flight window
        forever, and unsubscribed."""
        self.foreign += 1
        levels = msg.topic.split("/")
        owner = next((p for p in self._lease.sharing if len(levels) > 2
                      and p.fleet == levels[1]), None)
        if owner is not None and len(levels) == 4 and levels[2] == "update":
            self._lease.give_up(
                f"received an update of fleet {owner.fleet!r} ({msg.topic}): its coordinator "
                f"({owner.describe()}) uses this one's client id {self.config.mqtt_client_id!r} "
                f"too, so both share one broker session. Left unacknowledged for it; this one "
                f"stops. Give one of them a client_id of its own (or leave client_id unset: it "
                f"derives from the fleet)")
            return
        if msg.qos > 0:
            self._transport.ack(msg.mid, msg.qos)
        pattern = ("/".join([*levels[:-1], "+"]) if len(levels) == 4
                   and levels[2] in ("update", "status") else msg.topic)
        if pattern in self._foreign_seen:
            return
        self._foreign_seen.add(pattern)
        self._transport.unsubscribe(pattern)
        log.warning("ignored a message on %s: not a topic of fleet %r. The broker session of "
                    "client id %r still holds a subscription to %s (an earlier configuration, "
                    "or another coordinator with the same client id): acknowledged without an "
                    "answer, and unsubscribed", msg.topic, self.config.fleet,
                    self.config.mqtt_client_id, pattern)

    def _observe_privacy(self, device: str, status: dict[str, Any] | None) -> None:
        """Keep what a device's status says of its privacy ledger; a bad one is counted and
        logged (once per device at WARNING) and changes nothing."""
        try:
            if status is None:
                raise BadStatus("unreadable", "not a JSON object of at most 16 KiB")
            report = from_status(status, now=self._clock.time())
        except BadStatus as exc:
            self._metrics.bad_status(exc.reason)
            first = device not in self._bad_status_seen
            self._bad_status_seen.add(device)
            (log.warning if first else log.debug)(
                "ignored the privacy figures of device %r's status (%s): %s; the last figures "
                "it reported stay", device, exc.reason, exc)
            return
        if report is not None and self.privacy.observe(device, report):
            log.debug("device %r reports epsilon %s of budget %s (reached: %s)", device,
                      report.epsilon, report.budget, report.reached)

    # -- the writer --------------------------------------------------------------------------
    def run(self) -> None:
        """The writer thread, until the service stops."""
        retry: list[Incoming] = []  # a batch whose commit failed: tried again after a wait
        while not self._stop.is_set():
            if self._clock.monotonic() >= self._privacy_due:
                self.write_privacy()
            if retry:
                if self._stop.wait(self.commits.delay):
                    break
                batch, retry = retry, []
            else:
                try:
                    batch = [self._inbox.get(timeout=0.2)]
                except queue.Empty:
                    self._guarded(self._tick)
                    continue
                while len(batch) < self.config.batch_max:
                    try:
                        batch.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
            if self._lease.failure is not None:
                continue  # another coordinator serves the fleet: unacked, the broker keeps it
            if not self._guarded(functools.partial(self._merge, batch), len(batch)):
                # Still ours, unacked, on this connection: no reconnect is needed to get it
                # again (a reconnect meanwhile makes the broker redeliver it: a duplicate).
                retry = batch if self.commits.failing and self._lease.failure is None else []

    def merge_received(self) -> bool:
        """Stepped: merge everything received so far, in a fixed order (by topic and payload,
        whatever order the network delivered it in). A batch whose commit failed stays in the
        inbox, unacked, for the next call. Whether there was anything."""
        batch: list[Incoming] = []
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._inbox.get_nowait())
        batch.sort(key=lambda i: (i.topic, i.payload))
        for at in range(0, len(batch), self.config.batch_max):
            part = batch[at:at + self.config.batch_max]
            done = self._guarded(functools.partial(self._merge, part), len(part))
            if not done and self.commits.failing and self._lease.failure is None:
                for item in part:
                    self._inbox.put(item)
        return bool(batch)

    def keep_time(self) -> None:
        """Stepped: what the writer does as time passes (round deadlines, privacy figures)."""
        self._guarded(self._tick)
        if self._clock.monotonic() >= self._privacy_due:  # a transaction per instant is many
            self.write_privacy()

    def _guarded(self, fn: Callable[[], None], updates: int = 0) -> bool:
        """Run one piece of the writer's work; False when it failed."""
        try:
            fn()
        except StateLost as exc:
            self._lease.fail(exc)  # one ERROR line; run_until ends the process
            return False
        except StateError as exc:
            # Nothing of the batch was acked: the broker keeps it until it is committed.
            if self.commits.failed(str(exc)):
                if self.commits.failures == 1:
                    log.error("cannot commit to the state directory %s: %s; nothing of the "
                              "batch (%d update(s)) is acknowledged, the broker keeps it. "
                              "Retrying, backing off from %.1f s to %.0f s; /healthz says 503 "
                              "until it works", self.config.state_dir, exc, updates,
                              self.commits.first_s, self.commits.cap_s)
                else:
                    log.error("commits to the state directory %s still fail: %d attempts over "
                              "%.0f s, the last: %s", self.config.state_dir,
                              self.commits.failures, self.commits.elapsed, exc)
            return False
        except Exception:  # the service must keep serving whatever one batch does
            log.exception("unexpected error in the writer; continuing")
            return False
        recovery = self.commits.succeeded()
        if recovery is not None:
            log.warning("commits to the state directory %s resumed after %d failure(s) over "
                        "%.1f s", self.config.state_dir, recovery.failures, recovery.seconds)
        return True

    def process(self, batch: list[Incoming]) -> None:
        """Merge one batch, then ack each update of it (end to end, then PUBACK)."""
        started = time.perf_counter()
        before = self._engine.version
        with self._engine_lock:
            outcomes = self._engine.process(batch)
        self._metrics.observe_batch(outcomes, time.perf_counter() - started)
        for o in outcomes:
            self._send(o)
        # On a virtual clock these are its durations (the simulator reports them only when
        # it runs on the wall clock).
        now = self._clock.time()
        for incoming in batch:
            self._metrics.ack_seconds.observe(max(0.0, now - incoming.received_at))
        self.after_change(before)

    def write_privacy(self) -> None:
        """Record the privacy figures that changed. Not through `_guarded`: these are not
        updates, so they neither ack anything nor start or end a run of commit failures; one
        that fails is kept and tried again later. Not tried while commits fail: the disk that
        fails them fails this too, and that run of failures is logged once already."""
        self._privacy_due = self._clock.monotonic() + PRIVACY_WRITE_S
        todo = self.privacy.unwritten()
        if self._lease.failure is not None or self.commits.failing or not todo:
            return
        try:
            with self._engine_lock:  # one transaction at a time on the store's connection
                self._store.record_privacy(todo)
        except StateError as exc:
            self._privacy_due = self._clock.monotonic() + PRIVACY_RETRY_S
            log.warning("could not record the privacy figures of %d device(s), kept for another "
                        "attempt in %.0f s: %s", len(todo), PRIVACY_RETRY_S, exc)
            return
        self.privacy.written(todo)

    def _tick(self) -> None:
        if self._clock.monotonic() - self._state_checked >= 1.0:
            # Idle, no commit would notice that the state directory was deleted.
            self._state_checked = self._clock.monotonic()
            self._store.check_present()
        before = self._engine.version
        with self._engine_lock:
            self._engine.tick()
        self.after_change(before)

    def after_change(self, before: int) -> None:
        """Since version `before`: metrics, and a snapshot wanted, when the version moved."""
        if self._engine.version != before:
            self._metrics.version.set(self._engine.version)
            self._metrics.devices_seen.set(self._store.devices_seen())
            self._on_new_version()

    def _send(self, outcome: Outcome) -> None:
        # The end-to-end ack goes out before the PUBACK. In the other order a SIGKILL between
        # the two let the broker forget the update (PUBACKed) while the device never heard of
        # it: it kept it spooled until its next reconnect, maybe never (tests/
        # test_reliability.py). paho writes both packets to one FIFO, so the broker cannot get
        # the PUBACK without the ack; at worst it redelivers and the device hears "duplicate".
        # This relies on publishing without an inflight window (max_inflight=0, the service's
        # client): a full window would hold the ack back while the PUBACK goes out.
        token = outcome.token
        if outcome.device_id is not None:
            self._transport.publish(self.topics.ack(outcome.device_id), encode_ack(outcome.ack),
                                    qos=1)
        if isinstance(token, _Token) and token.qos > 0 and token.generation == self.generation:
            self._transport.ack(token.mid, token.qos)
