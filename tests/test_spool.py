"""The agent's on-disk outbox."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedasync_iot.agent._spool import Spool
from fedasync_iot.models import StateError


def test_put_list_remove_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for uid in ("a", "b", "c"):
        spool.put(uid, uid.encode() * 3)

    assert [e.update_id for e in spool.entries()] == ["a", "b", "c"]
    assert spool.entries()[1].read() == b"bbb"
    assert spool.remove("b") is True
    assert spool.remove("b") is False
    assert [e.update_id for e in spool.entries()] == ["a", "c"]


def test_survives_a_restart_and_keeps_order(tmp_path: Path) -> None:
    Spool(tmp_path).put("first", b"1")
    (tmp_path / "00000000000000000009-x.tmp").write_bytes(b"half written")  # a crash mid-write

    spool = Spool(tmp_path)
    spool.put("second", b"2")

    assert [e.update_id for e in spool.entries()] == ["first", "second"]
    assert not list(tmp_path.glob("*.tmp"))


def test_opening_never_removes_a_temp_file_a_live_writer_is_writing(tmp_path: Path) -> None:
    """An operator's `fedasync-agent status` (or a second handle in the agent) opens the spool
    while the agent writes: only a dead writer's temp file is debris."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / f"00000000000000000001-a.{int(gone.stdout)}.tmp"
    live = tmp_path / f"00000000000000000002-b.{os.getpid()}.tmp"
    for f in (dead, live):
        f.write_bytes(b"half written")

    Spool(tmp_path)

    assert not dead.exists()
    assert live.read_bytes() == b"half written"


def test_bounded_by_count_drops_oldest_with_warning(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path, max_count=2)
    with caplog.at_level(logging.WARNING):
        for uid in ("a", "b", "c"):
            spool.put(uid, b"x")

    assert [e.update_id for e in spool.entries()] == ["b", "c"]
    assert spool.dropped == 1
    assert "dropped the oldest update a" in caplog.text


def test_bounded_by_bytes(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=25)
    for uid in ("a", "b", "c"):
        spool.put(uid, b"x" * 10)

    assert [e.update_id for e in spool.entries()] == ["b", "c"]
    assert spool.total_bytes() == 20


def test_rejects_ids_that_are_not_file_safe(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        Spool(tmp_path).put("../escape", b"x")
