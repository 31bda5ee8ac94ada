"""Checks an update's delta passes before any merge rule sees it.

Reason codes (`InvalidUpdate.reason`), checked in this order:
    shape           not a 1-D floating vector of n_params values
    non_finite      a NaN or an infinity (also a float64 value beyond float32's range)
    future_version  staleness < 0: the update's base version is newer than the model
    too_stale       staleness > max_staleness
    norm            ||delta||_2 > max_norm under the "reject" policy
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from fedasync_iot.models import ConfigError, InvalidUpdate, Rejection, bounds, check_fields

Params = NDArray[np.float32]

NormPolicy = Literal["reject", "clip"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardConfig:
    max_norm: float = field(default=10.0, metadata=bounds(gt=0))  # L2 bound of a delta
    norm_policy: NormPolicy = "clip"
    # Versions behind before an update is refused. The staleness of a healthy update grows with
    # the number of devices training at once (about that number), so a small bound refused most
    # of a large fleet's work (1,000 devices: 2 of 3 updates at 50). The rules weigh staleness
    # already (s(t) = 1/(1+t): N updates of staleness ~N move the model about one step in
    # total); this bound only stops bases from long ago.
    max_staleness: int = field(default=1000, metadata=bounds(ge=0, integer=True))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.norm_policy not in ("reject", "clip"):
            raise ConfigError(f"norm_policy must be 'reject' or 'clip', got {self.norm_policy!r}",
                              key="norm_policy")


def check_update(delta: Params, *, n_params: int, staleness: int,
                 config: GuardConfig) -> tuple[Params, bool]:
    """Return a float32 copy of `delta` (clipped to max_norm under "clip") and whether it was
    clipped; raise `InvalidUpdate` with a reason code from the module docstring."""
    if not isinstance(delta, np.ndarray) or delta.dtype.kind != "f":
        raise InvalidUpdate(Rejection.SHAPE, f"delta must be a floating numpy vector, got "
                                              f"{getattr(delta, 'dtype', type(delta).__name__)}")
    if delta.shape != (n_params,):
        raise InvalidUpdate(Rejection.SHAPE,
                            f"delta has shape {delta.shape}, expected ({n_params},)")
    # Always a copy, so neither the caller nor a rule's buffer can alias the other's array.
    with np.errstate(over="ignore"):
        out = delta.astype(np.float32)
    if not np.isfinite(out).all():
        raise InvalidUpdate(Rejection.NON_FINITE, "delta contains NaN or infinite values")
    if staleness < 0:
        raise InvalidUpdate(Rejection.FUTURE_VERSION,
                            f"base version is {-staleness} ahead of the model")
    if staleness > config.max_staleness:
        raise InvalidUpdate(Rejection.TOO_STALE,
                            f"staleness {staleness} exceeds max_staleness {config.max_staleness}")
    # float64: squares of hostile float32 values (up to 3.4e38) overflow float32 to inf.
    wide = out.astype(np.float64)
    norm = float(np.linalg.norm(wide))
    if norm <= config.max_norm:
        return out, False
    if config.norm_policy == "reject":
        raise InvalidUpdate(Rejection.NORM,
                            f"delta norm {norm:.6g} exceeds max_norm {config.max_norm}")
    return (wide * (config.max_norm / norm)).astype(np.float32), True
