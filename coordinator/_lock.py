"""Who owns a state directory: an exclusive ``flock`` on ``<state_dir>/lock``.

One process writes a state directory (docs/architecture.md, State ownership): the store repairs
itself on open, deleting checkpoints newer than the last commit, and that repair is only safe
for the one writer. The kernel releases the lock when its holder dies, however it dies, so a
crash never leaves a stale lock behind; the pid and host in the file are only there to name the
holder in the refusal.

The file is written in place and never replaced: a rename would put a new, unlocked inode at
the path while the holder keeps its lock on the old one, and a second writer could then lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedasync_iot.models import StateError

LOCK_NAME = "lock"


@dataclass(frozen=True, slots=True, kw_only=True)
class Holder:
    """What the lock file says about the process holding it."""

    pid: int | None = None
    host: str | None = None
    started_at: float | None = None
    control: str | None = None  # HOST:PORT of its control endpoint, once it serves one

    def describe(self) -> str:
        if self.pid is None:
            return "another process (its lock file names no pid)"
        since = ("" if self.started_at is None else
                 time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at)))
        return f"the coordinator pid {self.pid} on host {self.host or '?'}{since}"

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "started_at": self.started_at,
                           "control": self.control}, sort_keys=True)

    @classmethod
    def parse(cls, raw: str) -> Holder | None:
        try:
            data: Any = json.loads(raw)
            pid, host = data.get("pid"), data.get("host")
            started, control = data.get("started_at"), data.get("control")
            return cls(pid=pid if isinstance(pid, int) else None,
                       host=host if isinstance(host, str) else None,
                       started_at=float(started) if isinstance(started, (int, float)) else None,
                       control=control if isinstance(control, str) and control else None)
        except (ValueError, AttributeError):
            return None


class StateDirInUse(StateError):
    """Another process holds the state directory's lock."""

    def __init__(self, state_dir: Path, holder: Holder) -> None:
        super().__init__(f"state directory {state_dir} is in use by {holder.describe()}; "
                         "stop it first or use another --state-dir")
        self.state_dir = state_dir
        self.holder = holder


class StateLock:
    """The exclusive lock on one state directory, held until `release` or process exit."""

    def __init__(self, state_dir: Path, fd: int, holder: Holder) -> None:
        self.state_dir = state_dir
        self._fd: int | None = fd
        self._holder = holder

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        """Take the lock without waiting; `StateDirInUse` names the holder if another has it."""
        path = state_dir / LOCK_NAME
        try:
            # No O_TRUNC: a process that fails to lock must not blank the holder's record.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateError(f"cannot open the lock file {path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUse(state_dir, read_holder(state_dir)) from None
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot lock {path}: {exc}") from exc
        lock = cls(state_dir, fd, Holder(pid=os.getpid(), host=socket.gethostname(),
                                         started_at=time.time()))
        lock._write()
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def note_control(self, address: str | None) -> None:
        """Record (or clear) where this holder serves control, for `rollback` to find it."""
        self._holder = replace(self._holder, control=address)
        self._write()

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def _write(self) -> None:
        if self._fd is None:
            return
        data = self._holder.to_json().encode() + b"\n"
        try:
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
        except OSError as exc:
            raise StateError(f"cannot write the lock file in {self.state_dir}: {exc}") from exc


def read_holder(state_dir: Path) -> Holder:
    """The lock file's record. A holder rewrites it in place, so a read can catch it half
    written: read again a few times before giving up on naming it."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            found = Holder.parse((state_dir / LOCK_NAME).read_text())
            if found is not None:
                return found
        time.sleep(0.01)
    return Holder()
