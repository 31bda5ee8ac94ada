"""Offline datasets: validation, the digits split, synthetic data and the Dirichlet partition."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from fedasync_iot.models._errors import ModelError
from fedasync_iot.models.ml._datasets import (
    Dataset,
    dirichlet_partition,
    load_digits,
    make_synthetic,
)


def _mean_label_entropy(y: NDArray[Any], parts: list[NDArray[np.int64]]) -> float:
    """Mean over devices of the entropy (nats) of the device's label distribution."""
    n_classes = int(y.max()) + 1
    entropies = []
    for part in parts:
        p = np.bincount(y[part], minlength=n_classes) / part.size
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# --- Dataset -------------------------------------------------------------------------------------


def test_dataset_accepts_valid_arrays_and_freezes_them() -> None:
    X = np.zeros((3, 2), dtype=np.float32)
    y = np.array([0, 1, 0], dtype=np.int64)

    ds = Dataset(X=X, y=y, name="tiny")

    assert len(ds) == 3
    assert ds.n_features == 2
    assert ds.is_classification
    with pytest.raises(ValueError, match="read-only"):
        ds.X[0, 0] = 1.0
    X[0, 0] = 5.0  # the caller's array stays writable (the dataset holds a view)
    assert ds.X[0, 0] == 5.0


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.zeros((3, 2)), np.zeros(3, dtype=np.int64), "float32"),
        (np.zeros(3, dtype=np.float32), np.zeros(3, dtype=np.int64), "2-D"),
        (np.zeros((3, 2), dtype=np.float32), np.zeros(3, dtype=np.int32), "int64 or float32"),
        (np.zeros((3, 2), dtype=np.float32), np.zeros((3, 1), dtype=np.int64), "1-D"),
        (np.zeros((3, 2), dtype=np.float32), np.zeros(4, dtype=np.int64), "3 rows but y has 4"),
        (np.full((3, 2), np.nan, dtype=np.float32), np.zeros(3, dtype=np.int64), "NaN"),
        (np.zeros((3, 2), dtype=np.float32), np.array([0, np.inf, 1], np.float32), "NaN"),
        (np.zeros((3, 0), dtype=np.float32), np.zeros(3, dtype=np.int64), "no features"),
        ([[0.0, 1.0]], np.zeros(1, dtype=np.int64), "numpy arrays"),
    ],
)
def test_dataset_rejects_malformed_arrays(X: object, y: object, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        Dataset(X=X, y=y, name="bad")  # type: ignore[arg-type]


def test_dataset_rejects_empty_name() -> None:
    with pytest.raises(ModelError, match="name"):
        Dataset(X=np.zeros((1, 1), np.float32), y=np.zeros(1, np.float32), name="")


def test_subset_copies_the_rows_and_checks_indices() -> None:
    ds = make_synthetic(n_samples=10, n_features=3, n_classes=2, seed=0)

    sub = ds.subset(np.array([1, 3]))

    np.testing.assert_array_equal(sub.X, ds.X[[1, 3]])
    np.testing.assert_array_equal(sub.y, ds.y[[1, 3]])
    with pytest.raises(ModelError, match="indices"):
        ds.subset([10])


# --- digits --------------------------------------------------------------------------------------


def test_load_digits_split_sizes_scaling_and_stratification() -> None:
    train, test = load_digits(test_fraction=0.25, seed=0)

    assert len(train) + len(test) == 1797
    assert len(test) == 450  # ceil(0.25 * 1797), sklearn's rounding
    assert train.X.dtype == np.float32 and train.y.dtype == np.int64
    assert train.n_features == 64
    assert float(train.X.min()) >= 0.0 and float(train.X.max()) <= 1.0
    # Stratified: every class has (almost exactly) a quarter of its samples in the test set.
    total = np.bincount(train.y, minlength=10) + np.bincount(test.y, minlength=10)
    assert np.all(np.abs(np.bincount(test.y, minlength=10) - 0.25 * total) <= 1.0)


def test_load_digits_is_deterministic_per_seed() -> None:
    a_train, _ = load_digits(seed=3)
    b_train, _ = load_digits(seed=3)
    c_train, _ = load_digits(seed=4)

    np.testing.assert_array_equal(a_train.X, b_train.X)
    assert not np.array_equal(a_train.X, c_train.X)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.001])
def test_load_digits_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ModelError, match="test_fraction"):
        load_digits(test_fraction=fraction)


# --- synthetic -----------------------------------------------------------------------------------


def test_make_synthetic_classification() -> None:
    ds = make_synthetic(n_samples=101, n_features=5, n_classes=4, seed=1)

    assert ds.X.shape == (101, 5) and ds.X.dtype == np.float32
    assert ds.y.dtype == np.int64
    counts = np.bincount(ds.y)
    assert counts.size == 4 and counts.max() - counts.min() <= 1


def test_make_synthetic_regression_and_determinism() -> None:
    a = make_synthetic(n_samples=50, n_features=4, seed=7, task="regression")
    b = make_synthetic(n_samples=50, n_features=4, seed=7, task="regression")

    assert a.y.dtype == np.float32 and not a.is_classification
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.y, b.y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_samples": 0, "n_features": 2}, "n_samples"),
        ({"n_samples": 10, "n_features": 0}, "n_features"),
        ({"n_samples": 10, "n_features": 2, "n_classes": 1}, "n_classes"),
        ({"n_samples": 10, "n_features": 2, "task": "ranking"}, "task"),
        ({"n_samples": 10, "n_features": 2, "seed": -1}, "seed"),
    ],
)
def test_make_synthetic_rejects_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"seed": 0, **kwargs}
    with pytest.raises(ModelError, match=match):
        make_synthetic(**args)  # type: ignore[arg-type]


# --- Dirichlet partition -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.05, 1.0, 100.0])
def test_partition_uses_every_index_exactly_once(alpha: float) -> None:
    y = make_synthetic(n_samples=600, n_features=2, n_classes=6, seed=0).y

    parts = dirichlet_partition(y, 12, alpha=alpha, seed=0)

    assert len(parts) == 12
    assert all(p.dtype == np.int64 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(600))


def test_partition_enforces_min_size_even_when_very_skewed() -> None:
    y = make_synthetic(n_samples=500, n_features=2, n_classes=10, seed=0).y

    parts = dirichlet_partition(y, 50, alpha=0.01, seed=3, min_size=8)

    assert min(p.size for p in parts) >= 8
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(500))


def test_partition_is_deterministic_per_seed() -> None:
    y = make_synthetic(n_samples=300, n_features=2, n_classes=5, seed=0).y

    a = dirichlet_partition(y, 7, alpha=0.5, seed=11)
    b = dirichlet_partition(y, 7, alpha=0.5, seed=11)
    c = dirichlet_partition(y, 7, alpha=0.5, seed=12)

    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_smaller_alpha_gives_more_skewed_devices() -> None:
    train, _ = load_digits(seed=0)
    y = np.asarray(train.y)

    skewed = _mean_label_entropy(y, dirichlet_partition(y, 20, alpha=0.1, seed=0))
    mild = _mean_label_entropy(y, dirichlet_partition(y, 20, alpha=1.0, seed=0))
    iid = _mean_label_entropy(y, dirichlet_partition(y, 20, alpha=100.0, seed=0))

    # log(10) = 2.30 nats is a perfectly balanced device.
    assert skewed < mild < iid
    assert skewed < 1.2
    assert iid > 2.1


@pytest.mark.parametrize(
    ("y", "kwargs", "match"),
    [
        (np.zeros(10, dtype=np.int64), {"n_devices": 0}, "n_devices"),
        (np.zeros(10, dtype=np.int64), {"alpha": 0.0}, "alpha"),
        (np.zeros(10, dtype=np.int64), {"alpha": float("nan")}, "alpha"),
        (np.zeros(10, dtype=np.int64), {"n_devices": 4, "min_size": 3}, "cannot give"),
        (np.zeros(10, dtype=np.int64), {"min_size": -1}, "min_size"),
        (np.zeros(10, dtype=np.float32), {}, "integer labels"),
    ],
)
def test_partition_rejects_bad_arguments(
    y: NDArray[np.generic], kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"n_devices": 2, "alpha": 1.0, "seed": 0, **kwargs}
    with pytest.raises(ModelError, match=match):
        dirichlet_partition(y, **args)  # type: ignore[arg-type]
