"""Which running agent this is, and how it tells that another one uses its device id.

MQTT gives a client id to the last client to connect: two agents with one device id (one client
id, `fedasync-agent-<device_id>`) take the session from each other at every reconnect, and on
MQTT 3.1.1 each sees only a lost connection (issue 21: 84 takeovers a minute, and one device
counted). So each agent carries a random instance id and its start time in its retained status
and its last will, and at every connect reads the retained status of its own device (subscribed
and unsubscribed at once, before it publishes its own: no echo of its own statuses comes down).
After a takeover the retained status shows the other agent in one of two ways: its own
"online" status, published (its ``time``) after this agent started; or, where the broker
publishes the will of the connection taken over (Mosquitto does when either session is clean:
sessionless devices), that will, which names when its connection was made (``connected_at``,
set before every attempt) - after this agent started. A status or will from before this agent
started is the last word of a previous run on this device (a crash, a SIGKILL, a reboot; or a
lagging copy on a clustered broker) and means nothing.

Of the two agents, the newer (later start; the instance id breaks a tie) stops with exit 2 and
an ERROR; the older logs an ERROR once per other instance and keeps running. A status without an
instance id (an older build) is never a conflict. The rule compares clocks of two devices: one
set far behind the other may keep the newer from noticing, and then only the older says so.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Instance:
    """One run of an agent: a random id and when it started (Unix seconds)."""

    id: str
    started_at: float

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.started_at, (int, float)) or not math.isfinite(
                self.started_at):
            raise ValueError(f"bad agent instance {self.id!r} started at {self.started_at!r}")

    @classmethod
    def new(cls, clock: Callable[[], float] = time.time) -> Instance:
        return cls(secrets.token_hex(6), clock())

    def fields(self) -> dict[str, Any]:
        """The keys it adds to a status or a last will."""
        return {"instance": self.id, "started_at": round(self.started_at, 3)}

    def newer_than(self, other: Instance) -> bool:
        return (self.started_at, self.id) > (other.started_at, other.id)

    def describe(self) -> str:
        return f"instance {self.id}, started {utc(self.started_at)}"


def utc(t: float) -> str:
    """Unix seconds as an ISO 8601 UTC time, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def live_instance(payload: bytes, *, since: float) -> Instance | None:
    """The instance an agent status or will shows alive at or after `since`: an "online" status
    published then, or a will whose connection was made then (module docstring); None for
    anything else (older, a stopped agent's offline status, a status without an instance id,
    unreadable bytes)."""
    try:
        status = json.loads(payload)
        if not isinstance(status, dict):
            return None
        state = status.get("state")
        when = status["time"] if state == "online" else status.get("connected_at")
        if state not in ("online", "offline") or when is None or not float(when) >= since:
            return None
        return Instance(str(status["instance"]), float(status["started_at"]))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None


class TwinWatch:
    """Fed the retained status of the agent's own device at each connect; says when another
    agent holds the same device id (module docstring). Not thread-safe: the MQTT client calls it
    from its one network thread."""

    def __init__(self, me: Instance) -> None:
        self.me = me
        self.twins: dict[str, Instance] = {}  # other instances seen, by id

    def observe(self, payload: bytes) -> Instance | None:
        """The other instance this status reveals the first time it does, else None."""
        seen = live_instance(payload, since=self.me.started_at)
        if seen is None or seen.id == self.me.id or seen.id in self.twins:
            return None
        self.twins[seen.id] = seen
        return seen


def process_identity(pid: int | None = None) -> dict[str, Any]:
    """A process's pid and start time (Unix seconds; this one's by default): with both, a pid
    reused by another process after a crash is not taken for the agent. Empty when it is gone."""
    import psutil

    try:
        process = psutil.Process(pid)
        return {"pid": process.pid, "process_started": round(process.create_time(), 3)}
    except psutil.Error:
        return {}
