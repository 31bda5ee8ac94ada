"""Offline datasets and non-IID partitions for tests, the simulator and benchmarks.

Nothing here downloads: digits ships inside scikit-learn, everything else is generated from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedasync_iot.models._errors import ModelError

Task = Literal["classification", "regression"]

_DIGITS_MAX_PIXEL = 16.0  # sklearn's digits are 8x8 images with integer intensities 0..16


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Dataset:
    """Features and targets of one dataset (or one device's share of it).

    `X` is float32 ``(n_samples, n_features)``; `y` is int64 labels (classification) or float32
    values (regression), ``(n_samples,)``. Both must be finite. The arrays are stored as read-only
    views so a frozen dataset stays frozen; the caller's own arrays are not affected.
    """

    X: NDArray[np.float32]
    y: NDArray[np.int64] | NDArray[np.float32]
    name: str

    def __post_init__(self) -> None:
        X, y = self.X, self.y
        if not isinstance(X, np.ndarray) or not isinstance(y, np.ndarray):
            raise ModelError("Dataset X and y must be numpy arrays")
        if X.dtype != np.float32 or X.ndim != 2:
            raise ModelError(f"Dataset X must be 2-D float32, got {X.ndim}-D {X.dtype}")
        if y.dtype not in (np.int64, np.float32) or y.ndim != 1:
            raise ModelError(f"Dataset y must be 1-D int64 or float32, got {y.ndim}-D {y.dtype}")
        if X.shape[0] != y.shape[0]:
            raise ModelError(f"Dataset X has {X.shape[0]} rows but y has {y.shape[0]} values")
        if X.shape[1] == 0:
            raise ModelError("Dataset X has no features")
        if not np.isfinite(X).all():
            raise ModelError("Dataset X contains NaN or infinite values")
        if y.dtype == np.float32 and not np.isfinite(y).all():
            raise ModelError("Dataset y contains NaN or infinite values")
        if not isinstance(self.name, str) or not self.name:
            raise ModelError("Dataset name must be a non-empty string")
        object.__setattr__(self, "X", _read_only(X))
        object.__setattr__(self, "y", _read_only(y))

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def is_classification(self) -> bool:
        return bool(self.y.dtype == np.int64)

    def subset(self, indices: ArrayLike, *, name: str | None = None) -> Dataset:
        """The rows at `indices` (e.g. one device's share from `dirichlet_partition`), copied."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ModelError(f"subset indices must be 1-D, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise ModelError(f"subset indices must be in 0..{len(self) - 1}")
        return Dataset(X=self.X[idx], y=self.y[idx], name=name or f"{self.name}[{idx.size}]")


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """sklearn's bundled 8x8 digits (1797 samples, 64 features, 10 classes) as (train, test).

    Features are scaled to [0, 1]; the split is stratified by label and deterministic per `seed`.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ModelError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    _check_seed(seed)
    X, y = sk_load_digits(return_X_y=True)
    X = (X / _DIGITS_MAX_PIXEL).astype(np.float32)
    y = y.astype(np.int64)
    try:
        X_tr, X_te, y_tr, y_te = train_test_split(
            X, y, test_size=test_fraction, stratify=y, random_state=seed
        )
    except ValueError as exc:  # a fraction that leaves fewer test rows than classes
        raise ModelError(f"cannot split digits with test_fraction={test_fraction}: {exc}") from exc
    return (
        Dataset(X=X_tr, y=y_tr, name="digits-train"),
        Dataset(X=X_te, y=y_te, name="digits-test"),
    )


def make_synthetic(
    *,
    n_samples: int,
    n_features: int,
    n_classes: int = 2,
    seed: int,
    task: Task = "classification",
) -> Dataset:
    """A seeded synthetic dataset.

    classification: Gaussian blobs, one centre per class drawn from N(0, I), unit-variance noise,
    classes balanced (counts differ by at most one) and shuffled; labels 0..n_classes-1.
    regression: X ~ N(0, I), y = X @ w + b + 0.1 * noise with w ~ N(0, I / n_features), so y has
    roughly unit variance; `n_classes` is ignored.
    """
    for label, value, low in (("n_samples", n_samples, 1), ("n_features", n_features, 1)):
        if not _is_int(value) or value < low:
            raise ModelError(f"{label} must be an integer >= {low}, got {value!r}")
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    if task == "classification":
        if not _is_int(n_classes) or not 2 <= n_classes <= n_samples:
            raise ModelError(f"n_classes must be an integer in 2..n_samples, got {n_classes!r}")
        centres = rng.normal(size=(n_classes, n_features))
        y = rng.permutation(np.arange(n_samples) % n_classes).astype(np.int64)
        X = centres[y] + rng.normal(size=(n_samples, n_features))
        return Dataset(
            X=X.astype(np.float32), y=y, name=f"blobs-{n_classes}c-{n_features}f-s{seed}"
        )
    if task == "regression":
        X = rng.normal(size=(n_samples, n_features))
        w = rng.normal(size=n_features) / math.sqrt(n_features)
        b = rng.normal()
        y_reg = X @ w + b + 0.1 * rng.normal(size=n_samples)
        return Dataset(
            X=X.astype(np.float32), y=y_reg.astype(np.float32), name=f"linear-{n_features}f-s{seed}"
        )
    raise ModelError(f"task must be 'classification' or 'regression', got {task!r}")


def dirichlet_partition(
    y: ArrayLike,
    n_devices: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[NDArray[np.int64]]:
    """Split the indices of `y` across `n_devices` with label skew (Hsu et al. 2019).

    For each class, the shuffled indices of that class are cut in proportions drawn from
    Dirichlet(alpha, ..., alpha) over the devices: a small alpha (0.1) gives each device a few
    dominant labels, a large one (100) approaches an IID split. Every index lands on exactly one
    device; each device's indices are returned sorted.

    `min_size` is then enforced by rebalancing, not by redrawing (redrawing until every device is
    large enough can take forever for small alpha and many devices): while a device has fewer than
    `min_size` samples it receives a random sample from the currently largest device. That
    disturbs the label skew only slightly (the donor's labels are its typical ones). Raises
    `ModelError` when ``n_devices * min_size`` exceeds the number of samples.

    Deterministic for a given `seed` (and numpy version).
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise ModelError(f"y must be 1-D integer labels, got {labels.ndim}-D {labels.dtype}")
    if not _is_int(n_devices) or n_devices < 1:
        raise ModelError(f"n_devices must be a positive integer, got {n_devices!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ModelError(f"alpha must be a finite positive number, got {alpha!r}")
    if not _is_int(min_size) or min_size < 0:
        raise ModelError(f"min_size must be a non-negative integer, got {min_size!r}")
    _check_seed(seed)
    n = labels.shape[0]
    if n_devices * min_size > n:
        raise ModelError(
            f"cannot give {n_devices} devices {min_size} samples each from {n} samples"
        )

    rng = np.random.default_rng(seed)
    shares: list[list[NDArray[np.int64]]] = [[] for _ in range(n_devices)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls)).astype(np.int64)
        proportions = rng.dirichlet(np.full(n_devices, float(alpha)))
        if not np.isfinite(proportions).all() or proportions.sum() <= 0:
            # Very small alpha can underflow every gamma draw to 0 (0/0 in older numpy): the limit
            # of Dirichlet(alpha -> 0) is "everything to one device", so do exactly that.
            proportions = np.zeros(n_devices)
            proportions[rng.integers(n_devices)] = 1.0
        cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for device, part in enumerate(np.split(members, cuts)):
            shares[device].append(part)
    parts = [np.concatenate(s) for s in shares]

    sizes = np.array([p.size for p in parts])
    while sizes.min() < min_size:
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        pick = int(rng.integers(parts[large].size))
        parts[small] = np.append(parts[small], parts[large][pick])
        parts[large] = np.delete(parts[large], pick)
        sizes[small] += 1
        sizes[large] -= 1
    return [np.sort(p).astype(np.int64) for p in parts]


def _read_only(a: NDArray[np.generic]) -> NDArray[np.generic]:
    view: NDArray[np.generic] = a.view()
    view.flags.writeable = False
    return view


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_seed(seed: object) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ModelError(f"seed must be a non-negative integer, got {seed!r}")
