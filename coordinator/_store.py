"""Durable coordinator state: SQLite (WAL) for versions, lineage and the merge buffer; model
checkpoints as files written atomically (temp file, fsync, rename, fsync directory).

Commit order is what makes a crash safe: the checkpoint file of a new version is written first,
then one SQLite transaction records the version, the lineage and the buffer. A crash between the
two leaves an orphan checkpoint newer than the database, which `open` deletes. The database is the
single source of truth for "what has been merged".

That repair is why a writable `Store` takes the state directory's lock (coordinator/_lock.py)
before it opens anything: beside a live writer, it would delete the checkpoint the writer is
about to commit. Everyone else opens the directory with `Store.open_readonly`: SQLite read-only,
no schema, no clean-up, no writes.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from fedasync_iot.coordinator._device_privacy import DevicePrivacy
from fedasync_iot.coordinator._lock import StateLock
from fedasync_iot.coordinator._participation import Ledger, ParticipationConfig, Seed, Totals
from fedasync_iot.coordinator._readonly import connect_readonly
from fedasync_iot.coordinator._rules import Contribution
from fedasync_iot.models import ModelSpec, StateError, atomic_write
from fedasync_iot.models import sync_directory as _fsync_dir

Params = NDArray[np.float32]

_WAL_PAGES = 256  # SQLite pages of 4 KiB: 1 MiB of write-ahead log between checkpoints
_WAL_BYTES = 1 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    version     INTEGER PRIMARY KEY,
    created_at  REAL NOT NULL,
    n_updates   INTEGER NOT NULL,
    checksum    TEXT NOT NULL,
    source      TEXT NOT NULL,
    metrics     TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS updates (
    update_id    TEXT PRIMARY KEY,
    device_id    TEXT NOT NULL,
    base_version INTEGER,
    staleness    INTEGER,
    n_samples    INTEGER,
    received_at  REAL NOT NULL,
    outcome      TEXT NOT NULL,
    reason       TEXT,
    weight       REAL,
    version      INTEGER,
    clipped      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS updates_by_version ON updates(version);
CREATE INDEX IF NOT EXISTS updates_by_device ON updates(device_id);
CREATE TABLE IF NOT EXISTS pending (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id    TEXT NOT NULL UNIQUE,
    device_id    TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    staleness    INTEGER NOT NULL,
    n_samples    INTEGER NOT NULL,
    delta        BLOB NOT NULL,
    participation REAL NOT NULL DEFAULT 1.0
);
-- What each device last claimed of its local privacy ledger (coordinator/_device_privacy.py).
-- WITHOUT ROWID: rows in device order, whatever order they were written in.
CREATE TABLE IF NOT EXISTS device_privacy (
    device_id   TEXT PRIMARY KEY,
    epsilon     REAL,
    delta       REAL NOT NULL,
    budget      REAL,
    reached     INTEGER NOT NULL,
    updates     INTEGER NOT NULL,
    reported_at REAL NOT NULL
) WITHOUT ROWID;
"""

_UPDATE_COLUMNS = ("update_id, device_id, base_version, staleness, n_samples, received_at, "
                   "outcome, reason, weight, version, clipped")
_INSERT_UPDATE = f"INSERT INTO updates({_UPDATE_COLUMNS}) VALUES ({', '.join('?' * 11)})"  # noqa: S608


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateRecord:
    """One row of lineage: what happened to one update."""

    update_id: str
    device_id: str
    base_version: int | None
    staleness: int | None
    n_samples: int | None
    received_at: float
    outcome: str  # accepted | buffered | rejected
    reason: str | None = None
    weight: float | None = None
    version: int | None = None
    clipped: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionRecord:
    version: int
    created_at: float
    n_updates: int
    checksum: str
    source: str  # init | merge | rollback:<v>
    metrics: dict[str, float]


class Relabel(NamedTuple):
    update_id: str
    outcome: str
    reason: str | None
    version: int | None
    weight: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit:
    """Everything one group commit makes durable at once."""

    updates: Sequence[UpdateRecord] = ()
    versions: Sequence[VersionRecord] = ()
    model: tuple[int, Params] | None = None  # (version, params) to checkpoint
    pending: Sequence[Contribution] | None = None  # the rule's whole buffer; None = unchanged
    # Earlier-committed rows whose fate is decided now (a buffer merged, a rollback dropped it).
    relabel: Sequence[Relabel] = ()


def load_ledger(store: Store, config: ParticipationConfig, *, now: float) -> Ledger:
    """The participation ledger as of `now`, rebuilt from the store's lineage."""
    ledger = Ledger(config)
    ledger.seed(*store.participation(since=now - config.window_s), now=now)
    return ledger


def checksum(params: Params) -> str:
    # Hashes the array's buffer directly: same digest as of .tobytes(), without the copy (this
    # runs once per version, i.e. per update under FedAsync).
    return hashlib.sha256(np.ascontiguousarray(params, dtype="<f4").data).hexdigest()


class Store:
    """The coordinator's state directory: ``state.db`` and ``checkpoints/v<version>.npy``."""

    def __init__(self, state_dir: Path, *, keep_checkpoints: int = 10,
                 readonly: bool = False) -> None:
        if keep_checkpoints < 1:
            raise StateError("keep_checkpoints must be at least 1")
        self.state_dir = state_dir
        self.keep_checkpoints = keep_checkpoints
        # The writer's list of the checkpoint files, sorted: read from the directory at the
        # first prune, then kept here (it owns the directory). A directory listing per commit
        # was a tenth of the coordinator's time in a 1,000-device simulation.
        self._on_disk: list[int] | None = None
        self.checkpoint_dir = state_dir / "checkpoints"
        self.readonly = readonly
        self.lock: StateLock | None = None  # held by a writable store until `close`
        self._devices: set[str] | None = None  # distinct device ids in lineage, loaded lazily
        self._db_file: tuple[int, int] | None = None  # the writer's database (device, inode)
        if readonly:
            self._db = self._connect_readonly()
            return
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot open state in {state_dir}: {exc}") from exc
        self.lock = StateLock.acquire(state_dir)  # before anything is read, let alone repaired
        try:
            self._db = sqlite3.connect(state_dir / "state.db", check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed group survives power loss, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            # The log is reused only after a checkpoint, by default at 1,000 pages (4 MB): on a
            # small volume (a 3 MB tmpfs) the log alone filled it, and as a failing commit never
            # checkpoints it stayed full. Checkpoint at 1 MB and truncate the file back to it.
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_BYTES}")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db_file = _file_id(self.db_path)
        except (OSError, sqlite3.Error) as exc:
            self.lock.release()
            raise StateError(f"cannot open state in {state_dir}: {exc}") from exc
        self._remove_orphan_checkpoints()

    @property
    def db_path(self) -> Path:
        return self.state_dir / "state.db"

    def check_present(self) -> None:
        """Raise `StateLost` if the database this writer has open is no longer the one at its
        path (deleted, or replaced). SQLite goes on writing to a deleted file without an
        error, and nothing written there survives a restart: it must not be acknowledged."""
        if self._db_file is None:  # read-only: nothing is written, nothing to lose
            return
        try:
            found = _file_id(self.db_path)
        except OSError as exc:
            raise StateLost(self.db_path, exc.strerror or str(exc)) from None
        if found != self._db_file:
            raise StateLost(self.db_path, "replaced by another file")

    @classmethod
    def open_readonly(cls, state_dir: Path) -> Store:
        """A reader beside (or without) the running service: it needs no lock, because it
        changes nothing; WAL gives it a consistent snapshot per query while the writer goes on."""
        return cls(state_dir, readonly=True)

    def _connect_readonly(self) -> sqlite3.Connection:
        # Also on a read-only copy, with a reason when it cannot (coordinator/_readonly.py).
        return connect_readonly(self.state_dir)

    def _migrate(self) -> None:
        # State written before participation reweighting existed: its buffer had factor 1.
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(pending)")}
        if "participation" not in columns:
            self._db.execute("ALTER TABLE pending ADD COLUMN participation REAL NOT NULL "
                             "DEFAULT 1.0")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self.lock is not None:
            self.lock.release()

    # -- meta --------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def spec(self) -> ModelSpec | None:
        raw = self.get_meta("spec")
        return None if raw is None else ModelSpec.from_dict(json.loads(raw))

    # -- reads -------------------------------------------------------------------------------
    def current_version(self) -> int | None:
        row = self._db.execute("SELECT MAX(version) FROM versions").fetchone()
        return None if row[0] is None else int(row[0])

    def versions(self, *, limit: int = -1) -> list[VersionRecord]:
        """The newest `limit` versions (all by default), oldest first."""
        return self._versions("ORDER BY version DESC LIMIT ?", (limit,))[::-1]

    def version(self, version: int) -> VersionRecord | None:
        found = self._versions("WHERE version = ?", (version,))
        return found[0] if found else None

    def _versions(self, where: str, args: tuple[int, ...]) -> list[VersionRecord]:
        # `where` is always one of our literals, never input.
        query = f"SELECT version, created_at, n_updates, checksum, source, metrics FROM versions {where}"  # noqa: S608, E501
        rows = self._db.execute(query, args).fetchall()
        return [VersionRecord(version=r[0], created_at=r[1], n_updates=r[2], checksum=r[3],
                              source=r[4], metrics=json.loads(r[5])) for r in rows]

    def lineage(self, *, device_id: str | None = None) -> list[UpdateRecord]:
        if device_id is None:
            return self._updates("ORDER BY rowid")
        return self._updates("WHERE device_id = ? ORDER BY rowid", (device_id,))

    def known_update(self, update_id: str) -> UpdateRecord | None:
        found = self._updates("WHERE update_id = ?", (update_id,))
        return found[0] if found else None

    def known_updates(self, update_ids: Sequence[str]) -> dict[str, UpdateRecord]:
        """The committed rows of those of `update_ids` that have one: a batch's duplicate check
        in one query per 500 ids, not one per update."""
        found: dict[str, UpdateRecord] = {}
        ids = list(dict.fromkeys(update_ids))
        try:
            for i in range(0, len(ids), 500):  # SQLite caps bound parameters (999 before 3.32)
                chunk = ids[i:i + 500]
                where = f"WHERE update_id IN ({', '.join('?' * len(chunk))})"
                found.update((r.update_id, r) for r in self._updates(where, tuple(chunk)))
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the lineage: {exc}") from exc
        return found

    def _updates(self, where: str, args: tuple[str, ...] = ()) -> list[UpdateRecord]:
        query = f"SELECT {_UPDATE_COLUMNS} FROM updates {where}"  # noqa: S608 - literal `where`
        rows = self._db.execute(query, args).fetchall()
        return [UpdateRecord(update_id=r[0], device_id=r[1], base_version=r[2], staleness=r[3],
                             n_samples=r[4], received_at=r[5], outcome=r[6], reason=r[7],
                             weight=r[8], version=r[9], clipped=bool(r[10])) for r in rows]

    def pending(self) -> list[Contribution]:
        rows = self._db.execute(
            "SELECT update_id, device_id, base_version, staleness, n_samples, delta, "
            "participation FROM pending ORDER BY seq").fetchall()
        return [Contribution(update_id=r[0], device_id=r[1], base_version=r[2], staleness=r[3],
                              n_samples=r[4], delta=np.frombuffer(r[5], dtype="<f4").copy(),
                              participation=float(r[6]))
                for r in rows]

    def participation(self, *, since: float) -> tuple[list[Totals], list[Seed]]:
        """What the participation ledger is rebuilt from: per-device totals over all lineage
        (aggregated in SQLite), and the rows taken or merged at or after `since`, by arrival."""
        totals = [Totals(*r) for r in self._db.execute(
            "SELECT device_id, SUM(outcome = 'accepted'), "
            "COALESCE(SUM(CASE WHEN outcome = 'accepted' THEN n_samples END), 0), "
            "COALESCE(SUM(CASE WHEN outcome = 'accepted' THEN staleness END), 0), "
            "SUM(outcome = 'rejected'), SUM(COALESCE(reason = 'participation_cap', 0)), "
            "MAX(received_at) FROM updates GROUP BY device_id")]
        recent = [Seed(*r) for r in self._db.execute(
            "SELECT u.device_id, u.received_at, u.weight, v.created_at "
            "FROM updates u LEFT JOIN versions v ON u.version = v.version "
            "WHERE u.outcome != 'rejected' AND (u.received_at >= ? OR v.created_at >= ?) "
            "ORDER BY u.received_at, u.rowid", (since, since))]
        return totals, recent

    def devices_seen(self) -> int:
        # Counted once, then kept up to date by `commit`: the service asks after every batch,
        # and COUNT(DISTINCT) reads the whole lineage index, which only grows.
        if self._devices is None:
            self._devices = {str(r[0]) for r in
                             self._db.execute("SELECT DISTINCT device_id FROM updates")}
        return len(self._devices)

    def device_privacy(self) -> dict[str, DevicePrivacy]:
        """What each device last reported of its local privacy ledger (`_device_privacy`)."""
        # A state written before the table existed, opened read-only, has none: nothing known.
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                            "name = 'device_privacy'").fetchone() is None:
            return {}
        return {r[0]: DevicePrivacy(epsilon=r[1], delta=r[2], budget=r[3], reached=bool(r[4]),
                                    updates=r[5], reported_at=r[6])
                for r in self._db.execute(
                    "SELECT device_id, epsilon, delta, budget, reached, updates, reported_at "
                    "FROM device_privacy ORDER BY device_id")}

    def load_checkpoint(self, version: int) -> Params:
        path = self._checkpoint_path(version)
        record = self.version(version)
        if record is None:
            raise StateError(f"version {version} is not in the database")
        if not path.exists():
            raise StateError(f"version {version} has no checkpoint; kept: "
                             f"{self.checkpointed_versions()}")
        try:
            params = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StateError(f"checkpoint of version {version} is unreadable: {exc}") from exc
        params = np.asarray(params, dtype=np.float32)
        if checksum(params) != record.checksum:
            raise StateError(f"checkpoint of version {version} does not match its checksum")
        return params

    def checkpointed_versions(self) -> list[int]:
        found = []
        for p in self.checkpoint_dir.glob("v*.npy"):
            with contextlib.suppress(ValueError):
                found.append(int(p.stem[1:]))
        return sorted(found)

    # -- writes ------------------------------------------------------------------------------
    def initialise(self, spec: ModelSpec, params: Params, *, now: float | None = None) -> None:
        """Record version 0 for a new state directory."""
        if self.current_version() is not None:
            raise StateError("state directory already initialised")
        now = time.time() if now is None else now
        self.commit(Commit(
            versions=[VersionRecord(version=0, created_at=now, n_updates=0,
                                    checksum=checksum(params), source="init", metrics={})],
            model=(0, params),
        ), meta={"spec": json.dumps(spec.to_dict(), sort_keys=True)})

    def commit(self, commit: Commit, *, meta: dict[str, str] | None = None) -> None:
        """Make one batch durable: checkpoint file first, then one transaction. Checked after
        it, failed or not, that the state directory is still there: a commit into a deleted
        database "succeeds", and a failed one is only retried while there is a point."""
        try:
            self._commit(commit, meta)
        except StateError:
            # A full disk: moving the log into the database and truncating it frees what the
            # log held, often enough for the next try.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            raise
        finally:
            self.check_present()

    def _commit(self, commit: Commit, meta: dict[str, str] | None) -> None:
        self._writable()
        if commit.model is not None:
            self._write_checkpoint(*commit.model)
        try:
            with self._transaction() as db:
                for key, value in (meta or {}).items():
                    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                               (key, value))
                db.executemany(
                    "INSERT INTO versions(version, created_at, n_updates, checksum, source, "
                    "metrics) VALUES (?, ?, ?, ?, ?, ?)",
                    [(v.version, v.created_at, v.n_updates, v.checksum, v.source,
                      json.dumps(v.metrics, sort_keys=True)) for v in commit.versions])
                db.executemany(
                    _INSERT_UPDATE,
                    [(u.update_id, u.device_id, u.base_version, u.staleness, u.n_samples,
                      u.received_at, u.outcome, u.reason, u.weight, u.version, int(u.clipped))
                     for u in commit.updates])
                db.executemany(
                    "UPDATE updates SET outcome = ?, reason = ?, version = ?, weight = ? "
                    "WHERE update_id = ?",
                    [(r.outcome, r.reason, r.version, r.weight, r.update_id)
                     for r in commit.relabel])
                if commit.pending is not None:
                    db.execute("DELETE FROM pending")
                    db.executemany(
                        "INSERT INTO pending(update_id, device_id, base_version, staleness, "
                        "n_samples, delta, participation) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(p.update_id, p.device_id, p.base_version, p.staleness, p.n_samples,
                          np.ascontiguousarray(p.delta, dtype="<f4").tobytes(), p.participation)
                         for p in commit.pending])
        except sqlite3.Error as exc:
            if commit.model is not None:
                with contextlib.suppress(OSError):
                    self._checkpoint_path(commit.model[0]).unlink()
            raise StateError(f"commit failed: {exc}") from exc
        if self._devices is not None:
            self._devices.update(u.device_id for u in commit.updates)
        if commit.model is not None:
            self._prune_checkpoints(commit.model[0])

    def record_privacy(self, reports: dict[str, DevicePrivacy]) -> None:
        """Keep the newest privacy figures of these devices, in one transaction."""
        self._writable()
        try:
            with self._transaction() as db:
                db.executemany(
                    "INSERT OR REPLACE INTO device_privacy(device_id, epsilon, delta, budget, "
                    "reached, updates, reported_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(d, p.epsilon, p.delta, p.budget, int(p.reached), p.updates,
                      p.reported_at) for d, p in sorted(reports.items())])
        except sqlite3.Error as exc:
            raise StateError(f"cannot record the devices' privacy figures: {exc}") from exc

    def set_metrics(self, version: int, metrics: dict[str, float]) -> None:
        self._writable()
        with self._transaction() as db:
            db.execute("UPDATE versions SET metrics = ? WHERE version = ?",
                       (json.dumps(metrics, sort_keys=True), version))

    # -- internals ---------------------------------------------------------------------------
    def _writable(self) -> None:
        # Checked up front: `commit` writes its checkpoint file before SQLite could refuse.
        if self.readonly:
            raise StateError(f"the state in {self.state_dir} is open read-only")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _checkpoint_path(self, version: int) -> Path:
        return self.checkpoint_dir / f"v{version:010d}.npy"

    def _write_checkpoint(self, version: int, params: Params) -> None:
        path = self._checkpoint_path(version)
        try:
            atomic_write(path, lambda f: np.save(f, np.ascontiguousarray(params, dtype="<f4"),
                                                 allow_pickle=False), fsync_dir=False)
            # Synced here, by name: a full disk shows in it (tests/test_disk_full.py injects
            # ENOSPC there), and the rename is durable only after it.
            _fsync_dir(self.checkpoint_dir)
        except OSError as exc:
            raise StateError(f"cannot write checkpoint of version {version}: {exc}") from exc

    def _prune_checkpoints(self, written: int) -> None:
        """Keep the newest N; version 0 is kept too so `rollback --to 0` always works."""
        if self._on_disk is None:
            self._on_disk = self.checkpointed_versions()
        elif written not in self._on_disk:
            bisect.insort(self._on_disk, written)
        for v in self._on_disk[:-self.keep_checkpoints]:
            if v != 0:
                with contextlib.suppress(OSError):
                    self._checkpoint_path(v).unlink()
                self._on_disk.remove(v)

    def _remove_orphan_checkpoints(self) -> None:
        current = self.current_version()
        # Temp files of atomic_write, and "v*.tmp" of releases before it.
        for p in [*self.checkpoint_dir.glob(".v*.tmp"), *self.checkpoint_dir.glob("v*.tmp")]:
            with contextlib.suppress(OSError):
                p.unlink()
        for v in self.checkpointed_versions():
            if current is None or v > current:
                with contextlib.suppress(OSError):
                    self._checkpoint_path(v).unlink()


class StateLost(StateError):
    """The state directory (its database) disappeared under the running writer."""

    def __init__(self, path: Path, cause: str) -> None:
        super().__init__(f"the state database {path} is gone ({cause}): the state directory was "
                         "deleted or replaced under the running coordinator; stopping, with "
                         "nothing acknowledged that was not durable. Restore the state "
                         "directory from a backup, or start the fleet over with `run --reset`")
        self.path = path
        self.cause = cause


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
