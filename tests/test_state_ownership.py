"""One writer per state directory (issue 13, items 1, 2, 5): the running coordinator holds the
state directory's lock; `versions`, `devices` and `export` read it read-only with only
--state-dir; `rollback` goes through the running service with the control token, or takes the
lock itself; POST /rollback needs the token.

Real SQLite files, a real Mosquitto (the `broker` fixture), the real CLI (in process through
`main`, or as a child process where a second process is the point).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from fedasync_iot.coordinator import cli as coordinator_cli
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._engine import Engine, Incoming
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._lock import LOCK_NAME, StateDirInUse, StateLock, read_holder
from fedasync_iot.coordinator._rules import RuleConfig, build_rule
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.coordinator._store import Store
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import ConfigError, ModelSpec, StateError, Topics, build_model, decode_ack
from fedasync_iot.models.ml._onnx import SPEC_METADATA_KEY
from tests.helpers import Listener, update_bytes, wait_for

ROOT = Path(__file__).parents[1]
# Labels that are not 0..n-1: exporting them under other classes is the mistake to refuse.
SPEC = ModelSpec(kind="logistic", n_features=4, classes=(3, 5, 7))
N = 15  # 3 x 4 weights + 3 intercepts
RULE = RuleConfig(name="fedasync", alpha=0.5, staleness="constant")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """`fedasync-coordinator ARGS...` in process -> (exit code, stdout, stderr); without its
    logging set-up, which would replace pytest's handlers."""
    monkeypatch.setattr(coordinator_cli, "setup_logging", lambda *a, **k: None)

    def run(*argv: str | Path) -> tuple[int, str, str]:
        code = coordinator_cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def make_state(state: Path, updates: int, *, spec: ModelSpec = SPEC) -> list[int]:
    """A state directory with versions 0..`updates`, written by the real engine and closed."""
    store = Store(state)
    try:
        write_versions(store, updates, spec=spec)
        return [v.version for v in store.versions()]
    finally:
        store.close()


def write_versions(store: Store, updates: int, *, spec: ModelSpec = SPEC) -> None:
    """`updates` more versions in `store`, each one update merged by the real engine."""
    rng = np.random.default_rng(7)
    n = build_model(spec).get_params_vector().size
    engine = Engine(store, build_rule(RULE), GuardConfig(max_norm=100.0), spec=spec,
                    initial_params=build_model(spec).get_params_vector)
    for i in range(updates):
        payload = update_bytes(rng.normal(size=n), device=f"dev-{i % 2}",
                               base_version=engine.version)
        engine.process([Incoming(f"dev-{i % 2}", payload, 1000.0 + i)])


def write_config(path: Path, state: Path, *, classes: tuple[int, ...] = SPEC.classes,
                 extra: str = "") -> Path:
    path.write_text(f'state_dir = "{state}"\n{extra}\n[model]\nkind = "logistic"\n'
                    f"n_features = 4\nclasses = {list(classes)}\n")
    return path


def make_service(broker: MosquittoBroker, fleet: str, state: Path, **changes: Any
                 ) -> CoordinatorService:
    config = CoordinatorConfig(model=SPEC, broker=broker.url, fleet=fleet, state_dir=str(state),
                               client_id=f"coord-{fleet}", http="127.0.0.1:0", rule=RULE,
                               guards=GuardConfig(max_norm=100.0),
                               snapshots=SnapshotConfig(min_interval_s=0.0), **changes)
    service = CoordinatorService(config)
    service.start()
    assert service.wait_connected(30)
    return service


def post(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def bearer(state: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {(state / 'control.token').read_text().strip()}"}


def files(state: Path) -> dict[str, float]:
    """Every file and its modification time; SQLite's own -wal/-shm aside (a WAL reader makes
    them: that is how it reads beside the writer)."""
    return {str(p.relative_to(state)): p.stat().st_mtime for p in sorted(state.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def checkpoint(state: Path, version: int) -> Path:
    return state / "checkpoints" / f"v{version:010d}.npy"


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port bound but never listening: connecting to it is refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


# ------------------------------------------------------------------ the store and its lock


def test_readonly_store_changes_nothing(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="no state in"):
        Store.open_readonly(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()

    state = tmp_path / "state"
    make_state(state, 2)
    # The trace a writer leaves between a checkpoint and its commit (or a crash there).
    np.save(checkpoint(state, 3), np.zeros(N, dtype="<f4"))
    reader = Store.open_readonly(state)
    try:
        assert reader.current_version() == 2
        assert reader.load_checkpoint(2).shape == (N,)
        with pytest.raises(StateError, match="read-only"):
            reader.set_metrics(2, {"accuracy": 1.0})
        assert reader.lock is None
    finally:
        reader.close()
    assert checkpoint(state, 3).exists()

    writer = Store(state)  # the one writer repairs: the orphan goes
    writer.close()
    assert not checkpoint(state, 3).exists()


def test_a_writable_store_takes_the_lock_and_names_the_holder(tmp_path: Path) -> None:
    first = Store(tmp_path)
    try:
        with pytest.raises(StateDirInUse) as refused:
            Store(tmp_path)
        message = str(refused.value)
        assert f"in use by the coordinator pid {os.getpid()} on host {socket.gethostname()}" \
            in message
        assert "stop it first or use another --state-dir" in message
        reader = Store.open_readonly(tmp_path)  # readers need no lock
        reader.close()
    finally:
        first.close()
    Store(tmp_path).close()  # released by close


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path, dead_port: int) -> None:
    holder = hold_lock_in_child(tmp_path, control=f"127.0.0.1:{dead_port}")
    try:
        with pytest.raises(StateDirInUse) as refused:
            Store(tmp_path)
        assert refused.value.holder.pid == holder.pid
        assert refused.value.holder.control == f"127.0.0.1:{dead_port}"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    Store(tmp_path).close()  # the kernel dropped the lock with the process


def hold_lock_in_child(state: Path, *, control: str) -> subprocess.Popen[str]:
    """Another process holding `state`'s lock, as a coordinator would, until killed."""
    code = ("import sys, pathlib; from fedasync_iot.coordinator._lock import StateLock; "
            "lock = StateLock.acquire(pathlib.Path(sys.argv[1])); lock.note_control(sys.argv[2]);"
            " print('locked', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(state), control], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------ read commands


def test_read_commands_need_only_the_state_dir(tmp_path: Path, cli: Any) -> None:
    state = tmp_path / "state"
    assert make_state(state, 3) == [0, 1, 2, 3]
    before = files(state)

    code, out, err = cli("versions", "--state-dir", state, "--json")
    assert code == 0, err
    assert [(v["version"], v["source"]) for v in json.loads(out)] == [
        (0, "init"), (1, "merge"), (2, "merge"), (3, "merge")]

    code, out, err = cli("devices", "--state-dir", state, "--json", "--sort", "device")
    assert code == 0, err
    assert [(d["device_id"], d["accepted"]) for d in json.loads(out)["devices"]] == [
        ("dev-0", 2), ("dev-1", 1)]

    onnx_file = tmp_path / "model.onnx"
    code, out, err = cli("export", "--state-dir", state, "--version", "2", onnx_file)
    assert code == 0, err
    reader = Store.open_readonly(state)
    adapter = build_model(SPEC)
    adapter.set_params_vector(reader.load_checkpoint(2))
    reader.close()
    X = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    session = ort.InferenceSession(onnx_file.read_bytes(), providers=["CPUExecutionProvider"])
    labels = session.run(None, {session.get_inputs()[0].name: X})[0]
    np.testing.assert_array_equal(labels, adapter.predict(X))
    assert set(labels.tolist()) <= {3, 5, 7}

    assert files(state) == before  # nothing written, nothing repaired


def test_export_refuses_a_model_other_than_the_stored_one(tmp_path: Path, cli: Any) -> None:
    state = tmp_path / "state"
    make_state(state, 1)
    out_file = tmp_path / "model.onnx"

    relabelled = write_config(tmp_path / "relabelled.toml", state, classes=(0, 1, 2))
    code, _, err = cli("export", "--config", relabelled, out_file)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "classes [0, 1, 2] given, [3, 5, 7] stored" in err
    assert not out_file.exists()

    test_file = tmp_path / "test.csv"  # --model takes n_features and classes from it
    test_file.write_text("a,b,c,d,label\n" + "".join(f"0,1,2,{i},{c}\n"
                                                     for i, c in enumerate((3, 5, 7))))
    code, _, err = cli("export", "--state-dir", state, "--model", "mlp", "--test-file",
                       test_file, out_file)
    assert code == 2
    assert "kind mlp given, logistic stored" in err
    assert not out_file.exists()

    same = write_config(tmp_path / "same.toml", state)
    code, _, err = cli("export", "--config", same, out_file)
    assert code == 0, err
    assert out_file.stat().st_size > 0


def model_config(path: Path, state: Path, **model: Any) -> Path:
    """A config naming `state` and a [model] table of `model`'s keys."""
    path.write_text(f'state_dir = "{state}"\n[model]\n'
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items()))
    return path


def onnx_spec_and_labels(onnx_file: Path, X: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    session = ort.InferenceSession(onnx_file.read_bytes(), providers=["CPUExecutionProvider"])
    spec = json.loads(session.get_modelmeta().custom_metadata_map[SPEC_METADATA_KEY])
    return spec, session.run(None, {session.get_inputs()[0].name: X})[0]


def test_export_compares_only_what_defines_the_graph(tmp_path: Path, cli: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Issue 21 item 8: training settings (learning rate, batch size, l2, seed) do not change
    the ONNX graph, so a config that differs only there exports the stored model; and
    `--model logistic`, whose learning rate is the default, matches a state trained at
    another."""
    stored = replace(SPEC, learning_rate=0.05, batch_size=16, l2=1e-3, seed=3)
    state = tmp_path / "state"
    make_state(state, 2, spec=stored)
    adapter = build_model(stored)
    reader = Store.open_readonly(state)
    adapter.set_params_vector(reader.load_checkpoint(2))
    reader.close()
    X = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)

    tuned = model_config(tmp_path / "tuned.toml", state, kind="logistic", n_features=4,
                         classes=[3, 5, 7], hidden=[8], learning_rate=0.2, batch_size=64)
    out_file = tmp_path / "tuned.onnx"
    with caplog.at_level(logging.INFO, logger="fedasync.coordinator"):
        code, out, err = cli("export", "--config", tuned, out_file)
    assert code == 0, err
    assert out == f"wrote version 2 to {out_file}\n"
    spec, labels = onnx_spec_and_labels(out_file, X)
    assert spec == stored.to_dict()  # the stored model, with its own training settings
    np.testing.assert_array_equal(labels, adapter.predict(X))
    assert "learning_rate 0.2 given, 0.05 stored" in caplog.text

    test_file = tmp_path / "test.csv"  # --model takes n_features and classes from it
    test_file.write_text("a,b,c,d,label\n" + "".join(f"0,1,2,{i},{c}\n"
                                                     for i, c in enumerate((3, 5, 7))))
    out_file = tmp_path / "flag.onnx"
    code, _, err = cli("export", "--state-dir", state, "--model", "logistic", "--test-file",
                       test_file, out_file)
    assert code == 0, err
    np.testing.assert_array_equal(onnx_spec_and_labels(out_file, X)[1], adapter.predict(X))


def test_export_of_an_mlp_compares_its_layers(tmp_path: Path, cli: Any) -> None:
    stored = ModelSpec(kind="mlp", n_features=4, classes=(3, 5, 7), hidden=(4,))
    state = tmp_path / "state"
    make_state(state, 1, spec=stored)
    out_file = tmp_path / "model.onnx"

    wider = model_config(tmp_path / "wider.toml", state, kind="mlp", n_features=4,
                         classes=[3, 5, 7], hidden=[8])
    code, _, err = cli("export", "--config", wider, out_file)
    assert code == 2
    assert "hidden [8] given, [4] stored" in err
    assert not out_file.exists()

    tuned = model_config(tmp_path / "tuned.toml", state, kind="mlp", n_features=4,
                         classes=[3, 5, 7], hidden=[4], learning_rate=0.3)
    code, _, err = cli("export", "--config", tuned, out_file)
    assert code == 0, err
    assert onnx_spec_and_labels(out_file, np.zeros((2, 4), np.float32))[0] == stored.to_dict()


def test_read_commands_without_state_say_so(tmp_path: Path, cli: Any) -> None:
    for command in (["versions"], ["devices"], ["export", tmp_path / "m.onnx"]):
        code, _, err = cli(*command, "--state-dir", tmp_path / "none")
        assert code == 2, command
        assert f"no state in {tmp_path / 'none'}" in err
    assert not (tmp_path / "none").exists()


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """`view(directory)` -> a read-only bind mount of it: a real read-only filesystem, as a
    backup mounted ro or a container's ro volume is. Skips where mounting is not permitted."""
    mounted: list[Path] = []

    def view(directory: Path) -> Path:
        target = tmp_path / f"ro-{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "--bind", str(directory), str(target)],
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            pytest.skip(f"mount is not permitted here: {done.stderr.strip()}")
        mounted.append(target)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], check=True, timeout=60)
        return target

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a bind mount needs root and mount(8)")
    yield view
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=True, timeout=60)


def test_read_commands_work_on_a_read_only_mount(tmp_path: Path, cli: Any,
                                                 read_only_view: Callable[[Path], Path]) -> None:
    """Issue 21 item 7: a state directory where nothing may be created (SQLite's -shm index
    included) used to fail with only "unable to open database file"; with no writer and no
    WAL to read, it is read as it is on disk."""
    state = tmp_path / "state"
    make_state(state, 3)
    # The expected answers from a writable copy: a reader leaves its -shm behind, and a state
    # directory that has one reads without this change.
    copy = shutil.copytree(state, tmp_path / "copy")
    reads = (["versions", "--json"], ["devices", "--json", "--sort", "device"])
    expected = [cli(*command, "--state-dir", copy) for command in reads]
    assert [code for code, _, _ in expected] == [0, 0]
    reader = Store.open_readonly(copy)
    adapter = build_model(SPEC)
    adapter.set_params_vector(reader.load_checkpoint(3))
    reader.close()
    assert sorted(p.name for p in state.iterdir()) == ["checkpoints", "lock", "state.db"]
    view = read_only_view(state)

    for command, (_, out, _) in zip(reads, expected, strict=True):
        code, got, err = cli(*command, "--state-dir", view)
        assert code == 0, err
        assert json.loads(got) == json.loads(out)
    code, _, err = cli("export", "--state-dir", view, tmp_path / "m.onnx")
    assert code == 0, err
    X = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    np.testing.assert_array_equal(onnx_spec_and_labels(tmp_path / "m.onnx", X)[1],
                                  adapter.predict(X))


def test_a_read_only_copy_taken_beside_the_writer(tmp_path: Path, cli: Any,
                                                  read_only_view: Callable[[Path], Path]) -> None:
    """A copy taken while the coordinator ran holds its newest commits in state.db-wal. With
    the copied -shm SQLite reads them; without it, reading state.db alone would silently miss
    them, so the command refuses and says how to read it."""
    state = tmp_path / "state"
    make_state(state, 1)
    writer = Store(state)
    try:
        write_versions(writer, 2)  # versions 2 and 3, committed to the WAL
        with_shm = shutil.copytree(state, tmp_path / "with-shm")
        without_shm = shutil.copytree(state, tmp_path / "without-shm",
                                      ignore=shutil.ignore_patterns("*-shm"))
        live = read_only_view(state)
        code, out, err = cli("versions", "--state-dir", live, "--json")
        assert code == 0, err  # beside the live writer, through its -shm
        assert [v["version"] for v in json.loads(out)] == [0, 1, 2, 3]
    finally:
        writer.close()
    assert (without_shm / "state.db-wal").stat().st_size > 0

    code, out, err = cli("versions", "--state-dir", read_only_view(with_shm), "--json")
    assert code == 0, err
    assert [v["version"] for v in json.loads(out)] == [0, 1, 2, 3]

    view = read_only_view(without_shm)
    code, out, err = cli("versions", "--state-dir", view)
    assert (code, out) == (2, "")
    assert err == (
        f"error: cannot read the state in {view}: {view} is on a read-only filesystem, and "
        "state.db-wal holds commits not yet in state.db, which SQLite reads only through "
        "state.db-shm (missing, and it cannot create it); copy the directory somewhere "
        f"writable (cp -a {view} DEST) and pass --state-dir DEST\n")


def test_read_commands_as_a_user_who_may_not_write_or_read_the_state(tmp_path: Path) -> None:
    """The same without a mount, so it runs everywhere: the permission bits say no. Root would
    pass them, so as root the CLI runs without the capabilities that override them
    (setpriv: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), as an unprivileged owner would."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root needs setpriv(1) to drop the override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    state = tmp_path / "state"
    make_state(state, 2)

    def versions() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, sys.executable, "-m", "fedasync_iot.coordinator.cli",
                               "versions",
                               "--state-dir", str(state), "--json"], env=child_env(),
                              capture_output=True, text=True, timeout=120, check=False)

    owner = f"owner uid {os.geteuid()}"
    try:
        state.chmod(0o555)
        done = versions()
        assert done.returncode == 0, done.stderr
        assert [v["version"] for v in json.loads(done.stdout)] == [0, 1, 2]
        assert f"may not write {state} ({owner}, mode dr-xr-xr-x)" in done.stderr

        (state / "state.db").chmod(0o000)
        done = versions()
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.startswith(
            f"error: cannot read the state in {state}: permission denied: ")
        assert done.stderr.endswith(
            f" may not read {state / 'state.db'} ({owner}, mode ----------); run this as the "
            "coordinator's user, or grant it read access\n")

        state.chmod(0o000)
        done = versions()
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr.endswith(
            f" may not enter {state} ({owner}, mode d---------); run this as the "
            "coordinator's user, or grant it access\n")
        assert done.stderr.count("\n") == 1
    finally:
        state.chmod(0o755)
        (state / "state.db").chmod(0o644)


@pytest.mark.broker
def test_read_commands_between_checkpoint_and_commit_leave_the_checkpoint(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path, cli: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of item 1: `versions`, `devices` or `export` run while the writer has written a
    new version's checkpoint but not yet committed it. Opening the store used to delete that
    checkpoint as an orphan; the commit then recorded a version with no checkpoint, and the
    service could not start again."""
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.toml", state)  # as an operator would run them
    service = make_service(broker, fleet_name, state)
    written, release = threading.Event(), threading.Event()
    store = service.store
    write_checkpoint = store._write_checkpoint

    def held(version: int, params: Any) -> None:  # the fault: a writer paused mid-commit
        write_checkpoint(version, params)
        written.set()
        assert release.wait(60)

    monkeypatch.setattr(store, "_write_checkpoint", held)
    device = Listener(broker.url, [Topics(fleet_name).ack("dev-a")])
    try:
        device.client.send(Topics(fleet_name).update("dev-a"),
                           update_bytes(0.1 * np.ones(N), device="dev-a"), qos=1)
        assert written.wait(60), "the writer never reached its checkpoint"
        assert checkpoint(state, 1).exists()

        code, out, err = cli("versions", "--config", config)
        assert code == 0, err
        assert [line.split()[0] for line in out.splitlines()[1:]] == ["0"]  # 1 not committed
        for command in (["devices", "--config", config],
                        ["export", "--config", config, tmp_path / "m.onnx"]):
            code, _, err = cli(*command)
            assert code == 0, err
        assert checkpoint(state, 1).exists(), "a reader deleted the writer's checkpoint"

        release.set()
        ack = decode_ack(device.get(timeout=60).payload)
        assert (ack.status, ack.version) == ("accepted", 1)
    finally:
        release.set()
        device.close()
        service.stop()

    restarted = make_service(broker, fleet_name, state)
    try:
        assert restarted.engine.version == 1
    finally:
        restarted.stop()


# ------------------------------------------------------------------ a second run


def run_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedasync_iot.coordinator.cli",
                                 "run", "--config",
                                 str(config)], env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.mark.broker
def test_a_second_run_on_the_same_state_dir_refuses(broker: MosquittoBroker, fleet_name: str,
                                                    tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "c.toml", state, extra=(
        f'broker = "{broker.url}"\nfleet = "{fleet_name}"\nhttp = "127.0.0.1:0"\n'
        f'client_id = "coord-{fleet_name}"'))
    first = run_process(config, tmp_path / "first.log")
    try:
        assert wait_for(lambda: (state / LOCK_NAME).exists()
                        and read_holder(state).control is not None, timeout=60), \
            (tmp_path / "first.log").read_text()
        control = read_holder(state).control
        assert read_holder(state).pid == first.pid

        second = subprocess.run([sys.executable, "-m", "fedasync_iot.coordinator.cli",
                                 "run", "--config",
                                 str(config)], env=child_env(), capture_output=True,
                                text=True, timeout=120, check=False)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert (f"error: state directory {state} is in use by the coordinator pid {first.pid} "
                f"on host {socket.gethostname()} since ") in second.stderr
        assert "stop it first or use another --state-dir" in second.stderr

        assert first.poll() is None, "the first coordinator stopped"

        def healthy() -> bool:  # 200 once connected (503 with the reason before)
            try:
                with urllib.request.urlopen(f"http://{control}/healthz", timeout=30) as resp:
                    return bool(json.loads(resp.read()) == {"ok": True})
            except urllib.error.HTTPError:
                return False

        assert wait_for(healthy, 60)
        assert read_holder(state).pid == first.pid  # the refused one left the record alone
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0


# ------------------------------------------------------------------ the control token


@pytest.mark.broker
def test_post_rollback_needs_the_control_token(broker: MosquittoBroker, fleet_name: str,
                                               tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fedasync")
    state = tmp_path / "state"
    service = make_service(broker, fleet_name, state)
    port = service.http_port
    assert port is not None
    try:
        token_file = state / "control.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32

        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"},
                        {"Authorization": f"Basic {token}"}, {"Authorization": token}):
            code, body = post(port, "/rollback?to=0", headers)
            assert code == 401, headers
            assert "control token" in body["error"]
        assert service.engine.version == 0  # nothing happened

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30) as resp:
            assert json.loads(resp.read())["version"] == 0  # reading stays open

        code, body = post(port, "/rollback?to=0", {"Authorization": f"Bearer {token}"})
        assert (code, body["version"]) == (200, 1)
        assert service.engine.version == 1
    finally:
        service.stop()
    assert token not in caplog.text


@pytest.mark.broker
def test_a_configured_token_is_the_one_required(broker: MosquittoBroker, fleet_name: str,
                                                tmp_path: Path) -> None:
    state = tmp_path / "state"
    secret = tmp_path / "token"
    secret.write_text("s3cret-token-from-a-file\n")
    service = make_service(broker, fleet_name, state, control_token_file=str(secret))
    port = service.http_port
    assert port is not None
    try:
        assert not (state / "control.token").exists()
        assert post(port, "/rollback?to=0", {"Authorization": "Bearer s3cret-token"})[0] == 401
        code, _ = post(port, "/rollback?to=0",
                       {"Authorization": "Bearer s3cret-token-from-a-file"})
        assert code == 200
    finally:
        service.stop()

    with pytest.raises(ConfigError, match="not both"):
        CoordinatorConfig(model=SPEC, control_token="x" * 20, control_token_file=str(secret))
    with pytest.raises(ConfigError, match="at least 16"):
        CoordinatorConfig(model=SPEC, control_token="short")


# ------------------------------------------------------------------ the rollback command


@pytest.mark.broker
def test_rollback_goes_through_the_running_service(broker: MosquittoBroker, fleet_name: str,
                                                   tmp_path: Path, cli: Any) -> None:
    state = tmp_path / "state"
    service = make_service(broker, fleet_name, state)
    device = Listener(broker.url, [Topics(fleet_name).ack("dev-a")])
    try:
        device.publish(Topics(fleet_name).update("dev-a"),
                       update_bytes(0.1 * np.ones(N), device="dev-a"))
        assert decode_ack(device.get(timeout=60).payload).version == 1

        # Only the state directory: the service's address from its lock record, the token
        # from its file; the service stays the only writer.
        code, out, err = cli("rollback", "--state-dir", state, "--to", "0")
        assert code == 0, err
        assert "version 2 is now the model of version 0; published" in out
        assert service.engine.version == 2
        assert service.store.version(2).source == "rollback:0"

        (state / "control.token").write_text("not-the-token-the-service-has\n")
        code, _, err = cli("rollback", "--state-dir", state, "--to", "0")
        assert code == 2
        assert "needs the control token" in err
        assert service.engine.version == 2
    finally:
        device.close()
        service.stop()


def test_rollback_without_a_service_takes_the_lock(tmp_path: Path, cli: Any) -> None:
    state = tmp_path / "state"
    make_state(state, 2)
    locked_during: list[bool] = []
    rollback = Engine.rollback

    def observed(engine: Engine, to: int) -> int:
        try:
            Store(state).close()
            locked_during.append(False)
        except StateDirInUse:
            locked_during.append(True)
        return rollback(engine, to)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "rollback", observed)
        code, out, err = cli("rollback", "--state-dir", state, "--to", "1")
    assert code == 0, err
    assert "version 3 is now the model of version 1; it is published when" in out
    assert locked_during == [True]

    reader = Store.open_readonly(state)
    try:
        assert reader.version(3).source == "rollback:1"
        np.testing.assert_array_equal(reader.load_checkpoint(3), reader.load_checkpoint(1))
    finally:
        reader.close()
    StateLock.acquire(state).release()  # released when the command ended


def test_rollback_refuses_when_the_holder_does_not_answer(tmp_path: Path, cli: Any,
                                                          dead_port: int) -> None:
    state = tmp_path / "state"
    make_state(state, 1)
    holder = hold_lock_in_child(state, control=f"127.0.0.1:{dead_port}")
    try:
        code, _, err = cli("rollback", "--state-dir", state, "--to", "0")
        assert code == 2
        assert "Traceback" not in err
        assert (f"the coordinator pid {holder.pid} on host {socket.gethostname()} since "
                in err)
        assert (f"holds {state} but its control endpoint at 127.0.0.1:{dead_port} does not "
                "answer; stop it first") in err
        reader = Store.open_readonly(state)
        assert reader.current_version() == 1  # nothing written beside the holder
        reader.close()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)

    code, _, err = cli("rollback", "--state-dir", state, "--to", "0")
    assert code == 0, err


@pytest.mark.broker
def test_a_second_coordinator_on_a_taken_http_port_says_so(
        broker: MosquittoBroker, fleet_name: str, tmp_path: Path) -> None:
    """Another state directory, the same `http` (the default port, say) as a running one: one
    line and exit 2, not a traceback; the state directory is left for the next run."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = tmp_path / "state"
        config = write_config(tmp_path / "c.toml", state, extra=(
            f'broker = "{broker.url}"\nfleet = "{fleet_name}"\nhttp = "127.0.0.1:{port}"\n'
            f'client_id = "coord-{fleet_name}"'))
        done = subprocess.run([sys.executable, "-m", "fedasync_iot.coordinator.cli", "run",
                               "--config", str(config)], env=child_env(), capture_output=True,
                              text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert (f"error: cannot serve metrics and status on 127.0.0.1:{port} (Address already in "
            "use): another process (a second coordinator?) holds it") in done.stderr
    # Nothing held: the same configuration runs once the port is free.
    again = run_process(config, tmp_path / "again.log")
    try:
        assert wait_for(lambda: "metrics and status on" in (tmp_path / "again.log").read_text(),
                        timeout=60), (tmp_path / "again.log").read_text()
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0
