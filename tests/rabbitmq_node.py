"""A private RabbitMQ 3.10 node serving MQTT (the `rabbitmq_mqtt` plugin), for broker-neutral
tests.

One `rabbitmq-server` started by path (`/usr/lib/rabbitmq/bin`, not the `/usr/sbin` wrapper,
which switches to the `rabbitmq` user and could not read a test's temporary directory), with
every setting that would reach the machine's own node (5672, `/var/lib/rabbitmq`, `rabbit@...`)
pointed into a temporary directory instead, by environment variables:

- `RABBITMQ_NODENAME=fedasync-<random>@localhost`: a name of its own, so that neither the node
  nor a `rabbitmqctl` can mistake it for the machine's `rabbit@localhost`.
- `RABBITMQ_CONF_ENV_FILE`: our own (empty) file, so the machine's `/etc/rabbitmq/rabbitmq-env.conf`
  (which sets `NODENAME=rabbit@localhost` on this machine) is never read; `RABBITMQ_CONFIG_FILE`
  (the `.conf` below), `RABBITMQ_ADVANCED_CONFIG_FILE` (absent) and `RABBITMQ_CONFIG_FILES`
  (an empty conf.d) likewise keep `/etc/rabbitmq` out.
- `RABBITMQ_MNESIA_BASE`, `RABBITMQ_LOG_BASE`, `RABBITMQ_PID_FILE`, `HOME` (its own
  `.erlang.cookie`): all its data, logs and secrets in the directory.
- `RABBITMQ_ENABLED_PLUGINS_FILE`: `[rabbitmq_mqtt].`, nothing else (no management UI, so no
  15672).
- `RABBITMQ_NODE_PORT` (AMQP, unused by us but always opened) and `RABBITMQ_DIST_PORT` (Erlang
  distribution): free loopback ports, never 5672 or 25672.
- `ERL_EPMD_PORT`/`ERL_EPMD_ADDRESS`: a private `epmd` on a free loopback port (never the
  machine's 4369), started by `start()` in the foreground so that `close()` can stop exactly it
  (a node that finds no epmd starts one as a daemon, which nobody would stop).
- `ERL_FLAGS`: distribution on the loopback interface only.

The `.conf` file (new style, `rabbit.schema` and `rabbitmq_mqtt.schema` of 3.10.8):

- `listeners.tcp.default`, `mqtt.listeners.tcp.default`: 127.0.0.1 and free ports (never 1883).
- `default_vhost`/`default_user`/`default_pass`: the node creates, at its first boot, a vhost
  `fedasync` and a user with a random password and full permissions on it (not `guest`).
- `mqtt.vhost = fedasync`, `mqtt.allow_anonymous = true`, `mqtt.default_user`/`default_pass`:
  an MQTT client without credentials is that user in that vhost (the vhost of every MQTT
  client, since our URLs carry no `vhost:user` login).
- `mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_dets` (the default, named):
  retained messages on disk in the node's own directory, per vhost, node-local (not
  replicated in a cluster); `..._dets_sync_interval` 2000 ms. `_ets` would keep them in memory
  only (lost with the node).
- `mqtt.subscription_ttl = 86400000` (the default, 24 h): how long the queue of a persistent
  session (`clean_session=false`) outlives its client.
- `mqtt.prefetch = 10` (the default): unacknowledged QoS 1 messages in flight to one client.
- `max_message_size = 16842752` (16 MiB + 64 KiB, as Mosquitto's `max_packet_size` in
  `deploy/`): RabbitMQ's limit on one message (default 128 MiB in 3.10), which MQTT publishes
  go through; the coordinator's own limit is 16 MiB. 3.10 has no `mqtt.max_message_size`.

RabbitMQ 3.10 serves MQTT 3.1 and 3.1.1 only and downgrades QoS 2 subscriptions to QoS 1.

`start()` returns once the node takes a real MQTT connection and a QoS 1 retained message it
was given is delivered to a fresh subscription (the MQTT listener opens before the retainer is
serving); `close()` stops the node (SIGTERM to its process group, then SIGKILL) and its epmd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from fedasync_iot.fleet._broker import free_port
from tests.helpers import clear_retained, retained_round_trip

VHOST = "fedasync"
MAX_MESSAGE_SIZE = 16 * 1024 * 1024 + 64 * 1024
# The machine's own node (and RabbitMQ's defaults): never ours.
RESERVED_PORTS = frozenset({4369, 5672, 1883, 8883, 15672, 15675, 25672})


def rabbitmq_server_path() -> str | None:
    """The real start script (not the /usr/sbin wrapper that su's to the rabbitmq user)."""
    for p in ("/usr/lib/rabbitmq/bin/rabbitmq-server",
              "/usr/local/lib/rabbitmq/bin/rabbitmq-server"):
        if Path(p).exists():
            return p
    return shutil.which("rabbitmq-server")


def epmd_path() -> str | None:
    return shutil.which("epmd") or next(
        (str(p) for p in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)


class RabbitError(RuntimeError):
    """The node did not start or become ready in time."""


class RabbitNode:
    """One private RabbitMQ node with the MQTT plugin, on free loopback ports."""

    def __init__(self, workdir: Path) -> None:
        exe, epmd = rabbitmq_server_path(), epmd_path()
        if exe is None:
            raise RabbitError("rabbitmq-server is not installed")
        if epmd is None:
            raise RabbitError("epmd (erlang-base) is not installed")
        self._exe, self._epmd_exe = exe, epmd
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.mqtt_port, self.amqp_port, self.dist_port, self.epmd_port = _distinct_free_ports(4)
        self.nodename = f"fedasync-{uuid.uuid4().hex[:8]}@localhost"
        self.user, self.password = "fedasync", uuid.uuid4().hex
        self.log_dir = workdir / "log"
        self.conf = workdir / "rabbitmq.conf"
        (workdir / "conf.d").mkdir(exist_ok=True)
        (workdir / "rabbitmq-env.conf").write_text("# private node: nothing from /etc\n")
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.conf.write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"default_vhost = {VHOST}\n"
            f"default_user = {self.user}\n"
            f"default_pass = {self.password}\n"
            "loopback_users = none\n"
            f"max_message_size = {MAX_MESSAGE_SIZE}\n"
            "log.console = false\n"
            "log.file.level = info\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}\n"
            "mqtt.allow_anonymous = true\n"
            f"mqtt.vhost = {VHOST}\n"
            f"mqtt.default_user = {self.user}\n"
            f"mqtt.default_pass = {self.password}\n"
            "mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_dets\n"
            "mqtt.retained_message_store_dets_sync_interval = 2000\n"
            "mqtt.subscription_ttl = 86400000\n"
            "mqtt.prefetch = 10\n")
        self._proc: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None  # seconds from process start to ready

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_"))
               and k not in {"NODENAME", "CONF_ENV_FILE"}}
        w = self.workdir
        env.update({
            "HOME": str(w),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.conf),
            "RABBITMQ_CONFIG_FILES": str(w / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def start(self, *, timeout: float = 90.0) -> None:
        began = time.monotonic()
        deadline = began + timeout
        out = (self.workdir / "stdout.log").open("ab")
        try:
            self._epmd = subprocess.Popen(
                [self._epmd_exe, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_port(self.epmd_port, deadline, "epmd")
            # Its own session (process group): close() signals the script, beam.smp and the
            # helpers beam starts (erl_child_setup, inet_gethost), and nothing else.
            self._proc = subprocess.Popen([self._exe], env=self.env(), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
            self._wait_port(self.mqtt_port, deadline, "MQTT")
            self._wait_mqtt(deadline)
            self.started_in = time.monotonic() - began
        except BaseException:
            self.close()
            raise
        finally:
            out.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_group(proc, grace=20)
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            _stop_group(epmd, grace=5)

    def logs(self, tail: int = 4000) -> str:
        out = []
        for path in [*sorted(self.log_dir.glob("*.log")), self.workdir / "stdout.log"]:
            with contextlib.suppress(OSError):
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out) or "(no logs)"

    # -- readiness ---------------------------------------------------------------------------
    def _wait_port(self, port: int, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            for p, name in ((self._proc, "rabbitmq-server"), (self._epmd, "epmd")):
                if p is not None and p.poll() is not None:
                    raise RabbitError(f"{name} exited with {p.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5):
                return
            time.sleep(0.1)
        raise RabbitError(f"the node did not listen on its {what} port {port} in time:\n"
                          f"{self.logs()}")

    def _wait_mqtt(self, deadline: float) -> None:
        """Poll, with real MQTT clients, until a QoS 1 retained message published to the node
        comes back on a fresh subscription."""
        topic = f"fedasync-ready/{uuid.uuid4().hex[:8]}"
        last = "no attempt"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RabbitError(f"rabbitmq-server exited with {self._proc.returncode}:\n"
                                  f"{self.logs()}")
            payload = uuid.uuid4().hex.encode()
            try:
                port = self.mqtt_port
                if (retained_round_trip(port, topic, payload, publish=True)
                        and retained_round_trip(port, topic, payload, publish=False)):
                    clear_retained(port, topic)
                    return
                last = "the retained message did not come back"
            except OSError as exc:  # ConnectionError too
                last = str(exc)
            time.sleep(0.25)
        raise RabbitError(f"the node's MQTT was not ready in time ({last}):\n{self.logs()}")


def _stop_group(proc: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM the process group `proc` leads (its own session), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # The group may outlive its leader (beam.smp under the start script): end it whole.
    with contextlib.suppress(ProcessLookupError):
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _distinct_free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        port = free_port()
        if port not in RESERVED_PORTS:
            ports.add(port)
    return sorted(ports)
