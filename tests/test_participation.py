"""Participation accounting and its correction: the pure math, the ledger, the rules' use of the
factor, the engine (cap, reweighting, restart) on real SQLite, and the service's surfaces."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedasync_iot.coordinator import cli as coordinator_cli
from fedasync_iot.coordinator._engine import Engine, Incoming
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._participation import (
    Ledger,
    ParticipationConfig,
    gini,
    max_median_ratio,
    participation_factor,
)
from fedasync_iot.coordinator._rules import (
    Contribution,
    FedAsync,
    FedBuff,
    RuleConfig,
    build_rule,
    default_staleness,
)
from fedasync_iot.coordinator._staleness import Staleness
from fedasync_iot.coordinator._store import Store
from fedasync_iot.models import ConfigError, ModelError, ModelSpec
from tests.helpers import update_bytes

SPEC = ModelSpec(kind="linear", n_features=3)
N = 4


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_engine(state: Path, participation: ParticipationConfig, clock: Clock,
                rule: RuleConfig | None = None) -> Engine:
    return Engine(Store(state), build_rule(rule or RuleConfig(name="fedasync", alpha=0.5,
                                                                staleness="constant")),
                  GuardConfig(max_norm=100.0), spec=SPEC,
                  initial_params=lambda: np.zeros(N, dtype=np.float32),
                  participation=participation, clock=clock)


def send(engine: Engine, device: str, clock: Clock, delta: float = 1.0, **kw):
    [outcome] = engine.process([Incoming(device, update_bytes(
        delta * np.ones(N), device=device, base_version=engine.version, **kw), clock.t)])
    return outcome


# -- the math ----------------------------------------------------------------------------------


def test_gini_matches_the_mean_absolute_difference_definition() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        x = rng.integers(0, 20, size=int(rng.integers(1, 12))).astype(float)
        if x.sum() == 0:
            continue
        n = len(x)
        brute = sum(abs(a - b) for a, b in combinations(x, 2)) * 2 / (2 * n * n * x.mean())
        assert gini(x) == pytest.approx(brute)


def test_gini_bounds() -> None:
    assert gini([5, 5, 5, 5]) == 0.0
    assert gini([0, 0, 0, 8]) == pytest.approx(3 / 4)  # (n-1)/n: one device does everything
    assert gini([]) == 0.0 and gini([0, 0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        gini([1, -1, 3])


def test_max_median_ratio() -> None:
    assert max_median_ratio([1, 2, 9]) == 4.5
    assert max_median_ratio([0, 0, 4, 4]) == 1.0  # silent devices have no share to compare
    assert max_median_ratio([0, 0]) is None


def test_participation_factor_evens_out_per_window_influence() -> None:
    # A device sending 4x the mean gets a quarter per update: the same total per window.
    assert participation_factor(8, 2) == pytest.approx(0.25)
    assert participation_factor(1, 2) == 1.0  # no boost by default
    assert participation_factor(1, 2, max_boost=4) == pytest.approx(2.0)
    assert participation_factor(2, 2) == 1.0
    assert participation_factor(100, 1, max_factor=4) == 0.25  # clipped both ways
    assert participation_factor(1, 100, max_boost=4) == 4.0
    assert participation_factor(8, 2, power=0.5) == pytest.approx(0.5)
    assert participation_factor(0, 2) == 1.0


@pytest.mark.parametrize("bad", [{"window_s": 0}, {"cap": -1}, {"cap": True},
                                 {"reweight": "yes"}, {"power": 9}, {"max_factor": 0.5},
                                 {"max_boost": 0.9},
                                 {"window_s": float("nan")}])
def test_config_refuses_nonsense(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ParticipationConfig(**bad)


# -- the ledger --------------------------------------------------------------------------------


def test_cap_counts_within_the_window_and_says_when_a_slot_frees() -> None:
    ledger = Ledger(ParticipationConfig(window_s=100, cap=2))
    assert ledger.retry_after("a", now=0) is None
    ledger.taken("a", now=0)
    ledger.taken("a", now=30)
    assert ledger.retry_after("b", now=31) is None  # per device
    wait = ledger.retry_after("a", now=40)
    assert wait == pytest.approx(60, abs=0.01)  # the update of t=0 leaves the window at 100
    assert ledger.retry_after("a", now=40 + wait) is None


def test_factor_uses_the_fleet_mean_over_active_devices() -> None:
    ledger = Ledger(ParticipationConfig(window_s=100, reweight=True, max_factor=10,
                                        max_boost=10))
    for t in range(6):
        ledger.taken("busy", now=t)
    ledger.taken("rare", now=6)
    # Window: busy 6, rare 1 (+ the arriving update). Mean over 2 devices = 8/2 = 4.
    assert ledger.factor("busy", now=7) == pytest.approx(4 / 7)
    assert ledger.factor("rare", now=7) == pytest.approx(4 / 2)
    assert ledger.factor("new", now=7) == pytest.approx((8 / 3) / 1)
    # Old admissions leave the window: at t=150 only nothing is left, so everyone is "mean".
    assert ledger.factor("busy", now=150) == 1.0
    assert Ledger(ParticipationConfig(reweight=False)).factor("x", now=0) == 1.0


def test_report_shares_gini_and_window() -> None:
    ledger = Ledger(ParticipationConfig(window_s=100))
    for i, (device, w) in enumerate([("a", 0.5), ("a", 0.5), ("a", 0.5), ("b", 0.5)]):
        ledger.taken(device, now=i)
        ledger.merged(device, now=i, weight=w, staleness=i, n_samples=10)
    ledger.rejected("c", "non_finite", now=5)
    report = ledger.report(now=10)
    rows = {r.device_id: r for r in report.devices}
    assert rows["a"].window_share == pytest.approx(0.75)
    assert rows["b"].window_share == pytest.approx(0.25)
    assert (rows["a"].accepted, rows["a"].samples, rows["a"].mean_staleness) == (3, 30, 1.0)
    assert rows["c"].rejected == 1 and rows["c"].window_updates == 0
    assert report.gini == pytest.approx(gini([3, 1, 0]))
    assert report.max_median_ratio == pytest.approx(1.5 / 1.0)
    assert report.active_devices == 2
    later = ledger.report(now=1000)  # the window has moved on; totals remain
    assert later.active_devices == 0 and {r.accepted for r in later.devices} == {3, 1, 0}


# -- the rules use the factor ------------------------------------------------------------------


def contribution(uid: str, *, p: float = 1.0, n: int = 10, staleness: int = 0) -> Contribution:
    return Contribution(update_id=uid, device_id="d", base_version=0, staleness=staleness,
                        n_samples=n, delta=np.ones(N, dtype=np.float32), participation=p)


def test_fedasync_multiplies_the_mixing_weight_and_caps_it_at_alpha() -> None:
    rule = FedAsync(alpha=0.5, staleness=Staleness(kind="polynomial", a=1.0))
    model = np.zeros(N, dtype=np.float32)
    # A frequent device's fresh update is weighed down: 0.5 * 1 * 0.5.
    assert rule.offer(model, contribution("u1", p=0.5), now=0).weights == (0.25,)
    # A rare device's update three versions stale (s = 1/4) is lifted toward the fresh step:
    # 0.5 * 0.25 * 2 instead of the plain 0.125...
    assert rule.offer(model, contribution("u2", p=2.0, staleness=3), now=0).weights == (0.25,)
    # ...but never past alpha, fresh (0.5 * 3) or stale (0.5 * 0.25 * 8).
    assert rule.offer(model, contribution("u3", p=3.0), now=0).weights == (0.5,)
    assert rule.offer(model, contribution("u4", p=8.0, staleness=3), now=0).weights == (0.5,)


@settings(derandomize=True, max_examples=200)
@given(alpha=st.floats(0.01, 1.0), p=st.floats(1e-3, 1e6), staleness=st.integers(0, 2000),
       memory=st.booleans())
def test_no_fedasync_step_exceeds_alpha_however_large_the_factor(
        alpha: float, p: float, staleness: int, memory: bool) -> None:
    rule = FedAsync(alpha=alpha, staleness=default_staleness("fedasync"),
                    memory_s=100.0 if memory else 0.0)
    model = np.zeros(N, dtype=np.float32)
    merge = rule.offer(model, contribution("u", p=p, staleness=staleness), now=0)
    assert merge.weights[0] * merge.scale <= alpha * (1 + 1e-12)
    assert float(np.abs(merge.params).max()) <= alpha * (1 + 1e-6)  # the delta is all ones


def test_fedbuff_keeps_the_factor_out_of_the_denominator() -> None:
    rule = FedBuff(buffer_size=2, server_lr=1.0, staleness=Staleness(kind="constant"))
    model = np.zeros(N, dtype=np.float32)
    assert rule.offer(model, contribution("u1", p=0.5), now=0) is None
    merge = rule.offer(model, contribution("u2", p=0.5), now=0)
    assert merge is not None
    # Both from over-represented devices: the buffer moves the model half as far.
    assert merge.weights == pytest.approx((0.25, 0.25))
    np.testing.assert_allclose(merge.params, 0.5 * np.ones(N))


def test_a_factor_of_one_is_the_plain_rule() -> None:
    model = np.zeros(N, dtype=np.float32)
    plain = FedBuff(buffer_size=2, server_lr=1.0, staleness=Staleness(kind="polynomial", a=0.5))
    plain.offer(model, contribution("u1", n=10, staleness=3), now=0)
    merge = plain.offer(model, contribution("u2", n=30), now=0)
    assert merge is not None
    # FedBuff's own weights: n_i s(t_i) / sum(n_i) (s damps the step, Nguyen et al. 2022)
    w = np.array([10 * 4 ** -0.5, 30.0])
    assert merge.weights == pytest.approx(tuple(w / 40.0))


def test_contribution_refuses_a_bad_factor() -> None:
    with pytest.raises(ModelError):
        contribution("u", p=0.0)


# -- the engine --------------------------------------------------------------------------------


def test_engine_caps_a_device_and_lets_it_back_after_the_window(tmp_path: Path) -> None:
    clock = Clock()
    engine = make_engine(tmp_path, ParticipationConfig(window_s=600, cap=2), clock)
    assert [send(engine, "fast", clock).ack.status for _ in range(2)] == ["accepted"] * 2
    clock.t += 60
    capped = send(engine, "fast", clock)
    assert (capped.ack.status, capped.ack.reason) == ("rejected", "participation_cap")
    assert capped.ack.retry_after_s == pytest.approx(540, abs=1)
    assert send(engine, "slow", clock).ack.status == "accepted"  # others are not held back
    assert engine.version == 3
    lineage = engine.store.lineage(device_id="fast")
    assert [r.reason for r in lineage] == [None, None, "participation_cap"]
    clock.t += 541
    assert send(engine, "fast", clock).ack.status == "accepted"


def test_the_cap_counts_arrival_times_not_when_the_engine_got_to_the_update(tmp_path: Path
                                                                           ) -> None:
    """As lineage records them, and as the ledger rebuilt from lineage counts them: an update
    that waited in the inbox (a busy batch) is not let in by its wait."""
    clock = Clock()
    engine = make_engine(tmp_path, ParticipationConfig(window_s=600, cap=2), clock)
    for t in (1000.0, 1001.0):
        clock.t = t
        assert send(engine, "a", clock).ack.status == "accepted"
    clock.t = 1700.0  # both out of the window by now, but not at the late update's arrival
    [late] = engine.process([Incoming("a", update_bytes(
        np.ones(N), device="a", base_version=engine.version), 1500.0)])
    assert (late.ack.reason, late.ack.retry_after_s) == ("participation_cap",
                                                         pytest.approx(100, abs=0.01))
    [(received_at, reason)] = [(r.received_at, r.reason) for r in engine.store.lineage()
                               if r.outcome == "rejected"]
    assert (received_at, reason) == (1500.0, "participation_cap")
    [taken] = engine.process([Incoming("a", update_bytes(
        np.ones(N), device="a", base_version=engine.version), 1600.5)])
    assert taken.ack.status == "accepted"  # 1000 left the window at 1600


def test_engine_reweights_frequent_devices_and_records_the_weight(tmp_path: Path) -> None:
    clock = Clock()
    engine = make_engine(tmp_path, ParticipationConfig(window_s=600, reweight=True, max_boost=4),
                         clock)
    for _ in range(3):
        send(engine, "fast", clock)
        clock.t += 1
    send(engine, "slow", clock)
    weights = {r.update_id: r.weight for r in engine.store.lineage()}
    fast = [r.weight for r in engine.store.lineage(device_id="fast")]
    [slow] = [r.weight for r in engine.store.lineage(device_id="slow")]
    # fast: 1st alone (factor 1), 2nd 2 vs mean 2 (1), 3rd 3 vs mean 3 (1); slow: 1 vs mean 2,
    # factor 2, its fresh update capped at alpha.
    assert fast == pytest.approx([0.5, 0.5, 0.5])
    assert slow == pytest.approx(min(0.5 * 2.0, 0.5))
    assert len(weights) == 4
    send(engine, "fast", clock)  # 4 vs mean (4+1)/2 = 2.5
    fourth = engine.store.lineage(device_id="fast")[-1].weight
    assert fourth == pytest.approx(0.5 * 2.5 / 4)
    assert slow / fourth == pytest.approx(1.6)  # the rare device weighs more than the frequent


def test_by_default_fedasync_reweights_and_fedbuff_does_not(tmp_path: Path) -> None:
    clock = Clock()
    # FedAsync: the rare device's factor 2 is capped at alpha, the frequent one's next update
    # (4 against a mean of 2.5) weighed down; FedBuff: every weight its plain 1.
    for rule, rare_weight, often_weight in (
            (RuleConfig(name="fedasync", alpha=0.2, staleness="constant"), 0.2, 0.2 * 2.5 / 4),
            (RuleConfig(name="fedbuff", buffer_size=1, staleness="constant",
                        weight_by_samples=False), 1.0, 1.0)):
        engine = make_engine(tmp_path / rule.name, ParticipationConfig(), clock, rule)
        assert engine.participation.reweight is (rule.name == "fedasync")
        for _ in range(3):
            send(engine, "often", clock)
            clock.t += 1
        send(engine, "rare", clock)  # 1 update against a mean of 2 per device in the window
        [rare] = [r.weight for r in engine.store.lineage(device_id="rare")]
        assert rare == pytest.approx(rare_weight)
        send(engine, "often", clock)
        assert engine.store.lineage(device_id="often")[-1].weight == pytest.approx(often_weight)
        engine.store.close()


def test_ledger_is_rebuilt_from_lineage_after_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    config = ParticipationConfig(window_s=600, cap=3)
    rule = RuleConfig(name="fedbuff", buffer_size=2, staleness="constant")
    engine = make_engine(tmp_path, config, clock, rule)
    for device in ("a", "a", "b", "a", "c"):
        send(engine, device, clock)
        clock.t += 10
    send(engine, "a", clock)  # capped
    send(engine, "b", clock, delta=float("nan"))  # rejected: non_finite
    before = engine.ledger.report(now=clock.t)
    engine.store.close()

    again = make_engine(tmp_path, config, clock, rule)
    after = again.ledger.report(now=clock.t)
    assert after == before
    assert {r.device_id: r.capped for r in after.devices} == {"a": 1, "b": 0, "c": 0}
    assert send(again, "a", clock).ack.reason == "participation_cap"  # the cap survived


def test_buffered_factors_survive_a_restart_and_old_state_migrates(tmp_path: Path) -> None:
    clock = Clock()
    config = ParticipationConfig(window_s=600, reweight=True)
    rule = RuleConfig(name="fedbuff", buffer_size=3, staleness="constant")
    engine = make_engine(tmp_path / "new", config, clock, rule)
    send(engine, "a", clock)
    send(engine, "a", clock)
    factors = [c.participation for c in engine.rule.pending()]
    engine.store.close()
    assert [c.participation for c in make_engine(tmp_path / "new", config, clock, rule)
            .rule.pending()] == factors

    # A state directory from before the column existed: its buffer restores with factor 1.
    old = tmp_path / "old"
    make_engine(old, ParticipationConfig(), clock, rule).store.close()
    with sqlite3.connect(old / "state.db") as db:
        db.execute("DROP TABLE pending")
        db.execute("CREATE TABLE pending (seq INTEGER PRIMARY KEY AUTOINCREMENT, update_id TEXT "
                   "NOT NULL UNIQUE, device_id TEXT NOT NULL, base_version INTEGER NOT NULL, "
                   "staleness INTEGER NOT NULL, n_samples INTEGER NOT NULL, delta BLOB NOT NULL)")
        db.execute("INSERT INTO pending(update_id, device_id, base_version, staleness, "
                   "n_samples, delta) VALUES ('u0', 'a', 0, 0, 5, ?)",
                   (np.ones(N, dtype="<f4").tobytes(),))
    [restored] = make_engine(old, config, clock, rule).rule.pending()
    assert (restored.update_id, restored.participation) == ("u0", 1.0)


def test_devices_command_prints_the_table_and_json(tmp_path: Path, capsys) -> None:
    clock = Clock(t=__import__("time").time())
    engine = make_engine(tmp_path, ParticipationConfig(), clock)
    for device in ("pi-kitchen", "pi-kitchen", "pi-garage"):
        send(engine, device, clock)
    engine.store.close()
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path}"\n[model]\nkind = "linear"\nn_features = 3\n')

    assert coordinator_cli.main(["devices", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("pi-kitchen")  # largest share first
    assert "2 devices seen, 2 active" in out and "Gini 0.167" in out

    assert coordinator_cli.main(["devices", "--config", str(config), "--json",
                                 "--sort", "device"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["device_id"] for d in data["devices"]] == ["pi-garage", "pi-kitchen"]
    assert [d["accepted"] for d in data["devices"]] == [1, 2]
    assert data["gini"] == pytest.approx(gini([2, 1]), abs=1e-4)


def test_devices_command_without_state_says_so(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path / "none"}"\n[model]\nkind = "linear"\n'
                      'n_features = 3\n')
    assert coordinator_cli.main(["devices", "--config", str(config)]) == 2
    assert "no state in" in capsys.readouterr().err


# -- the service's surfaces --------------------------------------------------------------------


@pytest.mark.broker
def test_status_devices_and_metrics_over_http(broker, fleet_name, tmp_path: Path) -> None:
    from tests.test_coordinator_service import Device, make_service
    from tests.test_coordinator_service import N as SN

    service = make_service(broker, fleet_name, tmp_path,
                           participation=ParticipationConfig(window_s=3600, cap=2))
    dev = Device(broker, fleet_name, "dev-a")
    try:
        assert [dev.send(update_bytes(0.01 * np.ones(SN), device="dev-a")).status
                for _ in range(3)] == ["accepted", "accepted", "rejected"]
        base = f"http://127.0.0.1:{service.http_port}"
        status = json.loads(urllib.request.urlopen(f"{base}/status", timeout=30).read())
        assert status["participation"]["active_devices"] == 1
        devices = json.loads(urllib.request.urlopen(f"{base}/devices", timeout=30).read())
        [row] = devices["devices"]
        assert (row["device_id"], row["accepted"], row["capped"]) == ("dev-a", 2, 1)
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
        assert 'fedasync_device_updates_capped_total{device="dev-a"} 1.0' in metrics
        assert "fedasync_participation_gini 0.0" in metrics
    finally:
        dev.close()
        service.stop()


def test_agent_backs_off_when_the_coordinator_asks(tmp_path: Path) -> None:
    from fedasync_iot.agent._agent import Agent
    from fedasync_iot.agent._config import AgentConfig
    from fedasync_iot.agent._policy import PolicyConfig
    from fedasync_iot.agent._readings import StaticReader
    from fedasync_iot.models import Ack, encode_ack
    from tests.test_agent import _snapshot, readings

    class Link:
        connected = False

        def publish(self, *a, **k) -> None:
            pass

    now = Clock(t=0.0)
    agent = Agent(AgentConfig(device_id="pi-1", state_dir=str(tmp_path), min_new_samples=0,
                              min_train_interval_s=0.0, policy=PolicyConfig(min_dwell_s=0.0),
                              train_in_subprocess=False),
                  link=Link(), reader=StaticReader(readings()), data=None,  # type: ignore[arg-type]
                  monotonic=now)
    agent.snapshot = _snapshot()
    decision = agent.check()
    assert agent.should_train(decision)
    agent.on_ack(encode_ack(Ack(update_id="u1", status="rejected", reason="participation_cap",
                                retry_after_s=300.0)))
    assert not agent.should_train(decision)
    assert agent.status()["backoff_s"] == 300.0
    now.t = 301.0
    assert agent.should_train(decision) and agent.status()["backoff_s"] == 0.0


# -- FedBuff with a per-device memory ----------------------------------------------------------


def mem_contribution(uid: str, device: str, delta: float, *, base: int, version: int,
                     n: int = 10, p: float = 1.0) -> Contribution:
    return Contribution(update_id=uid, device_id=device, base_version=base,
                        staleness=version - base, n_samples=n,
                        delta=np.full(N, delta, dtype=np.float32), participation=p)


def test_memory_keeps_a_rare_device_in_every_merge_until_it_expires() -> None:
    rule = FedBuff(buffer_size=1, server_lr=1.0, staleness=Staleness(kind="constant"),
                   memory_s=100.0)
    x = np.zeros(N, dtype=np.float32)
    m1 = rule.offer(x, mem_contribution("r1", "rare", 4.0, base=0, version=0), now=0)
    assert m1 is not None and m1.weights == (1.0,)
    np.testing.assert_allclose(m1.params, 4.0)
    # The frequent device's update is merged together with the rare one's last update.
    m2 = rule.offer(m1.params, mem_contribution("f1", "fast", 0.0, base=1, version=1), now=50)
    assert m2 is not None and m2.included[0].update_id == "f1"
    assert m2.weights == (0.5,)  # its share of the merge; the rest is the remembered update
    np.testing.assert_allclose(m2.params, 4.0 + 2.0)
    # A newer update of a device replaces its old one; past memory_s the rare one is gone.
    m3 = rule.offer(m2.params, mem_contribution("f2", "fast", 1.0, base=2, version=2), now=99)
    np.testing.assert_allclose(m3.params, 6.0 + (4.0 + 1.0) / 2)
    m4 = rule.offer(m3.params, mem_contribution("f3", "fast", 1.0, base=3, version=3), now=101)
    np.testing.assert_allclose(m4.params, m3.params + 1.0)


def test_memory_weights_remembered_updates_by_their_staleness_now() -> None:
    poly = Staleness(kind="polynomial", a=1.0)  # s(t) = 1 / (1 + t)
    rule = FedBuff(buffer_size=1, server_lr=1.0, staleness=poly, memory_s=1e6)
    x = np.zeros(N, dtype=np.float32)
    x = rule.offer(x, mem_contribution("a", "old", 3.0, base=0, version=0), now=0).params
    merge = rule.offer(x, mem_contribution("b", "new", 0.0, base=3, version=3), now=1)
    # "old" is 3 versions behind now: weight 1/4 against "new"'s 1.
    assert merge.weights == pytest.approx((1 / 1.25,))
    np.testing.assert_allclose(merge.params, x + 3.0 * 0.25 / 1.25, rtol=1e-6)


def test_a_failed_memory_merge_changes_nothing() -> None:
    rule = FedBuff(buffer_size=1, server_lr=1.0, staleness=Staleness(kind="constant"),
                   memory_s=100.0)
    x = np.zeros(N, dtype=np.float32)
    x = rule.offer(x, mem_contribution("a", "d1", 1.0, base=0, version=0), now=0).params
    huge = mem_contribution("b", "d2", 3e38, base=1, version=1)
    with pytest.raises(ModelError):
        rule.offer(np.full(N, 3e38, dtype=np.float32), huge, now=1)
    assert rule.pending() == ()
    merge = rule.offer(x, mem_contribution("c", "d3", 1.0, base=1, version=1), now=2)
    assert {c.update_id for c in merge.included} == {"c"}
    np.testing.assert_allclose(merge.params, x + 1.0)  # d2's update was never remembered


def test_memory_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="memory_s"):
        RuleConfig(name="fedbuff", memory_s=-1.0)
    assert build_rule(RuleConfig(name="fedbuff", memory_s=60.0)).memory_s == 60.0  # type: ignore[attr-defined]


def test_fedasync_with_memory_steps_along_the_devices_mean() -> None:
    rule = FedAsync(alpha=0.5, staleness=Staleness(kind="constant"), memory_s=100.0)
    x = np.zeros(N, dtype=np.float32)
    m1 = rule.offer(x, mem_contribution("r1", "rare", 4.0, base=0, version=0), now=0)
    np.testing.assert_allclose(m1.params, 2.0)  # alone in memory: the plain FedAsync step
    m2 = rule.offer(m1.params, mem_contribution("f1", "fast", 0.0, base=1, version=1), now=50)
    np.testing.assert_allclose(m2.params, 2.0 + 0.5 * (4.0 + 0.0) / 2)
    assert m2.weights == (0.25,)  # a_t times its share of the mean
    m3 = rule.offer(m2.params, mem_contribution("f2", "fast", 2.0, base=2, version=2), now=120)
    np.testing.assert_allclose(m3.params, m2.params + 0.5 * 2.0)  # the rare one expired


def test_fedasync_with_memory_caps_a_boosted_step_at_alpha_keeping_the_ratios() -> None:
    rule = FedAsync(alpha=0.5, staleness=Staleness(kind="constant"), memory_s=100.0)
    x = np.zeros(N, dtype=np.float32)
    # Alone in memory with factor 4: 0.5 * 4 = 2 deltas uncapped, alpha = 0.5 capped.
    m1 = rule.offer(x, mem_contribution("r1", "rare", 4.0, base=0, version=0, p=4.0), now=0)
    assert m1.weights == (0.5,)
    np.testing.assert_allclose(m1.params, 2.0)
    # With a plain device: shares 4/2 and 1/2 (2.5 x 0.5 = 1.25 in all) scaled to 0.5 in all,
    # 0.4 and 0.1: the rare device still weighs 4x the other.
    m2 = rule.offer(m1.params, mem_contribution("f1", "fast", 0.0, base=1, version=1), now=50)
    assert m2.weights == pytest.approx((0.1,))
    np.testing.assert_allclose(m2.params, 2.0 + 0.4 * 4.0)
