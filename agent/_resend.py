"""When to send an unacked update again, for a device the broker keeps no session for.

A sessionless device (``session = "sessionless"``, docs/brokers.md) subscribes to its acks at
QoS 0: the broker neither stores them while the device is away nor redelivers one lost on the
way. The spool still keeps every update until its ack, and a reconnect sends them all again;
this covers the rest, an ack lost while the connection stayed up. An update with no ack after
the ack timeout goes again; the coordinator answers a copy it has with ``duplicate``.

The timeout follows the acks this device measures (RFC 6298's estimator: smoothed latency plus
four times its variation, samples only from updates sent once, as Karn's rule asks), doubles
for each copy of the same update, and is never more than `max_s`. At most `in_flight` copies
wait for their ack at once: a coordinator that is merely slow gets a trickle, not the spool.

Pure: the caller passes the time (the agent's network clock) and the updates still spooled.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from fedasync_iot.models import ConfigError, bounds, check_fields

MIN_TIMEOUT_S = 1.0  # an ack measured faster than this still gets a second before a copy goes
_ALPHA, _BETA, _K = 1 / 8, 1 / 4, 4  # RFC 6298, section 2


@dataclass(frozen=True, slots=True, kw_only=True)
class ResendConfig:
    # The ack timeout before any ack was measured.
    initial_s: float = field(default=30.0, metadata=bounds(gt=0, rule="a positive number of "
                                                            "seconds"))
    # The longest wait for an ack, however slow the acks and however many copies went.
    max_s: float = field(default=900.0, metadata=bounds(gt=0, rule="a positive number of "
                                                        "seconds"))
    # Copies sent again that may wait for their ack at once.
    in_flight: int = field(default=2, metadata=bounds(ge=1, integer=True))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.initial_s > self.max_s:
            raise ConfigError(f"initial_s ({self.initial_s:g}) must not be above max_s "
                              f"({self.max_s:g})", key="initial_s")


@dataclass(slots=True)
class _Sent:
    at: float  # the last copy
    copies: int  # sent since the last (re)connect; 1: its ack is a latency sample


@dataclass(slots=True)
class Resender:
    config: ResendConfig = field(default_factory=ResendConfig)
    srtt: float | None = None  # smoothed ack latency, seconds
    rttvar: float = 0.0
    resent: int = 0  # copies sent by `due`, lifetime
    _sent: dict[str, _Sent] = field(default_factory=dict)

    def timeout(self) -> float:
        """The wait for the ack of an update sent once."""
        base = self.config.initial_s if self.srtt is None else self.srtt + _K * self.rttvar
        return min(max(base, MIN_TIMEOUT_S), self.config.max_s)

    def sent(self, update_id: str, now: float) -> None:
        """`update_id` handed to the connection: its first copy, or one sent on a reconnect
        (a fresh start: the copies before went with the old connection)."""
        self._sent[update_id] = _Sent(now, 1)

    def acked(self, update_id: str, now: float) -> None:
        """Its ack arrived (whatever it says): no more copies; its latency is measured when
        only one copy could have caused the ack."""
        entry = self._sent.pop(update_id, None)
        if entry is None or entry.copies != 1:
            return
        sample = max(now - entry.at, 0.0)
        if self.srtt is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - sample)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * sample

    def due(self, now: float, spooled: Collection[str]) -> list[str]:
        """The updates to send again now, least recently sent first, marked as sent; `spooled`:
        those still in the spool and not held back (an update that left it is forgotten)."""
        for gone in self._sent.keys() - set(spooled):
            del self._sent[gone]
        waiting = sum(1 for e in self._sent.values() if e.copies > 1 and now < self._deadline(e))
        out: list[str] = []
        for update_id, e in sorted(self._sent.items(), key=lambda kv: kv[1].at):
            if waiting + len(out) >= self.config.in_flight:
                break
            if now >= self._deadline(e):
                e.at, e.copies = now, e.copies + 1
                out.append(update_id)
        self.resent += len(out)
        return out

    def _deadline(self, e: _Sent) -> float:
        return e.at + min(self.timeout() * 2.0 ** (e.copies - 1), self.config.max_s)

    def status(self) -> dict[str, float | int | None]:
        return {"resent": self.resent, "ack_timeout_s": round(self.timeout(), 3),
                "ack_latency_s": None if self.srtt is None else round(self.srtt, 3)}
