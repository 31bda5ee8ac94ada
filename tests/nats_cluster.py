"""A private 3-node NATS cluster with its MQTT gateway, for broker-neutral tests.

Three `nats-server` processes on free loopback ports (never the machine's 4222/6222/8222 or its
data), each with a config file written into a temporary directory: `server_name`, `listen`,
`max_payload`, `cluster { name, listen, routes }`, `jetstream { store_dir, max_mem, max_file }`
and `mqtt { listen, stream_replicas: 3 }` (without it the first node to create the MQTT streams
may size them for the peers it sees at that moment, 2, and losing one node then loses them).
NATS serves MQTT 3.1.1 only, needs `server_name` and JetStream for it (sessions, QoS 1
messages and retained messages live in JetStream streams, replicated over the cluster), and has
no QoS 2 (nats-server 2.9).

`start()` returns once every node takes a real MQTT connection and a QoS 1 retained message
published on one node is delivered by every node: in a cluster the MQTT streams exist only once
JetStream has elected its meta leader, which takes a few seconds. `kill(i)` SIGKILLs one node;
`close()` stops every process (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fedasync_iot.fleet._broker import free_port
from tests.helpers import clear_retained, retained_round_trip

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
                 consumer_replicas: int | None = None) -> None:
        """`consumer_replicas`: of the JetStream consumer behind each QoS 1 subscription of an
        MQTT session (a device's acks): unset, as many as the streams (3), a Raft group per
        device; 1 is what a large fleet on few cores needs (docs/scaling.md, "Measured")."""
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
                "  stream_replicas: 3\n"
                + ("" if consumer_replicas is None
                   else f"  consumer_replicas: {consumer_replicas}\n")
                + "}\n")

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, *, timeout: float = 60.0) -> None:
        for node in self.nodes:
            log = node.log.open("ab")
            node.proc = subprocess.Popen([self._exe, "-c", str(node.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
            log.close()
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                self._wait_listening(node, deadline)
            self._wait_jetstream(deadline)
        except BaseException:
            self.close()
            raise

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
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
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


def _distinct_free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)
