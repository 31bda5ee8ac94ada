"""The coordinator's end-to-end acks: an acked update leaves the spool (QoS 1 is hop by hop,
this ack is end to end); a rejection is counted, and may ask the agent to back off; a
future_version rejection keeps the update for a coordinator that went back (agent._watch)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedasync_iot.agent._fetch import ModelFetcher
from fedasync_iot.agent._shared import Shared
from fedasync_iot.agent._spool import Spool
from fedasync_iot.agent._watch import CoordinatorWatch
from fedasync_iot.models import (
    ROUTINE_REJECTIONS,
    Ack,
    Rejection,
    WireError,
    decode_ack,
    update_label,
)

log = logging.getLogger("fedasync.agent")

# Stale work is routine (the fleet moved on); any other rejection is worth a warning.


class AckHandler:
    def __init__(self, shared: Shared, spool: Spool, watch: CoordinatorWatch,
                 fetcher: ModelFetcher, publish_status: Callable[[], None]) -> None:
        self.shared = shared
        self.spool = spool
        self.watch = watch
        self.fetcher = fetcher
        self._publish_status = publish_status
        self.last_rejection: str | None = None
        self.backoff_until = -float("inf")  # monotonic; set by a rejection with retry_after_s

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
        with self.shared.lock:
            self.shared.resender.acked(ack.update_id, self.shared.net_clock())
        if ack.status == "rejected" and ack.reason == Rejection.FUTURE_VERSION:
            self._wait_for_coordinator(ack, ack.update_id)
            return
        if ack.version is not None:
            self.watch.coordinator_at(ack.version)
        removed = self.spool.remove(ack.update_id)
        counters = self.shared.counters
        if ack.status == "rejected":
            counters.rejected += 1
            self.last_rejection = f"{ack.update_id}: {ack.reason}"
            routine = ack.reason in ROUTINE_REJECTIONS
            log.log(logging.INFO if routine else logging.WARNING, "update %s rejected: %s %s",
                    ack.update_id, ack.reason, ack.detail)
            if ack.retry_after_s is not None:
                with self.shared.lock:
                    self.backoff_until = self.shared.monotonic() + ack.retry_after_s
                    self.fetcher.sync()  # backing off: no model wanted for training meanwhile
                log.info("coordinator asks for no new update for %.0f s: backing off",
                         ack.retry_after_s)
        elif removed:
            counters.accepted += 1
            log.info("update %s %s (version %s)", ack.update_id, ack.status, ack.version)
        if removed:
            self._publish_status()

    def _wait_for_coordinator(self, ack: Ack, update_id: str) -> None:
        """The coordinator refused `update_id` as built on a model it does not have yet: its
        version is below the update's base (agent._watch)."""
        entry = next((e for e in self.spool.entries() if e.update_id == update_id), None)
        if entry is None:
            return  # dropped from a full spool, or answered meanwhile
        try:
            base = update_label(entry.read())[1]
        except OSError:
            return
        version = ack.version
        watch = self.watch
        with self.shared.lock:
            known = update_id in watch.waiting
            watch.waiting[update_id] = base
            snapshot = self.fetcher.cache.snapshot
            held = None if snapshot is None else snapshot.version
            news = version is not None and held is not None and version < held and (
                watch.behind != version)
            if news:
                watch.behind = version
                self.fetcher.follow_again()  # its retained model comes again
                self.fetcher.sync()
            watch.version = version
        if not known:
            self.shared.counters.rejected += 1
        self.last_rejection = f"{update_id}: future_version {ack.detail}"
        if news:
            log.warning("the coordinator is at model version %s, behind update %s (base version "
                        "%s) and model version %s held here: its state was reset, or restored "
                        "from an older backup. Keeping its updates in the spool (at most %d) "
                        "until it reaches their base version, and taking its model", version,
                        update_id, base, held, self.shared.config.spool_max_count)
        elif not known:
            log.info("update %s (base version %s) kept in the spool until the coordinator, at "
                     "version %s, reaches its base", update_id, base, version)
        self._publish_status()
