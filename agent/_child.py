"""Train in a short-lived child process, so the long-running agent never imports scikit-learn.

Measured (README, "The agent"): the agent idles far lighter this way, and all memory used by
training returns to the OS when the child exits. The parent keeps checking the device while the
child trains and kills it when the device stops allowing training.

The job goes to the child as files in a private temp directory, never pickled: an NPZ of arrays
(read with allow_pickle=False) and a JSON document.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedasync_iot.agent._trainer import TrainConfig, train_update
from fedasync_iot.models import (
    Features,
    FedAsyncError,
    Labels,
    ModelSpec,
    Snapshot,
    UpdateMessage,
    decode_update,
    encode_update,
)

log = logging.getLogger("fedasync.agent.child")

POLL_S = 0.2


def train_in_child(
    snapshot: Snapshot,
    X: Features,
    y: Labels,
    *,
    device_id: str,
    config: TrainConfig,
    rng: np.random.Generator,
    should_stop: Callable[[], bool] | None = None,
    now: float,
    update_id: str | None = None,
    timeout_s: float = 3600.0,
) -> UpdateMessage | None:
    """Same contract as `train_update`, run in ``python -m fedasync_iot.agent._child``."""
    with tempfile.TemporaryDirectory(prefix="fedasync-train-") as tmp:
        job = Path(tmp)
        np.savez(job / "data.npz", X=X, y=y, weights=snapshot.weights)
        (job / "job.json").write_text(json.dumps({
            "spec": snapshot.spec.to_dict(), "version": snapshot.version,
            "device_id": device_id, "update_id": update_id, "now": now,
            "seed": int(rng.integers(2**63)),
            "config": {"local_epochs": config.local_epochs, "clip_norm": config.clip_norm,
                       "noise_multiplier": config.noise_multiplier},
        }))
        with (job / "stderr.txt").open("wb") as err:  # a file, not a pipe: it cannot fill up
            proc = subprocess.Popen([sys.executable, "-m", "fedasync_iot.agent._child", str(job)],
                                    stderr=err)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            if (should_stop is not None and should_stop()) or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return None
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=POLL_S)
        stderr = (job / "stderr.txt").read_text(errors="replace")
        if proc.returncode != 0:
            raise FedAsyncError(f"training process failed ({proc.returncode}): "
                                f"{stderr.strip()[-1000:]}")
        # float32 on the way back: the parent applies the configured encoding itself.
        msg = decode_update((job / "update.bin").read_bytes())
    return UpdateMessage(device_id=msg.device_id, update_id=msg.update_id,
                         base_version=msg.base_version, n_samples=msg.n_samples,
                         delta=msg.delta, encoding=config.encoding, created_at=msg.created_at,
                         metrics=msg.metrics)


def _main(job: Path) -> int:
    meta = json.loads((job / "job.json").read_text())
    with np.load(job / "data.npz", allow_pickle=False) as data:
        X, y, weights = data["X"], data["y"], data["weights"]
    snapshot = Snapshot(version=meta["version"], spec=ModelSpec.from_dict(meta["spec"]),
                        weights=weights, onnx=b"", created_at=meta["now"], metrics={})
    update = train_update(snapshot, X, y, device_id=meta["device_id"],
                          config=TrainConfig(**meta["config"]),
                          rng=np.random.default_rng(meta["seed"]),
                          update_id=meta["update_id"], now=meta["now"])
    assert update is not None  # no should_stop in the child: the parent kills us instead
    (job / "update.bin").write_bytes(encode_update(update, encoding="float32"))
    return 0


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1])))
