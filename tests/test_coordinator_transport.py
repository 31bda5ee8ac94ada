"""The coordinator's one MQTT client as its parts use it (coordinator/_transport.py): what the
simulator watches and adds goes through here, never through the client itself."""

from __future__ import annotations

from typing import Any

from fedasync_iot.coordinator._transport import Transport
from fedasync_iot.models._mqtt import Message


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def send(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> str:
        self.calls.append(("send", topic, payload, qos, retain))
        return f"info-{topic}"

    def subscribe(self, topic: str, qos: int = 0) -> None:
        self.calls.append(("subscribe", topic, qos))


def message(topic: str, payload: bytes) -> Message:
    return Message(topic, payload)


def test_watchers_see_each_publish_with_its_delivery_handle() -> None:
    client = FakeClient()
    transport = Transport(client)  # type: ignore[arg-type]
    seen: list[tuple[str, bytes, Any]] = []
    transport.watch_sent(lambda topic, payload, delivery: seen.append((topic, payload, delivery)))
    info = transport.publish("fl/f/ack/d1", b"ack", qos=1)
    assert client.calls == [("send", "fl/f/ack/d1", b"ack", 1, False)]
    assert seen == [("fl/f/ack/d1", b"ack", info)]


def test_an_added_handler_takes_its_topics_and_every_message_is_counted() -> None:
    client = FakeClient()
    transport = Transport(client)  # type: ignore[arg-type]
    assert not transport.received(message("fl/f/update/d1", b"u"))  # nothing added: the service's
    received: list[tuple[str, bytes]] = []
    handled: list[tuple[str, bytes]] = []
    transport.watch_received(lambda topic, payload: received.append((topic, payload)))
    transport.add_handler("sim/f/sync/#", lambda topic, payload: handled.append((topic, payload)))
    assert client.calls == [("subscribe", "sim/f/sync/#", 0)]
    assert transport.received(message("sim/f/sync", b"3"))  # "#" matches the level above it
    assert not transport.received(message("fl/f/update/d1", b"u"))
    assert handled == [("sim/f/sync", b"3")]
    assert received == [("sim/f/sync", b"3"), ("fl/f/update/d1", b"u")]
