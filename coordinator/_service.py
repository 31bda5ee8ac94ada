"""The long-running coordinator: MQTT at the edges, the engine in the middle.

Threads: paho's network loop (queues incoming updates), the writer (batches, commits, then
PUBACKs and sends end-to-end acks), the snapshot publisher (exports ONNX off the hot path,
coalescing versions) and the HTTP server (metrics, status, rollback). A *driven* service (the
simulator's virtual clock, fleet/_virtual.py) has neither writer nor publisher: whoever drives it
calls `step` to do their work, at the times `next_due` names or when messages have arrived.

An update is PUBACKed only after its batch is committed. Until then the broker keeps it in our
persistent session and redelivers it after a crash; the engine recognises it by update_id. A
batch whose commit fails (a full disk) is kept and tried again with backoff on the same
connection (coordinator/_retries.py); a state directory deleted under us stops the service.

One coordinator per fleet and broker (docs/architecture.md, Identity): its client id derives from
the fleet, and before each connection attempt it looks at the fleet's retained coordinator status
(coordinator/_identity.py). Another live instance there means: exit (or, with `standby`, wait for
it to go offline), never connect with the same client id and take its session, and with it the
fleet's updates, back and forth.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import paho.mqtt.client as mqtt

from fedasync_iot.coordinator._central_dp import privacy_status, with_central_dp
from fedasync_iot.coordinator._cohort import CohortSelector, decode_status, eligible_of
from fedasync_iot.coordinator._config import CoordinatorConfig
from fedasync_iot.coordinator._control import service_token
from fedasync_iot.coordinator._device_privacy import (
    BadStatus,
    PrivacyBook,
    from_status,
    with_local_privacy,
)
from fedasync_iot.coordinator._engine import Engine, Evaluator, Incoming, Outcome
from fedasync_iot.coordinator._http import Rollback, StatusServer
from fedasync_iot.coordinator._identity import HOST, Identity, LookTimeout, Presence, Survey, look
from fedasync_iot.coordinator._metrics import Metrics
from fedasync_iot.coordinator._retries import Retries
from fedasync_iot.coordinator._rules import build_rule
from fedasync_iot.coordinator._store import Params, StateLost, Store
from fedasync_iot.models import FedAsyncError, StateError, Topics, build_model
from fedasync_iot.models._mqtt import BrokerAddress, Connection, describe_error, make_client
from fedasync_iot.models._signing import Signer
from fedasync_iot.models._template import OnnxTemplate
from fedasync_iot.models._wire import (
    Announcement,
    Snapshot,
    TemplateMessage,
    WeightsMessage,
    encode_ack,
    encode_announcement,
    encode_snapshot,
    encode_template,
    encode_weights,
)

log = logging.getLogger("fedasync.coordinator")

KEEPALIVE_S = 30  # the broker publishes a crashed coordinator's last will after 1.5 x this


class _Token(NamedTuple):
    """Which message to PUBACK: a mid means something only on the connection it came on."""

    generation: int
    mid: int
    qos: int


class CoordinatorService:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        evaluator: Evaluator | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        driven: bool = False,
        reset: bool = False,
    ) -> None:
        """`reset` (`run --reset`): a state at version 0 serves the fleet even when the broker
        holds it at a later version (else the look before connecting refuses)."""
        self.config = config
        self._clock = clock
        self._monotonic = monotonic
        self._driven = driven
        # Driven mode: what `step` published, to wait for the broker's PUBACKs before it returns,
        # and to which device (None: any device may get it).
        self._outgoing: list[tuple[mqtt.MQTTMessageInfo, str | None]] = []
        self._last_publish = -float("inf")  # monotonic
        self._frozen = False
        self.topics = Topics(config.fleet, config.topic_root)
        self.address = BrokerAddress.parse(config.broker, ca_file=config.ca_file,
                                           cert_file=config.cert_file, key_file=config.key_file)
        self.metrics = Metrics()
        self._signer = (Signer.from_file(config.signing_key) if config.signing_key else None)
        self._adapter = build_model(config.model)
        self.store = Store(Path(config.state_dir), keep_checkpoints=config.keep_checkpoints)
        self.engine = Engine(
            self.store, with_central_dp(build_rule(config.rule), config.central_dp,
                                        self.store.lineage), config.guards, spec=config.model,
            initial_params=self._adapter.get_params_vector, evaluator=evaluator,
            eval_every=config.evaluation.every, max_message_bytes=config.max_message_bytes,
            participation=config.participation, clock=clock)
        # A state at version 0 (new, or its predecessor deleted) has merged nothing worth
        # keeping; started under a fleet the broker holds at version N > 0, it would publish
        # version 0 over the fleet's model and reject every agent's update (future_version).
        # The look before the first connection checks (_gate); --reset skips it.
        self._check_version = self.engine.version == 0
        self._reset = reset
        if reset and self.engine.version > 0:
            log.warning("--reset ignored: the state in %s is at version %d", config.state_dir,
                        self.engine.version)
        self.metrics.watch_participation(lambda: self.engine.ledger.report(now=clock()))
        self.metrics.version.set(self.engine.version)
        self.metrics.devices_seen.set(self.store.devices_seen())
        # SimpleQueue: C-implemented, ~25x cheaper per put/get than Queue (1 us), twice per update.
        self._inbox: queue.SimpleQueue[Incoming] = queue.SimpleQueue()
        # Each device's local privacy ledger as its status claims it: observed on the network
        # thread, written by the writer when the figures change (coordinator/_device_privacy.py).
        self._privacy = PrivacyBook(self.store.device_privacy())
        self._privacy_due = -float("inf")  # monotonic: when the writer next records them
        self._bad_status_seen: set[str] = set()  # devices whose bad status was logged
        self._engine_lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._generation = 0  # bumps on every (re)connect: a mid is only valid in its connection
        self._snapshot_wanted = threading.Condition()
        self._published_version = -1  # the newest the broker acknowledged
        self._published = threading.Condition()  # notified when _published_version moves
        self._sent_version = -1  # the newest handed to the broker
        self._waiting_noted = -1
        rule = config.rule
        self._cohorts = (CohortSelector(rule.cohort_size, rule.over_selection, rule.deadline_s)
                         if rule.name == "fedavg-sync" else None)
        self._last_snapshot: bytes | None = None
        # Compact snapshots (docs/wire.md): the template of the spec, published once per id,
        # and per version the weights. None until made; False when the model has no template.
        self._template: tuple[str, bytes] | bool | None = None  # (id, published bytes)
        self._template_acked: str | None = None  # the id whose PUBACK the broker sent
        self._onnx_template: OnnxTemplate | None = None  # fills each snapshot's full ONNX
        self._last_weights: bytes | None = None
        # The announcement of the newest snapshot the broker acknowledged (models on demand):
        # set only after that PUBACK, so it never names a snapshot the broker does not hold.
        self._last_announcement: bytes | None = None
        self._threads: list[threading.Thread] = []
        self._http: StatusServer | None = None
        self._started_at = clock()
        self.identity = Identity(config.fleet, client_id=config.mqtt_client_id, clock=clock)
        self._failure: StateError | None = None
        self._status_ours = True  # False once another coordinator's status is the fleet's
        # Other fleets' coordinators whose status names our client id (the last look): their
        # updates may reach our broker session, and are theirs.
        self._sharing: tuple[Presence, ...] = ()
        self._commits = Retries(first_s=0.5, cap_s=30.0, summary_every_s=300.0,
                                clock=monotonic)
        self._state_checked = -float("inf")  # monotonic
        self._on_failure: Callable[[], None] | None = None
        self._standby = threading.Event()  # set while waiting for another coordinator to stop
        self._foreign = 0  # messages on other fleets' topics: never merged (see _on_foreign)
        self._foreign_seen: set[str] = set()
        self._rewritten_seen = False  # a topic rewritten by the broker, logged once
        self._client = make_client(self.address, client_id=config.mqtt_client_id,
                                   persistent=True, manual_ack=True, max_inflight=0)
        # max_inflight is paho's window for what *we* publish (acks, snapshots), not how many
        # updates the broker sends us (that is the broker's max_inflight_messages). 0 means no
        # window: with one, paho rescans every outgoing message on each PUBACK it receives
        # (Client._update_inflight), quadratic in the acks of a batch; that was ~5% of the CPU
        # (bench/ingest.py). Memory is the same either way: paho keeps every unacked
        # QoS 1 publish until its PUBACK, in or out of the window.
        self._client.will_set(self.topics.coordinator_status,
                              self._presence("offline"), qos=1, retain=True)
        self._link = Connection(self._client, self.address, logger=log, keepalive=KEEPALIVE_S,
                                max_delay_s=30.0, on_online=self._on_online,
                                on_offline=self._on_offline)
        self._client.gate = self._gate
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        log.info("coordinator for fleet %r at version %d, rule %s, broker %s, client id %s",
                 self.config.fleet, self.engine.version, self.config.rule.name,
                 self.address.redacted(), self.config.mqtt_client_id)
        self.identity.register()
        for target, name in (() if self._driven else
                             ((self._writer, "writer"), (self._publisher, "snapshots"))):
            t = threading.Thread(target=target, name=f"coordinator-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.config.http_address is not None:
            # The store holds the state directory's lock by now, so a token generated here
            # cannot replace the file of another running coordinator.
            self._http = StatusServer(self.config.http_address, self,
                                      token=service_token(self.config),
                                      registry=self.metrics.registry, lock=self.store.lock)
            self._http.start()
            log.info("metrics and status on http://%s:%d/", *self._http.address)
        self._link.start()
        self._want_snapshot()

    def stop(self) -> None:
        self._stop.set()
        with self._snapshot_wanted:
            self._snapshot_wanted.notify_all()
        for t in self._threads:
            t.join(timeout=10)
        self._write_privacy()  # the writer is done: what it had not written yet
        if self._http is not None:
            self._http.stop()
        # The state directory's lock goes before "offline" is said: a standby that takes over
        # on hearing it may open the same directory at once.
        self.store.close()
        self.identity.unregister()
        if self._link.online and self._status_ours:
            self._client.publish(self.topics.coordinator_status, self._presence("offline"),
                                 qos=1, retain=True).wait_for_publish(timeout=2)
        self._link.stop()
        log.info("coordinator stopped at version %d", self.engine.version)

    def run_until(self, stop: threading.Event) -> None:
        """Start, serve until `stop` is set, stop. Raises StateError (after stopping) when this
        coordinator had to give up: another one serves the fleet on this broker (or uses its
        client id), or its state directory is gone."""
        self._on_failure = stop.set
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
        if self._failure is not None:
            raise self._failure

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def failure(self) -> StateError | None:
        """Why this coordinator gave up (another one serves the fleet), or None."""
        return self._failure

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.address[1]

    # -- one coordinator per fleet -----------------------------------------------------------
    def _gate(self) -> None:
        """Before every connection attempt (paho's thread): is the fleet ours to serve?

        Connecting with our client id while another coordinator holds it would take its broker
        session; it would take it back at its next reconnect, and so on. An OSError from here
        is a failed attempt (logged and retried by the connection)."""
        first = not self.identity.has_served
        stopping = self._link.stopping
        # The URL this attempt goes to (with several, the connection's turn): a failure here is
        # that URL's, and is logged as such before the connection moves on.
        here = self._link.address
        try:
            survey = look(here, self.topics, stop=stopping)
        except LookTimeout as exc:
            if first and self._check_version and not self._reset:
                self._give_up(
                    f"the state in {self.config.state_dir} is at version 0, and the broker does "
                    f"not let this coordinator read which version it holds for fleet "
                    f"{self.config.fleet!r} ({exc}); not publishing version 0 blind over it: "
                    f"let the account read {self.topics.coordinator_status} and "
                    f"{self.topics.announce}, or start over with `run --reset`")
                raise ConnectionAbortedError("cannot check the fleet's version") from exc
            log.warning("could not check whether another coordinator serves fleet %r (%s: may "
                        "this broker account read and write %s?); connecting anyway",
                        self.config.fleet, exc, self.topics.coordinator_status)
            return
        if stopping.is_set():
            raise ConnectionAbortedError("stopping")
        rival = self.identity.rival(survey.status)
        if rival is not None:
            survey = self._wait_or_give_up(rival, first=first, here=here, stopping=stopping)
        self._sharing = self.identity.sharing(survey.others)
        clash = self.identity.clash(survey.others)
        if clash is not None:
            self._give_up(
                f"client id {self.config.mqtt_client_id!r} is in use by the coordinator of "
                f"fleet {clash.fleet!r} ({clash.describe()}) on this broker: two fleets with one "
                f"client id take one broker session from each other, and each receives the "
                f"other's updates. Give this coordinator a client_id of its own (or leave "
                f"client_id unset: it derives from the fleet)")
            raise ConnectionAbortedError("another fleet's coordinator uses this client id")
        if first:
            self._check_fleet_version(survey)

    def _wait_or_give_up(self, rival: Presence, *, first: bool, here: BrokerAddress,
                         stopping: threading.Event) -> Survey:
        """Another coordinator serves the fleet: wait for it to go offline (a standby's first
        connection; returns what the broker holds then), or give up."""
        if first and self.config.standby:
            self._standby.set()
            _log_standby(rival, self.config.fleet)
            try:
                survey = look(here, self.topics, stop=stopping,
                              until=lambda s: self.identity.rival(s) is None)
            except LookTimeout as exc:
                raise ConnectionError(str(exc)) from exc
            if stopping.is_set():
                raise ConnectionAbortedError("stopped while on standby")
            self._standby.clear()
            log.info("the other coordinator of fleet %r is offline: taking over",
                     self.config.fleet)
            return survey
        if first:
            self._give_up(
                f"another coordinator ({rival.describe()}) serves fleet {self.config.fleet!r} "
                f"on this broker; stop it first, or start this one with --standby (standby = "
                f"true) to take over when it stops. If it crashed, its last will marks it "
                f"offline within {1.5 * KEEPALIVE_S:g} s (1.5 x keepalive)")
        else:
            self._give_up(
                f"another coordinator ({rival.describe()}) took over fleet "
                f"{self.config.fleet!r} while this one was disconnected; this one stops rather "
                f"than take the broker session back and forth")
        raise ConnectionAbortedError("another coordinator serves this fleet")

    def _check_fleet_version(self, survey: Survey) -> None:
        """Refuse a state at version 0 under a fleet the broker holds at version N > 0."""
        held = survey.version
        if not self._check_version or not held:
            return
        if self._reset:
            # Said only when it overrides something: the simulator starts every run over.
            log.warning("--reset: fleet %r starts over at version 0 in %s; the broker held it at "
                        "version %d", self.config.fleet, self.config.state_dir, held)
            return
        self._give_up(
            f"the state in {self.config.state_dir} is at version 0 (new or lost), but the "
            f"broker holds fleet {self.config.fleet!r} at version {held}: restore the state "
            f"directory {self.config.state_dir} from a backup, or start the fleet over at "
            f"version 0 with `fedasync-coordinator run --reset`")
        raise ConnectionAbortedError("the fleet is further than this state")

    def _on_coordinator_status(self, payload: bytes, retained: bool) -> None:
        """A coordinator status seen while connected. A retained one was judged before
        connecting; a live "online" of another instance means two coordinators merge the same
        updates (it uses another client id): the one serving since later gives up."""
        rival = None if retained else self.identity.rival(Presence.parse(payload))
        if rival is None:
            return
        if rival.since is not None and (rival.since, rival.instance or "") > (
                self.identity.since, self.identity.instance):
            log.warning("another coordinator (%s, client id other than %r) came online for "
                        "fleet %r; this one serves it since earlier and stays", rival.describe(),
                        self.config.mqtt_client_id, self.config.fleet)
            self._client.publish(self.topics.coordinator_status, self._presence("online"),
                                 qos=1, retain=True)
            return
        self._give_up(f"another coordinator ({rival.describe()}) serves fleet "
                      f"{self.config.fleet!r} on this broker under another client id; this one "
                      f"stops merging rather than merge the same updates twice")

    def _give_up(self, message: str) -> None:
        """Stop merging at once, and let the process end (run_until raises StateError): the
        fleet (or our client id) is another coordinator's, so is its status."""
        if self._failure is not None:
            return
        self._status_ours = False
        self._fail(StateError(message))
        self._link.stop()

    def _fail(self, error: StateError) -> None:
        if self._failure is not None:
            return
        self._failure = error
        log.error("%s", error)
        if self._on_failure is not None:
            self._on_failure()

    def _presence(self, state: str) -> bytes:
        return self.identity.presence(state, version=self.engine.version).to_json()

    # -- MQTT callbacks (paho's thread) ------------------------------------------------------
    def _on_online(self, client: mqtt.Client, session_present: bool) -> None:
        self.identity.has_served = True
        self._generation += 1
        # QoS 0 for the coordinator status: only live news of a rival counts, never one the
        # broker kept in this session while it was away (nor, with manual acks, one unacked).
        client.subscribe([(self.topics.all_updates, 1), (self.topics.all_status, 0),
                          (self.topics.coordinator_status, 0)])
        client.publish(self.topics.coordinator_status, self._presence("online"), qos=1,
                       retain=True)
        self._republish(client)  # a broker without persistence forgot them
        self.metrics.connected.set(1)

    def _republish(self, client: mqtt.Client) -> None:
        """The retained model as last published, again: template, weights, snapshot, then the
        announcement. After the snapshot on the same connection: the broker handles one
        client's packets in order, so it holds that snapshot (or a newer one) before it stores
        this announcement, which names an acknowledged, never a newer, version."""
        for topic, payload in (
                (self.topics.template, self._template[1] if isinstance(self._template, tuple)
                 and self._template_acked is not None else None),
                (self.topics.weights, self._last_weights),
                (self.topics.model, self._last_snapshot),
                (self.topics.announce, self._last_announcement)):
            if payload is not None:
                client.publish(topic, payload, qos=1, retain=True)

    def _on_offline(self) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        # Connected means able to receive: until the broker has the subscription, an update
        # published on a fresh session would go nowhere.
        if any(r.is_failure for r in reasons):
            log.error("broker refused the subscription to updates: %s", reasons)
            return
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic == self.topics.coordinator_status:
            if msg.qos > 0:  # kept by the session from an earlier QoS 1 subscription: old news
                client.ack(msg.mid, msg.qos)
                return
            self._on_coordinator_status(bytes(msg.payload), bool(msg.retain))
            return
        if self.topics.rewritten(topic):
            self._on_rewritten(client, msg)
            return
        if not self.topics.owns(topic):
            self._on_foreign(client, msg)
            return
        device = self.topics.device_of(topic, "status")
        if device is not None:  # a device checking in (synchronous rounds), and its privacy
            if msg.payload:  # empty: a retained status cleared
                status = decode_status(bytes(msg.payload))
                if self._cohorts is not None:
                    self._cohorts.observe(device, eligible_of(status))
                self._observe_privacy(device, status)
            return
        if self._failure is not None:
            return  # not ours to merge any more; unacked, the broker keeps it
        self._inbox.put(Incoming(self.topics.device_of(topic), bytes(msg.payload), self._clock(),
                                 _Token(self._generation, msg.mid, msg.qos), topic=topic))

    def _on_rewritten(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        """A message of this fleet whose topic the broker rewrote ('.' -> '/'): it cannot be
        told apart from another fleet's or device's, so it is refused (acknowledged, never
        merged: the broker would only deliver it again), loudly the first time."""
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)
        self.metrics.rejected.labels("rewritten_topic").inc()
        first, self._rewritten_seen = not self._rewritten_seen, True
        (log.error if first else log.debug)(
            "refused a message on %s: the broker turned a '.' of one of fleet %r's topic levels "
            "into '/' (RabbitMQ's MQTT plugin does). On such a broker the fleet name, the topic "
            "root and every device id must be letters, digits, '-' and '_' only "
            "(docs/brokers.md)", msg.topic, self.config.fleet)

    def _on_foreign(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        """A message on another fleet's topic: the broker session of our client id still holds
        a subscription from another configuration, or another fleet's coordinator uses our
        client id (its status names it). Never merged or answered. An update of a fleet whose
        coordinator shares the id is that coordinator's only copy: left unacknowledged (the
        broker keeps it in the session for it) and this coordinator stops. Anything else is a
        leftover subscription of this session alone (the fleet's coordinator has a session of
        its own): acknowledged, or it would hold a slot of the broker's in-flight window
        forever, and unsubscribed."""
        self._foreign += 1
        levels = msg.topic.split("/")
        owner = next((p for p in self._sharing if len(levels) > 2 and p.fleet == levels[1]),
                     None)
        if owner is not None and len(levels) == 4 and levels[2] == "update":
            self._give_up(
                f"received an update of fleet {owner.fleet!r} ({msg.topic}): its coordinator "
                f"({owner.describe()}) uses this one's client id {self.config.mqtt_client_id!r} "
                f"too, so both share one broker session. Left unacknowledged for it; this one "
                f"stops. Give one of them a client_id of its own (or leave client_id unset: it "
                f"derives from the fleet)")
            return
        if msg.qos > 0:
            client.ack(msg.mid, msg.qos)
        pattern = ("/".join([*levels[:-1], "+"]) if len(levels) == 4
                   and levels[2] in ("update", "status") else msg.topic)
        if pattern in self._foreign_seen:
            return
        self._foreign_seen.add(pattern)
        client.unsubscribe(pattern)
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
            report = from_status(status, now=self._clock())
        except BadStatus as exc:
            self.metrics.bad_status(exc.reason)
            first = device not in self._bad_status_seen
            self._bad_status_seen.add(device)
            (log.warning if first else log.debug)(
                "ignored the privacy figures of device %r's status (%s): %s; the last figures "
                "it reported stay", device, exc.reason, exc)
            return
        if report is not None and self._privacy.observe(device, report):
            log.debug("device %r reports epsilon %s of budget %s (reached: %s)", device,
                      report.epsilon, report.budget, report.reached)

    # -- writer ------------------------------------------------------------------------------
    def _writer(self) -> None:
        retry: list[Incoming] = []  # a batch whose commit failed: tried again after a wait
        while not self._stop.is_set():
            if self._monotonic() >= self._privacy_due:
                self._write_privacy()
            if retry:
                if self._stop.wait(self._commits.delay):
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
            if self._failure is not None:
                continue  # another coordinator serves the fleet: unacked, the broker keeps it
            if not self._guarded(functools.partial(self._process, batch), len(batch)):
                # Still ours, unacked, on this connection: no reconnect is needed to get it
                # again (a reconnect meanwhile makes the broker redeliver it: a duplicate).
                retry = batch if self._commits.failing and self._failure is None else []

    def _guarded(self, fn: Callable[[], None], updates: int = 0) -> bool:
        """Run one piece of the writer's work; False when it failed."""
        try:
            fn()
        except StateLost as exc:
            self._fail(exc)  # one ERROR line; run_until ends the process
            return False
        except StateError as exc:
            # Nothing of the batch was acked: the broker keeps it until it is committed.
            if self._commits.failed(str(exc)):
                if self._commits.failures == 1:
                    log.error("cannot commit to the state directory %s: %s; nothing of the "
                              "batch (%d update(s)) is acknowledged, the broker keeps it. "
                              "Retrying, backing off from %.1f s to %.0f s; /healthz says 503 "
                              "until it works", self.config.state_dir, exc, updates,
                              self._commits.first_s, self._commits.cap_s)
                else:
                    log.error("commits to the state directory %s still fail: %d attempts over "
                              "%.0f s, the last: %s", self.config.state_dir,
                              self._commits.failures, self._commits.elapsed, exc)
            return False
        except Exception:  # the service must keep serving whatever one batch does
            log.exception("unexpected error in the writer; continuing")
            return False
        recovery = self._commits.succeeded()
        if recovery is not None:
            log.warning("commits to the state directory %s resumed after %d failure(s) over "
                        "%.1f s", self.config.state_dir, recovery.failures, recovery.seconds)
        return True

    def _process(self, batch: list[Incoming]) -> None:
        started = time.perf_counter()
        before = self.engine.version
        with self._engine_lock:
            outcomes = self.engine.process(batch)
        self.metrics.observe_batch(outcomes, time.perf_counter() - started)
        for o in outcomes:
            self._send(o)
        if not self._driven:  # on a virtual clock the wait is not the coordinator's
            now = self._clock()
            for incoming in batch:
                self.metrics.ack_seconds.observe(max(0.0, now - incoming.received_at))
        self._after_change(before)

    def _write_privacy(self) -> None:
        """Record the privacy figures that changed. Not through `_guarded`: these are not
        updates, so they neither ack anything nor start or end a run of commit failures; one
        that fails is kept and tried again later. Not tried while commits fail: the disk that
        fails them fails this too, and that run of failures is logged once already."""
        self._privacy_due = self._monotonic() + PRIVACY_WRITE_S
        todo = self._privacy.unwritten()
        if self._failure is not None or self._commits.failing or not todo:
            return
        try:
            with self._engine_lock:  # one transaction at a time on the store's connection
                self.store.record_privacy(todo)
        except StateError as exc:
            self._privacy_due = self._monotonic() + PRIVACY_RETRY_S
            log.warning("could not record the privacy figures of %d device(s), kept for another "
                        "attempt in %.0f s: %s", len(todo), PRIVACY_RETRY_S, exc)
            return
        self._privacy.written(todo)

    def _tick(self) -> None:
        if self._monotonic() - self._state_checked >= 1.0:
            # Idle, no commit would notice that the state directory was deleted.
            self._state_checked = self._monotonic()
            self.store.check_present()
        before = self.engine.version
        with self._engine_lock:
            self.engine.tick()
        self._after_change(before)

    def _after_change(self, before: int) -> None:
        if self.engine.version != before:
            self.metrics.version.set(self.engine.version)
            self.metrics.devices_seen.set(self.store.devices_seen())
            self._want_snapshot()

    def _send(self, outcome: Outcome) -> None:
        # The end-to-end ack goes out before the PUBACK. In the other order a SIGKILL between
        # the two let the broker forget the update (PUBACKed) while the device never heard of
        # it: it kept it spooled until its next reconnect, maybe never (tests/
        # test_reliability.py). paho writes both packets to one FIFO, so the broker cannot get
        # the PUBACK without the ack; at worst it redelivers and the device hears "duplicate".
        # This relies on publishing without an inflight window (max_inflight=0 above): a full
        # window would hold the ack back while the PUBACK goes out.
        token = outcome.token
        if outcome.device_id is not None:
            self._track(self._client.publish(self.topics.ack(outcome.device_id),
                                             encode_ack(outcome.ack), qos=1), outcome.device_id)
        if isinstance(token, _Token) and token.qos > 0 and token.generation == self._generation:
            self._client.ack(token.mid, token.qos)

    # -- snapshots ---------------------------------------------------------------------------
    def _want_snapshot(self) -> None:
        with self._snapshot_wanted:
            self._snapshot_wanted.notify_all()

    def _snapshot_wait(self) -> float | None:
        """Seconds until a snapshot is due (0: now); None while none is wanted."""
        now = self._monotonic()
        if self.engine.version == self._sent_version and not (
                self._cohorts is not None and self._cohorts.due(self.engine.version, now)):
            return None
        # Rate limit: later versions coalesce into one snapshot.
        return max(0.0, self._last_publish + self.config.snapshots.min_interval_s - now)

    def _publisher(self) -> None:
        while not self._stop.is_set():
            with self._snapshot_wanted:
                wait = self._snapshot_wait()
                if wait is None or wait > 0:
                    self._snapshot_wanted.wait(timeout=1.0 if wait is None else min(wait, 1.0))
            if wait is None or wait > 0:
                self._republish_due()  # outside the lock: the writer notifies through it
                continue
            if self._failure is not None:  # the fleet's model is another coordinator's now
                self._stop.wait(1.0)
                continue
            if not self._link.online:
                self._note_waiting()
                self._link.wait_online(1.0)
                continue
            self._publish_newest()

    def _republish_due(self) -> None:
        """`snapshots.republish_s` after the last publication (new or repeated), the same
        again."""
        every = self.config.snapshots.republish_s
        if (every <= 0 or self._last_announcement is None or not self._link.online
                or self._failure is not None or self._monotonic() - self._last_publish < every):
            return
        self._republish(self._client)
        self._last_publish = self._monotonic()
        self.metrics.republished.inc()
        log.debug("republished the retained model of version %d", self._published_version)

    def _publish_newest(self) -> None:
        with self._engine_lock:
            version, params = self.engine.version, self.engine.params
            metrics = self.engine.metrics
        try:
            self._publish_snapshot(version, params, metrics)
        except FedAsyncError:
            log.exception("could not build the snapshot of version %d", version)
        self._last_publish = self._monotonic()
        if not self._frozen:
            # Everything alive now (numpy, scikit-learn, and skl2onnx/onnx, which the first
            # export just imported: ~135k objects) stays alive: take it out of the cyclic
            # collector's reach. Otherwise every full collection rescans it, ~40-80 ms of
            # GIL about once per 3000 updates, ~8% of the writer's time under load
            # (bench/ingest.py). Acyclic garbage is still freed by refcounting.
            gc.freeze()
            self._frozen = True

    # -- driven mode (a virtual clock) -------------------------------------------------------
    def step(self, *, timeout: float = 60.0) -> tuple[bool, frozenset[str] | None]:
        """Merge everything received so far, in a fixed order (whatever order the network
        delivered it in), close what time has completed and publish a due snapshot; return
        once the broker has acknowledged all of it. Returns whether anything happened and the
        devices that may have been sent something (acks); None: any device (a snapshot or an
        announcement)."""
        batch: list[Incoming] = []
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(self._inbox.get_nowait())
        batch.sort(key=lambda i: (i.topic, i.payload))
        before = self.engine.version
        for at in range(0, len(batch), self.config.batch_max):
            part = batch[at:at + self.config.batch_max]
            done = self._guarded(functools.partial(self._process, part), len(part))
            if not done and self._commits.failing and self._failure is None:
                for item in part:  # unacked: the next step tries it again
                    self._inbox.put(item)
        self._guarded(self._tick)
        if self._monotonic() >= self._privacy_due:  # a transaction per instant would be many
            self._write_privacy()
        published = self._snapshot_wait() == 0 and self._link.online
        if published:
            self._publish_newest()
        reached: set[str | None] = {None} if published else set()
        for info, device in self._outgoing:
            info.wait_for_publish(timeout=timeout)
            if not info.is_published():
                raise StateError(f"the broker did not acknowledge a publish in {timeout:g} s")
            reached.add(device)
        self._outgoing.clear()
        happened = bool(batch) or published or self.engine.version != before
        return happened, (None if None in reached
                          else frozenset(d for d in reached if d is not None))

    def next_due(self) -> float | None:
        """The time (on the service's clock: a driven service runs on one clock) at which
        `step` has work without a new message: a snapshot held back by the interval, a round's
        deadline; None if there is none."""
        times = [self.engine.rule.next_deadline()]
        if self.engine.version != self._sent_version:
            times.append(self._last_publish + self.config.snapshots.min_interval_s)
        if self._cohorts is not None and self._cohorts.cohort is not None:
            times.append(self._cohorts.chosen_at + self._cohorts.deadline_s)
        return min((t for t in times if t is not None), default=None)

    def _track(self, info: mqtt.MQTTMessageInfo, device: str | None = None) -> None:
        if self._driven:
            self._outgoing.append((info, device))

    def _publish_snapshot(self, version: int, params: Params, metrics: dict[str, float]) -> None:
        template = self._template_of_spec()
        onnx = b""
        if self.config.snapshots.include_onnx:
            from fedasync_iot.models.ml._onnx import (  # heavy: loaded on first use
                bake_onnx,
                export_onnx,
            )

            if self._onnx_template is not None:  # the template filled: no conversion
                onnx = bake_onnx(self._onnx_template, params)
            else:
                self._adapter.set_params_vector(params)
                onnx = export_onnx(self._adapter)
        cohort = (None if self._cohorts is None
                  else self._cohorts.for_version(version, self._monotonic()))
        snapshot = Snapshot(version=version, spec=self.config.model,
                            weights=np.asarray(params), onnx=onnx, created_at=self._clock(),
                            metrics=metrics, cohort=cohort)
        payload = self._signed(encode_snapshot(snapshot))
        weights = None
        if template is not None:
            weights = self._signed(encode_weights(WeightsMessage.of(snapshot, template[0])))
        self._last_snapshot = payload
        self._last_weights = weights
        self._sent_version = version
        announcement = encode_announcement(Announcement.of(
            payload, snapshot, weights=weights,
            template_id=None if template is None else template[0]))
        if template is not None and self._template_acked != template[0]:
            # Once per template id, before any weights that name it.
            if not self._deliver(self.topics.template, template[1]):
                return
            self._template_acked = template[0]
            log.info("published the model template %s (%d bytes)", template[0][:12],
                     len(template[1]))
        self._deliver_snapshot(version, payload, announcement, weights)

    def _signed(self, frame: bytes) -> bytes:
        return frame if self._signer is None else self._signer.sign(frame)

    def _template_of_spec(self) -> tuple[str, bytes] | None:
        """(id, published bytes) of the spec's template, made on first use (the graph depends
        only on the spec, fixed for this coordinator); None, said once, when the model cannot
        have one: then only full snapshots are published, as before."""
        if self._template is None:
            from fedasync_iot.models.ml._onnx import (
                export_template,  # skl2onnx is heavy: load on first use
            )

            try:
                made = export_template(self._adapter)
            except FedAsyncError as exc:
                log.warning("no compact snapshots (publishing full ones only): %s", exc)
                self._template = False
            else:
                message = TemplateMessage(spec=self.config.model, template=made)
                self._template = (made.id, self._signed(encode_template(message)))
                self._onnx_template = made
        return self._template if isinstance(self._template, tuple) else None

    def _deliver_snapshot(self, version: int, payload: bytes, announcement: bytes,
                          weights: bytes | None = None) -> None:
        """Publish the compact `weights` (when given) and the full snapshot until the broker
        has both (their PUBACKs): only then is the version "published", and only then is it
        announced (retained on the announce topic, where agents that fetch models on demand
        learn of it). A clean stop still hands the broker what is being published, for a few
        seconds."""
        if weights is not None and not self._deliver(self.topics.weights, weights):
            return
        if not self._deliver(self.topics.model, payload):
            return
        with self._published:
            self._published_version = version
            self._published.notify_all()
        self._last_announcement = announcement
        # QoS 1 without waiting: paho resends it after a reconnect, and _on_online
        # republishes the newest one anyway.
        self._track(self._client.publish(self.topics.announce, announcement, qos=1, retain=True))
        self.metrics.snapshots.inc()
        log.info("published snapshot of version %d (%d bytes%s)", version, len(payload),
                 "" if weights is None else f"; compact {len(weights)} bytes")

    def _deliver(self, topic: str, payload: bytes) -> bool:
        """Publish `payload` retained on `topic` until the broker acknowledges it; False when
        that stopped (after a few seconds of a clean stop, or on a failure)."""
        stopping_since: float | None = None
        while self._failure is None:
            if not self._link.online:
                if self._stop.is_set():
                    return False
                self._note_waiting()
                self._link.wait_online(1.0)
                continue
            info = self._client.publish(topic, payload, qos=1, retain=True)
            try:
                while not info.is_published():
                    if self._stop.is_set():
                        stopping_since = stopping_since or time.monotonic()
                        if time.monotonic() - stopping_since > 5.0:
                            return False
                    if self._failure is not None:
                        return False
                    info.wait_for_publish(timeout=1.0)
            except RuntimeError:
                # Handed to paho just as the connection dropped: paho sends it after the
                # reconnect, but this handle will never say so. Again once online (the same
                # version twice is harmless: agents keep the first).
                continue
            return True
        return False

    def _note_waiting(self) -> None:
        """Say once per version that its snapshot waits, when the broker cannot be reached
        (not during an ordinary start-up, nor on standby)."""
        link = self._link.info()
        version = self.engine.version
        if self._waiting_noted == version or not (link["attempts"]
                                                  or link["state"] == "disconnected"):
            return
        self._waiting_noted = version
        log.info("snapshot of version %d waits for the broker at %s (%s)", version,
                 link["broker"], link["last_error"])

    # -- operations --------------------------------------------------------------------------
    def rollback(self, to_version: int) -> Rollback:
        """Roll back (durably), then wait a little for the broker to have the new version, and
        say whether it does: the operator must not read "published" while the broker is down."""
        with self._engine_lock:
            version = self.engine.rollback(to_version)
        self._after_change(version - 1)
        deadline = self._monotonic() + self.config.snapshots.min_interval_s + ROLLBACK_WAIT_S
        with self._published:
            while (self._published_version < version and self._link.online
                   and self._failure is None and self._monotonic() < deadline):
                self._published.wait(0.2)
        if self._published_version >= version:
            return Rollback(version, published=True)
        link = self._link.info()
        why = (f"the broker at {link['broker']} is not reachable ({link['last_error']})"
               if not self._link.online else
               f"the broker had not acknowledged it after {ROLLBACK_WAIT_S:g} s")
        return Rollback(version, published=False,
                        detail=f"{why}; the service publishes it once the broker has it")

    def health(self) -> tuple[bool, str | None]:
        """Whether this coordinator serves its fleet now (/healthz), and if not, why."""
        if self._failure is not None:
            return False, str(self._failure)
        if self._standby.is_set():
            return False, "standby: another coordinator serves the fleet"
        if self._commits.failing:
            return False, (f"commits to the state directory {self.config.state_dir} failing "
                           f"for {self._commits.elapsed:.0f} s ({self._commits.failures} "
                           f"attempts): {self._commits.cause}")
        if not self._connected.is_set():
            link = self._link.info()
            return False, (f"not connected to the broker {link['broker']} ({link['state']}"
                           + (f": {link['last_error']})" if link["last_error"] else ")"))
        return True, None

    def status(self) -> dict[str, Any]:
        e = self.engine
        ok, reason = self.health()
        return {
            "fleet": self.config.fleet,
            "state": self._state(),
            "healthy": ok,
            "reason": reason,
            "commit_failures": self._commits.failures,  # in a row, now
            "connection": self._link.info(),
            "instance": {"id": self.identity.instance, "host": HOST, "pid": os.getpid(),
                         "since": round(self.identity.since, 3),
                         "client_id": self.config.mqtt_client_id},
            "version": e.version,
            "published_version": self._published_version,
            "metrics": e.metrics,
            "rule": self.config.rule.name,
            "pending": len(e.rule.pending()),
            "privacy": privacy_status(e.rule),  # central DP's (epsilon, delta), or null
            "devices_seen": self.store.devices_seen(),
            "counts": self.metrics.counts(),
            "participation": self.engine.ledger.report(now=self._clock()).summary(),
            "uptime_s": round(self._clock() - self._started_at, 1),
            "foreign_messages": self._foreign,
        }

    def _state(self) -> str:
        if self._failure is not None:
            return "failed" if self._status_ours else "refused"
        if self._standby.is_set():
            return "standby"
        if self._commits.failing:
            return "degraded"
        return "online" if self._connected.is_set() else "connecting"

    def devices(self) -> dict[str, Any]:
        """The participation report: the fairness summary and one row per device seen, with
        the local privacy each device reports."""
        return with_local_privacy(self.engine.ledger.report(now=self._clock()).to_dict(),
                                  self._privacy.latest())


# The writer records changed privacy figures (one small transaction) at most this often, and
# after a failure waits longer: a full disk shows in the updates' commits already.
PRIVACY_WRITE_S = 1.0
PRIVACY_RETRY_S = 30.0
ROLLBACK_WAIT_S = 10.0  # for the broker's PUBACK of a rolled-back snapshot, beyond the interval


def _log_standby(rival: Presence, fleet: str) -> None:
    log.info("standby: another coordinator (%s) serves fleet %r on this broker; waiting for it "
             "to go offline (a clean stop says so at once, a crash after %g s, when its last "
             "will fires)", rival.describe(), fleet, 1.5 * KEEPALIVE_S)


def wait_as_standby(config: CoordinatorConfig, stop: threading.Event) -> bool:
    """`run --standby`: wait, before the state directory is even opened (a standby may share
    it), until no other live coordinator serves the fleet. True to go on, False if `stop` came
    first. An unreachable broker is retried with backoff, each failure logged with its reason;
    the service's own check before connecting follows (one coordinator may still beat us)."""
    address = BrokerAddress.parse(config.broker, ca_file=config.ca_file,
                                  cert_file=config.cert_file, key_file=config.key_file)
    topics = Topics(config.fleet, config.topic_root)
    identity = Identity(config.fleet)
    announced: list[Presence] = []

    def free(status: Presence | None) -> bool:
        rival = identity.rival(status)
        if rival is not None and not announced:
            announced.append(rival)
            _log_standby(rival, config.fleet)
        return rival is None

    candidates = address.candidates()  # with several URLs: each in turn, as the service does
    delay, failures = 1.0, 0
    while not stop.is_set():
        here = candidates[failures % len(candidates)]
        try:
            look(here, topics, stop=stop, until=free)
        except LookTimeout:
            return True  # the service's own check says why, and connects anyway
        except OSError as exc:
            failures += 1
            log.warning("cannot connect to %s: %s; next attempt in %.1f s (%d failed so far)",
                        here.redacted(), describe_error(exc, here), delay, failures)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
            continue
        if announced and not stop.is_set():
            log.info("the other coordinator of fleet %r is offline: taking over", config.fleet)
        return not stop.is_set()
    return False
