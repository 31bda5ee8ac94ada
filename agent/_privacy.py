"""The device's lifetime privacy ledger: every update it lets out, composed by an accountant.

What is protected: the device's whole local dataset (device-level DP). Each update is clipped
to L2 norm C and gets N(0, (sigma C)^2) noise (agent/_trainer.py); any two datasets give clipped
updates inside the same C-ball, so the L2 sensitivity is 2C and one update is a Gaussian
mechanism with noise multiplier sigma / 2. The ledger composes every such release over the
device's life with the RDP accountant of `dp-accounting` (models/ml/_dp.py).

No amplification by sampling: the trainer runs `local_epochs` over all local samples, or, when
`training.window_fraction` fits the work into short windows (agent/_budget.py), over a uniform
random subset drawn without replacement. A subset would amplify a per-sample guarantee, but a
device is in every update it sends itself, so its device-level loss is the full one.

Durable and never reset: `<state_dir>/privacy.json` counts the releases by noise multiplier,
written (fsync, atomic rename) before the update is spooled, so a crash can only over-count. A
new model, a restart or a new noise setting continue the same count. A file that cannot be read
stops the agent sending under a budget (never a silent reset); deleting it is an operator's
deliberate act.

Memory: the accountant (scipy, ~100 MB) runs in a short-lived child process when the agent
trains in one (`account_in_child`); the figures are cached in the ledger, so an idle agent never
loads it.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedasync_iot.agent._policy import Check
from fedasync_iot.models import (
    FedAsyncError,
    Mechanism,
    atomic_write,
    bounds,
    check_fields,
    epsilon,
)

log = logging.getLogger("fedasync.agent.privacy")

LEDGER_FILE = "privacy.json"
CHILD_TIMEOUT_S = 300.0

Accountant = Callable[[Sequence[Mechanism], float], float]


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyConfig:
    # The device's lifetime epsilon: no update is sent that would take it past. None: counted
    # and reported, never enforced.
    epsilon_budget: float | None = field(default=None, metadata=bounds(gt=0, optional=True))
    # Below 1 / (the number of devices in the fleet), as usual for a device-level guarantee.
    delta: float = field(default=1e-5, metadata=bounds(gt=0, lt=1))

    def __post_init__(self) -> None:
        check_fields(self)


def device_multiplier(noise_multiplier: float) -> float:
    """The noise multiplier against the device-level sensitivity 2C (module docstring)."""
    return noise_multiplier / 2


def account_in_child(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """`models.ml._dp.epsilon` in ``python -m fedasync_iot.agent._privacy``: the library never loads
    here."""
    if all(n <= 0 for _, n in mechanisms) or any(z <= 0 for z, n in mechanisms if n > 0):
        return epsilon(mechanisms, delta)  # 0 or inf: answered without the library
    job = json.dumps({"mechanisms": list(mechanisms), "delta": delta})
    try:
        out = subprocess.run([sys.executable, "-m", "fedasync_iot.agent._privacy", job],
                             capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FedAsyncError(f"privacy accountant did not answer in {CHILD_TIMEOUT_S:.0f} s"
                            ) from exc
    if out.returncode != 0:
        raise FedAsyncError(f"privacy accountant failed ({out.returncode}): "
                            f"{out.stderr.strip()[-500:]}")
    value = json.loads(out.stdout)["epsilon"]
    return math.inf if value is None else float(value)


def account_here(mechanisms: Sequence[Mechanism], delta: float) -> float:
    return epsilon(mechanisms, delta)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)


class PrivacyLedger:
    """The releases this device made, and whether one more fits the budget."""

    def __init__(self, state_dir: Path, config: PrivacyConfig, *, noise_multiplier: float,
                 accountant: Accountant = account_here) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self.config = config
        self.multiplier = device_multiplier(noise_multiplier)
        self.accountant = accountant
        self.releases: dict[float, int] = {}
        self.error: str | None = None  # why the ledger cannot be trusted: nothing is sent
        self.spent: float | None = None
        self.next: float | None = None  # spent after one more release at this multiplier
        self._stopped_logged = False
        self._load()
        self._refresh()

    # -- the question the agent asks ---------------------------------------------------------
    def allows_next(self) -> bool:
        """Whether one more update stays within the budget (always, with no budget)."""
        budget = self.config.epsilon_budget
        if budget is None:
            return True
        allowed = self.error is None and self.next is not None and self.next <= budget
        if not allowed and not self._stopped_logged:
            self._stopped_logged = True
            if self.error is not None:
                why = self.error
            elif self.next is None:
                why = "the accountant could not say what the next update would cost"
            else:
                why = (f"the next update would take it to epsilon {self.next:.3g} (delta "
                       f"{self.config.delta:g}) past its budget {budget:g}")
            log.warning("privacy budget: this device sends no more updates (it keeps fetching "
                        "models for inference): %s; spent %s over %d update(s)", why,
                        self._show(self.spent), self.count)
        return allowed

    def record(self) -> None:
        """One update leaves the device: durably counted before it is spooled."""
        if self.error is not None:
            log.error("privacy ledger unusable, this update is not counted there: %s",
                      self.error)
            return
        z = self.multiplier
        self.releases[z] = self.releases.get(z, 0) + 1
        self.spent, self.next = self.next, None  # what was the next is spent now
        self._refresh()
        self._write()

    # -- what it reports ---------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(self.releases.values())

    @property
    def exhausted(self) -> bool:
        budget = self.config.epsilon_budget
        return budget is not None and not self.allows_next()

    def status(self) -> dict[str, Any]:
        """For the agent's status (JSON: an unbounded epsilon is null with bounded false)."""
        return {"epsilon_spent": _finite(self.spent), "bounded": self.spent is not None
                and math.isfinite(self.spent), "epsilon_budget": self.config.epsilon_budget,
                "delta": self.config.delta, "updates": self.count,
                "next_epsilon": _finite(self.next), "exhausted": self.exhausted,
                "error": self.error}

    def check(self) -> tuple[Check, str]:
        """The `privacy` row of `fedasync-agent check` (would the next update be sent?), with
        its failure phrase."""
        budget = self.config.epsilon_budget
        reading = (f"epsilon {self._show(self.spent)} spent over {self.count} update(s), "
                   f"next {self._show(self.next)} (delta {self.config.delta:g})")
        if self.error is not None:
            reading = f"ledger unusable: {self.error}"
        threshold = "no budget" if budget is None else f"next update's epsilon <= {budget:g}"
        passed = self.allows_next()
        return (Check("privacy", passed, reading, threshold),
                "" if passed else "privacy budget spent: no more updates")

    @staticmethod
    def _show(value: float | None) -> str:
        return "unknown" if value is None else f"{value:.3g}"

    # -- the file ----------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._unusable(f"cannot read it: {exc}")
            return
        try:
            doc = json.loads(raw)
            releases = {float(z): int(n) for z, n in doc["releases"]}
            if any(z < 0 or n < 0 for z, n in releases.items()):
                raise ValueError("a negative noise multiplier or count")
            cache = doc.get("epsilon")
        except (ValueError, KeyError, TypeError) as exc:
            self._unusable(f"not a privacy ledger ({exc})")
            return
        self.releases = releases
        if (isinstance(cache, dict) and cache.get("delta") == self.config.delta
                and cache.get("multiplier") == self.multiplier):
            # The accountant's figures for exactly these releases: no child process at start.
            self.spent = math.inf if cache.get("spent") is None else float(cache["spent"])
            self.next = math.inf if cache.get("next") is None else float(cache["next"])

    def _unusable(self, why: str) -> None:
        self.error = f"{self.path}: {why}"
        log.error("privacy ledger %s; no update is sent under a budget until an operator "
                  "repairs or deletes it (deleting it forgets what this device spent)",
                  self.error)

    def _refresh(self) -> None:
        if self.error is not None:
            return
        after = dict(self.releases)
        after[self.multiplier] = after.get(self.multiplier, 0) + 1
        try:
            if self.spent is None:
                self.spent = self.accountant(sorted(self.releases.items()), self.config.delta)
            if self.next is None:
                self.next = self.accountant(sorted(after.items()), self.config.delta)
        except FedAsyncError as exc:
            self.spent = self.next = None
            log.error("privacy accountant: %s; no update is sent under a budget", exc)

    def _write(self) -> None:
        doc: dict[str, Any] = {"schema": 1, "releases": sorted(self.releases.items())}
        if self.spent is not None and self.next is not None:  # null stands for infinity
            doc["epsilon"] = {"delta": self.config.delta, "multiplier": self.multiplier,
                              "spent": _finite(self.spent), "next": _finite(self.next)}
        atomic_write(self.path, json.dumps(doc).encode())


def _main(job: str) -> int:
    request = json.loads(job)
    value = epsilon([(float(z), int(n)) for z, n in request["mechanisms"]],
                    float(request["delta"]))
    print(json.dumps({"epsilon": value if math.isfinite(value) else None}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
