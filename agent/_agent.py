"""The edge agent's logic, independent of how it reaches the broker.

`Agent` reacts to four things: a model announcement, a model snapshot, an ack, and `poll()`
(called every few seconds). A `Link` carries its messages; `agent._runner` gives it a paho
client for a real device, the fleet simulator gives many agents a shared one. Nothing finished
is ever lost: an update is spooled to disk before it is published and leaves the spool only
when acked.

`Agent` composes its parts and keeps the eligibility gate, training and delivery: the model
fetcher (models on demand, `agent._fetch`) and what arrives on the model topics
(`agent._intake`, verified by `agent._receipt`), the model held on disk (`agent._model_cache`),
the coordinator's acks (`agent._acks`) and what it knows of the coordinator's version
(`agent._watch`). Its link and clocks are shared by all of them (`agent._shared`).

Site control (`agent._hooks`): eligibility hooks are extra checks in the gate; an approval hook,
when configured, sees each finished update's metadata before it is spooled, and a refused update
is never sent: it is dropped or held for an operator (`agent._held`), as ``on_refused`` says.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedasync_iot.agent._acks import AckHandler
from fedasync_iot.agent._budget import WorkBudget
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import DataSource
from fedasync_iot.agent._fetch import ModelFetcher
from fedasync_iot.agent._held import HeldUpdates
from fedasync_iot.agent._hooks import (
    Approval,
    load_approval,
    load_eligibility_hooks,
    update_metadata,
)
from fedasync_iot.agent._instance import Instance
from fedasync_iot.agent._intake import ModelIntake
from fedasync_iot.agent._link import Link, ReportsConnection
from fedasync_iot.agent._model_cache import ModelCache
from fedasync_iot.agent._policy import Decision, EligibilityGate
from fedasync_iot.agent._privacy import PrivacyLedger, account_here, account_in_child
from fedasync_iot.agent._progress import TrainingProgress
from fedasync_iot.agent._readings import ReadingsSource
from fedasync_iot.agent._receipt import Receipt
from fedasync_iot.agent._shared import Counters, Forward, Shared
from fedasync_iot.agent._spool import Spool
from fedasync_iot.agent._trainer import train_update
from fedasync_iot.agent._watch import CoordinatorWatch
from fedasync_iot.models import (
    Announcement,
    FedAsyncError,
    Snapshot,
    StateError,
    TemplateMessage,
    UpdateMessage,
    encode_update,
)

# Where they were before the agent was split: agent._predict and agent.cli import them here.
__all__ = ["Agent"]

log = logging.getLogger("fedasync.agent")

Trainer = Callable[..., "UpdateMessage | None"]


class Agent:
    # Kept on the part that owns them; settable here, as before the split (a test's clock).
    config = Forward[AgentConfig]("shared")
    link = Forward[Link]("shared")
    clock = Forward[Callable[[], float]]("shared")
    monotonic = Forward[Callable[[], float]]("shared")
    net_clock = Forward[Callable[[], float]]("shared")
    counters = Forward[Counters]("shared")
    snapshot = Forward[Snapshot | None]("cache")
    wake = Forward[Callable[[], None] | None]("intake")
    announcement = Forward[Announcement | None]("fetcher")
    model_rejection = Forward[str | None]("intake")  # why the last model offered was refused
    fetches = Forward[int]("intake")
    fetched_bytes = Forward[int]("intake")
    last_fetch = Forward[dict[str, Any] | None]("intake")
    last_rejection = Forward[str | None]("ack_handler")

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
        self.shared = Shared(config, link, clock, monotonic, net_clock)
        self._lock = self.shared.lock
        # Named in the status (agent._instance; set by agent._runner): a simulator has none.
        self.instance: Instance | None = None
        self.topics = self.shared.topics
        self.reader = reader
        self.data = data
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
        self.cache = ModelCache(self.state_dir)
        self.templates_dir = self.cache.templates_dir
        self.spool = Spool(self.state_dir / "spool", max_count=config.spool_max_count,
                           max_bytes=config.spool_max_bytes)
        self.held = HeldUpdates(self.state_dir / "held", max_count=config.spool_max_count,
                                max_bytes=config.spool_max_bytes)
        # Imported now, so a hook that cannot load stops the agent at start (ConfigError).
        self.gate = EligibilityGate(config.policy,
                                    extra_checks=load_eligibility_hooks(config.eligibility_hooks))
        self.approval = load_approval(config.approval_hook, timeout_s=config.approval_timeout_s)
        self.last_approval: dict[str, Any] | None = None
        self.decision: Decision | None = None
        receipt = Receipt(self.cache, config.coordinator_public_keys)
        self.progress = TrainingProgress(self.state_dir)
        self._last_train_at = -float("inf")
        # Local work fitted to the device's eligible windows (agent/_budget.py; off unless
        # training.window_fraction > 0); `last_work` is what the latest training did.
        self.budget = WorkBudget(config.training.window_fraction)
        # The lifetime privacy ledger (agent/_privacy.py): at its budget, nothing more is sent.
        self.privacy = PrivacyLedger(
            self.state_dir, config.privacy, noise_multiplier=config.training.noise_multiplier,
            accountant=account_in_child if config.train_in_subprocess else account_here)
        self.last_work: tuple[int, int] = (0, config.training.local_epochs)
        self.model_wait_s = 10.0  # how long `poll` waits for an announcement or a fetch
        self._in_flight = False  # training, or (simulator) its update not yet delivered
        self._rewritten_seen = False  # a topic the broker rewrote ('.' -> '/'), logged once
        self.watch = CoordinatorWatch(self.shared, self.spool)
        self.fetcher = ModelFetcher(self.shared, self.cache, self.watch,
                                    network_allows=self._network_allows_fetching,
                                    wants_to_train=self._wants_to_train)
        self.intake = ModelIntake(self.shared, self.fetcher, receipt, self.cache, self.watch,
                                  self.progress, self.publish_status)
        self.ack_handler = AckHandler(self.shared, self.spool, self.watch, self.fetcher,
                                      self.publish_status)
        self.cache.load()

    # -- inputs ------------------------------------------------------------------------------
    def on_connected(self) -> None:
        """Send everything still in the spool (the broker or coordinator may never have got it),
        and subscribe again to what the agent wants now."""
        if self.fetcher.reconnected():
            # Only then the first check (the network decides whether fetching is allowed),
            # whose sync subscribes: before the slate, its subscription was made twice and the
            # retained snapshot arrived twice.
            if self.decision is None:
                self.check()
            with self._lock:
                self.fetcher.sync()
        self.watch.republish()
        self.publish_status()

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
        self.intake.on_announce(payload)

    def on_model(self, payload: bytes) -> None:
        self.intake.on_model(payload)

    def on_weights(self, payload: bytes) -> None:
        self.intake.on_weights(payload)

    def on_template(self, payload: bytes) -> None:
        self.intake.on_template(payload)

    def on_ack(self, payload: bytes) -> None:
        self.ack_handler.on_ack(payload)

    def cached_template(self, template_id: str) -> TemplateMessage | None:
        """The cached template `template_id`, None when missing or unreadable (fetched again)."""
        return self.cache.template(template_id)

    @property
    def waiting(self) -> dict[str, int | None]:
        """Spooled updates kept until the coordinator reaches their base version (by id)."""
        with self._lock:
            return dict(self.watch.waiting)

    # -- the periodic step -------------------------------------------------------------------
    def poll(self) -> Decision:
        """Re-read the device, and train + send one update if everything allows it. When it
        wants a model, it waits (at most `model_wait_s`) for the announcement and the fetch it
        starts, so that it trains on the newest model (blocking: the simulator never polls)."""
        decision = self.check()
        self.resend_unacked()
        self.fetcher.await_model(self.model_wait_s)
        if self.should_train(decision):
            self.train_once()
        return decision

    def check(self) -> Decision:
        previous = self.decision
        self.decision = self.gate.update(self.reader.read(), now=self.monotonic())
        self.budget.observe(self.decision.eligible, self.monotonic())
        with self._lock:
            self.fetcher.sync()
        if previous is None or previous.eligible != self.decision.eligible:
            log.info("eligible: %s (%s)", "yes" if self.decision.eligible else "no",
                     self.decision.reason)
            self.publish_status()
        return self.decision

    def resend_unacked(self) -> None:
        """Sessionless (the broker keeps no ack for this device): send again each update whose
        ack is overdue (agent._resend). A persistent session's broker keeps the acks instead."""
        if self.config.session == "sessionless" and self.link.connected:
            self.watch.resend_unacked()

    def should_train(self, decision: Decision) -> bool:
        snapshot = self.snapshot
        return (decision.eligible and snapshot is not None and
                # A synchronous round names the devices it wants; the others sit it out.
                (snapshot.cohort is None or self.config.device_id in snapshot.cohort) and
                self.monotonic() - self._last_train_at >= self.config.min_train_interval_s and
                self.monotonic() >= self.ack_handler.backoff_until and self.model_is_newest())

    def model_is_newest(self) -> bool:
        """Whether the held model is the newest this agent would train on (agent._fetch)."""
        return self.fetcher.model_is_newest()

    def interrupt(self) -> None:
        """End a poll's wait for the model at once, and every later one: the owner is stopping
        (AgentRunner.stop, from a signal handler or another thread). A stopped agent waited up to
        `model_wait_s` for an announcement before its loop could end."""
        self.fetcher.interrupt()

    # -- what the fetcher asks (under the lock) ----------------------------------------------
    def _network_allows_fetching(self) -> bool:
        if self.config.fetch_on_metered:
            return True
        d = self.decision  # metered: no interface the policy allows is up
        return d is not None and any(c.passed for c in d.checks if c.name == "network")

    def _wants_to_train(self) -> bool:
        """Eligible and due: a newer model announced now would be trained on, unless training
        is under way already."""
        d = self.decision
        return d is not None and d.eligible and self._due() and not self._in_flight

    def _due(self) -> bool:
        now = self.monotonic()
        return (now - self._last_train_at >= self.config.min_train_interval_s
                and now >= self.ack_handler.backoff_until and self.privacy.allows_next())

    # -- training and delivery ---------------------------------------------------------------
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
        new = n - self.progress.samples_at_last_train
        newer_model = snapshot.version > self.progress.last_base_version
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
            self.fetcher.sync()  # done: a newer model already announced is fetched now

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
        self.progress.record(n_samples=update.n_samples, base_version=update.base_version)
        if send and self.link.connected:
            self.link.publish(self.topics.update(self.config.device_id), payload, qos=1)
            self.shared.published(update.update_id)
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
            "models": self.fetcher.mode.value,
            "announced_version": None if self.announcement is None else self.announcement.version,
            "last_fetch": self.last_fetch,
            "fetches": self.fetches,
            "fetched_bytes": self.fetched_bytes,
            "spool_depth": len(spooled),
            "spool_dropped": self.spool.dropped,
            # How the broker holds this device's acks, and when an unacked update goes again.
            "session": {"mode": self.config.session, **self.shared.resender.status()},
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
            "backoff_s": max(round(self.ack_handler.backoff_until - self.monotonic(), 1), 0.0),
            "model_rejection": self.model_rejection,
            "models_signed": self.intake.receipt.verifier is not None,
            "connection": self._connection(),
            "model_fetch": self.fetcher.state.value,  # agent._fetch.FetchState
            **({} if self.instance is None else self.instance.fields()),
        }

    def _connection(self) -> dict[str, Any]:
        if isinstance(self.link, ReportsConnection):
            return self.link.connection_info()
        return {"state": "online" if self.link.connected else "disconnected"}

    def publish_status(self) -> None:
        # QoS 0: each status is whole and the next replaces it, so a lost one costs nothing,
        # while QoS 1 costs a PUBACK and, on NATS, a JetStream write per status (the last will
        # and the final offline status stay QoS 1).
        if self.link.connected:
            self.link.publish(self.topics.status(self.config.device_id),
                              json.dumps(self.status()).encode(), qos=0, retain=True)
