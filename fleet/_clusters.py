"""Private broker clusters beside `MosquittoBroker`, for broker-neutral tests and benchmarks
(`bench/sessions.py`): a 3-node NATS cluster with its MQTT gateway (`NatsCluster`) and one
RabbitMQ node with its MQTT plugin (`RabbitNode`). Both listen on free loopback ports only, keep
every file in the directory they are given, and are ready only once a QoS 1 retained message
makes the round trip through real MQTT clients (`retained_round_trip`, on the project's
`create_client`).

NATS (`NatsCluster`): three `nats-server` processes on free loopback ports (never the machine's
4222/6222/8222 or its data), each with a config file written into a temporary directory:
`server_name`, `listen`, `max_payload`, `cluster { name, listen, routes }`, `jetstream {
store_dir, max_mem, max_file }` and `mqtt { listen, stream_replicas: 3 }` (without it the first
node to create the MQTT streams may size them for the peers it sees at that moment, 2, and
losing one node then loses them). NATS serves MQTT 3.1.1 only, needs `server_name` and JetStream
for it (sessions, QoS 1 messages and retained messages live in JetStream streams, replicated
over the cluster), and has no QoS 2 (nats-server 2.9).

`start()` returns once every node takes a real MQTT connection and a QoS 1 retained message
published on one node is delivered by every node: in a cluster the MQTT streams exist only once
JetStream has elected its meta leader, which takes a few seconds. `kill(i)` SIGKILLs one node;
`restart([i, ...])` stops and starts nodes on their stores; `close()` stops every process
(SIGTERM, then SIGKILL).

RabbitMQ (`RabbitNode`): one RabbitMQ 3.10 node serving MQTT (the `rabbitmq_mqtt` plugin). One
`rabbitmq-server` started by path (`/usr/lib/rabbitmq/bin`, not the `/usr/sbin` wrapper, which
switches to the `rabbitmq` user and could not read a test's temporary directory), with every
setting that would reach the machine's own node (5672, `/var/lib/rabbitmq`, `rabbit@...`)
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
- `ERL_CRASH_DUMP`, and the processes' working directory: the directory, so a crashing node's
  `erl_crash.dump` never lands where the tests or a benchmark were started (the repository).

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
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fedasync_iot.fleet._broker import free_port
from fedasync_iot.models import BrokerAddress, Client, Connack, create_client

# -- readiness probes: real MQTT clients -------------------------------------------------------


def _probe_client(port: int, *, timeout: float = 5.0) -> Client:
    """A connected clean-session MQTT 3.1.1 client on 127.0.0.1:`port`; ConnectionError (an
    OSError) when the broker does not accept it."""
    client = create_client(BrokerAddress(host="127.0.0.1", port=port),
                           client_id=f"ready-{uuid.uuid4().hex[:10]}", persistent=False)
    connected = threading.Event()
    refused: list[str] = []

    def on_connack(connack: Connack) -> None:
        if connack.refusal is not None:
            refused.append(connack.refusal)
        connected.set()

    client.on_connack = on_connack
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    if not connected.wait(timeout) or refused:
        _close(client)
        raise ConnectionError(f"MQTT connection on port {port} not accepted "
                              f"({refused[0] if refused else 'no CONNACK'})")
    return client


def _close(client: Client) -> None:
    client.loop_stop()
    with contextlib.suppress(Exception):
        client.disconnect()


def retained_round_trip(port: int, topic: str, payload: bytes, *, publish: bool,
                        timeout: float = 5.0) -> bool:
    """Publish (if asked) `payload` retained at QoS 1, then subscribe and see it come back."""
    client = _probe_client(port)
    try:
        if publish:
            info = client.send(topic, payload, qos=1, retain=True)
            info.wait_for_publish(timeout)
            if not info.is_published():
                return False
        got = threading.Event()
        client.handle(lambda m: got.set() if m.payload == payload else None)
        client.subscribe(topic, 1)
        return got.wait(timeout)
    finally:
        _close(client)


def clear_retained(port: int, topic: str) -> None:
    """Delete the retained message on `topic` (an empty retained publish at QoS 1)."""
    client = _probe_client(port)
    try:
        client.send(topic, b"", qos=1, retain=True).wait_for_publish(5)
    finally:
        _close(client)


# -- NATS ---------------------------------------------------------------------------------------
NAMES = ("A", "B", "C")
# The coordinator's snapshots of the test models are kilobytes; its own limit
# (max_message_bytes) is 16 MB. NATS warns above 8 MB and defaults to 1 MB: 8 MB carries every
# model the project ships with room to spare.
MAX_PAYLOAD = 8 * 1024 * 1024


def nats_server_path() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server", "/usr/bin/nats-server")
         if Path(p).exists()), None)


class ClusterError(RuntimeError):
    """The cluster did not start or become ready in time."""


@dataclass
class Node:
    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """Three clustered nats-server processes with JetStream and MQTT, on free loopback ports."""

    def __init__(self, workdir: Path, *, cluster_name: str = "fedasync-test",
                 consumer_replicas: int | None = None, stream_replicas: int = 3) -> None:
        """`consumer_replicas`: of the JetStream consumer behind each QoS 1 subscription of an
        MQTT session (a device's acks): unset, as many as the streams (3), a Raft group per
        device; 1 is what a large fleet on few cores needs (docs/scaling.md, "Measured").
        `stream_replicas`: of the MQTT streams (sessions, messages, retained), 1-3."""
        if stream_replicas not in (1, 2, 3):
            raise ClusterError(f"stream_replicas must be 1, 2 or 3, got {stream_replicas}")
        exe = nats_server_path()
        if exe is None:
            raise ClusterError("nats-server is not installed")
        self._exe = exe
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        ports = _distinct_free_ports(3 * len(NAMES))
        self.nodes = [Node(name=n, client_port=ports[3 * i], cluster_port=ports[3 * i + 1],
                           mqtt_port=ports[3 * i + 2], conf=workdir / f"{n}.conf",
                           log=workdir / f"{n}.log") for i, n in enumerate(NAMES)]
        for node in self.nodes:
            routes = ", ".join(f"nats-route://127.0.0.1:{other.cluster_port}"
                               for other in self.nodes if other is not node)
            store = workdir / f"js-{node.name}"
            node.conf.write_text(
                f'server_name: "{node.name}"\n'
                f"listen: 127.0.0.1:{node.client_port}\n"
                f"max_payload: {MAX_PAYLOAD}\n"
                "cluster {\n"
                f'  name: "{cluster_name}"\n'
                f"  listen: 127.0.0.1:{node.cluster_port}\n"
                f"  routes: [{routes}]\n"
                "}\n"
                "jetstream {\n"
                f'  store_dir: "{store}"\n'
                "  max_mem: 256MB\n"
                "  max_file: 1GB\n"
                "}\n"
                "mqtt {\n"
                f"  listen: 127.0.0.1:{node.mqtt_port}\n"
                f"  stream_replicas: {stream_replicas}\n"
                + ("" if consumer_replicas is None
                   else f"  consumer_replicas: {consumer_replicas}\n")
                + "}\n")

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, *, timeout: float = 60.0) -> None:
        for node in self.nodes:
            self._launch(node)
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                self._wait_listening(node, deadline)
            self._wait_jetstream(deadline)
        except BaseException:
            self.close()
            raise

    def _launch(self, node: Node) -> None:
        log = node.log.open("ab")
        node.proc = subprocess.Popen([self._exe, "-c", str(node.conf)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()

    def restart(self, indexes: list[int], *, timeout: float = 60.0) -> None:
        """Stop the given nodes (SIGTERM, then SIGKILL after 30 s), start them again with their
        stores, and return once each listens on its MQTT port (JetStream may still recover)."""
        nodes = [self.nodes[i] for i in indexes]
        for node in nodes:
            _stop(node.proc, grace=30)
        for node in nodes:
            self._launch(node)
        deadline = time.monotonic() + timeout
        for node in nodes:
            self._wait_listening(node, deadline)

    def heal(self, *, timeout: float = 120.0) -> None:
        """Start again every node that is not running (killed), with its store, and return once
        the whole cluster serves MQTT again (as `start`)."""
        down = [n for n in self.nodes if n.proc is None or n.proc.poll() is not None]
        for node in down:
            self._launch(node)
        deadline = time.monotonic() + timeout
        for node in down:
            self._wait_listening(node, deadline)
        self._wait_jetstream(deadline)

    def pids(self) -> list[int]:
        """The running nodes' process ids."""
        return [n.proc.pid for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    def kill(self, index: int) -> None:
        """SIGKILL one node: no goodbye to its clients or its peers."""
        node = self.nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(timeout=30)

    def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            _stop(node.proc, grace=10)
            node.proc = None

    def logs(self) -> str:
        out = []
        for node in self.nodes:
            with contextlib.suppress(OSError):
                out.append(f"--- {node.name}\n{node.log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    # -- readiness ---------------------------------------------------------------------------
    def _wait_listening(self, node: Node, deadline: float) -> None:
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise ClusterError(f"nats-server {node.name} exited with {node.proc.returncode}:"
                                   f"\n{self.logs()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", node.mqtt_port), timeout=0.5):
                return
            time.sleep(0.05)
        raise ClusterError(f"nats-server {node.name} did not listen on its MQTT port:\n"
                           f"{self.logs()}")

    def _wait_jetstream(self, deadline: float) -> None:
        """Poll, with real MQTT clients, until a QoS 1 retained message published on node A is
        delivered by every node (MQTT's streams need JetStream's meta leader first)."""
        topic = f"fedasync-ready/{uuid.uuid4().hex[:8]}"
        last = "no attempt"
        while time.monotonic() < deadline:
            payload = uuid.uuid4().hex.encode()
            try:
                if all(retained_round_trip(node.mqtt_port, topic, payload, publish=i == 0)
                       for i, node in enumerate(self.nodes)):
                    clear_retained(self.nodes[0].mqtt_port, topic)
                    return
                last = "a node did not deliver the retained message"
            except OSError as exc:  # ConnectionError too
                last = str(exc)
            time.sleep(0.25)
        raise ClusterError(f"the NATS cluster's MQTT was not ready in time ({last}):\n"
                           f"{self.logs()}")


def _stop(proc: subprocess.Popen[bytes] | None, *, grace: float) -> None:
    """SIGTERM `proc` (if still running), then SIGKILL after `grace` seconds."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


# -- RabbitMQ -----------------------------------------------------------------------------------
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
            "ERL_CRASH_DUMP": str(w / "erl_crash.dump"),
        })
        return env

    def start(self, *, timeout: float = 90.0) -> None:
        began = time.monotonic()
        deadline = began + timeout
        out = (self.workdir / "stdout.log").open("ab")
        try:
            self._epmd = subprocess.Popen(
                [self._epmd_exe, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.workdir)
            self._wait_port(self.epmd_port, deadline, "epmd")
            # Its own session (process group): close() signals the script, beam.smp and the
            # helpers beam starts (erl_child_setup, inet_gethost), and nothing else.
            # Working directory: the node's own, so a crashing node's erl_crash.dump lands
            # there (never in the directory the tests or a benchmark were started from).
            self._proc = subprocess.Popen([self._exe], env=self.env(), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, cwd=self.workdir)
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

    def pids(self) -> list[int]:
        """The node's and its epmd's process ids (the group leaders: beam.smp is a child)."""
        return [p.pid for p in (self._proc, self._epmd) if p is not None and p.poll() is None]

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
