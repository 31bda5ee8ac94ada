"""How the coordinator's time passes and its background work runs.

Production reads the wall clock and runs the work on two threads (`Threads`): the writer
(batches, commits, acks) and the snapshot publisher. The simulator's virtual clock
(fleet/_virtual.py) gives its own `Clock` and a `Stepped` scheduler: no threads; it calls `step`
when it has moved time or delivered messages. The service treats both alike: it hands its parts
to whichever scheduler it was given.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import TYPE_CHECKING, Protocol

from fedasync_iot.models import StateError

if TYPE_CHECKING:
    from fedasync_iot.coordinator._intake import Intake
    from fedasync_iot.coordinator._publisher import Publisher
    from fedasync_iot.coordinator._transport import Delivery, ReceivedWatcher, SentWatcher


class Clock(Protocol):
    """`time`: wall seconds (timestamps others read); `monotonic`: for intervals."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class WallClock:
    """The machine's clocks."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class Work(Protocol):
    """The parts of a service a scheduler runs."""

    @property
    def intake(self) -> Intake: ...

    @property
    def publisher(self) -> Publisher: ...

    def watch_traffic(self, *, sent: SentWatcher | None = None,
                      received: ReceivedWatcher | None = None) -> None: ...


class Scheduler(Protocol):
    """Runs a service's background work from `start` until the service stops (its parts watch
    the service's stop event), then `join` waits for it."""

    def start(self, work: Work) -> None: ...

    def join(self, timeout: float) -> None: ...


class Threads:
    """Production: the writer and the snapshot publisher each on a thread of its own."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def start(self, work: Work) -> None:
        for target, name in ((work.intake.run, "writer"), (work.publisher.run, "snapshots")):
            t = threading.Thread(target=target, name=f"coordinator-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout=timeout)


class Stepped:
    """No threads: whoever drives the service (the simulator's virtual clock) calls `step` to
    do its work, at the times `next_due` names or when messages have arrived."""

    def __init__(self) -> None:
        self._work: Work | None = None
        # What was published since the last step, to wait for the broker's PUBACKs before a step
        # returns, and to which device (None: any device may get it).
        self._outgoing: queue.SimpleQueue[tuple[Delivery, str | None]] = queue.SimpleQueue()

    def start(self, work: Work) -> None:
        self._work = work
        work.watch_traffic(sent=self._sent)

    def join(self, timeout: float) -> None:
        pass

    def _sent(self, topic: str, payload: bytes, delivery: Delivery) -> None:
        work = self._started()
        topics = work.intake.topics
        device = topics.device_of(topic, "ack")
        if device is not None:
            self._outgoing.put((delivery, device))
        elif topic == topics.announce:
            self._outgoing.put((delivery, None))

    def _started(self) -> Work:
        if self._work is None:
            raise RuntimeError("the service has not started")
        return self._work

    def step(self, *, timeout: float = 60.0) -> tuple[bool, frozenset[str] | None]:
        """Merge everything received so far, in a fixed order (whatever order the network
        delivered it in), close what time has completed and publish a due snapshot; return
        once the broker has acknowledged all of it. Returns whether anything happened and the
        devices that may have been sent something (acks); None: any device (a snapshot or an
        announcement)."""
        work = self._started()
        before = work.intake.version
        merged = work.intake.merge_received()
        work.intake.keep_time()
        published = work.publisher.publish_if_due()
        reached: set[str | None] = {None} if published else set()
        with contextlib.suppress(queue.Empty):
            while True:
                delivery, device = self._outgoing.get_nowait()
                delivery.wait_for_publish(timeout=timeout)
                if not delivery.is_published():
                    raise StateError(
                        f"the broker did not acknowledge a publish in {timeout:g} s")
                reached.add(device)
        happened = merged or published or work.intake.version != before
        return happened, (None if None in reached
                          else frozenset(d for d in reached if d is not None))

    def next_due(self) -> float | None:
        """The time (on the service's clock: a stepped service runs on one clock) at which
        `step` has work without a new message: a snapshot held back by the interval, a round's
        deadline; None if there is none."""
        work = self._started()
        times = [work.intake.next_deadline(), work.publisher.next_due()]
        return min((t for t in times if t is not None), default=None)
