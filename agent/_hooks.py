"""Site control: the site's own code decides when this device may train and whether a finished
update may leave it.

* Eligibility hooks (``eligibility_hooks = ["site_hooks:compliance_window"]``): a function of the
  device's `Readings`, asked at every eligibility check next to the built-in checks. It returns
  ``True``/``False``, ``(bool, "reason")`` or a `Check`; the answer becomes one more row of the
  decision (``hook:compliance_window``), under the same hysteresis and dwell rules.
* An approval hook (``approval_hook``), asked once per finished update before it is spooled,
  with the update's metadata (`update_metadata`; never its weights):
  ``"package.module:function"`` gets a dict and returns ``True``/``False`` or
  ``(bool, "reason")``; ``"cmd:/path/to/program args..."`` runs the program (arguments split
  like a shell would, no shell involved) with the metadata as JSON on stdin: exit status 0
  approves, anything else refuses, the first line of stdout (else stderr) is the reason. A
  command that outlives its timeout is killed (with its process group) and counts as a refusal.

Both fail closed: a hook that raises, answers with something else, cannot start or times out
says no, because a broken compliance control must stop training and sending, not wave everything
through. Loading fails fast: a hook that cannot be imported, or a program that is not there, is
a `ConfigError` naming it when the agent starts.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedasync_iot.agent._policy import Check
from fedasync_iot.agent._readings import Readings
from fedasync_iot.models import ConfigError, UpdateMessage

log = logging.getLogger("fedasync.agent.hooks")

COMMAND_PREFIX = "cmd:"
_SPEC = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_MAX_REASON = 200  # reasons travel in the retained status message: keep them one short line


# ---------------------------------------------------------------------------- loading


def check_spec(spec: object, *, key: str, alternative: str = "") -> str:
    """`spec` if it looks like ``package.module:function``, else `ConfigError` (no import)."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise ConfigError(f"{key}: a hook must look like package.module:function{alternative}, "
                          f"got {spec!r}", key=key)
    return spec


def command_argv(spec: str, *, key: str = "approval_hook") -> list[str]:
    """The argument vector of a ``cmd:program args...`` hook (split like a shell, no shell)."""
    try:
        argv = shlex.split(spec.removeprefix(COMMAND_PREFIX))
    except ValueError as exc:  # unbalanced quotes
        raise ConfigError(f"{key}: cannot split {spec!r} into arguments: {exc}", key=key) from exc
    if not argv:
        raise ConfigError(f"{key}: {COMMAND_PREFIX} needs a program, got {spec!r}", key=key)
    return argv


def load_hook(spec: str, *, key: str | None = None) -> Callable[..., object]:
    """Import ``package.module:function``; any failure is a `ConfigError` naming the hook."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"hook must look like module:function, got {spec!r}", key=key)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    # Whatever the site module's top level raises, the fix is in the config or that module.
    except Exception as exc:
        raise ConfigError(f"cannot load hook {spec!r}: {type(exc).__name__}: {exc}",
                          key=key) from exc
    if not callable(fn):
        raise ConfigError(f"hook {spec!r} is not callable", key=key)
    return fn  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------- eligibility


class EligibilityHook:
    """One site check, called like a built-in one: ``hook(readings) -> (Check, failure phrase)``.

    Never raises: a failure is a failed check whose reading names the error. The error is
    logged when it first appears (and again only if it changes, or after the hook recovered),
    not at every poll.
    """

    def __init__(self, spec: str, fn: Callable[[Readings], object], *, name: str) -> None:
        self.spec = spec
        self.name = name
        self._fn = fn
        self._last_error: str | None = None

    def __call__(self, readings: Readings) -> tuple[Check, str]:
        try:
            check = self._to_check(self._fn(readings))
        except Exception as exc:
            return self._failed(_error_text(exc), exc)
        if self._last_error is not None:
            log.info("eligibility hook %s answers again", self.spec)
            self._last_error = None
        if check.passed:
            return check, ""
        return check, f"{check.name}: {check.reading}"

    def _to_check(self, result: object) -> Check:
        if isinstance(result, Check):
            if not (isinstance(result.name, str) and result.name
                    and isinstance(result.passed, bool) and isinstance(result.reading, str)
                    and isinstance(result.threshold, str)):
                raise _WrongAnswer(f"returned a malformed Check: {result!r:.100}")
            return Check(result.name, result.passed, _one_line(result.reading),
                         _one_line(result.threshold))
        passed, reason = _verdict(result, expected="a bool, (bool, reason) or a Check")
        return Check(self.name, passed, reason or ("allowed" if passed else "refused"), self.spec)

    def _failed(self, error: str, exc: Exception) -> tuple[Check, str]:
        error = _one_line(error)
        if error != self._last_error:
            # A wrong answer is the hook's bug, not ours: its traceback would only add noise.
            log.warning("eligibility hook %s failed, so the device is not eligible: %s",
                        self.spec, error, exc_info=not isinstance(exc, _WrongAnswer))
            self._last_error = error
        return (Check(self.name, False, f"error: {error}", self.spec),
                f"{self.name} failed ({error})")


def load_eligibility_hooks(specs: Sequence[str]) -> tuple[EligibilityHook, ...]:
    """Import every hook now (a `ConfigError` naming the first that fails). Each check is named
    ``hook:<function>``, or ``hook:<module:function>`` when two modules share a function name."""
    attrs = [spec.partition(":")[2] for spec in specs]
    return tuple(
        EligibilityHook(spec, load_hook(spec, key="eligibility_hooks"),
                        name=f"hook:{attr if attrs.count(attr) == 1 else spec}")
        for spec, attr in zip(specs, attrs, strict=True)
    )


# ---------------------------------------------------------------------------- approval


@dataclass(frozen=True, slots=True)
class Approval:
    approved: bool
    reason: str  # one line, for the log and the status


class ApprovalHook(Protocol):
    """Never raises: any failure is a refusal whose reason says what went wrong."""

    def __call__(self, metadata: Mapping[str, Any]) -> Approval: ...


def update_metadata(update: UpdateMessage, *, fleet: str, payload_bytes: int) -> dict[str, Any]:
    """What an approval hook may see about an update: everything but the weights."""
    norm = float(np.linalg.norm(update.delta.astype(np.float64)))
    return {
        "update_id": update.update_id,
        "device_id": update.device_id,
        "fleet": fleet,
        "base_version": update.base_version,
        "n_samples": update.n_samples,
        "n_params": int(update.delta.size),
        "encoding": update.encoding,
        "payload_bytes": payload_bytes,
        "delta_norm": norm if math.isfinite(norm) else None,  # JSON has no NaN
        "created_at": update.created_at,
        "metrics": dict(update.metrics),
    }


class FunctionApproval:
    def __init__(self, spec: str, fn: Callable[[dict[str, Any]], object]) -> None:
        self.spec = spec
        self._fn = fn

    def __call__(self, metadata: Mapping[str, Any]) -> Approval:
        try:
            # A copy: a hook that edits its argument must not change what the agent logs.
            approved, reason = _verdict(self._fn(dict(metadata)),
                                        expected="a bool or (bool, reason)")
        except Exception as exc:
            return Approval(False, _one_line(
                f"approval hook {self.spec} failed: {_error_text(exc)}"))
        return Approval(approved, reason or
                        f"{'approved' if approved else 'refused'} by {self.spec}")


class CommandApproval:
    def __init__(self, argv: Sequence[str], *, timeout_s: float) -> None:
        self.argv = list(argv)
        self.timeout_s = timeout_s

    def __call__(self, metadata: Mapping[str, Any]) -> Approval:
        program = self.argv[0]
        try:
            # Its own session, so a timeout can kill whatever the program started as well.
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except (OSError, ValueError) as exc:
            return Approval(False, _one_line(f"cannot run approval command {program}: {exc}"))
        try:
            out, err = proc.communicate(json.dumps(dict(metadata)).encode(),
                                        timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return Approval(False, f"approval command {program} did not answer within "
                                   f"{self.timeout_s:g} s")
        except Exception as exc:  # fail closed, and leave no process behind
            _kill(proc)
            return Approval(False, _one_line(f"approval command {program} failed: {exc}"))
        line = _first_line(out) or _first_line(err)
        if proc.returncode == 0:
            return Approval(True, line or f"approved by {program}")
        status = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                  else f"exit status {proc.returncode}")
        return Approval(False, _one_line(f"{line} ({status})" if line
                                         else f"refused by {program} ({status})"))


def load_approval(spec: str | None, *, timeout_s: float) -> ApprovalHook | None:
    """The configured approval hook, checked now (importable / program found), or None."""
    if spec is None:
        return None
    if spec.startswith(COMMAND_PREFIX):
        argv = command_argv(spec)
        if shutil.which(argv[0]) is None:
            raise ConfigError(f"approval_hook: program {argv[0]!r} is not there or not "
                              f"executable", key="approval_hook")
        return CommandApproval(argv, timeout_s=timeout_s)
    return FunctionApproval(spec, load_hook(spec, key="approval_hook"))


# ---------------------------------------------------------------------------- helpers


class _WrongAnswer(TypeError):
    """A hook answered with something that is not a verdict."""


def _verdict(result: object, *, expected: str) -> tuple[bool, str]:
    """``bool`` or ``(bool, str)`` -> (verdict, one-line reason or ""); anything else raises.

    Strictly a bool: a truthy string, number or None must not pass for "yes" by accident.
    """
    if isinstance(result, bool):
        return result, ""
    if (isinstance(result, (tuple, list)) and len(result) == 2
            and isinstance(result[0], bool) and isinstance(result[1], str)):
        return result[0], _one_line(result[1])
    shown = repr(result)
    if len(shown) > 60:
        shown = shown[:60] + "..."
    raise _WrongAnswer(f"returned {shown} ({type(result).__name__}); expected {expected}")


def _error_text(exc: Exception) -> str:
    return str(exc) if isinstance(exc, _WrongAnswer) else f"{type(exc).__name__}: {exc}"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def _first_line(data: bytes) -> str:
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip():
            return _one_line(line)
    return ""


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    # Bounded: a grandchild that escaped the process group may still hold the pipes open, so
    # wait for the program itself only and close our ends instead of reading to EOF.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
