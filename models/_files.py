"""Files: the one atomic write every durable file goes through, and feature/label files (what a
device's local data and a held-out test set look like on disk).

- NPZ: arrays ``X`` (n, d) and ``y`` (n,), loaded without pickle.
- CSV: a header row; the label column is named ``label`` (configurable); every other column is a
  numeric feature.
"""

from __future__ import annotations

import contextlib
import csv
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.typing import NDArray

from fedasync_iot.models._errors import ConfigError

Features = NDArray[np.float32]
Labels = NDArray[np.generic]


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], object], *, fsync: bool = True,
                 fsync_dir: bool = True, mode: int | None = None,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` whole: a reader, or the file after a crash, holds the old
    content or the new, never part of either.

    Writes a temp file beside it (``.<name>.<pid>.tmp``: a crashed writer's is recognisable),
    fsyncs it (`fsync`), renames it over `path`, then fsyncs the directory (`fsync_dir`), without
    which the rename itself may not survive a power cut. `data` is bytes or a function that
    writes to the open file (a large array, without a copy). `mode`: the file's exact bits from
    its creation on, whatever the umask (None: what `open` gives). `owner`: (uid, gid), -1 keeps
    one. Raises the `OSError`, the temp file removed.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash of a process that had this pid
    # O_EXCL: never write through a file or link someone else put there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 0o666 if mode is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync_dir:
        sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """fsync a directory: makes the creation, rename or removal of its entries durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_xy(path: Path, *, label: str = "label") -> tuple[Features, Labels]:
    """Read one NPZ or CSV file into (X float32, y); every problem is a ConfigError naming it."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            X, y = _load_npz(path)
        elif suffix == ".csv":
            X, y = _load_csv(path, label)
        else:
            raise ConfigError(f"{path}: unsupported data file type {suffix!r} (use .npz or .csv)")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: cannot read data: {exc}") from exc
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ConfigError(f"{path}: X must be 2-D and y 1-D of the same length, got "
                          f"{X.shape} and {y.shape}")
    if not np.isfinite(X).all():
        raise ConfigError(f"{path}: features contain NaN or infinity")
    return X, y


def _load_npz(path: Path) -> tuple[Features, Labels]:
    with np.load(path, allow_pickle=False) as data:
        missing = {"X", "y"} - set(data.files)
        if missing:
            raise ConfigError(f"{path}: NPZ needs arrays X and y, missing {sorted(missing)}")
        return np.asarray(data["X"], dtype=np.float32), np.asarray(data["y"])


def _load_csv(path: Path, label: str) -> tuple[Features, Labels]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ConfigError(f"{path}: empty CSV")
    header = [h.strip() for h in rows[0]]
    if label not in header:
        raise ConfigError(f"{path}: no label column {label!r} in the header {header}")
    li = header.index(label)
    X: list[list[float]] = []
    y: list[float] = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ConfigError(f"{path}:{n}: {len(row)} fields, header has {len(header)}")
        try:
            values = [float(v) for v in row]
        except ValueError as exc:
            raise ConfigError(f"{path}:{n}: {exc}") from exc
        y.append(values.pop(li))
        X.append(values)
    labels = np.asarray(y)
    if labels.size and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    return np.asarray(X, dtype=np.float32).reshape(len(X), len(header) - 1), labels


def save_npz(path: Path, X: Features, y: Labels) -> None:
    np.savez(path, X=np.asarray(X, dtype=np.float32), y=np.asarray(y))
