"""Prometheus metrics of one coordinator (its own registry, so several can run in one process)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fedasync_iot.coordinator._engine import Outcome
from fedasync_iot.coordinator._participation import Report


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
        self.ack_seconds = Histogram(
            "fedasync_update_ack_seconds", "From an update's arrival at the coordinator to its "
            "end-to-end ack, handed to the broker", registry=r,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
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
        self.republished = Counter("fedasync_snapshots_republished",
                                   "Retained models published again unchanged "
                                   "(snapshots.republish_s)", registry=r)
        self.bad_statuses = Counter("fedasync_device_status_ignored", "Device statuses whose "
                                    "privacy figures were refused, by reason", ["reason"],
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

    def bad_status(self, reason: str) -> None:
        self.bad_statuses.labels(reason).inc()
        self._tally[f"status_ignored:{reason}"] += 1

    def counts(self) -> dict[str, int]:
        return dict(self._tally)

    def watch_participation(self, report: Callable[[], Report]) -> None:
        """Participation metrics, computed from the ledger at scrape time (nothing per update)."""
        self.registry.register(_ParticipationCollector(report))


class _ParticipationCollector(Collector):
    """One series per device seen: fine for fleets of thousands; filter with metric_relabel
    configs in Prometheus if that is too many."""

    def __init__(self, report: Callable[[], Report]) -> None:
        self._report = report

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        r = self._report()
        yield GaugeMetricFamily("fedasync_participation_gini", "Gini coefficient of updates "
                                "taken per device in the window (0 = even)", value=r.gini)
        yield GaugeMetricFamily("fedasync_participation_max_median_ratio", "Largest over median "
                                "device share of merge weight in the window",
                                value=r.max_median_ratio or 0.0)
        yield GaugeMetricFamily("fedasync_participation_active_devices", "Devices with an update "
                                "taken in the window", value=r.active_devices)
        accepted = CounterMetricFamily("fedasync_device_updates_accepted", "Updates merged, per "
                                       "device", labels=["device"])
        samples = CounterMetricFamily("fedasync_device_samples", "Training samples behind merged "
                                      "updates, per device", labels=["device"])
        capped = CounterMetricFamily("fedasync_device_updates_capped", "Updates refused by the "
                                     "participation cap, per device", labels=["device"])
        share = GaugeMetricFamily("fedasync_device_window_share", "Share of merge weight in the "
                                  "window, per device", labels=["device"])
        for d in r.devices:
            accepted.add_metric([d.device_id], d.accepted)
            samples.add_metric([d.device_id], d.samples)
            capped.add_metric([d.device_id], d.capped)
            share.add_metric([d.device_id], d.window_share)
        yield from (accepted, samples, capped, share)
