"""The coordinator service against the real Mosquitto fixture."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fedasync_iot.coordinator import _service as service_module
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._rules import RuleConfig
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.coordinator._store import checksum
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import Backoff, ModelSpec, PacketAck, Topics, decode_ack, decode_snapshot
from tests.helpers import Listener, update_bytes, wait_for

pytestmark = pytest.mark.broker

SPEC = ModelSpec(kind="logistic", n_features=4, classes=(0, 1, 2))
N = 15  # 3 x 4 weights + 3 intercepts


def make_service(broker: MosquittoBroker, fleet: str, state: Path, **changes) -> CoordinatorService:
    config = CoordinatorConfig(
        model=SPEC, broker=broker.url, fleet=fleet, state_dir=str(state),
        client_id=f"coord-{fleet}", http="127.0.0.1:0",
        rule=changes.pop("rule", RuleConfig(name="fedasync", alpha=0.5, staleness="constant")),
        guards=changes.pop("guards", GuardConfig(max_norm=5.0, norm_policy="reject",
                                                 max_staleness=2)),
        snapshots=SnapshotConfig(min_interval_s=0.0), **changes)
    service = CoordinatorService(config)
    service.start()
    assert service.wait_connected(30)
    return service


class Device(Listener):
    def __init__(self, broker: MosquittoBroker, fleet: str, name: str) -> None:
        self.topics = Topics(fleet)
        self.name = name
        super().__init__(broker.url, [self.topics.ack(name)])

    def send(self, payload: bytes):
        self.publish(self.topics.update(self.name), payload)
        return decode_ack(self.get().payload)


def test_snapshot_is_retained_and_its_onnx_runs(broker, fleet_name, tmp_path) -> None:
    service = make_service(broker, fleet_name, tmp_path)
    try:
        late = Listener(broker.url, [Topics(fleet_name).model])
        snapshot = decode_snapshot(late.get().payload)
        late.close()
    finally:
        service.stop()

    assert snapshot.version == 0
    assert snapshot.spec == SPEC
    session = ort.InferenceSession(snapshot.onnx, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: np.ones((2, 4), np.float32)})
    assert outputs[0].shape == (2,)


def test_versions_staleness_and_rejections(broker, fleet_name, tmp_path) -> None:
    service = make_service(broker, fleet_name, tmp_path)
    a, b = Device(broker, fleet_name, "dev-a"), Device(broker, fleet_name, "dev-b")
    try:
        ok = 0.1 * np.ones(N)
        assert a.send(update_bytes(ok, device="dev-a", base_version=0)).version == 1
        ack = b.send(update_bytes(ok, device="dev-b", base_version=0))
        assert (ack.status, ack.version) == ("accepted", 2)
        assert a.send(update_bytes(ok, device="dev-a", base_version=1)).version == 3

        bad = {
            "malformed": b"\x00not an update",
            "shape": update_bytes(np.ones(N + 2), device="dev-a", base_version=3),
            "non_finite": update_bytes(np.full(N, np.nan), device="dev-a", base_version=3),
            "norm": update_bytes(np.full(N, 100.0), device="dev-a", base_version=3),
            "too_stale": update_bytes(ok, device="dev-a", base_version=0),
            "device_mismatch": update_bytes(ok, device="dev-b", base_version=3),
        }
        for reason, payload in bad.items():
            ack = a.send(payload)
            assert (ack.status, ack.reason) == ("rejected", reason), reason
        assert service.engine.version == 3

        # Still serving after all that.
        assert a.send(update_bytes(ok, device="dev-a", base_version=3)).version == 4
        lineage = {r.update_id: r for r in service.store.lineage()}
        staleness = sorted(r.staleness for r in lineage.values() if r.outcome == "accepted")
        assert staleness == [0, 0, 1, 1]

        status = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{service.http_port}/status", timeout=30).read())
        assert status["version"] == 4
        assert status["counts"]["rejected:norm"] == 1
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{service.http_port}/metrics", timeout=30).read().decode()
        assert 'fedasync_updates_rejected_total{reason="non_finite"} 1.0' in metrics
        assert "fedasync_model_version 4.0" in metrics
    finally:
        a.close()
        b.close()
        service.stop()


def test_duplicate_is_merged_once(broker, fleet_name, tmp_path) -> None:
    service = make_service(broker, fleet_name, tmp_path)
    dev = Device(broker, fleet_name, "dev-a")
    try:
        payload = update_bytes(0.1 * np.ones(N), device="dev-a", update_id="once")
        first, second = dev.send(payload), dev.send(payload)
        assert (first.status, second.status) == ("accepted", "duplicate")
        assert service.engine.version == 1
    finally:
        dev.close()
        service.stop()


def test_restart_resumes_and_gets_updates_sent_while_down(broker, fleet_name, tmp_path) -> None:
    service = make_service(broker, fleet_name, tmp_path)
    dev = Device(broker, fleet_name, "dev-a")
    try:
        assert dev.send(update_bytes(0.1 * np.ones(N), device="dev-a")).version == 1
        params = service.engine.params.copy()
        service.stop()

        # The broker keeps these for the coordinator's persistent session.
        for i in range(3):
            dev.publish(dev.topics.update("dev-a"),
                        update_bytes(0.1 * np.ones(N), device="dev-a", base_version=1,
                                     update_id=f"offline-{i}"))

        service = make_service(broker, fleet_name, tmp_path)
        assert [decode_ack(dev.get().payload).status for _ in range(3)] == ["accepted"] * 3
        assert service.engine.version == 4
        assert [r.version for r in service.store.lineage()] == [1, 2, 3, 4]
        assert service.store.version(1).checksum == checksum(params)
    finally:
        dev.close()
        service.stop()


def test_rollback_over_http_republishes(broker, fleet_name, tmp_path) -> None:
    service = make_service(broker, fleet_name, tmp_path)
    dev = Device(broker, fleet_name, "dev-a")
    model = Listener(broker.url, [Topics(fleet_name).model])
    try:
        assert decode_snapshot(model.get().payload).version == 0
        dev.send(update_bytes(0.1 * np.ones(N), device="dev-a"))
        assert wait_for(lambda: decode_snapshot(model.get().payload).version == 1)

        token = (tmp_path / "control.token").read_text().strip()  # made by the service
        request = urllib.request.Request(
            f"http://127.0.0.1:{service.http_port}/rollback?to=0", method="POST",
            headers={"Authorization": f"Bearer {token}"})
        assert json.loads(urllib.request.urlopen(request, timeout=30).read())["version"] == 2

        snapshot = decode_snapshot(model.get().payload)
        assert snapshot.version == 2
        np.testing.assert_array_equal(snapshot.weights, service.store.load_checkpoint(0))
    finally:
        for c in (dev, model):
            c.close()
        service.stop()


def test_a_refused_subscription_is_asked_again_until_granted(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """NATS refuses a subscription it cannot back with a JetStream consumer in time; Mosquitto
    never does, so the first SUBACK is turned into a refusal."""
    caplog.set_level(logging.INFO, logger="fedasync")
    monkeypatch.setattr(service_module, "SUBSCRIBE_BACKOFF", Backoff(0.2, 0.2))
    config = CoordinatorConfig(model=SPEC, broker=broker.url, fleet=fleet_name,
                               state_dir=str(tmp_path), client_id=f"coord-{fleet_name}", http="")
    service = CoordinatorService(config)
    client = service._transport.client
    genuine = client.on_acked
    assert genuine is not None
    refused: list[int] = []

    def refuse_first(ack: PacketAck) -> None:
        if ack.kind == "subscribe" and not refused:
            refused.append(ack.mid)
            ack = PacketAck("subscribe", ack.mid, ("Unspecified error",))
        genuine(ack)

    client.on_acked = refuse_first
    service.start()
    try:
        # Connected (able to receive) only once the broker granted the subscription: after the
        # refusal, the one asked again.
        assert service.wait_connected(30)
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert refused and any("refused the subscription to updates" in e for e in errors)
        device = Device(broker, fleet_name, "dev-1")
        ack = device.send(update_bytes(np.full(N, 0.01), base_version=0, device="dev-1"))
        device.close()
        assert ack.status == "accepted"
    finally:
        service.stop()
