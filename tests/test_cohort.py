"""Synchronous rounds invite a cohort of checked-in devices, with over-selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._data import DirectorySource
from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.agent._readings import StaticReader
from fedasync_iot.coordinator._cohort import CohortSelector, parse_status
from fedasync_iot.models import ModelSpec, Snapshot, encode_snapshot
from tests.test_agent import readings


def test_invites_over_selected_share_of_eligible_devices() -> None:
    sel = CohortSelector(cohort_size=10, over_selection=1.3, deadline_s=60.0)
    assert sel.for_version(0, now=0.0) is None  # nobody checked in: an open round
    for i in range(30):
        sel.observe(f"d{i:02d}", i % 2 == 0)  # 15 eligible
    sel.observe("d00", False)  # 14 eligible

    cohort = sel.for_version(1, now=100.0)

    assert cohort is not None and len(cohort) == 13
    assert set(cohort) <= {f"d{i:02d}" for i in range(2, 30, 2)}
    assert sel.for_version(1, now=120.0) == cohort  # stable within the deadline
    assert not sel.due(1, now=120.0)
    assert sel.due(2, now=120.0)


def test_deadline_widens_the_cohort_and_keeps_earlier_invitees() -> None:
    sel = CohortSelector(cohort_size=2, over_selection=1.0, deadline_s=10.0)
    for i in range(6):
        sel.observe(f"d{i}", True)
    first = sel.for_version(3, now=0.0)
    assert first is not None and len(first) == 2
    assert sel.due(3, now=10.0)

    second = sel.for_version(3, now=10.0)

    assert second is not None and set(first) < set(second) and len(second) == 4


def test_status_parsing_never_raises() -> None:
    assert parse_status(json.dumps({"state": "online", "eligible": True}).encode()) is True
    assert parse_status(b'{"state": "offline"}') is False
    for junk in (b"", b"\xff", b"[]", b'{"eligible": "yes"}', b"[" * 100_000, b"x" * 20_000):
        assert parse_status(junk) in (None, False)


def test_agent_trains_only_when_invited(tmp_path: Path) -> None:
    class Offline:
        connected = False

        def publish(self, *a, **k) -> None: ...

    spec = ModelSpec(kind="linear", n_features=2)
    agent = Agent(AgentConfig(device_id="pi-1", state_dir=str(tmp_path),
                              policy=PolicyConfig(min_dwell_s=0), min_train_interval_s=0),
                  link=Offline(), reader=StaticReader(readings()), data=DirectorySource(tmp_path))
    weights = np.zeros(3, dtype=np.float32)
    decision = agent.check()

    agent.on_model(encode_snapshot(Snapshot(version=1, spec=spec, weights=weights,
                                            cohort=("pi-2",))))
    assert agent.snapshot.version == 1 and not agent.should_train(decision)
    agent.on_model(encode_snapshot(Snapshot(version=1, spec=spec, weights=weights,
                                            cohort=("pi-1", "pi-2"))))
    assert agent.should_train(decision)
    agent.on_model(encode_snapshot(Snapshot(version=2, spec=spec, weights=weights)))
    assert agent.snapshot.cohort is None and agent.should_train(decision)
