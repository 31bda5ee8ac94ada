"""The MQTT boundary without a broker: the one backoff, paho's errors as the project's, and how
received messages reach handlers (models/_backoff.py, models/_mqtt_client.py)."""

from __future__ import annotations

import random

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fedasync_iot.models._backoff import Backoff
from fedasync_iot.models._errors import BrokerError, FedAsyncError
from fedasync_iot.models._mqtt import (
    BadTopic,
    BrokerAddress,
    BrokerRefused,
    Client,
    Message,
    PacketAck,
    PublishFailed,
    create_client,
)


def test_backoff_doubles_to_its_cap_and_jitters_with_the_callers_random_source() -> None:
    b = Backoff(0.5, 30.0)
    assert [b.delay(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert b.delay(10_000) == 30.0  # no overflow however long it failed
    jittered = Backoff(1.0, 60.0, jitter=(0.5, 1.0))
    a, c = random.Random(7), random.Random(7)
    # The same draws as the reconnect code always made: nominal * uniform(0.5, 1.0).
    assert [jittered.delay(n, a) for n in range(5)] == [
        min(2.0 ** n, 60.0) * c.uniform(0.5, 1.0) for n in range(5)]
    with pytest.raises(ValueError, match="random source"):
        jittered.delay(0)
    for bad in ((0.0, 1.0), (2.0, 1.0)):
        with pytest.raises(ValueError):
            Backoff(*bad)
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0, factor=0.5)


def test_broker_errors_are_ours_and_still_what_paho_raised() -> None:
    for error, builtin in ((BrokerRefused, ConnectionError), (PublishFailed, RuntimeError),
                           (BadTopic, ValueError)):
        assert issubclass(error, BrokerError) and issubclass(error, FedAsyncError)
        assert issubclass(error, builtin)


def _client() -> tuple[Client, mqtt.Client]:
    paho = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="t")
    return Client(paho), paho


def test_bad_topics_and_unqueued_publishes_surface_as_project_errors() -> None:
    client = create_client(BrokerAddress(host="127.0.0.1", port=1), client_id="t",
                           persistent=False)
    with pytest.raises(BadTopic):
        client.send("fl/a/#", b"x")  # no wildcard in a topic to publish to
    with pytest.raises(BadTopic):
        client.subscribe("", 0)
    with pytest.raises(BadTopic):
        client.will_set("", b"x")
    unsent = client.send("fl/a/status", b"x", qos=0)  # never connected: not queued
    assert not unsent.queued
    with pytest.raises(PublishFailed):
        unsent.wait_for_publish(0.1)
    with pytest.raises(PublishFailed):
        unsent.is_published()
    assert client.subscribe("fl/a/ack/d", 1) is None  # nothing sent without a connection


def test_routes_take_their_topics_and_the_default_handler_the_rest() -> None:
    client, paho = _client()
    default: list[Message] = []
    routed: list[Message] = []
    also: list[Message] = []
    metered: list[tuple[str, str, int]] = []
    client.handle(default.append)
    client.route("fl/a/sim/#", routed.append)
    client.route("fl/a/+/x", also.append)
    client.meter = lambda way, topic, size: metered.append((way, topic, size))

    def deliver(topic: str | bytes, payload: bytes, *, qos: int = 0,
                retain: bool = False) -> None:
        msg = mqtt.MQTTMessage(mid=7 if qos else 0,
                               topic=topic.encode() if isinstance(topic, str) else topic)
        msg.payload, msg.qos, msg.retain = payload, qos, retain
        assert paho.on_message is not None
        paho.on_message(paho, None, msg)  # as paho's network thread calls it

    deliver("fl/a/ack/d", b"ack", qos=1)
    deliver("fl/a/sim/3", b"7", retain=True)
    deliver("fl/a/sim/x", b"o")  # both routes match: each gets it
    deliver(b"fl/a/\xff", b"bad")  # not UTF-8, so not an MQTT topic: nobody gets it
    assert default == [Message("fl/a/ack/d", b"ack", qos=1, mid=7)]
    assert routed == [Message("fl/a/sim/3", b"7", retain=True), Message("fl/a/sim/x", b"o")]
    assert also == [Message("fl/a/sim/x", b"o")]
    assert metered == [("received", "fl/a/ack/d", 3), ("received", "fl/a/sim/3", 1),
                       ("received", "fl/a/sim/x", 1)]
    client.send("fl/a/status", "héllo")
    assert metered[-1] == ("sent", "fl/a/status", len("héllo".encode()))


def test_acks_name_what_was_acknowledged_and_a_subacks_refusals() -> None:
    client, paho = _client()
    acks: list[PacketAck] = []
    client.on_acked = acks.append
    granted, refused = ReasonCode(PacketTypes.SUBACK, identifier=1), \
        ReasonCode(PacketTypes.SUBACK, identifier=0x80)
    assert paho.on_subscribe is not None and paho.on_publish is not None
    paho.on_subscribe(paho, None, 3, [granted, refused], None)
    paho.on_publish(paho, None, 4, ReasonCode(PacketTypes.PUBACK), None)
    assert acks == [PacketAck("subscribe", 3, (str(refused),), (1,)), PacketAck("publish", 4)]
