"""Model adapters: scikit-learn estimators behind one small interface built for federated training.

Every adapter is a function of its `ModelSpec` plus one flat float32 parameter vector: that vector
is what travels (snapshots, updates), so its layout is part of the wire contract.

Parameter vector layout (float32, C order, layers in forward order)::

    logistic   coef (k, n_features), intercept (k,)      k = 1 for 2 classes (the score of
                                                         classes[1]), else k = n_classes
    mlp        for each layer i: coef_i (fan_in, fan_out), intercept_i (fan_out,)
               fan_in of layer 0 = n_features, then the hidden sizes; fan_out of the last layer
               = 1 for 2 classes (logistic output), else n_classes (softmax output)
    linear     coef (n_features,), intercept (1,)

Invariants the rest of the system relies on:

- An adapter is usable at once: the constructor initialises the weights (zeros for the convex
  linear models; Glorot-uniform from ``spec.seed`` for the MLP), so version 0 predicts and exports.
- Between calls the weights are exactly representable in float32: `partial_fit` rounds them when
  it returns, so ``get_params_vector`` loses nothing and a model rebuilt from that vector on
  another machine predicts exactly as this one does.
- `set_params_vector` also resets every piece of training state (optimizer momentum, the shuffle
  stream), so what `partial_fit` does next depends only on the vector, the spec and the data.
- `partial_fit` is all-or-nothing on error: if it raises, the weights are those from before it.

``spec.l2`` means the same for every kind: the objective is the mean loss over the mini-batch plus
``l2 / 2 * ||W||^2`` over the weight matrices (intercepts are not penalised).

Not thread-safe: one adapter, one thread.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.linear_model import SGDClassifier, SGDRegressor
from sklearn.metrics import mean_squared_error, r2_score
from sklearn.neural_network import MLPClassifier

from fedasync_iot.models._errors import ModelError
from fedasync_iot.models._spec import ModelSpec

if TYPE_CHECKING:
    from typing_extensions import Self

# Momentum for the MLP's SGD. Plain SGD with momentum (reset at every set_params_vector) suits
# federated local training better than Adam: a restarted Adam takes sign-like steps of size
# `learning_rate` per weight on its first batches, which makes deltas from short local rounds noisy.
MLP_MOMENTUM = 0.9

_MAX_LABELS_IN_MESSAGE = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class FitReport:
    """What the last `partial_fit` call did; `stopped_early` means `should_stop` said so."""

    epochs_completed: int
    n_batches: int
    n_samples_seen: int  # sample-steps: a sample seen in two epochs counts twice
    stopped_early: bool


class ModelAdapter(ABC):
    """A trainable model with a flat parameter vector; see the module docstring for the layout.

    Learned state (sklearn convention): the wrapped `estimator` and `last_fit_`.
    """

    def __init__(self, spec: ModelSpec) -> None:
        if spec.kind != self.kind:
            raise ModelError(f"{type(self).__name__} needs a {self.kind!r} spec, got {spec.kind!r}")
        self._spec = spec
        self._shapes: tuple[tuple[int, ...], ...] = self._param_shapes()
        self._n_params = sum(math.prod(s) for s in self._shapes)
        self._rng = np.random.default_rng(spec.seed)
        self.last_fit_: FitReport | None = None
        self.estimator_ = self._make_estimator()
        # sklearn estimators only exist after a first fit; one call on a tiny synthetic batch makes
        # the estimator allocate everything it needs (classes_, shapes, label binarizer, output
        # activation). Whatever that call learned is then overwritten by the seeded initial weights.
        self._warm_up()
        self._load(self._initial_vector(np.random.default_rng(spec.seed)))

    # --- what each kind provides -------------------------------------------------------------

    kind: ClassVar[str]

    @abstractmethod
    def _param_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the parameter arrays, in vector layout order."""

    @abstractmethod
    def _make_estimator(self) -> Any: ...

    @abstractmethod
    def _warm_up(self) -> None: ...

    @abstractmethod
    def _initial_vector(self, rng: np.random.Generator) -> NDArray[np.float32]: ...

    @abstractmethod
    def _arrays(self) -> list[NDArray[np.float64]]:
        """The estimator's live parameter arrays, in vector layout order."""

    @abstractmethod
    def _assign(self, arrays: list[NDArray[np.float64]]) -> None:
        """Install fresh parameter arrays (layout order) into the estimator."""

    @abstractmethod
    def _fit_batch(self, X: NDArray[np.float64], y: NDArray[Any]) -> None: ...

    @abstractmethod
    def _check_y(self, y: ArrayLike, n_samples: int) -> NDArray[Any]: ...

    @abstractmethod
    def evaluate(self, X: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """Metrics on held-out data; every dict has a ``"loss"`` key (lower is better)."""

    @abstractmethod
    def _reset_training_state(self) -> None:
        """Forget everything training keeps besides the weights (optimizer state, counters)."""

    # --- shared public API ---------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def n_params(self) -> int:
        return self._n_params

    @property
    def estimator(self) -> Any:
        """The live wrapped scikit-learn estimator: export or inspect it, do not fit it."""
        return self.estimator_

    def get_params_vector(self) -> NDArray[np.float32]:
        """A fresh flat float32 copy of all parameters (layout in the module docstring)."""
        return np.concatenate([a.ravel() for a in self._arrays()]).astype(np.float32)

    def set_params_vector(self, vector: ArrayLike) -> None:
        """Install `vector` as the weights and reset all training state.

        Raises `ModelError` when it is not a 1-D numeric array of length `n_params` whose values
        are finite in float32 (the precision the weights are stored at).
        """
        try:
            v = np.asarray(vector)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"parameter vector is not an array: {exc}") from exc
        if v.ndim != 1:
            raise ModelError(f"parameter vector must be 1-D, got shape {v.shape}")
        if v.dtype.kind not in "fiu":
            raise ModelError(f"parameter vector must be numeric, got dtype {v.dtype}")
        if v.shape[0] != self._n_params:
            raise ModelError(
                f"parameter vector has {v.shape[0]} values, a {self.kind} model with this spec "
                f"has {self._n_params}"
            )
        with np.errstate(over="ignore"):  # overflow shows up as inf, rejected just below
            v32 = v.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(v32))
        if bad.size:
            raise ModelError(
                f"parameter vector has {bad.size} non-finite values (NaN, inf or beyond float32), "
                f"first at index {int(bad[0])}"
            )
        self._load(v32)

    def partial_fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        *,
        epochs: int = 1,
        should_stop: Callable[[], bool] | None = None,
    ) -> Self:
        """Train `epochs` passes over (X, y) from the current weights, in shuffled mini-batches.

        `should_stop` is called before every mini-batch (keep it cheap); when it returns True the
        call stops there and returns, keeping what was learned so far (see `last_fit_`). Labels
        absent from `y` are fine; labels outside ``spec.classes`` are a `ModelError`. Diverging
        (non-finite weights) is a `ModelError` too. On any error the weights are left as they were
        before the call and the training state is reset, as by `set_params_vector`.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ModelError(f"epochs must be a positive integer, got {epochs!r}")
        Xa = self._check_x(X)
        ya = self._check_y(y, Xa.shape[0])
        n, batch_size = Xa.shape[0], self._spec.batch_size
        backup = self.get_params_vector()
        batches = seen = done = 0
        stopped = False
        try:
            for _ in range(epochs):
                order = self._rng.permutation(n)
                for start in range(0, n, batch_size):
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                    idx = order[start : start + batch_size]
                    self._fit_batch(Xa[idx], ya[idx])
                    batches += 1
                    seen += idx.size
                if stopped:
                    break
                done += 1
        except ValueError as exc:  # what sklearn raises on bad input and on divergence
            self._load(backup)
            raise ModelError(f"training the {self.kind} model failed: {exc}") from exc
        except BaseException:
            self._load(backup)
            raise
        with np.errstate(over="ignore"):  # weights beyond float32 become inf: diverged too
            after = self.get_params_vector()
        if not np.isfinite(after).all():
            self._load(backup)
            raise ModelError(
                f"training the {self.kind} model diverged (non-finite weights); lower the learning "
                f"rate ({self._spec.learning_rate}) or scale the inputs"
            )
        self._round_to_float32()
        self.last_fit_ = FitReport(
            epochs_completed=done, n_batches=batches, n_samples_seen=seen, stopped_early=stopped
        )
        return self

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """Labels (int64, from ``spec.classes``) for classifiers, float64 values for a regressor."""
        return np.asarray(self.estimator_.predict(self._check_x(X)))

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Class probabilities, columns in ``spec.classes`` order; classifiers only."""
        raise ModelError(f"a {self.kind} model has no class probabilities")

    # --- internals -----------------------------------------------------------------------------

    def _check_x(self, X: ArrayLike) -> NDArray[np.float64]:
        try:
            arr = np.ascontiguousarray(X, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"X is not a numeric array: {exc}") from exc
        if arr.ndim != 2:
            raise ModelError(f"X must be 2-D (n_samples, n_features), got shape {arr.shape}")
        if arr.shape[1] != self._spec.n_features:
            raise ModelError(
                f"X has {arr.shape[1]} features, the model expects {self._spec.n_features}"
            )
        if arr.shape[0] == 0:
            raise ModelError("X has no rows")
        if not np.isfinite(arr).all():
            raise ModelError("X contains NaN or infinite values")
        return arr

    def _load(self, vector: NDArray[np.float32]) -> None:
        arrays: list[NDArray[np.float64]] = []
        offset = 0
        for shape in self._shapes:
            size = math.prod(shape)
            arrays.append(vector[offset : offset + size].astype(np.float64).reshape(shape))
            offset += size
        self._assign(arrays)
        self._rng = np.random.default_rng(self._spec.seed)
        self._reset_training_state()

    def _round_to_float32(self) -> None:
        # In place, so that nothing holding a reference to these arrays sees stale values.
        for a in self._arrays():
            a[...] = a.astype(np.float32)


class _Classifier(ModelAdapter):
    """Shared label handling for the two classifiers."""

    def __init__(self, spec: ModelSpec) -> None:
        self._classes = np.asarray(spec.classes, dtype=np.int64)
        super().__init__(spec)

    @property
    def _n_outputs(self) -> int:
        # sklearn keeps a single score column for binary problems (the score of classes[1]).
        n = len(self._classes)
        return 1 if n == 2 else n

    def _check_y(self, y: ArrayLike, n_samples: int) -> NDArray[np.int64]:
        arr = np.asarray(y)
        if arr.ndim != 1 or arr.shape[0] != n_samples:
            raise ModelError(f"y must be 1-D with {n_samples} labels, got shape {arr.shape}")
        if arr.dtype.kind == "f":
            # Labels read from CSV or float arrays arrive as floats; accept them when integral.
            if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
                raise ModelError("class labels must be integers")
        elif arr.dtype.kind not in "iu":
            raise ModelError(f"class labels must be integers, got dtype {arr.dtype}")
        labels = arr.astype(np.int64)
        unknown = np.setdiff1d(labels, self._classes)
        if unknown.size:
            shown = unknown[:_MAX_LABELS_IN_MESSAGE].tolist()
            raise ModelError(
                f"labels {shown}{'...' if unknown.size > len(shown) else ''} are not in the "
                f"model's classes {list(self._spec.classes)}"
            )
        return labels

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        return np.asarray(self.estimator_.predict_proba(self._check_x(X)), dtype=np.float64)

    def evaluate(self, X: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """``{"accuracy", "loss"}``; loss is the mean log loss over all ``spec.classes``."""
        Xa = self._check_x(X)
        ya = self._check_y(y, Xa.shape[0])
        proba = self.predict_proba(Xa)
        truth = np.argmax(ya[:, None] == self._classes[None, :], axis=1)  # labels checked above
        # sklearn's accuracy_score and log_loss (clipped to [eps, 1 - eps]), without their
        # input validation: that was 60% of an evaluation, which the coordinator runs per version.
        eps = np.finfo(proba.dtype).eps
        p_true = np.clip(proba[np.arange(len(truth)), truth], eps, 1 - eps)
        return {
            "accuracy": float(np.mean(np.argmax(proba, axis=1) == truth)),
            "loss": float(-np.mean(np.log(p_true))),
        }


class _SGDParams(ModelAdapter):
    """Parameter handling shared by the two SGD estimators: coef_ then intercept_."""

    def _initial_vector(self, rng: np.random.Generator) -> NDArray[np.float32]:
        # A convex problem: start at zero (sklearn does too); uniform probabilities at version 0.
        return np.zeros(self._n_params, dtype=np.float32)

    def _arrays(self) -> list[NDArray[np.float64]]:
        return [self.estimator_.coef_, self.estimator_.intercept_]

    def _assign(self, arrays: list[NDArray[np.float64]]) -> None:
        self.estimator_.coef_, self.estimator_.intercept_ = arrays

    def _reset_training_state(self) -> None:
        # sklearn's step counter: unused by the constant schedule, reset so that equal vectors
        # really mean equal estimators.
        self.estimator_.t_ = 1.0


class LogisticAdapter(_SGDParams, _Classifier):
    """Linear classifier trained with scikit-learn's `SGDClassifier` (``loss="log_loss"``).

    Note two sklearn semantics: with more than two classes it is one-vs-rest (one binary logistic
    model per class, probabilities normalised to sum to 1), not a softmax; and within each
    mini-batch sklearn updates the weights after every sample, so ``learning_rate`` is a
    per-sample step and the mini-batch is the unit of shuffling and of `should_stop` polling.
    """

    kind = "logistic"

    def _param_shapes(self) -> tuple[tuple[int, ...], ...]:
        k = self._n_outputs
        return ((k, self._spec.n_features), (k,))

    def _make_estimator(self) -> Any:
        return SGDClassifier(loss="log_loss", **_sgd_settings(self._spec))

    def _warm_up(self) -> None:
        n = len(self._classes)
        self.estimator_.partial_fit(
            np.zeros((n, self._spec.n_features)), self._classes, classes=self._classes
        )

    def _fit_batch(self, X: NDArray[np.float64], y: NDArray[Any]) -> None:
        self.estimator_.partial_fit(X, y, classes=self._classes)


class MLPAdapter(_Classifier):
    """Small multi-layer perceptron (ReLU hidden layers) on scikit-learn's `MLPClassifier`.

    Trained with SGD (constant ``learning_rate``, Nesterov momentum `MLP_MOMENTUM`), one optimizer
    step per mini-batch of ``spec.batch_size``. The momentum survives across `partial_fit` calls
    but not across `set_params_vector`.
    """

    kind = "mlp"

    def _layer_units(self) -> list[int]:
        return [self._spec.n_features, *self._spec.hidden, self._n_outputs]

    def _param_shapes(self) -> tuple[tuple[int, ...], ...]:
        units = self._layer_units()
        # Layer by layer: coef then intercept.
        return tuple(s for fi, fo in itertools.pairwise(units) for s in ((fi, fo), (fo,)))

    def _make_estimator(self) -> Any:
        s = self._spec
        return MLPClassifier(
            hidden_layer_sizes=s.hidden,
            activation="relu",
            solver="sgd",
            learning_rate="constant",
            learning_rate_init=s.learning_rate,
            momentum=MLP_MOMENTUM,
            nesterovs_momentum=True,
            alpha=s.l2,
            batch_size=s.batch_size,
            shuffle=False,  # we shuffle ourselves, with the adapter's seeded stream
            early_stopping=False,
            random_state=s.seed,
        )

    def _warm_up(self) -> None:
        self._fit_batch(np.zeros((len(self._classes), self._spec.n_features)), self._classes)

    def _initial_vector(self, rng: np.random.Generator) -> NDArray[np.float32]:
        # Glorot-uniform with sklearn's own bounds for ReLU nets, drawn from our seeded Generator
        # so the same spec gives the same bits (for one numpy version; version 0 is shipped as a
        # vector anyway, so devices never need to reproduce it).
        parts: list[NDArray[np.float64]] = []
        units = self._layer_units()
        for fan_in, fan_out in itertools.pairwise(units):
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            parts.append(rng.uniform(-bound, bound, fan_in * fan_out))
            parts.append(rng.uniform(-bound, bound, fan_out))
        return np.concatenate(parts).astype(np.float32)

    def _arrays(self) -> list[NDArray[np.float64]]:
        est = self.estimator_
        arrays: list[NDArray[np.float64]] = []
        for coef, intercept in zip(est.coefs_, est.intercepts_, strict=True):
            arrays += [coef, intercept]
        return arrays

    def _assign(self, arrays: list[NDArray[np.float64]]) -> None:
        self.estimator_.coefs_ = arrays[0::2]
        self.estimator_.intercepts_ = arrays[1::2]

    def _reset_training_state(self) -> None:
        est = self.estimator_
        # sklearn creates a fresh optimizer (zero momentum) when `_optimizer` is missing; one
        # left behind would push the new weights along the old trajectory.
        if hasattr(est, "_optimizer"):
            del est._optimizer
        est.loss_curve_ = []
        est.best_loss_ = np.inf
        est._no_improvement_count = 0
        est.n_iter_ = 0
        est.t_ = 0

    def _fit_batch(self, X: NDArray[np.float64], y: NDArray[Any]) -> None:
        est = self.estimator_
        n = X.shape[0]
        # One optimizer step per call: sklearn splits what it gets into batches of batch_size.
        est.batch_size = n
        # sklearn divides its L2 term by the batch size; scaling alpha by it gives the
        # "mean loss + l2/2 ||W||^2" objective the other kinds use.
        est.alpha = self._spec.l2 * n
        est.partial_fit(X, y, classes=self._classes)
        # sklearn appends one loss per call; keep the list bounded on a long-lived device.
        del est.loss_curve_[:-1]


class LinearAdapter(_SGDParams):
    """Linear regressor trained with scikit-learn's `SGDRegressor` (squared error).

    As for `LogisticAdapter`, sklearn steps after every sample within a mini-batch.
    """

    kind = "linear"

    def _param_shapes(self) -> tuple[tuple[int, ...], ...]:
        return ((self._spec.n_features,), (1,))

    def _make_estimator(self) -> Any:
        return SGDRegressor(loss="squared_error", **_sgd_settings(self._spec))

    def _warm_up(self) -> None:
        self.estimator_.partial_fit(np.zeros((1, self._spec.n_features)), np.zeros(1))

    def _check_y(self, y: ArrayLike, n_samples: int) -> NDArray[np.float64]:
        try:
            arr = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"y is not numeric: {exc}") from exc
        if arr.ndim != 1 or arr.shape[0] != n_samples:
            raise ModelError(f"y must be 1-D with {n_samples} values, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ModelError("y contains NaN or infinite values")
        return arr

    def _fit_batch(self, X: NDArray[np.float64], y: NDArray[Any]) -> None:
        self.estimator_.partial_fit(X, y)

    def evaluate(self, X: ArrayLike, y: ArrayLike) -> dict[str, float]:
        """``{"mse", "r2", "loss"}`` with loss = mse; r2 is NaN for fewer than two samples."""
        Xa = self._check_x(X)
        ya = self._check_y(y, Xa.shape[0])
        pred = self.estimator_.predict(Xa)
        mse = float(mean_squared_error(ya, pred))
        r2 = float(r2_score(ya, pred)) if ya.shape[0] >= 2 else math.nan
        return {"mse": mse, "r2": r2, "loss": mse}


_ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.kind: cls for cls in (LogisticAdapter, MLPAdapter, LinearAdapter)
}


def build_model(spec: ModelSpec) -> ModelAdapter:
    """A fresh adapter for `spec`, initialised deterministically from ``spec.seed``."""
    try:
        cls = _ADAPTERS[spec.kind]
    except KeyError:
        raise ModelError(f"no adapter for model kind {spec.kind!r}") from None
    return cls(spec)


def _sgd_settings(s: ModelSpec) -> dict[str, Any]:
    """What the two SGD estimators share: L2, a constant step, our own shuffling."""
    return {"penalty": "l2", "alpha": s.l2, "learning_rate": "constant", "eta0": s.learning_rate,
            "shuffle": False,  # we shuffle ourselves, with the adapter's seeded stream
            "average": False, "random_state": s.seed}
