"""Snapshot publishing: the newest version, retained, for the fleet (docs/architecture.md).

Exports ONNX off the writer's path and coalesces versions (`snapshots.min_interval_s`). Per
version: the compact weights and the full snapshot, each published until the broker has it
(PUBACK), and only then the retained announcement that names them; the spec's template once per
template id before any weights that name it. Everything signed when a key is configured.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from fedasync_iot.coordinator._cohort import CohortSelector
from fedasync_iot.coordinator._config import CoordinatorConfig
from fedasync_iot.coordinator._engine import Engine
from fedasync_iot.coordinator._lease import FleetLease
from fedasync_iot.coordinator._metrics import Metrics
from fedasync_iot.coordinator._scheduling import Clock
from fedasync_iot.coordinator._store import Params
from fedasync_iot.coordinator._transport import Transport
from fedasync_iot.models import (
    Announcement,
    Connection,
    FedAsyncError,
    OnnxTemplate,
    PublishFailed,
    Signer,
    Snapshot,
    TemplateMessage,
    Topics,
    WeightsMessage,
    encode_announcement,
    encode_snapshot,
    encode_template,
    encode_weights,
)

if TYPE_CHECKING:
    from fedasync_iot.models import ModelAdapter

log = logging.getLogger("fedasync.coordinator")


class Publisher:
    """The retained model of the fleet: what was last published, and the loop that publishes
    the next version (`run`, on a thread, or `publish_if_due`, stepped)."""

    def __init__(self, config: CoordinatorConfig, *, engine: Engine, engine_lock: threading.Lock,
                 adapter: ModelAdapter, signer: Signer | None, transport: Transport,
                 link: Connection, lease: FleetLease, metrics: Metrics, clock: Clock,
                 cohorts: CohortSelector | None, stop: threading.Event) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.topic_root)
        self._engine = engine
        self._engine_lock = engine_lock
        self._adapter = adapter
        self._transport = transport
        self._link = link
        self._lease = lease
        self._metrics = metrics
        self._clock = clock
        self._cohorts = cohorts
        self._stop = stop
        self._signer = signer
        self._wanted = threading.Condition()
        self._last_publish = -float("inf")  # monotonic
        self._frozen = False
        self.published_version = -1  # the newest the broker acknowledged
        self._published = threading.Condition()  # notified when published_version moves
        self._sent_version = -1  # the newest handed to the broker
        self._waiting_noted = -1
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

    # -- when -------------------------------------------------------------------------------
    def want(self) -> None:
        """A new version (or a stop): look again at what is due."""
        with self._wanted:
            self._wanted.notify_all()

    def _wait(self) -> float | None:
        """Seconds until a snapshot is due (0: now); None while none is wanted."""
        now = self._clock.monotonic()
        if self._engine.version == self._sent_version and not (
                self._cohorts is not None and self._cohorts.due(self._engine.version, now)):
            return None
        # Rate limit: later versions coalesce into one snapshot.
        return max(0.0, self._last_publish + self.config.snapshots.min_interval_s - now)

    def next_due(self) -> float | None:
        """When a snapshot held back by the interval, or a cohort's deadline, is due."""
        times = []
        if self._engine.version != self._sent_version:
            times.append(self._last_publish + self.config.snapshots.min_interval_s)
        if self._cohorts is not None and self._cohorts.cohort is not None:
            times.append(self._cohorts.chosen_at + self._cohorts.deadline_s)
        return min(times, default=None)

    def run(self) -> None:
        """The publisher thread, until the service stops."""
        while not self._stop.is_set():
            with self._wanted:
                wait = self._wait()
                if wait is None or wait > 0:
                    self._wanted.wait(timeout=1.0 if wait is None else min(wait, 1.0))
            if wait is None or wait > 0:
                self._republish_due()  # outside the lock: the writer notifies through it
                continue
            if self._lease.failure is not None:  # the fleet's model is another coordinator's
                self._stop.wait(1.0)
                continue
            if not self._link.online:
                self._note_waiting()
                self._link.wait_online(1.0)
                continue
            self._publish_newest()

    def publish_if_due(self) -> bool:
        """Stepped: publish the newest version now if it is due and the broker is reachable."""
        if self._wait() == 0 and self._link.online:
            self._publish_newest()
            return True
        return False

    def wait_published(self, version: int, *, deadline: float) -> bool:
        """Until the broker has `version` (or a newer one), the link drops, the lease fails or
        the monotonic `deadline` passes; whether it has it."""
        with self._published:
            while (self.published_version < version and self._link.online
                   and self._lease.failure is None and self._clock.monotonic() < deadline):
                self._published.wait(0.2)
        return self.published_version >= version

    # -- again ------------------------------------------------------------------------------
    def _republish_due(self) -> None:
        """`snapshots.republish_s` after the last publication (new or repeated), the same
        again."""
        every = self.config.snapshots.republish_s
        if (every <= 0 or self._last_announcement is None or not self._link.online
                or self._lease.failure is not None
                or self._clock.monotonic() - self._last_publish < every):
            return
        self.republish()
        self._last_publish = self._clock.monotonic()
        self._metrics.republished.inc()
        log.debug("republished the retained model of version %d", self.published_version)

    def republish(self) -> None:
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
                self._transport.publish(topic, payload, qos=1, retain=True)

    # -- what -------------------------------------------------------------------------------
    def _publish_newest(self) -> None:
        with self._engine_lock:
            version, params = self._engine.version, self._engine.params
            metrics = self._engine.metrics
        try:
            self._publish_snapshot(version, params, metrics)
        except FedAsyncError:
            log.exception("could not build the snapshot of version %d", version)
        self._last_publish = self._clock.monotonic()
        if not self._frozen:
            # Everything alive now (numpy, scikit-learn, and skl2onnx/onnx, which the first
            # export just imported: ~135k objects) stays alive: take it out of the cyclic
            # collector's reach. Otherwise every full collection rescans it, ~40-80 ms of
            # GIL about once per 3000 updates, ~8% of the writer's time under load
            # (bench/ingest.py). Acyclic garbage is still freed by refcounting.
            gc.freeze()
            self._frozen = True

    def _publish_snapshot(self, version: int, params: Params, metrics: dict[str, float]) -> None:
        template = self._template_of_spec()
        onnx = b""
        if self.config.snapshots.include_onnx:
            from fedasync_iot.models import bake_onnx, export_onnx

            if self._onnx_template is not None:  # the template filled: no conversion
                onnx = bake_onnx(self._onnx_template, params)
            else:
                self._adapter.set_params_vector(params)
                onnx = export_onnx(self._adapter)
        cohort = (None if self._cohorts is None
                  else self._cohorts.for_version(version, self._clock.monotonic()))
        snapshot = Snapshot(version=version, spec=self.config.model,
                            weights=np.asarray(params), onnx=onnx,
                            created_at=self._clock.time(), metrics=metrics, cohort=cohort)
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
            from fedasync_iot.models import export_template

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

    # -- to the broker ----------------------------------------------------------------------
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
            self.published_version = version
            self._published.notify_all()
        self._last_announcement = announcement
        # QoS 1 without waiting: paho resends it after a reconnect, and the service republishes
        # the newest one on every connection anyway.
        self._transport.publish(self.topics.announce, announcement, qos=1, retain=True)
        self._metrics.snapshots.inc()
        log.info("published snapshot of version %d (%d bytes%s)", version, len(payload),
                 "" if weights is None else f"; compact {len(weights)} bytes")

    def _deliver(self, topic: str, payload: bytes) -> bool:
        """Publish `payload` retained on `topic` until the broker acknowledges it; False when
        that stopped (after a few seconds of a clean stop, or on a failure)."""
        stopping_since: float | None = None
        while self._lease.failure is None:
            if not self._link.online:
                if self._stop.is_set():
                    return False
                self._note_waiting()
                self._link.wait_online(1.0)
                continue
            info = self._transport.publish(topic, payload, qos=1, retain=True)
            try:
                while not info.is_published():
                    if self._stop.is_set():
                        # Real seconds whatever the service's clock: the broker's, not ours.
                        stopping_since = stopping_since or time.monotonic()
                        if time.monotonic() - stopping_since > 5.0:
                            return False
                    if self._lease.failure is not None:
                        return False
                    info.wait_for_publish(timeout=1.0)
            except PublishFailed:
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
        version = self._engine.version
        if self._waiting_noted == version or not (link["attempts"]
                                                  or link["state"] == "disconnected"):
            return
        self._waiting_noted = version
        log.info("snapshot of version %d waits for the broker at %s (%s)", version,
                 link["broker"], link["last_error"])

