"""Shared fixtures: a private Mosquitto per test session, one topic prefix per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedasync_iot.fleet import NatsCluster, nats_server_path
from fedasync_iot.fleet._broker import MosquittoBroker

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A Mosquitto on a free loopback port with its own config; never the machine's 1883."""
    b = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"))
    b.start(timeout=30)  # a busy machine may take a while to start a process
    yield b
    b.close()


@pytest.fixture
def fleet_name(request: pytest.FixtureRequest) -> str:
    """A topic prefix of its own for each test, so retained messages never leak between tests."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t{next(_counter)}-{base}"


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker for one test, for tests that stop and restart it."""
    b = MosquittoBroker(workdir=tmp_path / "mosquitto")
    b.start(timeout=30)  # a busy machine may take a while to start a process
    yield b
    b.close()


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A private 3-node NATS cluster (JetStream + MQTT) for a test module, on free loopback
    ports; never the machine's NATS. Skips when nats-server is not installed. Shared by the
    module's tests (each on its own fleet) to pay the cluster's start, ~14 s, once: a test that
    kills a node heals the cluster (`NatsCluster.heal`) before it ends."""
    if nats_server_path() is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"))
    cluster.start(timeout=90)  # JetStream elects its leaders first: slow on a busy machine
    yield cluster
    cluster.close()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A CLI's main() installs a root handler on the sys.stderr of its moment, which is a test's
    capture: restored after each test, so a later test's logging never writes to a closed one
    (it printed '--- Logging error ---' into that later test's captured stderr)."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
