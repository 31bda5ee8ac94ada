"""Which coordinator serves a fleet on a broker: its presence, and a look before connecting.

A coordinator's retained status (``<root>/<fleet>/coordinator/status``, also its last will)
names the instance behind it: a random id, host, pid and since when it serves. Before the
coordinator connects with its client id (which would take over the live coordinator's broker
session, and with it the fleet's updates), `look` reads that status with a short-lived
clean-session client. Retained messages have no end marker, so `look` publishes a marker of its
own (not retained) on the same topic after subscribing: the broker delivers the retained status
first, so once the marker is back, what came before it is all there is.
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

import paho.mqtt.client as mqtt

from models import Topics
from models._mqtt import BrokerAddress, BrokerRefused, describe_refusal, make_client

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

    def to_json(self) -> bytes:
        return json.dumps({"state": self.state, "fleet": self.fleet, "time": self.time,
                           "instance": self.instance, "host": self.host, "pid": self.pid,
                           "pid_namespace": self.pid_namespace, "since": self.since}).encode()

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
                       since=None if d.get("since") is None else float(d["since"]))
        except (TypeError, ValueError):
            return None

    def describe(self) -> str:
        """"pid 812 on host edge-1, online since 2026-05-01 08:00:00 UTC" (what is known)."""
        who = (f"pid {self.pid} on host {self.host}" if self.pid is not None and self.host
               else "of an older version, with no instance id")
        since = self.since or self.time
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else "?"
        return f"{who}, online since {when}"


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


class Identity:
    """This coordinator instance: what it publishes as its status, and whether another one that
    says "online" is alive."""

    def __init__(self, fleet: str, *, clock: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.instance = uuid.uuid4().hex
        self.since = clock()
        self.has_served = False  # connected at least once: a rival found later took over
        self._clock = clock

    def presence(self, state: str) -> Presence:
        return Presence(state=state, fleet=self.fleet, time=self._clock(),
                        instance=self.instance, host=HOST, pid=os.getpid(),
                        pid_namespace=PID_NAMESPACE, since=self.since)

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
        if status.host != HOST or status.pid is None or status.pid_namespace != PID_NAMESPACE:
            return status  # another machine (or container): it cannot be checked from here
        if status.pid == os.getpid():
            with _LIVE_LOCK:
                return status if status.instance in _LIVE else None
        return status if _process_exists(status.pid) else None


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
) -> Presence | None:
    """The coordinator status retained for this fleet (None: there is none).

    With `until`, stays subscribed and returns the first status (retained, then live) for which
    it is true, or the last one when `stop` is set. Raises OSError when the broker cannot be
    reached or drops the connection (the caller logs it and retries) and LookTimeout when the
    marker does not come back within `timeout_s`.
    """
    marker = json.dumps({"state": "probe", "probe": uuid.uuid4().hex}).encode()
    client = make_client(address, client_id=f"fedasync-probe-{uuid.uuid4().hex[:12]}",
                         persistent=False)
    seen: list[Presence | None] = [None]
    events = {"marker": False, "lost": False}
    refusal: list[str] = []

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refusal.append(describe_refusal(reason))
            return
        c.subscribe(topics.coordinator_status, qos=0)

    def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        c.publish(topics.coordinator_status, marker, qos=0, retain=False)

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if payload == marker:
            events["marker"] = True
            return
        status = Presence.parse(payload)
        if status is not None:
            seen[0] = status

    def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                      props: Any) -> None:
        events["lost"] = True

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    client.connect(address.host, address.port, keepalive=30)  # OSError: the caller's to log
    try:
        deadline = time.monotonic() + timeout_s
        while not events["marker"]:
            if refusal:
                raise BrokerRefused(refusal[0])
            if events["lost"]:
                raise ConnectionResetError("the broker closed the connection")
            if stop.is_set():
                return seen[0]
            if time.monotonic() > deadline:
                raise LookTimeout(f"no answer on {topics.coordinator_status} within "
                                  f"{timeout_s:g} s")
            client.loop(timeout=0.1)
        while not until(seen[0]) and not stop.is_set():
            if events["lost"]:
                raise ConnectionResetError("the broker closed the connection")
            client.loop(timeout=0.5)
        return seen[0]
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop(timeout=0.1)
