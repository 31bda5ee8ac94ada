"""The agent's outbox on disk: a finished update lives here until the coordinator acks it.

One file per update, written atomically (temp file, fsync, rename, fsync directory), named
``<sequence>-<update_id>.upd`` so that a directory listing is the send order and survives
restarts. A temp file carries its writer's pid: opening a spool removes only those whose writer is
gone (a crash mid-write), never one that a live agent is writing while an operator command (or a
second handle in the same process) opens the directory.
Bounded by count and bytes: when full, the oldest updates are dropped with a warning
(the newest carry the most current training).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from fedasync_iot.models import ID_PATTERN, StateError, atomic_write, is_valid_id

log = logging.getLogger("fedasync.agent.spool")

_NAME = re.compile(rf"^(\d{{20}})-({ID_PATTERN.pattern})\.upd$")
_TMP_PID = re.compile(r"\.(\d+)\.tmp$")


def _writer_alive(tmp: Path) -> bool:
    m = _TMP_PID.search(tmp.name)
    if m is None:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid: leave it
    return True


@dataclass(frozen=True, slots=True)
class Spooled:
    seq: int
    update_id: str
    path: Path
    size: int

    def read(self) -> bytes:
        return self.path.read_bytes()


class Spool:
    def __init__(self, directory: Path, *, max_count: int = 100,
                 max_bytes: int = 64 * 1024 * 1024, label: str = "spool") -> None:
        if max_count < 1 or max_bytes < 1:
            raise StateError("spool bounds must be positive")
        self.directory = directory
        self.label = label  # which outbox, in log messages ("spool", "held")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for tmp in directory.glob("*.tmp"):  # a crash mid-write leaves only these
                if not _writer_alive(tmp):
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
        except OSError as exc:
            raise StateError(f"cannot use spool directory {directory}: {exc}") from exc
        entries = self.entries()
        self._next = 1 + max((e.seq for e in entries), default=0)
        self.dropped = 0

    def entries(self) -> list[Spooled]:
        """Oldest first."""
        found = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                with contextlib.suppress(OSError):
                    found.append(Spooled(int(m.group(1)), m.group(2), p, p.stat().st_size))
        return sorted(found, key=lambda s: s.seq)

    def __len__(self) -> int:
        return len(self.entries())

    def put(self, update_id: str, payload: bytes) -> Spooled:
        """Store durably, then make room by dropping the oldest beyond the bounds."""
        if not is_valid_id(update_id):
            raise StateError(f"bad update id {update_id!r}")
        with self._lock:
            path = self.directory / f"{self._next:020d}-{update_id}.upd"
            self._next += 1
            try:
                atomic_write(path, payload)
            except OSError as exc:
                raise StateError(f"cannot spool update {update_id}: {exc}") from exc
            spooled = Spooled(self._next - 1, update_id, path, len(payload))
            self._enforce_bounds(keep=path)
            return spooled

    def remove(self, update_id: str) -> bool:
        """Forget an acked update; False if it was not here (a duplicate ack, say)."""
        with self._lock:
            for e in self.entries():
                if e.update_id == update_id:
                    with contextlib.suppress(FileNotFoundError):
                        e.path.unlink()
                    return True
            return False

    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def _enforce_bounds(self, *, keep: Path) -> None:
        entries = self.entries()
        total = sum(e.size for e in entries)
        while entries and (len(entries) > self.max_count or total > self.max_bytes):
            oldest = entries.pop(0)
            if oldest.path == keep:
                break
            with contextlib.suppress(FileNotFoundError):
                oldest.path.unlink()
            total -= oldest.size
            self.dropped += 1
            log.warning("%s full (%d updates, %d bytes max): dropped the oldest update %s",
                        self.label, self.max_count, self.max_bytes, oldest.update_id)
