"""The single writer: decode, validate, de-duplicate, merge and version updates, one batch at a
time, and make each batch durable with one commit (group commit).

No network here. The service feeds `Incoming` messages and sends the returned acks; the engine
decides. Ingest (decode + validate) is kept separable from merging so that several ingest workers
can later feed one merger (docs/architecture.md, "Growing past one machine").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedasync_iot.coordinator._guards import GuardConfig, check_update
from fedasync_iot.coordinator._participation import Ledger, ParticipationConfig
from fedasync_iot.coordinator._rules import Contribution, Merge, MergeRule
from fedasync_iot.coordinator._store import (
    Commit,
    Params,
    Relabel,
    Store,
    UpdateRecord,
    VersionRecord,
    checksum,
    load_ledger,
)
from fedasync_iot.models import (
    ROUTINE_REJECTIONS,
    Ack,
    AckStatus,
    InvalidUpdate,
    ModelError,
    ModelSpec,
    Rejection,
    StateError,
    UnsupportedSchema,
    UpdateMessage,
    WireError,
    decode_update,
    update_label,
)

log = logging.getLogger("fedasync.coordinator")

Evaluator = Callable[[Params], dict[str, float]]
# Lineage keeps rejections, but not of ids this device must not be credited with, nor of a base
# ahead of the model (see _reject).
_UNRECORDED = frozenset({Rejection.DEVICE_MISMATCH, Rejection.UPDATE_ID_CONFLICT,
                         Rejection.FUTURE_VERSION})


@dataclass(frozen=True, slots=True)
class Incoming:
    """One update as it came off the broker. `device_id` is the one in the topic (authenticated
    by the broker's ACL); `token` lets the service PUBACK the right message afterwards."""

    device_id: str | None
    payload: bytes
    received_at: float
    token: object = None
    topic: str | None = None  # for the log of a message that names no device


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one incoming message, and the end-to-end ack to send (if it has a device)."""

    device_id: str | None
    ack: Ack
    token: object
    staleness: int | None = None


@dataclass(slots=True)
class _Batch:
    records: dict[str, UpdateRecord] = field(default_factory=dict)
    versions: list[VersionRecord] = field(default_factory=list)
    relabel: list[Relabel] = field(default_factory=list)
    pending_changed: bool = False


class Engine:
    """Holds the current model and version; everything it changes goes through `Store.commit`."""

    def __init__(
        self,
        store: Store,
        rule: MergeRule,
        guards: GuardConfig,
        *,
        spec: ModelSpec,
        initial_params: Callable[[], Params],
        evaluator: Evaluator | None = None,
        eval_every: int = 1,
        max_message_bytes: int = 16 * 1024 * 1024,
        participation: ParticipationConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.rule = rule
        self.guards = guards
        self.evaluator = evaluator
        self.eval_every = max(1, eval_every)
        self.max_message_bytes = max_message_bytes
        self.clock = clock
        self.participation = (participation or ParticipationConfig()).for_rule(rule.name)
        stored_spec = store.spec()
        if stored_spec is None:
            params = np.asarray(initial_params(), dtype=np.float32)
            store.initialise(spec, params, now=clock())
            log.info("initialised state at version 0 (%d parameters)", params.size)
        elif stored_spec != spec:
            raise StateError(
                f"the state directory holds a model of another spec ({stored_spec}); "
                "use a new --state-dir or the same model settings")
        version = store.current_version()
        assert version is not None  # initialised above
        self.spec = spec
        self.version = version
        self.params = store.load_checkpoint(version)
        self.n_params = int(self.params.size)
        self.ledger = self._load_ledger()
        pending = store.pending()
        rule.restore(pending, now=clock())
        self.tick()  # a buffer saved under a smaller K (or another rule) may be due already
        if version and not self._metrics_of(version) and evaluator is not None:
            store.set_metrics(version, evaluator(self.params))
        log.info("resumed at version %d with %d buffered update(s)", version, len(pending))

    def _load_ledger(self) -> Ledger:
        return load_ledger(self.store, self.participation, now=self.clock())

    def _metrics_of(self, version: int) -> dict[str, float]:
        record = self.store.version(version)
        return {} if record is None else record.metrics

    @property
    def metrics(self) -> dict[str, float]:
        return self._metrics_of(self.version)

    # -- the batch path ----------------------------------------------------------------------
    def process(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """Handle a batch and commit it once. On return, every outcome's effect is durable."""
        start_version, start_params = self.version, self.params
        state = _Batch()
        decoded = [self._decode(item) for item in batch]
        # One query for the whole batch instead of one per update; nothing has changed yet if
        # it fails. Duplicates inside the batch are caught by `state.records`.
        known = self.store.known_updates(
            [m.update_id for m in decoded if isinstance(m, UpdateMessage)])
        outcomes = [self._one(item, m, known, state) if isinstance(m, UpdateMessage)
                    else self._reject_undecoded(item, *m)
                    for item, m in zip(batch, decoded, strict=True)]
        self._poll(state)
        self._commit_or_forget(state, start_version, start_params)
        return outcomes

    def tick(self) -> bool:
        """Time-driven work (a synchronous round's deadline); True if a new version was made."""
        state = _Batch()
        start_version, start_params = self.version, self.params
        self._poll(state)
        if state.versions:
            self._commit_or_forget(state, start_version, start_params)
        return bool(state.versions)

    def _commit_or_forget(self, state: _Batch, start_version: int, start_params: Params) -> None:
        try:
            self._commit(state, start_version)
        except StateError:
            # Nothing of this work is durable: forget it all, so memory matches disk (a batch's
            # messages are not PUBACKed and the broker redelivers them; a round's buffer comes
            # back from the store and its deadline is counted again).
            self.version, self.params = start_version, start_params
            self.rule.restore(self.store.pending(), now=self.clock())
            self.ledger = self._load_ledger()
            raise

    def _poll(self, state: _Batch) -> None:
        merge = self.rule.poll(self.params, now=self.clock())
        if merge is not None:
            self._apply(merge, state, source="merge")

    def _decode(self, item: Incoming) -> UpdateMessage | tuple[Rejection, str]:
        """The update in `item`, or why it does not decode (reason, detail)."""
        try:
            if item.device_id is None:
                raise InvalidUpdate(Rejection.BAD_TOPIC, "update topic does not name a device")
            if len(item.payload) > self.max_message_bytes:
                raise InvalidUpdate(Rejection.OVERSIZED, f"{len(item.payload)} bytes > "
                                                        f"{self.max_message_bytes}")
            # A wrong length stays the guards' "shape" rejection, more useful to the sender than
            # "malformed". But the byte limit alone does not bound the work: a top-k frame of
            # ~200 bytes may claim 10 million parameters (a 40 MB zero vector each, 20 GB for a
            # batch decoded at once: an OOM kill, then the same unacked batch again). A count
            # above both the model's and the message's size is malformed (tests/test_hostile.py).
            msg = decode_update(item.payload, max_message_bytes=self.max_message_bytes,
                                max_params=max(self.n_params, len(item.payload)))
        except InvalidUpdate as exc:
            return Rejection(exc.reason), str(exc)
        except UnsupportedSchema as exc:
            return Rejection.UNSUPPORTED_SCHEMA, str(exc)
        except WireError as exc:
            return Rejection.MALFORMED, str(exc)
        return msg

    def _one(self, item: Incoming, msg: UpdateMessage, committed: dict[str, UpdateRecord],
             state: _Batch) -> Outcome:
        known = state.records.get(msg.update_id) or committed.get(msg.update_id)
        if known is not None and known.device_id == msg.device_id == item.device_id:
            log.info("duplicate update %s from %s (%s), acked again", msg.update_id,
                     msg.device_id, known.outcome)
            return Outcome(item.device_id, Ack(update_id=msg.update_id, status="duplicate",
                                               reason=None, version=known.version,
                                               detail=f"already {known.outcome}"), item.token)
        staleness = self.version - msg.base_version
        now = self.clock()
        wait: float | None = None
        try:
            if msg.device_id != item.device_id:
                raise InvalidUpdate(Rejection.DEVICE_MISMATCH,
                                    f"payload names device {msg.device_id!r} but arrived on the "
                                    f"topic of device {item.device_id!r}")
            if known is not None:
                raise InvalidUpdate(Rejection.UPDATE_ID_CONFLICT,
                                    f"update id {msg.update_id} belongs to another device")
            reason = self.rule.accepts(msg.base_version, self.version)
            if reason is not None:
                raise InvalidUpdate(reason, f"base version {msg.base_version} is not the current "
                                            f"round's version {self.version}")
            # The cap counts arrival times, as lineage records them and the ledger rebuilt from
            # it after a restart does: not how long this update waited in the inbox.
            wait = self.ledger.retry_after(msg.device_id, now=item.received_at)
            if wait is not None:
                p = self.participation
                raise InvalidUpdate(Rejection.PARTICIPATION_CAP,
                                    f"{p.cap} update(s) per {p.window_s:g} s already taken; "
                                    f"retry in {wait:.0f} s")
            delta, clipped = check_update(msg.delta, n_params=self.n_params,
                                          staleness=staleness, config=self.guards)

            contribution = Contribution(update_id=msg.update_id, device_id=msg.device_id,
                                        base_version=msg.base_version, staleness=staleness,
                                        n_samples=msg.n_samples, delta=delta,
                                        participation=self.ledger.factor(msg.device_id, now=now))
            merge = self.rule.offer(self.params, contribution, now=now)
        except InvalidUpdate as exc:
            return self._reject(item, msg, staleness, exc, state, retry_after=wait)
        except ModelError as exc:  # the merge itself would be non-finite; the rule kept nothing
            failed = InvalidUpdate(Rejection.MERGE_FAILED, str(exc))
            return self._reject(item, msg, staleness, failed, state)
        state.records[msg.update_id] = UpdateRecord(
            update_id=msg.update_id, device_id=msg.device_id, base_version=msg.base_version,
            staleness=staleness, n_samples=msg.n_samples, received_at=item.received_at,
            outcome="buffered", clipped=clipped)
        self.ledger.taken(msg.device_id, now=item.received_at)
        state.pending_changed = True
        if merge is not None:
            self._apply(merge, state, source="merge")
        record = state.records[msg.update_id]
        status: AckStatus = "accepted" if record.outcome == "accepted" else "buffered"
        detail = "clipped to the norm bound" if clipped else ""
        return Outcome(item.device_id, Ack(update_id=msg.update_id, status=status, reason=None,
                                           version=record.version, detail=detail),
                       item.token, staleness)

    def _apply(self, merge: Merge, state: _Batch, *, source: str) -> None:
        self.version += 1
        self.params = np.asarray(merge.params, dtype=np.float32)
        state.pending_changed = True
        now = self.clock()
        state.versions.append(VersionRecord(
            version=self.version, created_at=now, n_updates=len(merge.included),
            checksum=checksum(self.params), source=source, metrics={}))
        for c, w in zip(merge.included, merge.weights, strict=True):
            # The version's time, as the ledger rebuilt from lineage after a restart sees it.
            self.ledger.merged(c.device_id, now=now, weight=float(w), staleness=c.staleness,
                               n_samples=c.n_samples)
            record = state.records.get(c.update_id)
            if record is not None:
                state.records[c.update_id] = replace(record, outcome="accepted",
                                                     version=self.version, weight=float(w))
            else:  # buffered in an earlier batch: relabel its committed row
                state.relabel.append(Relabel(c.update_id, "accepted", None, self.version,
                                             float(w)))

    def _reject_undecoded(self, item: Incoming, reason: Rejection, detail: str) -> Outcome:
        # Named whenever the header names it (a newer schema major, a damaged body): the sender
        # clears its spool by this id, and with none it would resend the update forever.
        update_id, _ = update_label(item.payload)
        log.warning("rejected message %s%s: %s (%s)",
                    f"on {item.topic}" if item.topic else f"from {item.device_id}",
                    "" if update_id is None else f", update {update_id}", reason, detail)
        return Outcome(item.device_id, Ack(update_id=update_id, status="rejected", reason=reason,
                                           version=self.version, detail=detail[:500]),
                       item.token)

    def _reject(self, item: Incoming, msg: UpdateMessage, staleness: int, exc: InvalidUpdate,
                state: _Batch, *, retry_after: float | None = None) -> Outcome:
        # Late work is routine in a fleet (a round closed, the model moved on): not a warning.
        level = logging.INFO if exc.reason in ROUTINE_REJECTIONS else logging.WARNING
        log.log(level, "rejected update %s from %s: %s (%s)", msg.update_id, item.device_id,
                exc.reason, exc)
        if exc.reason not in _UNRECORDED:
            # Lineage keeps rejections too; not for ids we must not attribute to this device,
            # nor a base ahead of the model: that is "not yet" (this state was reset, or restored
            # from an older backup), and the agent keeps the update to send it again once the
            # model reaches its base; recorded now, it would then be a "duplicate".
            state.records[msg.update_id] = UpdateRecord(
                update_id=msg.update_id, device_id=msg.device_id, base_version=msg.base_version,
                staleness=staleness, n_samples=msg.n_samples, received_at=item.received_at,
                outcome="rejected", reason=exc.reason)
            self.ledger.rejected(msg.device_id, exc.reason, now=item.received_at)
        return Outcome(item.device_id, Ack(update_id=msg.update_id, status="rejected",
                                           reason=exc.reason, version=self.version,
                                           detail=str(exc)[:500], retry_after_s=retry_after),
                       item.token, staleness)

    def _commit(self, state: _Batch, start_version: int) -> None:
        if self.version != start_version and self.evaluator is not None and (
            self.version // self.eval_every != start_version // self.eval_every
        ):
            last = state.versions[-1]
            state.versions[-1] = replace(last, metrics=self.evaluator(self.params))
        if not (state.records or state.versions or state.relabel):
            return
        self.store.commit(Commit(
            updates=list(state.records.values()),
            versions=state.versions,
            model=(self.version, self.params) if self.version != start_version else None,
            pending=self.rule.pending() if state.pending_changed else None,
            relabel=state.relabel,
        ))

    # -- operations --------------------------------------------------------------------------
    def rollback(self, to_version: int) -> int:
        """Publish the model of `to_version` again, as a new version. Buffered updates were
        trained against the models being rolled back, so they are dropped (still in lineage)."""
        params = self.store.load_checkpoint(to_version)
        dropped = self.rule.pending()
        self.rule.restore((), now=self.clock())
        state = _Batch(pending_changed=True, relabel=[
            Relabel(c.update_id, "rejected", "rolled_back", None, None) for c in dropped])
        start_version = self.version
        self.version += 1
        self.params = params
        state.versions.append(VersionRecord(
            version=self.version, created_at=self.clock(), n_updates=0,
            checksum=checksum(params), source=f"rollback:{to_version}", metrics={}))
        self._commit(state, start_version)
        if dropped:
            log.warning("rollback dropped %d buffered update(s)", len(dropped))
        log.info("rolled back to the model of version %d as version %d", to_version, self.version)
        return self.version

