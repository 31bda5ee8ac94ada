"""What devices say of their local privacy ledger, as the coordinator keeps it: validated, stored
when it changes, readable from an old state directory; hostile statuses ignored and counted."""

from __future__ import annotations

import json
import math
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from fedasync_iot.agent._privacy import PrivacyConfig, PrivacyLedger
from fedasync_iot.coordinator._device_privacy import (
    MAX_EPSILON,
    BadStatus,
    DevicePrivacy,
    PrivacyBook,
    from_status,
)
from fedasync_iot.coordinator._store import Store
from fedasync_iot.models import Topics
from tests.helpers import Listener, wait_for
from tests.test_privacy import budget_for

LEDGER = {"epsilon_spent": 1.5, "bounded": True, "epsilon_budget": 2.0, "delta": 1e-5,
          "updates": 3, "next_epsilon": 2.1, "exhausted": True, "error": None}

# (the privacy object, or a whole status, and the reason it is refused)
HOSTILE = [
    ({**LEDGER, "epsilon_spent": math.nan}, "epsilon"),
    ({**LEDGER, "epsilon_spent": -0.5}, "epsilon"),
    ({**LEDGER, "epsilon_spent": 1e300}, "epsilon"),
    ({**LEDGER, "epsilon_spent": math.inf}, "epsilon"),
    ({**LEDGER, "epsilon_spent": "1.5"}, "epsilon"),
    ({**LEDGER, "epsilon_spent": True}, "epsilon"),
    ({**LEDGER, "delta": 0}, "delta"),
    ({**LEDGER, "delta": None}, "delta"),
    ({**LEDGER, "epsilon_budget": -2.0}, "budget"),
    ({**LEDGER, "epsilon_budget": [2.0]}, "budget"),
    ({**LEDGER, "exhausted": "yes"}, "exhausted"),
    ({**LEDGER, "epsilon_budget": None}, "exhausted"),  # at a budget it does not have
    ({**LEDGER, "updates": 2.5}, "updates"),
    ({**LEDGER, "updates": -1}, "updates"),
    ({**LEDGER, "updates": 10**30}, "updates"),
    ({**LEDGER, "updates": False}, "updates"),
    ("all spent", "type"),
    ([1.5, 2.0], "type"),
]


def status(ledger: object) -> dict[str, object]:
    return {"state": "online", "device_id": "pi-1", "eligible": True, "privacy": ledger}


def test_the_agents_own_ledger_status_is_taken_as_it_is(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path, PrivacyConfig(epsilon_budget=budget_for(2, sigma=4.0)),
                           noise_multiplier=4.0)
    while ledger.allows_next():
        ledger.record()
    # Through JSON, as on the wire.
    report = from_status(json.loads(json.dumps(status(ledger.status()))), now=100.0)
    assert ledger.spent is not None
    assert report == DevicePrivacy(epsilon=round(ledger.spent, 6), delta=1e-5,
                                   budget=budget_for(2, sigma=4.0), reached=True, updates=2,
                                   reported_at=100.0)
    # No noise: nothing bounds it, and it says so with null.
    (tmp_path / "free").mkdir()
    free = PrivacyLedger(tmp_path / "free", PrivacyConfig(), noise_multiplier=0.0)
    free.record()
    report = from_status(json.loads(json.dumps(status(free.status()))), now=1.0)
    assert report is not None and report.epsilon is None and not report.reached
    # An agent from before issue 23, and a last will, say nothing of privacy.
    assert from_status({"state": "online", "eligible": True}, now=1.0) is None
    assert from_status({"state": "offline"}, now=1.0) is None


@pytest.mark.parametrize(("ledger", "reason"), HOSTILE)
def test_hostile_figures_are_refused_with_a_reason(ledger: object, reason: str) -> None:
    with pytest.raises(BadStatus) as caught:
        from_status(status(ledger), now=1.0)
    assert caught.value.reason == reason


def test_a_huge_but_finite_epsilon_an_honest_device_can_claim_is_kept() -> None:
    report = from_status(status({**LEDGER, "epsilon_spent": MAX_EPSILON}), now=1.0)
    assert report is not None and report.epsilon == MAX_EPSILON


def test_the_book_writes_only_what_changed() -> None:
    first = from_status(status(LEDGER), now=1.0)
    assert first is not None
    book = PrivacyBook({"pi-1": first})
    same_later = from_status(status(LEDGER), now=50.0)
    assert same_later is not None and not book.observe("pi-1", same_later)
    assert book.unwritten() == {} and book.latest()["pi-1"].reported_at == 1.0

    more = from_status(status({**LEDGER, "updates": 4, "epsilon_spent": 1.9}), now=60.0)
    assert more is not None and book.observe("pi-1", more)
    todo = book.unwritten()
    assert todo == {"pi-1": more}
    newer = from_status(status({**LEDGER, "updates": 5, "epsilon_spent": 1.95}), now=70.0)
    assert newer is not None and book.observe("pi-1", newer)  # arrives while `todo` is written
    book.written(todo)
    assert book.unwritten() == {"pi-1": newer}
    book.written({"pi-1": newer})
    assert book.unwritten() == {}


def test_a_state_from_before_the_table_opens_read_only_and_upgrades(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:  # as an older coordinator left it
        db.execute("DROP TABLE device_privacy")
    reader = Store.open_readonly(tmp_path)
    try:
        assert reader.device_privacy() == {}
    finally:
        reader.close()
    store = Store(tmp_path)
    report = from_status(status(LEDGER), now=5.0)
    assert report is not None
    try:
        store.record_privacy({"pi-1": report})
    finally:
        store.close()
    reader = Store.open_readonly(tmp_path)
    try:
        assert reader.device_privacy() == {"pi-1": report}
    finally:
        reader.close()


@pytest.mark.broker
def test_a_hostile_status_is_ignored_and_counted(broker, fleet_name, tmp_path) -> None:
    from tests.test_coordinator_service import make_service

    service = make_service(broker, fleet_name, tmp_path)
    topic = Topics(fleet_name).status("pi-1")
    device = Listener(broker.url, [topic])
    good = {**LEDGER, "updates": 2, "epsilon_spent": 1.2}
    try:
        device.publish(topic, json.dumps(status(good)).encode())
        assert wait_for(lambda: service.devices()["local_privacy"]["devices"] == 1, timeout=30)
        device.publish(topic, b"")  # a retained status cleared: nothing to count
        for ledger, _ in HOSTILE:
            device.publish(topic, json.dumps(status(ledger)).encode())
        device.publish(topic, b"{not json")
        device.publish(topic, json.dumps(status({**good, "pad": "x" * 20_000})).encode())
        expected = {f"status_ignored:{r}": 0 for _, r in HOSTILE}
        for _, r in HOSTILE:
            expected[f"status_ignored:{r}"] += 1
        expected["status_ignored:unreadable"] = 2
        assert wait_for(lambda: {k: v for k, v in service.metrics.counts().items()
                                 if k.startswith("status_ignored:")} == expected, timeout=30)
        assert service.metrics.registry.get_sample_value(
            "fedasync_device_status_ignored_total", {"reason": "epsilon"}) == 6
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http_port}/devices",
                                    timeout=30) as answer:
            shown = json.loads(answer.read())
        # The last good figures stay.
        assert shown["local_privacy"]["max_epsilon"] == 1.2
        assert shown["local_privacy"]["reached_budget"] == ["pi-1"]
    finally:
        device.close()
        service.stop()
    store = Store.open_readonly(tmp_path)
    try:
        kept = store.device_privacy()
    finally:
        store.close()
    assert set(kept) == {"pi-1"} and kept["pi-1"].epsilon == 1.2 and kept["pi-1"].updates == 2
