"""Updates the approval hook refused, kept for an operator (``on_refused = "keep"``).

They live in ``<state_dir>/held/`` in the spool's format (durable; bounded like the spool, the
oldest dropped with a warning when full) and the agent never sends them. An operator lists them
(``fedasync-agent held list``), then releases one (``held release ID``: it moves into the spool
and goes out at the agent's next connect; a deliberate override of the hook, logged) or deletes
it (``held drop ID``). Next to each update, ``<update_id>.json`` records why it was refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from fedasync_iot.agent._spool import Spool, Spooled
from fedasync_iot.models import FedAsyncError, decode_update

log = logging.getLogger("fedasync.agent.held")


class HeldUpdates:
    def __init__(self, directory: Path, *, max_count: int = 100,
                 max_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        self._bounds = (max_count, max_bytes)
        self._spool: Spool | None = None
        self._lock = threading.Lock()  # the agent's status (network thread) counts them too

    def __len__(self) -> int:
        spool = self._existing()
        return 0 if spool is None else len(spool)

    def put(self, update_id: str, payload: bytes, *, reason: str, now: float) -> None:
        self._ensure().put(update_id, payload)
        # Informational, so a plain write, and a failed one only loses the reason text.
        try:
            self._note(update_id).write_text(json.dumps({"reason": reason, "held_at": now}))
        except OSError as exc:
            log.warning("could not record why update %s is held: %s", update_id, exc)
        self._prune_notes()

    def entries(self) -> list[dict[str, Any]]:
        """Oldest first: id, size, what the update says about itself, why it was refused."""
        spool = self._existing()
        return [] if spool is None else [self._describe(e) for e in spool.entries()]

    def release(self, update_id: str, spool: Spool) -> bool:
        """Move into `spool`; False if no such held update."""
        entry = self._find(update_id)
        if entry is None:
            return False
        reason = self._read_note(update_id).get("reason", "unknown")
        # Spool first: a crash in between leaves a copy in both places, and the coordinator
        # drops the second by update_id; the other order could lose it.
        spool.put(update_id, entry.read())
        self.drop(update_id, quiet=True)
        log.warning("released held update %s into the spool by operator request, overriding "
                    "the approval hook (%s); it is sent at the agent's next connect",
                    update_id, reason)
        return True

    def drop(self, update_id: str, *, quiet: bool = False) -> bool:
        """Delete for good; False if no such held update."""
        spool = self._existing()
        removed = spool is not None and spool.remove(update_id)
        with contextlib.suppress(FileNotFoundError):
            self._note(update_id).unlink()
        if removed and not quiet:
            log.info("dropped held update %s by operator request", update_id)
        return removed

    # -- internals ---------------------------------------------------------------------------
    def _ensure(self) -> Spool:
        """The spool of held updates, created on first use: most devices never need one."""
        with self._lock:
            if self._spool is None:
                max_count, max_bytes = self._bounds
                self._spool = Spool(self.directory, max_count=max_count, max_bytes=max_bytes,
                                    label="held")
            return self._spool

    def _existing(self) -> Spool | None:
        return self._ensure() if self._spool is not None or self.directory.is_dir() else None

    def _find(self, update_id: str) -> Spooled | None:
        spool = self._existing()
        entries = [] if spool is None else spool.entries()
        return next((e for e in entries if e.update_id == update_id), None)

    def _note(self, update_id: str) -> Path:
        return self.directory / f"{update_id}.json"

    def _read_note(self, update_id: str) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            note = json.loads(self._note(update_id).read_text())
            if isinstance(note, dict):
                return note
        return {}

    def _prune_notes(self) -> None:
        """Notes of updates the bounds dropped."""
        spool = self._existing()
        held = {e.update_id for e in spool.entries()} if spool is not None else set()
        for note in self.directory.glob("*.json"):
            if note.stem not in held:
                with contextlib.suppress(FileNotFoundError):
                    note.unlink()

    def _describe(self, entry: Spooled) -> dict[str, Any]:
        item: dict[str, Any] = {"update_id": entry.update_id, "bytes": entry.size}
        try:
            update = decode_update(entry.read())
            item.update(base_version=update.base_version, n_samples=update.n_samples,
                        created_at=update.created_at)
        except (OSError, FedAsyncError) as exc:
            item["error"] = str(exc)
        note = self._read_note(entry.update_id)
        item.update(reason=note.get("reason"), held_at=note.get("held_at"))
        return item
