"""Agent footprint: idle memory and CPU waiting for a model, peak memory while training.

    python -m fedasync_iot.bench.agent [--samples 500] [--json OUT]

Measured on this machine, side by side in one run: (1) a real ``fedasync-agent run`` process
connected to a private Mosquitto with no coordinator (idle, waiting for a model); (2) training the
MLP on digits in a child process, as the agent does by default; (3) the same training in-process,
the alternative: its peak and, more telling, the memory it keeps after training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from fedasync_iot.fleet import MosquittoBroker
from fedasync_iot.models import ModelSpec

MIB = 1024 * 1024
SPEC = ModelSpec(kind="mlp", n_features=64, classes=tuple(range(10)), hidden=(32,))


def _idle_agent(broker: MosquittoBroker, workdir: Path, settle_s: float, window_s: float
                ) -> dict[str, float]:
    config = workdir / "agent.toml"
    config.write_text(f'device_id = "bench"\nbroker = "{broker.url}"\nfleet = "bench"\n'
                      f'state_dir = "{workdir / "state"}"\ndata = "{workdir}"\n'
                      "check_interval_s = 15.0\n")
    proc = subprocess.Popen([sys.executable, "-m", "fedasync_iot.agent.cli",
                             "--config", str(config), "run"],
                            stderr=subprocess.DEVNULL)
    try:
        p = psutil.Process(proc.pid)
        time.sleep(settle_s)
        p.cpu_percent(None)
        time.sleep(window_s)
        cpu = p.cpu_percent(None)
        rss = p.memory_info().rss / MIB
    finally:
        proc.terminate()
        proc.wait(10)
    return {"agent_idle_rss_mb": round(rss, 1), "agent_idle_cpu_percent": round(cpu, 2)}


def _train_child(n: int) -> dict[str, float]:
    from fedasync_iot.agent import TrainConfig, train_in_child
    from fedasync_iot.models import Snapshot, build_model, load_digits

    train, _ = load_digits()
    weights = build_model(SPEC).get_params_vector()
    snapshot = Snapshot(version=0, spec=SPEC, weights=weights)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    update = train_in_child(snapshot, train.X[:n], train.y[:n], device_id="bench",
                            config=TrainConfig(local_epochs=1), rng=np.random.default_rng(0),
                            now=time.time())
    assert update is not None
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children: the largest child so far, i.e. the training process.
    return {"agent_train_peak_rss_mb": round(max(peak_kb, before) / 1024, 1)}


def _train_inprocess(n: int) -> dict[str, float]:
    code = (
        "import resource, time, json, numpy as np, psutil\n"
        "from fedasync_iot.agent._trainer import TrainConfig, train_update\n"
        "from fedasync_iot.models import Snapshot, build_model, ModelSpec\n"
        "from fedasync_iot.models.ml._datasets import load_digits\n"
        f"spec = ModelSpec.from_dict(json.loads({json.dumps(json.dumps(SPEC.to_dict()))}))\n"
        "train, _ = load_digits()\n"
        "snap = Snapshot(version=0, spec=spec, weights=build_model(spec).get_params_vector())\n"
        f"u = train_update(snap, train.X[:{n}], train.y[:{n}], device_id='b', "
        "config=TrainConfig(), rng=np.random.default_rng(0), now=time.time())\n"
        "print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
        " 'after': psutil.Process().memory_info().rss / 2**20}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
    r = json.loads(out.stdout)
    return {"inprocess_train_peak_rss_mb": round(r["peak"], 1),
            "inprocess_rss_after_train_mb": round(r["after"], 1)}


def run(*, samples: int = 500, settle_s: float = 5.0, window_s: float = 5.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedasync-bench-agent-") as tmp, \
            MosquittoBroker() as broker:
        result: dict[str, Any] = {"samples": samples, "cpus": os.cpu_count()}
        result.update(_idle_agent(broker, Path(tmp), settle_s, window_s))
        result.update(_train_child(samples))
        result.update(_train_inprocess(samples))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    result = run(samples=args.samples)
    for k, v in result.items():
        print(f"{k:32} {v}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
