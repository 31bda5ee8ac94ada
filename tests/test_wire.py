"""Wire codec: round trips per encoding, and hostile input that must only ever raise WireError."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.typing import NDArray

from fedasync_iot.models._errors import UnsupportedSchema, WireError
from fedasync_iot.models._spec import ModelSpec
from fedasync_iot.models._wire import (
    ENCODINGS,
    MAGIC,
    MAX_HEADER_BYTES,
    Ack,
    Encoding,
    Snapshot,
    UpdateMessage,
    decode_ack,
    decode_snapshot,
    decode_update,
    encode_ack,
    encode_snapshot,
    encode_update,
    topk_count,
    update_label,
    validate_id,
)

FAST = settings(max_examples=250, deadline=None, derandomize=True)
PREFIX = struct.Struct("<4sBI")
SPEC = ModelSpec(kind="mlp", n_features=4, classes=(0, 1, 2), hidden=(8,))

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
any32 = st.floats(width=32)
ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True).filter(lambda s: s not in {".", ".."})
metric_values = st.floats(allow_nan=False, allow_infinity=False)
metrics = st.dictionaries(ids, metric_values, max_size=16)


def vectors(elements: st.SearchStrategy[float] = finite32) -> st.SearchStrategy[Any]:
    return arrays(np.float32, st.integers(1, 300), elements=elements)


def update(delta: NDArray[np.float32], **kw: Any) -> UpdateMessage:
    fields: dict[str, Any] = {"device_id": "pi-07", "update_id": "u-0001", "base_version": 3,
                              "n_samples": 120, "created_at": 1_700_000_000.25,
                              "metrics": {"loss": 0.5}}
    return UpdateMessage(delta=delta, **(fields | kw))


def snapshot(weights: NDArray[np.float32], **kw: Any) -> Snapshot:
    fields: dict[str, Any] = {"version": 7, "spec": SPEC, "onnx": b"\x08\x07onnx",
                              "created_at": 1_700_000_000.5, "metrics": {"accuracy": 0.9}}
    return Snapshot(weights=weights, **(fields | kw))


def rng_vector(n: int, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).normal(0, 0.1, n).astype(np.float32)


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    _, _, hlen = PREFIX.unpack_from(data)
    return json.loads(data[PREFIX.size:PREFIX.size + hlen]), data[PREFIX.size + hlen:]


def frame(header: dict[str, Any] | bytes, body: bytes = b"", *, version: int = 1) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREFIX.pack(MAGIC, version, len(raw)) + raw + body


def tamper(data: bytes, body: bytes | None = None, drop: str | None = None,
           **changes: Any) -> bytes:
    """`data` re-framed with header fields changed (or one dropped) and optionally a new body."""
    header, old_body = split(data)
    header.update(changes)
    if drop:
        del header[drop]
    return frame(header, old_body if body is None else body)


VALID_UPDATES = {e: encode_update(update(rng_vector(40)), encoding=e) for e in ENCODINGS}
VALID_SNAPSHOT = encode_snapshot(snapshot(rng_vector(30)))
VALID_ACK = encode_ack(Ack(update_id="u-0001", status="rejected", reason="non_finite",
                           version=4, detail="delta has NaN at 3 positions"))
DECODERS: dict[str, Callable[[bytes], object]] = {
    "update": decode_update, "snapshot": decode_snapshot, "ack": decode_ack}
VALID = [("update", v) for v in VALID_UPDATES.values()] + [
    ("snapshot", VALID_SNAPSHOT), ("ack", VALID_ACK)]


def rejects(kind: str, data: bytes) -> None:
    with pytest.raises(WireError):
        DECODERS[kind](data)


def wire_error_or_valid(kind: str, data: bytes) -> None:
    with contextlib.suppress(WireError):
        DECODERS[kind](data)


# ---------------------------------------------------------------------------- round trips


@FAST
@given(vectors(any32))
def test_float32_round_trip_is_bit_exact_including_nan_and_inf(x: NDArray[np.float32]) -> None:
    got = decode_update(encode_update(update(x), encoding="float32")).delta
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), x.view(np.uint32))


def test_float32_carries_nan_and_inf_for_the_coordinator_to_reject() -> None:
    x = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)
    got = decode_update(encode_update(update(x))).delta
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.5


@FAST
@given(vectors(st.floats(-65504, 65504, width=32)))
def test_float16_round_trip_within_half_precision(x: NDArray[np.float32]) -> None:
    got = decode_update(encode_update(update(x), encoding="float16")).delta
    assert got.dtype == np.float32
    assert np.array_equal(got, x.astype(np.float16).astype(np.float32))
    # half precision: 11 significant bits, plus the subnormal floor
    assert np.all(np.abs(got - x) <= np.abs(x) * 2**-11 + 2**-25)


@FAST
@given(vectors())
def test_int8_error_at_most_half_a_step(x: NDArray[np.float32]) -> None:
    data = encode_update(update(x), encoding="int8")
    scale = split(data)[0]["scale"]
    assert scale == pytest.approx(float(np.abs(x).max()) / 127)
    got = decode_update(data).delta
    err = np.abs(got.astype(np.float64) - x.astype(np.float64))
    # plus one float32 rounding of the decoded value (relative, or absolute among subnormals)
    assert np.all(err <= scale / 2 * (1 + 1e-9) + np.abs(x.astype(np.float64)) * 2**-24 + 2**-149)


def test_int8_all_zero_vector_has_zero_scale() -> None:
    data = encode_update(update(np.zeros(5, np.float32)), encoding="int8")
    assert split(data)[0]["scale"] == 0
    assert not decode_update(data).delta.any()


@FAST
@given(vectors(), st.floats(0.001, 1))
def test_topk_keeps_exactly_the_k_largest(x: NDArray[np.float32], fraction: float) -> None:
    data = encode_update(update(x), encoding="topk", topk_fraction=fraction)
    k = split(data)[0]["k"]
    assert k == topk_count(x.size, fraction) == max(1, math.ceil(round(fraction * x.size, 6)))
    got = decode_update(data).delta
    kept = got != 0
    assert np.array_equal(got[kept], x[kept])
    assert np.count_nonzero(got) == min(k, np.count_nonzero(x))
    dropped = ~kept & (x != 0)
    if dropped.any():
        assert np.abs(x[dropped]).max() <= np.abs(x[kept]).min()


def test_topk_count_is_not_fooled_by_float_error() -> None:
    assert topk_count(100, 0.07) == 7
    assert topk_count(2410, 0.1) == 241
    assert topk_count(5, 0.01) == 1
    assert topk_count(7, 1.0) == 7


@FAST
@given(st.fixed_dictionaries({
    "device_id": ids, "update_id": ids, "base_version": st.integers(0, 2**53 - 1),
    "n_samples": st.integers(1, 2**53 - 1), "created_at": st.floats(0, 1e11),
    "metrics": metrics, "encoding": st.sampled_from(ENCODINGS)}))
def test_update_metadata_round_trips(fields: dict[str, Any]) -> None:
    got = decode_update(encode_update(update(rng_vector(10), **fields)))
    assert {name: getattr(got, name) for name in fields} == fields


@FAST
@given(vectors(), st.binary(max_size=200), st.integers(0, 2**53 - 1), metrics)
def test_snapshot_round_trips(w: NDArray[np.float32], onnx: bytes, version: int,
                              m: dict[str, float]) -> None:
    got = decode_snapshot(encode_snapshot(snapshot(w, onnx=onnx, version=version, metrics=m)))
    assert np.array_equal(got.weights.view(np.uint32), w.view(np.uint32))
    assert (got.onnx, got.version, got.spec, dict(got.metrics), got.created_at) == (
        onnx, version, SPEC, m, 1_700_000_000.5)


@FAST
@given(st.builds(
    Ack, update_id=ids, status=st.sampled_from(["accepted", "buffered", "duplicate"]),
    version=st.none() | st.integers(0, 2**53 - 1), detail=st.text(max_size=500).filter(
        lambda t: not any(0xD800 <= ord(c) <= 0xDFFF for c in t)))
    | st.builds(Ack, update_id=st.none() | ids, status=st.just("rejected"),
                reason=st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True),
                version=st.none() | st.integers(0, 100),
                retry_after_s=st.none() | st.floats(0, 7 * 86_400)))
def test_ack_round_trips(ack: Ack) -> None:
    data = encode_ack(ack)
    assert len(data) <= 4096
    assert decode_ack(data) == ack


def test_ack_is_readable_json() -> None:
    assert json.loads(VALID_ACK) == {
        "schema": 1, "kind": "ack", "update_id": "u-0001", "status": "rejected",
        "reason": "non_finite", "version": 4, "detail": "delta has NaN at 3 positions"}


def test_int8_is_at_least_3_5x_smaller_than_float32_for_2410_params() -> None:
    msg = update(rng_vector(2410), device_id="raspberrypi-4b-kitchen-07",
                 update_id="0f8fad5bd9cb469fa16570867728950e",
                 metrics={"loss": 0.6931471805599453, "accuracy": 0.8125})
    sizes = {e: len(encode_update(msg, encoding=e)) for e in ENCODINGS}
    assert sizes["float32"] > 4 * 2410 > sizes["float16"] > 2 * 2410 > sizes["topk"]
    assert sizes["float32"] / sizes["int8"] >= 3.5


# ---------------------------------------------------------------------------- hostile input


@FAST
@given(st.binary(max_size=300), st.sampled_from(sorted(DECODERS)))
def test_random_bytes_raise_wire_error(data: bytes, kind: str) -> None:
    rejects(kind, data)


@FAST
@given(st.binary(max_size=300), st.integers(0, 2))
def test_random_bytes_after_a_valid_prefix_raise_wire_error(tail: bytes, version: int) -> None:
    rejects("update", MAGIC + bytes([version]) + tail)
    rejects("snapshot", MAGIC + bytes([version]) + tail)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=4),
    max_leaves=10)


@FAST
@given(st.data(), st.sampled_from(VALID), st.binary(max_size=64))
def test_random_header_values_raise_wire_error_or_decode(data: st.DataObject,
                                                         case: tuple[str, bytes],
                                                         body: bytes) -> None:
    kind, valid = case
    header = json.loads(valid) if kind == "ack" else split(valid)[0]
    for key in data.draw(st.lists(st.sampled_from(sorted(header)), min_size=1, max_size=3)):
        header[key] = data.draw(json_values)
    if kind == "ack":
        wire_error_or_valid(kind, json.dumps(header).encode())
    else:
        body = data.draw(st.sampled_from([body, split(valid)[1]]))
        wire_error_or_valid(kind, frame(header, body))


@pytest.mark.parametrize(("kind", "data"), VALID)
def test_every_truncation_raises_wire_error(kind: str, data: bytes) -> None:
    DECODERS[kind](data)
    for n in range(len(data)):
        rejects(kind, data[:n])


@pytest.mark.parametrize(("kind", "data"), VALID)
def test_every_single_byte_flip_raises_wire_error_or_decodes(kind: str, data: bytes) -> None:
    for i in range(len(data)):
        for mask in (0x01, 0x20, 0x80, 0xFF):
            wire_error_or_valid(kind, data[:i] + bytes([data[i] ^ mask]) + data[i + 1:])


@FAST
@given(st.sampled_from(VALID), st.integers(0, 10**6), st.integers(0, 255))
def test_random_byte_replacements_raise_wire_error_or_decode(case: tuple[str, bytes], at: int,
                                                             value: int) -> None:
    kind, data = case
    i = at % len(data)
    wire_error_or_valid(kind, data[:i] + bytes([value]) + data[i + 1:])


def test_any_change_to_a_snapshot_body_is_caught_by_sha256() -> None:
    _, body = split(VALID_SNAPSHOT)
    start = len(VALID_SNAPSHOT) - len(body)
    for i in range(start, len(VALID_SNAPSHOT)):
        flipped = bytearray(VALID_SNAPSHOT)
        flipped[i] ^= 0x01
        with pytest.raises(WireError, match="sha256"):
            decode_snapshot(bytes(flipped))


# ---------------------------------------------------------------------------- each validation

F32 = VALID_UPDATES["float32"]


def test_bad_magic() -> None:
    with pytest.raises(WireError, match="magic"):
        decode_update(b"FAIX" + F32[4:])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_frame_version_is_unsupported(version: int) -> None:
    with pytest.raises(UnsupportedSchema):
        decode_update(F32[:4] + bytes([version]) + F32[5:])


def test_unknown_schema_kind_and_encoding_are_unsupported() -> None:
    cases = [("update", tamper(F32, schema=2, future_key=1)),
             ("update", tamper(F32, kind="grad")), ("update", tamper(F32, encoding="bfloat16")),
             ("snapshot", tamper(VALID_SNAPSHOT, schema=2)),
             ("ack", VALID_ACK.replace(b'"schema":1', b'"schema":9')),
             ("ack", VALID_ACK.replace(b'"kind":"ack"', b'"kind":"nack"'))]
    for kind, data in cases:
        with pytest.raises(UnsupportedSchema):
            DECODERS[kind](data)


def test_update_label_reads_the_header_whatever_the_schema_or_body() -> None:
    # What the coordinator's ack names when the update does not decode (docs/wire.md, the ack):
    # its sender clears its spool by that id.
    for data in (F32, tamper(F32, schema=2, future_key=1), tamper(F32, encoding="bfloat16"),
                 tamper(F32, body=b"short"), tamper(F32, drop="n_params"),
                 F32 + b"trailing", F32[:PREFIX.size + PREFIX.unpack_from(F32)[2]]):
        assert update_label(data)[0] == "u-0001", data[:80]
    assert update_label(F32) == ("u-0001", 3)
    assert update_label(tamper(F32, base_version=-1)) == ("u-0001", None)
    # No id to name: not a frame, not an update, a bad id, or an unreadable header.
    for data in (b"", b"garbage", VALID_SNAPSHOT, tamper(F32, update_id="../x"),
                 tamper(F32, drop="update_id"), F32[:4] + bytes([2]) + F32[5:],
                 F32[:PREFIX.size + 10], PREFIX.pack(MAGIC, 1, MAX_HEADER_BYTES + 1)):
        assert update_label(data)[0] is None, data[:80]


def test_known_kind_to_the_wrong_decoder_is_a_plain_wire_error() -> None:
    for call in (lambda: decode_snapshot(F32), lambda: decode_update(VALID_SNAPSHOT)):
        with pytest.raises(WireError) as info:
            call()
        assert type(info.value) is WireError


def test_header_length_beyond_data() -> None:
    with pytest.raises(WireError, match="past the end"):
        decode_update(PREFIX.pack(MAGIC, 1, 1000) + b"{}")
    with pytest.raises(WireError, match="exceeds"):
        decode_update(PREFIX.pack(MAGIC, 1, MAX_HEADER_BYTES + 1) + b"{" * 100)


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null", b"\xff\xfe", b"{", b"{}x",
                                 b'{"schema":NaN}', b'{"schema":1,"schema":1}'])
def test_header_must_be_one_utf8_json_object(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_update(frame(raw))


def test_deeply_nested_json() -> None:
    for raw in (b"[" * 60_000, b'{"schema":1,"kind":"update","metrics":' + b'{"a":' * 20_000):
        with pytest.raises(WireError):
            decode_update(frame(raw))
    with pytest.raises(WireError):
        decode_ack(b"[" * 4000)


def test_misplaced_and_missing_keys() -> None:
    with pytest.raises(WireError, match="do not belong"):
        decode_update(tamper(F32, k=3))  # k belongs to topk only
    with pytest.raises(WireError, match="do not belong"):
        decode_update(tamper(VALID_UPDATES["topk"], scale=0.5))  # scale belongs to int8 only
    with pytest.raises(WireError, match="missing"):
        decode_update(tamper(F32, drop="n_samples"))
    with pytest.raises(WireError, match="missing"):
        decode_update(tamper(VALID_UPDATES["int8"], drop="scale"))
    with pytest.raises(WireError, match="missing"):
        decode_ack(VALID_ACK.replace(b'"detail":', b'"other":'))


@pytest.mark.parametrize(("field", "value"), [
    ("base_version", True), ("n_samples", True), ("n_params", False), ("schema", True),
    ("n_samples", 5.0), ("base_version", "3"), ("created_at", True), ("metrics", {"a": True}),
])
def test_wrong_types_bools_are_not_numbers(field: str, value: Any) -> None:
    with pytest.raises(WireError):
        decode_update(tamper(F32, **{field: value}))


@pytest.mark.parametrize(("field", "value"), [
    ("base_version", -1), ("n_samples", 0), ("n_samples", 2**53), ("created_at", -1.0),
    ("created_at", 1e300), ("created_at", 10**400), ("n_params", 0),
    ("metrics", {f"m{i}": 0.0 for i in range(17)}), ("metrics", {"a/b": 1.0}),
])
def test_negative_or_absurd_numbers(field: str, value: Any) -> None:
    with pytest.raises(WireError):
        decode_update(tamper(F32, **{field: value}))


def test_non_finite_json_numbers_are_rejected() -> None:
    header, body = split(F32)
    raw = json.dumps(header).replace('"created_at": 1700000000.25', '"created_at": 1e999')
    with pytest.raises(WireError, match="created_at"):
        decode_update(frame(raw.encode(), body))


def test_huge_n_params_is_refused_before_touching_the_body() -> None:
    with pytest.raises(WireError, match="n_params"):
        decode_update(tamper(F32, n_params=10**12))
    with pytest.raises(WireError, match="n_params"):
        decode_update(tamper(F32, n_params=10**200))
    with pytest.raises(WireError, match="n_params"):
        decode_update(F32, max_params=39)
    with pytest.raises(WireError, match="n_params"):
        decode_snapshot(VALID_SNAPSHOT, max_params=29)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_body_too_long_or_too_short(encoding: Encoding) -> None:
    data = VALID_UPDATES[encoding]
    # top-k body length follows k (4 here), the others follow n_params (40)
    longer: dict[str, Any]
    shorter: dict[str, Any]
    longer, shorter = ({"k": 3}, {"k": 5}) if encoding == "topk" else (
        {"n_params": 39}, {"n_params": 41})
    for bad in (data + b"\x00", data[:-1], tamper(data, **longer), tamper(data, **shorter)):
        with pytest.raises(WireError):
            decode_update(bad)


def test_snapshot_body_and_onnx_length() -> None:
    for bad in (VALID_SNAPSHOT + b"\x00", tamper(VALID_SNAPSHOT, onnx_len=5),
                tamper(VALID_SNAPSHOT, n_params=31)):
        with pytest.raises(WireError, match="body"):
            decode_snapshot(bad)


def topk_frame(idx: list[int], n: int = 10) -> bytes:
    body = np.array(idx, "<u4").tobytes() + np.ones(len(idx), "<f4").tobytes()
    return tamper(VALID_UPDATES["topk"], body=body, n_params=n, k=len(idx))


def test_topk_indices_are_validated() -> None:
    assert decode_update(topk_frame([0, 3, 9])).delta.tolist() == [1, 0, 0, 1] + [0] * 5 + [1]
    for idx in ([3, 1, 5], [2, 2, 5], [0, 1, 10], [0, 2**32 - 1]):
        with pytest.raises(WireError, match="indices"):
            decode_update(topk_frame(idx))
    for k in (0, 11, -1):
        with pytest.raises(WireError, match="k must"):
            decode_update(tamper(topk_frame([0, 1]), k=k))


def test_int8_scale_and_values_are_validated() -> None:
    int8 = VALID_UPDATES["int8"]
    for scale in (-1.0, 1e300, "1", None):
        with pytest.raises(WireError, match="scale"):
            decode_update(tamper(int8, scale=scale))
    with pytest.raises(WireError, match="-127"):
        decode_update(tamper(int8, body=b"\x80" + split(int8)[1][1:]))


@pytest.mark.parametrize("bad", ["", "a" * 65, "pi/07", "pi+", "#", "pi 07", "pié", ".", "..",
                                 "pi\n", 7, None, True])
def test_bad_ids(bad: object) -> None:
    with pytest.raises(WireError):
        validate_id(bad, "device_id")
    with pytest.raises(WireError, match="device_id"):
        decode_update(tamper(F32, device_id=bad))
    with pytest.raises(WireError, match="update_id"):
        decode_update(tamper(F32, update_id=bad))


def test_good_ids() -> None:
    for good in ("pi-07", "a", "A.b_c-9", "x" * 64, "..."):
        assert validate_id(good, "id") == good


def test_sha256_mismatch_and_malformed() -> None:
    with pytest.raises(WireError, match="sha256"):
        decode_snapshot(tamper(VALID_SNAPSHOT, sha256="0" * 64))
    with pytest.raises(WireError, match="sha256"):
        decode_snapshot(tamper(VALID_SNAPSHOT, sha256="A" * 64))


def test_snapshot_spec_errors_become_wire_errors() -> None:
    spec = SPEC.to_dict()
    bads: list[Any] = [{**spec, "kind": "forest"}, {**spec, "learning_rate": 10**400}, [], "mlp",
                       {**spec, "hidden": [[1]]}, {**spec, "extra": 1}]
    for bad in bads:
        with pytest.raises(WireError, match="spec"):
            decode_snapshot(tamper(VALID_SNAPSHOT, spec=bad))


def test_snapshot_weights_must_be_finite() -> None:
    w = rng_vector(4)
    w[2] = np.nan
    with pytest.raises(WireError, match="finite"):
        snapshot(w)
    body = w.tobytes()
    data = tamper(VALID_SNAPSHOT, body=body, n_params=4, onnx_len=0,
                  sha256=hashlib.sha256(body).hexdigest())
    with pytest.raises(WireError, match="finite"):
        decode_snapshot(data)


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(WireError, match="limit"):
        decode_update(b"\x00" * 101, max_message_bytes=100)  # not even a frame: size comes first
    with pytest.raises(WireError, match="limit"):
        decode_update(F32, max_message_bytes=len(F32) - 1)
    assert decode_update(F32, max_message_bytes=len(F32)).delta.size == 40
    with pytest.raises(WireError, match="limit"):
        decode_snapshot(VALID_SNAPSHOT, max_message_bytes=100)
    with pytest.raises(WireError, match="limit"):
        decode_ack(b" " * 4097)


def test_non_bytes_input() -> None:
    for bad in ("FAIO", None, [1, 2]):
        with pytest.raises(WireError):
            decode_update(bad)  # type: ignore[arg-type]
    assert decode_update(bytearray(F32)).delta.size == 40  # type: ignore[arg-type]
    assert decode_ack(memoryview(VALID_ACK)).status == "rejected"  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [
    {"update_id": "u", "status": "rejected", "reason": None},
    {"update_id": "u", "status": "accepted", "reason": "x"},
    {"update_id": "u", "status": "rejected", "reason": "Not Snake"},
    {"update_id": "u", "status": "ok"},
    {"update_id": "u", "status": "accepted", "version": -1},
    {"update_id": "u", "status": "accepted", "version": True},
    {"update_id": "u", "status": "accepted", "detail": "x" * 501},
    {"update_id": "u", "status": "accepted", "detail": "\ud800"},
    {"update_id": "u/1", "status": "accepted"},
    {"update_id": None, "status": "accepted"},  # only a rejection may lack the update id
    {"update_id": None, "status": "duplicate"},
    {"update_id": "u", "status": "accepted", "retry_after_s": 5.0},  # only on a rejection
    {"update_id": "u", "status": "rejected", "reason": "x", "retry_after_s": -1.0},
    {"update_id": "u", "status": "rejected", "reason": "x", "retry_after_s": float("inf")},
    {"update_id": "u", "status": "rejected", "reason": "x", "retry_after_s": 1e9},
    {"update_id": "u", "status": "rejected", "reason": "x", "retry_after_s": "5"},
])
def test_ack_validation(raw: dict[str, Any]) -> None:
    fields = {"reason": None, "version": None, "detail": ""} | raw
    with pytest.raises(WireError):
        Ack(**fields)
    with pytest.raises(WireError):
        decode_ack(json.dumps({"schema": 1, "kind": "ack", **fields}).encode())


def test_retry_after_is_optional_on_the_wire() -> None:
    # Acks without it (every ack but a capped rejection) are byte-identical to before.
    assert b"retry_after_s" not in encode_ack(Ack(update_id="u", status="rejected", reason="x"))
    capped = Ack(update_id="u", status="rejected", reason="participation_cap",
                 retry_after_s=120.5)
    assert json.loads(encode_ack(capped))["retry_after_s"] == 120.5
    assert decode_ack(encode_ack(capped)) == capped


# ---------------------------------------------------------------------------- encode side


def test_constructors_validate() -> None:
    for bad in ({"delta": rng_vector(3).astype(np.float64)}, {"delta": np.zeros((2, 2), "f4")},
                {"delta": np.zeros(0, np.float32)}, {"delta": [1.0]}, {"n_samples": 0},
                {"base_version": -1}, {"encoding": "bf16"}, {"created_at": math.nan},
                {"metrics": {"loss": math.inf}}, {"device_id": "a/b"}):
        with pytest.raises(WireError):
            update(**({"delta": rng_vector(3)} | bad))
    with pytest.raises(WireError):
        snapshot(rng_vector(3), spec=SPEC.to_dict())
    with pytest.raises(WireError):
        snapshot(rng_vector(3), onnx="model")


def test_metrics_are_read_only() -> None:
    msg = update(rng_vector(3))
    with pytest.raises(TypeError):
        msg.metrics["loss"] = 1.0  # type: ignore[index]


def test_float16_overflow_is_refused_not_inf() -> None:
    for big in (65520.0, -1e6):
        with pytest.raises(WireError, match="float16"):
            encode_update(update(np.array([1.0, big], np.float32)), encoding="float16")
    # 65519 still rounds to the largest half; real inf/NaN pass through for the coordinator
    x = np.array([65519.0, np.inf, np.nan], np.float32)
    got = decode_update(encode_update(update(x), encoding="float16")).delta
    assert got[0] == 65504 and got[1] == np.inf and np.isnan(got[2])


def test_int8_refuses_non_finite() -> None:
    for bad in (np.nan, np.inf):
        with pytest.raises(WireError, match="int8"):
            encode_update(update(np.array([1.0, bad], np.float32)), encoding="int8")


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan, True])
def test_topk_fraction_is_validated(fraction: float) -> None:
    with pytest.raises(WireError, match="topk_fraction"):
        encode_update(update(rng_vector(10)), encoding="topk", topk_fraction=fraction)


def test_encoding_argument_overrides_and_is_validated() -> None:
    msg = update(rng_vector(10), encoding="int8")
    assert decode_update(encode_update(msg)).encoding == "int8"
    assert decode_update(encode_update(msg, encoding="float16")).encoding == "float16"
    with pytest.raises(WireError):
        encode_update(msg, encoding="gzip")  # type: ignore[arg-type]


def test_encoding_is_deterministic() -> None:
    msg = update(rng_vector(500, seed=3))
    for e in ENCODINGS:
        assert encode_update(msg, encoding=e) == encode_update(msg, encoding=e)


def test_a_message_too_malformed_to_name_its_update_can_still_be_rejected() -> None:
    ack = Ack(update_id=None, status="rejected", reason="malformed", version=3, detail="bad magic")
    assert decode_ack(encode_ack(ack)) == ack


def test_snapshot_cohort_round_trips_and_is_absent_when_unused() -> None:
    from fedasync_iot.models._wire import MAX_COHORT, Snapshot, decode_snapshot, encode_snapshot

    spec = ModelSpec(kind="linear", n_features=2)
    weights = np.zeros(3, dtype=np.float32)
    with_cohort = encode_snapshot(Snapshot(version=2, spec=spec, weights=weights,
                                           cohort=("pi-1", "pi-2")))
    without = encode_snapshot(Snapshot(version=2, spec=spec, weights=weights))

    assert decode_snapshot(with_cohort).cohort == ("pi-1", "pi-2")
    assert decode_snapshot(without).cohort is None
    assert b"cohort" not in without
    with pytest.raises(WireError):
        Snapshot(version=2, spec=spec, weights=weights, cohort=("bad/id",))
    with pytest.raises(WireError):
        Snapshot(version=2, spec=spec, weights=weights,
                 cohort=tuple(f"d{i}" for i in range(MAX_COHORT + 1)))
    forged = with_cohort.replace(b'"pi-2"', b'"pi+2"')
    with pytest.raises(WireError):
        decode_snapshot(forged)


# ---------------------------------------------------------------------------- evolution

# The compatibility rule (docs/wire.md), for every message kind, optional keys absent and present.
EVOLVING = [*VALID,
            ("snapshot", encode_snapshot(snapshot(rng_vector(30), cohort=("pi-1", "pi-2")))),
            ("ack", encode_ack(Ack(update_id="u-0002", status="rejected",
                                   reason="participation_cap", retry_after_s=60.0)))]
EVOLVING_IDS = [*(f"update-{e}" for e in VALID_UPDATES), "snapshot", "ack", "snapshot-cohort",
                "ack-retry_after_s"]
FUTURE_KEYS: dict[str, Any] = {"zz_future": {"nested": [1, 2.5, None]}, "note": "x" * 300,
                               "Fancy Key": True}


def with_header(kind: str, data: bytes, **changes: Any) -> bytes:
    if kind != "ack":
        return tamper(data, **changes)
    return json.dumps(json.loads(data) | changes).encode()


def contents(message: object) -> dict[str, Any]:
    """A decoded message's fields in comparable form (updates and snapshots compare by
    identity; the bytes of an array compare NaN payloads too)."""
    return {f.name: (value.tobytes() if isinstance(value, np.ndarray) else
                     dict(value) if isinstance(value, Mapping) else value)
            for f in dataclasses.fields(message)  # type: ignore[arg-type]
            for value in [getattr(message, f.name)]}


@pytest.mark.parametrize(("kind", "data"), EVOLVING, ids=EVOLVING_IDS)
def test_same_major_ignores_unknown_header_keys(kind: str, data: bytes) -> None:
    decode = DECODERS[kind]
    newer = with_header(kind, data, **FUTURE_KEYS)
    assert newer != data
    assert contents(decode(newer)) == contents(decode(data))
    # Ignoring unknown keys excuses nothing else: a bad known key is still refused.
    with pytest.raises(WireError, match="schema must be an integer"):
        decode(with_header(kind, data, schema="1", **FUTURE_KEYS))


@pytest.mark.parametrize(("kind", "data"), EVOLVING, ids=EVOLVING_IDS)
def test_other_major_is_unsupported_naming_both_versions(kind: str, data: bytes) -> None:
    decode = DECODERS[kind]
    with pytest.raises(UnsupportedSchema,
                       match=r"schema 2, newer than the schema 1 this build speaks") as info:
        decode(with_header(kind, data, schema=2, **FUTURE_KEYS))
    assert info.value.schema == 2
    with pytest.raises(UnsupportedSchema, match=r"schema 0, older than the schema 1"):
        decode(with_header(kind, data, schema=0))


# What every decoder released before the evolution rule accepts, and no more: it refused any
# other key. Encoders must keep to it (and to schema 1) so today's fleets keep decoding.
STRICT_DECODER_KEYS = {
    "update": {"schema", "kind", "device_id", "update_id", "base_version", "n_samples",
               "n_params", "encoding", "created_at", "metrics", "scale", "k"},
    "snapshot": {"schema", "kind", "version", "spec", "n_params", "onnx_len", "created_at",
                 "metrics", "sha256", "cohort"},
    "ack": {"schema", "kind", "update_id", "status", "reason", "version", "detail",
            "retry_after_s"},
}


@pytest.mark.parametrize(("kind", "data"), EVOLVING, ids=EVOLVING_IDS)
def test_encoders_write_only_what_older_decoders_accept(kind: str, data: bytes) -> None:
    header = json.loads(data) if kind == "ack" else split(data)[0]
    assert header["schema"] == 1
    assert header.keys() <= STRICT_DECODER_KEYS[kind]
