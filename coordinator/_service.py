"""The long-running coordinator: MQTT at the edges, the engine in the middle.

A thin service composing its parts: the intake (coordinator/_intake.py: incoming messages, the
writer that merges them and acks), the publisher (coordinator/_publisher.py: snapshots), the
fleet lease (coordinator/_lease.py: one coordinator per fleet and broker), the one MQTT client
they share (coordinator/_transport.py) and the HTTP server (metrics, status, rollback). Who
runs the writer and the publisher, and on which clock, is the scheduler's and the clock's
business (coordinator/_scheduling.py): threads and wall time in production, the simulator's
virtual clock's steps there.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from fedasync_iot.coordinator._central_dp import privacy_status, with_central_dp
from fedasync_iot.coordinator._cohort import CohortSelector
from fedasync_iot.coordinator._config import CoordinatorConfig
from fedasync_iot.coordinator._control import service_token
from fedasync_iot.coordinator._device_privacy import with_local_privacy
from fedasync_iot.coordinator._engine import Engine, Evaluator, Incoming
from fedasync_iot.coordinator._http import Rollback, StatusServer
from fedasync_iot.coordinator._identity import HOST, Identity
from fedasync_iot.coordinator._intake import Intake
from fedasync_iot.coordinator._lease import KEEPALIVE_S, FleetLease
from fedasync_iot.coordinator._metrics import Metrics
from fedasync_iot.coordinator._publisher import Publisher
from fedasync_iot.coordinator._rules import build_rule
from fedasync_iot.coordinator._scheduling import Clock, Scheduler, Threads, WallClock
from fedasync_iot.coordinator._store import Store
from fedasync_iot.coordinator._transport import Handler, ReceivedWatcher, SentWatcher, Transport
from fedasync_iot.models import (
    Backoff,
    BrokerAddress,
    Client,
    Connection,
    KeptSubscription,
    Message,
    PacketAck,
    Publication,
    Signer,
    StateError,
    Topics,
    build_model,
    create_client,
)

log = logging.getLogger("fedasync.coordinator")

# A refused subscription to updates is asked again (models._kept); NATS refuses when it cannot
# create the JetStream consumer in time.
SUBSCRIBE_BACKOFF = Backoff(1.0, 30.0)

ROLLBACK_WAIT_S = 10.0  # for the broker's PUBACK of a rolled-back snapshot, beyond the interval


class CoordinatorService:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        evaluator: Evaluator | None = None,
        clock: Clock | None = None,
        scheduler: Scheduler | None = None,
        reset: bool = False,
    ) -> None:
        """`clock`: the wall clock unless given; `scheduler`: the writer and the publisher on
        threads unless given (`Stepped`: whoever drives the service calls its `step`).
        `reset` (`run --reset`): a state at version 0 serves the fleet even when the broker
        holds it at a later version (else the look before connecting refuses)."""
        self.config = config
        self._clock = clock or WallClock()
        self._scheduler = scheduler or Threads()
        self.topics = Topics(config.fleet, config.topic_root)
        self.address = BrokerAddress.parse(config.broker, ca_file=config.ca_file,
                                           cert_file=config.cert_file, key_file=config.key_file)
        self.metrics = Metrics()
        # Key and model before the store takes the state directory's lock: a bad key refuses
        # with nothing held.
        signer = Signer.from_file(config.signing_key) if config.signing_key else None
        adapter = build_model(config.model)
        self.store = Store(Path(config.state_dir), keep_checkpoints=config.keep_checkpoints)
        now = self._clock.time
        self.engine = Engine(
            self.store, with_central_dp(build_rule(config.rule), config.central_dp,
                                        self.store.lineage), config.guards, spec=config.model,
            initial_params=adapter.get_params_vector, evaluator=evaluator,
            eval_every=config.evaluation.every, max_message_bytes=config.max_message_bytes,
            participation=config.participation, clock=now)
        self.metrics.watch_participation(lambda: self.engine.ledger.report(now=now()))
        self.metrics.version.set(self.engine.version)
        self.metrics.devices_seen.set(self.store.devices_seen())
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._http: StatusServer | None = None
        self._started_at = now()
        self.identity = Identity(config.fleet, client_id=config.mqtt_client_id, clock=now)
        client = create_client(self.address, client_id=config.mqtt_client_id,
                             persistent=True, manual_ack=True, max_inflight=0)
        # max_inflight is paho's window for what *we* publish (acks, snapshots), not how many
        # updates the broker sends us (that is the broker's max_inflight_messages). 0 means no
        # window: with one, paho rescans every outgoing message on each PUBACK it receives
        # (Client._update_inflight), quadratic in the acks of a batch; that was ~5% of the CPU
        # (bench/ingest.py). Memory is the same either way: paho keeps every unacked
        # QoS 1 publish until its PUBACK, in or out of the window.
        self._transport = Transport(client)
        self._lease = FleetLease(
            config, self.topics, self.identity, version=lambda: self.engine.version,
            publish=self._publish_retained, reset=reset)
        client.will_set(self.topics.coordinator_status, self._lease.presence("offline"), qos=1,
                        retain=True)
        self._link = Connection(client, self.address, logger=log, keepalive=KEEPALIVE_S,
                                max_delay_s=30.0, on_online=self._on_online,
                                on_offline=self._on_offline)
        self._lease.attach(self._link)
        rule = config.rule
        cohorts = (CohortSelector(rule.cohort_size, rule.over_selection, rule.deadline_s)
                   if rule.name == "fedavg-sync" else None)
        engine_lock = threading.Lock()
        self._engine_lock = engine_lock
        self._publisher = Publisher(
            config, engine=self.engine, engine_lock=engine_lock, adapter=adapter, signer=signer,
            transport=self._transport, link=self._link, lease=self._lease, metrics=self.metrics,
            clock=self._clock, cohorts=cohorts, stop=self._stop)
        self._intake = Intake(
            config, engine=self.engine, engine_lock=engine_lock, store=self.store,
            transport=self._transport, lease=self._lease, metrics=self.metrics,
            clock=self._clock, cohorts=cohorts, stop=self._stop,
            on_new_version=self._publisher.want, merge=self._process)
        client.gate = self._lease.gate
        # QoS 0 for the coordinator status: only live news of a rival counts, never one the
        # broker kept in this session while it was away (nor, with manual acks, one unacked).
        # Connected means able to receive: until the broker grants the subscription, an update
        # published on a fresh session would go nowhere.
        self._subscription = KeptSubscription(
            client, [(self.topics.all_updates, 1), (self.topics.all_status, 0),
                     (self.topics.coordinator_status, 0)],
            backoff=SUBSCRIBE_BACKOFF, on_refused=self._updates_refused,
            on_granted=lambda _refusals: self._connected.set(),
            active=lambda: self._link.online and not self._stop.is_set())
        client.on_acked = self._subscription.acked
        client.handle(self._on_message)

    # -- what a scheduler runs (coordinator/_scheduling.py's Work) --------------------------
    @property
    def intake(self) -> Intake:
        return self._intake

    @property
    def publisher(self) -> Publisher:
        return self._publisher

    # -- watching and extending the traffic (the simulator) ----------------------------------
    def watch_traffic(self, *, sent: SentWatcher | None = None,
                      received: ReceivedWatcher | None = None) -> None:
        """See every message this coordinator publishes (`sent(topic, payload, delivery)`) and
        receives (`received(topic, payload)`). Before `start`, to miss nothing."""
        if sent is not None:
            self._transport.watch_sent(sent)
        if received is not None:
            self._transport.watch_received(received)

    def add_handler(self, topic_filter: str, handler: Handler, *, qos: int = 0) -> None:
        """Subscribe this coordinator's connection to `topic_filter` too and hand its messages
        to `handler(topic, payload)`, on the network thread: ordered after everything the
        broker queued for this connection before them."""
        self._transport.add_handler(topic_filter, handler, qos=qos)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        log.info("coordinator for fleet %r at version %d, rule %s, broker %s, client id %s",
                 self.config.fleet, self.engine.version, self.config.rule.name,
                 self.address.redacted(), self.config.mqtt_client_id)
        address = self.config.http_address
        if address is not None:
            # First, before anything runs: a port another process holds (a second coordinator
            # beside the first) stops this one with one line. The store holds the state
            # directory's lock by now, so a token generated here cannot replace the file of
            # another running coordinator.
            try:
                self._http = StatusServer(address, self, token=service_token(self.config),
                                          registry=self.metrics.registry, lock=self.store.lock)
            except OSError as exc:
                raise StateError(f"cannot serve metrics and status on {self.config.http} "
                                 f"({exc.strerror or exc}): another process (a second "
                                 "coordinator?) holds it; set http to a free HOST:PORT, or "
                                 "\"\" to turn it off") from exc
        self.identity.register()
        self._scheduler.start(self)
        if self._http is not None:
            self._http.start()
            log.info("metrics and status on http://%s:%d/", *self._http.address)
        self._link.start()
        self._publisher.want()

    def stop(self) -> None:
        self._stop.set()
        self._publisher.want()
        self._scheduler.join(timeout=10)
        self._intake.write_privacy()  # the writer is done: what it had not written yet
        if self._http is not None:
            self._http.stop()
        # The state directory's lock goes before "offline" is said: a standby that takes over
        # on hearing it may open the same directory at once.
        self.store.close()
        self.identity.unregister()
        if self._link.online and self._lease.ours:
            self._publish_retained(self.topics.coordinator_status,
                                   self._lease.presence("offline")).wait_for_publish(timeout=2)
        self._link.stop()
        log.info("coordinator stopped at version %d", self.engine.version)

    def run_until(self, stop: threading.Event) -> None:
        """Start, serve until `stop` is set, stop. Raises StateError (after stopping) when this
        coordinator had to give up: another one serves the fleet on this broker (or uses its
        client id), or its state directory is gone."""
        self._lease.on_failure = stop.set
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
        if self._lease.failure is not None:
            raise self._lease.failure

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def failure(self) -> StateError | None:
        """Why this coordinator gave up (another one serves the fleet), or None."""
        return self._lease.failure

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.address[1]

    def _publish_retained(self, topic: str, payload: bytes) -> Publication:
        return self._transport.publish(topic, payload, qos=1, retain=True)

    def _process(self, batch: list[Incoming]) -> None:
        """Merge one batch and ack it: the writer's each batch (a subclass may watch them:
        bench/ingest.py counts their sizes)."""
        self._intake.process(batch)

    # -- MQTT callbacks (the client's thread) ------------------------------------------------------
    def _on_online(self, client: Client, session_present: bool) -> None:
        self.identity.has_served = True
        self._intake.generation += 1
        self._subscription.subscribe()
        self._publish_retained(self.topics.coordinator_status, self._lease.presence("online"))
        self._publisher.republish()  # a broker without persistence forgot them
        self.metrics.connected.set(1)

    def _on_offline(self) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)

    def _updates_refused(self, ack: PacketAck, delay: float) -> None:
        log.error("broker refused the subscription to updates (%s): nothing can arrive; asking "
                  "again in %.1f s (refusal %d)", ", ".join(ack.refused), delay,
                  self._subscription.refusals)

    def _on_message(self, msg: Message) -> None:
        if not self._transport.received(msg):
            self._intake.on_message(msg)

    # -- operations --------------------------------------------------------------------------
    def rollback(self, to_version: int) -> Rollback:
        """Roll back (durably), then wait a little for the broker to have the new version, and
        say whether it does: the operator must not read "published" while the broker is down."""
        with self._engine_lock:
            version = self.engine.rollback(to_version)
        self._intake.after_change(version - 1)
        deadline = (self._clock.monotonic() + self.config.snapshots.min_interval_s
                    + ROLLBACK_WAIT_S)
        if self._publisher.wait_published(version, deadline=deadline):
            return Rollback(version, published=True)
        link = self._link.info()
        why = (f"the broker at {link['broker']} is not reachable ({link['last_error']})"
               if not self._link.online else
               f"the broker had not acknowledged it after {ROLLBACK_WAIT_S:g} s")
        return Rollback(version, published=False,
                        detail=f"{why}; the service publishes it once the broker has it")

    def health(self) -> tuple[bool, str | None]:
        """Whether this coordinator serves its fleet now (/healthz), and if not, why."""
        commits = self._intake.commits
        if self._lease.failure is not None:
            return False, str(self._lease.failure)
        if self._lease.standby.is_set():
            return False, "standby: another coordinator serves the fleet"
        if commits.failing:
            return False, (f"commits to the state directory {self.config.state_dir} failing "
                           f"for {commits.elapsed:.0f} s ({commits.failures} "
                           f"attempts): {commits.cause}")
        if not self._connected.is_set():
            if self._subscription.refusals:
                return False, (f"the broker refused the subscription to updates "
                               f"({self._subscription.refusals} time(s)); asking again")
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
            "commit_failures": self._intake.commits.failures,  # in a row, now
            "connection": self._link.info(),
            "instance": {"id": self.identity.instance, "host": HOST, "pid": os.getpid(),
                         "since": round(self.identity.since, 3),
                         "client_id": self.config.mqtt_client_id},
            "version": e.version,
            "published_version": self._publisher.published_version,
            "metrics": e.metrics,
            "rule": self.config.rule.name,
            "pending": len(e.rule.pending()),
            "privacy": privacy_status(e.rule),  # central DP's (epsilon, delta), or null
            "devices_seen": self.store.devices_seen(),
            "counts": self.metrics.counts(),
            "participation": self.engine.ledger.report(now=self._clock.time()).summary(),
            "uptime_s": round(self._clock.time() - self._started_at, 1),
            "foreign_messages": self._intake.foreign,
        }

    def _state(self) -> str:
        if self._lease.failure is not None:
            return "failed" if self._lease.ours else "refused"
        if self._lease.standby.is_set():
            return "standby"
        if self._intake.commits.failing:
            return "degraded"
        return "online" if self._connected.is_set() else "connecting"

    def devices(self) -> dict[str, Any]:
        """The participation report: the fairness summary and one row per device seen, with
        the local privacy each device reports."""
        return with_local_privacy(self.engine.ledger.report(now=self._clock.time()).to_dict(),
                                  self._intake.privacy.latest())
