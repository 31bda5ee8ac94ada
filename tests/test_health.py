"""Honest health (issue 21, item 6, the coordinator's part): /healthz answers 503 with the
reason while no broker is reachable, and `rollback` says it did not publish while the broker is
down (it printed "published"), with exit status 3, against a private Mosquitto stopped and
started again."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedasync_iot.coordinator import cli as coordinator_cli
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._rules import RuleConfig
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import ModelSpec, Topics, decode_ack
from tests.helpers import Listener, update_bytes, wait_for

SPEC = ModelSpec(kind="logistic", n_features=4, classes=(0, 1, 2))


def healthz(port: int) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.broker
def test_healthz_and_rollback_say_when_the_broker_is_down(
        private_broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(coordinator_cli, "setup_logging", lambda *a, **k: None)
    state, topics = tmp_path / "state", Topics("health")
    service = CoordinatorService(CoordinatorConfig(
        model=SPEC, broker=private_broker.url, fleet="health", state_dir=str(state),
        http="127.0.0.1:0", rule=RuleConfig(name="fedasync", alpha=0.5),
        guards=GuardConfig(max_norm=100.0),
        snapshots=SnapshotConfig(min_interval_s=0.0, include_onnx=False)))
    service.start()
    port = service.http_port
    assert port is not None

    def rollback() -> tuple[int, str]:
        code = coordinator_cli.main(["rollback", "--state-dir", str(state), "--to", "0"])
        return code, capsys.readouterr().out

    try:
        assert service.wait_connected(30)
        assert wait_for(lambda: healthz(port) == (200, {"ok": True}), 30)
        device = Listener(private_broker.url, [topics.ack("dev-1")])
        try:
            device.publish(topics.update("dev-1"),
                           update_bytes(0.01 * np.ones(15), device="dev-1", base_version=0))
            assert decode_ack(bytes(device.get(30).payload)).version == 1
        finally:
            device.close()
        assert rollback() == (0, "version 2 is now the model of version 0; published\n")

        private_broker.stop()
        assert wait_for(lambda: healthz(port)[0] == 503, 30)
        code, body = healthz(port)
        assert body["ok"] is False
        assert body["reason"].startswith(f"not connected to the broker {private_broker.url} (")
        code, out = rollback()
        assert code == 3, out
        assert out.startswith("version 3 is now the model of version 0 in the state; not "
                              f"published: the broker at {private_broker.url} is not reachable")
        assert out.endswith("; the service publishes it once the broker has it\n")
        assert service.status()["published_version"] == 2

        private_broker.start(timeout=30)
        assert wait_for(lambda: healthz(port) == (200, {"ok": True}), 60)
        assert wait_for(lambda: service.status()["published_version"] == 3, 60)
    finally:
        service.stop()
