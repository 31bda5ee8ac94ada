"""The edge agent's logic, independent of how it reaches the broker.

`Agent` reacts to three things: a model snapshot, an ack, and `poll()` (called every few
seconds). A `Link` carries its messages; `agent._runner` gives it a paho client for a real
device, the fleet simulator gives many agents a shared one. Nothing finished is ever lost: an
update is spooled to disk before it is published and leaves the spool only when acked.

Site control (`agent._hooks`): eligibility hooks are extra checks in the gate; an approval hook,
when configured, sees each finished update's metadata before it is spooled, and a refused update
is never sent: it is dropped or held for an operator (`agent._held`), as ``on_refused`` says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from agent._config import AgentConfig
from agent._data import DataSource
from agent._held import HeldUpdates
from agent._hooks import Approval, load_approval, load_eligibility_hooks, update_metadata
from agent._policy import Decision, EligibilityGate
from agent._readings import ReadingsSource
from agent._spool import Spool
from agent._trainer import train_update
from models import FedAsyncError, Topics, WireError
from models import _signing as signing
from models._wire import Snapshot, UpdateMessage, decode_ack, decode_snapshot, encode_update

log = logging.getLogger("fedasync.agent")

Trainer = Callable[..., "UpdateMessage | None"]


class Link(Protocol):
    """What the agent needs from an MQTT connection."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
                ) -> None: ...


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
        trainer: Trainer = train_update,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.topic_root)
        self.link = link
        self.reader = reader
        self.data = data
        self.clock = clock
        self.monotonic = monotonic
        self.trainer = trainer
        self.rng = rng or np.random.default_rng()
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
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
        self._backoff_until = -float("inf")  # monotonic; set by a rejection with retry_after_s
        self._load_saved_snapshot()

    # -- inputs ------------------------------------------------------------------------------
    def on_connected(self) -> None:
        """Send everything still in the spool (the broker or coordinator may never have got it)."""
        entries = self.spool.entries()
        if entries:
            log.info("reconnected: republishing %d spooled update(s)", len(entries))
        for e in entries:
            try:
                self.link.publish(self.topics.update(self.config.device_id), e.read(), qos=1)
            except OSError:
                continue  # acked and removed meanwhile
        self.publish_status()

    def on_model(self, payload: bytes) -> None:
        try:
            frame = (self._verifier.verify(payload) if self._verifier is not None
                     else signing.split(payload)[0])
            snapshot = decode_snapshot(frame)
        except WireError as exc:
            self.model_rejection = str(exc)
            log.warning("refused a model snapshot, keeping version %s: %s",
                        None if self.snapshot is None else self.snapshot.version, exc)
            self.publish_status()
            return
        with self._lock:
            current = self.snapshot
            if current is not None and snapshot.spec == current.spec and (
                snapshot.version < current.version
                or (snapshot.version == current.version and snapshot.cohort == current.cohort)
            ):
                return  # nothing new (a same-version snapshot may widen a round's cohort)
            self.snapshot = snapshot
            self.model_rejection = None
            _atomic_write(self.state_dir / "model.snapshot", frame)
        log.info("new model version %d%s", snapshot.version,
                 f" (accuracy {snapshot.metrics['accuracy']:.3f})"
                 if "accuracy" in snapshot.metrics else "")
        self.publish_status()

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
        removed = self.spool.remove(ack.update_id)
        if ack.status == "rejected":
            self.counters.rejected += 1
            self.last_rejection = f"{ack.update_id}: {ack.reason}"
            # Stale work is routine (the fleet moved on); anything else is worth a warning.
            routine = ack.reason in ("too_stale", "wrong_round", "participation_cap")
            log.log(logging.INFO if routine else logging.WARNING, "update %s rejected: %s %s",
                    ack.update_id, ack.reason, ack.detail)
            if ack.retry_after_s is not None:
                self._backoff_until = self.monotonic() + ack.retry_after_s
                log.info("coordinator asks for no new update for %.0f s: backing off",
                         ack.retry_after_s)
        elif removed:
            self.counters.accepted += 1
            log.info("update %s %s (version %s)", ack.update_id, ack.status, ack.version)
        if removed:
            self.publish_status()

    # -- the periodic step -------------------------------------------------------------------
    def poll(self) -> Decision:
        """Re-read the device, and train + send one update if everything allows it."""
        decision = self.check()
        if self.should_train(decision):
            self.train_once()
        return decision

    def check(self) -> Decision:
        previous = self.decision
        self.decision = self.gate.update(self.reader.read(), now=self.monotonic())
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
                self.monotonic() >= self._backoff_until)

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
        if snapshot is None:
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
        log.info("training on %d samples (%d new) from model version %d", n, max(new, 0),
                 snapshot.version)
        try:
            update = self.trainer(snapshot, X, y, device_id=self.config.device_id,
                                  config=self.config.training, rng=self.rng,
                                  should_stop=self._stop_training, now=self.clock())
        except FedAsyncError as exc:
            log.error("training failed: %s", exc)
            return None
        if update is None:
            self.abort(self.decision.reason if self.decision else "stopped")
        return update

    def abort(self, reason: str) -> None:
        """Training was cut short (the device stopped allowing it): nothing is sent."""
        self.counters.aborted += 1
        log.info("training stopped early: %s", reason)

    def deliver(self, update: UpdateMessage) -> None:
        """Ask the approval hook (if any), then spool (durably) and publish; the spool keeps it
        until the coordinator acks it. A refused update is dropped or held, never sent."""
        self.counters.trained += 1
        payload = encode_update(update, topk_fraction=self.config.training.topk_fraction)
        verdict = self._ask_approval(update, payload)
        send = verdict is None or verdict.approved
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
        return {
            "state": state,
            "device_id": self.config.device_id,
            "time": self.clock(),
            "eligible": None if d is None else d.eligible,
            "reason": None if d is None else d.reason,
            "checks": None if d is None else d.to_dict()["checks"],
            "model_version": None if self.snapshot is None else self.snapshot.version,
            "spool_depth": len(self.spool),
            "spool_dropped": self.spool.dropped,
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
                self.snapshot = decode_snapshot(path.read_bytes())
                log.info("loaded saved model version %d", self.snapshot.version)
            except (OSError, WireError) as exc:
                log.warning("ignored the saved model: %s", exc)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
