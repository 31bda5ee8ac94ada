"""Merge rules: how guarded deltas become new global models. Pure: no I/O, the time is passed in.

Every rule is a small object whose only state is what it has buffered (`pending()`), so the
service can persist that buffer with each commit and hand it back through `restore()`.

A merge moves the model by ``params = model + scale * sum(weights[i] * delta[i])`` (float64
inside, float32 out); `Merge` records `scale` and `weights` so lineage can say who moved it how far.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, get_args

import numpy as np
from numpy.typing import NDArray

from fedasync_iot.coordinator._guards import Params
from fedasync_iot.coordinator._staleness import Staleness
from fedasync_iot.models import (
    Bounds,
    ConfigError,
    InvalidUpdate,
    ModelError,
    Rejection,
    StateError,
    bounds,
    check_fields,
)

RuleName = Literal["fedasync", "fedbuff", "fedavg-sync"]
RULE_NAMES: tuple[str, ...] = get_args(RuleName)

# float64 holds every integer up to 2**53 exactly; more samples than that is a hostile claim.
_MAX_SAMPLES = 2**53
# The ranges of the rules' settings: RuleConfig's fields and the rules' own arguments.
_POSITIVE = Bounds(gt=0)
_UNIT = Bounds(gt=0, le=1)
_NON_NEGATIVE = Bounds(ge=0)
_COUNT = Bounds(ge=1, integer=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class Contribution:
    """A guarded update handed to a rule. `staleness` is current_version - base_version as
    measured at arrival. The rule keeps a reference to `delta`: do not change it afterwards.
    `participation` multiplies the update's merge weight (coordinator/_participation.py)."""

    update_id: str
    device_id: str
    base_version: int
    staleness: int
    n_samples: int
    delta: Params
    participation: float = 1.0

    def __post_init__(self) -> None:
        if self.staleness < 0:
            raise InvalidUpdate(Rejection.FUTURE_VERSION, f"negative staleness {self.staleness}")
        if isinstance(self.n_samples, bool) or not 0 < self.n_samples <= _MAX_SAMPLES:
            raise InvalidUpdate(Rejection.N_SAMPLES, f"n_samples must be in 1..2**53, got "
                                                      f"{self.n_samples!r}")
        if self.delta.ndim != 1:
            raise InvalidUpdate(Rejection.SHAPE, f"delta must be 1-D, got shape {self.delta.shape}")
        if not (isinstance(self.participation, float) and 0 < self.participation < math.inf):
            raise ModelError(f"participation must be a positive float, got "
                             f"{self.participation!r}")


class PendingLike(Protocol):
    """What `restore` reads: a `Contribution` or any record with its fields (the store's)."""

    @property
    def update_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def base_version(self) -> int: ...
    @property
    def staleness(self) -> int: ...
    @property
    def n_samples(self) -> int: ...
    @property
    def delta(self) -> Params: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Merge:
    """A new global model: ``params = model + scale * sum(weights[i] * included[i].delta)``.

    `weights` are each contribution's share: n_i / sum(n) for FedAvg and n_i s(t_i) p_i /
    sum(n) for FedBuff (at most 1 in sum when p = 1; `scale` is the server rate), the mixing
    weight a_t itself for FedAsync (scale 1).
    """

    params: Params
    included: tuple[Contribution, ...]
    weights: tuple[float, ...]
    scale: float = 1.0


class MergeRule(Protocol):
    """What the service drives. `offer` raises `InvalidUpdate` (rejected: buffer unchanged) or
    `ModelError` (a merge would be non-finite: buffer unchanged); `restore` raises `StateError`."""

    @property
    def name(self) -> str: ...

    def accepts(self, base_version: int, current_version: int) -> Rejection | None:
        """A rule-specific rejection reason, or None. Ask before `offer`, which raises it."""
        ...

    def offer(self, model: Params, c: Contribution, *, now: float) -> Merge | None:
        """Take `c`; a `Merge` when it completes one, None when it is only buffered."""
        ...

    def poll(self, model: Params, *, now: float) -> Merge | None:
        """Close what time (or a restore with smaller settings) has completed."""
        ...

    def next_deadline(self) -> float | None:
        """The earliest `now` at which `poll` may merge without a new offer, if any."""
        ...

    def pending(self) -> tuple[Contribution, ...]: ...

    def restore(self, pending: Sequence[PendingLike], *, now: float) -> None:
        """Replace the buffer after a restart (arrival order); then call `poll`, since a buffer
        restored under smaller settings or from another rule may be complete already."""
        ...


class _Buffered:
    """The buffer every rule keeps, with the checks it shares."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._buffer: list[Contribution] = []

    def accepts(self, base_version: int, current_version: int) -> Rejection | None:
        return None

    def pending(self) -> tuple[Contribution, ...]:
        return tuple(self._buffer)

    def next_deadline(self) -> float | None:
        return None

    def offer(self, model: Params, c: Contribution, *, now: float) -> Merge | None:
        """Buffer `c`, then merge if the rule's condition now holds; a failed merge keeps
        nothing of `c`."""
        self._admit(model, c)
        self._buffer.append(c)
        try:
            return self.poll(model, now=now)
        except BaseException:
            self._buffer.pop()
            raise

    def poll(self, model: Params, *, now: float) -> Merge | None:
        raise NotImplementedError

    def _admit(self, model: Params, c: Contribution) -> None:
        if (reason := self._refusal(c)) is not None:
            raise InvalidUpdate(reason, f"{self.name} refuses update {c.update_id}: {reason}")
        if c.delta.shape != model.shape:
            raise InvalidUpdate(Rejection.SHAPE,
                                f"delta has shape {c.delta.shape}, model {model.shape}")

    def _refusal(self, c: Contribution) -> Rejection | None:
        # The service de-duplicates by update_id first; a duplicate here is a bug upstream.
        if any(p.update_id == c.update_id for p in self._buffer):
            return Rejection.DUPLICATE
        return self.accepts(c.base_version, c.base_version + c.staleness)

    def restore(self, pending: Sequence[PendingLike], *, now: float) -> None:
        # Checked as if offered one by one; all or nothing.
        kept, self._buffer = self._buffer, []
        try:
            for p in pending:
                c = p if isinstance(p, Contribution) else Contribution(
                    update_id=p.update_id, device_id=p.device_id, base_version=p.base_version,
                    staleness=p.staleness, n_samples=p.n_samples, delta=p.delta)
                reason = self._refusal(c)
                if reason is not None:
                    raise StateError(f"{self.name} cannot restore pending update "
                                     f"{c.update_id}: {reason}")
                if self._buffer and c.delta.shape != self._buffer[0].delta.shape:
                    raise StateError(f"pending update {c.update_id} differs in shape")
                self._buffer.append(c)
        except InvalidUpdate as e:
            self._buffer = kept
            raise StateError(f"{self.name} cannot restore a pending update: {e}") from e
        except BaseException:
            self._buffer = kept
            raise


class FedAsync(_Buffered):
    """Every update becomes a model at once: ``x <- x + a_t * delta``,
    a_t = min(alpha * s(t) * p, alpha) (p: the update's participation factor, 1 unless
    reweighting is on).

    Why the cap at alpha, not 1 (issue 22): the reweighting's correction is relative, and it
    survives the cap: a frequent device's update (p < 1) is still scaled down, and a rare
    device's stale update is lifted toward the fresh step. What goes is only a step above
    alpha, with which one rare device's update, trained on its skewed data and boosted up to
    4x, could nearly replace the model (measured through `fedasync-sim` on the bench's fleet:
    a_t = 1.0 took it from 0.89 to 0.52 held-out accuracy).

    Xie et al. mix models, ``x <- (1 - a_t) x + a_t x_local``. Agents send delta = x_local -
    x_base, so we add a_t * delta instead: identical when the update is fresh (x_base = x), and
    for a stale one it keeps the progress made since x_base instead of pulling the model back
    towards that old base, with no old models kept in memory.

    It buffers nothing itself; updates restored from another rule's buffer go out together at
    the next poll or offer, each with its own a_t.

    With ``memory_s`` > 0 (the participation correction described at `FedBuff`), the step is
    a_t times the mean of every remembered device's latest update, weighted n_i * s(t_i) * p_i
    (normalised by the sum of n_i * s(t_i)), and capped at alpha in total for the same reason:
    a boosted device alone in memory would otherwise move the model alpha * s * p, up to 2.4x
    its delta.
    """

    name = "fedasync"

    def __init__(self, *, alpha: float, staleness: Staleness, memory_s: float = 0.0) -> None:
        super().__init__()
        self.alpha = _positive("alpha", alpha, at_most_one=True)
        self.staleness = staleness
        self.memory_s = _non_negative("memory_s", memory_s)
        self._memory: Memory = {}

    def offer(self, model: Params, c: Contribution, *, now: float) -> Merge:
        self._admit(model, c)
        return self._merge(model, [*self._buffer, c], now)

    def poll(self, model: Params, *, now: float) -> Merge | None:
        return self._merge(model, self._buffer, now) if self._buffer else None

    def _merge(self, model: Params, cs: Sequence[Contribution], now: float) -> Merge:
        if self.memory_s:
            a = self.alpha * max(self.staleness(c.staleness) for c in cs)
            merge, self._memory = _merge_memory(
                model, cs, self._memory, now=now, memory_s=self.memory_s, scale=a,
                weigh=lambda latest, ages: staleness_weights(latest, ages, self.staleness),
                max_step=self.alpha)
        else:
            weights = [min(self.alpha * self.staleness(c.staleness) * c.participation,
                           self.alpha) for c in cs]
            merge = merge_weighted(model, cs, weights, scale=1.0)
        self._buffer = []
        return merge


class FedBuff(_Buffered):
    """Buffer `buffer_size` updates, then
    ``x <- x + eta_g * sum(n_i s(t_i) p_i delta_i) / sum(n_i)`` (n_i = 1 when not
    `weight_by_samples`): Nguyen et al. 2022 (FedBuff, AISTATS), Algorithm 1, which scales each
    delta by s(t_i) and divides the sum by the buffer's size, not by the sum of the s(t_i).

    s therefore damps the step, not only the mix: a buffer of uniformly stale updates moves the
    model less. Normalising by sum(n_i s(t_i)) instead (this rule until issue 15) made every
    buffer move a full eta_g step however stale, and on a fast fleet, where devices train from
    a base several versions old, the model overshot and fell to 0.3 held-out accuracy for tens
    of seconds (bench/robustness.py).

    p_i is the participation factor (1 unless reweighting is on). It stays out of the
    denominator on purpose: normalising it away would let a buffer filled by the most frequent
    devices move the model as far as any other buffer, which is the bias being corrected.
    With ``memory_s`` > 0 the step is the weighted mean of the remembered updates, normalised
    by their n_i s(t_i) as before (that correction is unchanged).

    t_i is the staleness measured at arrival. That is exact: the version only moves when the
    buffer is emptied, so a buffered update cannot grow staler before it is merged.
    """

    name = "fedbuff"

    def __init__(self, *, buffer_size: int, server_lr: float, staleness: Staleness,
                 weight_by_samples: bool = True, memory_s: float = 0.0) -> None:
        super().__init__()
        self.buffer_size = _count("buffer_size", buffer_size)
        self.server_lr = _positive("server_lr", server_lr)
        self.staleness = staleness
        self.weight_by_samples = _flag("weight_by_samples", weight_by_samples)
        self.memory_s = _non_negative("memory_s", memory_s)
        self._memory: Memory = {}

    def poll(self, model: Params, *, now: float) -> Merge | None:
        # More than buffer_size only after a restore with a smaller buffer_size: merge them all.
        if len(self._buffer) < self.buffer_size:
            return None
        cs = self._buffer
        def weigh(cs: Sequence[Contribution], ages: Sequence[int]) -> NDArray[np.float64]:
            return staleness_weights(cs, ages, self.staleness, by_samples=self.weight_by_samples)

        if self.memory_s:
            merge, self._memory = _merge_memory(model, cs, self._memory, now=now,
                                                memory_s=self.memory_s, scale=self.server_lr,
                                                weigh=weigh)
        else:
            n = np.array([float(c.n_samples) if self.weight_by_samples else 1.0 for c in cs])
            s = np.array([self.staleness(c.staleness) for c in cs])
            p = np.array([c.participation for c in cs])
            merge = merge_weighted(model, cs, list(n * s * p / n.sum()), scale=self.server_lr)
        self._buffer = []
        return merge


class FedAvgSync(_Buffered):
    """Synchronous FedAvg, the baseline: ``x <- x + server_lr * sum(n_i delta_i) / sum(n_i)``;
    with server_lr = 1 that is the sample-weighted mean of the client models x + delta_i.

    A round trains on the current model only (others: "wrong_round"); a device reporting twice in
    a round counts twice, each update with its own samples. The round's clock starts when its
    model is published: at `start_round(now)`, `restore(now=...)` and every merge; if none of
    those started it, the first offer or poll does. The round closes at `cohort_size` updates,
    or at round start + `deadline_s` if it holds at least `min_updates`; with fewer, the clock
    restarts at that moment (the offer or poll that saw it), keeping what arrived.
    """

    name = "fedavg-sync"

    def __init__(self, *, cohort_size: int, deadline_s: float, min_updates: int = 1,
                 server_lr: float = 1.0) -> None:
        super().__init__()
        self.cohort_size = _count("cohort_size", cohort_size)
        self.deadline_s = _positive("deadline_s", deadline_s)
        self.min_updates = _count("min_updates", min_updates)
        if min_updates > cohort_size:
            raise ConfigError(f"min_updates ({min_updates}) exceeds cohort_size ({cohort_size})",
                              key="min_updates")
        self.server_lr = _positive("server_lr", server_lr)
        self.round_start: float | None = None

    def accepts(self, base_version: int, current_version: int) -> Rejection | None:
        # A base newer than the model is left to the guards' sharper "future_version".
        return Rejection.WRONG_ROUND if base_version < current_version else None

    def start_round(self, now: float) -> None:
        self.round_start = now

    def next_deadline(self) -> float | None:
        return None if self.round_start is None else self.round_start + self.deadline_s

    def poll(self, model: Params, *, now: float) -> Merge | None:
        if self.round_start is None:
            self.round_start = now
        deadline = now >= self.round_start + self.deadline_s
        if len(self._buffer) >= self.cohort_size or (
                deadline and len(self._buffer) >= self.min_updates):
            weights = np.array([c.n_samples for c in self._buffer], dtype=np.float64)
            merge = merge_weighted(model, self._buffer, list(weights / weights.sum()),
                           scale=self.server_lr)
            self._buffer = []
            self.round_start = now
            return merge
        if deadline:
            self.round_start = now
        return None

    def restore(self, pending: Sequence[PendingLike], *, now: float) -> None:
        super().restore(pending, now=now)
        self.round_start = now


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleConfig:
    """Which rule merges and its settings; a setting another rule uses is ignored.

    Maps one to one onto the service's ``[rule]`` table; `staleness` may be given as its text,
    ``"hinge:10,4"``, or as a table ``{kind = "hinge", a = 10, b = 4}``.

    The defaults (alpha 0.6, K = 5, s = `default_staleness`) are meant to work at any fleet
    speed without tuning: measured from one device training at a time to 100 at once, on
    fleets fast compared with the system's latency and on straggler-heavy ones
    (``python -m fedasync_iot.bench.robustness``).
    """

    name: RuleName = "fedasync"
    # None: `default_staleness(name)`; after construction always a Staleness
    staleness: Staleness | None = None
    alpha: float = field(default=0.6, metadata=_UNIT.metadata())  # fedasync
    buffer_size: int = field(default=5, metadata=_COUNT.metadata())  # fedbuff
    weight_by_samples: bool = True  # fedbuff
    server_lr: float = field(default=1.0, metadata=_POSITIVE.metadata())  # fedbuff, fedavg-sync
    cohort_size: int = field(default=10, metadata=_COUNT.metadata())  # fedavg-sync
    deadline_s: float = field(default=60.0, metadata=_POSITIVE.metadata())  # fedavg-sync
    # fedasync, fedbuff: merge along every device's latest update of the last memory_s seconds
    # (a participation correction, see FedBuff; 0: off)
    memory_s: float = field(default=0.0, metadata=_NON_NEGATIVE.metadata())
    min_updates: int = field(default=1, metadata=_COUNT.metadata())  # fedavg-sync
    # fedavg-sync: invite this many times cohort_size of the devices that report themselves
    # eligible, as production synchronous systems do, since some invitees never finish.
    over_selection: float = field(default=1.3, metadata=bounds(ge=1, le=100))

    def __post_init__(self) -> None:
        if self.name not in RULE_NAMES:
            raise ConfigError(f"unknown rule {self.name!r}; expected one of {RULE_NAMES}",
                              key="name")
        if self.staleness is None:
            object.__setattr__(self, "staleness", default_staleness(self.name))
        if isinstance(self.staleness, str):
            object.__setattr__(self, "staleness", Staleness.parse(self.staleness))
        if not isinstance(self.staleness, Staleness):
            raise ConfigError(f"staleness must be a Staleness, got {self.staleness!r}",
                              key="staleness")
        check_fields(self)
        _flag("weight_by_samples", self.weight_by_samples)
        if self.min_updates > self.cohort_size:
            raise ConfigError(f"min_updates ({self.min_updates}) exceeds cohort_size "
                              f"({self.cohort_size})", key="min_updates")

    @property
    def staleness_function(self) -> Staleness:
        """The staleness function (`staleness`, resolved)."""
        assert self.staleness is not None  # __post_init__ resolved it
        return self.staleness


def default_staleness(rule: str) -> Staleness:
    """The staleness function a rule gets when none is given (issue 22).

    The t updates that arrive while one device trains add up to a step of about t s(t) times
    the rule's own step (alpha for FedAsync; server_lr for FedBuff, whose t counts buffers).
    With s(t) = 1 / (1 + t) (Zhang, Gupta, Lian, Liu 2016; the default of issue 15) that sum
    stays at one step whatever t, one synchronous round's worth per t updates, and on
    straggler fleets the asynchronous rules lost their lead over FedAvg. With (1 + t)^-0.5 (the
    default before) it grew as sqrt(t), and fleets whose devices train from bases several
    versions old (staleness that is latency, not concurrency) overshot and collapsed. A knee
    lets the sum grow as sqrt(1 + t) up to the knee b and caps it at sqrt(1 + b) beyond: about
    1.8 mean deltas for both rules (FedAsync 0.6 x sqrt(9), FedBuff 1 x sqrt(3)). Measured in
    bench/robustness.py; a larger cap oscillated on fleets fast compared with the latency, a
    smaller one gave back the lead on straggler fleets. A fleet with one device training at a
    time sees t = 0 and the rule's full step.
    """
    return Staleness(kind="knee", a=0.5, b=2 if rule == "fedbuff" else 8)


def build_rule(config: RuleConfig) -> MergeRule:
    """A fresh rule (empty buffer) for `config`."""
    if config.name == "fedasync":
        return FedAsync(alpha=config.alpha, staleness=config.staleness_function,
                        memory_s=config.memory_s)
    if config.name == "fedbuff":
        return FedBuff(buffer_size=config.buffer_size, server_lr=config.server_lr,
                       staleness=config.staleness_function,
                       weight_by_samples=config.weight_by_samples, memory_s=config.memory_s)
    return FedAvgSync(cohort_size=config.cohort_size, deadline_s=config.deadline_s,
                      min_updates=config.min_updates, server_lr=config.server_lr)


Memory = dict[str, tuple[float, Contribution]]  # device -> (when remembered, its latest update)


def staleness_weights(cs: Sequence[Contribution], ages: Sequence[int], staleness: Staleness, *,
             by_samples: bool = True) -> NDArray[np.float64]:
    """n_i * s(age_i) (n_i = 1 unless `by_samples`), scaled so the largest is 1: computed in log
    space, since s(t) may underflow to 0 for every update of a very stale buffer."""
    logs = np.array([(math.log(c.n_samples) if by_samples else 0.0) + staleness.log(t)
                     for c, t in zip(cs, ages, strict=True)])
    w: NDArray[np.float64] = np.exp(logs - logs.max())
    return w


def _merge_memory(model: Params, cs: Sequence[Contribution], memory: Memory, *, now: float,
                  memory_s: float, scale: float,
                  weigh: Callable[[Sequence[Contribution], Sequence[int]], NDArray[np.float64]],
                  max_step: float = math.inf) -> tuple[Merge, Memory]:
    """A merge along the weighted mean of every remembered device's latest update (`cs` first
    remembered, entries older than `memory_s` forgotten); `weigh` gets the updates and their
    staleness now. The shares, scaled by `scale`, add up to at most `max_step` (scaled down
    together, so their ratios stay). Returns the merge and the new memory (the old one is left
    as it was)."""
    # The version every update of `cs` arrived at: the version has not moved since.
    version = max(c.base_version + c.staleness for c in cs)
    kept = {d: e for d, e in memory.items() if e[0] >= now - memory_s}
    for c in cs:
        kept[c.device_id] = (now, c)
    latest = [c for _, c in kept.values()]
    w = weigh(latest, [version - c.base_version for c in latest])
    share = w * np.array([c.participation for c in latest]) / w.sum()
    if (total := scale * float(share.sum())) > max_step:
        share *= max_step / total
    merge = merge_weighted(model, latest, list(share), scale=scale)
    # Lineage records `cs`; one superseded by a newer update of its device shaped nothing.
    weight = {c.update_id: float(x) * scale for c, x in zip(latest, share, strict=True)}
    return Merge(params=merge.params, included=tuple(cs),
                 weights=tuple(weight.get(c.update_id, 0.0) for c in cs), scale=1.0), kept


def merge_weighted(model: Params, cs: Sequence[Contribution], weights: Sequence[float], *,
           scale: float) -> Merge:
    if model.ndim != 1:
        raise ModelError(f"model must be a flat vector, got shape {model.shape}")
    x: NDArray[np.float64] = model.astype(np.float64)
    for c, w in zip(cs, weights, strict=True):
        # Widen before scaling: numpy keeps float32 for float32 array * Python float.
        x += (scale * w) * c.delta.astype(np.float64)
    with np.errstate(over="ignore"):
        params = x.astype(np.float32)
    if not np.isfinite(params).all():
        raise ModelError("merge produced non-finite parameters; the model is left unchanged")
    return Merge(params=params, included=tuple(cs), weights=tuple(float(w) for w in weights),
                 scale=float(scale))


def _positive(key: str, value: float, *, at_most_one: bool = False) -> float:
    (_UNIT if at_most_one else _POSITIVE).check(key, value)
    return float(value)


def _non_negative(key: str, value: float) -> float:
    _NON_NEGATIVE.check(key, value)
    return float(value)


def _count(key: str, value: int) -> int:
    _COUNT.check(key, value)
    return value


def _flag(key: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}", key=key)
    return value
