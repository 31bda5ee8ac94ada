"""The project's one MQTT boundary: broker addresses, the client, the kept-up connection.

Nothing outside `models` needs paho-mqtt: `create_client` gives a `Client` (paho's held by
composition, `models._mqtt_client`), a `Connection` keeps it connected with one backoff
(`models._backoff`) and fails over between a cluster's URLs (`models._connection`), and paho's
errors leave as the project's (`BrokerError` and below, `models._errors`). Addresses are parsed
in `models._broker_address`. This module gathers them under the name the rest of the code has
always imported.
"""

from __future__ import annotations

from fedasync_iot.models._broker_address import BrokerAddress, broker_urls, check_broker
from fedasync_iot.models._connection import Connection, describe_error
from fedasync_iot.models._errors import BadTopic, BrokerError, BrokerRefused, PublishFailed
from fedasync_iot.models._mqtt_client import (
    AckKind,
    Client,
    Connack,
    Message,
    PacketAck,
    Publication,
    create_client,
    describe_refusal,
    topic_matches,
)

__all__ = [
    "AckKind",
    "BadTopic",
    "BrokerAddress",
    "BrokerError",
    "BrokerRefused",
    "Client",
    "Connack",
    "Connection",
    "Message",
    "PacketAck",
    "Publication",
    "PublishFailed",
    "broker_urls",
    "check_broker",
    "create_client",
    "describe_error",
    "describe_refusal",
    "topic_matches",
]
