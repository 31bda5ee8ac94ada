"""Site hooks for tests/test_agent_hooks.py, loaded by name (``tests.site_hooks:allow``) the way
a site's own module would be. `ANSWER` lets a test change what the switchable hooks say; `SEEN`
records what the approval hooks were shown. tests/test_agent_hooks.py resets both."""

from __future__ import annotations

from typing import Any

from fedasync_iot.agent import Check, Readings

ANSWER: dict[str, bool] = {"eligible": True, "approve": True}
SEEN: list[dict[str, Any]] = []
NOT_CALLABLE = 3


# -- eligibility ---------------------------------------------------------------------------
def allow(readings: Readings) -> bool:
    return True


def deny(readings: Readings) -> bool:
    return False


def deny_with_reason(readings: Readings) -> tuple[bool, str]:
    return False, "change freeze until 17:00"


def allow_with_reason(readings: Readings) -> tuple[bool, str]:
    return True, "outside the change freeze"


def before_noon(readings: Readings) -> Check:
    return Check("site:before_noon", readings.local_minutes < 720,
                 f"{readings.local_minutes} min", "< 720 min")


def raises(readings: Readings) -> bool:
    raise RuntimeError("compliance database unreachable")


def wrong_type(readings: Readings) -> str:
    return "yes"  # truthy, but not a verdict


def switch(readings: Readings) -> tuple[bool, str]:
    return ANSWER["eligible"], "switch " + ("on" if ANSWER["eligible"] else "off")


def switch_or_raise(readings: Readings) -> bool:
    if not ANSWER["eligible"]:
        raise RuntimeError("compliance database unreachable")
    return True


# -- approval ------------------------------------------------------------------------------
def approve(metadata: dict[str, Any]) -> bool:
    SEEN.append(metadata)
    return True


def refuse(metadata: dict[str, Any]) -> tuple[bool, str]:
    SEEN.append(metadata)
    return False, "site says no"


def approve_switch(metadata: dict[str, Any]) -> tuple[bool, str]:
    SEEN.append(metadata)
    return ANSWER["approve"], "approved by the switch" if ANSWER["approve"] else "switched off"


def approval_raises(metadata: dict[str, Any]) -> bool:
    raise ValueError("audit log is full")


def approval_wrong_type(metadata: dict[str, Any]) -> None:
    return None
