"""What the agent's parts share (`Shared`), and `Forward`, which keeps an attribute of the
agent on the part that owns it.

One `Shared` object, not copies: an owner or a test that gives the agent another link, config or
clock (``agent.link = ...``) changes it for every part at once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._link import Link
from fedasync_iot.agent._resend import Resender
from fedasync_iot.models import Topics

T = TypeVar("T")


@dataclass(slots=True)
class Counters:
    trained: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    aborted: int = 0
    approved: int = 0  # by the approval hook
    refused: int = 0
    # Model fetches started on demand, by why: to train on a newer version, or to refresh the
    # inference model (none held, or last checked model_refresh_s ago). A template and the
    # weights it precedes are one fetch; a fetch that times out and is started again is two.
    fetched_for_training: int = 0
    fetched_for_refresh: int = 0


@dataclass(slots=True)
class Shared:
    """The agent's settings, link and clocks, its counters and its one lock. The lock is
    re-entrant and shared: announcements, snapshots and acks arrive on the network thread,
    polls run on the agent's own, and a part holding it calls into another."""

    config: AgentConfig
    link: Link
    clock: Callable[[], float]  # wall time: statuses, records
    monotonic: Callable[[], float]  # the device's time: intervals, backoff, model refresh
    # Waits on the network (a fetch, an announcement) are wall time even where the device's
    # own clock is simulated: a 120 s fetch timeout on a clock 960x faster gave up in 0.1 s.
    net_clock: Callable[[], float]
    topics: Topics = field(init=False)
    # When an update without an ack goes again (sessionless devices; agent._resend): fed by
    # every publish of an update and every ack, under the lock.
    resender: Resender = field(init=False)
    counters: Counters = field(default_factory=Counters)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.topics = Topics(self.config.fleet, self.config.topic_root)
        self.resender = Resender(self.config.resend)

    def published(self, update_id: str) -> None:
        """An update was handed to the connection: its ack is now awaited."""
        with self.lock:
            self.resender.sent(update_id, self.net_clock())


class Forward(Generic[T]):
    """An attribute kept on one of the owner's parts: ``link = Forward[Link]("shared")`` in a
    class body makes ``owner.link`` read and write ``owner.shared.link`` (``name``, when given,
    is the part's name for it)."""

    def __init__(self, part: str, name: str = "") -> None:
        self.part = part
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> Forward[T]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)
