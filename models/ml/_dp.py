"""Privacy accounting: the epsilon of composed Gaussian mechanisms, by Google's `dp-accounting`.

One function over the library's RDP accountant (Mironov 2017; the sampled Gaussian of Mironov,
Talwar, Zhang 2019), shared by the agent's lifetime ledger and the coordinator's central-DP
accountant. RDP rather than the library's PLD accountant: both are sound upper bounds, PLD is
tighter (33.1 against 35.1 for 100 steps at noise multiplier 2, delta 1e-5, where the exact
figure is 33.1) but took 295 MB and 1.3 s for that composition here, against a few MB and
milliseconds: too much for a 512 MB device. The library (with scipy, ~100 MB resident once
imported) is imported on the first call only, so callers decide which process pays for it.

A mechanism is ``(noise_multiplier, count)``: `count` releases of the Gaussian mechanism with
noise standard deviation `noise_multiplier` times the L2 sensitivity. `sampling_rate` < 1 is
Poisson sampling of the protected unit per release (add-or-remove neighbours).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedasync_iot.models._errors import ConfigError, FedAsyncError

Mechanism = tuple[float, int]


def epsilon(mechanisms: Iterable[Mechanism], delta: float, *, sampling_rate: float = 1.0
            ) -> float:
    """The epsilon at `delta` of all `mechanisms` composed: 0.0 for none, inf when one has
    no noise."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}", key="delta")
    if not 0 < sampling_rate <= 1:
        raise ConfigError(f"sampling rate must be in (0, 1], got {sampling_rate!r}")
    steps = [(float(z), int(n)) for z, n in mechanisms if n > 0]
    if not steps:
        return 0.0
    if any(not z > 0 for z, _ in steps):
        return math.inf
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError as exc:
        raise FedAsyncError("privacy accounting needs the dp-accounting package "
                            "(pip install 'fedasync-iot[agent]')") from exc
    accountant = RdpAccountant()
    for z, n in steps:
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
        if sampling_rate < 1:
            event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
        accountant.compose(event, n)
    return float(accountant.get_epsilon(delta))
