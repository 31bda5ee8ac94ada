"""The coordinator's one MQTT client as its parts use it.

Every publish and every incoming message passes here, so whoever needs to see the traffic (the
simulator's counts, its stepping scheduler) or to add a topic of its own (the virtual clock's
markers) does so through `watch_sent`, `watch_received` and `add_handler`, never through the
client itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from fedasync_iot.models import Client, Message, Publication, topic_matches


class Delivery(Protocol):
    """A publish handed to the client: whether (and when) the broker acknowledged it."""

    def is_published(self) -> bool: ...

    def wait_for_publish(self, timeout: float | None = None) -> None: ...


SentWatcher = Callable[[str, bytes, Delivery], None]
ReceivedWatcher = Callable[[str, bytes], None]
Handler = Callable[[str, bytes], None]


class Transport:
    """Publish, acknowledge, subscribe; watchers see what is sent and received."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._sent: tuple[SentWatcher, ...] = ()
        self._received: tuple[ReceivedWatcher, ...] = ()
        self._handlers: tuple[tuple[str, Handler], ...] = ()
        self._lock = threading.Lock()  # watchers are added from any thread, read on paho's

    def publish(self, topic: str, payload: bytes, *, qos: int,
                retain: bool = False) -> Publication:
        info = self.client.send(topic, payload, qos=qos, retain=retain)
        for watch in self._sent:
            watch(topic, payload, info)
        return info

    def ack(self, mid: int, qos: int) -> None:
        self.client.ack(mid, qos)

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    def watch_sent(self, watcher: SentWatcher) -> None:
        """`watcher(topic, payload, delivery)` after each publish, on the publishing thread."""
        with self._lock:
            self._sent = (*self._sent, watcher)

    def watch_received(self, watcher: ReceivedWatcher) -> None:
        """`watcher(topic, payload)` for each message received, before it is handled."""
        with self._lock:
            self._received = (*self._received, watcher)

    def add_handler(self, topic_filter: str, handler: Handler, *, qos: int = 0) -> None:
        """Subscribe to `topic_filter` (the persistent session keeps it across reconnects) and
        hand its messages to `handler(topic, payload)` instead of the service."""
        with self._lock:
            self._handlers = (*self._handlers, (topic_filter, handler))
        self.client.subscribe(topic_filter, qos)

    def received(self, msg: Message) -> bool:
        """Count `msg` with the watchers; True when an added handler took it."""
        if not self._received and not self._handlers:
            return False  # production: no copy of the payload per update
        payload = msg.payload
        for watch in self._received:
            watch(msg.topic, payload)
        taken = False
        for topic_filter, handler in self._handlers:
            if topic_matches(topic_filter, msg.topic):
                handler(msg.topic, payload)
                taken = True
        return taken
