"""Prometheus metrics of one coordinator (its own registry, so several can run in one process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator._engine import Outcome


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.updates = Counter("fedasync_updates", "Updates received, by outcome",
                               ["status"], registry=r)
        self.rejected = Counter("fedasync_updates_rejected", "Rejected updates, by reason",
                                ["reason"], registry=r)
        self.staleness = Histogram("fedasync_update_staleness", "Staleness of received updates "
                                   "(versions behind)", buckets=(0, 1, 2, 4, 8, 16, 32, 64),
                                   registry=r)
        self.batch_seconds = Histogram("fedasync_merge_batch_seconds", "Time to validate, merge "
                                       "and durably commit one batch", registry=r)
        self.batch_size = Histogram("fedasync_merge_batch_size", "Updates per group commit",
                                    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r)
        self.version = Gauge("fedasync_model_version", "Current global model version",
                             registry=r)
        self.devices_seen = Gauge("fedasync_devices_seen", "Distinct devices that sent updates",
                                  registry=r)
        self.connected = Gauge("fedasync_broker_connected", "1 while connected to the broker",
                               registry=r)
        self.snapshots = Counter("fedasync_snapshots_published", "Model snapshots published",
                                 registry=r)
        self._tally: Tally[str] = Tally()

    def observe_batch(self, outcomes: Sequence[Outcome], seconds: float) -> None:
        self.batch_seconds.observe(seconds)
        self.batch_size.observe(len(outcomes))
        for o in outcomes:
            self.updates.labels(o.ack.status).inc()
            self._tally[o.ack.status] += 1
            if o.ack.reason is not None:
                self.rejected.labels(o.ack.reason).inc()
                self._tally[f"rejected:{o.ack.reason}"] += 1
            if o.staleness is not None and o.staleness >= 0:
                self.staleness.observe(o.staleness)

    def counts(self) -> dict[str, int]:
        return dict(self._tally)
