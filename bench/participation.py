"""What participation accounting costs the coordinator's single writer, measured side by side.

``python -m fedasync_iot.bench.participation`` times `Engine.process` on the same batches of real
encoded updates (FedAsync, MLP-sized deltas, 200 devices, durable commits on real SQLite) with
the ledger's bookkeeping only, with reweighting (FedAsync's default), with the cap and
reweighting on, and the ledger's own calls alone; runs alternate so a noisy machine affects
every variant alike. It prints updates per second and the ratios to the accounting alone.

It then times FedBuff's merge (K = 5) with and without the per-device memory (``memory_s``)
at several numbers of remembered devices, side by side: the memory re-applies every device's
latest update at every merge, so its cost grows with the devices active within its window.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from fedasync_iot.coordinator import (
    Contribution,
    Engine,
    GuardConfig,
    Incoming,
    Ledger,
    ParticipationConfig,
    RuleConfig,
    Store,
    build_rule,
)
from fedasync_iot.models import ModelSpec, UpdateMessage, encode_update

SPEC = ModelSpec(kind="mlp", n_features=64, classes=tuple(range(10)), hidden=(32,))
N_PARAMS = 64 * 32 + 32 + 32 * 10 + 10
VARIANTS = {"accounting only": ParticipationConfig(reweight=False),
            "reweight (FedAsync default)": ParticipationConfig(),
            "cap + reweight": ParticipationConfig(cap=1000, reweight=True)}


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


def _memory_rate(devices: int, memory_s: float, *, updates: int = 500) -> float:
    """FedBuff updates merged per second (the rule alone) once `devices` devices each have an
    update remembered."""
    rule = build_rule(RuleConfig(name="fedbuff", buffer_size=5, memory_s=memory_s))
    rng = np.random.default_rng(1)
    model = np.zeros(N_PARAMS, dtype=np.float32)
    deltas = (0.001 * rng.standard_normal((64, N_PARAMS))).astype(np.float32)

    def offer(i: int) -> None:
        nonlocal model
        c = Contribution(update_id=str(i), device_id=f"dev-{i % devices}", base_version=0,
                         staleness=0, n_samples=25, delta=deltas[i % 64])
        merge = rule.offer(model, c, now=1.0) or rule.poll(model, now=1.0)
        if merge is not None:
            model = merge.params

    for i in range(devices):  # every device remembered (only timed below)
        offer(i)
    start = time.perf_counter()
    for i in range(devices, devices + updates):
        offer(i)
    return updates / (time.perf_counter() - start)


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
    base = statistics.median(rates["accounting only"])
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"{name:<28} {rate:8.0f} updates/s  ratio {rate / base:.3f}")
    ledger = _ledger_rate(100_000, args.devices)
    print(f"{'ledger calls alone':<28} {ledger:8.0f} updates/s  "
          f"({1e6 / ledger:.1f} us per update, {100 * base / ledger:.1f}% of the engine's time)")
    print("FedBuff (K = 5) merge alone, MLP updates, per remembered devices:")
    for devices in (100, 1_000, 10_000):
        plain = statistics.median(_memory_rate(devices, 0.0) for _ in range(args.repeats))
        memory = statistics.median(_memory_rate(devices, 14_400.0) for _ in range(args.repeats))
        print(f"  {devices:>6} devices: plain {plain:8.0f} updates/s, memory {memory:8.0f} "
              f"updates/s, ratio {memory / plain:.4f}")


if __name__ == "__main__":
    main()
