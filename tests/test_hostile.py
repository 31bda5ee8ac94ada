"""Hostile input: every byte string a device (or anyone who can publish) may send goes through
the real decode-validate-merge path and comes back as a rejection with a reason, or as an
accepted update that was in fact valid; rejected input never moves the model.

Most payloads go to `coordinator._engine.Engine.process` with a real `Store` (on tmpfs, so
10,000+ group commits do not measure the disk); a sample goes through the real MQTT service.
The oracle `Oracle.expect` is written from the documented contract (README reason codes,
docs/wire.md and the guard order in docs/architecture.md), not from the engine's code.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import string
import struct
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._config import AgentConfig
from fedasync_iot.agent._policy import PolicyConfig
from fedasync_iot.agent._readings import Readings, StaticReader
from fedasync_iot.coordinator._config import CoordinatorConfig, SnapshotConfig
from fedasync_iot.coordinator._engine import Engine, Incoming, Outcome
from fedasync_iot.coordinator._guards import GuardConfig
from fedasync_iot.coordinator._participation import ParticipationConfig
from fedasync_iot.coordinator._rules import RuleConfig, build_rule
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.coordinator._store import Store
from fedasync_iot.fleet._broker import MosquittoBroker
from fedasync_iot.models import (
    ModelSpec,
    Snapshot,
    Topics,
    UnsupportedSchema,
    UpdateMessage,
    WireError,
    decode_ack,
    decode_update,
    encode_ack,
    encode_snapshot,
    encode_update,
)
from fedasync_iot.models._wire import ENCODINGS, MAGIC, update_label
from tests.helpers import Listener, update_bytes, wait_for

SPEC = ModelSpec(kind="linear", n_features=7)  # 8 parameters: a small model keeps 10k commits fast
N = 8
ALPHA = 0.5
MAX_NORM = 5.0
MAX_STALENESS = 3
MAX_BYTES = 4096  # the coordinator's max_message_bytes in these tests
DEVICES = ("dev-1", "dev-2")
# Every rejection reason the README promises (plus the rule/lineage ones of the engine).
REASONS = frozenset({"malformed", "unsupported_schema", "oversized", "bad_topic", "shape",
                     "non_finite", "future_version", "too_stale", "norm", "device_mismatch",
                     "update_id_conflict", "n_samples", "merge_failed", "wrong_round"})
ID_CHARS = string.ascii_letters + string.digits + "_.-"


# ------------------------------------------------------------------------------ frames


def frame(header: dict[str, Any] | bytes, body: bytes = b"", *, version: int = 1,
          header_len: int | None = None, magic: bytes = MAGIC) -> bytes:
    """A wire frame built by hand, so any field can be wrong (encode_update refuses to)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    return struct.pack("<4sBI", magic, version, length) + raw + body


def header_of(payload: bytes) -> tuple[dict[str, Any], bytes]:
    length = struct.unpack_from("<I", payload, 5)[0]
    return json.loads(payload[9:9 + length]), payload[9 + length:]


def valid_header(update_id: str, *, device: str = "dev-1", base_version: int = 0,
                 encoding: str = "float32", n: int = N) -> dict[str, Any]:
    return {"schema": 1, "kind": "update", "device_id": device, "update_id": update_id,
            "base_version": base_version, "n_samples": 10, "n_params": n,
            "encoding": encoding, "created_at": 1.7e9, "metrics": {}}


# ------------------------------------------------------------------------------ the oracle


class Oracle:
    """Predicts what the engine must answer to each item, then feeds the engine and compares.
    It replays the accepted updates to know exactly what the model must be (FedAsync, constant
    staleness: x <- x + alpha * clip(delta), float64 inside, float32 out: docs/architecture.md,
    "Merge rules"), so any effect of a rejected message on the model shows up as a mismatch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.params = engine.params.copy()  # predicted
        self.version = engine.version  # predicted
        self.seen: dict[str, str] = {}  # update_id -> device, for every update in lineage
        self.fed = 0
        self.statuses: Counter[str] = Counter()
        self.max_step = 0.0

    def predict(self, item: Incoming) -> tuple[str, str | None]:
        """(outcome, update_id): "accepted", "duplicate" or the rejection reason; and update the
        prediction of the model, the version and the lineage as the engine will."""
        outcome, msg = self._expect(item)
        if outcome == "accepted":
            assert msg is not None
            self._merge(msg.delta)
        # Lineage keeps it, even rejected; not a base ahead of the model ("not yet": its agent
        # sends it again once the model reaches that version).
        if msg is not None and outcome not in ("duplicate", "device_mismatch",
                                               "update_id_conflict", "future_version"):
            self.seen[msg.update_id] = msg.device_id
        # An update that does not decode is acked by the id its header names, if it names one.
        return outcome, update_label(item.payload)[0] if msg is None else msg.update_id

    def _expect(self, item: Incoming) -> tuple[str, UpdateMessage | None]:
        if item.device_id is None:
            return "bad_topic", None
        if len(item.payload) > MAX_BYTES:
            return "oversized", None
        try:
            msg = decode_update(item.payload, max_message_bytes=MAX_BYTES)
        except UnsupportedSchema:
            return "unsupported_schema", None
        except WireError:
            return "malformed", None
        if msg.delta.size > max(N, len(item.payload)):
            # More parameters than the model and than bytes in the message: the coordinator
            # refuses to allocate them (a top-k frame could otherwise claim ten million).
            return "malformed", None
        owner = self.seen.get(msg.update_id)
        if owner is not None and owner == msg.device_id == item.device_id:
            return "duplicate", msg
        if msg.device_id != item.device_id:
            return "device_mismatch", msg
        if owner is not None:
            return "update_id_conflict", msg
        if msg.delta.size != N:
            return "shape", msg
        if not np.isfinite(msg.delta).all():
            return "non_finite", msg
        staleness = self.version - msg.base_version
        if staleness < 0:
            return "future_version", msg
        if staleness > MAX_STALENESS:
            return "too_stale", msg
        return "accepted", msg

    def feed(self, batch: list[Incoming]) -> list[Outcome]:
        return self.check(batch, [self.predict(item) for item in batch])

    def check(self, batch: list[Incoming], predicted: list[tuple[str, str | None]],
              want: list[set[str] | None] | None = None) -> list[Outcome]:
        """Process `batch` (predicted in order) and compare; `want`: what each was made for."""
        version_before, params_before = self.engine.version, self.engine.params.copy()

        outcomes = self.engine.process(batch)  # must not raise, whatever the input

        assert len(outcomes) == len(batch)
        for i, (item, o, (expected, update_id)) in enumerate(zip(batch, outcomes, predicted,
                                                                strict=True)):
            ack = o.ack
            got = ack.reason if ack.status == "rejected" else ack.status
            self.statuses[got if ack.status != "rejected" else f"rejected:{got}"] += 1
            assert got == expected, (i, got, expected, ack.detail, item.payload[:300])
            if ack.status == "rejected":
                assert ack.reason in REASONS and ack.detail, ack
            assert decode_ack(encode_ack(ack)) == ack  # the ack itself survives the wire
            assert o.device_id == item.device_id
            assert ack.update_id == update_id
            if want is not None and want[i] is not None:
                assert got in want[i], (i, got, want[i], ack.detail)  # type: ignore[operator]
        # Rejected input moved nothing: the model is exactly the replay of what was accepted.
        accepted = sum(o.ack.status == "accepted" for o in outcomes)
        assert self.engine.version == version_before + accepted == self.version
        np.testing.assert_array_equal(self.engine.params, self.params)
        if accepted == 0:
            np.testing.assert_array_equal(self.engine.params, params_before)
        self.fed += len(batch)
        return outcomes

    def _merge(self, delta: np.ndarray) -> None:
        wide = delta.astype(np.float64)
        norm = float(np.linalg.norm(wide))
        step = delta.astype(np.float32) if norm <= MAX_NORM else (
            wide * (MAX_NORM / norm)).astype(np.float32)
        x = self.params.astype(np.float64)
        x += ALPHA * step.astype(np.float64)
        new = x.astype(np.float32)
        moved = float(np.linalg.norm(new.astype(np.float64) - self.params))
        # The clip policy's promise: one FedAsync step moves the model at most alpha * max_norm.
        assert moved <= ALPHA * MAX_NORM * (1 + 1e-6) + 1e-5, moved
        self.max_step = max(self.max_step, moved)
        self.params = new
        self.version += 1

    def check_durable(self) -> None:
        """What is on disk is what is in memory."""
        store = self.engine.store
        assert store.current_version() == self.engine.version
        np.testing.assert_array_equal(store.load_checkpoint(self.engine.version), self.params)
        assert [v.version for v in store.versions()] == list(range(self.engine.version + 1))


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """On tmpfs when there is one: 10,000 fsync'd commits would otherwise time the disk."""
    shm = Path("/dev/shm")  # a private mkdtemp directory inside it
    path = Path(tempfile.mkdtemp(prefix="fedasync-hostile-", dir=shm if shm.is_dir() else None))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_engine(state: Path, rule: RuleConfig | None = None,
                guards: GuardConfig | None = None) -> Engine:
    return Engine(Store(state), build_rule(rule or RuleConfig(name="fedasync", alpha=ALPHA,
                                                                staleness="constant")),
                  guards or GuardConfig(max_norm=MAX_NORM, norm_policy="clip",
                                        max_staleness=MAX_STALENESS),
                  spec=SPEC, initial_params=lambda: np.linspace(-1, 1, N, dtype=np.float32),
                  max_message_bytes=MAX_BYTES, clock=lambda: 1000.0,
                  # The oracle replays x + alpha * delta: no participation factor in it.
                  participation=ParticipationConfig(reweight=False))


# ------------------------------------------------------------------------------ hypothesis

junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                 st.text(max_size=70), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
ids = st.text(ID_CHARS, min_size=1, max_size=64)


_fresh = itertools.count()
_latest = [0]  # the model version the test is at: valid frames are built against it


def sometimes(draw: st.DrawFn, valid: st.SearchStrategy[Any],
              invalid: st.SearchStrategy[Any] = junk, percent: int = 8) -> Any:
    """Usually a valid value, `percent`% of the time an invalid one: so that whole frames are
    sometimes entirely valid and each field is sometimes the only thing wrong."""
    # Hypothesis favours (and shrinks towards) small integers: make those the valid side.
    return draw(invalid) if draw(st.integers(0, 99)) >= 100 - percent else draw(valid)


@st.composite
def hostile_frames(draw: st.DrawFn, topic_device: str | None) -> bytes:
    """Frames whose every field is usually right and sometimes anything at all."""
    encoding = sometimes(draw, st.sampled_from(ENCODINGS))
    n = sometimes(draw, st.just(N), st.one_of(st.integers(1, 12), st.integers(-3, 2**40), junk),
                  percent=15)
    header: dict[str, Any] = {
        "schema": sometimes(draw, st.just(1), st.one_of(st.integers(0, 3), junk)),
        "kind": sometimes(draw, st.just("update"),
                          st.one_of(st.sampled_from(["snapshot", "ack", "x"]), junk)),
        "device_id": sometimes(draw, st.just(topic_device or "dev-1"),
                               st.one_of(st.sampled_from(DEVICES), ids, junk), percent=15),
        # A counter: hypothesis' own ids would mostly repeat, i.e. be duplicates.
        "update_id": sometimes(draw, st.just("h").map(lambda h: f"{h}{next(_fresh)}"),
                               st.one_of(ids, junk)),
        "base_version": sometimes(draw, st.integers(0, 2).map(
            lambda behind: max(0, _latest[0] - behind)), st.one_of(
            st.integers(-2**64, 2**64), junk), percent=15),
        "n_samples": sometimes(draw, st.integers(1, 1000), st.one_of(
            st.integers(-2, 2**70), junk)),
        "n_params": n,
        "encoding": encoding,
        "created_at": sometimes(draw, st.floats(0, 1e11)),
        "metrics": sometimes(draw, st.dictionaries(ids, st.floats(-1e6, 1e6), max_size=2),
                             st.dictionaries(st.text(max_size=3), junk, max_size=3)),
    }
    k = 0
    if encoding == "int8":
        header["scale"] = sometimes(draw, st.floats(0, 1e3))
    if encoding == "topk":
        k = draw(st.integers(1, max(1, min(n, 8)) if isinstance(n, int) and n > 0 else 3))
        header["k"] = sometimes(draw, st.just(k))
    if draw(st.integers(0, 99)) >= 96:
        del header[draw(st.sampled_from(sorted(header)))]  # a missing key
    if draw(st.integers(0, 99)) >= 96:
        header[draw(st.text(max_size=8))] = draw(junk)  # an unknown key
    body = draw(_bodies(encoding, n, k))
    raw = json.dumps(header).encode()  # may hold NaN/Infinity literals: not JSON, malformed
    if draw(st.integers(0, 99)) >= 97:
        raw = draw(st.binary(max_size=40)) + raw  # a corrupt header
    return frame(raw, body,
                 version=sometimes(draw, st.just(1), st.integers(0, 255), percent=4),
                 header_len=sometimes(draw, st.none(), st.integers(0, 2**32 - 1), percent=4),
                 magic=sometimes(draw, st.just(MAGIC), st.binary(min_size=4, max_size=4),
                                 percent=4))


def _bodies(encoding: object, n: object, k: int) -> st.SearchStrategy[bytes]:
    anything = st.binary(max_size=80)
    if not isinstance(n, int) or not 0 < n <= 16:
        return anything
    if encoding == "float32":
        right = st.lists(st.floats(width=32), min_size=n, max_size=n).map(
            lambda v: np.asarray(v, "<f4").tobytes())
    elif encoding == "float16":
        right = st.lists(st.floats(width=16), min_size=n, max_size=n).map(
            lambda v: np.asarray(v, "<f2").tobytes())
    elif encoding == "int8":
        right = st.binary(min_size=n, max_size=n)
    elif encoding == "topk":
        right = st.tuples(
            st.lists(st.integers(0, n - 1), unique=True, min_size=k, max_size=k).map(sorted),
            st.lists(st.floats(width=32), min_size=k, max_size=k),
        ).map(lambda t: np.asarray(t[0], "<u4").tobytes() + np.asarray(t[1], "<f4").tobytes())
    else:
        return anything
    return st.integers(0, 99).flatmap(lambda p: anything if p >= 92 else right)


@st.composite
def hostile_items(draw: st.DrawFn) -> Incoming:
    device = sometimes(draw, st.sampled_from(DEVICES), st.none(), percent=5)
    roll = draw(st.integers(0, 99))
    if roll >= 90:
        payload = draw(st.binary(max_size=120))  # not a frame at all
    elif roll >= 86:  # too big: cheap to generate, a repeated frame
        payload = draw(hostile_frames(device)) * (MAX_BYTES // 100 + 1)
    else:
        payload = draw(hostile_frames(device))
    return Incoming(device, payload, 1000.0)


HYPOTHESIS_EXAMPLES = 1000


@pytest.mark.slow
def test_generated_payloads_are_rejected_with_a_reason_or_truly_valid(state_dir: Path) -> None:
    oracle = Oracle(make_engine(state_dir))
    _latest[0] = oracle.version

    @settings(max_examples=HYPOTHESIS_EXAMPLES, derandomize=True, database=None,
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile_items(), min_size=1, max_size=5))
    def feed(batch: list[Incoming]) -> None:
        oracle.feed(batch)
        _latest[0] = oracle.version

    feed()

    oracle.check_durable()
    print(f"\nhypothesis: {oracle.fed} payloads -> {dict(oracle.statuses.most_common())}")
    # With the 8,800 mutations below: over 10,000 payloads. Hypothesis is the slower generator
    # (and the number of payloads in its lists varies a little from run to run).
    assert oracle.fed >= 1500
    assert oracle.statuses["accepted"] >= 50  # the generator does reach valid updates
    assert sum(v for k, v in oracle.statuses.items() if k.startswith("rejected:")) >= 1000


# ------------------------------------------------------------------------------ mutations


class Mutator:
    """Structured damage to valid frames, seeded; each kind says which outcome it must get (None:
    whatever the oracle says, e.g. a flipped body byte may well leave a valid update)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.accepted_frames: list[tuple[str, bytes]] = []

    def fresh(self, version: int, *, encoding: str | None = None,
              delta: np.ndarray | None = None, device: str = "dev-1") -> bytes:
        self.count += 1  # ids carry random bits: a flipped byte does not make another frame's id
        enc = encoding or str(self.pick(["float32", "float32", "float16", "int8", "topk"]))
        d = delta if delta is not None else (0.1 * self.rng.standard_normal(N)).astype(
            np.float32)
        return encode_update(UpdateMessage(
            device_id=device, update_id=f"m{self.count}-{self.rng.bytes(6).hex()}",
            base_version=version, n_samples=10,
            delta=np.asarray(d, np.float32), encoding=enc,  # type: ignore[arg-type]
            created_at=1.7e9), topk_fraction=0.5)

    def pick(self, options: list[Any]) -> Any:
        """One of `options`, seeded (numpy's choice cannot hold 2**64 in an int array)."""
        return options[int(self.rng.integers(len(options)))]

    def item(self, version: int) -> tuple[Incoming, set[str] | None]:
        kinds = [k for k in dir(self) if k.startswith("m_")]
        kind = kinds[int(self.rng.integers(len(kinds)))]
        device, payload, want = getattr(self, kind)(version)
        return Incoming(device, payload, 1000.0), want

    # Each m_* returns (topic device, payload, acceptable outcomes or None).
    def m_flip_bytes(self, v: int) -> tuple[str, bytes, set[str] | None]:
        p = bytearray(self.fresh(v))
        for i in self.rng.integers(0, len(p), int(self.rng.integers(1, 4))):
            p[i] ^= 1 << int(self.rng.integers(8))
        return "dev-1", bytes(p), None

    def m_flip_body_byte(self, v: int) -> tuple[str, bytes, set[str] | None]:
        p = bytearray(self.fresh(v, encoding="float32"))
        i = len(p) - 1 - int(self.rng.integers(4 * N))
        p[i] ^= 0xFF
        return "dev-1", bytes(p), {"accepted", "non_finite"}  # any float32 is a float32

    def m_truncate(self, v: int) -> tuple[str, bytes, set[str] | None]:
        p = self.fresh(v)
        return "dev-1", p[:int(self.rng.integers(0, len(p)))], {"malformed"}

    def m_extend(self, v: int) -> tuple[str, bytes, set[str] | None]:
        extra = self.rng.bytes(int(self.rng.integers(1, 40)))
        return "dev-1", self.fresh(v) + extra, {"malformed"}

    def m_header_length(self, v: int) -> tuple[str, bytes, set[str] | None]:
        p = bytearray(self.fresh(v))
        struct.pack_into("<I", p, 5, int(self.pick([0, 1, 2**16, 2**32 - 1,
                                                          int(self.rng.integers(0, 400))])))
        return "dev-1", bytes(p), {"malformed"}

    def _rewrite(self, v: int, body: bytes | None = None, base: str = "float32",
                 **fields: Any) -> bytes:
        """A valid frame of encoding `base` with header `fields` changed (and/or the body)."""
        header, old_body = header_of(self.fresh(v, encoding=base))
        header.update(fields)
        return frame(header, old_body if body is None else body)

    def m_huge_n_params(self, v: int) -> tuple[str, bytes, set[str] | None]:
        n = int(self.pick([2**31, 10**7, 10**12, 2**53, 2**64]))
        return "dev-1", self._rewrite(v, n_params=n), {"malformed"}

    def m_huge_n_params_topk(self, v: int) -> tuple[str, bytes, set[str] | None]:
        # A few bytes that claim ten million parameters: must not cost 40 MB to refuse.
        body = struct.pack("<I", 3) + struct.pack("<f", 1.0)
        return "dev-1", self._rewrite(v, body, base="topk", n_params=10**7, k=1), {
            "malformed", "shape"}

    def m_bad_n_params(self, v: int) -> tuple[str, bytes, set[str] | None]:
        n = int(self.pick([0, -1]))
        return "dev-1", self._rewrite(v, n_params=n), {"malformed"}

    def m_wrong_length(self, v: int) -> tuple[str, bytes, set[str] | None]:
        n = N + int(self.pick([-3, -1, 1, 5]))
        body = (0.1 * self.rng.standard_normal(n)).astype("<f4").tobytes()
        return "dev-1", self._rewrite(v, body, n_params=n), {"shape"}

    def m_nan_inf(self, v: int) -> tuple[str, bytes, set[str] | None]:
        d = (0.1 * self.rng.standard_normal(N)).astype(np.float32)
        d[int(self.rng.integers(N))] = self.pick([np.nan, np.inf, -np.inf])
        # top-k keeps the largest |x|, and NaN sorts last: the poison stays visible.
        return "dev-1", self.fresh(v, encoding=str(self.pick(["float32", "topk"])),
                                   delta=d), {"non_finite"}

    def m_float16_overflow(self, v: int) -> tuple[str, bytes, set[str] | None]:
        body = np.full(N, np.inf, "<f2").tobytes()
        return "dev-1", self._rewrite(v, body, base="float16"), {"non_finite"}

    def m_giant_norm(self, v: int) -> tuple[str, bytes, set[str] | None]:
        scale = float(self.pick([1e3, 1e20, 3e38]))
        d = (scale * np.sign(self.rng.standard_normal(N))).astype(np.float32)
        return "dev-1", self.fresh(v, encoding="float32", delta=d), {"accepted"}  # clipped

    def m_sign_flipped_scaled(self, v: int) -> tuple[str, bytes, set[str] | None]:
        d = (-1e4 * 0.1 * self.rng.standard_normal(N)).astype(np.float32)
        return "dev-1", self.fresh(v, delta=d, encoding="float32"), {"accepted"}  # clipped

    def m_negative_version(self, v: int) -> tuple[str, bytes, set[str] | None]:
        return "dev-1", self._rewrite(v, base_version=int(self.pick([-1, -2**63]))), {
            "malformed"}

    def m_huge_version(self, v: int) -> tuple[str, bytes, set[str] | None]:
        bv = int(self.pick([v + 1, 2**31, 2**53 - 1, 2**53, 2**64]))
        return "dev-1", self._rewrite(v, base_version=bv), {"future_version", "malformed"}

    def m_stale(self, v: int) -> tuple[str, bytes, set[str] | None]:
        bv = v - MAX_STALENESS - 1 - int(self.rng.integers(3))
        if bv < 0:
            return "dev-1", self.fresh(v), {"accepted"}
        return "dev-1", self._rewrite(v, base_version=bv), {"too_stale"}

    def m_bad_ids(self, v: int) -> tuple[str, bytes, set[str] | None]:
        bad: Any = self.pick(["", "..", ".", "a" * 65, "a/b", "a b", "é", "+", "#",
                                    "\x00", "\ud800"])
        key = str(self.pick(["update_id", "device_id"]))
        return "dev-1", self._rewrite(v, **{key: str(bad)}), {"malformed"}

    def m_non_string_id(self, v: int) -> tuple[str, bytes, set[str] | None]:
        return "dev-1", self._rewrite(v, update_id=int(self.rng.integers(100))), {"malformed"}

    def m_other_device(self, v: int) -> tuple[str, bytes, set[str] | None]:
        return "dev-1", self.fresh(v, device="dev-2"), {"device_mismatch"}

    def m_replay_exact(self, v: int) -> tuple[str, bytes, set[str] | None]:
        if not self.accepted_frames:
            return "dev-1", self.fresh(v), None
        device, p = self.accepted_frames[int(self.rng.integers(len(self.accepted_frames)))]
        return device, p, {"duplicate"}

    def m_replay_other_topic(self, v: int) -> tuple[str, bytes, set[str] | None]:
        if not self.accepted_frames:
            return "dev-1", self.fresh(v), None
        _, p = self.accepted_frames[int(self.rng.integers(len(self.accepted_frames)))]
        return "dev-2", p, {"device_mismatch"}

    def m_stolen_update_id(self, v: int) -> tuple[str, bytes, set[str] | None]:
        if not self.accepted_frames:
            return "dev-1", self.fresh(v), None
        _, p = self.accepted_frames[int(self.rng.integers(len(self.accepted_frames)))]
        stolen = header_of(p)[0]["update_id"]
        return "dev-2", self._rewrite(v, device_id="dev-2", update_id=stolen), {
            "update_id_conflict"}

    def m_unsupported(self, v: int) -> tuple[str, bytes, set[str] | None]:
        which = int(self.rng.integers(4))
        if which == 0:
            return "dev-1", self._rewrite(v, schema=2), {"unsupported_schema"}
        if which == 1:
            return "dev-1", self._rewrite(v, kind="gradient"), {"unsupported_schema"}
        if which == 2:
            return "dev-1", self._rewrite(v, encoding="float64"), {"unsupported_schema"}
        header, body = header_of(self.fresh(v))
        return "dev-1", frame(header, body, version=2), {"unsupported_schema"}

    def m_wrong_kind(self, v: int) -> tuple[str, bytes, set[str] | None]:
        return "dev-1", self._rewrite(v, kind="snapshot"), {"malformed"}

    def m_int8_forged(self, v: int) -> tuple[str, bytes, set[str] | None]:
        which = int(self.rng.integers(3))
        if which == 0:
            return "dev-1", self._rewrite(v, bytes([0x80]) * N, base="int8"), {"malformed"}
        scale = float(self.pick([-1.0, 1e38, math.inf]))
        return "dev-1", self._rewrite(v, base="int8", scale=scale), {"malformed"}

    def m_topk_forged(self, v: int) -> tuple[str, bytes, set[str] | None]:
        idx = np.array(self.pick([[3, 1], [2, 2], [0, N]]), "<u4")
        body = idx.tobytes() + np.ones(2, "<f4").tobytes()
        return "dev-1", self._rewrite(v, body, base="topk", k=2), {"malformed"}

    def m_json_tricks(self, v: int) -> tuple[str, bytes, set[str] | None]:
        header, body = header_of(self.fresh(v))
        raw = json.dumps(header).encode()
        which = int(self.rng.integers(5))
        if which == 0:  # a duplicate key: readers disagree on which one wins
            raw = raw[:-1] + b', "base_version": 0}'
        elif which == 1:
            raw = raw.replace(b'"created_at": 1700000000.0', b'"created_at": NaN')
        elif which == 2:
            raw = raw.replace(b'"metrics": {}', b'"metrics": ' + b"[" * 1500 + b"]" * 1500)
        elif which == 3:
            raw = raw.replace(b'"n_samples": 10', b'"n_samples": true')
        else:
            raw = raw.replace(b'"n_samples": 10', b'"n_samples": ' + b"9" * 3000)
        return "dev-1", frame(raw, body), {"malformed", "oversized"}

    def m_not_a_frame(self, v: int) -> tuple[str, bytes, set[str] | None]:
        p = self.rng.bytes(int(self.rng.integers(0, 200)))
        return "dev-1", p, {"malformed"}

    def m_oversized(self, v: int) -> tuple[str, bytes, set[str] | None]:
        n = MAX_BYTES // 4 + 10
        body = np.zeros(n, "<f4").tobytes()
        return "dev-1", self._rewrite(v, body, n_params=n), {"oversized"}

    def m_bad_topic(self, v: int) -> tuple[str | None, bytes, set[str] | None]:
        return None, self.fresh(v), {"bad_topic"}

    def m_valid(self, v: int) -> tuple[str, bytes, set[str] | None]:
        return "dev-1", self.fresh(max(0, v - int(self.rng.integers(0, MAX_STALENESS + 1)))), {
            "accepted"}


MUTATION_BATCHES = 200
MUTATION_BATCH = 44  # 8,800 payloads


@pytest.mark.slow
def test_mutated_frames_are_rejected_with_the_right_reason(state_dir: Path) -> None:
    oracle = Oracle(make_engine(state_dir))
    mutator = Mutator(seed=7)
    kinds: Counter[str] = Counter()
    for _ in range(MUTATION_BATCHES):
        items, wants, predicted = [], [], []
        for _ in range(MUTATION_BATCH):
            # Made against the version the engine will be at when it gets there.
            item, want = mutator.item(oracle.version)
            items.append(item)
            wants.append(want)
            predicted.append(oracle.predict(item))
        outcomes = oracle.check(items, predicted, wants)
        for item, o in zip(items, outcomes, strict=True):
            if o.ack.status == "accepted" and item.device_id is not None:
                mutator.accepted_frames.append((item.device_id, item.payload))
        kinds.update(o.ack.status if o.ack.reason is None else o.ack.reason for o in outcomes)
    oracle.check_durable()

    print(f"\nmutations: {oracle.fed} payloads -> {dict(kinds.most_common())}; largest model "
          f"step {oracle.max_step:.4f} (bound alpha * max_norm = {ALPHA * MAX_NORM})")
    assert oracle.fed >= 8000
    # Every kind of damage was exercised and answered.
    assert {"malformed", "unsupported_schema", "oversized", "bad_topic", "shape", "non_finite",
            "future_version", "too_stale", "device_mismatch", "update_id_conflict", "duplicate",
            "accepted"} <= set(kinds)


def test_a_tiny_message_claiming_millions_of_parameters_costs_no_memory(state_dir: Path
                                                                        ) -> None:
    """A top-k frame decouples n_params from the message size: 200 bytes could make the
    coordinator allocate 40 MB each, 20 GB for a batch of 500 (an OOM kill, then the same
    unacked batch again after the restart)."""
    engine = make_engine(state_dir)
    mutator = Mutator(seed=1)
    batch = [Incoming("dev-1", mutator.m_huge_n_params_topk(0)[1], 1000.0) for _ in range(10)]
    tracemalloc.start()
    try:
        outcomes = engine.process(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {o.ack.reason for o in outcomes} <= {"malformed", "shape"}
    assert peak < 20 * 2**20, f"refusing 10 small messages peaked at {peak / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------ poisoning


@pytest.mark.parametrize(("rule", "bound"), [
    (RuleConfig(name="fedasync", alpha=ALPHA, staleness="constant"), ALPHA * MAX_NORM),
    (RuleConfig(name="fedasync", alpha=1.0, staleness="polynomial:0.5"), MAX_NORM),
    (RuleConfig(name="fedbuff", buffer_size=3, server_lr=0.8), 0.8 * MAX_NORM),
    (RuleConfig(name="fedavg-sync", cohort_size=3, server_lr=1.0), MAX_NORM),
], ids=["fedasync", "fedasync-polynomial", "fedbuff", "fedavg-sync"])
def test_a_poisoned_update_moves_the_model_at_most_the_norm_bound(
        state_dir: Path, rule: RuleConfig, bound: float) -> None:
    engine = make_engine(state_dir, rule)
    honest = np.full(N, 0.1, np.float32)
    poisons = {
        "huge_norm": np.full(N, 1e30, np.float32),
        "float32_max": np.full(N, np.finfo(np.float32).max, np.float32),
        "sign_flipped_scaled": -1e6 * honest,
    }
    for i, (name, poison) in enumerate(poisons.items()):
        before = engine.params.astype(np.float64)
        version = engine.version
        # Fill a buffering rule's batch with honest work; the poison completes it.
        need = 1 if rule.name == "fedasync" else 3
        batch = [Incoming("dev-1", update_bytes(honest, update_id=f"h{i}-{j}",
                                                base_version=version), 1000.0)
                 for j in range(need - 1)]
        batch.append(Incoming("dev-2", update_bytes(poison, device="dev-2",
                                                    update_id=f"p{i}", base_version=version),
                              1000.0))
        outcomes = engine.process(batch)

        assert outcomes[-1].ack.status == "accepted" and "clipped" in outcomes[-1].ack.detail
        assert engine.version == version + 1
        moved = float(np.linalg.norm(engine.params.astype(np.float64) - before))
        assert moved <= bound * (1 + 1e-6), (name, moved, bound)
        assert np.isfinite(engine.params).all()

    # NaN never gets in at all, and the reject policy refuses the rest without moving anything.
    nan = engine.process([Incoming("dev-2", update_bytes(np.full(N, np.nan), device="dev-2",
                                                         base_version=engine.version), 1000.0)])
    assert nan[0].ack.reason == "non_finite"
    strict = make_engine(state_dir / "strict", rule,
                         GuardConfig(max_norm=MAX_NORM, norm_policy="reject"))
    before = strict.params.copy()
    out = strict.process([Incoming("dev-2", update_bytes(poison, device="dev-2"), 1000.0)
                          for poison in poisons.values()])
    assert [o.ack.reason for o in out] == ["norm"] * 3
    np.testing.assert_array_equal(strict.params, before)
    assert strict.version == 0


# ------------------------------------------------------------------------------ the agent side


def _offline_agent(tmp: Path) -> Agent:
    class Offline:
        connected = False

        def publish(self, *a: object, **k: object) -> None:
            raise AssertionError("offline")

    readings = Readings(battery_percent=None, charging=None, interfaces_up=("eth0",),
                        cpu_percent=1.0, mem_available_mb=1000.0, temperature_c=None,
                        local_minutes=600, taken_at=time.time())

    class NoData:
        def load(self) -> Any:
            raise AssertionError("no training here")

    return Agent(AgentConfig(device_id="pi-1", state_dir=str(tmp),
                             policy=PolicyConfig(min_dwell_s=0.0)),
                 link=Offline(), reader=StaticReader(readings), data=NoData())


def test_hostile_acks_and_snapshots_never_crash_the_agent(tmp_path: Path) -> None:
    agent = _offline_agent(tmp_path)
    good = Snapshot(version=5, spec=SPEC, weights=np.ones(N, np.float32), created_at=1.7e9)
    agent.on_model(encode_snapshot(good))
    agent.spool.put("kept", b"x")
    valid = encode_snapshot(good)
    ack = encode_ack(decode_ack(b'{"schema":1,"kind":"ack","update_id":"other","status":'
                                b'"accepted","reason":null,"version":3,"detail":""}'))
    seeds = st.sampled_from([valid, ack])

    @settings(max_examples=600, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300),
                     st.tuples(seeds, st.integers(0, 400), st.integers(0, 255)).map(
                         lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]),
                     st.tuples(seeds, st.integers(0, 400)).map(lambda t: t[0][:t[1]])))
    def feed(payload: bytes) -> None:
        agent.on_ack(payload)
        agent.on_model(payload)
        assert agent.snapshot is not None
        assert agent.snapshot.version >= 5
        assert np.isfinite(agent.snapshot.weights).all()

    feed()
    assert [e.update_id for e in agent.spool.entries()] == ["kept"]


# ------------------------------------------------------------------------------ over MQTT


def _service(broker: MosquittoBroker, fleet: str, state: Path) -> CoordinatorService:
    service = CoordinatorService(CoordinatorConfig(
        model=SPEC, broker=broker.url, fleet=fleet, state_dir=str(state),
        client_id=f"coord-{fleet}", http="",
        rule=RuleConfig(name="fedasync", alpha=ALPHA, staleness="constant"),
        guards=GuardConfig(max_norm=MAX_NORM, norm_policy="clip", max_staleness=MAX_STALENESS),
        snapshots=SnapshotConfig(min_interval_s=0.2, include_onnx=False),
        max_message_bytes=MAX_BYTES))
    service.start()
    assert service.wait_connected(30)
    return service


def _handled(service: CoordinatorService) -> int:
    """Messages the service has answered (counts() also has one "rejected:<reason>" per
    rejection)."""
    return sum(v for k, v in service.metrics.counts().items() if ":" not in k)


@pytest.mark.broker
def test_hostile_payloads_through_the_real_service(broker: MosquittoBroker, fleet_name: str,
                                                   tmp_path: Path) -> None:
    service = _service(broker, fleet_name, tmp_path / "coord")
    topics = Topics(fleet_name)
    dev = Listener(broker.url, [topics.ack(d) for d in DEVICES])
    mutator = Mutator(seed=11)
    try:
        sent: list[Incoming] = []
        for _ in range(300):
            item, _ = mutator.item(service.engine.version)
            sent.append(item)
            topic = (topics.update(item.device_id) if item.device_id is not None
                     else f"{topics.prefix}/update/not a device!")
            dev.publish(topic, item.payload)
        with_device = [i for i in sent if i.device_id is not None]
        acks = [decode_ack(dev.get(timeout=30).payload) for _ in with_device]
        # One ack per message that named a device, and nothing more.
        assert wait_for(lambda: _handled(service) == len(sent), timeout=30)
        assert dev.messages.empty()

        statuses = Counter(a.status if a.reason is None else a.reason for a in acks)
        assert all(a.reason in REASONS for a in acks if a.status == "rejected")
        accepted = {a.update_id for a in acks if a.status == "accepted"}
        assert service.engine.version == len(accepted)
        lineage = {r.update_id for r in service.store.lineage() if r.outcome == "accepted"}
        assert lineage == accepted
        assert service.metrics.counts().get("rejected:bad_topic", 0) == len(sent) - len(
            with_device)
        print(f"\nover MQTT: {len(sent)} payloads -> {dict(statuses.most_common())}")

        # Still serving: a valid update is accepted after all that.
        dev.publish(topics.update("dev-1"), update_bytes(np.full(N, 0.1), device="dev-1",
                                                         base_version=service.engine.version))
        assert decode_ack(dev.get().payload).status == "accepted"
    finally:
        dev.close()
        service.stop()


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """The fixture's broker class, with a 64 KiB message limit as a deployment would set."""
    b = MosquittoBroker(workdir=tmp_path / "mosquitto", message_size_limit=64 * 1024)
    b.start()
    yield b
    b.close()


@pytest.mark.broker
def test_oversized_messages_are_refused_by_the_broker_and_by_the_coordinator(
        small_broker: MosquittoBroker, tmp_path: Path) -> None:
    fleet = "oversized"
    service = _service(small_broker, fleet, tmp_path / "coord")
    topics = Topics(fleet)
    dev = Listener(small_broker.url, [topics.ack("dev-1")])
    spy = Listener(small_broker.url, [topics.all_updates])
    try:
        huge = frame(valid_header("huge", n=40_000), np.zeros(40_000, "<f4").tobytes())
        big = frame(valid_header("big", n=2_000), np.zeros(2_000, "<f4").tobytes())
        ok = update_bytes(np.full(N, 0.1), update_id="ok")
        assert len(huge) > 64 * 1024 > len(big) > MAX_BYTES
        for payload in (huge, big, ok):
            dev.publish(topics.update("dev-1"), payload)

        # The broker dropped the 160 KB message: neither the spy nor the coordinator saw it.
        seen = [spy.get().payload for _ in range(2)]
        assert [len(p) for p in seen] == [len(big), len(ok)]
        first, second = decode_ack(dev.get().payload), decode_ack(dev.get().payload)
        assert (first.status, first.reason) == ("rejected", "oversized")
        assert (second.update_id, second.status) == ("ok", "accepted")
        assert service.engine.version == 1
        assert _handled(service) == 2
        assert dev.messages.empty() and spy.messages.empty()
    finally:
        dev.close()
        spy.close()
        service.stop()
