"""The project's MQTT client: a paho-mqtt 2.x client held by composition, behind project types.

`Client` owns one `paho.mqtt.client.Client` and overrides nothing of it: it reaches paho through
its public API only, hands received messages over as `Message`, turns paho's exceptions into the
project's (`models._errors`: RuntimeError -> PublishFailed, ValueError -> BadTopic) and sends
every packet at once (TCP_NODELAY). Who drives its network I/O is the caller's choice: a
`Connection` (a thread of its own, with backoff and failover), an external event loop
(`drive_with`: the simulator's epoll loop), or paho's own thread (`loop_start`, for short-lived
helpers and tests).

Its API is the project's, never paho's shapes: `send` returns a `Publication`; received messages
go to `handle` and `route` handlers as a frozen `Message` (bytes payload); the broker's answers
come as `on_connack(Connack)`, `on_closed(why)` and `on_acked(PacketAck)`. Nothing of paho's
(its client, MQTTMessage, MQTTMessageInfo, ReasonCode, callback signatures) reaches a caller.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from fedasync_iot.models._broker_address import BrokerAddress
from fedasync_iot.models._errors import BadTopic, PublishFailed

Payload = bytes | bytearray | str | None
Handler = Callable[["Message"], None]
# What was acknowledged (a QoS 0 publish counts once written: there is no PUBACK).
AckKind = Literal["publish", "subscribe", "unsubscribe"]


@dataclass(frozen=True, slots=True)
class Message:
    """A message received from the broker."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    mid: int = 0  # the packet id `Client.ack` takes (manual acknowledgement); 0 at QoS 0
    dup: bool = False


@dataclass(frozen=True, slots=True)
class PacketAck:
    """The broker acknowledged a packet of ours: a PUBACK, SUBACK or UNSUBACK."""

    kind: AckKind
    mid: int  # the packet id `send`, `subscribe` or `unsubscribe` returned
    refused: tuple[str, ...] = ()  # a SUBACK's refusals, one reason per refused filter
    granted: tuple[int, ...] = ()  # a SUBACK's granted QoS, one per filter it accepted


@dataclass(frozen=True, slots=True)
class Connack:
    """The broker's answer to a CONNECT."""

    refusal: str | None  # None: accepted; else why, in words an operator can act on
    session_present: bool = False

    @property
    def accepted(self) -> bool:
        return self.refusal is None


class Publication:
    """One publish: its packet id, and whether the broker has it (QoS 1: its PUBACK)."""

    __slots__ = ("_info",)

    def __init__(self, info: mqtt.MQTTMessageInfo) -> None:
        self._info = info

    @property
    def mid(self) -> int:
        return self._info.mid

    @property
    def queued(self) -> bool:
        """Handed to the connection (False: there was none, or its queue was full)."""
        return self._info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def is_published(self) -> bool:
        """Raises PublishFailed when it was never queued (so this handle cannot tell)."""
        with _publish_errors():
            return self._info.is_published()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        """Until published or `timeout`; PublishFailed as `is_published`."""
        with _publish_errors():
            self._info.wait_for_publish(timeout)


class SocketLoop(Protocol):
    """An external event loop that serves clients' sockets (`Client.drive_with`)."""

    def opened(self, client: Client, sock: Any) -> None: ...

    def closed(self, client: Client, sock: Any) -> None: ...

    def want_write(self, client: Client, sock: Any) -> None: ...

    def wrote(self, client: Client, sock: Any) -> None: ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (with its `+` and `#` wildcards)."""
    return bool(mqtt.topic_matches_sub(topic_filter, topic))


def describe_refusal(reason: ReasonCode) -> str:
    """A CONNACK refusal as one line; bad credentials say where to look."""
    text = f"the broker refused the connection: {str(reason).lower()}"
    if reason.value in (0x04, 0x05, 0x86, 0x87):  # bad user name or password / not authorized
        return f"{text} (check the user name and password in the broker URL)"
    return text


def describe_loss(reason: ReasonCode) -> str:
    """Why a connection closed, from paho's reason code."""
    if reason.value == 0:
        return "the broker closed the connection"
    return ("connection lost: the broker closed it, or the network failed"
            if str(reason) == "Unspecified error" else str(reason))


class Client:
    """One MQTT 3.1.1 client (paho's, held, never subclassed): see the module docstring."""

    def __init__(self, paho: mqtt.Client) -> None:
        self._paho = paho
        self._default: Handler | None = None
        self._routes: list[tuple[str, Handler]] = []
        self._socket_loop: SocketLoop | None = None
        # Run by a `Connection` before every attempt; an OSError from it is a failed attempt.
        self.gate: Callable[[], None] | None = None
        # Told of every message sent and received: ("sent" | "received", topic, payload bytes).
        self.meter: Callable[[str, str, int], None] | None = None
        self.on_connack: Callable[[Connack], None] | None = None
        self.on_closed: Callable[[str], None] | None = None  # why, in words
        self.on_acked: Callable[[PacketAck], None] | None = None
        paho.on_connect = self._connected
        paho.on_disconnect = self._disconnected
        paho.on_subscribe = self._subscribed
        paho.on_unsubscribe = self._unsubscribed
        paho.on_publish = self._published
        paho.on_message = self._received
        paho.on_socket_open = self._socket_opened

    # -- messages in ---------------------------------------------------------------------------
    def handle(self, handler: Handler | None) -> None:
        """Every message no `route` takes goes to `handler`."""
        self._default = handler

    def route(self, topic_filter: str, handler: Handler) -> None:
        """Messages matching `topic_filter` go to `handler` (and not to the default one)."""
        self._routes.append((topic_filter, handler))

    # -- messages out --------------------------------------------------------------------------
    def send(self, topic: str, payload: Payload = None, qos: int = 0,
             retain: bool = False) -> Publication:
        """Publish; BadTopic for a topic or QoS that MQTT does not allow."""
        if self.meter is not None:
            size = 0 if payload is None else len(
                payload.encode() if isinstance(payload, str) else bytes(payload))
            self.meter("sent", topic, size)
        with _topic_errors():
            return Publication(self._paho.publish(topic, payload, qos=qos, retain=retain))

    def subscribe(self, topic: str | list[tuple[str, int]], qos: int = 0) -> int | None:
        """The SUBSCRIBE's packet id (None: not connected, nothing sent)."""
        with _topic_errors():
            rc, mid = self._paho.subscribe(topic, qos)
        return mid if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None

    def unsubscribe(self, topic: str) -> int | None:
        """The UNSUBSCRIBE's packet id (None: not connected, nothing sent)."""
        with _topic_errors():
            rc, mid = self._paho.unsubscribe(topic)
        return mid if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (clients made with `manual_ack`)."""
        self._paho.ack(mid, qos)

    def will_set(self, topic: str, payload: Payload = None, qos: int = 0,
                 retain: bool = False) -> None:
        with _topic_errors():
            self._paho.will_set(topic, payload, qos=qos, retain=retain)

    # -- the connection --------------------------------------------------------------------------
    def connect(self, host: str, port: int, keepalive: int = 60) -> None:
        """Open the connection and send the CONNECT (blocking: TCP, TLS). OSError when the
        broker cannot be reached; the CONNACK comes through the network loop."""
        self._paho.connect(host, port, keepalive=keepalive)

    def open(self, address: BrokerAddress, *, keepalive: int) -> None:
        """Run the `gate`, then `connect` to `address` with its credentials: one attempt, as a
        `Connection` makes it. OSError: the attempt failed."""
        if self.gate is not None:
            try:
                self.gate()
            except OSError:
                raise
            except Exception as exc:  # a bug there must not end the network thread
                raise ConnectionError(f"the check before connecting failed: {exc!r}") from exc
        # Each URL of a cluster may have its own account (None: none).
        self._paho.username_pw_set(address.username, address.password)
        # Only the thread serving this client writes to its socket: a publish from another
        # thread queues its packet and wakes that thread (paho writes at once otherwise).
        self._paho.on_socket_register_write = _nothing
        self.connect(address.host, address.port, keepalive)

    def serve(self, stopping: threading.Event, *, grace_s: float = 10.0) -> None:
        """Drive the network I/O on this thread until the connection closes: lost, refused, or
        after `disconnect` (given `grace_s` once `stopping` is set to say goodbye)."""
        stopped_at: float | None = None
        while self._paho.socket() is not None:
            if stopping.is_set():
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > grace_s:
                    return
            if self._paho.loop(timeout=1.0) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def disconnect(self) -> None:
        self._paho.disconnect()

    def is_connected(self) -> bool:
        return self._paho.is_connected()

    def loop_start(self) -> None:
        """paho's own network thread, with its own reconnects (1 s doubling to 30 s)."""
        self._paho.loop_start()

    def loop_stop(self) -> None:
        self._paho.loop_stop()

    def loop(self, timeout: float = 1.0) -> None:
        """One round of network I/O on the calling thread (a short-lived client's own loop)."""
        self._paho.loop(timeout=timeout)

    # -- an external event loop (fleet._netloop) ---------------------------------------------
    def drive_with(self, loop: SocketLoop) -> None:
        """Let `loop` watch this client's socket and call `loop_read`, `loop_write` and
        `loop_misc`; call before connecting."""
        self._socket_loop = loop
        self._paho.on_socket_close = lambda _c, _u, sock: loop.closed(self, sock)
        self._paho.on_socket_register_write = lambda _c, _u, sock: loop.want_write(self, sock)
        self._paho.on_socket_unregister_write = lambda _c, _u, sock: loop.wrote(self, sock)

    def reconnect(self) -> None:
        """Connect again to the host of the last `connect` (OSError when it cannot)."""
        self._paho.reconnect()

    def socket(self) -> Any:
        """The connection's socket (None when there is none)."""
        return self._paho.socket()

    def loop_read(self) -> None:
        self._paho.loop_read()

    def loop_write(self) -> None:
        self._paho.loop_write()

    def loop_misc(self) -> None:
        self._paho.loop_misc()

    # -- paho's callbacks (its network thread) -------------------------------------------------
    def _connected(self, _c: mqtt.Client, _userdata: Any, flags: mqtt.ConnectFlags,
                   reason: ReasonCode, _properties: Any) -> None:
        if self.on_connack is not None:
            self.on_connack(Connack(describe_refusal(reason) if reason.is_failure else None,
                                    flags.session_present))

    def _disconnected(self, _c: mqtt.Client, _userdata: Any, _flags: mqtt.DisconnectFlags,
                      reason: ReasonCode, _properties: Any) -> None:
        if self.on_closed is not None:
            self.on_closed(describe_loss(reason))

    def _subscribed(self, _c: mqtt.Client, _userdata: Any, mid: int, reasons: Any,
                    _properties: Any) -> None:
        if self.on_acked is not None:
            refused = tuple(str(r) for r in reasons if r.is_failure)
            granted = tuple(int(r.value) for r in reasons if not r.is_failure)
            self.on_acked(PacketAck("subscribe", mid, refused, granted))

    def _unsubscribed(self, _c: mqtt.Client, _userdata: Any, mid: int, _reasons: Any,
                      _properties: Any) -> None:
        if self.on_acked is not None:
            self.on_acked(PacketAck("unsubscribe", mid))

    def _published(self, _c: mqtt.Client, _userdata: Any, mid: int, _reason: Any,
                   _properties: Any) -> None:
        if self.on_acked is not None:
            self.on_acked(PacketAck("publish", mid))

    def _received(self, _c: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho's own dispatch: the handlers whose filter matches, else the default one.
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # MQTT topics are UTF-8: a broker that sent another is wrong
            return
        if self.meter is not None:
            self.meter("received", topic, len(msg.payload))
        targets = [fn for pattern, fn in self._routes if topic_matches(pattern, topic)]
        if not targets and self._default is not None:
            targets = [self._default]
        if not targets:
            return
        message = Message(topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid,
                          bool(msg.dup))
        for fn in targets:
            fn(message)

    def _socket_opened(self, _c: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Nagle's algorithm (paho leaves it on) made a small packet written right after another
        # wait for the broker's delayed ACK: a 40 ms stall on Linux, in about 1 of 10 of the
        # coordinator's publishes in a simulated run (1.8 s of 529 waits for a PUBACK; 74 ms
        # without it). MQTT packets are whole messages: nothing gains from coalescing them.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._socket_loop is not None:
            self._socket_loop.opened(self, sock)


def _nothing(*_: Any) -> None:
    pass


@contextlib.contextmanager
def _topic_errors() -> Iterator[None]:
    """paho's ValueError (a bad topic, filter, QoS or payload) as the project's BadTopic."""
    try:
        yield
    except ValueError as exc:
        raise BadTopic(str(exc)) from exc


@contextlib.contextmanager
def _publish_errors() -> Iterator[None]:
    """paho's errors about a publish handle (never queued) as the project's PublishFailed."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        raise PublishFailed(str(exc)) from exc


def create_client(
    address: BrokerAddress,
    *,
    client_id: str,
    persistent: bool,
    manual_ack: bool = False,
    max_inflight: int = 20,
) -> Client:
    """A client for `address` (credentials, TLS); `persistent` keeps the broker-side session
    across reconnects, which lets the broker hold QoS 1 messages while this client is away."""
    paho = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=not persistent,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    paho.max_inflight_messages_set(max_inflight)
    paho.max_queued_messages_set(0)
    paho.reconnect_delay_set(min_delay=1, max_delay=30)
    if address.username is not None:
        paho.username_pw_set(address.username, address.password)
    if address.tls:
        context = ssl.create_default_context(cafile=address.ca_file)
        if address.cert_file is not None:
            context.load_cert_chain(address.cert_file, address.key_file)
        paho.tls_set_context(context)
    return Client(paho)

