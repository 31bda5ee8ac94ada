"""Run one agent on a real device: a paho client, a poll loop, a clean shutdown."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent._agent import Agent
from agent._config import AgentConfig
from agent._data import open_source
from agent._readings import PsutilReader, ReadingsSource
from models import Topics
from models._mqtt import BrokerAddress, Connection, make_client

log = logging.getLogger("fedasync.agent")

CONNECTION_FILE = "connection.json"  # in the state directory: the running agent's link state


class PahoLink:
    """One persistent MQTT session for one device, with its last will on the status topic.

    Its `Connection` logs every failed attempt with the reason and the next (jittered) retry,
    and `connection_info()` is the state the agent's status reports; the latest is also kept in
    <state_dir>/connection.json for `fedasync-agent status`.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.topics = Topics(config.fleet, config.topic_root)
        self.device_id = config.device_id
        self.address = BrokerAddress.parse(config.broker, ca_file=config.ca_file,
                                           cert_file=config.cert_file, key_file=config.key_file)
        self.client = make_client(self.address, client_id=f"fedasync-agent-{config.device_id}",
                                  persistent=True)
        self.client.will_set(self.topics.status(config.device_id),
                             b'{"state": "offline", "device_id": "%s"}' % config.device_id.encode(),
                             qos=1, retain=True)
        self._state_file = Path(config.state_dir) / CONNECTION_FILE
        # Jitter spreads a whole fleet's reconnects after a broker restart.
        self.connection = Connection(self.client, self.address, logger=log, keepalive=60,
                                     max_delay_s=60.0, jitter=True,
                                     on_online=self._on_online, on_change=self._record)
        self.agent: Agent | None = None
        self.client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        return self.connection.online

    def connection_info(self) -> dict[str, Any]:
        return self.connection.info()

    def wait_connected(self, timeout: float) -> bool:
        return self.connection.wait_online(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic: str, qos: int = 0) -> None:
        """For the agent's models on demand (agent._agent): announcements and snapshots."""
        self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    def start(self) -> None:
        self.connection.start()

    def stop(self) -> None:
        if self.connected and self.agent is not None:
            info = self.client.publish(
                self.topics.status(self.device_id),
                json.dumps(self.agent.status("offline")).encode(), qos=1, retain=True)
            info.wait_for_publish(timeout=2)
        self.connection.stop()

    def _on_online(self, client: mqtt.Client, session_present: bool) -> None:
        # Acks at QoS 1 in the persistent session: the broker keeps them while the device is
        # away. Announcements and snapshots are the agent's to subscribe to, when it wants them.
        client.subscribe(self.topics.ack(self.device_id), 1)
        if self.agent is not None:
            self.agent.on_connected()

    def _record(self, info: dict[str, Any]) -> None:
        """Keep the connection state where `fedasync-agent status` reads it (best effort: the
        state directory may be read-only in a test, and this is only a report)."""
        with contextlib.suppress(OSError):
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
            tmp.replace(self._state_file)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.agent is None:
            return
        self.agent.on_message(msg.topic, bytes(msg.payload))


class AgentRunner:
    def __init__(self, config: AgentConfig, *, reader: ReadingsSource | None = None) -> None:
        self.config = config
        self.link = PahoLink(config)
        self.agent = Agent(config, link=self.link, reader=reader or PsutilReader(),
                           data=open_source(config.data, label=config.label_column),
                           trainer=_trainer_for(config))
        self.link.agent = self.agent
        self._stop = threading.Event()
        # Set on paho's thread when a newer model arrived: the loop polls (and trains) at once
        # instead of at its next check. Training never runs on the network thread.
        self._wake = threading.Event()
        self.agent.wake = self._wake.set

    def run(self) -> None:
        """Until `stop()`: poll the device every `check_interval_s`, or at once when a newer
        model arrives, and train when allowed."""
        self.link.start()
        log.info("agent %s for fleet %r started", self.config.device_id, self.config.fleet)
        try:
            while not self._stop.is_set():
                self.agent.poll()
                self._wake.wait(self.config.check_interval_s)
                self._wake.clear()  # before the poll: a wake during it is seen next time
        finally:
            self.link.stop()

    def stop(self) -> None:
        self._stop.set()
        self.agent.interrupt()  # a poll waiting for a model returns now, not in model_wait_s
        self._wake.set()


def _trainer_for(config: AgentConfig) -> Any:
    if config.train_in_subprocess:
        from agent._child import train_in_child

        return train_in_child
    from agent._trainer import train_update

    return train_update
