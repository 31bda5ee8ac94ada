"""Small builders shared by tests (not fixtures: plain functions are easier to read)."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np

from fedasync_iot.models import UpdateMessage, encode_update
from fedasync_iot.models._mqtt import (
    BrokerAddress,
    Connack,
    Message,
    PacketAck,
    create_client,
)


def update_bytes(
    delta: np.ndarray,
    *,
    device: str = "dev-1",
    base_version: int = 0,
    n_samples: int = 10,
    update_id: str | None = None,
    encoding: str = "float32",
) -> bytes:
    return encode_update(UpdateMessage(
        device_id=device, update_id=update_id or uuid.uuid4().hex, base_version=base_version,
        n_samples=n_samples, delta=np.asarray(delta, dtype=np.float32), encoding=encoding,  # type: ignore[arg-type]
        created_at=time.time()))


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Poll a condition with a bound: for state another thread or process changes. The bound is
    generous (it costs nothing when the condition comes true): a busy machine is slow."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Listener:
    """A test-side MQTT client that records every message on some topics."""

    def __init__(self, url: str, topics: list[str], *, client_id: str | None = None) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = create_client(BrokerAddress.parse(url),
                                    client_id=client_id or f"listener-{uuid.uuid4().hex[:8]}",
                                    persistent=False)
        self._topics = [(t, 1) for t in topics]
        self.client.on_connack = self._connected
        self.client.on_acked = self._acked
        self.client.handle(self.messages.put)
        a = BrokerAddress.parse(url)
        self.client.connect(a.host, a.port)
        self.client.loop_start()
        assert self._subscribed.wait(30), "listener did not subscribe"

    def _connected(self, connack: Connack) -> None:
        self.client.subscribe(self._topics)

    def _acked(self, ack: PacketAck) -> None:
        if ack.kind == "subscribe":
            self._subscribed.set()

    def get(self, timeout: float = 30.0) -> Message:
        return self.messages.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.send(topic, payload, qos=1, retain=retain).wait_for_publish(timeout=30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

