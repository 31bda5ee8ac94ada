"""Broker addresses and paho-mqtt 2.x clients, configured the same way for agent and coordinator,
and `Connection`: a client's link to the broker, kept up and reported honestly.

A broker setting may name several URLs (the nodes of a clustered broker: a TOML array, or
comma-separated text): the connection then fails over between them, round robin
(docs/brokers.md)."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedasync_iot.models._errors import ConfigError

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Several URLs in one text: split at a comma that starts another URL (scheme://), so that a
# comma inside a password stays (it would better be percent-encoded as %2C anyway).
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def broker_urls(setting: str | Sequence[str]) -> tuple[str, ...]:
    """The URLs of a broker setting: one URL, comma-separated URLs, or a list of URLs."""
    if isinstance(setting, str):
        return tuple(u for u in _URL_SEPARATOR.split(setting.strip()) if u)
    return tuple(u.strip() for u in setting)


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerAddress:
    """Where the broker is and how to log in: parsed from ``mqtt[s]://[user[:pass]@]host[:port]``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Further nodes to fail over to (the URLs after the first of a broker setting).
    alternates: tuple[BrokerAddress, ...] = ()

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("broker host is empty", key="broker")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port {self.port} out of range", key="broker")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a client certificate needs both cert_file and key_file")

    @classmethod
    def parse(
        cls,
        url: str | Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> BrokerAddress:
        """One address from ``mqtt[s]://...``; from several URLs (a list, or comma-separated)
        the first, with the others as its `alternates`, all of one scheme (one client has TLS
        or not)."""
        urls = broker_urls(url)
        if not urls:
            raise ConfigError("no broker URL", key="broker")
        if len(urls) > 1:
            first, *rest = (cls.parse(u, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
                            for u in urls)
            if any(a.tls != first.tls for a in rest):
                raise ConfigError("broker URLs mix mqtt:// and mqtts://: use one scheme for "
                                  "all of them", key="broker")
            if len({(a.host, a.port) for a in (first, *rest)}) != len(urls):
                raise ConfigError(f"a broker URL is listed twice: {', '.join(urls)}",
                                  key="broker")
            return replace(first, alternates=tuple(rest))
        parts = urlsplit(urls[0])
        url = urls[0]
        if parts.scheme not in _DEFAULT_PORTS:
            raise ConfigError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}",
                              key="broker")
        try:
            port = parts.port or _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ConfigError(f"bad port in broker URL {url!r}", key="broker") from exc
        return cls(
            host=parts.hostname or "",
            port=port,
            tls=parts.scheme == "mqtts",
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    def redacted(self) -> str:
        """The URL for logs: never print a password."""
        user = f"{self.username}:***@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"

    def candidates(self) -> tuple[BrokerAddress, ...]:
        """Every address to try, in order: this one, then its alternates."""
        return (replace(self, alternates=()), *self.alternates)


class BrokerRefused(ConnectionError):
    """The broker answered the CONNECT with a refusal (bad credentials, not authorized, ...)."""


class Client(mqtt.Client):
    """paho's client, with what its reconnect loop hides made visible.

    paho drops the exception of a failed attempt and waits on a schedule of its own. This client
    keeps the exception (`connect_error`), waits `retry_delay` seconds when its owner sets one
    (a `Connection` does; cut short by `disconnect` and `loop_stop`) and runs `gate`, if set,
    before every attempt: an OSError from the gate counts as a failed attempt.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.connect_error: OSError | None = None
        self.retry_delay: float | None = None  # None: paho's own schedule
        self.gate: Callable[[], None] | None = None
        # Where the next attempt goes, when a `Connection` fails over (None: where it was).
        self.target: BrokerAddress | None = None
        self._wake = threading.Event()
        self._attempted = False

    def connect_async(self, *args: Any, **kwargs: Any) -> None:
        self._wake.clear()  # a new connection asked for: no longer stopping
        super().connect_async(*args, **kwargs)

    def reconnect(self) -> MQTTErrorCode:
        self._attempted = True
        try:
            if self._wake.is_set():  # disconnected on purpose: no connection behind its back
                raise ConnectionAbortedError("the client is stopping")
            target = self.target
            if target is not None and (target.host, target.port) != (self._host, self._port):
                # paho's `host`/`port` setters refuse while its old socket is not yet closed;
                # `super().reconnect()` closes it and connects to these.
                self._host, self._port = target.host, target.port
                self.username_pw_set(target.username, target.password)
            if self.gate is not None:
                try:
                    self.gate()
                except OSError:
                    raise
                except Exception as exc:  # a bug there must not end paho's network thread
                    raise ConnectionError(f"the check before connecting failed: {exc!r}") \
                        from exc
            return super().reconnect()
        except OSError as exc:
            self.connect_error = exc
            raise

    def _reconnect_wait(self) -> None:
        # Overrides paho-mqtt 2.x's private hook (its loop calls it before each retry). Should a
        # later paho stop calling it, paho's own schedule applies and only our logged delays are
        # off. After a failed *first* attempt paho calls it twice in a row (once in its
        # first-connect loop, once in its main loop): wait once per attempt.
        if self.retry_delay is None:
            super()._reconnect_wait()
            return
        if not self._attempted:
            return
        self._attempted = False
        self._wake.wait(self.retry_delay)

    def _create_socket_connection(self) -> socket.socket:
        # Overrides paho-mqtt 2.x's private socket factory: paho leaves Nagle's algorithm on,
        # and two small packets written back to back (a PUBACK, then an ack or a snapshot) then
        # wait for the broker's delayed ACK: a 40 ms stall on Linux, in about 1 of 10 of the
        # coordinator's publishes in a simulated run (1.8 s of 529 waits for a PUBACK; 74 ms
        # with this). MQTT packets are whole messages: nothing gains from coalescing them.
        # Should a later paho stop calling this, only the latency suffers.
        sock = super()._create_socket_connection()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def disconnect(self, reasoncode: ReasonCode | None = None,
                   properties: Properties | None = None) -> MQTTErrorCode:
        self._wake.set()
        return super().disconnect(reasoncode, properties)

    def loop_stop(self) -> MQTTErrorCode:
        self._wake.set()
        return super().loop_stop()


def make_client(
    address: BrokerAddress,
    *,
    client_id: str,
    persistent: bool,
    manual_ack: bool = False,
    max_inflight: int = 20,
) -> Client:
    """A paho 2.x MQTT 3.1.1 client; `persistent` keeps the broker-side session across reconnects.

    Persistence is what lets the broker hold QoS 1 messages while this client is away.
    """
    client = Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=not persistent,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        context = ssl.create_default_context(cafile=address.ca_file)
        if address.cert_file is not None:
            context.load_cert_chain(address.cert_file, address.key_file)
        client.tls_set_context(context)
    return client


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


def describe_refusal(reason: ReasonCode) -> str:
    """A CONNACK refusal as one line; bad credentials say where to look."""
    text = f"the broker refused the connection: {str(reason).lower()}"
    if reason.value in (0x04, 0x05, 0x86, 0x87):  # bad user name or password / not authorized
        return f"{text} (check the user name and password in the broker URL)"
    return text


def _describe_loss(reason: ReasonCode) -> str:
    if reason.value == 0:
        return "the broker closed the connection"
    return ("connection lost: the broker closed it, or the network failed"
            if str(reason) == "Unspecified error" else str(reason))


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
        self._min_delay = min_delay_s
        self._max_delay = max_delay_s
        self._jitter = jitter
        self._rng = rng or random.Random()
        self._on_online = on_online
        self._on_offline = on_offline
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._online = threading.Event()
        self._stopping = threading.Event()
        self._state = "connecting"
        self._since = clock()
        self._last_error: str | None = None
        self._attempts = 0  # failed attempts since the last success
        self._waits = 0  # retry waits since the last success: the backoff's exponent
        self._down_since: float | None = None
        # Never paho's schedule for a client we own; each failure or loss sets the real wait.
        client.retry_delay = min_delay_s
        client.on_connect = self._connected
        client.on_connect_fail = self._connect_failed
        client.on_disconnect = self._disconnected

    @property
    def address(self) -> BrokerAddress:
        """The broker URL in use, or the one the next attempt goes to."""
        return self._addresses[self._index]

    # -- the owner's side --------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect_async(self.address.host, self.address.port,
                                  keepalive=self.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect on purpose: logged as a stop, never as a lost connection."""
        self._stopping.set()
        self.client.disconnect()
        self.client.loop_stop()
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
        self.client.retry_delay = delay
        if to is None:
            self._log.warning("cannot connect to %s: %s; next attempt in %.1f s (%d failed so "
                              "far)", where, reason, delay, attempts)
        else:
            self._log.warning("cannot connect to %s: %s; failing over: next attempt on %s in "
                              "%.1f s (%d failed so far)", where, reason, to, delay, attempts)
        self._changed()

    # -- paho's callbacks (its network thread) -----------------------------------------------
    def _connected(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                   reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self.failed(describe_refusal(reason))
            return
        with self._lock:
            attempts, down_since = self._attempts, self._down_since
            self._attempts = self._waits = 0
            self._down_since = None
        self._set("online")
        self._online.set()
        where, session = self.address.redacted(), flags.session_present
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
            self._on_online(self.client, flags.session_present)

    def _connect_failed(self, client: mqtt.Client, userdata: Any) -> None:
        if self._stopping.is_set():
            return
        self.failed(describe_error(self.client.connect_error, self.address))

    def _disconnected(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                      reason: ReasonCode, properties: Properties | None) -> None:
        was_online = self._online.is_set()
        self._online.clear()
        if self._stopping.is_set():
            self._set("stopped")
            self._log.debug("disconnected from %s (stopping)", self.address.redacted())
        elif was_online:
            why = _describe_loss(reason)
            with self._lock:
                self._last_error = why
                self._down_since = self._clock()
                delay = self._next_delay()
                where, to = self._move()
            self.client.retry_delay = delay
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
        nominal = min(self._min_delay * float(2 ** min(rounds, 20)), self._max_delay)
        self._waits += 1
        return nominal * self._rng.uniform(0.5, 1.0) if self._jitter else nominal

    def _move(self) -> tuple[str, str | None]:
        """After a failure or a loss (lock held): the next attempt goes to the next URL, round
        robin. The URL left (redacted), and the one moved to (None: there is only one)."""
        where = self.address.redacted()
        if len(self._addresses) == 1:
            return where, None
        self._index = (self._index + 1) % len(self._addresses)
        self.client.target = self.address
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


def check_broker(setting: str | Sequence[str]) -> None:
    """A broker setting names at least one URL, each a string (parsed when connecting)."""
    if not isinstance(setting, str) and not all(isinstance(u, str) for u in setting):
        raise ConfigError(f"broker must be a URL or a list of URLs, got {setting!r}",
                          key="broker")
    if not broker_urls(setting) or not all(broker_urls(setting)):
        raise ConfigError("broker names no URL (e.g. \"mqtt://127.0.0.1:1883\", or a list of "
                          "them)", key="broker")
