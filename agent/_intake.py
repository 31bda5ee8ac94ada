"""What arrives on the model topics (agent._fetch subscribed to them): the announcement, and
the snapshot, weights or template, verified (agent._receipt) and taken into the model cache, or
refused with the model held kept.

`wake`, when set, is called when something arrived that may let the agent train now (a newer
model), so its owner can step it at once rather than at its next poll; it is called on the
network thread and must only hand the work over.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from fedasync_iot.agent._fetch import ModelFetcher
from fedasync_iot.agent._model_cache import ModelCache
from fedasync_iot.agent._progress import TrainingProgress
from fedasync_iot.agent._receipt import NoTemplate, Receipt
from fedasync_iot.agent._shared import Shared
from fedasync_iot.agent._watch import CoordinatorWatch
from fedasync_iot.models import Snapshot, WireError, decode_announcement

log = logging.getLogger("fedasync.agent")


class ModelIntake:
    def __init__(self, shared: Shared, fetcher: ModelFetcher, receipt: Receipt,
                 cache: ModelCache, watch: CoordinatorWatch, progress: TrainingProgress,
                 publish_status: Callable[[], None]) -> None:
        self.shared = shared
        self.fetcher = fetcher
        self.receipt = receipt
        self.cache = cache
        self.watch = watch
        self.progress = progress
        self._publish_status = publish_status
        self.wake: Callable[[], None] | None = None
        self.model_rejection: str | None = None  # why the last model offered was refused
        self.fetches = 0
        self.fetched_bytes = 0
        # The last snapshot or template received: version, bytes, kind, wall time, refused.
        self.last_fetch: dict[str, Any] | None = None

    def on_announce(self, payload: bytes) -> None:
        """The coordinator's announcement of the snapshot the broker holds: fetch it if this
        agent would use it now (network thread: only subscriptions change here)."""
        try:
            announcement = decode_announcement(payload)
        except WireError as exc:
            log.warning("ignored a model announcement that does not decode: %s", exc)
            return
        self.watch.coordinator_at(announcement.version)
        with self.shared.lock:
            nothing_to_fetch = self.fetcher.heard(announcement)
            # Heard, and nothing to fetch: the model held is the newest. If it has not trained
            # on it yet, that may be all that kept it from training (a fetch wakes it when the
            # model arrives); woken on a model it already trained on, it would train again.
            held = self.cache.snapshot
            untrained = held is not None and held.version > self.progress.last_base_version
            current = nothing_to_fetch and untrained
        self.fetcher.notify()
        if current and self.wake is not None:
            self.wake()

    def on_model(self, payload: bytes) -> None:
        """A full snapshot (model topic): weights and, when the coordinator includes it, ONNX."""
        self._receive(payload, "model", self.receipt.full)

    def on_weights(self, payload: bytes) -> None:
        """A compact snapshot (weights topic)."""
        self._receive(payload, "weights", self.receipt.compact)

    def on_template(self, payload: bytes) -> None:
        """The model's template (template topic): verified and cached on disk by its id; a
        fetch under way goes on to the weights (a template and its weights are one fetch)."""
        with self.shared.lock:
            self.fetches += 1
            self.fetched_bytes += len(payload)
        try:
            template, frame = self.receipt.template(payload)
        except WireError as exc:
            with self.shared.lock:
                a = self.fetcher.announcement
                # Not fetched again for this announcement: the same bytes would be refused.
                self.fetcher.refused(a.weights_sha256 if a is not None and a.compact
                                     else hashlib.sha256(payload).hexdigest())
                self._fetched(None, payload, "template")
                self.fetcher.sync()
            self._refuse(f"model template: {exc}")
            return
        with self.shared.lock:
            a = self.fetcher.announcement
            if a is None or a.template != template.id:
                log.info("ignored model template %s: not the announced one", template.id[:12])
                return
            self.cache.keep_template(template.id, frame)
            log.info("cached model template %s (%d bytes)", template.id[:12], len(payload))
            self.fetcher.template_cached()

    def _fetched(self, version: int | None, payload: bytes, kind: str) -> None:
        self.last_fetch = {"version": version, "bytes": len(payload), "kind": kind,
                           "at": self.shared.clock(), "refused": version is None}

    def _refuse(self, why: str) -> None:
        self.model_rejection = why
        held = self.cache.snapshot
        log.warning("refused a model, keeping version %s: %s",
                    None if held is None else held.version, why)
        self.fetcher.notify()
        self._publish_status()

    def _receive(self, payload: bytes, kind: str,
                 decode: Callable[[bytes], tuple[Snapshot, bytes]]) -> None:
        lock, fetcher = self.shared.lock, self.fetcher
        with lock:
            fetched = fetcher.start_verifying()
            self.fetches += 1
            self.fetched_bytes += len(payload)
        try:
            snapshot, frame = decode(payload)
        except NoTemplate as exc:
            log.info("model weights name template %s, not cached: fetching it", str(exc)[:12])
            with lock:
                fetcher.stop_verifying()
                fetcher.sync()
            return
        except WireError as exc:
            with lock:
                fetcher.stop_verifying()
                fetcher.refused(hashlib.sha256(payload).hexdigest())
                self._fetched(None, payload, kind)
                fetcher.sync()
            self._refuse(str(exc))
            return
        except BaseException:
            with lock:
                fetcher.stop_verifying()
            raise
        with lock:
            fetcher.stop_verifying(current=True)
            self._fetched(snapshot.version, payload, kind)
            taken, back, held = self._take(snapshot, frame)
            fetcher.sync()
        if not taken:
            fetcher.notify()
            return  # nothing new (a same-version snapshot may widen a round's cohort)
        if back:
            assert held is not None
            log.warning("took the coordinator's model version %d, older than version %d held "
                        "here: the coordinator went back (its state was reset, or restored from "
                        "an older backup)", snapshot.version, held.version)
        self.watch.coordinator_at(snapshot.version)
        log.info("new model version %d%s%s", snapshot.version,
                 f" (accuracy {snapshot.metrics['accuracy']:.3f})"
                 if "accuracy" in snapshot.metrics else "",
                 f", fetched ({len(payload)} bytes{', compact' if kind == 'weights' else ''})"
                 if fetched else "")
        fetcher.notify()
        self._publish_status()
        if self.wake is not None:
            self.wake()

    def _take(self, snapshot: Snapshot, frame: bytes) -> tuple[bool, bool, Snapshot | None]:
        """Keep `snapshot` if it is new: (taken, older than the one held, the one held)."""
        held = self.cache.snapshot
        back = (held is not None and snapshot.version < held.version
                and self.watch.went_back_to(snapshot.version))
        if held is not None and snapshot.spec == held.spec and not back and (
            snapshot.version < held.version
            or (snapshot.version == held.version and snapshot.cohort == held.cohort)
        ):
            return False, False, held
        self.model_rejection = None
        self.cache.keep(snapshot, frame)
        if back:
            self.watch.behind = None
            # Not trained on yet, whatever the number says: the retrain-on-a-new-model rule
            # and the wake on an announcement compare with it.
            self.progress.forget_base()
        return True, back, held
