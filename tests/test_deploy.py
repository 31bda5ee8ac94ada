"""deploy/: the shipped Mosquitto config and ACL against a real broker, provisioning, TLS
certificates, the Raspberry Pi installer and the systemd units.

The broker tests run Mosquitto with a config derived from deploy/mosquitto/mosquitto.conf: the
listener, file paths and logging are rewritten for a temp directory and a free loopback port,
every other line (auth, ACL, queue and size limits) is kept as shipped.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedasync_iot.coordinator._provision import (
    COORDINATOR_USER,
    hash_password,
    provision,
    read_users,
    set_password,
    verify_password,
)
from fedasync_iot.coordinator.cli import main as coordinator_main
from fedasync_iot.fleet._broker import MosquittoBroker, free_port, mosquitto_path
from fedasync_iot.models import ConfigError
from fedasync_iot.models._config import tomllib
from fedasync_iot.models._mqtt import (
    BrokerAddress,
    Client,
    Connack,
    Message,
    PacketAck,
    create_client,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SHIPPED_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
SHIPPED_ACL = DEPLOY / "mosquitto" / "fedasync.acl"
MAKE_CERTS = DEPLOY / "tls" / "make-certs.sh"
INSTALL = DEPLOY / "raspberry-pi" / "install.sh"
UNITS = DEPLOY / "systemd"

needs_mosquitto = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto not installed")
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")

# Options whose values name this machine's paths/ports: rewritten for the test broker.
_REWRITTEN = ("listener", "cafile", "certfile", "keyfile", "tls_version", "password_file",
              "acl_file", "persistence_location", "log_dest", "pid_file", "include_dir", "user")
# What the test config must keep from the shipped one (the point of deriving it).
_KEPT = ("per_listener_settings false", "allow_anonymous false", "max_inflight_messages",
         "max_queued_messages", "max_queued_bytes", "max_packet_size",
         "persistent_client_expiration", "persistence true")

SILENCE_S = 0.5  # after a positive control arrived, how long a denied message gets to show up


def derived_conf(workdir: Path, port: int, *, tls: Path | None = None) -> str:
    """The shipped mosquitto.conf with paths and the listener rewritten for `workdir`/`port`."""
    kept = [line for line in SHIPPED_CONF.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
            and line.split()[0] not in _REWRITTEN]
    text = "\n".join(kept)
    for option in _KEPT:
        assert re.search(rf"^{option}", text, re.M), f"shipped config lost {option!r}"
    lines = [*kept]
    if os.geteuid() == 0:
        # Run as root, Mosquitto drops to the "mosquitto" user before it reads the password
        # file; the test's temp dir is private to root. (Production: root:mosquitto 0640.)
        lines.append(f"user {getpass.getuser()}")
    lines.append(f"listener {port} 127.0.0.1")
    if tls is not None:
        lines += [f"cafile {tls / 'ca.crt'}", f"certfile {tls / 'server.crt'}",
                  f"keyfile {tls / 'server.key'}", "tls_version tlsv1.2"]
    lines += [f"password_file {workdir / 'fedasync.passwd'}",
              f"acl_file {workdir / 'fedasync.acl'}",
              f"persistence_location {workdir}/",
              # a file, flushed per line (stdout to a file is block-buffered)
              f"log_dest file {workdir / 'broker.log'}"]
    return "\n".join(lines) + "\n"


@dataclass
class SecureBroker:
    broker: MosquittoBroker
    workdir: Path
    passwords: dict[str, str]

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def passwd(self) -> Path:
        return self.workdir / "fedasync.passwd"

    @property
    def log(self) -> str:
        return (self.workdir / "broker.log").read_text(errors="replace")

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload mosquitto` sends; waits until the log shows it."""
        proc = self.broker._proc
        assert proc is not None
        before = self.log.count("Reloading config")
        proc.send_signal(signal.SIGHUP)
        assert _wait(lambda: self.log.count("Reloading config") > before, 30), \
            "mosquitto did not reload"


def start_secure_broker(workdir: Path, users: list[str], *, tls: Path | None = None
                        ) -> SecureBroker:
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIPPED_ACL, workdir / "fedasync.acl")
    passwords = {}
    for user in users:
        role = "coordinator" if user == COORDINATOR_USER else "device"
        passwords[user] = provision(user, role=role, passwd_file=workdir / "fedasync.passwd",
                                    broker="mqtt://127.0.0.1:1883", fleet="f").password
    port = free_port()
    broker = MosquittoBroker(workdir=workdir, port=port)
    broker.conf_path.write_text(derived_conf(workdir, port, tls=tls))
    broker.start()
    return SecureBroker(broker=broker, workdir=workdir, passwords=passwords)


def _wait(predicate: object, timeout: float) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


class Peer:
    """One MQTT client as a device or the coordinator would log in; records what it receives."""

    def __init__(self, port: int, username: str | None, password: str | None, *,
                 tls_ca: Path | None = None, use_tls: bool = False) -> None:
        self.address = BrokerAddress(host="127.0.0.1", port=port, tls=use_tls,
                                     username=username, password=password,
                                     ca_file=None if tls_ca is None else str(tls_ca))
        self.client = create_client(self.address,
                                    client_id=f"t-{username}-{uuid.uuid4().hex[:6]}",
                                    persistent=False)
        self.inbox: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.reason: str | None = None  # the CONNACK's refusal, in words (None: accepted)
        self._connack = threading.Event()
        self._subacks: queue.Queue[tuple[int, ...]] = queue.Queue()
        self.client.on_connack = self._on_connack
        self.client.handle(lambda m: self.inbox.put((m.topic, m.payload, m.retain)))
        self.client.on_acked = self._on_acked

    def _on_connack(self, connack: Connack) -> None:
        self.reason = connack.refusal
        self._connack.set()
        if not connack.accepted:
            self.client.disconnect()  # no reconnect loop against a refusing broker

    def _on_acked(self, ack: PacketAck) -> None:
        if ack.kind == "subscribe":
            self._subacks.put(ack.granted + tuple(-1 for _ in ack.refused))

    def connect(self) -> bool:
        """True when the broker accepted the login."""
        self.client.connect(self.address.host, self.address.port, keepalive=30)
        self.client.loop_start()
        assert self._connack.wait(30), "no CONNACK"
        return self.reason is None

    def subscribe(self, *topics: str) -> tuple[int, ...]:
        """The SUBACK: the QoS granted to each filter (-1 for each refused)."""
        self.client.subscribe([(t, 1) for t in topics])
        return self._subacks.get(timeout=30)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """QoS 1; True when the broker PUBACKed it (it does for a denied publish too)."""
        info = self.client.send(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=30)
        return info.is_published()

    def received(self, timeout: float) -> list[tuple[str, bytes, bool]]:
        """Everything that arrives within `timeout`."""
        out = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.inbox.get(timeout=left))
            except queue.Empty:
                break
        return out

    def wait_for(self, topic: str, payload: bytes, timeout: float = 30.0
                 ) -> list[tuple[str, bytes, bool]]:
        """Messages up to and including (topic, payload); fails if it does not come."""
        seen = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            seen.append(msg)
            if msg[:2] == (topic, payload):
                return seen
        raise AssertionError(f"{topic} {payload!r} never arrived; got {seen}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- a Mosquitto with the shipped auth + ACL ------------------------------------------------------

@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if mosquitto_path() is None:
        pytest.skip("mosquitto not installed")
    b = start_secure_broker(tmp_path_factory.mktemp("secure-mosquitto"),
                            ["devA", "devB", COORDINATOR_USER])
    yield b
    b.broker.close()


@pytest.fixture
def peers(secure: SecureBroker) -> Iterator[dict[str, Peer]]:
    """devA, devB and the coordinator, connected with their provisioned passwords."""
    made = {name: Peer(secure.port, name, secure.passwords[name])
            for name in ("devA", "devB", COORDINATOR_USER)}
    for name, peer in made.items():
        assert peer.connect(), f"{name} was refused: {peer.reason}"
    yield made
    for peer in made.values():
        peer.close()


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> str:
    """A fleet (second topic level) of its own per test: no retained message leaks across."""
    return f"f{uuid.uuid4().hex[:8]}"


@pytest.mark.broker
def test_device_update_reaches_coordinator_but_a_forged_one_is_dropped(
        peers: dict[str, Peer], fleet: str) -> None:
    coordinator, a = peers[COORDINATOR_USER], peers["devA"]
    coordinator.subscribe(f"fl/{fleet}/update/+", f"fl/{fleet}/status/+")

    # Mosquitto 2.0 acknowledges a denied QoS 1 publish (MQTT 3.1.1 has no way to refuse it)
    # and drops it: the device cannot tell, the coordinator never sees it.
    assert a.publish(f"fl/{fleet}/update/devB", b"forged")
    assert a.publish(f"fl/{fleet}/status/devB", b"forged status")
    # Positive control, sent after: one client's messages are handled in order, so once these
    # arrive the forged ones have been dealt with.
    assert a.publish(f"fl/{fleet}/update/devA", b"own")
    assert a.publish(f"fl/{fleet}/status/devA", b"own status")
    seen = coordinator.wait_for(f"fl/{fleet}/status/devA", b"own status")
    seen += coordinator.received(SILENCE_S)
    assert [(t, p) for t, p, _ in seen] == [(f"fl/{fleet}/update/devA", b"own"),
                                           (f"fl/{fleet}/status/devA", b"own status")]


@pytest.mark.broker
@pytest.mark.parametrize("kind", ["model", "template", "weights"])
def test_device_cannot_publish_the_model_live_or_retained(peers: dict[str, Peer], fleet: str,
                                                          kind: str) -> None:
    """The full snapshot, and the compact one's template and weights: devices read them, only
    the coordinator writes them."""
    coordinator, a, b = peers[COORDINATOR_USER], peers["devA"], peers["devB"]
    model = f"fl/{fleet}/{kind}"
    b.subscribe(model)
    assert a.publish(model, b"evil live")
    assert a.publish(model, b"evil retained", retain=True)
    assert coordinator.publish(model, b"good v1", retain=True)  # positive control
    assert [(t, p) for t, p, _ in b.wait_for(model, b"good v1") + b.received(SILENCE_S)] == [
        (model, b"good v1")]

    # A late subscriber gets the coordinator's retained model; device A's retained publish
    # was never stored.
    late = Peer(coordinator.address.port, "devB", peers["devB"].address.password)
    assert late.connect()
    try:
        late.subscribe(model)
        got = late.wait_for(model, b"good v1") + late.received(SILENCE_S)
        assert [(t, p, r) for t, p, r in got] == [(model, b"good v1", True)]
    finally:
        late.close()


@pytest.mark.broker
def test_device_gets_its_own_acks_only_live_and_retained(peers: dict[str, Peer],
                                                         fleet: str) -> None:
    coordinator, a, b = peers[COORDINATOR_USER], peers["devA"], peers["devB"]
    # Subscribing to a topic it may not read is acknowledged (granted QoS 1) ...
    assert a.subscribe(f"fl/{fleet}/ack/devB", f"fl/{fleet}/ack/devA") == (1, 1)
    b.subscribe(f"fl/{fleet}/ack/devB")
    assert coordinator.publish(f"fl/{fleet}/ack/devB", b"ack for B")
    assert coordinator.publish(f"fl/{fleet}/ack/devA", b"ack for A")
    # ... but `read` is checked for every message delivered: nothing of B's reaches A.
    seen_a = a.wait_for(f"fl/{fleet}/ack/devA", b"ack for A") + a.received(SILENCE_S)
    assert [(t, p) for t, p, _ in seen_a] == [(f"fl/{fleet}/ack/devA", b"ack for A")]
    assert b.wait_for(f"fl/{fleet}/ack/devB", b"ack for B")[-1][:2] == (
        f"fl/{fleet}/ack/devB", b"ack for B")

    # Retained messages are gated the same way, wildcard subscriptions included.
    assert coordinator.publish(f"fl/{fleet}/ack/devB", b"retained for B", retain=True)
    assert coordinator.publish(f"fl/{fleet}/ack/devA", b"retained for A", retain=True)
    late = Peer(coordinator.address.port, "devA", a.address.password)
    assert late.connect()
    try:
        assert late.subscribe(f"fl/{fleet}/ack/+", f"fl/{fleet}/#", "#") == (1, 1, 1)
        got = {(t, p) for t, p, _ in late.wait_for(f"fl/{fleet}/ack/devA", b"retained for A")
               + late.received(SILENCE_S)}
        assert {(t, p) for t, p in got if t.startswith(f"fl/{fleet}/")} == {
            (f"fl/{fleet}/ack/devA", b"retained for A")}
        # Under "#" it sees other fleets' retained models, never anyone else's acks.
        assert all("/ack/" not in t or t.endswith("/ack/devA") for t, _ in got)
    finally:
        late.close()
        coordinator.publish(f"fl/{fleet}/ack/devA", b"", retain=True)
        coordinator.publish(f"fl/{fleet}/ack/devB", b"", retain=True)


@pytest.mark.broker
def test_coordinator_reaches_devices_and_devices_cannot_read_each_others_updates(
        peers: dict[str, Peer], fleet: str) -> None:
    coordinator, a, b = peers[COORDINATOR_USER], peers["devA"], peers["devB"]
    a.subscribe(f"fl/{fleet}/model", f"fl/{fleet}/coordinator/status", f"fl/{fleet}/update/+",
                f"fl/{fleet}/status/+")
    assert b.publish(f"fl/{fleet}/update/devB", b"B's update")
    assert b.publish(f"fl/{fleet}/status/devB", b"B's status")
    assert coordinator.publish(f"fl/{fleet}/coordinator/status", b"online", retain=True)
    assert coordinator.publish(f"fl/{fleet}/model", b"v2")
    seen = a.wait_for(f"fl/{fleet}/model", b"v2") + a.received(SILENCE_S)
    assert [(t, p) for t, p, _ in seen] == [(f"fl/{fleet}/coordinator/status", b"online"),
                                           (f"fl/{fleet}/model", b"v2")]
    # Devices cannot speak as the coordinator either.
    coordinator.subscribe(f"fl/{fleet}/coordinator/status")
    coordinator.wait_for(f"fl/{fleet}/coordinator/status", b"online")  # the retained one
    assert a.publish(f"fl/{fleet}/coordinator/status", b"offline (forged)")
    assert a.publish(f"fl/{fleet}/ack/devA", b"self-ack (forged)")
    assert coordinator.received(SILENCE_S) == []


def _conf_value(option: str) -> int:
    match = re.search(rf"^{option}\s+(\d+)", SHIPPED_CONF.read_text(), re.M)
    assert match, option
    return int(match.group(1))


@pytest.mark.broker
def test_queue_and_inflight_limits_carry_a_coordinator_outage_and_a_whole_batch(
        secure: SecureBroker, peers: dict[str, Peer], fleet: str) -> None:
    inflight = _conf_value("max_inflight_messages")
    assert inflight >= 500  # the coordinator's default batch_max
    burst = inflight + 1500  # more than Mosquitto's default queue (1000) on top of the window
    topic = f"fl/{fleet}/update/devA"
    address = BrokerAddress(host="127.0.0.1", port=secure.port, username=COORDINATOR_USER,
                            password=secure.passwords[COORDINATOR_USER])
    got: queue.Queue[Message] = queue.Queue()

    def session() -> Client:
        # As the coordinator connects: persistent session, manual acks after a group commit.
        c = create_client(address, client_id=f"coord-{fleet}", persistent=True, manual_ack=True,
                          max_inflight=0)
        c.handle(got.put)
        c.connect(address.host, address.port)
        c.loop_start()
        return c

    coordinator = session()
    subscribed = threading.Event()
    coordinator.on_acked = lambda ack: subscribed.set() if ack.kind == "subscribe" else None
    coordinator.subscribe(f"fl/{fleet}/update/+", qos=1)
    # The session must hold the subscription before it goes: the broker queues for it only then.
    assert subscribed.wait(30), "no SUBACK"
    coordinator.disconnect()
    coordinator.loop_stop()

    # The coordinator is down; the fleet keeps sending.
    for i in range(burst):
        peers["devA"].client.send(topic, b"%d" % i, qos=1)
    assert peers["devA"].publish(topic, b"last")

    coordinator = session()
    try:
        # Without acks the broker sends exactly max_inflight_messages: the batch size cap.
        assert _wait(lambda: got.qsize() >= inflight, 30)
        time.sleep(SILENCE_S)
        assert got.qsize() == inflight
        seen = []
        while len(seen) < burst + 1:
            msg = got.get(timeout=30)
            seen.append(msg.payload)
            coordinator.ack(msg.mid, msg.qos)  # the commit: the broker sends the next ones
        assert seen == [b"%d" % i for i in range(burst)] + [b"last"]  # all of it, in order
    finally:
        coordinator.disconnect()
        coordinator.loop_stop()


@pytest.mark.broker
def test_oversized_packet_disconnects_the_sender(secure: SecureBroker, fleet: str) -> None:
    limit = _conf_value("max_packet_size")
    assert limit >= 16 * 1024 * 1024
    coordinator = Peer(secure.port, COORDINATOR_USER, secure.passwords[COORDINATOR_USER])
    sender = Peer(secure.port, "devB", secure.passwords["devB"])
    try:
        assert coordinator.connect() and sender.connect()
        coordinator.subscribe(f"fl/{fleet}/update/devB")
        big = b"\x01" * (1024 * 1024)  # a 1 MiB update passes
        assert sender.publish(f"fl/{fleet}/update/devB", big)
        coordinator.wait_for(f"fl/{fleet}/update/devB", big)
        sender.client.send(f"fl/{fleet}/update/devB", b"\x02" * limit, qos=1)
        assert _wait(lambda: not sender.client.is_connected(), 10)
        assert coordinator.received(SILENCE_S) == []
    finally:
        sender.close()
        coordinator.close()


@pytest.mark.broker
@pytest.mark.parametrize(("username", "password"), [
    (None, None),                  # anonymous
    ("devA", "wrong password"),    # known user, wrong password
    ("devZ", "whatever"),          # unknown user
    ("devA", None),                # username without password
])
def test_broker_refuses_bad_logins(secure: SecureBroker, username: str | None,
                                   password: str | None) -> None:
    peer = Peer(secure.port, username, password)
    try:
        assert not peer.connect()
        assert "authori" in str(peer.reason).lower() or "password" in str(peer.reason).lower()
    finally:
        peer.close()


@pytest.mark.broker
def test_new_device_can_log_in_after_sighup(secure: SecureBroker, fleet: str) -> None:
    password = provision("devC", passwd_file=secure.passwd, broker="mqtt://127.0.0.1:1883",
                         fleet=fleet).password
    before = Peer(secure.port, "devC", password)
    try:
        assert not before.connect()  # Mosquitto reads the password file at start and on SIGHUP
    finally:
        before.close()
    secure.reload()
    after = Peer(secure.port, "devC", password)
    try:
        assert after.connect(), after.reason
    finally:
        after.close()


@pytest.mark.broker
def test_python_and_mosquitto_passwd_entries_coexist(secure: SecureBroker) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    # mosquitto_passwd edits the file in place; set_password then rewrites it around that line.
    subprocess.run([tool, "-b", str(secure.passwd), "viaTool", "tool-secret"], check=True,
                   capture_output=True)
    tool_line = read_users(secure.passwd)["viaTool"]
    # Same format: our hash of the same password and salt is the tool's line, byte for byte.
    _, kind, iterations, salt_b64, _ = tool_line.split("$")
    assert hash_password("tool-secret", salt=base64.b64decode(salt_b64),
                         iterations=int(iterations)) == tool_line
    assert (kind, iterations) == ("7", "101")
    assert verify_password("tool-secret", tool_line)
    assert not verify_password("other", tool_line)

    set_password(secure.passwd, "viaPython", "python-secret")
    assert read_users(secure.passwd)["viaTool"] == tool_line  # kept untouched
    secure.reload()
    for user, password in (("viaTool", "tool-secret"), ("viaPython", "python-secret")):
        peer = Peer(secure.port, user, password)
        try:
            assert peer.connect(), f"{user}: {peer.reason}"
        finally:
            peer.close()


# -- provisioning without a broker -----------------------------------------------------------------

def test_set_password_replaces_one_entry_and_keeps_the_rest(tmp_path: Path) -> None:
    passwd = tmp_path / "fedasync.passwd"
    other = "other:$7$101$AAAAAAAAAAAAAAAA$" + "B" * 86 + "=="
    passwd.write_text(f"# managed by hand\n{other}\ndev1:$7$101$old$old\n\nlast:$6$x$y\n")
    passwd.chmod(0o640)

    assert set_password(passwd, "dev1", "new-secret") is False  # replaced
    assert set_password(passwd, "dev2", "second") is True  # added

    lines = passwd.read_text().splitlines()
    assert lines[0] == "# managed by hand" and lines[1] == other and lines[4] == "last:$6$x$y"
    assert lines[3] == ""
    users = read_users(passwd)
    assert list(users) == ["other", "dev1", "last", "dev2"]
    assert verify_password("new-secret", users["dev1"]) and verify_password("second",
                                                                            users["dev2"])
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o640  # mode of the replaced file kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedasync.passwd"]  # no temp left


def test_set_password_refuses_bad_names_and_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        set_password(tmp_path / "p", "a:b", "x")
    with pytest.raises(ConfigError, match="does not exist"):
        set_password(tmp_path / "missing" / "p", "dev", "x")


def _run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = coordinator_main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_provision_device_cli_writes_a_working_agent_config(tmp_path: Path) -> None:
    from fedasync_iot.agent._config import load_config

    code, out, err = _run_cli(
        "provision-device", "pi-01", "--passwd", str(tmp_path / "passwd"),
        "--broker", "mqtts://broker.lan:8883", "--fleet", "lab",
        "--public-key", "/etc/fedasync/coordinator.pub", "--out", str(tmp_path / "out"))
    assert code == 0, err
    written = tmp_path / "out" / "pi-01.toml"
    assert written.read_text() == out  # printed and written
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert "systemctl reload mosquitto" in err

    config = load_config(written)
    assert (config.device_id, config.fleet, config.ca_file, config.coordinator_public_keys) == (
        "pi-01", "lab", "/etc/fedasync/ca.crt", ("/etc/fedasync/coordinator.pub",))
    address = BrokerAddress.parse(config.broker)
    assert (address.tls, address.host, address.port, address.username) == (
        True, "broker.lan", 8883, "pi-01")
    assert address.password is not None and len(address.password) >= 40
    assert verify_password(address.password, read_users(tmp_path / "passwd")["pi-01"])

    # Again: a new password replaces the old one; nothing else changes.
    code, out2, _ = _run_cli("provision-device", "pi-01", "--passwd", str(tmp_path / "passwd"),
                             "--broker", "mqtts://broker.lan:8883")
    assert code == 0
    password2 = BrokerAddress.parse(tomllib.loads(out2)["broker"]).password
    assert password2 != address.password
    assert list(read_users(tmp_path / "passwd")) == ["pi-01"]
    assert verify_password(str(password2), read_users(tmp_path / "passwd")["pi-01"])


def test_provision_device_for_a_cluster_lists_every_node(tmp_path: Path) -> None:
    """Several --broker URLs (a cluster's nodes): the agent config lists them all, each with
    the device's account, for the agent to fail over between (docs/brokers.md)."""
    from fedasync_iot.agent._config import load_config

    nodes = "mqtts://a.lan:8883,mqtts://b.lan:8883,mqtts://c.lan:8883"
    code, out, err = _run_cli("provision-device", "pi-02", "--passwd", str(tmp_path / "passwd"),
                              "--broker", nodes)
    assert code == 0, err
    assert isinstance(tomllib.loads(out)["broker"], list)
    (tmp_path / "pi-02.toml").write_text(out)
    config = load_config(tmp_path / "pi-02.toml")
    address = BrokerAddress.parse(config.broker)
    hosts = [(a.host, a.username, a.password) for a in (address, *address.alternates)]
    assert [h for h, _, _ in hosts] == ["a.lan", "b.lan", "c.lan"]
    assert {(u, p) for _, u, p in hosts} == {("pi-02", address.password)}
    assert verify_password(str(address.password), read_users(tmp_path / "passwd")["pi-02"])
    code, _, err = _run_cli("provision-device", "pi-03", "--passwd", str(tmp_path / "passwd"),
                            "--broker", "mqtts://a.lan:8883,mqtt://b.lan:1883")
    assert code == 2 and "one scheme" in err


def test_provision_coordinator_writes_an_environment_file(tmp_path: Path) -> None:
    code, out, err = _run_cli("provision-device", "coordinator", "--role", "coordinator",
                              "--passwd", str(tmp_path / "passwd"), "--out", str(tmp_path))
    assert code == 0, err
    env = dict(line.split("=", 1) for line in out.splitlines() if not line.startswith("#"))
    address = BrokerAddress.parse(env["FEDASYNC_BROKER"])
    assert (address.host, address.port, address.tls, address.username) == (
        "127.0.0.1", 1883, False, "coordinator")
    assert verify_password(str(address.password), read_users(tmp_path / "passwd")["coordinator"])
    assert stat.S_IMODE((tmp_path / "coordinator.env").stat().st_mode) == 0o600


@pytest.mark.parametrize("argv", [
    ["provision-device", "a/b"],                 # not a valid id (and a topic level)
    ["provision-device", "dev+1"],
    ["provision-device", ".."],
    ["provision-device", "x" * 65],
    ["provision-device", "coordinator"],         # reserved for the coordinator's account
    ["provision-device", "dev1", "--fleet", "a/b"],
    ["provision-device", "dev1", "--broker", "http://x"],
    ["provision-device", "dev1", "--broker", "mqtts://u:p@host:8883"],  # credentials are ours
])
def test_provision_device_refuses_bad_input(tmp_path: Path, argv: list[str]) -> None:
    passwd = tmp_path / "passwd"
    code, _, err = _run_cli(*argv, "--passwd", str(passwd))
    assert code == 2 and err.startswith("error: ")
    assert not passwd.exists()


# -- TLS -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = tmp_path_factory.mktemp("certs")
    proc = subprocess.run(["bash", str(MAKE_CERTS), "--host", "broker.test", "--out", str(out),
                           "--client", "devA"], check=False, capture_output=True, text=True,
                           timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"Files are in {out}" in proc.stdout
    return out


@needs_openssl
def test_make_certs_is_idempotent_and_keys_are_private(certs: Path) -> None:
    files = ["ca.crt", "ca.key", "server.crt", "server.key", "clients/devA.crt",
             "clients/devA.key"]
    before = {f: (certs / f).read_bytes() for f in files}
    for f in files:
        mode = stat.S_IMODE((certs / f).stat().st_mode)
        assert mode == (0o600 if f.endswith(".key") else 0o644), f
    proc = subprocess.run(["bash", str(MAKE_CERTS), "--host", "broker.test", "--out", str(certs),
                           "--client", "devA"], check=False, capture_output=True, text=True,
                           timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {f: (certs / f).read_bytes() for f in files} == before
    text = subprocess.run(["openssl", "x509", "-in", str(certs / "server.crt"), "-noout",
                           "-text"], capture_output=True, text=True, check=True).stdout
    for san in ("DNS:broker.test", "DNS:localhost", "IP Address:127.0.0.1"):
        assert san in text
    subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"),
                    str(certs / "clients" / "devA.crt")], check=True, capture_output=True)


@needs_mosquitto
@needs_openssl
@pytest.mark.broker
def test_tls_listener_with_generated_certificates(certs: Path, tmp_path: Path) -> None:
    b = start_secure_broker(tmp_path / "tls-broker", ["devA", COORDINATOR_USER], tls=certs)
    try:
        # What the agent does: create_client with mqtts:// and ca_file.
        url = f"mqtts://devA:{b.passwords['devA']}@127.0.0.1:{b.port}"
        agent_address = BrokerAddress.parse(url, ca_file=str(certs / "ca.crt"))
        assert agent_address.tls
        a = Peer(b.port, "devA", b.passwords["devA"], tls_ca=certs / "ca.crt", use_tls=True)
        coordinator = Peer(b.port, COORDINATOR_USER, b.passwords[COORDINATOR_USER],
                           tls_ca=certs / "ca.crt", use_tls=True)
        try:
            assert coordinator.connect(), coordinator.reason
            assert a.connect(), a.reason
            coordinator.subscribe("fl/tls/update/+")
            a.subscribe("fl/tls/ack/devA")
            assert a.publish("fl/tls/update/devA", b"over TLS")
            coordinator.wait_for("fl/tls/update/devA", b"over TLS")
            assert coordinator.publish("fl/tls/ack/devA", b"acked")
            a.wait_for("fl/tls/ack/devA", b"acked")
        finally:
            a.close()
            coordinator.close()

        # Without the fleet CA the system trust store does not know the broker: refused.
        stranger = create_client(BrokerAddress.parse(url), client_id="no-ca", persistent=False)
        with pytest.raises(ssl.SSLCertVerificationError):
            stranger.connect("127.0.0.1", b.port)

        # The chain also passes OpenSSL's strict X.509 checks (Python 3.13's default).
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="broker.test") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        b.broker.close()


# -- Raspberry Pi installer ----------------------------------------------------------------------

def _install(*args: str, env: dict[str, str] | None = None, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], check=False, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """path -> (mode, mtime_ns, sha256) of every file under root (links not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and \
            not p.is_symlink() else ""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return out


@pytest.mark.parametrize("arch", ["armv7l", "armv6l"])
def test_installer_refuses_32bit_arm(tmp_path: Path, arch: str) -> None:
    prefix = tmp_path / "agent"
    proc = _install("--prefix", str(prefix), "--no-systemd", "--no-pip", "--device-id", "pi-1",
                    "--broker", "mqtts://pi-1:pw@broker:8883", env={"FEDASYNC_FAKE_ARCH": arch})
    assert proc.returncode == 3
    assert "32-bit ARM" in proc.stderr and "64-bit" in proc.stderr and "onnxruntime" in proc.stderr
    assert not prefix.exists()


def test_installer_refuses_old_python(tmp_path: Path) -> None:
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\n"
                    "case \"$*\" in *'print('*) echo 3.9 ;; esac\n"
                    "exit 1\n")
    fake.chmod(0o755)
    proc = _install("--prefix", str(tmp_path / "agent"), "--no-systemd", "--no-pip",
                    "--python", str(fake))
    assert proc.returncode == 2 and "Python >= 3.10" in proc.stderr and "3.9" in proc.stderr


def test_installer_without_pip_makes_venv_and_config_and_is_idempotent(tmp_path: Path) -> None:
    from fedasync_iot.agent._config import load_config

    prefix = tmp_path / "agent"
    args = ["--prefix", str(prefix), "--no-systemd", "--no-pip", "--device-id", "pi-01",
            "--broker", "mqtts://pi-01:s3cret@broker.lan:8883", "--fleet", "lab",
            "--ca-file", str(tmp_path / "ca.crt"), "--public-key", str(tmp_path / "c.pub")]
    first = _install(*args)
    assert first.returncode == 0, first.stderr
    assert "created  venv" in first.stdout and "wrote" in first.stdout
    python = prefix / "venv" / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"],
                          capture_output=True, text=True, check=True).stdout.strip() == str(
        prefix / "venv")

    conf = prefix / "etc" / "agent.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    config = load_config(conf)
    assert (config.device_id, config.fleet, config.broker, config.ca_file) == (
        "pi-01", "lab", "mqtts://pi-01:s3cret@broker.lan:8883", str(tmp_path / "ca.crt"))
    assert config.coordinator_public_keys == (str(tmp_path / "c.pub"),)
    assert (config.state_dir, config.data) == (str(prefix / "state"),
                                               str(prefix / "state" / "data"))
    assert "does not exist yet" in first.stdout  # the CA and key are not there

    before = _tree(prefix)
    second = _install(*args)
    assert second.returncode == 0, second.stderr
    assert "kept     venv" in second.stdout and "kept     " + str(conf) in second.stdout
    assert _tree(prefix) == before  # nothing changed, not even an mtime
    # A different device id on a later run does not overwrite the existing config.
    third = _install("--prefix", str(prefix), "--no-systemd", "--no-pip", "--device-id", "x")
    assert third.returncode == 0 and load_config(conf).device_id == "pi-01"


def test_installer_installs_a_provisioned_config(tmp_path: Path) -> None:
    from fedasync_iot.agent._config import load_config

    made = provision("pi-02", passwd_file=tmp_path / "passwd", broker="mqtts://broker.lan:8883",
                     out_dir=tmp_path / "out")
    assert made.config_path is not None
    prefix = tmp_path / "agent"
    proc = _install("--prefix", str(prefix), "--no-systemd", "--no-pip", "--config",
                    str(made.config_path))
    assert proc.returncode == 0, proc.stderr
    conf = prefix / "etc" / "agent.toml"
    assert conf.read_text() == made.config_text
    assert load_config(conf).broker == made.broker_url


def test_installer_needs_a_config_source(tmp_path: Path) -> None:
    proc = _install("--prefix", str(tmp_path / "agent"), "--no-systemd", "--no-pip")
    assert proc.returncode == 2 and "--device-id and --broker" in proc.stderr
    bad = _install("--prefix", str(tmp_path / "agent2"), "--no-systemd", "--no-pip",
                   "--device-id", "a/b", "--broker", "mqtts://x:y@h:8883")
    assert bad.returncode == 2 and "--device-id must be" in bad.stderr
    assert not (tmp_path / "agent2" / "etc" / "agent.toml").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # above the sum of the bounds below: pip alone has 600 s
def test_installer_full_pip_install(tmp_path: Path) -> None:
    """The real thing, minus systemd: pip installs fedasync-iot[agent] from this checkout.

    Needs the dependencies from the pip cache or the package index; skipped when pip cannot get
    them (an offline machine with a cold cache). It takes a minute or more on a busy machine
    (NumPy, SciPy, scikit-learn, onnxruntime: ~300 MB unpacked), more than the suite's default
    per-test timeout, hence its own. ``--no-compile`` (through ``--pip-args``, which this also
    checks) skips byte-compiling those thousands of modules ahead of time: much of pip's time
    and none of what is tested (Python compiles what it imports).
    """
    prefix = tmp_path / "agent"
    proc = _install("--prefix", str(prefix), "--no-systemd", "--device-id", "pi-03",
                    "--broker", "mqtts://pi-03:pw@broker.lan:8883", "--python", sys.executable,
                    "--pip-args", "--no-compile", timeout=600)
    if proc.returncode != 0 and re.search(r"No matching distribution|Could not find a version|"
                                          r"NewConnectionError|Temporary failure in name",
                                          proc.stdout + proc.stderr):
        pytest.skip("pip cannot reach the packages from here")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = subprocess.run([str(prefix / "venv" / "bin" / "fedasync-agent"), "--config",
                             str(prefix / "etc" / "agent.toml"), "status"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    again = _install("--prefix", str(prefix), "--no-systemd", timeout=120)
    assert again.returncode == 0 and "kept     fedasync-iot" in again.stdout
    # An invalid provisioned config is refused before it is installed.
    bad = tmp_path / "bad.toml"
    bad.write_text('device_id = "pi-04"\nbrokr = "mqtt://x"\n')
    (prefix / "etc" / "agent.toml").unlink()
    refused = _install("--prefix", str(prefix), "--no-systemd", "--config", str(bad))
    assert refused.returncode == 2 and "brokr" in refused.stderr
    assert not (prefix / "etc" / "agent.toml").exists()


# -- systemd units, shell scripts ----------------------------------------------------------------

def _unit(name: str) -> dict[str, list[str]]:
    """key -> values (a key may repeat) of a unit file, sections flattened."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.mark.parametrize("name", ["fedasync-agent.service", "fedasync-coordinator.service"])
def test_units_have_the_hardening_and_paths(name: str) -> None:
    unit = _unit(name)
    kind = "agent" if "agent" in name else "coordinator"
    for key, value in (("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes"),
                       ("Restart", "on-failure"), ("ConfigurationDirectory", "fedasync"),
                       ("StateDirectory", f"fedasync-{kind}"),
                       ("User", "fedasync-agent" if kind == "agent" else "fedasync"),
                       ("WantedBy", "multi-user.target")):
        assert unit.get(key) == [value], key
    assert unit["RestartSec"]
    assert "network-online.target" in unit["After"][0]
    assert "network-online.target" in unit["Wants"][0]
    if kind == "coordinator":
        assert "mosquitto.service" in unit["After"][0]
    else:
        assert unit["MemoryMax"] and unit["OOMPolicy"] == ["continue"]

    # ExecStart: the venv's console script with flags the CLI really has.
    argv = unit["ExecStart"][0].split()
    assert argv[0] == f"/opt/fedasync-{kind}/venv/bin/fedasync-{kind}"
    assert f"/etc/fedasync/{kind}.toml" in argv and "${STATE_DIRECTORY}" in argv
    argv = [a.replace("${STATE_DIRECTORY}", "/var/lib/x") for a in argv[1:]]
    if kind == "agent":
        from fedasync_iot.agent.cli import _parser as agent_parser

        args = agent_parser().parse_args(argv)
        assert (args.command, args.log_format) == ("run", "json")
    else:
        from fedasync_iot.coordinator.cli import _parser as coordinator_parser

        args = coordinator_parser().parse_args(argv)
        assert (args.command, args.log_format) == ("run", "json")
    assert (str(args.config), args.state_dir) == (f"/etc/fedasync/{kind}.toml", "/var/lib/x")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    for name in ("fedasync-agent.service", "fedasync-coordinator.service"):
        # verify wants ExecStart's binary to exist: point it at this venv's console script.
        text = (UNITS / name).read_text()
        kind = "agent" if "agent" in name else "coordinator"
        exe = Path(sys.executable).parent / f"fedasync-{kind}"
        if not exe.exists():
            exe = Path(shutil.which("true") or "/bin/true")
            text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.M)
        else:
            text = text.replace(f"/opt/fedasync-{kind}/venv/bin/fedasync-{kind}", str(exe))
        (tmp_path / name).write_text(text)
        proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                              check=False, capture_output=True, text=True, timeout=60)
        problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                    if name in line or "Unknown" in line or "ignoring" in line]
        assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shell_scripts_pass_shellcheck() -> None:
    proc = subprocess.run(["shellcheck", str(INSTALL), str(MAKE_CERTS)], check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def _doc_commands() -> list[list[str]]:
    """Every shell command in docs/operations.md's code blocks (continuations joined)."""
    text = (ROOT / "docs" / "operations.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split("  #")[0].strip()
            if line and not line.startswith("#"):
                for part in line.split("&&"):
                    commands.append(shlex.split(part))
    # and commands quoted inline in the text
    for span in re.findall(r"`((?:sudo )?\S*(?:install\.sh|make-certs\.sh|bin/fedasync-\w+)"
                           r" [^`]*)`", text):
        commands.append(shlex.split(span.replace("\n", " ")))
    return commands


def test_operations_doc_commands_exist() -> None:
    from fedasync_iot.agent.cli import _parser as agent_parser
    from fedasync_iot.coordinator.cli import _parser as coordinator_parser

    commands = _doc_commands()
    checked = 0
    for command in commands:
        argv = command[3:] if command[:2] == ["sudo", "-u"] else command
        if argv[0] == "sudo":
            argv = argv[1:]
        tool = Path(argv[0]).name
        if tool in ("fedasync-coordinator", "fedasync-agent"):
            parser = coordinator_parser() if tool == "fedasync-coordinator" else agent_parser()
            parser.parse_args(argv[1:])  # SystemExit on an unknown command or flag
            checked += 1
        elif tool in ("install.sh", "make-certs.sh"):
            script = (INSTALL if tool == "install.sh" else MAKE_CERTS).read_text()
            for flag in (a for a in argv[1:] if a.startswith("--")):
                assert re.search(rf"^\s*(\S*\|)?{re.escape(flag)}(\||\))", script, re.M), (
                    f"{tool} has no {flag}")
            checked += 1
    assert checked >= 12


def test_shipped_conf_and_acl_say_what_the_brief_needs() -> None:
    conf = SHIPPED_CONF.read_text()
    for line in ("listener 1883 127.0.0.1", "listener 8883", "tls_version tlsv1.2",
                 "cafile /etc/mosquitto/certs/ca.crt",
                 "password_file /etc/mosquitto/fedasync.passwd",
                 "acl_file /etc/mosquitto/fedasync.acl",
                 "persistence_location /var/lib/mosquitto/"):
        assert re.search(rf"^{re.escape(line)}$", conf, re.M), line
    acl = [line for line in SHIPPED_ACL.read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert acl[:8] == ["pattern read fl/+/model", "pattern read fl/+/announce",
                       "pattern read fl/+/coordinator/status", "pattern read fl/+/template",
                       "pattern read fl/+/weights",
                       "pattern read fl/+/ack/%u", "pattern write fl/+/update/%u",
                       "pattern write fl/+/status/%u"]
    assert acl[8] == "user coordinator"
    for topic in ("announce", "template", "weights"):
        assert f"topic write fl/+/{topic}" in acl[8:]
