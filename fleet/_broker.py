"""A private Mosquitto for tests, the simulator and benchmarks.

It listens on loopback only, on a free port, with a config file we write, so it never touches the
machine's own broker on 1883. `stop()` then `start()` again keeps the port and (with persistence)
the retained messages and queued sessions: that is how outage tests restart "the" broker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fedasync_iot.models import FedAsyncError


class BrokerError(FedAsyncError):
    """The broker could not be started or did not become ready in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit and return it.

    Every simulated device holds a socket in its worker and another in Mosquitto, and both
    inherit the limit of the process that starts them: at a common soft limit of 1,024 a private
    broker or a worker stops accepting (connecting) at about a thousand devices, well under
    the hard limit. Children started after this call (the broker, the workers) inherit the raised
    limit. Returns the soft limit in force (unchanged where `resource` is unavailable)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return int(soft)
    # An unlimited hard limit still stops at the kernel's fs.nr_open (2**20 by default).
    target = (1 << 20) if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


class MosquittoBroker:
    """Runs `mosquitto -c <generated conf>` as a child process."""

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        port: int | None = None,
        persistence: bool = True,
        max_inflight: int = 1000,
        max_queued: int = 100_000,
        message_size_limit: int = 64 * 1024 * 1024,
        sys_interval: int = 1,
        extra_conf: str = "",
    ) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self._exe = exe
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="fedasync-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            # Group commit acks a batch at once; the default of 20 in flight would cap the batch.
            f"max_inflight_messages {max_inflight}",
            # The default (1000) silently drops QoS 1 messages queued for an offline client.
            f"max_queued_messages {max_queued}",
            "max_queued_bytes 0",
            f"message_size_limit {message_size_limit}",
            # Nagle's algorithm (Mosquitto's default) held each small ack ~40 ms behind the
            # peer's delayed ACK: p50 update-to-ack 42.9 ms with it, 5.7 ms without.
            "set_tcp_nodelay true",
            # $SYS counters every second (bytes and messages in and out: read_sys_counters);
            # nothing is sent while nobody subscribes to them.
            f"sys_interval {sys_interval}",
            # As root, Mosquitto drops to the `mosquitto` user, which cannot write a private
            # temp dir: no persistence file would be written. Stay root for these brokers.
            "user root" if os.geteuid() == 0 else "",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            extra_conf,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (None when stopped)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, *, timeout: float = 10.0) -> None:
        if self.running:
            return
        raise_fd_limit()  # a socket per client: Mosquitto inherits the limit and keeps it
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [self._exe, "-c", str(self.conf_path)], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with {self._proc.returncode}: {self._tail_log()}"
                )
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on port {self.port} in {timeout}s")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM): Mosquitto writes its persistence file on the way out."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout)
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _tail_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedBroker:
    """A pure-Python broker (amqtt) in a background thread, for machines without Mosquitto.

    Good enough for a demo; it is slower than Mosquitto and its persistence differs, so tests
    and benchmarks use Mosquitto.
    """

    def __init__(self, *, port: int | None = None) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise BrokerError("neither mosquitto nor amqtt is installed: apt-get install "
                              "mosquitto, or pip install amqtt") from exc
        import asyncio
        import threading

        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._broker = Broker({
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}",
                                      "max_connections": 10_000}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }, loop=self._loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt",
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 10.0) -> None:
        import asyncio

        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._broker.start(), self._loop).result(timeout)

    def stop(self) -> None:
        import asyncio
        import concurrent.futures

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    close = stop


# $SYS topics under $SYS/broker/ -> the names read_sys_counters gives them. `messages` count every
# MQTT packet (CONNECT, PUBACK, PINGREQ, ...), `publish/messages` only PUBLISH packets.
SYS_COUNTERS = {
    "bytes/received": "bytes_received", "bytes/sent": "bytes_sent",
    "messages/received": "messages_received", "messages/sent": "messages_sent",
    "publish/bytes/received": "publish_bytes_received",
    "publish/bytes/sent": "publish_bytes_sent",
    "publish/messages/received": "publish_messages_received",
    "publish/messages/sent": "publish_messages_sent",
    "publish/messages/dropped": "publish_messages_dropped",
}
# Seen on a broker that had served many clients: its retained "dropped" counter was gone (0
# before and after), so a reader waiting for it waited in vain. It is read as 0 when absent.
_REQUIRED_COUNTERS = frozenset(SYS_COUNTERS.values()) - {"publish_messages_dropped"}


def read_sys_counters(url: str, *, timeout: float = 15.0) -> dict[str, int] | None:
    """The broker's lifetime traffic counters (`SYS_COUNTERS`) as of its next $SYS tick, or
    None when they do not come within `timeout` (a broker without $SYS, or no broker).

    Mosquitto publishes a counter (retained) only when it changed since the last tick, so the
    values are those held after two fresh ticks of ``$SYS/broker/uptime`` have passed since
    subscribing: everything before this call is in them. They include this reader's own
    connection (well under 1 KB)."""
    import threading

    from fedasync_iot.models import BrokerAddress, Connack, Message, create_client

    values: dict[str, int] = {}
    ticks = 0
    done = threading.Event()
    lock = threading.Lock()

    def on_message(msg: Message) -> None:
        nonlocal ticks
        name = msg.topic.removeprefix("$SYS/broker/")
        with lock:
            if name == "uptime":
                if not msg.retain:
                    ticks += 1
                    if ticks >= 2 and all(k in values for k in _REQUIRED_COUNTERS):
                        done.set()
                return
            with contextlib.suppress(ValueError):
                values[SYS_COUNTERS[name]] = int(float(msg.payload.decode()))

    address = BrokerAddress.parse(url)
    client = create_client(address, client_id=f"fedasync-sys-{os.getpid()}-{time.monotonic_ns()}",
                         persistent=False)
    def on_connack(connack: Connack) -> None:
        client.subscribe([(f"$SYS/broker/{t}", 0) for t in (*SYS_COUNTERS, "uptime")])

    client.handle(on_message)
    client.on_connack = on_connack
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError:
        return None
    client.loop_start()
    try:
        if not done.wait(timeout):
            return None
        with lock:
            return {"publish_messages_dropped": 0, **values}
    finally:
        client.disconnect()
        client.loop_stop()


def diff_counters(before: dict[str, int] | None, after: dict[str, int] | None
                  ) -> dict[str, int] | None:
    """What happened between two `read_sys_counters` (None if either is missing)."""
    if before is None or after is None:
        return None
    return {k: after[k] - before.get(k, 0) for k in after}


def start_broker(*, prefer: str = "auto", workdir: Path | None = None, max_inflight: int = 1000
                 ) -> MosquittoBroker | EmbeddedBroker:
    """Mosquitto when installed (or asked for), else the embedded amqtt broker; started.
    `max_inflight`: Mosquitto's max_inflight_messages (0: no window)."""
    broker: MosquittoBroker | EmbeddedBroker
    if prefer == "mosquitto" or (prefer == "auto" and mosquitto_path() is not None):
        broker = MosquittoBroker(workdir=workdir, max_inflight=max_inflight)
    else:
        broker = EmbeddedBroker()
    broker.start()
    return broker
