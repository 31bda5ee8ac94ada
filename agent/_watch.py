"""What the agent knows of the coordinator's model version, and the spooled updates that wait
for it.

A coordinator behind this agent (its state reset, or restored from an older backup) refuses an
update built on a model it does not have yet (a future_version ack). Deleting it would lose work
the coordinator can still take, so it stays spooled (within the spool's bounds) and goes again
once the coordinator reaches its base version; meanwhile the agent takes the coordinator's
model, although older, to train on what the fleet trains on now.
"""

from __future__ import annotations

import logging

from fedasync_iot.agent._shared import Shared
from fedasync_iot.agent._spool import Spool, Spooled

log = logging.getLogger("fedasync.agent")


class CoordinatorWatch:
    def __init__(self, shared: Shared, spool: Spool) -> None:
        self.shared = shared
        self.spool = spool
        self.version: int | None = None  # as last heard: announcement, ack, model
        # The version a future_version ack said the coordinator is at, while this agent holds
        # a later model (taken although older: `went_back_to`).
        self.behind: int | None = None
        # Spooled updates refused as from the future, by id: their base versions.
        self.waiting: dict[str, int | None] = {}

    def went_back_to(self, version: int) -> bool:
        """Whether a model older than the one held is the coordinator's current one (it said it
        went back to `behind` or below); not a stale copy of an older one."""
        return self.behind is not None and version >= self.behind

    def reached(self, base: int | None) -> bool:
        known = self.version
        return base is None or (known is not None and known >= base)

    def coordinator_at(self, version: int) -> None:
        """The coordinator's model is at `version` (an announcement, a model, an ack): send the
        spooled updates that waited for it to reach their base."""
        with self.shared.lock:
            self.version = version
            due = {u for u, base in self.waiting.items() if self.reached(base)}
            for u in due:
                del self.waiting[u]
        if not due:
            return
        entries = [e for e in self.spool.entries() if e.update_id in due]
        log.info("the coordinator reached model version %d: sending %d spooled update(s) that "
                 "waited for it", version, len(entries))
        if self.shared.link.connected:
            self.send(entries)

    def republish(self) -> None:
        """Connected (again): send everything still in the spool (the broker or coordinator may
        never have got it), but what waits for the coordinator to reach its base."""
        with self.shared.lock:
            waiting = {u for u, base in self.waiting.items() if not self.reached(base)}
        entries = [e for e in self.spool.entries() if e.update_id not in waiting]
        if entries:
            log.info("reconnected: republishing %d spooled update(s)", len(entries))
        if waiting:
            log.info("%d spooled update(s) wait for the coordinator to reach their base version",
                     len(waiting))
        self.send(entries)

    def send(self, entries: list[Spooled], *, again: bool = False) -> None:
        """Publish spooled updates; `again`: copies the resender chose (already counted)."""
        topic = self.shared.topics.update(self.shared.config.device_id)
        for e in entries:
            try:
                self.shared.link.publish(topic, e.read(), qos=1)
            except OSError:
                continue  # acked and removed meanwhile
            if not again:
                self.shared.published(e.update_id)

    def resend_unacked(self) -> None:
        """Send again the updates whose ack is overdue (agent._resend), but those that wait
        for the coordinator to reach their base version."""
        shared = self.shared
        with shared.lock:
            spooled = {e.update_id: e for e in self.spool.entries()}
            ids = spooled.keys() - self.waiting.keys()
            due = shared.resender.due(shared.net_clock(), ids)
            timeout = shared.resender.timeout()
        if due:
            log.info("no ack for %d update(s) within %.1f s: sending again (%s)", len(due),
                     timeout, ", ".join(due))
            self.send([spooled[u] for u in due], again=True)
