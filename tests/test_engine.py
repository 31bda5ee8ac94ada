"""The coordinator's single writer against a real SQLite state directory (no broker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedasync_iot.coordinator._engine import Engine, Incoming
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._rules import RuleConfig, build_rule
from fedasync_iot.coordinator._store import Store
from fedasync_iot.models import ModelSpec, StateError
from tests.helpers import update_bytes

SPEC = ModelSpec(kind="linear", n_features=3)  # 4 parameters: 3 weights + intercept
N = 4


def make_engine(state: Path, rule: RuleConfig | None = None, *, guards: GuardConfig | None = None,
                evaluator=None, clock=lambda: 1000.0) -> Engine:
    return Engine(Store(state), build_rule(rule or RuleConfig(name="fedasync", alpha=1.0,
                                                                staleness="constant")),
                  guards or GuardConfig(max_norm=100.0), spec=SPEC,
                  initial_params=lambda: np.zeros(N, dtype=np.float32), evaluator=evaluator,
                  clock=clock)


def incoming(payload: bytes, device: str | None = "dev-1") -> Incoming:
    return Incoming(device, payload, 1000.0)


def test_each_update_makes_a_version_with_lineage(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    outcomes = engine.process([incoming(update_bytes(np.ones(N), update_id="u1")),
                               incoming(update_bytes(np.ones(N), update_id="u2"))])

    assert [o.ack.status for o in outcomes] == ["accepted", "accepted"]
    assert [o.ack.version for o in outcomes] == [1, 2]
    assert [o.staleness for o in outcomes] == [0, 1]
    np.testing.assert_allclose(engine.params, 2 * np.ones(N))
    lineage = {r.update_id: r for r in engine.store.lineage()}
    assert (lineage["u1"].version, lineage["u2"].version) == (1, 2)
    assert lineage["u2"].staleness == 1
    assert [v.version for v in engine.store.versions()] == [0, 1, 2]


@pytest.mark.parametrize(("payload", "device", "reason"), [
    (b"garbage", "dev-1", "malformed"),
    (update_bytes(np.ones(N + 1)), "dev-1", "shape"),
    (update_bytes(np.array([1, np.nan, 0, 0])), "dev-1", "non_finite"),
    (update_bytes(np.ones(N), device="dev-2"), "dev-1", "device_mismatch"),
    (update_bytes(np.ones(N), base_version=7), "dev-1", "future_version"),
    (update_bytes(np.ones(N)), None, "bad_topic"),
])
def test_bad_updates_are_rejected_with_a_reason_and_change_nothing(
        tmp_path: Path, payload: bytes, device: str | None, reason: str) -> None:
    engine = make_engine(tmp_path)
    before = engine.params.copy()

    [outcome] = engine.process([incoming(payload, device)])

    assert outcome.ack.status == "rejected"
    assert outcome.ack.reason == reason
    assert engine.version == 0
    np.testing.assert_array_equal(engine.params, before)
    assert engine.store.current_version() == 0


def test_an_update_that_does_not_decode_is_acked_by_the_id_its_header_names(
        tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    good = update_bytes(np.ones(N), update_id="u-new")
    newer = good.replace(b'"schema":1', b'"schema":2')  # a newer major: unsupported_schema

    outcomes = engine.process([incoming(newer), incoming(good[:-4]), incoming(b"garbage")])

    assert [(o.ack.reason, o.ack.update_id) for o in outcomes] == [
        ("unsupported_schema", "u-new"), ("malformed", "u-new"), ("malformed", None)]


def test_a_base_ahead_of_the_model_is_not_yet_and_merges_once_the_model_reaches_it(
        tmp_path: Path) -> None:
    # A coordinator reset (or restored from an older backup) is behind its agents' updates:
    # their agents keep them and send them again later, which must not be a "duplicate".
    engine = make_engine(tmp_path)
    ahead = update_bytes(np.ones(N), base_version=1, update_id="ahead")

    [early] = engine.process([incoming(ahead)])
    engine.process([incoming(update_bytes(np.ones(N)))])
    [later] = engine.process([incoming(ahead)])

    assert (early.ack.reason, early.ack.update_id) == ("future_version", "ahead")
    assert later.ack.status == "accepted" and later.ack.version == 2
    assert [r.outcome for r in engine.store.lineage() if r.update_id == "ahead"] == ["accepted"]


def test_over_norm_rejected_or_clipped(tmp_path: Path) -> None:
    reject = make_engine(tmp_path / "r", guards=GuardConfig(max_norm=1.0, norm_policy="reject"))
    [o] = reject.process([incoming(update_bytes(np.full(N, 3.0)))])
    assert (o.ack.status, o.ack.reason) == ("rejected", "norm")

    clip = make_engine(tmp_path / "c", guards=GuardConfig(max_norm=1.0, norm_policy="clip"))
    [o] = clip.process([incoming(update_bytes(np.full(N, 3.0)))])
    assert o.ack.status == "accepted"
    assert np.linalg.norm(clip.params) == pytest.approx(1.0, rel=1e-5)
    assert clip.store.lineage()[0].clipped


def test_too_stale_is_rejected(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, guards=GuardConfig(max_norm=100.0, max_staleness=1))
    for v in range(3):
        engine.process([incoming(update_bytes(np.ones(N), base_version=v))])
    assert engine.version == 3

    [o] = engine.process([incoming(update_bytes(np.ones(N), base_version=1))])

    assert (o.ack.status, o.ack.reason) == ("rejected", "too_stale")
    assert o.staleness == 2


def test_duplicate_update_id_is_merged_once_in_and_across_batches(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    payload = update_bytes(np.ones(N), update_id="same")

    first = engine.process([incoming(payload), incoming(payload)])
    again = engine.process([incoming(payload)])

    assert [o.ack.status for o in first] == ["accepted", "duplicate"]
    assert again[0].ack.status == "duplicate"
    assert again[0].ack.version == 1
    assert engine.version == 1
    assert len(engine.store.lineage()) == 1


def test_restart_resumes_version_lineage_and_buffer(tmp_path: Path) -> None:
    rule = RuleConfig(name="fedbuff", buffer_size=3, staleness="constant")
    engine = make_engine(tmp_path, rule)
    engine.process([incoming(update_bytes(np.ones(N), update_id=f"a{i}")) for i in range(3)])
    engine.process([incoming(update_bytes(np.ones(N), base_version=1, update_id="b0"))])
    assert engine.version == 1
    assert len(engine.rule.pending()) == 1
    params = engine.params.copy()
    engine.store.close()

    resumed = make_engine(tmp_path, rule)

    assert resumed.version == 1
    np.testing.assert_array_equal(resumed.params, params)
    assert [c.update_id for c in resumed.rule.pending()] == ["b0"]
    resumed.process([incoming(update_bytes(np.ones(N), base_version=1, update_id=f"b{i}"))
                     for i in (1, 2)])
    assert resumed.version == 2
    lineage = {r.update_id: r for r in resumed.store.lineage()}
    assert lineage["b0"].outcome == "accepted" and lineage["b0"].version == 2
    assert lineage["a0"].version == 1


def test_fedbuff_acks_buffered_then_versions(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, RuleConfig(name="fedbuff", buffer_size=2,
                                              staleness="constant"))
    o1 = engine.process([incoming(update_bytes(np.ones(N)))])
    o2 = engine.process([incoming(update_bytes(3 * np.ones(N)))])
    assert (o1[0].ack.status, o1[0].ack.version) == ("buffered", None)
    assert (o2[0].ack.status, o2[0].ack.version) == ("accepted", 1)
    np.testing.assert_allclose(engine.params, 2 * np.ones(N))


def test_fedavg_round_closes_at_the_deadline(tmp_path: Path) -> None:
    now = [1000.0]
    engine = make_engine(tmp_path, RuleConfig(name="fedavg-sync", cohort_size=5, deadline_s=10,
                                              min_updates=2), clock=lambda: now[0])
    engine.process([incoming(update_bytes(np.ones(N), n_samples=1)),
                    incoming(update_bytes(4 * np.ones(N), n_samples=3))])
    assert engine.version == 0
    [late] = engine.process([incoming(update_bytes(np.ones(N), n_samples=1))])
    assert late.ack.status == "buffered"

    now[0] += 11
    assert engine.tick()
    assert engine.version == 1
    np.testing.assert_allclose(engine.params, (1 + 12 + 1) / 5 * np.ones(N))
    [stale] = engine.process([incoming(update_bytes(np.ones(N), base_version=0))])
    assert (stale.ack.status, stale.ack.reason) == ("rejected", "wrong_round")


def test_evaluation_is_recorded_per_version(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, evaluator=lambda p: {"loss": float(p.sum())})
    engine.process([incoming(update_bytes(np.ones(N)))])
    assert engine.store.version(1).metrics == {"loss": 4.0}


def test_rollback_republishes_an_old_model_as_a_new_version(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    for v in range(2):  # one batch each: only a batch's last version gets a checkpoint
        engine.process([incoming(update_bytes(np.ones(N), base_version=v))])

    version = engine.rollback(1)

    assert version == 3
    np.testing.assert_array_equal(engine.params, np.ones(N))
    assert engine.store.version(3).source == "rollback:1"
    np.testing.assert_array_equal(engine.store.load_checkpoint(3), np.ones(N))


def test_failed_commit_keeps_memory_equal_to_disk(tmp_path: Path, monkeypatch) -> None:
    engine = make_engine(tmp_path)
    engine.process([incoming(update_bytes(np.ones(N)))])

    def broken(*args, **kwargs):
        raise StateError("disk full")

    monkeypatch.setattr(engine.store, "commit", broken)  # a fault a real disk rarely gives
    with pytest.raises(StateError):
        engine.process([incoming(update_bytes(np.ones(N), base_version=1))])
    assert engine.version == 1
    np.testing.assert_array_equal(engine.params, np.ones(N))


def test_a_round_closed_by_its_deadline_whose_commit_fails_is_forgotten_then_closes(
        tmp_path: Path, monkeypatch) -> None:
    now = [1000.0]
    engine = make_engine(tmp_path, RuleConfig(name="fedavg-sync", cohort_size=5, deadline_s=10,
                                              min_updates=2), clock=lambda: now[0])
    engine.process([incoming(update_bytes(np.ones(N), n_samples=1)),
                    incoming(update_bytes(4 * np.ones(N), n_samples=3))])
    commit = engine.store.commit

    def broken(*args, **kwargs):
        raise StateError("disk full")

    monkeypatch.setattr(engine.store, "commit", broken)
    now[0] += 11
    with pytest.raises(StateError):
        engine.tick()
    # Memory equals disk: version 0, the round's two updates buffered again from the store.
    assert engine.version == 0
    np.testing.assert_array_equal(engine.params, np.zeros(N))

    monkeypatch.setattr(engine.store, "commit", commit)
    assert not engine.tick()  # the restored round's deadline is counted from now
    now[0] += 11
    assert engine.tick()
    assert engine.version == 1 == engine.store.current_version()
    np.testing.assert_allclose(engine.params, (1 + 12) / 4 * np.ones(N))


def test_orphan_checkpoint_from_a_crash_is_removed(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    engine.process([incoming(update_bytes(np.ones(N)))])
    orphan = engine.store.checkpoint_dir / "v0000000009.npy"
    np.save(orphan, np.zeros(N, dtype=np.float32))
    engine.store.close()

    resumed = make_engine(tmp_path)

    assert not orphan.exists()
    assert resumed.version == 1


def test_state_of_another_model_is_refused(tmp_path: Path) -> None:
    make_engine(tmp_path).store.close()
    with pytest.raises(StateError, match="another spec"):
        Engine(Store(tmp_path), build_rule(RuleConfig()), GuardConfig(),
               spec=ModelSpec(kind="linear", n_features=5),
               initial_params=lambda: np.zeros(6, dtype=np.float32))


def test_checkpoints_keep_the_newest_and_version_0_across_restarts(tmp_path: Path) -> None:
    def run(updates: int) -> Engine:
        engine = Engine(Store(tmp_path, keep_checkpoints=3),
                        build_rule(RuleConfig(name="fedasync", alpha=1.0)), GuardConfig(),
                        spec=SPEC, initial_params=lambda: np.zeros(N, dtype=np.float32))
        for _ in range(updates):
            engine.process([incoming(update_bytes(np.ones(N), base_version=engine.version))])
        return engine

    engine = run(7)
    assert engine.store.checkpointed_versions() == [0, 5, 6, 7]
    engine.store.close()
    engine = run(2)  # a restart lists the directory again, then keeps pruning
    assert engine.store.checkpointed_versions() == [0, 7, 8, 9]
    assert np.array_equal(engine.store.load_checkpoint(9), engine.params)
    engine.store.close()
