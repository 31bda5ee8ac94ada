"""Where a device's training data comes from.

A data source returns the device's whole local dataset each time it is asked; the agent counts
how many samples are new since its last training to decide whether training is worth it.

`check_source` looks at a source without loading it (existence, readability, file formats, the
CSV header's label column, an importable hook), so a misconfigured agent fails when it starts
and ``fedasync-agent check`` says why, instead of failing only when a model arrives.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fedasync_iot.agent._hooks import load_hook
from fedasync_iot.agent._policy import Check
from fedasync_iot.models import ConfigError, Features, Labels, load_xy

log = logging.getLogger("fedasync.agent")

_FORMATS = (".csv", ".npz")


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
        files = sorted(p for p in self.directory.iterdir() if p.suffix.lower() in _FORMATS)
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
    """``module:function`` is a hook; anything else is a directory or file path.

    A source that cannot work is a `ConfigError` now. A directory with no data files yet is
    only a warning: the installer creates it empty and the data comes later."""
    status = check_source(spec, label=label)
    if status.problem is not None and status.fatal:
        raise ConfigError(status.problem, key="data")
    if status.problem is not None:
        log.warning("%s: nothing to train on until some arrive", status.problem)
    if _is_hook(spec):
        return CallableSource(load_hook(spec, key="data"), name=spec)  # type: ignore[arg-type]
    return DirectorySource(Path(spec), label=label)


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """What `check_source` found, without loading any data."""

    found: str  # one line: "3 data files in /x", "hook site:load", or what is wrong
    expected: str  # what a usable source looks like, for the check table
    problem: str | None = None  # why it cannot give data now; None: it can
    fatal: bool = False  # the configuration is wrong; False with a problem: no data *yet*

    def to_check(self) -> tuple[Check, str]:
        """A ``data`` row for the eligibility table, with its failure phrase."""
        return Check("data", self.problem is None, self.found, self.expected), self.problem or ""


def check_source(spec: str, *, label: str = "label") -> SourceStatus:
    """Can `spec` give data? Reads directory listings, CSV headers and NPZ file lists only."""
    if _is_hook(spec):
        try:
            load_hook(spec, key="data")
        except ConfigError as exc:
            return SourceStatus("cannot import", "module:function returning (X, y)", str(exc),
                                fatal=True)
        return SourceStatus(f"hook {spec}", "module:function returning (X, y)")
    path = Path(spec)
    expected = f".csv (with a {label!r} column) or .npz files"

    def broken(problem: str, found: str = "unusable") -> SourceStatus:
        return SourceStatus(found, expected, problem, fatal=True)

    if path.is_file():
        problem = _file_problem(path, label)
        return broken(problem) if problem else SourceStatus(f"file {path}", expected)
    if not path.exists():
        kind = "file" if path.suffix.lower() in _FORMATS else "directory"
        return broken(f"data {kind} {path} does not exist: create it or set data (config, "
                      f"FEDASYNC_DATA, --data) to where the data is", "missing")
    try:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _FORMATS)
    except OSError as exc:
        return broken(f"cannot read data directory {path}: {exc.strerror or exc}", "unreadable")
    for file in files:
        problem = _file_problem(file, label)
        if problem:
            return broken(problem)
    if not files:
        return SourceStatus("no data files", expected,
                            f"no .csv or .npz files in data directory {path} yet")
    return SourceStatus(f"{len(files)} data file{'s' if len(files) > 1 else ''} in {path}",
                        expected)


def _file_problem(path: Path, label: str) -> str | None:
    """What makes one data file unusable, from its first line (CSV) or file list (NPZ)."""
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        return f"data file {path} is not .csv or .npz"
    try:
        if suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
            if not {"X.npy", "y.npy"} <= names:
                return f"data file {path} has no arrays X and y"
            return None
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
    except zipfile.BadZipFile:
        return f"data file {path} is not an NPZ (zip) file"
    except (OSError, ValueError) as exc:  # ValueError: not text (UnicodeDecodeError)
        return f"cannot read data file {path}: {getattr(exc, 'strerror', None) or exc}"
    if not header:
        return f"data file {path} is empty (a CSV needs a header row)"
    if label not in (h.strip() for h in header):
        return (f"data file {path} has no label column {label!r} (header: "
                f"{', '.join(h.strip() for h in header)[:80]}); set label_column or fix the file")
    return None


def _is_hook(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()
