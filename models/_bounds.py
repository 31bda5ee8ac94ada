"""Range checks declared with the fields they guard.

A frozen config dataclass declares a field's range next to its default::

    alpha: float = field(default=0.6, metadata=bounds(gt=0, le=1))

and its ``__post_init__`` calls ``check_fields(self)``: one `ConfigError` (key: the field's name)
for the first field out of range, with a message that names the key, the bound and the value
(``alpha must be a number in (0, 1], got 1.5``). Checks across fields stay code in
``__post_init__``. A value is in range only if it is a number (never a bool), finite, an `int`
where ``integer``, and within every bound given; None passes where ``optional``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from fedasync_iot.models._errors import ConfigError, FedAsyncError

_KEY = "fedasync_bounds"


@dataclass(frozen=True, slots=True, kw_only=True)
class Bounds:
    """One field's range. `rule` overrides the generated wording of the bound in messages."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    integer: bool = False
    optional: bool = False
    rule: str | None = None

    def admits(self, value: object) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        try:
            if not math.isfinite(value):
                return False
        except OverflowError:  # an int beyond float range: beyond any bound here
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """The bound as messages say it: ``finite and > 0``, ``a number in (0, 1]``, ``an integer
        >= 1``."""
        if self.rule is not None:
            return self.rule
        low = (f"[{_num(self.ge)}" if self.ge is not None else
               f"({_num(self.gt)}" if self.gt is not None else None)
        high = (f"{_num(self.le)}]" if self.le is not None else
                f"{_num(self.lt)})" if self.lt is not None else None)
        if self.integer:
            if self.ge is not None and self.le is not None:
                text = f"an integer in {_num(self.ge)}..{_num(self.le)}"
            else:
                text = "an integer " + " and ".join(self._sides())
        elif low is not None and high is not None:
            text = f"a number in {low}, {high}"
        else:
            text = " and ".join(["finite", *self._sides()])
        return text + (" (or unset)" if self.optional else "")

    def _sides(self) -> list[str]:
        pairs = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return [f"{op} {_num(v)}" for op, v in pairs if v is not None]

    def metadata(self) -> Mapping[str, Bounds]:
        """The ``metadata`` of a dataclass field with this range."""
        return MappingProxyType({_KEY: self})

    def check(self, name: str, value: object, *,
              error: type[FedAsyncError] = ConfigError) -> None:
        """Raise `error` naming `name`, the bound and `value` unless `value` is in range."""
        if self.admits(value):
            return
        message = f"{name} must be {self.describe()}, got {value!r}"
        if issubclass(error, ConfigError):
            raise error(message, key=name)
        raise error(message)


def bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, integer: bool = False, optional: bool = False,
           rule: str | None = None) -> Mapping[str, Bounds]:
    """The ``metadata`` of a dataclass field with this range (see the module docstring)."""
    return Bounds(ge=ge, gt=gt, le=le, lt=lt, integer=integer, optional=optional,
                  rule=rule).metadata()


def check_fields(obj: object, *, error: type[FedAsyncError] = ConfigError) -> None:
    """Check every field of dataclass instance `obj` that declares `bounds`, in field order."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        declared = f.metadata.get(_KEY)
        if declared is not None:
            declared.check(f.name, getattr(obj, f.name), error=error)


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"
