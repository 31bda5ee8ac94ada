"""Model adapters: layout, initialisation, set/get, training semantics, errors, learning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from sklearn.metrics import accuracy_score, log_loss

from fedasync_iot.models._errors import ModelError
from fedasync_iot.models._spec import ModelSpec
from fedasync_iot.models.ml._adapters import (
    FitReport,
    LinearAdapter,
    LogisticAdapter,
    MLPAdapter,
    ModelAdapter,
    build_model,
)
from fedasync_iot.models.ml._datasets import Dataset, load_digits, make_synthetic

DIGITS = tuple(range(10))
KINDS = ("logistic", "mlp", "linear")


def _spec(kind: str, **overrides: Any) -> ModelSpec:
    """Digits-shaped classifier specs; an 8-feature regressor spec."""
    if kind == "linear":
        return ModelSpec(kind="linear", n_features=8, **overrides)
    return ModelSpec(kind=kind, n_features=64, classes=DIGITS, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits(seed=0)


@pytest.fixture(scope="module")
def regression() -> tuple[Dataset, Dataset]:
    ds = make_synthetic(n_samples=600, n_features=8, seed=0, task="regression")
    return ds.subset(np.arange(500), name="reg-train"), ds.subset(np.arange(500, 600))


@pytest.fixture(scope="module")
def data(
    digits: tuple[Dataset, Dataset], regression: tuple[Dataset, Dataset]
) -> dict[str, tuple[Dataset, Dataset]]:
    """Per kind: a small training set (fast) and a held-out set."""
    small = digits[0].subset(np.arange(400), name="digits-small")
    return {"logistic": (small, digits[1]), "mlp": (small, digits[1]), "linear": regression}


def _bits(v: NDArray[np.float32]) -> bytes:
    return v.tobytes()


# --- construction and layout ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls"), [("logistic", LogisticAdapter), ("mlp", MLPAdapter), ("linear", LinearAdapter)]
)
def test_build_model_picks_the_adapter_by_kind(kind: str, cls: type[ModelAdapter]) -> None:
    model = build_model(_spec(kind))

    assert type(model) is cls
    assert model.spec == _spec(kind)


def test_adapter_refuses_a_spec_of_another_kind() -> None:
    with pytest.raises(ModelError, match="needs a 'mlp' spec"):
        MLPAdapter(_spec("logistic"))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (_spec("logistic"), 10 * 64 + 10),
        (ModelSpec(kind="logistic", n_features=64, classes=(0, 1)), 64 + 1),
        (_spec("mlp", hidden=(32,)), 64 * 32 + 32 + 32 * 10 + 10),  # 2410
        (_spec("mlp", hidden=(16, 8)), 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10),
        (ModelSpec(kind="mlp", n_features=64, classes=(0, 1), hidden=(32,)), 64 * 32 + 32 + 32 + 1),
        (_spec("linear"), 8 + 1),
    ],
)
def test_n_params_matches_the_vector(spec: ModelSpec, expected: int) -> None:
    model = build_model(spec)

    assert model.n_params == expected
    assert model.get_params_vector().shape == (expected,)
    assert model.get_params_vector().dtype == np.float32


def test_vector_layout_is_coef_row_major_then_intercept_per_layer(
    data: dict[str, tuple[Dataset, Dataset]],
) -> None:
    train = data["mlp"][0]
    logistic = build_model(_spec("logistic")).partial_fit(train.X, train.y)
    mlp = build_model(_spec("mlp", hidden=(16, 8))).partial_fit(train.X, train.y)

    v = logistic.get_params_vector()
    est = logistic.estimator
    np.testing.assert_array_equal(v[:640].reshape(10, 64), est.coef_)
    np.testing.assert_array_equal(v[640:], est.intercept_)
    v = mlp.get_params_vector()
    est = mlp.estimator
    expected = []
    for coef, intercept in zip(est.coefs_, est.intercepts_, strict=True):
        expected += [coef.ravel(), intercept]
    np.testing.assert_array_equal(v, np.concatenate(expected))


def test_binary_logistic_keeps_one_coefficient_row() -> None:
    spec = ModelSpec(kind="logistic", n_features=5, classes=(2, 7))
    ds = make_synthetic(n_samples=200, n_features=5, n_classes=2, seed=0)
    y = np.where(ds.y == 0, 2, 7)

    model = build_model(spec).partial_fit(ds.X, y, epochs=3)

    assert model.estimator.coef_.shape == (1, 5)
    np.testing.assert_array_equal(model.get_params_vector()[:5], model.estimator.coef_[0])
    assert set(np.unique(model.predict(ds.X))) <= {2, 7}
    assert model.predict_proba(ds.X).shape == (200, 2)
    assert model.evaluate(ds.X, y)["accuracy"] > 0.8


# --- initialisation ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_initial_weights_are_deterministic_per_spec(kind: str) -> None:
    a = build_model(_spec(kind, seed=5)).get_params_vector()
    b = build_model(_spec(kind, seed=5)).get_params_vector()

    assert _bits(a) == _bits(b)


def test_mlp_initial_weights_depend_on_the_seed_and_linear_models_start_at_zero() -> None:
    mlp0 = build_model(_spec("mlp", seed=0)).get_params_vector()
    mlp1 = build_model(_spec("mlp", seed=1)).get_params_vector()

    assert not np.array_equal(mlp0, mlp1)
    # Glorot-uniform bound of the first layer: sqrt(6 / (64 + 32)) = 0.25
    assert 0.2 < float(np.abs(mlp0[: 64 * 32]).max()) <= 0.25
    assert not build_model(_spec("logistic", seed=3)).get_params_vector().any()
    assert not build_model(_spec("linear", seed=3)).get_params_vector().any()


@pytest.mark.parametrize("kind", KINDS)
def test_untrained_adapter_predicts_and_evaluates(
    kind: str, data: dict[str, tuple[Dataset, Dataset]]
) -> None:
    _, test = data[kind]
    model = build_model(_spec(kind))

    predicted = model.predict(test.X)
    metrics = model.evaluate(test.X, test.y)

    assert predicted.shape == (len(test),)
    assert np.isfinite(metrics["loss"])
    if kind != "linear":
        proba = model.predict_proba(test.X)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        assert set(metrics) == {"accuracy", "loss"}
    else:
        assert set(metrics) == {"mse", "r2", "loss"}


# --- get / set -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_get_set_get_round_trips_exactly(
    kind: str, data: dict[str, tuple[Dataset, Dataset]]
) -> None:
    train, _ = data[kind]
    trained = build_model(_spec(kind)).partial_fit(train.X, train.y)
    v = trained.get_params_vector()
    other = build_model(_spec(kind, seed=9))

    other.set_params_vector(v)

    assert _bits(other.get_params_vector()) == _bits(v)


def test_get_params_vector_returns_a_copy() -> None:
    model = build_model(_spec("mlp"))
    v = model.get_params_vector()

    v[:] = 0.0

    assert model.get_params_vector().any()


@pytest.mark.parametrize(
    ("vector", "match"),
    [
        (np.zeros(649, dtype=np.float32), "649 values.*has 650"),
        (np.zeros(651, dtype=np.float32), "651 values"),
        (np.full(650, np.nan, dtype=np.float32), "650 non-finite values.*index 0"),
        (np.r_[np.zeros(649), np.inf], "1 non-finite.*index 649"),
        (np.r_[np.zeros(649), 1e39], "beyond float32"),
        (np.zeros((10, 65), dtype=np.float32), "1-D"),
        (np.array(["a"] * 650), "numeric"),
    ],
)
def test_set_params_vector_rejects_bad_vectors(vector: NDArray[Any], match: str) -> None:
    model = build_model(_spec("logistic"))
    before = model.get_params_vector()

    with pytest.raises(ModelError, match=match):
        model.set_params_vector(vector)

    assert _bits(model.get_params_vector()) == _bits(before)


# --- training continues from the weights that were set -------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_adapter_given_trained_weights_predicts_identically(
    kind: str, data: dict[str, tuple[Dataset, Dataset]]
) -> None:
    train, test = data[kind]
    trained = build_model(_spec(kind)).partial_fit(train.X, train.y, epochs=2)
    fresh = build_model(_spec(kind))

    fresh.set_params_vector(trained.get_params_vector())

    np.testing.assert_array_equal(fresh.predict(test.X), trained.predict(test.X))
    assert fresh.evaluate(test.X, test.y) == trained.evaluate(test.X, test.y)


@pytest.mark.parametrize("kind", KINDS)
def test_training_after_set_depends_only_on_the_vector(
    kind: str, data: dict[str, tuple[Dataset, Dataset]]
) -> None:
    # `veteran` has trained (for the MLP it carries momentum); setting its own weights back must
    # drop that state, so its next epoch equals the same epoch done by a fresh adapter.
    train, _ = data[kind]
    veteran = build_model(_spec(kind)).partial_fit(train.X, train.y, epochs=2)
    w = veteran.get_params_vector()
    fresh = build_model(_spec(kind))
    fresh.set_params_vector(w)
    veteran.set_params_vector(w)

    veteran.partial_fit(train.X, train.y)
    fresh.partial_fit(train.X, train.y)

    assert _bits(veteran.get_params_vector()) == _bits(fresh.get_params_vector())
    assert not np.array_equal(fresh.get_params_vector(), w)


def test_good_weights_survive_a_small_step_while_fresh_weights_do_not(
    digits: tuple[Dataset, Dataset],
) -> None:
    train, test = digits
    good = build_model(_spec("mlp")).partial_fit(train.X, train.y, epochs=4)
    assert good.evaluate(test.X, test.y)["accuracy"] > 0.85
    slow = _spec("mlp", learning_rate=1e-4)
    warm, cold = build_model(slow), build_model(slow)
    warm.set_params_vector(good.get_params_vector())

    warm.partial_fit(train.X, train.y)
    cold.partial_fit(train.X, train.y)

    assert warm.evaluate(test.X, test.y)["accuracy"] > 0.85
    assert cold.evaluate(test.X, test.y)["accuracy"] < 0.5


# --- partial_fit mechanics -----------------------------------------------------------------------


def _stop_after(polls: int) -> Callable[[], bool]:
    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        return calls > polls

    return should_stop


@pytest.mark.parametrize("kind", KINDS)
def test_should_stop_stops_between_mini_batches(
    kind: str, data: dict[str, tuple[Dataset, Dataset]]
) -> None:
    train, _ = data[kind]
    model = build_model(_spec(kind, batch_size=50))  # 400 or 500 rows: 8 or 10 batches per epoch

    model.partial_fit(train.X, train.y, epochs=5, should_stop=_stop_after(3))

    assert model.last_fit_ == FitReport(
        epochs_completed=0, n_batches=3, n_samples_seen=150, stopped_early=True
    )


def test_should_stop_counts_completed_epochs_and_true_at_once_changes_nothing(
    data: dict[str, tuple[Dataset, Dataset]],
) -> None:
    train, _ = data["mlp"]
    model = build_model(_spec("mlp", batch_size=100))  # 400 rows: 4 batches per epoch
    before = model.get_params_vector()

    model.partial_fit(train.X, train.y, epochs=3, should_stop=lambda: True)
    untouched = model.get_params_vector()
    model.partial_fit(train.X, train.y, epochs=3, should_stop=_stop_after(6))

    assert _bits(untouched) == _bits(before)
    assert model.last_fit_ == FitReport(
        epochs_completed=1, n_batches=6, n_samples_seen=600, stopped_early=True
    )


def test_partial_fit_reports_full_runs_and_keeps_the_mlp_loss_curve_bounded(
    data: dict[str, tuple[Dataset, Dataset]],
) -> None:
    train, _ = data["mlp"]
    model = build_model(_spec("mlp", batch_size=32))

    model.partial_fit(train.X, train.y, epochs=2)

    assert model.last_fit_ == FitReport(
        epochs_completed=2, n_batches=26, n_samples_seen=800, stopped_early=False
    )
    assert len(model.estimator.loss_curve_) == 1


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_labels_missing_locally_are_fine(
    kind: str, data: dict[str, tuple[Dataset, Dataset]]
) -> None:
    train, test = data[kind]
    only_0_1 = np.isin(train.y, [0, 1])

    model = build_model(_spec(kind)).partial_fit(train.X[only_0_1], train.y[only_0_1])

    assert model.predict_proba(test.X).shape == (len(test), 10)
    assert set(np.unique(model.predict(test.X))) <= set(DIGITS)
    assert np.isfinite(model.evaluate(test.X, test.y)["loss"])


@pytest.mark.parametrize(
    ("kind", "X", "y", "match"),
    [
        ("logistic", np.zeros((4, 63)), [0, 1, 2, 3], "63 features, the model expects 64"),
        ("mlp", np.zeros((4, 64)), [0, 1, 2, 10], r"labels \[10\] are not in"),
        ("mlp", np.zeros((2, 64)), [-1, 99], r"labels \[-1, 99\]"),
        ("mlp", np.zeros((2, 64)), [0.5, 1.0], "integers"),
        ("logistic", np.zeros((2, 64)), ["a", "b"], "integers"),
        ("logistic", np.full((2, 64), np.nan), [0, 1], "NaN"),
        ("logistic", np.zeros(64), [0], "2-D"),
        ("logistic", np.zeros((0, 64)), [], "no rows"),
        ("mlp", np.zeros((3, 64)), [0, 1], "3 labels"),
        ("linear", np.zeros((2, 8)), [1.0, np.nan], "NaN"),
        ("linear", np.zeros((2, 8)), [[1.0], [2.0]], "1-D"),
    ],
)
def test_bad_training_input_is_a_model_error_and_changes_nothing(
    kind: str, X: Any, y: Any, match: str, data: dict[str, tuple[Dataset, Dataset]]
) -> None:
    train, _ = data[kind]
    model = build_model(_spec(kind)).partial_fit(train.X, train.y)
    before = model.get_params_vector()

    with pytest.raises(ModelError, match=match):
        model.partial_fit(X, y)

    assert _bits(model.get_params_vector()) == _bits(before)


@pytest.mark.parametrize("epochs", [0, -1, True, 1.5])
def test_epochs_must_be_a_positive_integer(epochs: Any) -> None:
    model = build_model(_spec("linear"))

    with pytest.raises(ModelError, match="epochs"):
        model.partial_fit(np.zeros((2, 8)), [0.0, 1.0], epochs=epochs)


def test_diverging_training_is_a_model_error_and_restores_the_weights() -> None:
    ds = make_synthetic(n_samples=200, n_features=4, n_classes=2, seed=0)
    model = build_model(ModelSpec(kind="mlp", n_features=4, classes=(0, 1), learning_rate=1e6))
    before = model.get_params_vector()

    with pytest.raises(ModelError, match="diverged"):
        model.partial_fit(ds.X * 1e3, ds.y)

    assert _bits(model.get_params_vector()) == _bits(before)


def test_prediction_input_is_checked_and_a_regressor_has_no_probabilities() -> None:
    model = build_model(_spec("linear"))

    with pytest.raises(ModelError, match="7 features"):
        model.predict(np.zeros((1, 7)))
    with pytest.raises(ModelError, match="no class probabilities"):
        model.predict_proba(np.zeros((1, 8)))


# --- learning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_classifiers_learn_digits(kind: str, digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    model = build_model(_spec(kind))

    model.partial_fit(train.X, train.y, epochs=5)
    metrics = model.evaluate(test.X, test.y)

    assert metrics["accuracy"] > 0.85
    assert metrics["accuracy"] == pytest.approx(accuracy_score(test.y, model.predict(test.X)))
    expected_loss = log_loss(test.y, model.predict_proba(test.X), labels=DIGITS)
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_regressor_lowers_mse(regression: tuple[Dataset, Dataset]) -> None:
    train, test = regression
    model = build_model(_spec("linear"))
    before = model.evaluate(test.X, test.y)

    model.partial_fit(train.X, train.y, epochs=3)
    after = model.evaluate(test.X, test.y)

    assert after["mse"] < 0.05 * before["mse"]
    assert after["loss"] == after["mse"]
    assert after["r2"] > 0.95
