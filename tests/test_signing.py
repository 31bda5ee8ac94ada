"""Signed snapshots: the coordinator signs, agents refuse what it did not sign."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import DirectorySource
from fedasync_iot.agent._readings import StaticReader
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.models import (
    ModelSpec,
    Snapshot,
    Topics,
    WireError,
    decode_snapshot,
    encode_snapshot,
)
from fedasync_iot.models._signing import Signer, Verifier, generate_keypair
from tests.helpers import Listener
from tests.test_agent import readings

SPEC = ModelSpec(kind="linear", n_features=3)


def frame(version: int) -> bytes:
    return encode_snapshot(Snapshot(version=version, spec=SPEC,
                                    weights=np.full(4, version, dtype=np.float32)))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    private, public = generate_keypair(tmp_path / "a")
    other_private, other_public = generate_keypair(tmp_path / "b")
    return private, public, other_private, other_public


def test_sign_and_verify(keys) -> None:
    private, public, other_private, _ = keys
    signed = Signer.from_file(private).sign(frame(1))
    verifier = Verifier.from_files([str(public)])

    assert decode_snapshot(verifier.verify(signed)).version == 1
    with pytest.raises(WireError, match="not signed"):
        verifier.verify(frame(1))
    with pytest.raises(WireError, match="unknown key"):
        verifier.verify(Signer.from_file(other_private).sign(frame(1)))
    tampered = bytearray(signed)
    tampered[40] ^= 1
    with pytest.raises(WireError, match="does not verify"):
        verifier.verify(bytes(tampered))
    assert (private.stat().st_mode & 0o777) == 0o600


def test_unsigned_decoder_does_not_accept_a_signed_frame_silently(keys) -> None:
    with pytest.raises(WireError):
        decode_snapshot(Signer.from_file(keys[0]).sign(frame(1)))


class _Offline:
    connected = False

    def publish(self, *a, **k) -> None: ...


def test_agent_refuses_a_model_not_signed_by_its_coordinator(keys, tmp_path: Path) -> None:
    private, public, other_private, _ = keys
    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path / "agent"),
                         coordinator_public_keys=(str(public),))
    agent = Agent(config, link=_Offline(), reader=StaticReader(readings()),
                  data=DirectorySource(tmp_path))

    agent.on_model(Signer.from_file(private).sign(frame(1)))
    agent.on_model(frame(2))  # unsigned
    agent.on_model(Signer.from_file(other_private).sign(frame(3)))  # someone else's key

    assert agent.snapshot is not None and agent.snapshot.version == 1
    assert "unknown key" in agent.status()["model_rejection"]
    agent.on_model(Signer.from_file(private).sign(frame(4)))
    assert agent.snapshot.version == 4
    assert agent.status()["model_rejection"] is None


@pytest.mark.broker
def test_coordinator_publishes_signed_snapshots(broker, fleet_name, keys, tmp_path) -> None:
    private, public, *_ = keys
    service = CoordinatorService(CoordinatorConfig(
        model=SPEC, broker=broker.url, fleet=fleet_name, state_dir=str(tmp_path / "c"),
        client_id=f"c-{fleet_name}", http="", signing_key=str(private),
        snapshots=SnapshotConfig(min_interval_s=0)))
    service.start()
    try:
        listener = Listener(broker.url, [Topics(fleet_name).model])
        payload = listener.get().payload
        listener.close()
    finally:
        service.stop()
    assert decode_snapshot(Verifier.from_files([str(public)]).verify(payload)).version == 0
