"""Run one agent on a real device: an MQTT client, a poll loop, a clean shutdown."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import open_source
from fedasync_iot.agent._instance import Instance, TwinWatch, process_identity
from fedasync_iot.agent._readings import PsutilReader, ReadingsSource
from fedasync_iot.models import (
    Backoff,
    BrokerAddress,
    Client,
    Connection,
    KeptSubscription,
    Message,
    PacketAck,
    PublishFailed,
    Topics,
    atomic_write,
    create_client,
)

log = logging.getLogger("fedasync.agent")

# A broker may refuse the ack subscription (NATS does when it cannot create the JetStream
# consumer in time, docs/scaling.md): without it no ack arrives and the spool only grows.
ACK_SUBSCRIBE_BACKOFF = Backoff(1.0, 60.0, jitter=(0.5, 1.5))

CONNECTION_FILE = "connection.json"  # in the state directory: the running agent's link state


class PahoLink:
    """One device's MQTT connection (sessionless or persistent, `AgentConfig.session`), with
    its last will on the status topic.

    Its `Connection` logs every failed attempt with the reason and the next (jittered) retry,
    and `connection_info()` is the state the agent's status reports; the latest is also kept in
    <state_dir>/connection.json for `fedasync-agent status`, with this process's pid and start
    time, so that the command can tell a live agent from a killed one.

    At each connect it reads its own retained status: another agent instance online there means
    a second agent with this device id (`agent._instance`); `on_twin` hears of it.
    """

    def __init__(self, config: AgentConfig, instance: Instance | None = None) -> None:
        self.topics = Topics(config.fleet, config.topic_root)
        self.device_id = config.device_id
        self.instance = instance or Instance.new()
        self.address = BrokerAddress.parse(config.broker, ca_file=config.ca_file,
                                           cert_file=config.cert_file, key_file=config.key_file)
        # Sessionless (the default): the broker keeps nothing for this device between
        # connections; acks come at QoS 0, and the agent sends an unacked update again
        # (agent._resend). Persistent: the broker queues the acks (QoS 1) while it is away.
        self.persistent = config.session == "persistent"
        self.client = create_client(self.address, client_id=f"fedasync-agent-{config.device_id}",
                                    persistent=self.persistent)
        self._will()
        self.client.gate = self._will  # before every attempt: the will says when it connected
        self.twins = TwinWatch(self.instance)
        self.on_twin: Callable[[Instance], None] | None = None
        self._retired = False
        self._process = process_identity()
        self._state_file = Path(config.state_dir) / CONNECTION_FILE
        # Jitter spreads a whole fleet's reconnects after a broker restart.
        self.connection = Connection(self.client, self.address, logger=log, keepalive=60,
                                     max_delay_s=60.0, jitter=True,
                                     on_online=self._on_online, on_change=self._record)
        self.agent: Agent | None = None
        self.client.handle(self._on_message)
        self.acks = KeptSubscription(
            self.client, [(self.topics.ack(config.device_id), 1 if self.persistent else 0)],
            backoff=ACK_SUBSCRIBE_BACKOFF, rng=random.Random(),
            active=lambda: self.connected and not self._retired,
            on_refused=self._acks_refused, on_granted=self._acks_granted)
        self.client.on_acked = self.acks.acked

    def _will(self) -> None:
        """The last will for the next connection, which names it (`connected_at`): a will a
        broker publishes when another client takes the connection over shows then that the
        other agent connected after this one started (agent._instance)."""
        will = {"state": "offline", "device_id": self.device_id, **self.instance.fields(),
                "connected_at": round(time.time(), 3)}
        self.client.will_set(self.topics.status(self.device_id), json.dumps(will).encode(),
                             qos=1, retain=True)

    @property
    def connected(self) -> bool:
        return self.connection.online

    def connection_info(self) -> dict[str, Any]:
        info = self.connection.info()
        if self.acks.refusals:
            info["ack_subscription_refusals"] = self.acks.refusals
        if self.twins.twins:
            info["other_agents_with_this_id"] = [t.describe() for t in self.twins.twins.values()]
        return info

    def wait_connected(self, timeout: float) -> bool:
        return self.connection.wait_online(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.client.send(topic, payload, qos=qos, retain=retain)

    def subscribe(self, topic: str, qos: int = 0) -> None:
        """For the agent's models on demand (agent._agent): announcements and snapshots."""
        self.client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    def start(self) -> None:
        self.connection.start()

    def stop(self) -> None:
        if self.connected and self.agent is not None and not self._retired:
            info = self.client.send(
                self.topics.status(self.device_id),
                json.dumps(self.agent.status("offline")).encode(), qos=1, retain=True)
            # The connection may go meanwhile: the status is a courtesy, the stop goes on.
            with contextlib.suppress(PublishFailed):
                info.wait_for_publish(timeout=2)
        self.connection.stop()

    def retire(self) -> None:
        """Disconnect now, for good and without an offline status: another agent with this
        device id is online, and its status must stay the retained one. Callable from the
        network thread (its loop is then not joined)."""
        self._retired = True
        self.connection.stop()

    def _on_online(self, client: Client, session_present: bool) -> None:
        # Acks: asked again at every connect (a clean session forgets its subscriptions).
        # Announcements and snapshots are the agent's to subscribe to, when it wants them.
        # With them, in one packet, the retained status of this device as the broker holds it
        # before the agent publishes its own (agent._instance); unsubscribed at once, so its
        # own statuses never come back.
        status = self.topics.status(self.device_id)
        self.acks.subscribe(also=[(status, 0)])
        client.unsubscribe(status)
        if self.agent is not None:
            self.agent.on_connected()

    def _acks_refused(self, ack: PacketAck, delay: float) -> None:
        log.warning("the broker refused the subscription to acks (%s: %s): no ack can arrive, "
                    "updates stay spooled; asking again in %.1f s (refusal %d)",
                    self.topics.ack(self.device_id), ", ".join(ack.refused), delay,
                    self.acks.refusals)

    @staticmethod
    def _acks_granted(refusals: int) -> None:
        if refusals:
            log.info("the broker granted the subscription to acks after %d refusal(s)", refusals)

    def _record(self, info: dict[str, Any]) -> None:
        """Keep the connection state where `fedasync-agent status` reads it (best effort: the
        state directory may be read-only in a test, and this is only a report)."""
        with contextlib.suppress(OSError):
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._state_file,
                         json.dumps({**info, **self._process, **self.instance.fields()}).encode(),
                         fsync=False, fsync_dir=False)

    def _on_message(self, msg: Message) -> None:
        if msg.topic == self.topics.status(self.device_id):
            twin = self.twins.observe(msg.payload)
            if twin is not None and self.on_twin is not None:
                self.on_twin(twin)
            return
        if self.agent is None:
            return
        self.agent.on_message(msg.topic, msg.payload)


class AgentRunner:
    def __init__(self, config: AgentConfig, *, reader: ReadingsSource | None = None) -> None:
        self.config = config
        instance = Instance.new()
        self.link = PahoLink(config, instance)
        self.agent = Agent(config, link=self.link, reader=reader or PsutilReader(),
                           data=open_source(config.data, label=config.label_column),
                           trainer=_trainer_for(config))
        self.agent.instance = instance
        self.link.agent = self.agent
        self.link.on_twin = self._twin
        self.exit_code = 0  # 2: stopped because another agent has this device id
        self._stop = threading.Event()
        # Set on the network thread when a newer model arrived: the loop polls (and trains) at once
        # instead of at its next check. Training never runs on the network thread.
        self._wake = threading.Event()
        self.agent.wake = self._wake.set

    def run(self) -> None:
        """Until `stop()`: poll the device every `check_interval_s`, or at once when a newer
        model arrives, and train when allowed."""
        self.link.start()
        log.info("agent %s for fleet %r started (%s)", self.config.device_id, self.config.fleet,
                 self.link.instance.describe())
        try:
            while not self._stop.is_set():
                self.agent.poll()
                self._wake.wait(self.config.check_interval_s)
                self._wake.clear()  # before the poll: a wake during it is seen next time
        finally:
            self.link.stop()
            agent = self.agent
            log.info("stopped: %d update(s) kept in the spool (%d bytes) for the next start, %d "
                     "held for an operator, model version %s", len(agent.spool),
                     agent.spool.total_bytes(), len(agent.held),
                     None if agent.snapshot is None else agent.snapshot.version)

    def stop(self, why: str | None = None) -> None:
        """End `run` after the current step (a training under way finishes and is spooled).
        `why`, when given (a signal), is logged."""
        if why is not None:
            log.info("%s: stopping after the current step; the spool is kept for the next start",
                     why)
        self._stop.set()
        self.agent.interrupt()  # a poll waiting for a model returns now, not in model_wait_s
        self._wake.set()

    def _twin(self, other: Instance) -> None:
        """Another agent uses this device id (agent._instance); the network thread."""
        me = self.link.instance
        device = self.config.device_id
        if not me.newer_than(other):
            log.error("device id %r is used by another agent too (%s), started after this one "
                      "(%s): the broker gives the session to whichever connects last, so they "
                      "take it from each other. That one stops by itself (exit 2); if it does "
                      "not (an older build), stop it: each device needs its own device_id",
                      device, other.describe(), me.describe())
            return
        log.error("device id %r is used by another agent too (%s), started before this one "
                  "(%s): the broker gives the session to whichever connects last, so they "
                  "would take it from each other at every reconnect. Stopping this one, the "
                  "newer (exit 2): give each device its own device_id", device,
                  other.describe(), me.describe())
        self.exit_code = 2
        self.link.retire()
        self.stop()


def _trainer_for(config: AgentConfig) -> Any:
    if config.train_in_subprocess:
        from fedasync_iot.agent._child import train_in_child

        return train_in_child
    from fedasync_iot.agent._trainer import train_update

    return train_update
