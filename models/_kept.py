"""A subscription asked again, with backoff, for as long as the broker refuses it.

Brokers may refuse a subscription (NATS does when it cannot create the JetStream consumer behind
it in time, docs/scaling.md); without the subscription nothing arrives, so both services ask
again until it is granted. The caller says what a refusal and a grant mean to it."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

from fedasync_iot.models._backoff import Backoff
from fedasync_iot.models._mqtt_client import Client, PacketAck


class KeptSubscription:
    def __init__(self, client: Client, topics: list[tuple[str, int]], *, backoff: Backoff,
                 active: Callable[[], bool],
                 on_refused: Callable[[PacketAck, float], None],
                 on_granted: Callable[[int], None],
                 rng: random.Random | None = None) -> None:
        """`active()`: whether asking again makes sense now (online, not stopping; offline, the
        next connection subscribes anyway). `on_refused(ack, next_try_s)` after `refusals` went
        up; `on_granted(refusals_before)`."""
        self._client, self._topics, self._backoff = client, topics, backoff
        self._active, self._on_refused, self._on_granted = active, on_refused, on_granted
        self._rng = rng
        self._lock = threading.Lock()  # a retry subscribes from a timer thread
        self._mid: int | None = None  # the SUBSCRIBE's packet id, until its SUBACK
        self.refusals = 0  # in a row; 0 once granted

    def subscribe(self, also: list[tuple[str, int]] | None = None) -> None:
        """Subscribe; `also`: more topics in the same SUBSCRIBE packet, this time only (a
        broker that stores subscriptions, NATS, writes once per packet)."""
        with self._lock:
            self._mid = self._client.subscribe(self._topics + (also or []))

    def acked(self, ack: PacketAck) -> None:
        """The client's `on_acked`: a SUBACK of this subscription, granted or refused."""
        with self._lock:
            if ack.kind != "subscribe" or ack.mid != self._mid:
                return
            self._mid = None
        if not ack.refused:
            before, self.refusals = self.refusals, 0
            self._on_granted(before)
            return
        delay = self._backoff.delay(self.refusals, self._rng)
        self.refusals += 1
        self._on_refused(ack, delay)
        timer = threading.Timer(delay, self._again)
        timer.daemon = True
        timer.start()

    def _again(self) -> None:
        if self._active():
            self.subscribe()
