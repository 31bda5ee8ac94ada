"""What a model is, as data: enough to rebuild an identical adapter on another machine.

A `ModelSpec` travels inside every snapshot, so `from_dict` treats its input as hostile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from fedasync_iot.models._bounds import bounds, check_fields
from fedasync_iot.models._errors import ModelError

ModelKind = Literal["logistic", "mlp", "linear"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)

_MAX_FEATURES = 1 << 20
_MAX_CLASSES = 10_000
_MAX_HIDDEN_LAYERS = 8
_MAX_UNITS = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """Architecture and training hyper-parameters of one model adapter.

    `classes` is required for classifiers (``logistic``, ``mlp``) and must be empty for the
    ``linear`` regressor. `hidden` only matters for ``mlp``.
    """

    kind: ModelKind
    n_features: int = field(metadata=bounds(ge=1, le=_MAX_FEATURES, integer=True))
    classes: tuple[int, ...] = ()
    hidden: tuple[int, ...] = (32,)
    learning_rate: float = field(default=0.01, metadata=bounds(gt=0))
    batch_size: int = field(default=32, metadata=bounds(ge=1, integer=True))
    l2: float = field(default=1e-4, metadata=bounds(ge=0))
    seed: int = field(default=0, metadata=bounds(ge=0, integer=True))

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ModelError(f"unknown model kind {self.kind!r}; expected one of {MODEL_KINDS}")
        check_fields(self, error=ModelError)
        if self.kind == "linear":
            if self.classes:
                raise ModelError("a linear regressor takes no classes")
        else:
            if not 2 <= len(self.classes) <= _MAX_CLASSES:
                raise ModelError(f"a classifier needs 2..{_MAX_CLASSES} classes")
            if not all(_is_int(c) for c in self.classes):
                raise ModelError("class labels must be integers")
            if list(self.classes) != sorted(set(self.classes)):
                raise ModelError("class labels must be unique and sorted")
        if not 1 <= len(self.hidden) <= _MAX_HIDDEN_LAYERS or not all(
            _is_int(h) and 0 < h <= _MAX_UNITS for h in self.hidden
        ):
            raise ModelError(f"hidden must be 1..{_MAX_HIDDEN_LAYERS} layers of 1..{_MAX_UNITS}")

    @property
    def is_classifier(self) -> bool:
        return self.kind != "linear"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: object) -> ModelSpec:
        """Build from decoded JSON; any malformation raises `ModelError`."""
        if not isinstance(data, dict):
            raise ModelError("model spec must be an object")
        known = {"kind", "n_features", "classes", "hidden", "learning_rate", "batch_size",
                 "l2", "seed"}
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"unknown model spec fields: {sorted(map(str, unknown))}")
        try:
            kwargs: dict[str, Any] = dict(data)
            if "classes" in kwargs:
                kwargs["classes"] = tuple(_as_list(kwargs["classes"], "classes"))
            if "hidden" in kwargs:
                kwargs["hidden"] = tuple(_as_list(kwargs["hidden"], "hidden"))
            return cls(**kwargs)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelError(f"malformed model spec: {exc}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_list(value: object, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise ModelError(f"{name} must be a list")
    return value
