"""What the agent last trained on, kept in ``state_dir/progress.json`` across restarts: the
number of samples and the model version (`fedasync-agent status` shows the file)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from fedasync_iot.models import atomic_write


class TrainingProgress:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "progress.json"
        self._values: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self._values = {k: int(v) for k, v in data.items()}

    @property
    def samples_at_last_train(self) -> int:
        return self._values.get("samples_at_last_train", 0)

    @property
    def last_base_version(self) -> int:
        """The model version last trained on; -1 before the first training."""
        return self._values.get("last_base_version", -1)

    def record(self, *, n_samples: int, base_version: int) -> None:
        self._values.update(samples_at_last_train=n_samples, last_base_version=base_version)
        self._save()

    def forget_base(self) -> None:
        """Count the model held as not trained on yet, whatever its version (the coordinator
        went back to an older one)."""
        self._values.pop("last_base_version", None)
        self._save()

    def _save(self) -> None:
        atomic_write(self.path, json.dumps(self._values).encode(), fsync_dir=False)
