"""Which coordinator serves a fleet on a broker: its presence, and a look before connecting.

A coordinator's retained status (``<root>/<fleet>/coordinator/status``, also its last will)
names the instance behind it: a random id, host, pid and since when it serves. Before the
coordinator connects with its client id (which would take over the live coordinator's broker
session, and with it the fleet's updates), `look` reads that status with a short-lived
clean-session client. Retained messages have no end marker, so `look` publishes a marker of its
own (not retained) on the same topic after subscribing: the broker delivers the retained status
first, so once the marker is back, what came before it is all there is.

The same look also reads what else the coordinator must know before it takes its session: the
version of the fleet's retained announcement (a coordinator without state must not start over at
version 0 under a fleet that is at version N) and the statuses of the other fleets' coordinators
(the status names its client id: two fleets sharing one would take one broker session from each
other, and each would receive the other's updates).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedasync_iot.models import (
    BrokerAddress,
    BrokerRefused,
    Connack,
    Message,
    PacketAck,
    Topics,
    create_client,
)

HOST = socket.gethostname()
# Instances running in this process: a status naming this host and pid is alive only if listed.
_LIVE: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _pid_namespace() -> str | None:
    """Two containers may share a host name but not pid numbers: compare namespaces too."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


PID_NAMESPACE = _pid_namespace()


@dataclass(frozen=True, slots=True, kw_only=True)
class Presence:
    """What a coordinator says about itself on its status topic."""

    state: str  # "online" | "offline"
    fleet: str
    time: float
    instance: str | None = None  # None: a coordinator from before instance ids
    host: str | None = None
    pid: int | None = None
    pid_namespace: str | None = None
    since: float | None = None
    client_id: str | None = None  # None: a coordinator from before client ids were published
    version: int | None = None  # the model version it serves (or served, when offline)

    def to_json(self) -> bytes:
        return json.dumps({"state": self.state, "fleet": self.fleet, "time": self.time,
                           "instance": self.instance, "host": self.host, "pid": self.pid,
                           "pid_namespace": self.pid_namespace, "since": self.since,
                           "client_id": self.client_id, "version": self.version}).encode()

    @classmethod
    def parse(cls, payload: bytes) -> Presence | None:
        """A status payload, or None for anything else (a marker, garbage)."""
        try:
            d = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(d, dict) or d.get("state") not in ("online", "offline"):
            return None
        try:
            return cls(state=d["state"], fleet=str(d.get("fleet", "")),
                       time=float(d.get("time") or 0.0),
                       instance=_str(d.get("instance")), host=_str(d.get("host")),
                       pid=None if d.get("pid") is None else int(d["pid"]),
                       pid_namespace=_str(d.get("pid_namespace")),
                       since=None if d.get("since") is None else float(d["since"]),
                       client_id=_str(d.get("client_id")),
                       version=None if d.get("version") is None else int(d["version"]))
        except (TypeError, ValueError):
            return None

    def describe(self) -> str:
        """"pid 812 on host edge-1, online since 2026-05-01 08:00:00 UTC" (what is known; an
        offline status: since when it says so)."""
        who = (f"pid {self.pid} on host {self.host}" if self.pid is not None and self.host
               else "of an older version, with no instance id")
        since = (self.since or self.time) if self.state == "online" else self.time
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "?"
        return f"{who}, {self.state} since {when}"


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Survey:
    """What `look` read on the broker before connecting."""

    status: Presence | None = None  # this fleet's coordinator status
    others: tuple[Presence, ...] = ()  # the other fleets' coordinator statuses
    announced: int | None = None  # the version of this fleet's retained announcement

    @property
    def version(self) -> int | None:
        """The newest version the broker holds evidence of for this fleet (None: none)."""
        own = None if self.status is None else self.status.version
        found = [v for v in (self.announced, own) if v is not None]
        return max(found, default=None)


class Identity:
    """This coordinator instance: what it publishes as its status, and whether another one that
    says "online" is alive."""

    def __init__(self, fleet: str, *, client_id: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.client_id = client_id
        self.instance = uuid.uuid4().hex
        self.since = clock()
        self.has_served = False  # connected at least once: a rival found later took over
        self._clock = clock

    def presence(self, state: str, *, version: int | None = None) -> Presence:
        return Presence(state=state, fleet=self.fleet, time=self._clock(),
                        instance=self.instance, host=HOST, pid=os.getpid(),
                        pid_namespace=PID_NAMESPACE, since=self.since,
                        client_id=self.client_id, version=version)

    def register(self) -> None:
        with _LIVE_LOCK:
            _LIVE.add(self.instance)

    def unregister(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self.instance)

    def rival(self, status: Presence | None) -> Presence | None:
        """`status` if it is another coordinator that is (or may be) serving the fleet now.

        Its own earlier status, an offline one and one left by a process of this host that is
        gone (a crash or SIGKILL: its last will comes only after 1.5 x keepalive) do not count.
        """
        if status is None or status.state != "online" or status.instance == self.instance:
            return None
        return status if _alive(status) else None

    def clash(self, others: tuple[Presence, ...]) -> Presence | None:
        """The live coordinator of another fleet that uses this one's client id, if any."""
        return next((p for p in self.sharing(others) if self.rival(p) is not None), None)

    def sharing(self, others: tuple[Presence, ...]) -> tuple[Presence, ...]:
        """The other fleets' coordinators, live or not, whose status names this client id."""
        return tuple(p for p in others if self.client_id is not None
                     and p.fleet != self.fleet and p.client_id == self.client_id)


def _alive(status: Presence) -> bool:
    """Whether the process behind an "online" status may still run: one left by a process of
    this host that is gone (a crash or SIGKILL: its last will comes only after 1.5 x keepalive)
    does not."""
    if status.host != HOST or status.pid is None or status.pid_namespace != PID_NAMESPACE:
        return True  # another machine (or container): it cannot be checked from here
    if status.pid == os.getpid():
        with _LIVE_LOCK:
            return status.instance in _LIVE
    return _process_exists(status.pid)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class LookTimeout(Exception):
    """The marker did not come back: the broker (or its ACL) does not let us read the status."""


def look(
    address: BrokerAddress,
    topics: Topics,
    *,
    stop: threading.Event,
    timeout_s: float = 10.0,
    until: Callable[[Presence | None], bool] = lambda status: True,
) -> Survey:
    """What the broker retains for this fleet: its coordinator status (None: there is none),
    the other fleets' coordinator statuses and the version of this fleet's announcement.

    With `until`, stays subscribed and returns once the fleet's status (retained, then live)
    makes it true, or when `stop` is set. Raises OSError when the broker cannot be reached or
    drops the connection (the caller logs it and retries) and LookTimeout when the marker does
    not come back within `timeout_s`.
    """
    marker = json.dumps({"state": "probe", "probe": uuid.uuid4().hex}).encode()
    client = create_client(address, client_id=f"fedasync-probe-{uuid.uuid4().hex[:12]}",
                           persistent=False)
    seen: list[Presence | None] = [None]
    others: dict[str, Presence] = {}
    announced: list[int] = []
    events = {"marker": False, "lost": False}
    refusal: list[str] = []
    every_fleet = f"{topics.root}/+/coordinator/status"

    def on_connack(connack: Connack) -> None:
        if connack.refusal is not None:
            refusal.append(connack.refusal)
            return
        # One SUBSCRIBE: the broker sends what it retains for all three before it handles the
        # marker published after the SUBACK. The fleet's own topic is named on its own too: a
        # broker may deliver retained messages to exact-topic subscriptions only (RabbitMQ).
        client.subscribe([(topics.coordinator_status, 0), (every_fleet, 0),
                          (topics.announce, 0)])

    def on_acked(ack: PacketAck) -> None:
        if ack.kind == "subscribe":
            client.send(topics.coordinator_status, marker, qos=0, retain=False)

    def on_message(msg: Message) -> None:
        payload = msg.payload
        if payload == marker:
            events["marker"] = True
            return
        if msg.topic == topics.announce:
            version = _announced_version(payload)
            if version is not None:
                announced[:] = [version]
            return
        status = Presence.parse(payload)
        if status is None:
            return
        if msg.topic == topics.coordinator_status:
            seen[0] = status
        elif msg.retain:
            others[msg.topic] = status

    def on_closed(why: str) -> None:
        events["lost"] = True

    client.on_connack = on_connack
    client.on_acked = on_acked
    client.handle(on_message)
    client.on_closed = on_closed
    client.connect(address.host, address.port, keepalive=30)  # OSError: the caller's to log

    def survey() -> Survey:
        return Survey(status=seen[0], others=tuple(others.values()),
                      announced=announced[0] if announced else None)

    try:
        deadline = time.monotonic() + timeout_s
        while not events["marker"]:
            if refusal:
                raise BrokerRefused(refusal[0])
            if events["lost"]:
                raise ConnectionResetError("the broker closed the connection")
            if stop.is_set():
                return survey()
            if time.monotonic() > deadline:
                raise LookTimeout(f"no answer on {topics.coordinator_status} within "
                                  f"{timeout_s:g} s")
            client.loop(timeout=0.1)
        while not until(seen[0]) and not stop.is_set():
            if events["lost"]:
                raise ConnectionResetError("the broker closed the connection")
            client.loop(timeout=0.5)
        return survey()
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop(timeout=0.1)


def _announced_version(payload: bytes) -> int | None:
    """The version an announcement names; read leniently (any schema): only the number
    matters here, and an announcement of a newer schema still says the fleet is that far."""
    try:
        version = json.loads(payload).get("version")
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
