"""The edge agent's logic, independent of how it reaches the broker.

`Agent` reacts to four things: a model announcement, a model snapshot, an ack, and `poll()`
(called every few seconds). A `Link` carries its messages; `agent._runner` gives it a paho
client for a real device, the fleet simulator gives many agents a shared one. Nothing finished
is ever lost: an update is spooled to disk before it is published and leaves the spool only
when acked.

Models on demand (docs/architecture.md): with a link that can subscribe (`Subscribes`), the
agent does not receive every snapshot the coordinator publishes. It listens to the small
retained announcement (version, sha256, size, cohort) while it wants a model: eligible and due
to train, or its model last checked `model_refresh_s` ago (or none yet). When the announcement
names something newer that it would use, it fetches the snapshot (subscribes to the model
topic, takes the retained message, unsubscribes), verifies it as always, and trains. When the
announcement names a compact snapshot (a newer coordinator), it fetches that instead, from the
weights topic, and the model's template (the ONNX graph without weights) from the template topic
only when it is not cached in ``state_dir/templates``: it trains from the weights (float32) and
`agent.Predictor` builds the ONNX model from template + weights. Both
subscriptions are QoS 0, so a persistent session never queues snapshots or announcements while
the device is offline; a subscription made again after a reconnect brings the retained message.
On a metered network (the policy's network check fails) it fetches nothing unless
``fetch_on_metered``. ``model_refresh_s = 0`` follows every version instead (subscribed to the
model topic whenever the network allows). `wake`, when set, is called when something arrived
that may let the agent train now (a newer model), so its owner can step it at once rather than
at its next poll; it is called on the network thread and must only hand the work over.

Site control (`agent._hooks`): eligibility hooks are extra checks in the gate; an approval hook,
when configured, sees each finished update's metadata before it is spooled, and a refused update
is never sent: it is dropped or held for an operator (`agent._held`), as ``on_refused`` says.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedasync_iot.agent._budget import WorkBudget
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import DataSource
from fedasync_iot.agent._held import HeldUpdates
from fedasync_iot.agent._hooks import (
    Approval,
    load_approval,
    load_eligibility_hooks,
    update_metadata,
)
from fedasync_iot.agent._instance import Instance
from fedasync_iot.agent._policy import Decision, EligibilityGate
from fedasync_iot.agent._privacy import PrivacyLedger, account_here, account_in_child
from fedasync_iot.agent._readings import ReadingsSource
from fedasync_iot.agent._spool import Spool, Spooled
from fedasync_iot.agent._trainer import train_update
from fedasync_iot.models import FedAsyncError, StateError, Topics, WireError
from fedasync_iot.models import _signing as signing
from fedasync_iot.models._wire import (
    Ack,
    Announcement,
    Snapshot,
    TemplateMessage,
    UpdateMessage,
    decode_ack,
    decode_announcement,
    decode_snapshot,
    decode_template,
    decode_weights,
    encode_update,
    frame_kind,
    update_label,
)

log = logging.getLogger("fedasync.agent")

Trainer = Callable[..., "UpdateMessage | None"]

# A fetch whose retained snapshot has not arrived by then is given up (and retried at a later
# check): the broker may have lost it, or an ACL may hide it.
FETCH_TIMEOUT_S = 120.0
# Listening this long without hearing the retained announcement means the coordinator does not
# announce (it predates models on demand, or the broker's ACL hides the topic): follow every
# snapshot instead, so an agent upgraded before its coordinator keeps training.
ANNOUNCE_WAIT_S = 30.0
# An announcement subscription unheard this long is made again. A clustered broker can miss the
# retained announcement on a new subscription: on NATS, a node's copy of the retained messages
# lags those published on another node, and a publication made before interest in the new
# subscription reached the publisher's node is not routed to it. A new SUBSCRIBE makes the
# broker send what it holds again (MQTT 3.1.1, 3.8.4); on one Mosquitto it never comes to this.
RELISTEN_S = 5.0
TEMPLATES_DIR = "templates"  # under state_dir: <template id>.template, verified frames
# A compact snapshot (or its template) that does not arrive in FETCH_TIMEOUT_S (a broker whose
# ACL predates them hides both topics) makes the agent fetch full snapshots for this long.
COMPACT_RETRY_S = 3600.0


class _NoTemplate(Exception):
    """Compact weights arrived whose template is not cached (yet): fetch it, refuse nothing."""


class Link(Protocol):
    """What the agent needs from an MQTT connection."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
                ) -> None: ...


@runtime_checkable
class Subscribes(Protocol):
    """A link the agent may subscribe through (agent._runner.PahoLink, the simulator's
    SimLink): then it fetches models on demand. A link without these methods delivers whatever
    it subscribed to itself, as links did before models on demand."""

    def subscribe(self, topic: str, qos: int = 0) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...


@runtime_checkable
class ReportsConnection(Protocol):
    """A link that can say more than up/down (agent._runner.PahoLink): state, broker,
    last_error, since, attempts."""

    def connection_info(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Counters:
    trained: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    aborted: int = 0
    approved: int = 0  # by the approval hook
    refused: int = 0
    # Model fetches started on demand, by why: to train on a newer version, or to refresh the
    # inference model (none held, or last checked model_refresh_s ago). A template and the
    # weights it precedes are one fetch; a fetch that times out and is started again is two.
    fetched_for_training: int = 0
    fetched_for_refresh: int = 0


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        link: Link,
        reader: ReadingsSource,
        data: DataSource,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        net_clock: Callable[[], float] = time.monotonic,
        trainer: Trainer = train_update,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        # Named in the status (agent._instance; set by agent._runner): a simulator has none.
        self.instance: Instance | None = None
        self.topics = Topics(config.fleet, config.topic_root)
        self.link = link
        self.reader = reader
        self.data = data
        self.clock = clock
        self.monotonic = monotonic
        # Waits on the network (a fetch, an announcement) are wall time even where the device's
        # own clock is simulated: a 120 s fetch timeout on a clock 960x faster gave up in 0.1 s.
        self.net_clock = net_clock
        self.trainer = trainer
        self.rng = rng or np.random.default_rng()
        self.state_dir = Path(config.state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # mkdir(exist_ok=True) raises it only for a non-directory
            raise StateError(f"cannot use state directory {self.state_dir}: it exists and is "
                             "not a directory; set state_dir to a directory") from exc
        except OSError as exc:
            raise StateError(f"cannot use state directory {self.state_dir}: "
                             f"{exc.strerror or exc}") from exc
        self.templates_dir = self.state_dir / TEMPLATES_DIR
        self.spool = Spool(self.state_dir / "spool", max_count=config.spool_max_count,
                           max_bytes=config.spool_max_bytes)
        self.held = HeldUpdates(self.state_dir / "held", max_count=config.spool_max_count,
                                max_bytes=config.spool_max_bytes)
        # Imported now, so a hook that cannot load stops the agent at start (ConfigError).
        self.gate = EligibilityGate(config.policy,
                                    extra_checks=load_eligibility_hooks(config.eligibility_hooks))
        self.approval = load_approval(config.approval_hook, timeout_s=config.approval_timeout_s)
        self.last_approval: dict[str, Any] | None = None
        self.counters = _Counters()
        self.snapshot: Snapshot | None = None
        self.decision: Decision | None = None
        self.last_rejection: str | None = None
        self.model_rejection: str | None = None  # why the last model offered was refused
        self._verifier = (signing.Verifier.from_files(list(config.coordinator_public_keys))
                          if config.coordinator_public_keys else None)
        self._lock = threading.RLock()
        self._progress = self._load_progress()
        self._last_train_at = -float("inf")
        # Local work fitted to the device's eligible windows (agent/_budget.py; off unless
        # training.window_fraction > 0); `last_work` is what the latest training did.
        self.budget = WorkBudget(config.training.window_fraction)
        # The lifetime privacy ledger (agent/_privacy.py): at its budget, nothing more is sent.
        self.privacy = PrivacyLedger(
            self.state_dir, config.privacy, noise_multiplier=config.training.noise_multiplier,
            accountant=account_in_child if config.train_in_subprocess else account_here)
        self.last_work: tuple[int, int] = (0, config.training.local_epochs)
        self._backoff_until = -float("inf")  # monotonic; set by a rejection with retry_after_s
        # Models on demand (module docstring). All of it under self._lock: announcements and
        # snapshots arrive on the network thread, polls run on the agent's own.
        subscribes = isinstance(link, Subscribes)
        self._follow = subscribes and config.model_refresh_s == 0
        self._on_demand = subscribes and config.model_refresh_s > 0
        self.wake: Callable[[], None] | None = None
        self.model_wait_s = 10.0  # how long `poll` waits for an announcement or a fetch
        self.announcement: Announcement | None = None
        self._fresh = False  # an announcement arrived since the current subscription
        self._listening_since: float | None = None  # net_clock: announce subscribed, unheard
        self._relistened_at = -float("inf")  # net_clock: last subscription made again
        self._rewritten_seen = False  # a topic the broker rewrote ('.' -> '/'), logged once
        self._unannounced = False  # no announcement ever heard: following snapshots instead
        self._subscribed: set[str] = set()
        self._fetching_since: float | None = None  # net_clock
        self._refused_sha: str | None = None  # a snapshot refused: not fetched again
        self._compact_off_until = -float("inf")  # net_clock: full snapshots only until then
        self._checked_at = -float("inf")  # monotonic: when the model was last known newest
        self._in_flight = False  # training, or (simulator) its update not yet delivered
        self.fetches = 0
        self.fetched_bytes = 0
        self.last_fetch: dict[str, Any] | None = None
        self._news = threading.Event()  # set when an announcement or a snapshot arrives
        # A coordinator behind this agent (its state reset, or restored from an older backup):
        # `_behind` is the version it said it is at (a future_version ack) while this agent
        # holds a later model, which it then takes although older; `_waiting` maps the spooled
        # updates it refused as from the future to their base versions: they stay spooled
        # (within the spool's bounds) and go again once it reaches their base.
        self._behind: int | None = None
        self._waiting: dict[str, int | None] = {}
        self._coordinator_version: int | None = None  # as last heard: announcement, ack, model
        self._interrupted = False  # set by interrupt(): a poll's wait for the model ends
        self._load_saved_snapshot()

    # -- inputs ------------------------------------------------------------------------------
    def on_connected(self) -> None:
        """Send everything still in the spool (the broker or coordinator may never have got it),
        and subscribe again to what the agent wants now."""
        if isinstance(self.link, Subscribes) and (self._on_demand or self._follow):
            with self._lock:
                # A clean slate: what the broker session kept (an older agent's QoS 1 model
                # subscription, a fetch cut short by the disconnect) goes; the wanted
                # subscriptions are made again, which brings their retained messages.
                for topic in (self.topics.announce, self.topics.model, self.topics.template,
                              self.topics.weights):
                    self.link.unsubscribe(topic)
                self._subscribed.clear()
                self._fresh = False
                self._listening_since = None
                self._fetching_since = None
            # Only then the first check (the network decides whether fetching is allowed),
            # whose sync subscribes: before the slate, its subscription was made twice and the
            # retained snapshot arrived twice.
            if self.decision is None:
                self.check()
            with self._lock:
                self._sync()
        with self._lock:
            waiting = {u for u, base in self._waiting.items() if not self._reached(base)}
        entries = [e for e in self.spool.entries() if e.update_id not in waiting]
        if entries:
            log.info("reconnected: republishing %d spooled update(s)", len(entries))
        if waiting:
            log.info("%d spooled update(s) wait for the coordinator to reach their base version",
                     len(waiting))
        self._send(entries)
        self.publish_status()

    def _send(self, entries: list[Spooled]) -> None:
        for e in entries:
            try:
                self.link.publish(self.topics.update(self.config.device_id), e.read(), qos=1)
            except OSError:
                continue  # acked and removed meanwhile

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message on one of the agent's topics, handed to its handler (the ack otherwise)."""
        if self.topics.rewritten(topic):
            if not self._rewritten_seen:
                self._rewritten_seen = True
                log.error("a message on %s: the broker turned a '.' of a topic level into '/' "
                          "(RabbitMQ's MQTT plugin does): on such a broker the fleet name, the "
                          "topic root and the device id must be letters, digits, '-' and '_' "
                          "only; nothing from it can be used", topic)
            return
        handler = {self.topics.model: self.on_model, self.topics.announce: self.on_announce,
                   self.topics.weights: self.on_weights,
                   self.topics.template: self.on_template}.get(topic, self.on_ack)
        handler(payload)

    def on_announce(self, payload: bytes) -> None:
        """The coordinator's announcement of the snapshot the broker holds: fetch it if this
        agent would use it now (network thread: only subscriptions change here)."""
        try:
            announcement = decode_announcement(payload)
        except WireError as exc:
            log.warning("ignored a model announcement that does not decode: %s", exc)
            return
        self._coordinator_at(announcement.version)
        with self._lock:
            self.announcement = announcement
            if self.topics.announce in self._subscribed:
                self._fresh = True
            if self._unannounced:
                log.info("the coordinator announces models now: fetching on demand again")
                self._unannounced = False
                self._subscribe(self.topics.model, False)
            self._sync()
            # Heard, and nothing to fetch: the model held is the newest. If it has not trained
            # on it yet, that may be all that kept it from training (a fetch wakes it when the
            # model arrives); woken on a model it already trained on, it would train again.
            untrained = (self.snapshot is not None and self.snapshot.version
                         > self._progress.get("last_base_version", -1))
            current = self._fresh and self._fetching_since is None and untrained
        self._news.set()
        if current and self.wake is not None:
            self.wake()

    def on_model(self, payload: bytes) -> None:
        """A full snapshot (model topic): weights and, when the coordinator includes it, ONNX."""
        self._receive(payload, "model", lambda frame: (decode_snapshot(frame), frame))

    def on_weights(self, payload: bytes) -> None:
        """A compact snapshot (weights topic): trained from as float32, predicted with through
        the cached template it names."""
        self._receive(payload, "weights", self._compact)

    def _compact(self, frame: bytes) -> tuple[Snapshot, bytes]:
        weights = decode_weights(frame)
        template = self.cached_template(weights.template_id)
        if template is None:
            raise _NoTemplate(weights.template_id)
        if template.spec != weights.spec or template.template.n_params != weights.weights.size:
            raise WireError(f"weights of version {weights.version} do not fit their template "
                            f"{weights.template_id[:12]} (another spec or size)")
        return weights.snapshot(), frame

    def on_template(self, payload: bytes) -> None:
        """The model's template (template topic): verified and cached on disk by its id; a
        fetch under way goes on to the weights."""
        with self._lock:
            self.fetches += 1
            self.fetched_bytes += len(payload)
        try:
            frame = self._verified(payload)
            template = decode_template(frame)
        except WireError as exc:
            with self._lock:
                if self._fetching_since is not None:
                    self._end_fetch()
                a = self.announcement
                # Not fetched again for this announcement: the same bytes would be refused.
                self._refused_sha = (a.weights_sha256 if a is not None and a.compact
                                     else hashlib.sha256(payload).hexdigest())
                self.last_fetch = {"version": None, "bytes": len(payload), "kind": "template",
                                   "at": self.clock(), "refused": True}
                self._sync()
            self._refuse(f"model template: {exc}")
            return
        with self._lock:
            a = self.announcement
            if a is None or a.template != template.id:
                log.info("ignored model template %s: not the announced one", template.id[:12])
                return
            self.templates_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.templates_dir / f"{template.id}.template", frame)
            log.info("cached model template %s (%d bytes)", template.id[:12], len(payload))
            if self.topics.template in self._subscribed and self._fetching_since is not None:
                self._subscribe(self.topics.template, False)
                self._fetching_since = self.net_clock()
                self._subscribe(self.topics.weights, True)

    def cached_template(self, template_id: str) -> TemplateMessage | None:
        """The cached template `template_id`, None when missing or unreadable (fetched again)."""
        return load_template(self.templates_dir, template_id)

    def _verified(self, payload: bytes) -> bytes:
        return (self._verifier.verify(payload) if self._verifier is not None
                else signing.split(payload)[0])

    def _refuse(self, why: str) -> None:
        self.model_rejection = why
        log.warning("refused a model, keeping version %s: %s",
                    None if self.snapshot is None else self.snapshot.version, why)
        self._news.set()
        self.publish_status()

    def _receive(self, payload: bytes, kind: str,
                 decode: Callable[[bytes], tuple[Snapshot, bytes]]) -> None:
        with self._lock:
            fetched = self._fetching_since is not None
            if fetched:  # a fetch takes one snapshot: the retained one
                self._end_fetch()
            self.fetches += 1
            self.fetched_bytes += len(payload)
        try:
            snapshot, frame = decode(self._verified(payload))
        except _NoTemplate as exc:
            log.info("model weights name template %s, not cached: fetching it", str(exc)[:12])
            with self._lock:
                self._sync()
            return
        except WireError as exc:
            with self._lock:
                # Not fetched again: the same bytes would be refused again (a newer
                # announcement, naming other bytes, is fetched as usual).
                self._refused_sha = hashlib.sha256(payload).hexdigest()
                self.last_fetch = {"version": None, "bytes": len(payload), "kind": kind,
                                   "at": self.clock(), "refused": True}
                self._sync()
            self._refuse(str(exc))
            return
        with self._lock:
            self.last_fetch = {"version": snapshot.version, "bytes": len(payload), "kind": kind,
                               "at": self.clock(), "refused": False}
            self._checked_at = self.monotonic()  # the broker's newest, as of now
            current = self.snapshot
            back = (current is not None and snapshot.version < current.version
                    and self._went_back_to(snapshot.version))
            if current is not None and snapshot.spec == current.spec and not back and (
                snapshot.version < current.version
                or (snapshot.version == current.version and snapshot.cohort == current.cohort)
            ):
                self._sync()
                self._news.set()
                return  # nothing new (a same-version snapshot may widen a round's cohort)
            self.snapshot = snapshot
            self.model_rejection = None
            _atomic_write(self.state_dir / "model.snapshot", frame)
            if back:
                self._behind = None
                # Not trained on yet, whatever the number says: the retrain-on-a-new-model rule
                # and the wake on an announcement compare with it.
                self._progress.pop("last_base_version", None)
                _atomic_write(self.state_dir / "progress.json",
                              json.dumps(self._progress).encode())
            self._sync()
        if back:
            assert current is not None
            log.warning("took the coordinator's model version %d, older than version %d held "
                        "here: the coordinator went back (its state was reset, or restored from "
                        "an older backup)", snapshot.version, current.version)
        self._coordinator_at(snapshot.version)
        log.info("new model version %d%s%s", snapshot.version,
                 f" (accuracy {snapshot.metrics['accuracy']:.3f})"
                 if "accuracy" in snapshot.metrics else "",
                 f", fetched ({len(payload)} bytes{', compact' if kind == 'weights' else ''})"
                 if fetched else "")
        self._news.set()
        self.publish_status()
        if self.wake is not None:
            self.wake()

    def on_ack(self, payload: bytes) -> None:
        try:
            ack = decode_ack(payload)
        except WireError as exc:
            log.warning("ignored an ack that does not decode: %s", exc)
            return
        if ack.update_id is None:
            log.warning("coordinator rejected a message it could not read: %s (%s)", ack.reason,
                        ack.detail)
            return
        if ack.status == "rejected" and ack.reason == "future_version":
            self._wait_for_coordinator(ack, ack.update_id)
            return
        if ack.version is not None:
            self._coordinator_at(ack.version)
        removed = self.spool.remove(ack.update_id)
        if ack.status == "rejected":
            self.counters.rejected += 1
            self.last_rejection = f"{ack.update_id}: {ack.reason}"
            # Stale work is routine (the fleet moved on); anything else is worth a warning.
            routine = ack.reason in ("too_stale", "wrong_round", "participation_cap")
            log.log(logging.INFO if routine else logging.WARNING, "update %s rejected: %s %s",
                    ack.update_id, ack.reason, ack.detail)
            if ack.retry_after_s is not None:
                with self._lock:
                    self._backoff_until = self.monotonic() + ack.retry_after_s
                    self._sync()  # backing off: no model wanted for training meanwhile
                log.info("coordinator asks for no new update for %.0f s: backing off",
                         ack.retry_after_s)
        elif removed:
            self.counters.accepted += 1
            log.info("update %s %s (version %s)", ack.update_id, ack.status, ack.version)
        if removed:
            self.publish_status()

    # -- a coordinator behind this agent (state reset or restored) ---------------------------
    def _wait_for_coordinator(self, ack: Ack, update_id: str) -> None:
        """The coordinator refused `update_id` as built on a model it does not have yet: its
        version is below the update's base. Deleting the update would lose work it can still
        take, so it stays spooled until the coordinator reaches its base (`_coordinator_at`),
        and the agent takes the coordinator's model, although older, to train on what the fleet
        trains on now."""
        entry = next((e for e in self.spool.entries() if e.update_id == update_id), None)
        if entry is None:
            return  # dropped from a full spool, or answered meanwhile
        try:
            base = update_label(entry.read())[1]
        except OSError:
            return
        version = ack.version
        with self._lock:
            known = update_id in self._waiting
            self._waiting[update_id] = base
            held = None if self.snapshot is None else self.snapshot.version
            news = version is not None and held is not None and version < held and (
                self._behind != version)
            if news:
                self._behind = version
                if self._follow or self._unannounced:
                    self._subscribe(self.topics.model, False)  # again: the retained model comes
                self._sync()
            self._coordinator_version = version
        if not known:
            self.counters.rejected += 1
        self.last_rejection = f"{update_id}: future_version {ack.detail}"
        if news:
            log.warning("the coordinator is at model version %s, behind update %s (base version "
                        "%s) and model version %s held here: its state was reset, or restored "
                        "from an older backup. Keeping its updates in the spool (at most %d) "
                        "until it reaches their base version, and taking its model", version,
                        update_id, base, held, self.config.spool_max_count)
        elif not known:
            log.info("update %s (base version %s) kept in the spool until the coordinator, at "
                     "version %s, reaches its base", update_id, base, version)
        self.publish_status()

    @property
    def waiting(self) -> dict[str, int | None]:
        """Spooled updates kept until the coordinator reaches their base version (by id)."""
        with self._lock:
            return dict(self._waiting)

    def _went_back_to(self, version: int) -> bool:
        """Whether a model older than the one held is the coordinator's current one (it said it
        went back to `_behind` or below); not a stale copy of an older one."""
        return self._behind is not None and version >= self._behind

    def _reached(self, base: int | None) -> bool:
        known = self._coordinator_version
        return base is None or (known is not None and known >= base)

    def _coordinator_at(self, version: int) -> None:
        """The coordinator's model is at `version` (an announcement, a model, an ack): send the
        spooled updates that waited for it to reach their base."""
        with self._lock:
            self._coordinator_version = version
            due = {u for u, base in self._waiting.items() if self._reached(base)}
            for u in due:
                del self._waiting[u]
        if not due:
            return
        entries = [e for e in self.spool.entries() if e.update_id in due]
        log.info("the coordinator reached model version %d: sending %d spooled update(s) that "
                 "waited for it", version, len(entries))
        if self.link.connected:
            self._send(entries)

    # -- the periodic step -------------------------------------------------------------------
    def poll(self) -> Decision:
        """Re-read the device, and train + send one update if everything allows it. When it
        wants a model, it waits (at most `model_wait_s`) for the announcement and the fetch it
        starts, so that it trains on the newest model (blocking: the simulator never polls)."""
        decision = self.check()
        self._await_model()
        if self.should_train(decision):
            self.train_once()
        return decision

    def check(self) -> Decision:
        previous = self.decision
        self.decision = self.gate.update(self.reader.read(), now=self.monotonic())
        self.budget.observe(self.decision.eligible, self.monotonic())
        with self._lock:
            self._sync()
        if previous is None or previous.eligible != self.decision.eligible:
            log.info("eligible: %s (%s)", "yes" if self.decision.eligible else "no",
                     self.decision.reason)
            self.publish_status()
        return self.decision

    def should_train(self, decision: Decision) -> bool:
        snapshot = self.snapshot
        return (decision.eligible and snapshot is not None and
                # A synchronous round names the devices it wants; the others sit it out.
                (snapshot.cohort is None or self.config.device_id in snapshot.cohort) and
                self.monotonic() - self._last_train_at >= self.config.min_train_interval_s and
                self.monotonic() >= self._backoff_until and self.model_is_newest())

    def model_is_newest(self) -> bool:
        """Whether the held model is the newest this agent would train on. Fetching on demand
        and connected, it must have heard the announcement since it last subscribed, and that
        must name nothing newer (nor a fetch be under way): an agent back from idle must not
        train on a model it fetched hours ago. Offline it trains on what it has, as always."""
        with self._lock:
            if not self._on_demand or not self.link.connected or self._unannounced:
                return True
            a = self.announcement
            return (self._fresh and self._fetching_since is None and a is not None
                    and (not self._newer(a) or self._is_refused(a)))

    # -- models on demand (under self._lock) -------------------------------------------------
    def _network_allows_fetching(self) -> bool:
        if self.config.fetch_on_metered:
            return True
        d = self.decision  # metered: no interface the policy allows is up
        return d is not None and any(c.passed for c in d.checks if c.name == "network")

    def _due(self) -> bool:
        now = self.monotonic()
        return (now - self._last_train_at >= self.config.min_train_interval_s
                and now >= self._backoff_until and self.privacy.allows_next())

    def _refresh_due(self) -> bool:
        return (self.snapshot is None
                or self.monotonic() - self._checked_at >= self.config.model_refresh_s)

    def _newer(self, a: Announcement) -> bool:
        """Whether `a` names a model this agent does not hold: a later version, or the same
        version with a round's cohort widened to invite this device."""
        s = self.snapshot
        if s is None or a.version != s.version:
            return s is None or a.version > s.version or self._went_back_to(a.version)
        me = self.config.device_id
        return (a.cohort is not None and me in a.cohort
                and s.cohort is not None and me not in s.cohort)

    def _sync(self) -> None:
        """Subscribe to what the agent wants now, unsubscribe from the rest, start or end a
        fetch. Cheap when nothing changes; called on every check and every arrival."""
        if not (self._on_demand or self._follow) or not self.link.connected:
            return
        allowed = self._network_allows_fetching()
        if self._follow:
            self._subscribe(self.topics.model, allowed)
            return
        if self._unannounced:  # still listening, in case the coordinator starts announcing
            self._subscribe(self.topics.announce, True)
            self._subscribe(self.topics.model, allowed)
            return
        since = self._listening_since
        if (since is not None and self.announcement is None
                and self.net_clock() - since >= ANNOUNCE_WAIT_S):
            log.warning("no model announcement on %s in %.0f s: the coordinator does not "
                        "announce (older than this agent, or the broker's ACL hides the topic); "
                        "following every snapshot on %s instead", self.topics.announce,
                        ANNOUNCE_WAIT_S, self.topics.model)
            self._unannounced = True
            self._fetching_since = None
            self._sync()
            return
        a = self.announcement
        if (self._fresh and a is not None and self._fetching_since is None
                and (not self._newer(a) or self._is_refused(a))):
            self._checked_at = self.monotonic()  # heard the newest: the model is current
        d = self.decision
        train = allowed and d is not None and d.eligible and self._due()
        refresh = allowed and self._refresh_due()
        # Not while training: the announcements heard then would all be stale by its end, and
        # were most of an always-eligible device's downlink. Subscribing again afterwards
        # brings the retained (newest) one at once.
        self._subscribe(self.topics.announce, (train and not self._in_flight) or refresh)
        self._relisten()
        if self._fetching_since is not None:
            if not allowed:
                log.info("model fetch cancelled: the network is metered now")
                self._end_fetch()
                return
            if self.net_clock() - self._fetching_since <= FETCH_TIMEOUT_S:
                return
            waited = self._subscribed - {self.topics.announce}
            log.warning("no model snapshot arrived in %.0f s after subscribing to %s; "
                        "trying again later", FETCH_TIMEOUT_S, ", ".join(sorted(waited)))
            self._end_fetch()
            if not waited & {self.topics.template, self.topics.weights}:
                return
            # Compact: the broker may hide its topics (an ACL that predates them). On to the
            # full snapshot at once, and for a while.
            log.warning("fetching full snapshots for %.0f s instead of compact ones (does the "
                        "broker's ACL let devices read %s and %s?)", COMPACT_RETRY_S,
                        self.topics.template, self.topics.weights)
            self._compact_off_until = self.net_clock() + COMPACT_RETRY_S
        if not (self._fresh and a is not None and self._newer(a) and not self._is_refused(a)):
            return
        me = self.config.device_id
        for_training = train and not self._in_flight and (a.cohort is None or me in a.cohort)
        if refresh or for_training:
            why = "training" if for_training else "inference (refresh)"
            if for_training:
                self.counters.fetched_for_training += 1
            else:
                self.counters.fetched_for_refresh += 1
            self._fetching_since = self.net_clock()
            if (a.template is None or a.weights_size is None  # an older coordinator
                    or self.net_clock() < self._compact_off_until):
                log.info("fetching model version %d (%d bytes) for %s", a.version, a.size, why)
                self._subscribe(self.topics.model, True)
            elif self.cached_template(a.template) is None:
                log.info("fetching model template %s, then version %d (%d bytes) for %s",
                         a.template[:12], a.version, a.weights_size, why)
                self._subscribe(self.topics.template, True)
            else:
                log.info("fetching model version %d (%d bytes, compact) for %s", a.version,
                         a.weights_size, why)
                self._subscribe(self.topics.weights, True)

    def _relisten(self) -> None:
        """Subscribe again to the announcements if unheard for RELISTEN_S (see there)."""
        since = self._listening_since
        if since is None or self._fresh or not isinstance(self.link, Subscribes):
            return
        now = self.net_clock()
        if now - max(since, self._relistened_at) < RELISTEN_S:
            return
        self._relistened_at = now
        log.debug("no announcement on %s for %.0f s: subscribing again", self.topics.announce,
                  now - since)
        self.link.subscribe(self.topics.announce, 0)

    def _is_refused(self, a: Announcement) -> bool:
        """Whether what `a` names was refused already (the same bytes would be again)."""
        return self._refused_sha is not None and self._refused_sha in (a.sha256,
                                                                       a.weights_sha256)

    def _end_fetch(self) -> None:
        self._fetching_since = None
        for topic in (self.topics.model, self.topics.template, self.topics.weights):
            self._subscribe(topic, False)

    def _subscribe(self, topic: str, wanted: bool) -> None:
        """QoS 0 (module docstring): nothing queues in the session while offline."""
        link = self.link
        if not isinstance(link, Subscribes) or wanted == (topic in self._subscribed):
            return
        if wanted:
            self._subscribed.add(topic)
            if topic == self.topics.announce:
                self._fresh = False  # until the retained announcement arrives
                self._listening_since = self.net_clock()
            link.subscribe(topic, 0)
        else:
            self._subscribed.discard(topic)
            if topic == self.topics.announce:
                self._fresh = False  # announcements are no longer heard
                self._listening_since = None
            link.unsubscribe(topic)

    def _await_model(self) -> None:
        """Wait (at most `model_wait_s`) while an announcement or a fetch the agent wants is
        on its way; returns at once when there is none.

        No announcement is awaited from a coordinator that does not announce: following its
        snapshots (`_unannounced`), the announcement subscription only listens for a change of
        coordinator, and waiting for it held every poll `model_wait_s`. Nor past ANNOUNCE_WAIT_S
        of silence: the wait ends there, and the agent starts following snapshots at once
        rather than at its next check."""
        deadline = time.monotonic() + self.model_wait_s
        while True:
            self._news.clear()
            with self._lock:
                if self._announce_wait_left() == 0.0:
                    self._sync()  # gives up on announcements: follows snapshots from now on
                listening = (self.topics.announce in self._subscribed and not self._fresh
                             and not self._unannounced)
                if listening and self.link.connected:
                    self._relisten()
                pending = self.link.connected and (self._fetching_since is not None
                                                   or listening)
                give_up = self._announce_wait_left() if listening else None
            left = deadline - time.monotonic()
            if not pending or left <= 0 or self._interrupted:
                return
            if listening:  # woken to subscribe again, if it comes to that
                left = min(left, RELISTEN_S)
            self._news.wait(left if give_up is None else min(left, max(give_up, 0.01)))

    def interrupt(self) -> None:
        """End a poll's wait for the model at once, and every later one: the owner is stopping
        (AgentRunner.stop, from a signal handler or another thread). A stopped agent waited up to
        `model_wait_s` for an announcement before its loop could end."""
        self._interrupted = True
        self._news.set()

    def _announce_wait_left(self) -> float | None:
        """Seconds (net_clock) until an unheard announcement subscription means the coordinator
        does not announce, 0.0 once it does; None when no such wait is under way."""
        since = self._listening_since
        if since is None or self.announcement is not None or self._unannounced:
            return None
        return max(0.0, since + ANNOUNCE_WAIT_S - self.net_clock())

    def train_once(self) -> UpdateMessage | None:
        """Train from the newest snapshot, then spool and publish. None if skipped/stopped."""
        update = self.prepare_update()
        if update is not None:
            self.deliver(update)
        return update

    def prepare_update(self) -> UpdateMessage | None:
        """Load data and train, if there is enough reason to; nothing is sent yet. (Split from
        `deliver` so a simulator can let simulated compute time pass in between.)"""
        snapshot = self.snapshot
        if snapshot is None or not self.privacy.allows_next():
            return None
        try:
            X, y = self.data.load()
        except FedAsyncError as exc:
            log.error("cannot load local data: %s", exc)
            return None
        n = len(X)
        new = n - self._progress.get("samples_at_last_train", 0)
        newer_model = snapshot.version > self._progress.get("last_base_version", -1)
        if n < self.config.min_samples or not (
            new >= self.config.min_new_samples
            or (self.config.retrain_on_new_model and newer_model)
        ):
            return None
        self._last_train_at = self.monotonic()
        training = self.config.training
        samples, epochs = self.budget.fit(n, training.local_epochs)
        if (samples, epochs) != (n, training.local_epochs):
            log.info("fitting the work to this device's eligible windows: %d of %d samples, %d "
                     "of %d epochs", samples, n, epochs, training.local_epochs)
            training = replace(training, local_epochs=epochs)
            if samples < n:
                keep = np.sort(self.rng.choice(n, size=samples, replace=False))
                X, y = X[keep], y[keep]
        self.last_work = (samples, epochs)
        log.info("training on %d samples (%d new) from model version %d", samples, max(new, 0),
                 snapshot.version)
        # Until the update is delivered (or aborted) the agent fetches no model for training.
        self._set_in_flight(True)
        try:
            update = self.trainer(snapshot, X, y, device_id=self.config.device_id,
                                  config=training, rng=self.rng,
                                  should_stop=self._stop_training, now=self.clock())
        except FedAsyncError as exc:
            log.error("training failed: %s", exc)
            self._set_in_flight(False)
            return None
        if update is None:
            self.abort(self.decision.reason if self.decision else "stopped")
        return update

    def _set_in_flight(self, value: bool) -> None:
        with self._lock:
            self._in_flight = value
            self._sync()  # done: a newer model already announced is fetched now

    def abort(self, reason: str) -> None:
        """Training was cut short (the device stopped allowing it): nothing is sent."""
        self.counters.aborted += 1
        log.info("training stopped early: %s", reason)
        self._set_in_flight(False)

    def deliver(self, update: UpdateMessage) -> None:
        """Ask the approval hook (if any), then spool (durably) and publish; the spool keeps it
        until the coordinator acks it. A refused update is dropped or held, never sent."""
        self.counters.trained += 1
        self.budget.trained(*self.last_work, self.monotonic() - self._last_train_at)
        payload = encode_update(update, topk_fraction=self.config.training.topk_fraction)
        verdict = self._ask_approval(update, payload)
        send = verdict is None or verdict.approved
        if send or self.config.on_refused == "keep":
            self.privacy.record()  # before the spool: a crash can only over-count
        if verdict is not None and not send:
            if self.config.on_refused == "keep":
                self.held.put(update.update_id, payload, reason=verdict.reason, now=self.clock())
        else:
            self.spool.put(update.update_id, payload)
        # Progress moves on even after a refusal: retraining at once on the same data and model
        # would most likely be refused again, and only spend the device's battery.
        self._progress.update(samples_at_last_train=update.n_samples,
                              last_base_version=update.base_version)
        _atomic_write(self.state_dir / "progress.json", json.dumps(self._progress).encode())
        if send and self.link.connected:
            self.link.publish(self.topics.update(self.config.device_id), payload, qos=1)
            self.counters.sent += 1
        self._set_in_flight(False)
        self.publish_status()

    def _ask_approval(self, update: UpdateMessage, payload: bytes) -> Approval | None:
        """The approval hook's verdict, counted and logged; None when there is no hook."""
        if self.approval is None:
            return None
        verdict = self.approval(update_metadata(update, fleet=self.config.fleet,
                                                payload_bytes=len(payload)))
        self.last_approval = {"update_id": update.update_id, "approved": verdict.approved,
                              "reason": verdict.reason}
        if verdict.approved:
            self.counters.approved += 1
            log.info("update %s approved: %s", update.update_id, verdict.reason)
        else:
            self.counters.refused += 1
            fate = ("kept in held/ for an operator (fedasync-agent held list|release|drop)"
                    if self.config.on_refused == "keep" else "dropped")
            log.warning("update %s refused by the approval hook, %s: %s", update.update_id,
                        fate, verdict.reason)
        return verdict

    def _stop_training(self) -> bool:
        return not self.check().eligible

    # -- status ------------------------------------------------------------------------------
    def status(self, state: str = "online") -> dict[str, Any]:
        d = self.decision
        spooled = self.spool.entries()
        return {
            "state": state,
            "device_id": self.config.device_id,
            "time": self.clock(),
            "eligible": None if d is None else d.eligible,
            "reason": None if d is None else d.reason,
            "checks": None if d is None else d.to_dict()["checks"],
            "model_version": None if self.snapshot is None else self.snapshot.version,
            # What the agent knows of newer models (models on demand): the last announcement
            # heard, and the last snapshot it received (version, bytes, wall time, refused).
            "models": ("follow" if self._follow
                       else "follow (the coordinator does not announce)" if self._unannounced
                       else "on demand" if self._on_demand else "link"),
            "announced_version": None if self.announcement is None else self.announcement.version,
            "last_fetch": self.last_fetch,
            "fetches": self.fetches,
            "fetched_bytes": self.fetched_bytes,
            "spool_depth": len(spooled),
            "spool_dropped": self.spool.dropped,
            "privacy": self.privacy.status(),
            # Spooled updates a coordinator behind this agent refused as from the future: sent
            # again once it reaches their base versions (a full spool may have dropped some).
            "spool_waiting": len(self.waiting.keys() & {e.update_id for e in spooled}),
            "trained": self.counters.trained,
            "accepted": self.counters.accepted,
            "rejected": self.counters.rejected,
            "aborted": self.counters.aborted,
            "last_rejection": self.last_rejection,
            "approval": {"enabled": self.approval is not None,
                         "approved": self.counters.approved, "refused": self.counters.refused,
                         "last": self.last_approval},
            "held": len(self.held),
            "backoff_s": max(round(self._backoff_until - self.monotonic(), 1), 0.0),
            "model_rejection": self.model_rejection,
            "models_signed": self._verifier is not None,
            "connection": self._connection(),
            **({} if self.instance is None else self.instance.fields()),
        }

    def _connection(self) -> dict[str, Any]:
        if isinstance(self.link, ReportsConnection):
            return self.link.connection_info()
        return {"state": "online" if self.link.connected else "disconnected"}

    def publish_status(self) -> None:
        if self.link.connected:
            self.link.publish(self.topics.status(self.config.device_id),
                              json.dumps(self.status()).encode(), qos=1, retain=True)

    # -- persistence -------------------------------------------------------------------------
    def _load_progress(self) -> dict[str, int]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((self.state_dir / "progress.json").read_text())
            if isinstance(data, dict):
                return {k: int(v) for k, v in data.items()}
        return {}

    def _load_saved_snapshot(self) -> None:
        path = self.state_dir / "model.snapshot"
        if path.exists():
            try:
                self.snapshot = decode_saved(path.read_bytes())
                log.info("loaded saved model version %d", self.snapshot.version)
            except (OSError, WireError) as exc:
                log.warning("ignored the saved model: %s", exc)


def decode_saved(data: bytes) -> Snapshot:
    """The snapshot in a saved ``model.snapshot``: a full snapshot or a compact one (weights)."""
    if frame_kind(data) == "weights":
        return decode_weights(data).snapshot()
    return decode_snapshot(data)


def load_template(directory: Path, template_id: str) -> TemplateMessage | None:
    """The template `template_id` cached in `directory`, None when missing or unreadable."""
    path = directory / f"{template_id}.template"
    try:
        template = decode_template(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, WireError) as exc:
        log.warning("ignored the cached model template %s: %s", path, exc)
        return None
    if template.id != template_id:
        log.warning("ignored the cached model template %s: it holds %s", path, template.id)
        return None
    return template


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
