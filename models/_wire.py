"""Versioned, pickle-free wire codec: updates (agent -> coordinator), snapshots (coordinator ->
fleet) and acks (coordinator -> agent).

Updates and snapshots share one binary frame::

    MAGIC b"FAIO" | frame version u8 (1) | header length u32 LE | header | body

The header is a UTF-8 JSON object (at most 64 KiB) with ``"schema": 1`` and ``"kind"``; the
body is raw little-endian bytes whose length the header fixes exactly. Acks are small JSON
objects with the same ``schema`` / ``kind`` keys, readable with ``mosquitto_sub``.

Every decoder treats its input as hostile: the size limit is checked before anything is parsed,
and every length, type, range, count and id is checked before numpy sees a byte. Malformed input
raises `WireError`; a well-formed message of a frame version, schema, kind or encoding this build
does not speak raises `UnsupportedSchema`. Nothing else escapes.

Evolution (docs/wire.md): ``schema`` is a major version. Within it a decoder ignores header keys
it does not know, so a sender may add an optional key without breaking older readers; a change
that a reader must not ignore (a new required key, a key whose meaning or body layout changes)
takes the next major, which older decoders refuse as `UnsupportedSchema`. Required keys stay
required and type-checked, and a key this build knows is refused where it does not belong.
Snapshot signatures are a trailer outside the frame (`models._signing`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Literal, NoReturn, get_args

import numpy as np
from numpy.typing import NDArray

from fedasync_iot.models._errors import ModelError, UnsupportedSchema, WireError
from fedasync_iot.models._ids import NAME_RULE, is_valid_id
from fedasync_iot.models._spec import ModelSpec
from fedasync_iot.models._template import OnnxTemplate, parse_bindings

MAGIC = b"FAIO"
FRAME_VERSION = 1
# The major version. Decoders of every release so far accept exactly 1, so encoders keep writing
# 1 until a change older readers must not ignore; additive changes never bump it.
SCHEMA = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_UPDATE_BYTES = 16 * 1024 * 1024
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
MAX_ACK_BYTES = 4 * 1024
MAX_PARAMS = 10_000_000
MAX_METRICS = 16
MAX_COHORT = 900  # ids of up to 64 characters stay inside the 64 KiB header
MAX_DETAIL_CHARS = 500
MAX_RETRY_AFTER_S = 7 * 86_400.0
# Versions and counts stay exact in any JSON reader (JavaScript dashboards included).
MAX_INT = 2**53 - 1
# Unix seconds up to year ~5100: anything later is a corrupt clock or a hostile sender.
MAX_TIMESTAMP = 1e11

Encoding = Literal["float32", "float16", "int8", "topk"]
ENCODINGS: tuple[Encoding, ...] = get_args(Encoding)
AckStatus = Literal["accepted", "buffered", "duplicate", "rejected"]
ACK_STATUSES: tuple[AckStatus, ...] = get_args(AckStatus)



class Rejection(str, Enum):
    """Why the coordinator rejected an update: the ack's ``reason``, the lineage's and the
    ``rejected{reason=...}`` metric's label (docs/wire.md, "Rejection reasons"). The values are
    wire strings: never change one. A member is a `str`, equal to and hashed like its value, so
    a decoded ack's plain string compares with it; an agent must accept reasons it does not
    know (a newer coordinator's)."""

    BAD_TOPIC = "bad_topic"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    DEVICE_MISMATCH = "device_mismatch"
    UPDATE_ID_CONFLICT = "update_id_conflict"
    WRONG_ROUND = "wrong_round"
    PARTICIPATION_CAP = "participation_cap"
    SHAPE = "shape"
    N_SAMPLES = "n_samples"
    NON_FINITE = "non_finite"
    FUTURE_VERSION = "future_version"
    TOO_STALE = "too_stale"
    NORM = "norm"
    DUPLICATE = "duplicate"
    MERGE_FAILED = "merge_failed"
    REWRITTEN_TOPIC = "rewritten_topic"

    # Python 3.11+ renders a mixed-in enum as "Rejection.TOO_STALE" in str() and f-strings; log
    # lines, metric labels and messages must keep the wire string.
    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


# Normal operation, not a fault (late work in a fleet: the model moved on, a round closed, a
# device over its share): logged at INFO by the coordinator and the agent, the rest at WARNING.
ROUTINE_REJECTIONS: frozenset[Rejection] = frozenset(
    {Rejection.TOO_STALE, Rejection.WRONG_ROUND, Rejection.PARTICIPATION_CAP})


_PREFIX = struct.Struct("<4sBI")
_FRAME_KINDS = ("update", "snapshot", "template", "weights")
_REASON = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_F32_MAX = float(np.finfo(np.float32).max)
# An int8 scale above this would overflow float32 when decoded (127 * scale).
_MAX_SCALE = _F32_MAX / 127
_BODY_BYTES_PER_PARAM = {"float32": 4, "float16": 2, "int8": 1}
_UPDATE_KEYS = frozenset({"schema", "kind", "device_id", "update_id", "base_version",
                          "n_samples", "n_params", "encoding", "created_at", "metrics"})
_ENCODING_KEYS = {"float32": frozenset(), "float16": frozenset(),
                  "int8": frozenset({"scale"}), "topk": frozenset({"k"})}
# A key of one encoding in another encoding's frame is contradictory, not merely unknown.
_ALL_ENCODING_KEYS: frozenset[str] = frozenset().union(*_ENCODING_KEYS.values())
_SNAPSHOT_KEYS = frozenset({"schema", "kind", "version", "spec", "n_params", "onnx_len",
                            "created_at", "metrics", "sha256"})
_ACK_KEYS = frozenset({"schema", "kind", "update_id", "status", "reason", "version", "detail"})


# ---------------------------------------------------------------------------- field checks


def validate_id(value: object, what: str) -> str:
    """`value` if it is a valid device/update id (an MQTT topic level and a file name), else
    `WireError` (`models._ids.NAME_RULE`)."""
    if not is_valid_id(value):
        raise WireError(f"{what} must be {NAME_RULE}, got {_show(value)}")
    return value


def _show(value: object) -> str:
    """A short, safe rendering of hostile input for error messages."""
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**30 else "a huge integer"
    return f"a JSON {type(value).__name__}"


def _int(value: object, what: str, lo: int, hi: int = MAX_INT) -> int:
    # bool is an int subclass; true/false in a count is a type error, not 1/0.
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise WireError(f"{what} must be an integer in {lo}..{hi}, got {_show(value)}")
    return value


def _float(value: object, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{what} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError as exc:  # an int beyond float range
        raise WireError(f"{what} is out of range") from exc
    if not (math.isfinite(number) and lo <= number <= hi):
        raise WireError(f"{what} must be finite and in [{lo}, {hi}], got {_show(value)}")
    return number


def _timestamp(value: object, what: str = "created_at") -> float:
    return _float(value, what, 0.0, MAX_TIMESTAMP)


def _metrics(value: object) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise WireError(f"metrics must be an object, got {_show(value)}")
    if len(value) > MAX_METRICS:
        raise WireError(f"at most {MAX_METRICS} metrics, got {len(value)}")
    return MappingProxyType({
        validate_id(k, "metric name"): _float(v, f"metric {k}", -math.inf, math.inf)
        for k, v in value.items()
    })


def _vector(value: object, what: str) -> NDArray[np.float32]:
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.ndim != 1:
        raise WireError(f"{what} must be a 1-D float32 numpy array")
    if value.size == 0:
        raise WireError(f"{what} must not be empty")
    return value


def topk_count(n_params: int, topk_fraction: float) -> int:
    """How many entries the top-k encoding keeps: ``max(1, ceil(fraction * n))``, with a small
    tolerance so float error (0.07 * 100 = 7.000000000000001) does not add one."""
    return max(1, min(n_params, math.ceil(topk_fraction * n_params - 1e-6)))


# ---------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class UpdateMessage:
    """One training update from a device: `delta` = trained weights - weights of `base_version`.

    `delta` may hold NaN/inf: the coordinator, not the codec, rejects those (reason
    ``non_finite``). `encoding` is what `encode_update` uses unless told otherwise, and what the
    sender used after `decode_update`. Compared by identity (numpy arrays have no truth value).
    """

    device_id: str
    update_id: str
    base_version: int
    n_samples: int
    delta: NDArray[np.float32]
    encoding: Encoding = "float32"
    created_at: float = field(default_factory=time.time)
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_id(self.device_id, "device_id")
        validate_id(self.update_id, "update_id")
        _int(self.base_version, "base_version", 0)
        _int(self.n_samples, "n_samples", 1)
        _vector(self.delta, "delta")
        if self.encoding not in ENCODINGS:
            raise WireError(f"encoding must be one of {ENCODINGS}, got {_show(self.encoding)}")
        object.__setattr__(self, "created_at", _timestamp(self.created_at))
        object.__setattr__(self, "metrics", _metrics(self.metrics))


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Snapshot:
    """A model version as published to the fleet: flat weights plus the ONNX export (may be
    empty when the adapter has none yet). Weights are always finite."""

    version: int
    spec: ModelSpec
    weights: NDArray[np.float32]
    onnx: bytes = b""
    created_at: float = field(default_factory=time.time)
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Synchronous rounds only: the devices asked to train on this version (None: anyone may).
    cohort: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _int(self.version, "version", 0)
        if self.cohort is not None:
            if not isinstance(self.cohort, tuple) or len(self.cohort) > MAX_COHORT:
                raise WireError(f"cohort must be a tuple of at most {MAX_COHORT} device ids")
            for device in self.cohort:
                validate_id(device, "cohort device id")
        if not isinstance(self.spec, ModelSpec):
            raise WireError("spec must be a ModelSpec")
        if not np.isfinite(_vector(self.weights, "weights")).all():
            raise WireError("snapshot weights must be finite")
        if isinstance(self.onnx, (bytearray, memoryview)):
            object.__setattr__(self, "onnx", bytes(self.onnx))
        elif not isinstance(self.onnx, bytes):
            raise WireError("onnx must be bytes")
        object.__setattr__(self, "created_at", _timestamp(self.created_at))
        object.__setattr__(self, "metrics", _metrics(self.metrics))


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    """The coordinator's end-to-end answer to one update; the agent unspools on any status but
    a ``future_version`` rejection (a coordinator behind the update's base: agent._agent).

    `reason` (a snake_case code such as ``non_finite``) is required iff `status` is
    ``rejected``. `version` is the model version that includes the update, or the current
    version on rejection; None when not (yet) known. `update_id` is None only on the rejection
    of a message whose header cannot be read or names no valid id (`update_label`).
    `retry_after_s`, only on a rejection, asks the device not to train again for that long (a
    participation cap: its work would be refused again, so training now would only spend its
    battery).
    """

    update_id: str | None
    status: AckStatus
    reason: str | None = None
    version: int | None = None
    detail: str = ""
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.update_id is not None or self.status != "rejected":
            validate_id(self.update_id, "update_id")
        if self.status not in ACK_STATUSES:
            raise WireError(f"status must be one of {ACK_STATUSES}, got {_show(self.status)}")
        if self.status == "rejected":
            if not isinstance(self.reason, str) or not _REASON.fullmatch(self.reason):
                raise WireError(f"a rejection needs a snake_case reason, got {_show(self.reason)}")
        elif self.reason is not None:
            raise WireError(f"only a rejection carries a reason, got {_show(self.reason)}")
        if self.version is not None:
            _int(self.version, "version", 0)
        if self.retry_after_s is not None:
            if self.status != "rejected":
                raise WireError("only a rejection carries retry_after_s")
            _float(self.retry_after_s, "retry_after_s", 0.0, MAX_RETRY_AFTER_S)
        if not isinstance(self.detail, str) or len(self.detail) > MAX_DETAIL_CHARS:
            raise WireError(f"detail must be a string of at most {MAX_DETAIL_CHARS} characters")
        try:  # lone surrogates (legal in JSON escapes) would break every log line downstream
            self.detail.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise WireError("detail is not valid Unicode") from exc


# ---------------------------------------------------------------------------- framing


def _bytes(data: object, limit: int, what: str) -> bytes:
    """`data` as immutable bytes, refusing anything over `limit` before looking inside."""
    if isinstance(data, memoryview):
        size = data.nbytes
    elif isinstance(data, (bytes, bytearray)):
        size = len(data)
    else:
        raise WireError(f"{what} must be bytes, got {type(data).__name__}")
    if size > limit:
        raise WireError(f"{what} is {size} bytes; the limit is {limit}")
    return data if isinstance(data, bytes) else bytes(data)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in JSON object")  # ambiguous: readers disagree on which
    return result


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes | memoryview, what: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                           parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError also covers integers past Python's 4300-digit limit.
        raise WireError(f"{what} is not valid UTF-8 JSON: {str(exc)[:200]}") from exc
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object, got {_show(value)}")
    return value


def _check_header(header: dict[str, Any], known_kinds: tuple[str, ...], kind: str) -> None:
    """Schema and kind first, so a newer sender gets `UnsupportedSchema`, not "unknown key"."""
    schema = header.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise WireError(f"schema must be an integer, got {_show(schema)}")
    if schema != SCHEMA:
        relation, fix = (("newer", "upgrade the side that reads it") if schema > SCHEMA else
                         ("older", "upgrade the side that sent it"))
        raise UnsupportedSchema(
            f"{kind} has schema {_show(schema)}, {relation} than the schema {SCHEMA} this build "
            f"speaks; {fix}",
            schema=schema)
    got = header.get("kind")
    if not isinstance(got, str):
        raise WireError(f"kind must be a string, got {_show(got)}")
    if got not in known_kinds:
        raise UnsupportedSchema(f"kind {_show(got)} is not supported", schema=got)
    if got != kind:
        raise WireError(f"expected a {kind}, got a {got}")


def _check_keys(header: Mapping[str, Any], required: frozenset[str],
                misplaced: frozenset[str] = frozenset()) -> None:
    """Required keys present; keys this build knows only elsewhere refused. Any other key is a
    same-major addition by a newer sender: ignored, as the decoders never read it."""
    if wrong := header.keys() & misplaced:
        raise WireError(f"header keys that do not belong here: {', '.join(sorted(wrong))}")
    if missing := required - header.keys():
        raise WireError(f"missing header keys: {', '.join(sorted(missing))}")


def _frame(header: dict[str, Any], *body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header is {len(raw)} bytes; the limit is {MAX_HEADER_BYTES}")
    return b"".join((_PREFIX.pack(MAGIC, FRAME_VERSION, len(raw)), raw, *body))


def _unframe(data: object, limit: int, kind: str) -> tuple[dict[str, Any], memoryview]:
    frame = _bytes(data, limit, kind)
    if len(frame) < _PREFIX.size:
        raise WireError(f"{kind} is {len(frame)} bytes, shorter than the frame prefix")
    magic, version, header_len = _PREFIX.unpack_from(frame)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != FRAME_VERSION:
        raise UnsupportedSchema(f"frame version {version} is not supported", schema=version)
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    end = _PREFIX.size + header_len
    if end > len(frame):
        raise WireError(f"header length {header_len} runs past the end of the data")
    view = memoryview(frame)
    header = _json_object(view[_PREFIX.size:end], "header")
    _check_header(header, _FRAME_KINDS, kind)
    return header, view[end:]


def _check_body(body: memoryview, expected: int) -> None:
    if len(body) != expected:
        raise WireError(f"body is {len(body)} bytes; the header implies {expected}")


# ---------------------------------------------------------------------------- updates


def encode_update(msg: UpdateMessage, *, encoding: Encoding | None = None,
                  topk_fraction: float = 0.1) -> bytes:
    """The wire bytes of `msg`, compressed with `encoding` (default: ``msg.encoding``).

    float16 refuses finite values it would turn into inf; int8 refuses non-finite input.
    Lossy encodings are deterministic: the same message gives the same bytes.
    """
    encoding = msg.encoding if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise WireError(f"encoding must be one of {ENCODINGS}, got {_show(encoding)}")
    x = msg.delta
    n = int(x.size)
    header: dict[str, Any] = {
        "schema": SCHEMA, "kind": "update", "device_id": msg.device_id,
        "update_id": msg.update_id, "base_version": msg.base_version,
        "n_samples": msg.n_samples, "n_params": n, "encoding": encoding,
        "created_at": msg.created_at, "metrics": dict(msg.metrics),
    }
    if encoding == "float32":
        return _frame(header, x.astype("<f4", copy=False).tobytes())
    if encoding == "float16":
        with np.errstate(over="ignore"):
            half = x.astype("<f2")
        if (np.isinf(half) & np.isfinite(x)).any():
            raise WireError("delta has values beyond float16 range (|x| > 65504)")
        return _frame(header, half.tobytes())
    if encoding == "int8":
        if not np.isfinite(x).all():
            raise WireError("int8 cannot encode NaN or inf")
        scale = float(np.abs(x).max()) / 127
        if scale == 0:
            q = np.zeros(n, np.int8)
        else:
            q = np.clip(np.rint(x.astype(np.float64) / scale), -127, 127).astype(np.int8)
        header["scale"] = scale
        return _frame(header, q.tobytes())
    if (isinstance(topk_fraction, bool) or not isinstance(topk_fraction, (int, float))
            or not 0 < topk_fraction <= 1):
        raise WireError(f"topk_fraction must be in (0, 1], got {_show(topk_fraction)}")
    k = topk_count(n, topk_fraction)
    # argpartition puts NaN last, i.e. among the kept: a poisoned delta stays visibly poisoned.
    idx = np.sort(np.argpartition(np.abs(x), n - k)[n - k:])
    header["k"] = k
    return _frame(header, idx.astype("<u4").tobytes(), x[idx].astype("<f4").tobytes())


def decode_update(data: bytes, *, max_message_bytes: int = MAX_UPDATE_BYTES,
                  max_params: int = MAX_PARAMS) -> UpdateMessage:
    """Parse an update from the network; the delta comes back dense float32 (and may hold
    NaN/inf, which the coordinator rejects). Raises `WireError` / `UnsupportedSchema`."""
    header, body = _unframe(data, max_message_bytes, "update")
    encoding = header.get("encoding")
    if not isinstance(encoding, str):
        raise WireError(f"encoding must be a string, got {_show(encoding)}")
    if encoding not in ENCODINGS:
        raise UnsupportedSchema(f"encoding {_show(encoding)} is not supported", schema=encoding)
    _check_keys(header, _UPDATE_KEYS | _ENCODING_KEYS[encoding],
                _ALL_ENCODING_KEYS - _ENCODING_KEYS[encoding])
    device_id = validate_id(header["device_id"], "device_id")
    update_id = validate_id(header["update_id"], "update_id")
    base_version = _int(header["base_version"], "base_version", 0)
    n_samples = _int(header["n_samples"], "n_samples", 1)
    created_at = _timestamp(header["created_at"])
    metrics = _metrics(header["metrics"])
    n = _int(header["n_params"], "n_params", 1, max_params)

    delta: NDArray[np.float32]
    if encoding == "topk":
        k = _int(header["k"], "k", 1, n)
        _check_body(body, 8 * k)
        idx = np.frombuffer(body, "<u4", count=k)
        if not (idx[1:] > idx[:-1]).all() or int(idx[-1]) >= n:
            raise WireError("top-k indices must be strictly increasing and below n_params")
        delta = np.zeros(n, np.float32)
        delta[idx] = np.frombuffer(body, "<f4", count=k, offset=4 * k)
    else:
        _check_body(body, n * _BODY_BYTES_PER_PARAM[encoding])
        if encoding == "int8":
            scale = _float(header["scale"], "scale", 0.0, _MAX_SCALE)
            q = np.frombuffer(body, np.int8)
            if (q == -128).any():  # the encoder clips to +-127; -128 means a forged body
                raise WireError("int8 values must be in -127..127")
            delta = (q.astype(np.float64) * scale).astype(np.float32)
        else:
            # astype copies: an aligned array that owns its memory, not a view pinning the frame.
            delta = np.frombuffer(body, "<f4" if encoding == "float32" else "<f2").astype(
                np.float32)
    return UpdateMessage(device_id=device_id, update_id=update_id, base_version=base_version,
                         n_samples=n_samples, delta=delta, encoding=encoding,
                         created_at=created_at, metrics=metrics)


# ---------------------------------------------------------------------------- snapshots


def encode_snapshot(s: Snapshot) -> bytes:
    """The wire bytes of `s`; the header carries the SHA-256 of the body (weights + ONNX)."""
    weights = s.weights.astype("<f4", copy=False).tobytes()
    digest = hashlib.sha256(weights)
    digest.update(s.onnx)
    header = {
        "schema": SCHEMA, "kind": "snapshot", "version": s.version, "spec": s.spec.to_dict(),
        "n_params": int(s.weights.size), "onnx_len": len(s.onnx), "created_at": s.created_at,
        "metrics": dict(s.metrics), "sha256": digest.hexdigest(),
    }
    if s.cohort is not None:  # absent, not null, when unused: older agents keep decoding
        header["cohort"] = list(s.cohort)
    return _frame(header, weights, s.onnx)


def decode_snapshot(data: bytes, *, max_message_bytes: int = MAX_SNAPSHOT_BYTES,
                    max_params: int = MAX_PARAMS) -> Snapshot:
    """Parse a snapshot from the network, verifying its SHA-256 and that weights are finite.
    Raises `WireError` / `UnsupportedSchema`."""
    header, body = _unframe(data, max_message_bytes, "snapshot")
    _check_keys(header, _SNAPSHOT_KEYS)
    cohort = header.get("cohort")
    if cohort is not None and (not isinstance(cohort, list) or len(cohort) > MAX_COHORT):
        raise WireError(f"cohort must be a list of at most {MAX_COHORT} device ids")
    version = _int(header["version"], "version", 0)
    n = _int(header["n_params"], "n_params", 1, max_params)
    onnx_len = _int(header["onnx_len"], "onnx_len", 0)
    created_at = _timestamp(header["created_at"])
    metrics = _metrics(header["metrics"])
    sha256 = header["sha256"]
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise WireError("sha256 must be 64 lowercase hex digits")
    try:
        spec = ModelSpec.from_dict(header["spec"])
    # ModelSpec.from_dict lets OverflowError through (a huge int learning_rate); convert here.
    except (ModelError, TypeError, ValueError, ArithmeticError, RecursionError) as exc:
        raise WireError(f"bad model spec: {str(exc)[:200]}") from exc
    _check_body(body, 4 * n + onnx_len)
    if hashlib.sha256(body).hexdigest() != sha256:
        raise WireError("snapshot body does not match its sha256")
    weights = np.frombuffer(body, "<f4", count=n).astype(np.float32)
    return Snapshot(version=version, spec=spec, weights=weights, onnx=bytes(body[4 * n:]),
                    created_at=created_at, metrics=metrics,
                    cohort=None if cohort is None else tuple(cohort))


# ---------------------------------------------------------------------------- compact snapshots
# A model version in two parts (docs/wire.md): the weight-free ONNX graph of its spec, sent once
# per spec as a *template*, and per version only the weights (float16 when they fit).

MAX_TEMPLATE_BYTES = 64 * 1024 * 1024
_TEMPLATE_KEYS = frozenset({"schema", "kind", "spec", "bindings", "graph_len", "sha256"})
_WEIGHTS_KEYS = frozenset({"schema", "kind", "version", "spec", "template", "n_params",
                           "encoding", "created_at", "metrics", "sha256"})
WeightsEncoding = Literal["float16", "float32"]
_F16_MAX = float(np.finfo(np.float16).max)


def _spec_of(value: object) -> ModelSpec:
    try:
        return ModelSpec.from_dict(value)
    # ModelSpec.from_dict lets OverflowError through (a huge int learning_rate); convert here.
    except (ModelError, TypeError, ValueError, ArithmeticError, RecursionError) as exc:
        raise WireError(f"bad model spec: {str(exc)[:200]}") from exc


def _sha256_of(header: Mapping[str, Any], what: str = "sha256") -> str:
    value = header[what]
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise WireError(f"{what} must be 64 lowercase hex digits")
    return value


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class TemplateMessage:
    """The template of one model spec (`models._template.OnnxTemplate`) with the spec it
    belongs to. Its id is the SHA-256 of the graph, which embeds the bindings."""

    spec: ModelSpec
    template: OnnxTemplate

    def __post_init__(self) -> None:
        if not isinstance(self.spec, ModelSpec):
            raise WireError("spec must be a ModelSpec")
        if not isinstance(self.template, OnnxTemplate):
            raise WireError("template must be an OnnxTemplate")

    @property
    def id(self) -> str:
        return self.template.id


def encode_template(t: TemplateMessage) -> bytes:
    """The wire bytes of `t`: bindings in the header, the graph as the body."""
    header = {"schema": SCHEMA, "kind": "template", "spec": t.spec.to_dict(),
              "bindings": t.template.bindings_json(), "graph_len": len(t.template.graph),
              "sha256": t.id}
    return _frame(header, t.template.graph)


def decode_template(data: bytes, *, max_message_bytes: int = MAX_TEMPLATE_BYTES
                    ) -> TemplateMessage:
    """Parse a template from the network, verifying its sha256 (its id) and its bindings (which
    `OnnxModel.from_template` checks again against the graph). Raises `WireError` /
    `UnsupportedSchema`."""
    header, body = _unframe(data, max_message_bytes, "template")
    _check_keys(header, _TEMPLATE_KEYS)
    graph_len = _int(header["graph_len"], "graph_len", 1)
    sha256 = _sha256_of(header)
    spec = _spec_of(header["spec"])
    _check_body(body, graph_len)
    if hashlib.sha256(body).hexdigest() != sha256:
        raise WireError("template body does not match its sha256")
    try:
        bindings = parse_bindings(header["bindings"])
        template = OnnxTemplate(graph=bytes(body), bindings=bindings)
    except ModelError as exc:
        raise WireError(f"bad template bindings: {str(exc)[:200]}") from exc
    return TemplateMessage(spec=spec, template=template)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class WeightsMessage:
    """A compact snapshot: one version's weights (float32 here, whatever travelled) and the id of
    the template that turns them into an ONNX model. `encoding` is what travels: float16 unless
    a weight does not fit (|w| > 65504), then float32."""

    version: int
    spec: ModelSpec
    template_id: str
    weights: NDArray[np.float32]
    encoding: WeightsEncoding = "float16"
    created_at: float = field(default_factory=time.time)
    metrics: Mapping[str, float] = field(default_factory=dict)
    cohort: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # The checks of a Snapshot (version, spec, finite weights, metrics, cohort).
        self.snapshot()
        if not isinstance(self.template_id, str) or not _SHA256.fullmatch(self.template_id):
            raise WireError(f"template id must be 64 lowercase hex digits, got "
                            f"{_show(self.template_id)}")
        if self.encoding not in ("float16", "float32"):
            raise WireError(f"encoding must be float16 or float32, got {_show(self.encoding)}")

    @classmethod
    def of(cls, snapshot: Snapshot, template_id: str) -> WeightsMessage:
        """The compact form of `snapshot`: float16 if every weight fits, else float32."""
        w = snapshot.weights
        fits = bool(np.all(np.abs(w) <= _F16_MAX))  # finite already (a Snapshot's weights are)
        return cls(version=snapshot.version, spec=snapshot.spec, template_id=template_id,
                   weights=w, encoding="float16" if fits else "float32",
                   created_at=snapshot.created_at, metrics=snapshot.metrics,
                   cohort=snapshot.cohort)

    def snapshot(self) -> Snapshot:
        """The Snapshot an agent trains from: these (float32) weights, no ONNX."""
        return Snapshot(version=self.version, spec=self.spec, weights=self.weights,
                        created_at=self.created_at, metrics=self.metrics, cohort=self.cohort)


def encode_weights(m: WeightsMessage) -> bytes:
    """The wire bytes of `m`; float16 refuses a weight it would turn into inf."""
    if m.encoding == "float16":
        with np.errstate(over="ignore"):
            body = m.weights.astype("<f2")
        if not np.isfinite(body).all():
            raise WireError("weights have values beyond float16 range (|w| > 65504)")
    else:
        body = m.weights.astype("<f4", copy=False)
    raw = body.tobytes()
    header: dict[str, Any] = {
        "schema": SCHEMA, "kind": "weights", "version": m.version, "spec": m.spec.to_dict(),
        "template": m.template_id, "n_params": int(m.weights.size), "encoding": m.encoding,
        "created_at": m.created_at, "metrics": dict(m.metrics),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    if m.cohort is not None:
        header["cohort"] = list(m.cohort)
    return _frame(header, raw)


def decode_weights(data: bytes, *, max_message_bytes: int = MAX_SNAPSHOT_BYTES,
                   max_params: int = MAX_PARAMS) -> WeightsMessage:
    """Parse a compact snapshot from the network, verifying its sha256 and that the weights are
    finite; they come back float32. Raises `WireError` / `UnsupportedSchema`."""
    header, body = _unframe(data, max_message_bytes, "weights")
    _check_keys(header, _WEIGHTS_KEYS)
    encoding = header["encoding"]
    if not isinstance(encoding, str):
        raise WireError(f"encoding must be a string, got {_show(encoding)}")
    if encoding not in ("float16", "float32"):
        raise UnsupportedSchema(f"weights encoding {_show(encoding)} is not supported",
                                schema=encoding)
    cohort = header.get("cohort")
    if cohort is not None and (not isinstance(cohort, list) or len(cohort) > MAX_COHORT):
        raise WireError(f"cohort must be a list of at most {MAX_COHORT} device ids")
    version = _int(header["version"], "version", 0)
    n = _int(header["n_params"], "n_params", 1, max_params)
    created_at = _timestamp(header["created_at"])
    metrics = _metrics(header["metrics"])
    sha256 = _sha256_of(header)
    template_id = _sha256_of(header, "template")
    spec = _spec_of(header["spec"])
    _check_body(body, n * _BODY_BYTES_PER_PARAM[encoding])
    if hashlib.sha256(body).hexdigest() != sha256:
        raise WireError("weights body does not match its sha256")
    weights = np.frombuffer(body, "<f2" if encoding == "float16" else "<f4").astype(np.float32)
    if not np.isfinite(weights).all():
        raise WireError("weights must be finite")
    return WeightsMessage(version=version, spec=spec, template_id=template_id, weights=weights,
                          encoding=encoding,  # type: ignore[arg-type]
                          created_at=created_at, metrics=metrics,
                          cohort=None if cohort is None else tuple(cohort))


def _peek_header(data: bytes) -> dict[str, Any] | None:
    """The JSON header of a frame in this frame version, None when it cannot be read. Nothing
    else is checked: a hint, never a decoded message."""
    try:
        magic, version, header_len = _PREFIX.unpack_from(data)
        if magic != MAGIC or version != FRAME_VERSION or header_len > MAX_HEADER_BYTES:
            return None
        return _json_object(memoryview(data)[_PREFIX.size:_PREFIX.size + header_len], "header")
    except (struct.error, TypeError, WireError):
        return None


def frame_kind(data: bytes) -> str | None:
    """The ``kind`` a frame's header names (``"snapshot"``, ``"weights"``, ...), None when it is
    not a readable frame. Only a hint for choosing a decoder, which checks everything."""
    header = _peek_header(data)
    kind = None if header is None else header.get("kind")
    return kind if isinstance(kind, str) else None


def update_label(data: bytes) -> tuple[str | None, int | None]:
    """The update id and base version an update's header names, each None when unreadable or
    invalid; whatever the schema or the body. Why: the ack of an update that does not decode (a
    newer schema major, a damaged body) names its update id whenever the header does, so the
    sender can clear it from its spool; and an agent learns a spooled update's base version
    without decoding its delta. Reads at most the frame prefix and the header."""
    header = _peek_header(data)
    if header is None or header.get("kind") != "update":
        return None, None
    try:
        update_id: str | None = validate_id(header.get("update_id"), "update_id")
    except WireError:
        update_id = None
    try:
        base: int | None = _int(header.get("base_version"), "base_version", 0)
    except WireError:
        base = None
    return update_id, base


# ---------------------------------------------------------------------------- acks


def encode_ack(ack: Ack) -> bytes:
    """Compact UTF-8 JSON, readable as is on the wire."""
    obj: dict[str, Any] = {"schema": SCHEMA, "kind": "ack", "update_id": ack.update_id,
                           "status": ack.status,
           "reason": ack.reason, "version": ack.version, "detail": ack.detail}
    if ack.retry_after_s is not None:  # optional key: agents that predate it read every other ack
        obj["retry_after_s"] = ack.retry_after_s
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    if len(raw) > MAX_ACK_BYTES:  # cannot happen with a 500-character detail; guards edits
        raise WireError(f"ack is {len(raw)} bytes; the limit is {MAX_ACK_BYTES}")
    return raw


def decode_ack(data: bytes) -> Ack:
    """Parse an ack from the network. Raises `WireError` / `UnsupportedSchema`."""
    obj = _json_object(_bytes(data, MAX_ACK_BYTES, "ack"), "ack")
    _check_header(obj, ("ack",), "ack")
    _check_keys(obj, _ACK_KEYS)
    # Ack validates every field itself; a hostile status/reason/version lands there.
    return Ack(update_id=obj["update_id"], status=obj["status"], reason=obj["reason"],
               version=obj["version"], detail=obj["detail"],
               retry_after_s=obj.get("retry_after_s"))


# ---------------------------------------------------------------------------- announcements

MAX_ANNOUNCEMENT_BYTES = 64 * 1024  # a full cohort of 900 ids fits; without one, ~150 bytes
_ANNOUNCEMENT_KEYS = frozenset({"schema", "kind", "version", "sha256", "size", "created_at"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """What the coordinator says about the snapshot the broker holds, in tens of bytes, so an
    agent can decide whether to fetch it (docs/architecture.md, "Models on demand").

    `sha256` is the digest of the snapshot message exactly as published (signature included),
    `size` its length in bytes. `cohort` copies the snapshot's: a synchronous round names the
    devices it invites, and only they need the snapshot to train. The announcement is never
    trusted for the model itself: the fetched snapshot is verified as always.
    """

    version: int
    sha256: str
    size: int
    created_at: float
    cohort: tuple[str, ...] | None = None
    # The compact snapshot of the same version (`WeightsMessage` on the weights topic), when
    # the coordinator publishes one: its sha256 and size as published, and its template's id.
    # All three or none; an older coordinator sends none (the agent then fetches the model).
    weights_sha256: str | None = None
    weights_size: int | None = None
    template: str | None = None

    def __post_init__(self) -> None:
        _int(self.version, "version", 0)
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise WireError(f"sha256 must be 64 lowercase hex digits, got {_show(self.sha256)}")
        _int(self.size, "size", 1, MAX_SNAPSHOT_BYTES + 1024)  # + the signature trailer
        compact = (self.weights_sha256, self.weights_size, self.template)
        if any(v is not None for v in compact):
            if any(v is None for v in compact):
                raise WireError("weights_sha256, weights_size and template come together")
            for value, what in ((self.weights_sha256, "weights_sha256"),
                                (self.template, "template")):
                if not isinstance(value, str) or not _SHA256.fullmatch(value):
                    raise WireError(f"{what} must be 64 lowercase hex digits, got "
                                    f"{_show(value)}")
            _int(self.weights_size, "weights_size", 1, MAX_SNAPSHOT_BYTES + 1024)
        object.__setattr__(self, "created_at", _timestamp(self.created_at))
        if self.cohort is not None:
            if not isinstance(self.cohort, tuple) or len(self.cohort) > MAX_COHORT:
                raise WireError(f"cohort must be a list of at most {MAX_COHORT} device ids")
            for device in self.cohort:
                validate_id(device, "cohort device id")

    @property
    def compact(self) -> bool:
        """Whether it names a compact snapshot (weights + template) besides the full one."""
        return self.weights_sha256 is not None

    @classmethod
    def of(cls, payload: bytes, snapshot: Snapshot, *, weights: bytes | None = None,
           template_id: str | None = None) -> Announcement:
        """The announcement of `snapshot`, published as the bytes `payload`, and of its compact
        form `weights` (published bytes) of the template `template_id`, when given."""
        return cls(version=snapshot.version, sha256=hashlib.sha256(payload).hexdigest(),
                   size=len(payload), created_at=snapshot.created_at, cohort=snapshot.cohort,
                   weights_sha256=None if weights is None else hashlib.sha256(weights).hexdigest(),
                   weights_size=None if weights is None else len(weights),
                   template=None if weights is None else template_id)


def encode_announcement(a: Announcement) -> bytes:
    """Compact UTF-8 JSON, readable with mosquitto_sub."""
    obj: dict[str, Any] = {"schema": SCHEMA, "kind": "announce", "version": a.version,
                           "sha256": a.sha256, "size": a.size, "created_at": a.created_at}
    if a.cohort is not None:  # absent while anyone may train, as in the snapshot
        obj["cohort"] = list(a.cohort)
    if a.compact:  # optional keys: older agents ignore them and fetch the full snapshot
        obj.update(weights_sha256=a.weights_sha256, weights_size=a.weights_size,
                   template=a.template)
    raw = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_ANNOUNCEMENT_BYTES:  # cannot happen within MAX_COHORT; guards edits
        raise WireError(f"announcement is {len(raw)} bytes; the limit is "
                        f"{MAX_ANNOUNCEMENT_BYTES}")
    return raw


def decode_announcement(data: bytes) -> Announcement:
    """Parse an announcement from the network. Raises `WireError` / `UnsupportedSchema`."""
    obj = _json_object(_bytes(data, MAX_ANNOUNCEMENT_BYTES, "announcement"), "announcement")
    _check_header(obj, ("announce",), "announce")
    _check_keys(obj, _ANNOUNCEMENT_KEYS)
    cohort = obj.get("cohort")
    if cohort is not None and not isinstance(cohort, list):
        raise WireError(f"cohort must be a list of device ids, got {_show(cohort)}")
    return Announcement(version=obj["version"], sha256=obj["sha256"], size=obj["size"],
                        created_at=obj["created_at"],
                        cohort=None if cohort is None else tuple(cohort),
                        weights_sha256=obj.get("weights_sha256"),
                        weights_size=obj.get("weights_size"), template=obj.get("template"))
