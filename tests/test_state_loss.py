"""A lost state directory (issue 21, item 1), through the real CLI and a private Mosquitto.

After an `rm -rf` of the state directory a restarted coordinator used to start silently at
version 0, publish it over the fleet's model and reject every agent's spooled update as
`future_version`; under a running one, the deletion gave ~8 errors a second and no clear word.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedasync_iot.coordinator._lock import read_holder
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import Topics, decode_ack
from tests.helpers import Listener, update_bytes, wait_for

ROOT = Path(__file__).parents[1]
N = 15  # logistic, 4 features, 3 classes


def files(tmp_path: Path, broker: MosquittoBroker, fleet: str) -> tuple[Path, Path, Path]:
    """(state directory, config, log) of one coordinator."""
    state, path = tmp_path / "state", tmp_path / "c.toml"
    path.write_text(
        f'broker = "{broker.url}"\nfleet = "{fleet}"\nstate_dir = "{state}"\n'
        'http = "127.0.0.1:0"\n[model]\nkind = "logistic"\nn_features = 4\n'
        'classes = [0, 1, 2]\n[snapshots]\nmin_interval_s = 0.0\ninclude_onnx = false\n')
    return state, path, tmp_path / "coordinator.log"


def command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedasync_iot.coordinator.cli",
            "run", "--config", str(config), *extra]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def serving(config: Path, state: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`run` in the background, once its /healthz says 200."""
    with log.open("ab") as out:
        process = subprocess.Popen(command(config, *extra), env=ENV, stdout=out,
                                   stderr=subprocess.STDOUT)
    if not wait_for(lambda: healthy(state), 60):
        process.kill()
        process.wait(30)
        pytest.fail(f"the coordinator did not become healthy:\n{log.read_text()}")
    return process


def get(state: Path, path: str) -> tuple[int, Any]:
    """GET from the service that holds `state` (its control address is in the lock file)."""
    control = read_holder(state).control
    if control is None:
        return 0, None
    try:
        with urllib.request.urlopen(f"http://{control}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, None


def healthy(state: Path) -> bool:
    return get(state, "/healthz")[0] == 200


class Device(Listener):
    def __init__(self, broker: MosquittoBroker, fleet: str, name: str = "dev-1") -> None:
        self.topics = Topics(fleet)
        self.name = name
        super().__init__(broker.url, [self.topics.ack(name)])

    def send(self, update_id: str, base_version: int) -> None:
        self.publish(self.topics.update(self.name),
                     update_bytes(0.01 * np.ones(N), device=self.name, update_id=update_id,
                                  base_version=base_version))

    def nothing_more(self) -> bool:
        """True if no ack is on its way: a marker published now arrives after any of them."""
        self.publish(self.topics.ack(self.name), b"marker")
        return bytes(self.get(30).payload) == b"marker"


def stopped(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(60)


@pytest.mark.broker
def test_a_restart_without_state_under_a_fleet_at_version_n_refuses_and_reset_starts_over(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    state, config, log = files(tmp_path, broker, fleet_name)
    first = serving(config, state, log)
    device = Device(broker, fleet_name)
    again = None
    try:
        for i in range(3):
            device.send(f"u{i}", base_version=i)
            ack = decode_ack(device.get(30).payload)
            assert (ack.status, ack.version) == ("accepted", i + 1)
        assert wait_for(lambda: get(state, "/status")[1]["published_version"] == 3, 30)
        assert stopped(first) == 0

        shutil.rmtree(state)
        refused = subprocess.run(command(config), env=ENV, capture_output=True, text=True,
                                 timeout=120, check=False)
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: the state in {state} is at version 0 (new or lost), but the broker holds "
            f"fleet {fleet_name!r} at version 3: restore the state directory {state} from a "
            "backup, or start the fleet over at version 0 with `fedasync-coordinator run "
            "--reset`"]
        assert "published snapshot" not in refused.stderr  # nothing went over version 3
        # The refused start published nothing: the retained announcement still says 3.
        announce = Listener(broker.url, [Topics(fleet_name).announce])
        try:
            assert json.loads(announce.get(30).payload)["version"] == 3
        finally:
            announce.close()

        again = serving(config, state, log, "--reset")
        assert wait_for(lambda: get(state, "/status")[1]["published_version"] == 0, 30)
        assert get(state, "/status")[1]["version"] == 0
        assert stopped(again) == 0
        text = log.read_text()
        assert (f"WARNING fedasync.coordinator: --reset: fleet {fleet_name!r} starts over at "
                f"version 0 in {state}; the broker held it at version 3") in text
    finally:
        device.close()
        for p in (first, again):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.mark.broker
def test_a_state_directory_deleted_under_the_running_service_stops_it_with_one_error(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    state, config, log = files(tmp_path, broker, fleet_name)
    service = serving(config, state, log)
    device = Device(broker, fleet_name)
    try:
        device.send("before", base_version=0)
        assert decode_ack(device.get(30).payload).status == "accepted"

        shutil.rmtree(state)
        device.send("after", base_version=1)  # committed into a deleted database at most
        assert service.wait(60) == 2
        assert device.nothing_more(), "an update was acked after its state was deleted"
    finally:
        device.close()
        if service.poll() is None:
            service.kill()
            service.wait(30)
    lines = log.read_text().splitlines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, "\n".join(lines)
    assert (f"fedasync.coordinator: the state database {state}/state.db is gone (No such "
            "file or directory): the state directory was deleted or replaced under the running "
            "coordinator") in errors[0]
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith(f"error: the state database {state}/state.db is gone")
