"""What the agent needs from its transport: `agent._runner.PahoLink` on a device, the fleet
simulator's links in `fedasync-sim`. Production code and the simulator meet only here."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


class Link(Protocol):
    """What the agent needs from an MQTT connection."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
                ) -> None: ...


@runtime_checkable
class Subscribes(Protocol):
    """A link the agent may subscribe through (agent._runner.PahoLink, the simulator's
    SimLink): then it fetches models on demand. A link without these methods delivers whatever
    it subscribed to itself, as links did before models on demand."""

    def subscribe(self, topic: str, qos: int = 0) -> None: ...

    def unsubscribe(self, topic: str) -> None: ...


@runtime_checkable
class ReportsConnection(Protocol):
    """A link that can say more than up/down (agent._runner.PahoLink): state, broker,
    last_error, since, attempts."""

    def connection_info(self) -> dict[str, Any]: ...
