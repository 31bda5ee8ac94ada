"""A full disk under the state directory (issue 21, item 2): commits that fail back off, are
said once (then summarised), show in /healthz (503) and /status ("degraded"), resume by
themselves, and lose nothing: an update is acknowledged only once it is committed.

Two ways to fill the disk: a real 3 MB tmpfs (needs `mount`: skipped where it is not permitted)
and ENOSPC injected into the commit path, which always runs.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedasync_iot.coordinator import _store as store_module
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._retries import Recovery, Retries
from fedasync_iot.coordinator._rules import RuleConfig
from fedasync_iot.coordinator._scheduling import Stepped
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.coordinator._store import Store
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import ModelSpec, Topics, decode_ack
from tests.helpers import Listener, update_bytes, wait_for

SPEC = ModelSpec(kind="logistic", n_features=4, classes=(0, 1, 2))
N = 15


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def service_for(broker: MosquittoBroker, fleet: str, state: Path,
                scheduler: Stepped | None = None) -> CoordinatorService:
    return CoordinatorService(CoordinatorConfig(
        model=SPEC, broker=broker.url, fleet=fleet, state_dir=str(state), http="127.0.0.1:0",
        rule=RuleConfig(name="fedasync", alpha=0.5, staleness="constant"),
        guards=GuardConfig(max_norm=100.0),
        snapshots=SnapshotConfig(min_interval_s=0.0, include_onnx=False)), scheduler=scheduler)


def check_disk_full(broker: MosquittoBroker, fleet: str, state: Path, *,
                    fill: Callable[[], None], free: Callable[[], None],
                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedasync")
    service = service_for(broker, fleet, state)
    service.start()
    topics = Topics(fleet)
    device = Listener(broker.url, [topics.ack("dev-1")])
    try:
        assert service.wait_connected(30)
        port = service.http_port
        assert port is not None
        assert wait_for(lambda: get(port, "/healthz") == (200, {"ok": True}), 30)
        connected_since = service.status()["connection"]["since"]

        fill()
        device.publish(topics.update("dev-1"), update_bytes(0.01 * np.ones(N), device="dev-1",
                                                            update_id="u1", base_version=0))
        # 0.5 + 1 + 2 s of backoff between the first four attempts.
        assert wait_for(lambda: service.status()["commit_failures"] >= 4, 60)
        code, health = get(port, "/healthz")
        status = get(port, "/status")[1]
        assert device.messages.empty(), "acknowledged before it was committed"
        assert code == 503 and health["ok"] is False
        assert health["reason"].startswith(f"commits to the state directory {state} failing")
        assert "No space left on device" in health["reason"]
        assert status["state"] == "degraded" and status["reason"] == health["reason"]
        assert status["version"] == 0
        # No reconnect to get the batch again: it is kept and retried on the same connection.
        assert status["connection"]["since"] == connected_since
        assert status["connection"]["attempts"] == 0

        free()
        ack = decode_ack(device.get(60).payload)
        assert (ack.update_id, ack.status, ack.version) == ("u1", "accepted", 1)
        assert wait_for(lambda: get(port, "/healthz") == (200, {"ok": True}), 30)
        assert service.status()["state"] == "online"
    finally:
        device.close()
        service.stop()
    ours = [r for r in caplog.records if r.name.startswith("fedasync")]
    assert not [r for r in ours if r.exc_info], "a traceback was logged"
    failed = [r for r in ours if "cannot commit to the state directory" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR
    assert f"cannot commit to the state directory {state}: " in failed[0].getMessage()
    assert "No space left on device" in failed[0].getMessage()
    resumed = [r.getMessage() for r in ours if "resumed after" in r.getMessage()]
    assert len(resumed) == 1
    assert resumed[0].startswith(f"commits to the state directory {state} resumed after ")


class Enospc:
    """ENOSPC from the commit path while `full`: the directory fsync after a checkpoint's
    rename raises it, as a full disk would; the real code turns it into a failed commit."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = False
        self.attempts: list[float] = []
        self._fsync_dir = store_module._fsync_dir
        monkeypatch.setattr(store_module, "_fsync_dir", self._fsync)

    def _fsync(self, path: Path) -> None:
        if self.full:
            self.attempts.append(time.monotonic())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._fsync_dir(path)

    def fill(self) -> None:
        self.full = True

    def free(self) -> None:
        self.full = False


@pytest.mark.broker
def test_enospc_in_the_commit_path_backs_off_and_resumes(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = Enospc(monkeypatch)
    check_disk_full(broker, fleet_name, tmp_path / "state", fill=disk.fill, free=disk.free,
                    caplog=caplog)
    attempts = disk.attempts
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(gaps) >= 3
    # Exponential: at least 0.5, 1, 2 s apart (more on a busy machine, never less).
    for gap, least in zip(gaps, (0.5, 1.0, 2.0), strict=False):
        assert gap >= 0.9 * least, gaps


@pytest.mark.broker
def test_a_driven_coordinator_keeps_a_batch_it_could_not_commit_for_the_next_step(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's virtual clock drives the service: no writer thread to retry, so `step`
    keeps the batch (unacked) for its next call instead of leaving it to a reconnect."""
    disk = Enospc(monkeypatch)
    stepper = Stepped()
    service = service_for(broker, fleet_name, tmp_path / "state", scheduler=stepper)
    service.start()
    topics = Topics(fleet_name)
    device = Listener(broker.url, [topics.ack("dev-1")])
    try:
        assert service.wait_connected(30)
        disk.fill()
        device.publish(topics.update("dev-1"), update_bytes(0.01 * np.ones(N), device="dev-1",
                                                            update_id="u1", base_version=0))
        assert wait_for(lambda: stepper.step()[0] and bool(disk.attempts), 30)
        stepper.step()
        assert len(disk.attempts) == 2 and device.messages.empty()
        disk.free()
        stepper.step()
        ack = decode_ack(device.get(30).payload)
    finally:
        device.close()
        service.stop()
    assert (ack.update_id, ack.status, ack.version) == ("u1", "accepted", 1)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MB tmpfs, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        pytest.skip(f"cannot run mount ({exc}); the ENOSPC-injection test covers this")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}); the "
                    "ENOSPC-injection test covers this")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30, check=False)


def fill_up(path: Path) -> None:
    """Write `path` until the file system is full, down to the last byte it takes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


@pytest.mark.broker
def test_a_full_tmpfs_under_the_state_directory_backs_off_and_resumes(
        broker: MosquittoBroker, fleet_name: str, small_disk: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    filler = small_disk / "filler"
    check_disk_full(broker, fleet_name, small_disk / "state", fill=lambda: fill_up(filler),
                    free=filler.unlink, caplog=caplog)


@pytest.mark.broker
def test_a_device_status_on_a_full_disk_is_recorded_once_commits_resume_without_a_warning(
        broker: MosquittoBroker, fleet_name: str, small_disk: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """The failing commits are said once; a device's privacy figures arriving meanwhile were
    a WARNING of their own every 30 s for as long as the disk stayed full."""
    caplog.set_level(logging.INFO, logger="fedasync")
    state, filler = small_disk / "state", small_disk / "filler"
    service = service_for(broker, fleet_name, state)
    service.start()
    topics = Topics(fleet_name)
    device = Listener(broker.url, [topics.ack("dev-1")])
    ledger = {"epsilon_spent": 1.2, "bounded": True, "epsilon_budget": 2.0, "delta": 1e-5,
              "updates": 2, "next_epsilon": 1.5, "exhausted": False, "error": None}
    try:
        assert service.wait_connected(30)
        fill_up(filler)
        device.publish(topics.update("dev-1"), update_bytes(0.01 * np.ones(N), device="dev-1",
                                                            update_id="u1", base_version=0))
        assert wait_for(lambda: service.status()["commit_failures"] >= 1, 60)
        device.publish(topics.status("dev-1"), json.dumps(
            {"state": "online", "device_id": "dev-1", "eligible": True,
             "privacy": ledger}).encode())
        assert wait_for(lambda: service.devices()["local_privacy"]["devices"] == 1, 30)
        taken = service.status()["commit_failures"]
        # Retries 0.5, 1, 2 s apart: well past the figures' 1 s write interval, in which the
        # writer would have tried them.
        assert wait_for(lambda: service.status()["commit_failures"] >= taken + 3, 60)
        filler.unlink()
        ack = decode_ack(device.get(60).payload)
        assert (ack.update_id, ack.status) == ("u1", "accepted")
    finally:
        device.close()
        service.stop()
    store = Store.open_readonly(state)
    try:
        assert store.device_privacy()["dev-1"].epsilon == 1.2
    finally:
        store.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in said if "privacy figures" in m], said
    assert len([m for m in said if "cannot commit to the state directory" in m]) == 1

def test_retries_back_off_exponentially_and_say_so_once_then_every_few_minutes() -> None:
    now = [100.0]
    retries = Retries(first_s=0.5, cap_s=30.0, summary_every_s=300.0, clock=lambda: now[0])
    assert (retries.failing, retries.delay, retries.succeeded()) == (False, 0.0, None)
    said, delays = [], []
    for _ in range(16):
        said.append(retries.failed("No space left on device"))
        delays.append(retries.delay)
        now[0] += retries.delay
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0] + [30.0] * 10
    # Said at the first failure (t=100 s), then at the first one 300 s later (t=401.5 s).
    assert said == [True] + [False] * 14 + [True]
    assert retries.cause == "No space left on device"
    recovery = retries.succeeded()
    assert recovery == Recovery(failures=16, seconds=sum(delays))
    assert (retries.failing, retries.delay, retries.succeeded()) == (False, 0.0, None)


def test_the_write_ahead_log_does_not_fill_a_small_state_directory(small_disk: Path) -> None:
    # Found by trying it (a 3 MB tmpfs as the state directory): SQLite reuses its log only
    # after a checkpoint, by default at 4 MB, so the log alone filled the volume at version
    # 236 (state.db 57 kB, state.db-wal 2.9 MB) and a failing commit never checkpointed it.
    store = Store(small_disk / "state", keep_checkpoints=3)
    rng = np.random.default_rng(0)
    try:
        for v in range(1, 601):
            store.commit(store_module.Commit(
                updates=[store_module.UpdateRecord(
                    update_id=f"u{v}", device_id=f"dev-{v % 20}", base_version=v - 1,
                    staleness=0, n_samples=10, received_at=float(v), outcome="accepted",
                    weight=0.5, version=v)],
                versions=[store_module.VersionRecord(
                    version=v, created_at=float(v), n_updates=1, checksum=f"{v:064x}",
                    source="merge", metrics={"accuracy": 0.5})],
                model=(v, rng.standard_normal(650))))
            wal = small_disk / "state" / "state.db-wal"
            assert not wal.exists() or wal.stat().st_size <= 2 * store_module._WAL_BYTES
        assert store.current_version() == 600
    finally:
        store.close()
