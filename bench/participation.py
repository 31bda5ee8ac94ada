"""What participation accounting costs the coordinator's single writer, measured side by side.

``python -m bench.participation`` times `Engine.process` on the same batches of real
encoded updates (FedAsync, MLP-sized deltas, 200 devices, durable commits on real SQLite) with
the ledger's bookkeeping only (the default), with the cap and reweighting on, and the ledger's
own calls alone; runs alternate so a noisy machine affects every variant alike. It prints
updates per second and the ratios to the default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from coordinator._engine import Engine, Incoming
from coordinator._guards import GuardConfig
from coordinator._participation import Ledger, ParticipationConfig
from coordinator._rules import RuleConfig, build_rule
from coordinator._store import Store
from models import ModelSpec, UpdateMessage, encode_update

SPEC = ModelSpec(kind="mlp", n_features=64, classes=tuple(range(10)), hidden=(32,))
N_PARAMS = 64 * 32 + 32 + 32 * 10 + 10
VARIANTS = {"accounting only (default)": ParticipationConfig(),
            "cap + reweight": ParticipationConfig(cap=1000, reweight=True, max_boost=4.0)}


def _batches(n_batches: int, size: int, devices: int, seed: int) -> list[list[Incoming]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_batches):
        batch = []
        for _ in range(size):
            device = f"dev-{int(rng.integers(devices)):04d}"
            payload = encode_update(UpdateMessage(
                device_id=device, update_id=uuid.UUID(int=int(rng.integers(2**63))).hex,
                base_version=0, n_samples=25,
                delta=(0.001 * rng.standard_normal(N_PARAMS)).astype(np.float32),
                created_at=1.7e9))
            batch.append(Incoming(device, payload, time.time()))
        out.append(batch)
    return out


def _engine_rate(config: ParticipationConfig, batches: list[list[Incoming]]) -> float:
    with tempfile.TemporaryDirectory() as d:
        engine = Engine(Store(Path(d)), build_rule(RuleConfig(name="fedasync", alpha=0.5)),
                        GuardConfig(max_norm=10.0, max_staleness=10**6), spec=SPEC,
                        initial_params=lambda: np.zeros(N_PARAMS, dtype=np.float32),
                        participation=config)
        start = time.perf_counter()
        for batch in batches:
            engine.process(batch)
        elapsed = time.perf_counter() - start
        engine.store.close()
    return sum(len(b) for b in batches) / elapsed


def _ledger_rate(n: int, devices: int) -> float:
    ledger = Ledger(ParticipationConfig(window_s=3600.0, cap=1000, reweight=True))
    names = [f"dev-{i:04d}" for i in range(devices)]
    start = time.perf_counter()
    for i in range(n):
        d, now = names[i % devices], i * 0.01
        ledger.retry_after(d, now=now)
        ledger.factor(d, now=now)
        ledger.taken(d, now=now)
        ledger.merged(d, now=now, weight=0.5, staleness=1, n_samples=25)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    batches = _batches(args.batches, args.batch_size, args.devices, seed=1)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, config in VARIANTS.items():
            rates[name].append(_engine_rate(config, batches))
    base = statistics.median(rates["accounting only (default)"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<28} {rate:8.0f} updates/s  ratio {rate / base:.3f}")
    ledger = _ledger_rate(100_000, args.devices)
    print(f"{'ledger calls alone':<28} {ledger:8.0f} updates/s  "
          f"({1e6 / ledger:.1f} us per update, {100 * base / ledger:.1f}% of the engine's time)")


if __name__ == "__main__":
    main()
