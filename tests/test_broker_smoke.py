"""The fixture's Mosquitto carries QoS 1 messages and retained messages (paho-mqtt 2.x)."""

from __future__ import annotations

import queue
import socket

import pytest

from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models._mqtt import BrokerAddress, Client, create_client

pytestmark = pytest.mark.broker


def _connected(broker: MosquittoBroker, client_id: str) -> Client:
    client = create_client(BrokerAddress.parse(broker.url), client_id=client_id, persistent=False)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    return client


def test_publish_and_receive(broker: MosquittoBroker, fleet_name: str) -> None:
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    subscribed: queue.Queue[bool] = queue.Queue()
    sub = _connected(broker, f"{fleet_name}-sub")
    sub.handle(lambda msg: inbox.put((msg.topic, msg.payload)))
    sub.on_acked = lambda ack: subscribed.put(True) if ack.kind == "subscribe" else None
    sub.subscribe(f"{fleet_name}/#", qos=1)
    assert subscribed.get(timeout=30)

    pub = _connected(broker, f"{fleet_name}-pub")
    info = pub.send(f"{fleet_name}/hello", b"\x00payload\xff", qos=1)
    info.wait_for_publish(timeout=30)

    assert inbox.get(timeout=30) == (f"{fleet_name}/hello", b"\x00payload\xff")
    for c in (sub, pub):
        c.loop_stop()
        c.disconnect()


def test_retained_message_reaches_late_subscriber(broker: MosquittoBroker, fleet_name: str) -> None:
    pub = _connected(broker, f"{fleet_name}-pub")
    pub.send(f"{fleet_name}/model", b"v1", qos=1, retain=True).wait_for_publish(timeout=30)

    inbox: queue.Queue[tuple[bytes, bool]] = queue.Queue()
    late = _connected(broker, f"{fleet_name}-late")
    late.handle(lambda msg: inbox.put((msg.payload, msg.retain)))
    late.subscribe(f"{fleet_name}/model", qos=1)

    assert inbox.get(timeout=30) == (b"v1", True)
    for c in (late, pub):
        c.loop_stop()
        c.disconnect()


def test_our_clients_send_each_packet_at_once(broker: MosquittoBroker, fleet_name: str) -> None:
    """TCP_NODELAY: with Nagle's algorithm (paho's default) a small packet written right after
    another waited for the broker's delayed ACK, 40 ms, in 1 of 10 of the coordinator's
    publishes."""
    client = _connected(broker, f"{fleet_name}-nodelay")
    try:
        sock = client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        client.loop_stop()
        client.disconnect()


def test_broker_address_parsing_redacts_password() -> None:
    a = BrokerAddress.parse("mqtts://dev%2D1:s3cret@broker.example:9883", ca_file="/ca.pem")
    assert (a.host, a.port, a.tls, a.username, a.password) == (
        "broker.example", 9883, True, "dev-1", "s3cret")
    assert "s3cret" not in a.redacted()
    assert BrokerAddress.parse("mqtt://h").port == 1883
