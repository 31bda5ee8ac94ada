"""The shared vocabulary (issue 25, item 5): rejection reasons, the id rule, the atomic write and
range checks declared with the fields."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from fedasync_iot.models import ConfigError, ModelError, ModelSpec
from fedasync_iot.models._bounds import Bounds, bounds, check_fields
from fedasync_iot.models._files import atomic_write
from fedasync_iot.models._ids import ID_RULE, is_valid_id
from fedasync_iot.models._wire import (
    ROUTINE_REJECTIONS,
    Ack,
    Rejection,
    decode_ack,
    encode_ack,
)

# The wire strings as agents in the field read them: never renamed (docs/wire.md).
WIRE_REASONS = {
    "bad_topic", "oversized", "malformed", "unsupported_schema", "device_mismatch",
    "update_id_conflict", "wrong_round", "participation_cap", "shape", "n_samples",
    "non_finite", "future_version", "too_stale", "norm", "duplicate", "merge_failed",
    "rewritten_topic",
}


# -- rejection reasons ---------------------------------------------------------------------------

def test_rejection_values_are_the_wire_strings() -> None:
    assert {r.value for r in Rejection} == WIRE_REASONS
    assert {"too_stale", "wrong_round", "participation_cap"} == ROUTINE_REJECTIONS


def test_wire_reasons_are_documented() -> None:
    doc = (Path(__file__).parents[1] / "docs" / "wire.md").read_text()
    for reason in WIRE_REASONS:
        assert f"| `{reason}` |" in doc, reason


@pytest.mark.parametrize("reason", list(Rejection))
def test_a_rejection_renders_as_its_code(reason: Rejection, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    code = reason.value
    assert (str(reason), f"{reason}", f"{reason:>20}".strip()) == (code,) * 3
    assert reason == code and hash(reason) == hash(code) and code in {reason}
    with caplog.at_level(logging.INFO):
        logging.getLogger("fedasync.test").info("rejected: %s", reason)
    assert caplog.records[-1].getMessage() == f"rejected: {code}"


def test_an_ack_with_a_rejection_travels_as_its_string() -> None:
    ack = Ack(update_id="u1", status="rejected", reason=Rejection.TOO_STALE, version=3)
    raw = encode_ack(ack)
    assert json.loads(raw)["reason"] == "too_stale"
    back = decode_ack(raw)
    assert back.reason == Rejection.TOO_STALE and back.reason in ROUTINE_REJECTIONS


# -- ids -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "valid"), [
    ("dev-01", True), ("a.b_c", True), ("x" * 64, True), ("x" * 65, False), ("", False),
    (".", False), ("..", False), ("a/b", False), ("a b", False), (7, False), (None, False),
])
def test_id_rule(value: object, valid: bool) -> None:
    assert is_valid_id(value) is valid
    assert ID_RULE == "1-64 characters of A-Z a-z 0-9 _ . -"


# -- the atomic write ----------------------------------------------------------------------------

def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_sets_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "shared", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644


def test_atomic_write_takes_a_writer_and_clears_a_stale_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    stale = tmp_path / f".v.npy.{os.getpid()}.tmp"
    stale.write_bytes(b"left by a crash")

    def write(f: BinaryIO) -> None:
        f.write(b"by a writer")

    atomic_write(path, write, fsync=False, fsync_dir=False)
    assert path.read_bytes() == b"by a writer" and not stale.exists()


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def fail(f: BinaryIO) -> None:
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


# -- ranges declared with the fields -------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class _Settings:
    rate: float = field(default=0.5, metadata=bounds(gt=0, le=1))
    count: int = field(default=1, metadata=bounds(ge=1, integer=True))
    budget: float | None = field(default=None, metadata=bounds(gt=0, optional=True))
    free: float = 0.0  # no bounds: never checked

    def __post_init__(self) -> None:
        check_fields(self)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 0.0}, "rate must be a number in (0, 1], got 0.0"),
    ({"rate": math.nan}, "rate must be a number in (0, 1], got nan"),
    ({"rate": True}, "rate must be a number in (0, 1], got True"),
    ({"count": 2.0}, "count must be an integer >= 1, got 2.0"),
    ({"count": 0}, "count must be an integer >= 1, got 0"),
    ({"budget": -1.0}, "budget must be finite and > 0 (or unset), got -1.0"),
    ({"budget": 10**400}, "budget must be finite and > 0 (or unset), got "),
])
def test_check_fields_names_key_bound_and_value(kwargs: dict[str, object], message: str
                                                ) -> None:
    with pytest.raises(ConfigError) as err:
        _Settings(**kwargs)  # type: ignore[arg-type]
    assert str(err.value).startswith(message) and err.value.key == next(iter(kwargs))


def test_check_fields_passes_values_in_range() -> None:
    assert _Settings(rate=1, count=3, budget=2.5, free=-math.inf).count == 3


@pytest.mark.parametrize(("bound", "text"), [
    (Bounds(ge=0, le=math.inf), "a number in [0, inf]"),
    (Bounds(ge=-273.15, le=100.0), "a number in [-273.15, 100]"),
    (Bounds(ge=1, le=1 << 20, integer=True), "an integer in 1..1048576"),
    (Bounds(ge=0), "finite and >= 0"),
    (Bounds(gt=0, rule="a positive number of seconds"), "a positive number of seconds"),
])
def test_bounds_are_worded_as_before(bound: Bounds, text: str) -> None:
    assert bound.describe() == text


def test_other_error_types_carry_the_same_message() -> None:
    with pytest.raises(ModelError, match=r"^learning_rate must be finite and > 0, got 0"):
        ModelSpec(kind="linear", n_features=1, learning_rate=0)
