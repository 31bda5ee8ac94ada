"""Open a state directory's database to read it: beside the running writer, or on a copy where
nothing may be written (a backup mounted read-only, a read-only bind mount, a directory owned by
the coordinator's user).

The readers (`versions`, `devices`, `export`) open ``state.db`` with SQLite's ``mode=ro``: no
writes, and beside the writer WAL gives each query a consistent snapshot. But a WAL reader needs
the ``state.db-shm`` index, which SQLite creates when it is missing; where it cannot, ``mode=ro``
fails with only "unable to open database file". There, when no coordinator holds the directory's
lock and no ``state.db-wal`` holds commits, the database is opened ``immutable=1``: read as it
is, no locks, no -shm. Why only then: an immutable reader ignores the WAL, so it would silently
miss the newest versions of a copy taken beside a running writer (that copy still reads with
``mode=ro`` when its -shm came along), and a writer could change pages under it. Every other
case is an error naming the path, the cause and what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import stat
from pathlib import Path

from fedasync_iot.coordinator._lock import LOCK_NAME, Holder, read_holder
from fedasync_iot.models import StateError

DB_NAME = "state.db"

log = logging.getLogger("fedasync.coordinator")


def connect_readonly(state_dir: Path) -> sqlite3.Connection:
    """A read-only connection to `state_dir`'s database, or a `StateError` saying why not."""
    path = state_dir / DB_NAME
    _check_readable(state_dir, path)
    try:
        return _connect(path, "mode=ro")
    except sqlite3.Error as exc:
        failure = exc
    unwritable = _unwritable(state_dir)
    if unwritable is None:  # not the -shm, then: a damaged or foreign file
        raise StateError(f"cannot read the state in {state_dir} ({path}): {failure}")
    shm, wal = path.with_name(f"{DB_NAME}-shm"), path.with_name(f"{DB_NAME}-wal")
    holder = _writer(state_dir)
    if holder is not None:
        raise StateError(
            f"cannot read the state in {state_dir}: {unwritable}, and {holder.describe()} is "
            f"writing it, so SQLite must create {shm.name} to read beside it; run this as a "
            "user who may write the directory (the coordinator's), or on its writable path")
    if _size(wal) > 0:
        raise StateError(
            f"cannot read the state in {state_dir}: {unwritable}, and {wal.name} holds commits "
            f"not yet in {DB_NAME}, which SQLite reads only through {shm.name} (missing, and it "
            f"cannot create it); copy the directory somewhere writable (cp -a {state_dir} "
            "DEST) and pass --state-dir DEST")
    try:
        db = _connect(path, "mode=ro&immutable=1")
    except sqlite3.Error as exc:
        raise StateError(f"cannot read the state in {state_dir} ({path}): {exc}") from exc
    _note_immutable(state_dir, unwritable)
    return db


def _connect(path: Path, query: str) -> sqlite3.Connection:
    db = sqlite3.connect(f"{path.absolute().as_uri()}?{query}", uri=True,
                         check_same_thread=False, isolation_level=None)
    try:
        db.execute("SELECT 1 FROM meta LIMIT 1").fetchall()  # SQLite opens lazily: fail here
    except sqlite3.Error:
        db.close()
        raise
    return db


def _check_readable(state_dir: Path, path: Path) -> None:
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise StateError(f"no state in {state_dir} (no {DB_NAME}; pass the coordinator's "
                         "--state-dir or --config)") from None
    except PermissionError:
        raise StateError(f"cannot read the state in {state_dir}: permission denied: "
                         f"{_user()} may not enter {_described(state_dir)}; run this as the "
                         "coordinator's user, or grant it access") from None
    if not stat.S_ISREG(info.st_mode):
        raise StateError(f"no state in {state_dir} ({path} is not a file)")
    if not os.access(path, os.R_OK):
        raise StateError(f"cannot read the state in {state_dir}: permission denied: {_user()} "
                         f"may not read {_described(path)}; run this as the coordinator's user, "
                         "or grant it read access")


def _unwritable(state_dir: Path) -> str | None:
    """Why nothing can be created in `state_dir`, or None if it can."""
    with contextlib.suppress(OSError):
        if os.statvfs(state_dir).f_flag & os.ST_RDONLY:
            return f"{state_dir} is on a read-only filesystem"
    if not os.access(state_dir, os.W_OK):
        return f"{_user()} may not write {_described(state_dir)}"
    return None


def _writer(state_dir: Path) -> Holder | None:
    """The coordinator holding `state_dir`'s lock, if one does. A shared lock on a descriptor
    opened for reading needs no write access: it fails exactly while the writer holds its
    exclusive one. It is held for an instant only: a coordinator starting on the writable path
    in that instant is refused (naming no pid) and starts when run again."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: no coordinator has run here (or one from before locks)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(state_dir)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _user() -> str:
    uid = os.geteuid()
    with contextlib.suppress(KeyError, ImportError):
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    return f"uid {uid}"


def _described(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return str(path)
    return f"{path} (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)})"


@functools.cache
def _note_immutable(state_dir: Path, why: str) -> None:
    # Once per directory: a read command opens it twice (the stored model, then its rows).
    log.info("reading %s as it is on disk (SQLite immutable): %s and no coordinator is "
             "writing it", state_dir, why)
