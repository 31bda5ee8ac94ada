"""Central differential privacy at the coordinator (DP-FedAvg, McMahan, Ramage, Talwar, Zhang
2018): each device's contribution is clipped, each aggregate gets Gaussian noise, and an
accountant composes what every device has spent over the versions it shaped.

`CentralDP` wraps FedBuff or synchronous FedAvg (any `MergeRule` whose merge is a weighted sum
of the buffered deltas): every delta is clipped to L2 norm S before the rule sees it, and every
merge it returns gets N(0, sigma^2) on each parameter, with sigma = z S scale max_d W_d, where
W_d is the sum of device d's weights in that merge. Replacing one device's updates in a merge
by zeros (the "zero-out" neighbours of Kairouz et al. 2021) moves the model by at most
S scale W_d, so each version is a Gaussian mechanism of noise multiplier z for every device in
it, whatever the weights: the noise follows the largest share (equal weights, FedBuff with
``weight_by_samples = false``, keep it smallest).

What it protects: the content of each device's updates, against anyone who sees the published
models. What it does not: which devices took part, when, and with how many samples (the
weights and the lineage are not private, and there is no random sampling of devices to
amplify with: a device merges when it is eligible); the updates themselves, which the
coordinator receives in the clear (local DP, agent/_privacy.py, protects against the
coordinator). The accountant composes, per device, the versions it shaped (RDP, models/ml/_dp.py);
the coordinator's epsilon is the largest: the guarantee every device has.

FedAsync: each version is one device's update, so the same noise per version costs the model
as much as local noise of that multiplier, and protects nothing local DP does not; it is
refused here (use local DP).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedasync_iot.coordinator._guards import Params
from fedasync_iot.coordinator._rules import Contribution, Merge, MergeRule, PendingLike
from fedasync_iot.models import ConfigError, Rejection, bounds, check_fields, epsilon


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralDPConfig:
    """The coordinator's ``[central_dp]`` table; off while `noise_multiplier` is 0."""

    # z: noise sigma / (S x the largest device share)
    noise_multiplier: float = field(default=0.0, metadata=bounds(ge=0))
    clip_norm: float = field(default=1.0, metadata=bounds(gt=0))  # S: each device's delta, L2
    delta: float = field(default=1e-5, metadata=bounds(gt=0, lt=1))
    # Fixed noise for reproducible simulations only: a coordinator in service must draw fresh
    # noise (None), or anyone who knows the seed can remove it.
    seed: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0

    def check_rule(self, rule: str, *, memory_s: float) -> None:
        """Refuse the rules the guarantee does not hold for (module docstring)."""
        if not self.enabled:
            return
        if rule == "fedasync":
            raise ConfigError("central_dp needs rule fedbuff or fedavg-sync: a FedAsync version "
                              "is one device's update (use the agents' local DP instead)",
                              key="noise_multiplier")
        if memory_s > 0:
            raise ConfigError("central_dp cannot be used with memory_s > 0: a remembered "
                              "update shapes many versions", key="memory_s")


def clip(delta: Params, max_norm: float) -> Params:
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if norm <= max_norm:
        return delta
    return (delta.astype(np.float64) * (max_norm / norm)).astype(np.float32)


def device_shares(merge: Merge) -> dict[str, float]:
    """Each device's total weight in `merge` (a device may have several updates in one)."""
    shares: dict[str, float] = {}
    for c, w in zip(merge.included, merge.weights, strict=True):
        shares[c.device_id] = shares.get(c.device_id, 0.0) + abs(w)
    return shares


def noise_std(merge: Merge, config: CentralDPConfig) -> float:
    """sigma of the noise that makes `merge` a z-Gaussian mechanism for each of its devices."""
    largest = max(device_shares(merge).values(), default=0.0)
    return config.noise_multiplier * config.clip_norm * abs(merge.scale) * largest


def central_epsilon(versions_per_device: Mapping[str, int], config: CentralDPConfig) -> float:
    """The epsilon every device has: that of the device in the most noised versions."""
    most = max(versions_per_device.values(), default=0)
    return epsilon([(config.noise_multiplier, most)], config.delta)


def versions_per_device(lineage: Iterable[Any]) -> dict[str, int]:
    """Distinct versions each device's accepted updates went into, from lineage records
    (`coordinator._store.UpdateRecord`)."""
    seen: dict[str, set[int]] = {}
    for r in lineage:
        if r.outcome == "accepted" and r.version is not None:
            seen.setdefault(r.device_id, set()).add(r.version)
    return {d: len(v) for d, v in seen.items()}


class CentralDP:
    """A `MergeRule` that clips what goes into `inner` and noises what comes out."""

    def __init__(self, inner: MergeRule, config: CentralDPConfig, *,
                 versions: Mapping[str, int] | None = None,
                 rng: np.random.Generator | None = None) -> None:
        if not config.enabled:
            raise ConfigError("central_dp is off (noise_multiplier 0)", key="noise_multiplier")
        self.inner = inner
        self.config = config
        # Per device, the noised versions it shaped: the lineage's count at start, then ours.
        self.versions: dict[str, int] = dict(versions or {})
        self.rng = rng or np.random.default_rng(config.seed)
        self._epsilon: tuple[int, float] | None = None  # (most versions, epsilon) cached

    @property
    def name(self) -> str:
        return self.inner.name

    def accepts(self, base_version: int, current_version: int) -> Rejection | None:
        return self.inner.accepts(base_version, current_version)

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()

    def pending(self) -> tuple[Contribution, ...]:
        return self.inner.pending()

    def restore(self, pending: Sequence[PendingLike], *, now: float) -> None:
        self.inner.restore([self._clipped(p) for p in pending], now=now)

    def offer(self, model: Params, c: Contribution, *, now: float) -> Merge | None:
        return self._noised(self.inner.offer(model, self._clipped(c), now=now))

    def poll(self, model: Params, *, now: float) -> Merge | None:
        return self._noised(self.inner.poll(model, now=now))

    def _clipped(self, p: PendingLike) -> Contribution:
        participation = p.participation if isinstance(p, Contribution) else 1.0
        return Contribution(update_id=p.update_id, device_id=p.device_id,
                            base_version=p.base_version, staleness=p.staleness,
                            n_samples=p.n_samples, participation=participation,
                            delta=clip(p.delta, self.config.clip_norm))

    def _noised(self, merge: Merge | None) -> Merge | None:
        if merge is None:
            return None
        sigma = noise_std(merge, self.config)
        noise = self.rng.normal(0.0, sigma, size=merge.params.shape)
        for device in device_shares(merge):
            self.versions[device] = self.versions.get(device, 0) + 1
        return replace(merge, params=(merge.params.astype(np.float64) + noise).astype(np.float32))

    def epsilon(self) -> float:
        most = max(self.versions.values(), default=0)
        if self._epsilon is None or self._epsilon[0] != most:
            self._epsilon = (most, central_epsilon(self.versions, self.config))
        return self._epsilon[1]

    def status(self) -> dict[str, Any]:
        """The coordinator's (epsilon, delta), for /status and the simulator's summary."""
        eps = self.epsilon()
        return {"mode": "central", "noise_multiplier": self.config.noise_multiplier,
                "clip_norm": self.config.clip_norm, "delta": self.config.delta,
                "epsilon": round(eps, 6) if math.isfinite(eps) else None,
                "max_versions_per_device": max(self.versions.values(), default=0),
                "devices": len(self.versions)}


def with_central_dp(rule: MergeRule, config: CentralDPConfig,
                    lineage: Callable[[], Iterable[Any]]) -> MergeRule:
    """`rule` itself when central DP is off; else wrapped, its count taken from `lineage()`
    (every version of the state directory counts as noised: start central DP on a new one)."""
    if not config.enabled:
        return rule
    return CentralDP(rule, config, versions=versions_per_device(lineage()))


def device_epsilons(lineage: Iterable[Any], config: CentralDPConfig) -> dict[str, float]:
    """Each device's central-DP epsilon: that of the versions it shaped (`devices`)."""
    counts = versions_per_device(lineage)
    by_count = {n: epsilon([(config.noise_multiplier, n)], config.delta)
                for n in set(counts.values())}
    return {d: by_count[n] for d, n in counts.items()}


def epsilon_by_version(lineage: Iterable[Any], config: CentralDPConfig) -> dict[int, float]:
    """The coordinator's epsilon as of each version that merged updates (`versions`)."""
    rows = sorted((r.version, r.device_id) for r in lineage
                  if r.outcome == "accepted" and r.version is not None)
    seen: dict[str, set[int]] = {}
    most, out, cache = 0, {}, {0: 0.0}
    for version, device in rows:
        seen.setdefault(device, set()).add(version)
        most = max(most, len(seen[device]))
        if most not in cache:
            cache[most] = epsilon([(config.noise_multiplier, most)], config.delta)
        out[version] = cache[most]
    return out


def privacy_status(rule: MergeRule) -> dict[str, Any] | None:
    """The coordinator's privacy figures, None without central DP."""
    return rule.status() if isinstance(rule, CentralDP) else None
