"""Many MQTT clients on one thread: an epoll selector plus a timer heap.

paho's own loops use select() (capped at FD_SETSIZE, ~1024 sockets) and ``loop_start`` spends a
thread per client; a simulated fleet of thousands needs neither. The client supports an external
loop (`Client.drive_with`): we watch each client's socket and call ``loop_read`` /
``loop_write`` / ``loop_misc`` ourselves, and reconnect with backoff and jitter (the project's
`Backoff`: 0.5 s doubling to 30 s, each wait 50-150% of that) when a connection drops.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import selectors
import time
from collections.abc import Callable
from typing import Any

from fedasync_iot.models import Backoff, Client

log = logging.getLogger("fedasync.fleet.net")

# Attempt n waits 0.5 * 2**n s (the first retry after a drop, n = 0, about 0.5 s), capped.
_BACKOFF = Backoff(0.5, 30.0, jitter=(0.5, 1.5))


class NetLoop:
    def __init__(self, *, seed: int = 0) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._clients: dict[int, Client] = {}  # id(client) -> client
        self._want: dict[int, tuple[str, int]] = {}  # clients that should be connected
        self._rng = random.Random(seed)
        self._stopping = False

    # -- timers ------------------------------------------------------------------------------
    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), fn))

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_at(time.monotonic() + delay, fn)

    # -- clients -----------------------------------------------------------------------------
    def attach(self, client: Client) -> None:
        """Take over a client's I/O; call before `connect`."""
        self._clients[id(client)] = client
        client.drive_with(self)

    def connect(self, client: Client, host: str, port: int, *, keepalive: int = 60) -> None:
        """Connect now and keep reconnecting (backoff with jitter) until `disconnect`."""
        self._want[id(client)] = (host, port)
        try:
            client.connect(host, port, keepalive=keepalive)
        except OSError as exc:
            log.debug("connect failed (%s); retrying", exc)
            self._retry(client, attempt=1)

    def disconnect(self, client: Client) -> None:
        self._want.pop(id(client), None)
        if client.socket() is not None:
            client.disconnect()

    def _retry(self, client: Client, attempt: int) -> None:
        delay = _BACKOFF.delay(attempt, self._rng)

        def again() -> None:
            if id(client) not in self._want or client.socket() is not None:
                return
            try:
                client.reconnect()
            except OSError:
                self._retry(client, attempt + 1)

        self.call_later(delay, again)

    # -- the client's socket events (`models._mqtt_client.SocketLoop`) -----------------------
    def opened(self, client: Client, sock: Any) -> None:
        self._selector.register(sock, selectors.EVENT_READ, client)

    def closed(self, client: Client, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        if id(client) in self._want and not self._stopping:
            self._retry(client, attempt=0)

    def want_write(self, client: Client, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def wrote(self, client: Client, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ, client)

    def watch(self, fileobj: Any, on_readable: Callable[[], None]) -> None:
        """Call `on_readable` on this loop's thread whenever `fileobj` (anything with a
        ``fileno``: a pipe to the parent process, say) has something to read."""
        self._selector.register(fileobj, selectors.EVENT_READ, on_readable)

    # -- running -----------------------------------------------------------------------------
    def run(self, until: Callable[[], bool], *, misc_every: float = 1.0,
            after_io: Callable[[], None] | None = None) -> None:
        """Serve sockets and timers until `until()` is true (checked at least every 0.2 s);
        `after_io` after each round of socket events."""
        next_misc = time.monotonic()
        while not until():
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                try:
                    fn()
                except Exception:  # one device's bug must not stop the fleet
                    log.exception("timer callback failed")
            if now >= next_misc:
                for client in list(self._clients.values()):
                    if client.socket() is not None:
                        client.loop_misc()
                next_misc = now + misc_every
            timeout = min(0.2, max(0.0, (self._timers[0][0] - time.monotonic())
                                   if self._timers else 0.2))
            for key, events in self._selector.select(timeout):
                client = key.data
                if not isinstance(client, Client):
                    client()
                    continue
                try:
                    if events & selectors.EVENT_READ:
                        client.loop_read()
                    if events & selectors.EVENT_WRITE and client.socket() is not None:
                        client.loop_write()
                except OSError:
                    log.debug("socket error", exc_info=True)
            if after_io is not None:
                after_io()

    def close(self) -> None:
        self._stopping = True
        for client in self._clients.values():
            if client.socket() is not None:
                client.disconnect()
                client.loop_write()
        self._selector.close()
