"""The simulator's virtual clock (fleet/_virtual.py): same seed, same run, at any machine load."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedasync_iot.fleet import FleetProfile, SimConfig, build_fleet
from fedasync_iot.fleet._sim import run_rule
from fedasync_iot.fleet._virtual import EPOCH, Timers, VirtualClock


def test_timers_release_in_time_then_device_then_order_set() -> None:
    clock = VirtualClock(960.0)
    timers = Timers(clock)
    fired: list[str] = []
    timers.at(2, 5.0, lambda: fired.append("d2@5"))
    timers.at(1, 5.0, lambda: fired.append("d1@5 first"))
    timers.at(1, 5.0, lambda: fired.append("d1@5 second"))
    timers.at(0, 7.0, lambda: fired.append("d0@7"))

    assert timers.next_time() == 5.0
    assert timers.pop_due() == []  # nothing due at 0
    clock.t = 5.0
    for fn in timers.pop_due():
        fn()
    assert fired == ["d1@5 first", "d1@5 second", "d2@5"]
    assert timers.next_time() == 7.0
    timers.at(3, 1.0, lambda: None)  # in the past: due now, never before now
    assert timers.next_time() == 5.0


def test_the_clock_reaches_a_due_time_exactly() -> None:
    """A coordinator's due time converted to sim time must not fall an ulp short of it, or the
    clock would stop just before the snapshot it waits for."""
    clock = VirtualClock(960.0)
    for due in (EPOCH + 0.05, EPOCH + 1 / 3, EPOCH + 12345.678901):
        clock.t = clock.sim_at(due)
        assert clock.wall() >= due
        assert clock.t == pytest.approx((due - EPOCH) * 960.0, rel=1e-9)
    assert clock.sim_now() == clock.t
    assert math.isclose(clock.to_wall(clock.t), clock.wall())


def _lineage(run: Path) -> dict[str, list[Any]]:
    db = sqlite3.connect(f"file:{run / 'coordinator-state' / 'state.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in tables}
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rule", ["fedasync", "fedavg-sync"])
def test_same_seed_same_lineage_and_summary_beside_cpu_hogs(rule: str, tmp_path: Path) -> None:
    """Two workers (devices on two processes, whose messages race to the coordinator), run
    twice: once on a quiet machine, once beside two CPU-bound processes. Devices join, leave
    and flap; the synchronous rule also picks its cohorts from the devices' statuses."""
    profile = FleetProfile(speed_median_s=300.0, mains_fraction=0.6, late_join_fraction=0.2,
                           early_leave_fraction=0.2, flap_fraction=0.2)
    config = replace(SimConfig(), devices=8, duration_s=3.0, scale=3000.0, workers=2, seed=7,
                     profile=profile)
    assert config.clock == "virtual"  # the default
    fleet = build_fleet(config)

    quiet = run_rule(config, rule, tmp_path / "quiet", fleet=fleet, progress=False)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = run_rule(config, rule, tmp_path / "loaded", fleet=fleet, progress=False)
    finally:
        for h in hogs:
            h.kill()
            h.wait()

    a, b = _lineage(tmp_path / "quiet"), _lineage(tmp_path / "loaded")
    assert len(a["updates"]) >= 5, "too few updates to say anything"
    assert a == b
    assert quiet.summary == loaded.summary
    saved = [json.loads((tmp_path / run / "summary.json").read_text())
             for run in ("quiet", "loaded")]
    assert saved[0] == saved[1]
    assert quiet.evaluations == loaded.evaluations
    # The machine's side differs and is kept apart from the summary.
    assert {"wall_s", "peak_rss_mb", "broker", "phases"} <= set(quiet.machine)
