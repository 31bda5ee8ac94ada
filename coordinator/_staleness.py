"""Staleness functions s(t) of FedAsync (Xie, Koyejo, Gupta 2019), also used to weigh FedBuff.

t = current_version - base_version >= 0; s(0) = 1 and s never increases with t:
    constant    s(t) = 1
    polynomial  s(t) = (1 + t)^-a
    hinge       s(t) = 1 if t <= b else 1 / (a (t - b) + 1)
    knee        s(t) = (1 + t)^-a if t <= b else (1 + b)^(1 - a) / (1 + t)

knee is the rules' default (issue 22); coordinator/_rules.py `default_staleness` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from fedasync_iot.models import ConfigError, InvalidUpdate, Rejection

StalenessKind = Literal["constant", "polynomial", "hinge", "knee"]
STALENESS_KINDS: tuple[str, ...] = get_args(StalenessKind)

# A bound far beyond any useful setting keeps a * t finite in float64 for any int staleness.
_MAX_A = 1e6


@dataclass(frozen=True, slots=True, kw_only=True)
class Staleness:
    """A staleness function; `str(s)` is the text `Staleness.parse` reads back."""

    kind: StalenessKind
    a: float = 0.5
    b: int = 4

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ConfigError(
                f"unknown staleness function {self.kind!r}; expected one of {STALENESS_KINDS}",
                key="staleness")
        a = self.a
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= _MAX_A:
            raise ConfigError(f"staleness a must be in (0, {_MAX_A:g}], got {a!r}", key="staleness")
        if isinstance(self.b, bool) or not isinstance(self.b, int) or self.b < 0:
            raise ConfigError(f"staleness b must be an integer >= 0, got {self.b!r}",
                              key="staleness")

    def __call__(self, staleness: int) -> float:
        t = _check(staleness)
        if self.kind == "polynomial":
            return float((1.0 + t) ** -self.a)
        if self.kind == "hinge" and t > self.b:
            return 1.0 / (self.a * (t - self.b) + 1.0)
        if self.kind == "knee":
            if t <= self.b:
                return float((1.0 + t) ** -self.a)
            return float((1.0 + self.b) ** (1.0 - self.a) / (1.0 + t))
        return 1.0

    def log(self, staleness: int) -> float:
        """ln s(t), finite where s(t) itself underflows to 0 (lets FedBuff normalise weights)."""
        t = _check(staleness)
        if self.kind == "polynomial":
            return -self.a * math.log1p(t)
        if self.kind == "hinge" and t > self.b:
            return -math.log1p(self.a * (t - self.b))
        if self.kind == "knee":
            if t <= self.b:
                return -self.a * math.log1p(t)
            return (1.0 - self.a) * math.log1p(self.b) - math.log1p(t)
        return 0.0

    def __str__(self) -> str:
        if self.kind == "polynomial":
            return f"polynomial:{float(self.a)!r}"
        if self.kind in ("hinge", "knee"):
            return f"{self.kind}:{float(self.a)!r},{self.b}"
        return "constant"

    @classmethod
    def parse(cls, text: str) -> Staleness:
        """Read ``constant``, ``polynomial[:a]``, ``hinge[:a,b]`` or ``knee[:a,b]`` (defaults
        a=0.5, b=4)."""
        if not isinstance(text, str):
            raise ConfigError(f"staleness must be a string, got {text!r}", key="staleness")
        kind, sep, args = (part.strip() for part in text.strip().partition(":"))
        if sep and not args:
            raise ConfigError(f"staleness {text!r}: nothing after ':'", key="staleness")
        if kind == "constant" and not sep:
            return cls(kind="constant")
        try:
            if kind == "polynomial":
                return cls(kind="polynomial", a=_finite(args)) if sep else cls(kind="polynomial")
            for two in ("hinge", "knee"):
                if kind != two:
                    continue
                if not sep:
                    return cls(kind=two)
                a_text, comma, b_text = args.partition(",")
                if not comma:
                    raise ValueError(f"{two} takes a,b")
                return cls(kind=two, a=_finite(a_text), b=int(b_text.strip()))
        except ValueError as e:
            raise ConfigError(f"staleness {text!r}: {e}", key="staleness") from None
        raise ConfigError(
            f"staleness {text!r}: expected 'constant', 'polynomial:a', 'hinge:a,b' or "
            "'knee:a,b'",
            key="staleness")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text.strip()!r} is not a finite number")
    return value


def _check(staleness: int) -> int:
    # The guards reject these first; a rule that still sees one must not compute a weight > 1.
    if staleness < 0:
        raise InvalidUpdate(Rejection.FUTURE_VERSION, f"negative staleness {staleness}")
    return staleness
