"""Where a device's training data comes from.

A data source returns the device's whole local dataset each time it is asked; the agent counts
how many samples are new since its last training to decide whether training is worth it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from agent._hooks import load_hook
from models import ConfigError
from models._files import Features, Labels, load_xy


class DataSource(Protocol):
    def load(self) -> tuple[Features, Labels]: ...


class DirectorySource:
    """Every ``*.csv`` and ``*.npz`` in a directory (sorted by name), concatenated."""

    def __init__(self, directory: Path, *, label: str = "label") -> None:
        self.directory = directory
        self.label = label

    def load(self) -> tuple[Features, Labels]:
        if self.directory.is_file():
            return load_xy(self.directory, label=self.label)
        if not self.directory.is_dir():
            raise ConfigError(f"data directory {self.directory} does not exist", key="data")
        files = sorted(p for p in self.directory.iterdir() if p.suffix.lower() in (".csv", ".npz"))
        if not files:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        parts = [load_xy(p, label=self.label) for p in files]
        widths = {X.shape[1] for X, _ in parts}
        if len(widths) > 1:
            raise ConfigError(f"data files in {self.directory} disagree on the feature count: "
                              f"{sorted(widths)}", key="data")
        return (np.concatenate([X for X, _ in parts]),
                np.concatenate([y for _, y in parts]))


class CallableSource:
    """A ``module:function`` hook returning ``(X, y)``: for data that lives in the device's own
    application (a sensor buffer, a database)."""

    def __init__(self, fn: Callable[[], tuple[Features, Labels]], *, name: str = "hook") -> None:
        self._fn = fn
        self.name = name

    def load(self) -> tuple[Features, Labels]:
        X, y = self._fn()
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
            raise ConfigError(f"data hook {self.name} must return X (n, d) and y (n,), got "
                              f"{X.shape} and {y.shape}", key="data")
        return X, y


def open_source(spec: str, *, label: str = "label") -> DataSource:
    """``module:function`` is a hook; anything else is a directory or file path."""
    if ":" in spec and not Path(spec).exists():
        return CallableSource(load_hook(spec, key="data"), name=spec)  # type: ignore[arg-type]
    return DirectorySource(Path(spec), label=label)
