"""Staleness functions and merge rules against hand-computed values."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedasync_iot.coordinator._config import load_config
from fedasync_iot.coordinator._rules import (
    Contribution,
    FedAsync,
    FedAvgSync,
    FedBuff,
    Merge,
    RuleConfig,
    build_rule,
    default_staleness,
)
from fedasync_iot.coordinator._staleness import Staleness
from fedasync_iot.models import ConfigError, InvalidUpdate, ModelError, StateError

CONSTANT = Staleness(kind="constant")


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def contrib(delta: np.ndarray, *, uid: str = "u", device: str = "d", staleness: int = 0,
            n: int = 1, base: int = 0) -> Contribution:
    return Contribution(update_id=uid, device_id=device, base_version=base, staleness=staleness,
                        n_samples=n, delta=delta)


def moved(merge: Merge, model: np.ndarray) -> np.ndarray:
    """What the merge's record says happened: model + scale * sum(w_i delta_i)."""
    step = sum(w * c.delta.astype(np.float64)
               for w, c in zip(merge.weights, merge.included, strict=True))
    return model.astype(np.float64) + merge.scale * step


# --- staleness functions --------------------------------------------------------------------

@pytest.mark.parametrize(("s", "t", "expected"), [
    (CONSTANT, 0, 1.0), (CONSTANT, 1000, 1.0),
    (Staleness(kind="polynomial", a=0.5), 0, 1.0),
    (Staleness(kind="polynomial", a=0.5), 3, 0.5),  # 4^-0.5
    (Staleness(kind="polynomial", a=2.0), 9, 0.01),  # 10^-2
    (Staleness(kind="hinge", a=10, b=4), 0, 1.0),
    (Staleness(kind="hinge", a=10, b=4), 4, 1.0),
    (Staleness(kind="hinge", a=10, b=4), 5, 1 / 11),
    (Staleness(kind="hinge", a=10, b=4), 6, 1 / 21),
    (Staleness(kind="knee", a=0.5, b=8), 0, 1.0),
    (Staleness(kind="knee", a=0.5, b=8), 3, 0.5),  # 4^-0.5, below the knee
    (Staleness(kind="knee", a=0.5, b=8), 8, 1 / 3),  # 9^-0.5, at it
    (Staleness(kind="knee", a=0.5, b=8), 11, 0.25),  # 9^0.5 / 12
    (Staleness(kind="knee", a=0.5, b=8), 299, 0.01),  # 3 / 300
    (Staleness(kind="knee", a=1.0, b=3), 9, 0.1),  # a = 1: 1 / (1 + t) on both sides
])
def test_staleness_values(s: Staleness, t: int, expected: float) -> None:
    assert s(t) == pytest.approx(expected, rel=1e-12)
    assert s.log(t) == pytest.approx(math.log(expected), abs=1e-12)


def test_staleness_log_stays_finite_where_the_value_underflows() -> None:
    s = Staleness(kind="polynomial", a=1000.0)

    assert s(10**6) == 0.0
    assert s.log(10**6) == pytest.approx(-1000 * math.log1p(10**6))


@pytest.mark.parametrize("b", [0, 3, 8, 50])
def test_knee_caps_the_steps_of_a_staleness_window(b: int) -> None:
    """t s(t), the summed step of the t updates that arrive while one device trains, grows as
    sqrt(1 + t) up to the knee and stays under sqrt(1 + b) beyond it; s never increases."""
    s = Staleness(kind="knee", a=0.5, b=b)
    values = [s(t) for t in range(2000)]

    assert all(x >= y for x, y in itertools.pairwise(values))
    assert all(t * v <= math.sqrt(1 + b) + 1e-12 for t, v in enumerate(values))
    assert 1999 * values[1999] == pytest.approx(math.sqrt(1 + b), rel=1e-3)


def test_negative_staleness_is_a_future_version() -> None:
    with pytest.raises(InvalidUpdate) as info:
        Staleness(kind="polynomial")(-1)

    assert info.value.reason == "future_version"


@pytest.mark.parametrize(("text", "expected"), [
    ("constant", CONSTANT),
    (" polynomial : 0.5 ", Staleness(kind="polynomial", a=0.5)),
    ("polynomial", Staleness(kind="polynomial")),
    ("polynomial:2", Staleness(kind="polynomial", a=2.0)),
    ("hinge:10,4", Staleness(kind="hinge", a=10.0, b=4)),
    ("hinge:0.5, 0", Staleness(kind="hinge", a=0.5, b=0)),
    ("hinge", Staleness(kind="hinge")),
    ("knee:0.5,8", Staleness(kind="knee", a=0.5, b=8)),
    ("knee", Staleness(kind="knee")),
])
def test_parse_good(text: str, expected: Staleness) -> None:
    parsed = Staleness.parse(text)

    assert parsed == expected
    assert Staleness.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", [
    "", "linear", "Constant", "constant:1", "polynomial:", "polynomial:x", "polynomial:0",
    "polynomial:-1", "polynomial:nan", "polynomial:inf", "hinge:10", "hinge:10,4.5",
    "hinge:10,-1", "hinge:0,4", "hinge:10,4,2", "knee:0.5", "knee:0.5,-1", "knee:0,8", 3,
])
def test_parse_bad(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Staleness.parse(text)

    assert info.value.key == "staleness"


# --- FedAsync ---------------------------------------------------------------------------------

def test_fedasync_hand_value() -> None:
    model, delta = f32(1, 2), f32(2, -2)
    rule = FedAsync(alpha=0.5, staleness=Staleness(kind="polynomial", a=0.5))

    merge = rule.offer(model, contrib(delta, staleness=3), now=0.0)

    np.testing.assert_allclose(merge.params, [1.5, 1.5], rtol=1e-7)  # a_t = 0.5 * 4^-0.5
    assert merge.weights == pytest.approx((0.25,))
    assert merge.scale == 1.0
    assert merge.params.dtype == np.float32
    assert rule.pending() == ()
    assert rule.poll(model, now=1.0) is None
    np.testing.assert_array_equal(model, [1, 2])  # inputs untouched
    np.testing.assert_array_equal(delta, [2, -2])


def test_fedasync_fresh_update_equals_paper_mixing() -> None:
    x, x_local, a = f32(1, -3, 0.5), f32(2, 1, 0.25), 0.6
    rule = FedAsync(alpha=a, staleness=CONSTANT)

    merge = rule.offer(x, contrib(x_local - x), now=0.0)

    np.testing.assert_allclose(merge.params, (1 - a) * x + a * x_local, rtol=1e-6)


def test_fedasync_merges_a_buffer_restored_from_another_rule_on_poll() -> None:
    model = f32(0, 0)
    rule = FedAsync(alpha=0.5, staleness=Staleness(kind="polynomial", a=1.0))
    rule.restore([contrib(f32(2, 0), uid="a", staleness=0),
                  contrib(f32(0, 4), uid="b", staleness=1)], now=0)

    merge = rule.poll(model, now=0)

    assert merge is not None
    assert merge.weights == pytest.approx((0.5, 0.25))
    np.testing.assert_allclose(merge.params, [1.0, 1.0])
    np.testing.assert_allclose(merge.params, moved(merge, model))
    assert rule.pending() == ()


@given(arrays(np.float32, 5, elements=st.floats(-1e3, 1e3, width=32)),
       arrays(np.float32, 5, elements=st.floats(-1e3, 1e3, width=32)),
       st.integers(0, 100))
def test_fedasync_alpha_one_constant_adds_the_delta(model: np.ndarray, delta: np.ndarray,
                                                    staleness: int) -> None:
    rule = FedAsync(alpha=1.0, staleness=CONSTANT)

    merge = rule.offer(model, contrib(delta, staleness=staleness), now=0.0)

    np.testing.assert_array_equal(
        merge.params, (model.astype(np.float64) + delta).astype(np.float32))


# --- FedBuff ----------------------------------------------------------------------------------

def _fedbuff(k: int = 3, *, by_samples: bool = True) -> FedBuff:
    return FedBuff(buffer_size=k, server_lr=0.5, staleness=Staleness(kind="polynomial", a=1.0),
                   weight_by_samples=by_samples)


def _three() -> list[Contribution]:
    # s(t) = 1/(1+t): w = 2*1, 1*(1/2), 3*(1/4) -> 2, 0.5, 0.75 (sum 3.25)
    return [contrib(f32(1, 0), uid="a", n=2, staleness=0),
            contrib(f32(0, 4), uid="b", n=1, staleness=1),
            contrib(f32(-2, 2), uid="c", n=3, staleness=3)]


def test_fedbuff_waits_for_k_then_merges_hand_value() -> None:
    model, rule = f32(10, 20), _fedbuff()
    a, b, c = _three()

    first, second = rule.offer(model, a, now=0), rule.offer(model, b, now=1)
    merge = rule.offer(model, c, now=2)

    assert first is None and second is None
    assert merge is not None
    # sum w_i d_i = 2*(1,0) + 0.5*(0,4) + 0.75*(-2,2) = (0.5, 3.5); / sum(n_i) = 6; * 0.5
    # (Nguyen et al.'s form: s(t) damps the step; it is not normalised away)
    np.testing.assert_allclose(merge.params, [10 + 0.25 / 6, 20 + 1.75 / 6], rtol=1e-7)
    assert merge.weights == pytest.approx((2 / 6, 0.5 / 6, 0.75 / 6))
    assert merge.scale == 0.5
    assert merge.included == (a, b, c)
    assert rule.pending() == ()


def test_fedbuff_without_sample_weights() -> None:
    model, rule = f32(0, 0), _fedbuff(by_samples=False)

    merges = [rule.offer(model, c, now=0) for c in _three()]

    assert merges[-1] is not None  # w = 1, 0.5, 0.25 over 3 updates
    assert merges[-1].weights == pytest.approx((1 / 3, 0.5 / 3, 0.25 / 3))
    np.testing.assert_allclose(merges[-1].params, [0.5 * 0.5 / 3, 0.5 * 2.5 / 3], rtol=1e-7)


def test_fedbuff_pending_restore_round_trip_gives_the_same_merge() -> None:
    model, a, b, c = f32(10, 20), *_three()
    original = _fedbuff()
    original.offer(model, a, now=0)
    original.offer(model, b, now=1)
    restarted = _fedbuff()

    restarted.restore(original.pending(), now=5)

    assert restarted.pending() == (a, b)
    assert restarted.poll(model, now=5) is None
    m1, m2 = original.offer(model, c, now=6), restarted.offer(model, c, now=6)
    assert m1 is not None and m2 is not None
    np.testing.assert_array_equal(m1.params, m2.params)
    assert m1.weights == m2.weights


def test_fedbuff_restore_into_smaller_buffer_merges_all_on_poll() -> None:
    model, rule = f32(0, 0), _fedbuff(k=2)
    rule.restore(_three(), now=0)

    merge = rule.poll(model, now=0)

    assert merge is not None and len(merge.included) == 3
    assert rule.pending() == ()


def test_fedbuff_hopelessly_stale_buffer_leaves_the_model_in_place() -> None:
    # s(t) underflows to 0 for both: no 0/0, the model stays where it was
    rule = FedBuff(buffer_size=2, server_lr=1.0, staleness=Staleness(kind="polynomial", a=1000))
    rule.offer(f32(0), contrib(f32(1), uid="a", staleness=10**6), now=0)

    merge = rule.offer(f32(0), contrib(f32(3), uid="b", staleness=10**6), now=0)

    assert merge is not None
    assert merge.weights == (0.0, 0.0)
    np.testing.assert_array_equal(merge.params, [0.0])


def test_fedbuff_rejects_duplicates_and_wrong_shapes_without_buffering() -> None:
    model, rule = f32(0, 0), _fedbuff()
    rule.offer(model, contrib(f32(1, 1), uid="a"), now=0)

    with pytest.raises(InvalidUpdate) as dup:
        rule.offer(model, contrib(f32(1, 1), uid="a"), now=0)
    with pytest.raises(InvalidUpdate) as shape:
        rule.offer(model, contrib(f32(1, 1, 1), uid="b"), now=0)

    assert (dup.value.reason, shape.value.reason) == ("duplicate", "shape")
    assert [c.update_id for c in rule.pending()] == ["a"]


def test_restore_is_all_or_nothing() -> None:
    rule = _fedbuff()
    rule.restore([contrib(f32(1, 1), uid="a")], now=0)

    with pytest.raises(StateError):
        rule.restore([contrib(f32(1, 1), uid="x"), contrib(f32(1, 1), uid="x")], now=0)
    with pytest.raises(StateError):
        rule.restore([contrib(f32(1, 1), uid="x"), contrib(f32(1), uid="y")], now=0)

    assert [c.update_id for c in rule.pending()] == ["a"]


def test_non_finite_merge_raises_and_keeps_the_buffer() -> None:
    model, rule = f32(3e38), _fedbuff(k=2)
    rule.offer(model, contrib(f32(1e38), uid="a"), now=0)

    with pytest.raises(ModelError):
        rule.offer(model, contrib(f32(1e38), uid="b"), now=0)

    assert [c.update_id for c in rule.pending()] == ["a"]


@given(arrays(np.float32, 4, elements=st.floats(-1e3, 1e3, width=32)),
       arrays(np.float32, 4, elements=st.floats(-10, 10, width=32)),
       st.lists(st.tuples(st.integers(1, 1000), st.integers(0, 20)), min_size=1, max_size=6),
       st.floats(0.01, 10))
def test_fedbuff_equal_deltas_move_by_eta_mean_s_delta(model: np.ndarray, delta: np.ndarray,
                                                       arrivals: list[tuple[int, int]],
                                                       eta: float) -> None:
    rule = FedBuff(buffer_size=len(arrivals), server_lr=eta,
                   staleness=Staleness(kind="hinge", a=10, b=4))

    merges = [rule.offer(model, contrib(delta, uid=str(i), n=n, staleness=t), now=0)
              for i, (n, t) in enumerate(arrivals)]

    assert merges[:-1] == [None] * (len(arrivals) - 1)
    final = merges[-1]
    assert final is not None
    # the sample-weighted mean of s(t_i): 1 for a fresh buffer, less for a stale one
    s = Staleness(kind="hinge", a=10, b=4)
    damping = sum(n * s(t) for n, t in arrivals) / sum(n for n, _ in arrivals)
    assert sum(final.weights) == pytest.approx(damping)
    expected = model.astype(np.float64) + eta * damping * delta.astype(np.float64)
    np.testing.assert_allclose(final.params, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(final.params, moved(final, model), rtol=1e-6, atol=1e-4)


# --- FedAvgSync -------------------------------------------------------------------------------

def _fedavg(cohort: int = 3, *, min_updates: int = 2, deadline: float = 10.0) -> FedAvgSync:
    return FedAvgSync(cohort_size=cohort, deadline_s=deadline, min_updates=min_updates)


def test_fedavg_equals_sample_weighted_mean_of_client_models() -> None:
    model, rule = f32(1, -1, 0.5), _fedavg()
    deltas = [f32(0.5, 0.25, -1), f32(-2, 1, 0), f32(0.125, 3, 2)]
    ns = [10, 30, 60]

    out = [rule.offer(model, contrib(d, uid=str(i), device=str(i), n=n), now=i)
           for i, (d, n) in enumerate(zip(deltas, ns, strict=True))]

    assert out[0] is None and out[1] is None
    merge = out[2]
    assert merge is not None  # closed at cohort_size, no deadline needed
    expected = np.average([model + d for d in deltas], axis=0, weights=ns)
    np.testing.assert_allclose(merge.params, expected, rtol=1e-6)
    assert merge.weights == pytest.approx((0.1, 0.3, 0.6))
    assert rule.pending() == ()


def test_fedavg_accepts_only_the_current_round() -> None:
    model, rule = f32(0), _fedavg()
    rule.offer(model, contrib(f32(1), uid="a", device="d1"), now=0)

    with pytest.raises(InvalidUpdate) as info:
        rule.offer(model, contrib(f32(1), uid="b", device="d2", base=4, staleness=1), now=1)

    assert info.value.reason == "wrong_round"
    assert rule.accepts(4, 5) == "wrong_round"
    assert rule.accepts(5, 5) is None
    assert rule.accepts(6, 5) is None  # left to the guards' "future_version"
    assert [c.update_id for c in rule.pending()] == ["a"]


def test_async_rules_accept_any_base_version() -> None:
    for rule in (FedAsync(alpha=0.5, staleness=CONSTANT), _fedbuff()):
        assert rule.accepts(0, 7) is None


def test_fedavg_closes_at_deadline_via_poll_with_min_updates() -> None:
    model, rule = f32(0), _fedavg()
    rule.start_round(100.0)
    rule.offer(model, contrib(f32(1), uid="a", device="1", n=1), now=101)
    rule.offer(model, contrib(f32(4), uid="b", device="2", n=3), now=102)

    early = rule.poll(model, now=109.9)
    merge = rule.poll(model, now=110.0)

    assert early is None
    assert merge is not None
    np.testing.assert_allclose(merge.params, [(1 * 1 + 3 * 4) / 4])
    assert rule.next_deadline() == 120.0  # the next round starts with the merge


def test_fedavg_below_min_updates_restarts_the_clock_keeping_updates() -> None:
    model, rule = f32(0), _fedavg()
    rule.restore([], now=0.0)
    rule.offer(model, contrib(f32(1), uid="a", device="1"), now=5)

    missed = rule.poll(model, now=12.0)

    assert missed is None
    assert [c.update_id for c in rule.pending()] == ["a"]
    assert rule.next_deadline() == 22.0
    assert rule.offer(model, contrib(f32(3), uid="b", device="2"), now=15) is None
    merge = rule.poll(model, now=22.0)
    assert merge is not None
    np.testing.assert_allclose(merge.params, [2.0])


def test_fedavg_clock_starts_at_first_offer_when_not_started() -> None:
    model, rule = f32(0), _fedavg(min_updates=1)

    assert rule.next_deadline() is None
    rule.offer(model, contrib(f32(1), uid="a"), now=50)

    assert rule.next_deadline() == 60
    assert rule.poll(model, now=59) is None
    assert rule.poll(model, now=60) is not None


@dataclass(frozen=True)
class StoredRecord:  # the shape of the store's pending rows
    update_id: str
    device_id: str
    base_version: int
    staleness: int
    n_samples: int
    delta: np.ndarray


def test_fedavg_restore_restarts_the_round_and_checks_pending() -> None:
    rule = _fedavg()

    rule.restore([StoredRecord("a", "1", 3, 0, 5, f32(1))], now=7)

    assert rule.pending() == (contrib(f32(1), uid="a", device="1", base=3, n=5),)

    assert rule.next_deadline() == 17
    with pytest.raises(StateError):
        rule.restore([contrib(f32(1), uid="b", device="2", staleness=2)], now=8)
    with pytest.raises(StateError):  # invalid as a Contribution
        rule.restore([StoredRecord("c", "3", 3, 0, 0, f32(1))], now=8)
    assert [c.update_id for c in rule.pending()] == ["a"]


# --- contributions, config and factory --------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"staleness": -1}, "future_version"), ({"n": 0}, "n_samples"), ({"n": 2**53 + 1}, "n_samples"),
])
def test_contribution_validation(kwargs: dict[str, int], reason: str) -> None:
    with pytest.raises(InvalidUpdate) as info:
        contrib(f32(1), **kwargs)  # type: ignore[arg-type]

    assert info.value.reason == reason


def test_contribution_needs_a_flat_delta() -> None:
    with pytest.raises(InvalidUpdate) as info:
        contrib(np.zeros((2, 2), np.float32))

    assert info.value.reason == "shape"


@pytest.mark.parametrize(("key", "value"), [
    ("name", "fedprox"), ("alpha", 0.0), ("alpha", 1.5), ("alpha", float("nan")),
    ("buffer_size", 0), ("buffer_size", 2.0), ("buffer_size", True), ("server_lr", 0.0),
    ("server_lr", float("inf")), ("cohort_size", 0), ("deadline_s", 0), ("deadline_s", -1.0),
    ("min_updates", 0), ("min_updates", 11), ("weight_by_samples", 1), ("staleness", "linear"),
    ("staleness", 3),
])
def test_rule_config_rejects_bad_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        RuleConfig(**{key: value})  # type: ignore[arg-type]

    assert info.value.key == key


@pytest.mark.parametrize(("name", "expected"), [
    ("fedasync", Staleness(kind="knee", a=0.5, b=8)),
    ("fedbuff", Staleness(kind="knee", a=0.5, b=2)),
])
def test_rule_config_default_staleness_caps_a_round_near_1_8_steps(
        name: str, expected: Staleness) -> None:
    config = RuleConfig(name=name)  # type: ignore[arg-type]
    step = config.alpha if name == "fedasync" else config.server_lr
    t = 10**6

    assert config.staleness == config.staleness_function == expected
    assert step * t * expected(t) == pytest.approx(1.8, abs=0.08)
    explicit = RuleConfig(name=name, staleness="polynomial:1.0")  # type: ignore[arg-type]
    assert explicit.staleness == Staleness(kind="polynomial", a=1.0)


def test_service_config_without_staleness_gets_the_default_of_the_rule_it_names(
        tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text('[model]\nkind = "logistic"\nn_features = 4\nclasses = [0, 1]\n\n'
                    '[rule]\nname = "fedbuff"\n')

    assert load_config(path, environ={}).rule.staleness == default_staleness("fedbuff")
    switched = load_config(path, environ={"FEDASYNC_RULE__NAME": "fedasync"}).rule
    assert switched.staleness == default_staleness("fedasync")
    explicit = load_config(path, environ={"FEDASYNC_RULE__STALENESS": "knee:0.5,3"}).rule
    assert explicit.staleness == Staleness(kind="knee", a=0.5, b=3)


def test_rule_config_reads_staleness_text() -> None:
    config = RuleConfig(name="fedbuff", staleness="hinge:10,4")  # type: ignore[arg-type]

    assert config.staleness == Staleness(kind="hinge", a=10, b=4)


@pytest.mark.parametrize(("name", "cls"), [
    ("fedasync", FedAsync), ("fedbuff", FedBuff), ("fedavg-sync", FedAvgSync),
])
def test_build_rule(name: str, cls: type) -> None:
    rule = build_rule(RuleConfig(name=name, cohort_size=4, min_updates=2))  # type: ignore[arg-type]

    assert isinstance(rule, cls)
    assert rule.name == name
    assert rule.pending() == ()


def test_rule_constructors_validate_like_the_config() -> None:
    with pytest.raises(ConfigError):
        FedAsync(alpha=0.0, staleness=CONSTANT)
    with pytest.raises(ConfigError):
        FedBuff(buffer_size=0, server_lr=1.0, staleness=CONSTANT)
    with pytest.raises(ConfigError):
        FedAvgSync(cohort_size=2, deadline_s=1.0, min_updates=3)
