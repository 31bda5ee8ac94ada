"""Guards run before any merge rule: each reason code, clipping, and hostile values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedasync_iot.coordinator._guards import GuardConfig, check_update
from fedasync_iot.models import ConfigError, InvalidUpdate

CLIP = GuardConfig(max_norm=1.0, norm_policy="clip", max_staleness=3)
REJECT = GuardConfig(max_norm=1.0, norm_policy="reject", max_staleness=3)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def reason_of(delta: object, *, n_params: int = 2, staleness: int = 0,
              config: GuardConfig = REJECT) -> str:
    with pytest.raises(InvalidUpdate) as info:
        check_update(delta, n_params=n_params, staleness=staleness, config=config)  # type: ignore[arg-type]
    return info.value.reason


def test_defaults_are_valid() -> None:
    config = GuardConfig()

    assert (config.max_norm, config.norm_policy, config.max_staleness) == (10.0, "clip", 1000)


@pytest.mark.parametrize(("key", "value"), [
    ("max_norm", 0.0), ("max_norm", -1.0), ("max_norm", float("inf")), ("max_norm", float("nan")),
    ("max_norm", True), ("max_norm", "10"), ("norm_policy", "drop"), ("max_staleness", -1),
    ("max_staleness", 2.0), ("max_staleness", False),
])
def test_config_rejects_bad_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        GuardConfig(**{key: value})  # type: ignore[arg-type]

    assert info.value.key == key


def test_small_fresh_delta_passes_unchanged() -> None:
    delta = f32(0.5, -0.75)

    out, clipped = check_update(delta, n_params=2, staleness=3, config=REJECT)

    assert not clipped
    np.testing.assert_array_equal(out, delta)
    assert out.dtype == np.float32
    assert out is not delta  # a copy: the caller's array and the rule's buffer never alias


@pytest.mark.parametrize("delta", [
    f32(1.0, 2.0, 3.0), f32(1.0), np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32),
    np.array([1, 2]), np.array(["a", "b"]), [1.0, 2.0],
])
def test_shape_and_kind_mismatches(delta: object) -> None:
    assert reason_of(delta) == "shape"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad: float) -> None:
    assert reason_of(f32(0.0, bad)) == "non_finite"


def test_float64_beyond_float32_range_is_non_finite() -> None:
    assert reason_of(np.array([1e39, 0.0])) == "non_finite"


def test_staleness_bounds() -> None:
    assert reason_of(f32(0, 0), staleness=-1) == "future_version"
    assert reason_of(f32(0, 0), staleness=4) == "too_stale"
    check_update(f32(0, 0), n_params=2, staleness=3, config=REJECT)  # the bound itself passes


def test_norm_rejected_under_reject_policy() -> None:
    assert reason_of(f32(3.0, 4.0)) == "norm"


def test_checks_run_in_order_shape_finite_staleness_norm() -> None:
    assert reason_of(f32(np.nan, 1, 1), staleness=99) == "shape"
    assert reason_of(f32(np.nan, 100), staleness=99) == "non_finite"
    assert reason_of(f32(100, 100), staleness=99) == "too_stale"


def test_clip_keeps_direction_at_max_norm_without_touching_input() -> None:
    delta = f32(3.0, 4.0)
    before = delta.copy()

    out, clipped = check_update(delta, n_params=2, staleness=0, config=CLIP)

    assert clipped
    assert np.linalg.norm(out.astype(np.float64)) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(delta, before)


def test_hostile_float32_extremes_do_not_overflow_the_norm() -> None:
    delta = np.full(1000, 1e38, dtype=np.float32)  # float32 squares would be inf
    config = GuardConfig(max_norm=5.0, norm_policy="clip")

    with np.errstate(all="raise"):
        out, clipped = check_update(delta, n_params=1000, staleness=0, config=config)

    assert clipped
    assert np.isfinite(out).all()
    assert np.linalg.norm(out.astype(np.float64)) == pytest.approx(5.0, abs=1e-5)
    np.testing.assert_allclose(out, np.full(1000, 5.0 / np.sqrt(1000)), rtol=1e-6)
    assert reason_of(delta, n_params=1000) == "norm"


def test_float16_and_float64_come_back_as_float32() -> None:
    for dtype in (np.float16, np.float64):
        out, _ = check_update(np.array([0.5, 0.25], dtype=dtype), n_params=2, staleness=0,
                              config=REJECT)

        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, [0.5, 0.25])


@given(arrays(np.float32, st.integers(1, 50),
              elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       st.floats(1e-3, 1e3))
def test_clipped_output_is_bounded_and_parallel(delta: np.ndarray, max_norm: float) -> None:
    config = GuardConfig(max_norm=max_norm, norm_policy="clip")
    before = delta.copy()

    out, clipped = check_update(delta, n_params=delta.size, staleness=0, config=config)

    wide, norm = delta.astype(np.float64), np.linalg.norm(delta.astype(np.float64))
    assert clipped == (norm > max_norm)
    assert np.linalg.norm(out.astype(np.float64)) <= max_norm * (1 + 1e-6)
    expected = wide * (max_norm / norm) if clipped else wide
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=max_norm * 1e-6)
    np.testing.assert_array_equal(delta, before)
