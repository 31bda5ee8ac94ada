"""The long-running coordinator: MQTT at the edges, the engine in the middle.

Threads: paho's network loop (queues incoming updates), the writer (batches, commits, then
PUBACKs and sends end-to-end acks), the snapshot publisher (exports ONNX off the hot path,
coalescing versions) and the HTTP server (metrics, status, rollback).

An update is PUBACKed only after its batch is committed. Until then the broker keeps it in our
persistent session and redelivers it after a crash; the engine recognises it by update_id.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import paho.mqtt.client as mqtt

from coordinator._cohort import CohortSelector, parse_status
from coordinator._config import CoordinatorConfig
from coordinator._engine import Engine, Evaluator, Incoming, Outcome
from coordinator._http import StatusServer
from coordinator._metrics import Metrics
from coordinator._rules import build_rule
from coordinator._store import Params, Store
from models import FedAsyncError, StateError, Topics, build_model
from models._mqtt import BrokerAddress, make_client
from models._signing import Signer
from models._wire import Snapshot, encode_ack, encode_snapshot

log = logging.getLogger("fedasync.coordinator")


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
    ) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.topic_root)
        self.address = BrokerAddress.parse(config.broker, ca_file=config.ca_file,
                                           cert_file=config.cert_file, key_file=config.key_file)
        self.metrics = Metrics()
        self._signer = (Signer.from_file(config.signing_key) if config.signing_key else None)
        self._adapter = build_model(config.model)
        self.store = Store(Path(config.state_dir), keep_checkpoints=config.keep_checkpoints)
        self.engine = Engine(
            self.store, build_rule(config.rule), config.guards, spec=config.model,
            initial_params=self._adapter.get_params_vector, evaluator=evaluator,
            eval_every=config.evaluation.every, max_message_bytes=config.max_message_bytes,
            participation=config.participation, clock=clock)
        self.metrics.watch_participation(lambda: self.engine.ledger.report(now=clock()))
        self.metrics.version.set(self.engine.version)
        self.metrics.devices_seen.set(self.store.devices_seen())
        # SimpleQueue: C-implemented, ~25x cheaper per put/get than Queue (1 us), twice per update.
        self._inbox: queue.SimpleQueue[Incoming] = queue.SimpleQueue()
        self._engine_lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._generation = 0  # bumps on every (re)connect: a mid is only valid in its connection
        self._snapshot_wanted = threading.Condition()
        self._published_version = -1
        rule = config.rule
        self._cohorts = (CohortSelector(rule.cohort_size, rule.over_selection, rule.deadline_s)
                         if rule.name == "fedavg-sync" else None)
        self._last_snapshot: bytes | None = None
        self._threads: list[threading.Thread] = []
        self._http: StatusServer | None = None
        self._started_at = clock()
        self._client = make_client(self.address, client_id=config.client_id, persistent=True,
                                   manual_ack=True, max_inflight=0)
        # max_inflight is paho's window for what *we* publish (acks, snapshots), not how many
        # updates the broker sends us (that is the broker's max_inflight_messages). 0 means no
        # window: with one, paho rescans every outgoing message on each PUBACK it receives
        # (Client._update_inflight), quadratic in the acks of a batch; that was ~5% of the CPU
        # (fleet/_bench_ingest.py). Memory is the same either way: paho keeps every unacked
        # QoS 1 publish until its PUBACK, in or out of the window.
        self._client.will_set(self.topics.coordinator_status, self._status_payload("offline"),
                              qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        log.info("coordinator for fleet %r at version %d, rule %s, broker %s",
                 self.config.fleet, self.engine.version, self.config.rule.name,
                 self.address.redacted())
        for target, name in ((self._writer, "writer"), (self._publisher, "snapshots")):
            t = threading.Thread(target=target, name=f"coordinator-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.config.http_address is not None:
            self._http = StatusServer(self.config.http_address, self)
            self._http.start()
            log.info("metrics and status on http://%s:%d/", *self._http.address)
        self._client.connect_async(self.address.host, self.address.port, keepalive=30)
        self._client.loop_start()
        self._want_snapshot()

    def stop(self) -> None:
        self._stop.set()
        with self._snapshot_wanted:
            self._snapshot_wanted.notify_all()
        for t in self._threads:
            t.join(timeout=10)
        if self._http is not None:
            self._http.stop()
        if self._connected.is_set():
            self._client.publish(self.topics.coordinator_status,
                                 self._status_payload("offline"), qos=1,
                                 retain=True).wait_for_publish(timeout=2)
        self._client.disconnect()
        self._client.loop_stop()
        self.store.close()
        log.info("coordinator stopped at version %d", self.engine.version)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.address[1]

    # -- MQTT callbacks (paho's thread) ------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self._generation += 1
        client.subscribe([(self.topics.all_updates, 1), (self.topics.all_status, 0)])
        client.publish(self.topics.coordinator_status, self._status_payload("online"), qos=1,
                       retain=True)
        if self._last_snapshot is not None:  # a broker without persistence forgot it
            client.publish(self.topics.model, self._last_snapshot, qos=1, retain=True)
        self.metrics.connected.set(1)
        log.info("connected to %s (session present: %s)", self.address.redacted(),
                 flags.session_present)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        # Connected means able to receive: until the broker has the subscription, an update
        # published on a fresh session would go nowhere.
        if any(r.is_failure for r in reasons):
            log.error("broker refused the subscription to updates: %s", reasons)
            return
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        self.metrics.connected.set(0)
        if not self._stop.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        device = self.topics.device_of(msg.topic, "status")
        if device is not None:  # a device checking in; only synchronous rounds use it
            if self._cohorts is not None:
                self._cohorts.observe(device, parse_status(bytes(msg.payload)))
            return
        self._inbox.put(Incoming(self.topics.device_of(msg.topic), bytes(msg.payload),
                                 time.time(), _Token(self._generation, msg.mid, msg.qos)))

    # -- writer ------------------------------------------------------------------------------
    def _writer(self) -> None:
        while not self._stop.is_set():
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
            self._guarded(functools.partial(self._process, batch))

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except StateError:
            # Nothing of the batch was acked: reconnecting makes the broker redeliver it.
            log.exception("could not make the batch durable; reconnecting to get it again")
            self._client.reconnect()
        except Exception:  # the service must keep serving whatever one batch does
            log.exception("unexpected error in the writer; continuing")

    def _process(self, batch: list[Incoming]) -> None:
        started = time.perf_counter()
        before = self.engine.version
        with self._engine_lock:
            outcomes = self.engine.process(batch)
        self.metrics.observe_batch(outcomes, time.perf_counter() - started)
        for o in outcomes:
            self._send(o)
        self._after_change(before)

    def _tick(self) -> None:
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
            self._client.publish(self.topics.ack(outcome.device_id), encode_ack(outcome.ack),
                                 qos=1)
        if isinstance(token, _Token) and token.qos > 0 and token.generation == self._generation:
            self._client.ack(token.mid, token.qos)

    # -- snapshots ---------------------------------------------------------------------------
    def _want_snapshot(self) -> None:
        with self._snapshot_wanted:
            self._snapshot_wanted.notify_all()

    def _publisher(self) -> None:
        last_publish = 0.0
        frozen = False
        while not self._stop.is_set():
            with self._snapshot_wanted:
                if self.engine.version == self._published_version and not (
                        self._cohorts is not None and self._cohorts.due(
                            self.engine.version, time.monotonic())):
                    self._snapshot_wanted.wait(timeout=1.0)
                    continue
                wait = last_publish + self.config.snapshots.min_interval_s - time.monotonic()
                if wait > 0:  # rate limit: later versions coalesce into one snapshot
                    self._snapshot_wanted.wait(timeout=wait)
                    continue
            with self._engine_lock:
                version, params = self.engine.version, self.engine.params
                metrics = self.engine.metrics
            try:
                self._publish_snapshot(version, params, metrics)
            except FedAsyncError:
                log.exception("could not build the snapshot of version %d", version)
            last_publish = time.monotonic()
            if not frozen:
                # Everything alive now (numpy, scikit-learn, and skl2onnx/onnx, which the first
                # export just imported: ~135k objects) stays alive: take it out of the cyclic
                # collector's reach. Otherwise every full collection rescans it, ~40-80 ms of
                # GIL about once per 3000 updates, ~8% of the writer's time under load
                # (fleet/_bench_ingest.py). Acyclic garbage is still freed by refcounting.
                gc.freeze()
                frozen = True

    def _publish_snapshot(self, version: int, params: Params, metrics: dict[str, float]) -> None:
        onnx = b""
        if self.config.snapshots.include_onnx:
            from models._onnx import export_onnx  # skl2onnx is heavy: load on first use

            self._adapter.set_params_vector(params)
            onnx = export_onnx(self._adapter)
        cohort = (None if self._cohorts is None
                  else self._cohorts.for_version(version, time.monotonic()))
        payload = encode_snapshot(Snapshot(version=version, spec=self.config.model,
                                           weights=np.asarray(params), onnx=onnx,
                                           created_at=time.time(), metrics=metrics,
                                           cohort=cohort))
        if self._signer is not None:
            payload = self._signer.sign(payload)
        self._last_snapshot = payload
        self._client.publish(self.topics.model, payload, qos=1, retain=True)
        self._published_version = version
        self.metrics.snapshots.inc()
        log.info("published snapshot of version %d (%d bytes)", version, len(payload))

    # -- operations --------------------------------------------------------------------------
    def rollback(self, to_version: int) -> int:
        with self._engine_lock:
            version = self.engine.rollback(to_version)
        self._after_change(version - 1)
        return version

    def status(self) -> dict[str, Any]:
        e = self.engine
        return {
            "fleet": self.config.fleet,
            "state": "online" if self._connected.is_set() else "connecting",
            "version": e.version,
            "published_version": self._published_version,
            "metrics": e.metrics,
            "rule": self.config.rule.name,
            "pending": len(e.rule.pending()),
            "devices_seen": self.store.devices_seen(),
            "counts": self.metrics.counts(),
            "participation": self.engine.ledger.report(now=time.time()).summary(),
            "uptime_s": round(time.time() - self._started_at, 1),
        }

    def devices(self) -> dict[str, Any]:
        """The participation report: the fairness summary and one row per device seen."""
        return self.engine.ledger.report(now=time.time()).to_dict()

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "fleet": self.config.fleet,
                           "time": time.time()}).encode()

