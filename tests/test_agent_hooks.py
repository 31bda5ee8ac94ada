"""Site control on the agent: eligibility hooks, the pre-publish approval hook, held updates."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedasync_iot.agent import cli as agent_cli
from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig, load_config
from fedasync_iot.agent._data import CallableSource
from fedasync_iot.agent._hooks import CommandApproval
from fedasync_iot.agent._policy import EligibilityGate, PolicyConfig, format_decision
from fedasync_iot.agent._readings import Readings, StaticReader
from fedasync_iot.agent._runner import PahoLink
from fedasync_iot.models import (
    Ack,
    ConfigError,
    ModelSpec,
    Snapshot,
    Topics,
    UpdateMessage,
    decode_update,
    encode_ack,
)
from tests import site_hooks
from tests.helpers import Listener, wait_for

GOOD = Readings(battery_percent=None, charging=None, interfaces_up=("eth0",), cpu_percent=5.0,
                mem_available_mb=500.0, temperature_c=None, local_minutes=600, taken_at=1.7e9)
OPEN = PolicyConfig(min_dwell_s=0.0)
HOOKS = "tests.site_hooks"
METADATA_KEYS = {"update_id", "device_id", "fleet", "base_version", "n_samples", "n_params",
                 "encoding", "payload_bytes", "delta_norm", "created_at", "metrics"}


class RecordingLink:
    def __init__(self) -> None:
        self.connected = True
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.published.append((topic, payload))

    def updates(self) -> list[str]:
        return [decode_update(p).update_id for t, p in self.published if "/update/" in t]


@pytest.fixture(autouse=True)
def _reset_site_hooks() -> Iterator[None]:
    site_hooks.ANSWER.update(eligible=True, approve=True)
    site_hooks.SEEN.clear()
    yield
    site_hooks.SEEN.clear()


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`agent_cli.main` without its logging set-up, which would replace pytest's handlers."""
    monkeypatch.setattr(agent_cli, "setup_logging", lambda *a, **k: None)
    return agent_cli.main


def make_agent(tmp_path: Path, *, link: Any = None, reader: Any = None, **changes: Any) -> Agent:
    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path / "state"), policy=OPEN,
                         train_in_subprocess=False, **changes)
    no_data = CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0)))
    return Agent(config, link=link or RecordingLink(), reader=reader or StaticReader(GOOD),
                 data=no_data)


def make_update(**changes: Any) -> UpdateMessage:
    fields: dict[str, Any] = dict(
        device_id="pi-1", update_id=uuid.uuid4().hex, base_version=3, n_samples=40,
        delta=np.full(16, 0.25, np.float32), created_at=time.time(),
        metrics={"loss_before": 2.0, "loss_after": 1.5})
    return UpdateMessage(**{**fields, **changes})


def script(tmp_path: Path, body: str, name: str = "approve") -> str:
    """An executable ``#!/bin/sh`` program; returns its path."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def hook_check(agent: Agent) -> dict[str, Any]:
    checks = agent.status()["checks"]
    return next(c for c in checks if c["name"].startswith(("hook:", "site:")))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(("changes", "key"), [
    ({"eligibility_hooks": ("no_colon",)}, "eligibility_hooks"),
    ({"eligibility_hooks": ("a.b:c", "a.b:c")}, "eligibility_hooks"),
    ({"eligibility_hooks": (1,)}, "eligibility_hooks"),
    ({"eligibility_hooks": ("/etc/hooks.py:fn",)}, "eligibility_hooks"),
    ({"approval_hook": "/usr/local/bin/approve"}, "approval_hook"),  # forgot "cmd:"
    ({"approval_hook": "cmd:"}, "approval_hook"),
    ({"approval_hook": "cmd:'/bin/approve"}, "approval_hook"),  # unbalanced quote
    ({"approval_timeout_s": 0}, "approval_timeout_s"),
    ({"approval_timeout_s": float("nan")}, "approval_timeout_s"),
    ({"approval_timeout_s": True}, "approval_timeout_s"),
    ({"on_refused": "hold"}, "on_refused"),
])
def test_config_validation(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        AgentConfig(device_id="pi-1", **changes)
    assert err.value.key == key


def test_config_from_toml_and_environment(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(f'device_id = "pi-1"\neligibility_hooks = ["{HOOKS}:allow", "{HOOKS}:deny"]\n'
                    f'approval_hook = "cmd:/usr/local/bin/approve --site \'north wing\'"\n'
                    f'on_refused = "keep"\napproval_timeout_s = 5\n')

    from_file = load_config(toml, environ={})
    one_from_env = load_config(toml, environ={"FEDASYNC_ELIGIBILITY_HOOKS": f"{HOOKS}:allow",
                                              "FEDASYNC_APPROVAL_HOOK": f"{HOOKS}:approve",
                                              "FEDASYNC_ON_REFUSED": "drop"})
    list_from_env = load_config(None, environ={
        "FEDASYNC_DEVICE_ID": "pi-2", "FEDASYNC_ELIGIBILITY_HOOKS": f'["{HOOKS}:deny"]'})

    assert from_file.eligibility_hooks == (f"{HOOKS}:allow", f"{HOOKS}:deny")
    assert from_file.approval_hook == "cmd:/usr/local/bin/approve --site 'north wing'"
    assert (from_file.on_refused, from_file.approval_timeout_s) == ("keep", 5)
    assert one_from_env.eligibility_hooks == (f"{HOOKS}:allow",)
    assert (one_from_env.approval_hook, one_from_env.on_refused) == (f"{HOOKS}:approve", "drop")
    assert list_from_env.eligibility_hooks == (f"{HOOKS}:deny",)


def test_defaults_change_nothing(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    update = make_update()

    agent.deliver(update)

    assert agent.link.updates() == [update.update_id]
    assert [c.name for c in agent.check().checks] == [
        "power", "network", "cpu", "memory", "temperature", "time_window"]
    status = agent.status()
    assert status["approval"] == {"enabled": False, "approved": 0, "refused": 0, "last": None}
    assert status["held"] == 0
    assert not (tmp_path / "state" / "held").exists()


@pytest.mark.parametrize(("changes", "named"), [
    ({"eligibility_hooks": (f"{HOOKS}:missing",)}, f"{HOOKS}:missing"),
    ({"eligibility_hooks": ("tests.no_such_module:fn",)}, "tests.no_such_module:fn"),
    ({"eligibility_hooks": (f"{HOOKS}:NOT_CALLABLE",)}, f"{HOOKS}:NOT_CALLABLE"),
    ({"approval_hook": f"{HOOKS}:missing"}, f"{HOOKS}:missing"),
    ({"approval_hook": "cmd:/nonexistent/approve --x"}, "/nonexistent/approve"),
])
def test_a_hook_that_cannot_load_stops_the_agent_at_start(tmp_path: Path, changes: dict[str, Any],
                                                         named: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_agent(tmp_path, **changes)
    assert err.value.key == next(iter(changes))
    assert named in str(err.value)


def test_a_program_that_is_not_executable_stops_the_agent_at_start(tmp_path: Path) -> None:
    path = tmp_path / "approve"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="not executable"):
        make_agent(tmp_path, approval_hook=f"cmd:{path}")


# ---------------------------------------------------------------------------- eligibility


@pytest.mark.parametrize(("hook", "name", "eligible", "reading", "threshold", "reason"), [
    ("allow", "hook:allow", True, "allowed", f"{HOOKS}:allow", "all checks passed"),
    ("deny", "hook:deny", False, "refused", f"{HOOKS}:deny", "hook:deny: refused"),
    ("deny_with_reason", "hook:deny_with_reason", False, "change freeze until 17:00",
     f"{HOOKS}:deny_with_reason", "hook:deny_with_reason: change freeze until 17:00"),
    ("allow_with_reason", "hook:allow_with_reason", True, "outside the change freeze",
     f"{HOOKS}:allow_with_reason", "all checks passed"),
    ("before_noon", "site:before_noon", True, "600 min", "< 720 min", "all checks passed"),
])
def test_an_eligibility_hook_is_one_more_check(tmp_path: Path, hook: str, name: str,
                                               eligible: bool, reading: str, threshold: str,
                                               reason: str) -> None:
    agent = make_agent(tmp_path, eligibility_hooks=(f"{HOOKS}:{hook}",))

    decision = agent.check()

    assert (decision.eligible, decision.reason) == (eligible, reason)
    assert decision.checks[-1].name == name
    assert hook_check(agent) == {"name": name, "passed": eligible, "reading": reading,
                                 "threshold": threshold}


def test_a_check_returned_by_a_hook_can_fail(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, eligibility_hooks=(f"{HOOKS}:before_noon",),
                       reader=StaticReader(dataclasses.replace(GOOD, local_minutes=800)))
    d = agent.check()
    assert not d.eligible and d.reason == "site:before_noon: 800 min"


def test_failed_hooks_and_built_in_checks_are_all_reported(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, eligibility_hooks=(f"{HOOKS}:allow", f"{HOOKS}:deny"),
                       reader=StaticReader(dataclasses.replace(GOOD, cpu_percent=90.0)))

    d = agent.check()

    assert [c.name for c in d.failed] == ["cpu", "hook:deny"]
    assert d.reason == "cpu 90% > 30%; hook:deny: refused"


@pytest.mark.parametrize(("hook", "error"), [
    ("raises", "RuntimeError: compliance database unreachable"),
    ("wrong_type", "returned 'yes' (str); expected a bool, (bool, reason) or a Check"),
])
def test_a_broken_hook_fails_closed_and_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, hook: str, error: str) -> None:
    agent = make_agent(tmp_path, eligibility_hooks=(f"{HOOKS}:{hook}",))
    caplog.set_level(logging.WARNING, logger="fedasync.agent.hooks")

    decisions = [agent.check() for _ in range(5)]

    assert not any(d.eligible for d in decisions)
    assert decisions[-1].reason == f"hook:{hook} failed ({error})"
    assert hook_check(agent)["reading"] == f"error: {error}"
    warnings = [r for r in caplog.records if r.name == "fedasync.agent.hooks"]
    assert len(warnings) == 1
    assert f"{HOOKS}:{hook}" in warnings[0].getMessage() and error in warnings[0].getMessage()


def test_a_hook_error_is_logged_again_after_it_recovered(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(tmp_path, eligibility_hooks=(f"{HOOKS}:switch_or_raise",))
    caplog.set_level(logging.INFO, logger="fedasync.agent.hooks")

    site_hooks.ANSWER["eligible"] = False
    agent.check()
    agent.check()
    site_hooks.ANSWER["eligible"] = True
    assert agent.check().eligible
    site_hooks.ANSWER["eligible"] = False
    agent.check()

    levels = [r.levelname for r in caplog.records if r.name == "fedasync.agent.hooks"]
    assert levels == ["WARNING", "INFO", "WARNING"]


def test_hysteresis_and_dwell_apply_to_hooks_too() -> None:
    from fedasync_iot.agent._hooks import load_eligibility_hooks

    gate = EligibilityGate(PolicyConfig(min_dwell_s=60.0),
                           extra_checks=load_eligibility_hooks([f"{HOOKS}:switch"]))
    low = dataclasses.replace(GOOD, battery_percent=77.0, charging=False)

    first = gate.update(GOOD, now=0.0)
    assert not first.eligible and "waiting for dwell" in first.reason
    assert first.checks[-1].name == "hook:switch"
    assert gate.update(GOOD, now=60.0).eligible
    kept = gate.update(low, now=60.5)  # the battery margin still holds, hook included
    assert kept.eligible and kept.held and kept.checks[-1].passed
    site_hooks.ANSWER["eligible"] = False
    stopped = gate.update(GOOD, now=61.0)  # leaving is immediate
    assert not stopped.eligible and stopped.reason == "hook:switch: switch off"
    site_hooks.ANSWER["eligible"] = True
    assert not gate.update(GOOD, now=62.0).eligible  # dwell restarts
    assert not gate.update(GOOD, now=121.0).eligible
    assert gate.update(GOOD, now=122.0).eligible


def test_format_decision_and_status_show_the_hook(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, eligibility_hooks=(f"{HOOKS}:deny_with_reason",))

    lines = format_decision(agent.check()).splitlines()
    status = json.loads(json.dumps(agent.status()))

    assert lines[0] == "eligible: no (hook:deny_with_reason: change freeze until 17:00)"
    assert lines[-1].split()[0] == "hook:deny_with_reason" and lines[-1].endswith("FAIL")
    assert "change freeze until 17:00" in lines[-1] and f"{HOOKS}:deny_with_reason" in lines[-1]
    assert status["eligible"] is False
    assert status["checks"][-1]["name"] == "hook:deny_with_reason"


def test_check_command_runs_the_hooks(tmp_path: Path, cli: Any,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(f'eligibility_hooks = ["{HOOKS}:deny_with_reason"]\n')

    code = cli(["--config", str(toml), "check", "--json"])

    decision = json.loads(capsys.readouterr().out)
    assert code == 1 and decision["eligible"] is False
    assert decision["checks"][-1] == {
        "name": "hook:deny_with_reason", "passed": False, "reading": "change freeze until 17:00",
        "threshold": f"{HOOKS}:deny_with_reason"}


def test_check_command_names_a_hook_that_cannot_load(tmp_path: Path, cli: Any,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(f'eligibility_hooks = ["{HOOKS}:missing"]\n')

    assert cli(["--config", str(toml), "check"]) == 2
    assert f"{HOOKS}:missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------- approval


def test_an_approved_update_is_spooled_and_sent(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(tmp_path, approval_hook=f"{HOOKS}:approve")
    update = make_update()
    caplog.set_level(logging.INFO, logger="fedasync.agent")

    agent.deliver(update)

    assert agent.link.updates() == [update.update_id]
    assert [e.update_id for e in agent.spool.entries()] == [update.update_id]
    (seen,) = site_hooks.SEEN
    assert set(seen) == METADATA_KEYS  # metadata only: no weights
    assert (seen["update_id"], seen["n_samples"], seen["n_params"], seen["base_version"]) == (
        update.update_id, 40, 16, 3)
    assert seen["delta_norm"] == pytest.approx(1.0)
    assert seen["metrics"] == {"loss_before": 2.0, "loss_after": 1.5}
    assert json.loads(json.dumps(seen)) == seen
    assert agent.status()["approval"] == {
        "enabled": True, "approved": 1, "refused": 0,
        "last": {"update_id": update.update_id, "approved": True,
                 "reason": f"approved by {HOOKS}:approve"}}
    assert any(r.levelname == "INFO" and "approved" in r.getMessage() for r in caplog.records)


def test_a_refused_update_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(tmp_path, approval_hook=f"{HOOKS}:refuse")
    update = make_update()

    agent.deliver(update)

    assert agent.link.updates() == []
    assert len(agent.spool) == 0 and agent.status()["held"] == 0
    assert (agent.counters.trained, agent.counters.sent, agent.counters.refused) == (1, 0, 1)
    assert agent.status()["approval"]["last"] == {
        "update_id": update.update_id, "approved": False, "reason": "site says no"}
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert update.update_id in warning.getMessage() and "dropped" in warning.getMessage()
    assert "site says no" in warning.getMessage()


def test_a_refused_update_is_kept_when_configured(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, approval_hook=f"{HOOKS}:refuse", on_refused="keep")
    update = make_update()

    agent.deliver(update)

    assert agent.link.updates() == [] and len(agent.spool) == 0
    assert agent.status()["held"] == 1
    (entry,) = agent.held.entries()
    assert (entry["update_id"], entry["reason"], entry["n_samples"]) == (
        update.update_id, "site says no", 40)


@pytest.mark.parametrize(("hook", "reason"), [
    ("approval_raises", f"approval hook {HOOKS}:approval_raises failed: ValueError: audit log is "
                        "full"),
    ("approval_wrong_type", f"approval hook {HOOKS}:approval_wrong_type failed: returned None "
                            "(NoneType); expected a bool or (bool, reason)"),
])
def test_a_broken_approval_function_refuses(tmp_path: Path, hook: str, reason: str) -> None:
    agent = make_agent(tmp_path, approval_hook=f"{HOOKS}:{hook}")

    agent.deliver(make_update())

    assert agent.link.updates() == []
    assert agent.status()["approval"]["last"]["reason"] == reason


def test_a_refused_update_is_not_retrained_at_once(tmp_path: Path) -> None:
    """Progress moves on after a refusal: the same data and model would only be refused again."""
    calls = []

    def trainer(snapshot: Snapshot, X: Any, y: Any, **kw: Any) -> UpdateMessage:
        calls.append(snapshot.version)
        return make_update(base_version=snapshot.version, n_samples=len(X))

    config = AgentConfig(device_id="pi-1", state_dir=str(tmp_path), policy=OPEN,
                         min_train_interval_s=0.0, approval_hook=f"{HOOKS}:refuse")
    agent = Agent(config, link=RecordingLink(), reader=StaticReader(GOOD), trainer=trainer,
                  data=CallableSource(lambda: (np.zeros((60, 4)), np.zeros(60))))
    agent.snapshot = Snapshot(version=3, spec=ModelSpec(kind="logistic", n_features=4,
                                                        classes=(0, 1)),
                              weights=np.zeros(10, np.float32))

    agent.poll()
    agent.poll()

    assert calls == [3] and agent.counters.refused == 1 and agent.link.updates() == []


def test_approval_command_sees_the_metadata_and_approves(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    program = script(tmp_path, f'cat > {shlex.quote(str(seen))}\necho "fine by the site"\n')
    agent = make_agent(tmp_path, approval_hook=f"cmd:{program} --site north")
    update = make_update()

    agent.deliver(update)

    assert agent.link.updates() == [update.update_id]
    metadata = json.loads(seen.read_text())
    assert set(metadata) == METADATA_KEYS and metadata["update_id"] == update.update_id
    assert agent.status()["approval"]["last"]["reason"] == "fine by the site"


def test_approval_command_refuses_with_its_first_line(tmp_path: Path) -> None:
    program = script(tmp_path, 'echo "too few samples" >&2\necho "second line" >&2\nexit 3\n')
    agent = make_agent(tmp_path, approval_hook=f"cmd:{program}", on_refused="keep")

    agent.deliver(make_update())

    assert agent.link.updates() == [] and len(agent.held) == 1
    assert agent.status()["approval"]["last"]["reason"] == "too few samples (exit status 3)"


def test_approval_command_that_says_nothing(tmp_path: Path) -> None:
    program = script(tmp_path, "exit 1\n")
    verdict = CommandApproval([program], timeout_s=10)({"update_id": "u"})
    assert not verdict.approved
    assert verdict.reason == f"refused by {program} (exit status 1)"


def test_approval_command_timeout_is_a_refusal_and_kills_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    # The sleeper is the script's child: killing only the script would leave it running.
    program = script(tmp_path, f"sleep 30 &\necho $! > {shlex.quote(str(pid_file))}\nwait\n")
    started = time.monotonic()

    verdict = CommandApproval([program], timeout_s=0.5)({"update_id": "u"})

    assert time.monotonic() - started < 10  # not the sleeper's 30 s, on a busy machine too
    assert not verdict.approved
    assert verdict.reason == f"approval command {program} did not answer within 0.5 s"
    sleeper = int(pid_file.read_text())
    assert wait_for(lambda: not _running(sleeper), timeout=30)


def test_approval_command_that_cannot_run_refuses(tmp_path: Path) -> None:
    verdict = CommandApproval([str(tmp_path / "vanished")], timeout_s=10)({"update_id": "u"})
    assert not verdict.approved
    assert verdict.reason.startswith(f"cannot run approval command {tmp_path / 'vanished'}")


def test_approval_command_through_sys_executable(tmp_path: Path) -> None:
    code = "import json,sys; m=json.load(sys.stdin); print('n', m['n_samples']); " \
           "sys.exit(0 if m['n_samples'] >= 20 else 1)"
    agent = make_agent(tmp_path, approval_hook=f"cmd:{shlex.quote(sys.executable)} -c "
                                               f"{shlex.quote(code)}")
    agent.deliver(make_update(n_samples=40))
    agent.deliver(make_update(n_samples=5))

    assert (agent.counters.approved, agent.counters.refused) == (1, 1)
    assert agent.status()["approval"]["last"]["reason"] == "n 5 (exit status 1)"


# ---------------------------------------------------------------------------- held (CLI)


def test_held_list_release_and_drop(tmp_path: Path, cli: Any, capsys: pytest.CaptureFixture[str],
                                    caplog: pytest.LogCaptureFixture) -> None:
    agent = make_agent(tmp_path, approval_hook=f"{HOOKS}:refuse", on_refused="keep")
    first, second = make_update(), make_update()
    agent.deliver(first)
    agent.deliver(second)
    state = ["--state-dir", str(tmp_path / "state")]
    caplog.set_level(logging.INFO, logger="fedasync.agent")

    assert cli([*state, "held", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["update_id"] for e in listed] == [first.update_id, second.update_id]
    assert listed[0]["reason"] == "site says no" and listed[0]["base_version"] == 3

    assert cli([*state, "held", "release", first.update_id]) == 0
    assert [e.update_id for e in agent.spool.entries()] == [first.update_id]
    assert any(r.levelname == "WARNING" and "operator" in r.getMessage()
               and first.update_id in r.getMessage() for r in caplog.records)

    assert cli([*state, "held", "drop", second.update_id]) == 0
    assert cli([*state, "held", "drop", second.update_id]) == 1
    assert second.update_id in capsys.readouterr().err
    assert cli([*state, "held", "list"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert sorted(p.name for p in (tmp_path / "state" / "held").iterdir()) == []

    assert cli([*state, "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["held"], status["spool_depth"]) == (0, 1)

    agent.on_connected()  # the released update goes out at the next connect
    assert agent.link.updates() == [first.update_id]


# ---------------------------------------------------------------------------- real broker


@pytest.mark.broker
def test_a_refused_update_never_reaches_the_broker(broker: Any, fleet_name: str,
                                                   tmp_path: Path, cli: Any) -> None:
    config = AgentConfig(device_id="pi-1", broker=broker.url, fleet=fleet_name,
                         state_dir=str(tmp_path / "state"), policy=OPEN,
                         approval_hook=f"{HOOKS}:approve_switch", on_refused="keep")
    link = PahoLink(config)
    agent = Agent(config, link=link, reader=StaticReader(GOOD),
                  data=CallableSource(lambda: (np.zeros((0, 4)), np.zeros(0))))
    link.agent = agent
    listener = Listener(broker.url, [Topics(fleet_name).update("pi-1")])
    link.start()
    try:
        assert link.wait_connected(30)
        refused, approved = make_update(), make_update()
        site_hooks.ANSWER["approve"] = False
        agent.deliver(refused)
        site_hooks.ANSWER["approve"] = True
        agent.deliver(approved)

        # One publisher, one topic, QoS 1: the broker keeps the order, so had the refused
        # update been published (before the approved one), it would arrive first.
        assert decode_update(bytes(listener.get().payload)).update_id == approved.update_id
        assert agent.status()["approval"] == {
            "enabled": True, "approved": 1, "refused": 1,
            "last": {"update_id": approved.update_id, "approved": True,
                     "reason": "approved by the switch"}}

        agent.on_ack(encode_ack(Ack(update_id=approved.update_id, status="accepted", version=4)))
        assert cli(["--state-dir", config.state_dir, "held", "release", refused.update_id]) == 0
        agent.on_connected()  # what a reconnect does: send the spool
        assert decode_update(bytes(listener.get().payload)).update_id == refused.update_id
    finally:
        link.stop()
        listener.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by init, which may take a moment)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_running_helper_sees_this_process() -> None:
    assert _running(os.getpid())
