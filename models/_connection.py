"""`Connection`: one client's link to the broker, kept up and reported honestly.

It runs the client's network I/O on a thread of its own: one attempt (`Client.open`), the
session (`Client.serve`) until it closes, the backoff's wait, the next attempt, on the next
broker URL when there are several. Everything through the client's public calls: no hook into
paho's own reconnect loop."""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from fedasync_iot.models._backoff import Backoff
from fedasync_iot.models._broker_address import BrokerAddress
from fedasync_iot.models._errors import BrokerRefused
from fedasync_iot.models._mqtt_client import Client, Connack

# Each wait a random 50-100% of the nominal one, when a connection has jitter.
_JITTER = (0.5, 1.0)


def describe_error(exc: BaseException | None, address: BrokerAddress) -> str:
    """Why a connection attempt failed, in words an operator can act on."""
    where = f"{address.host}:{address.port}"
    if exc is None:
        return "unknown error"
    if isinstance(exc, BrokerRefused):
        return str(exc)
    if isinstance(exc, socket.gaierror):
        return f"the name {address.host!r} does not resolve ({exc.strerror})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused: nothing listens on {where}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: the broker's certificate is not trusted ({exc.verify_message}); "
                "check ca_file and the host name in the broker URL")
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} (timed out: host down, or a firewall drops the packets)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class Connection:
    """One client's connection to the broker, kept up and reported honestly.

    Every failed attempt is logged at once (WARNING) with why and when the next one is; the
    wait starts at `min_delay_s` and doubles up to `max_delay_s`, and with `jitter` each wait is
    a random 50-100% of that, so a fleet does not reconnect in step after a broker restart.
    Success is logged once ("connected", or "reconnected after N failed attempts"); a stop is not
    a failure. `info()` is the state for /status and the agent's status: state (connecting,
    online, disconnected, stopped), broker, last_error, since, attempts.

    Failover: when the address has alternates (several broker URLs), every failed attempt and
    every lost connection moves the next attempt to the next URL, round robin, and the log line
    says where it goes and why. The backoff then doubles once per round of the list, not per
    attempt, so one dead node does not slow the move to a live one; with one URL it is as
    before. `address` is the URL in use (or being tried).

    The client's `gate`, if set, runs before every attempt (module docstring of
    `models._mqtt_client`); `on_online(client, session_present)` runs on each connect.
    """

    def __init__(
        self,
        client: Client,
        address: BrokerAddress,
        *,
        logger: logging.Logger,
        keepalive: int,
        min_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
        jitter: bool = False,
        rng: random.Random | None = None,
        on_online: Callable[[Client, bool], None] | None = None,
        on_offline: Callable[[], None] | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._addresses = address.candidates()
        self._index = 0
        self.keepalive = keepalive
        self._log = logger
        self._backoff = Backoff(min_delay_s, max_delay_s, jitter=_JITTER if jitter else None)
        self._rng = rng or random.Random()
        self._on_online = on_online
        self._on_offline = on_offline
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._online = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = "connecting"
        self._since = clock()
        self._last_error: str | None = None
        self._attempts = 0  # failed attempts since the last success
        self._waits = 0  # retry waits since the last success: the backoff's exponent
        self._down_since: float | None = None
        self._delay = min_delay_s  # the wait before the next attempt, set at each failure
        client.on_connack = self._connected
        client.on_closed = self._disconnected

    @property
    def address(self) -> BrokerAddress:
        """The broker URL in use, or the one the next attempt goes to."""
        return self._addresses[self._index]

    @property
    def next_attempt(self) -> tuple[BrokerAddress, float]:
        """Where the next attempt goes, and after how many seconds of waiting."""
        with self._lock:
            return self.address, self._delay

    @property
    def running(self) -> bool:
        """Its network thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # -- the owner's side --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"mqtt-{self.address.host}:{self.address.port}")
        self._thread.start()

    def stop(self) -> None:
        """Disconnect on purpose: logged as a stop, never as a lost connection. From the
        network thread itself (a callback) the thread is not joined."""
        self._stopping.set()
        self.client.disconnect()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._set("stopped")

    @property
    def online(self) -> bool:
        return self._online.is_set()

    @property
    def stopping(self) -> threading.Event:
        """Set by `stop()`: what anything waiting on the broker's behalf should also wait on."""
        return self._stopping

    def wait_online(self, timeout: float) -> bool:
        return self._online.wait(timeout)

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self._state, "broker": self.address.redacted(),
                    "last_error": self._last_error, "since": round(self._since, 3),
                    "attempts": self._attempts}

    def failed(self, reason: str) -> None:
        """One attempt failed (also for failures found by a client gate): log, back off (and
        with several URLs, move to the next)."""
        with self._lock:
            self._attempts += 1
            self._last_error = reason
            attempts = self._attempts
            delay = self._next_delay()
            where, to = self._move()
        if to is None:
            self._log.warning("cannot connect to %s: %s; next attempt in %.1f s (%d failed so "
                              "far)", where, reason, delay, attempts)
        else:
            self._log.warning("cannot connect to %s: %s; failing over: next attempt on %s in "
                              "%.1f s (%d failed so far)", where, reason, to, delay, attempts)
        self._changed()

    # -- the network thread ------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            target = self.address
            try:
                self.client.open(target, keepalive=self.keepalive)
            except OSError as exc:
                if not self._stopping.is_set():
                    self.failed(describe_error(exc, target))
            else:
                if self._stopping.is_set():  # stopped while connecting: say goodbye at once
                    self.client.disconnect()
                self.client.serve(self._stopping)
            if not self._stopping.is_set():
                with self._lock:
                    delay = self._delay
                self._stopping.wait(delay)

    def _connected(self, connack: Connack) -> None:
        if connack.refusal is not None:
            self.failed(connack.refusal)
            return
        with self._lock:
            attempts, down_since = self._attempts, self._down_since
            self._attempts = self._waits = 0
            self._down_since = None
        self._set("online")
        self._online.set()
        where, session = self.address.redacted(), connack.session_present
        if down_since is not None:
            self._log.info("reconnected to %s after %d failed attempt(s), %.1f s without the "
                           "broker (session present: %s)", where, attempts,
                           self._clock() - down_since, session)
        elif attempts:
            self._log.info("connected to %s after %d failed attempt(s) (session present: %s)",
                           where, attempts, session)
        else:
            self._log.info("connected to %s (session present: %s)", where, session)
        if self._on_online is not None:
            self._on_online(self.client, session)

    def _disconnected(self, why: str) -> None:
        was_online = self._online.is_set()
        self._online.clear()
        if self._stopping.is_set():
            self._set("stopped")
            self._log.debug("disconnected from %s (stopping)", self.address.redacted())
        elif was_online:
            with self._lock:
                self._last_error = why
                self._down_since = self._clock()
                delay = self._next_delay()
                where, to = self._move()
            self._set("disconnected")
            if to is None:
                self._log.warning("lost the connection to %s (%s); reconnecting in %.1f s",
                                  where, why, delay)
            else:
                self._log.warning("lost the connection to %s (%s); failing over: reconnecting "
                                  "to %s in %.1f s", where, why, to, delay)
        # else: a refused CONNECT, already counted and logged by _connected
        if was_online and self._on_offline is not None:
            self._on_offline()

    # -- internals ---------------------------------------------------------------------------
    def _next_delay(self) -> float:
        """The wait before the next attempt (call with the lock held): doubles at each round of
        the broker URLs (with one URL, at each call)."""
        rounds = self._waits // len(self._addresses)
        self._waits += 1
        self._delay = self._backoff.delay(rounds, self._rng)
        return self._delay

    def _move(self) -> tuple[str, str | None]:
        """After a failure or a loss (lock held): the next attempt goes to the next URL, round
        robin. The URL left (redacted), and the one moved to (None: there is only one)."""
        where = self.address.redacted()
        if len(self._addresses) == 1:
            return where, None
        self._index = (self._index + 1) % len(self._addresses)
        return where, self.address.redacted()

    def _set(self, state: str) -> None:
        with self._lock:
            if state == self._state:
                return
            self._state = state
            self._since = self._clock()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.info())
