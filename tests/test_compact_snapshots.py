"""Compact snapshots (issue 14 item 2): the model's template (its ONNX graph without weights)
published once per spec, and per version only the weights (float16 when they fit).

The codec (round trips, float16/float32 choice, hostile input), the agent's decisions with a
recording link, then a coordinator and agents on the real Mosquitto fixture, counting the bytes
that reach each agent's link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._predict import Predictor
from fedasync_iot.agent._readings import StaticReader
from fedasync_iot.coordinator._config import SnapshotConfig
from fedasync_iot.models import (
    ModelSpec,
    Snapshot,
    Topics,
    UnsupportedSchema,
    WireError,
    encode_snapshot,
)
from fedasync_iot.models._signing import Signer, generate_keypair, split
from fedasync_iot.models._template import OnnxTemplate
from fedasync_iot.models._wire import (
    Announcement,
    TemplateMessage,
    WeightsMessage,
    decode_announcement,
    decode_snapshot,
    decode_template,
    decode_weights,
    encode_announcement,
    encode_template,
    encode_weights,
    frame_kind,
)
from fedasync_iot.models.ml._adapters import build_model
from fedasync_iot.models.ml._inference import OnnxModel
from fedasync_iot.models.ml._onnx import export_template
from tests.helpers import Listener, wait_for
from tests.test_agent import readings
from tests.test_models_on_demand import (
    DIGITS,
    SMALL,
    UNPLUGGED,
    CountingLink,
    coordinator,
    new_versions,
    offline_agent,
    start_agent,
    stop_agent,
    topics_of,
)


@pytest.fixture(scope="module")
def small_template() -> OnnxTemplate:
    return export_template(build_model(SMALL))


def template_bytes(template: OnnxTemplate, spec: ModelSpec = SMALL) -> bytes:
    return encode_template(TemplateMessage(spec=spec, template=template))


def weights_bytes(template: OnnxTemplate, version: int, weights: np.ndarray,
                  spec: ModelSpec = SMALL) -> bytes:
    snapshot = Snapshot(version=version, spec=spec, weights=weights.astype(np.float32))
    return encode_weights(WeightsMessage.of(snapshot, template.id))


def compact_announcement(full: bytes, weights: bytes, template_id: str, version: int) -> bytes:
    return encode_announcement(Announcement(
        version=version, sha256=hashlib.sha256(full).hexdigest(), size=len(full),
        created_at=time.time(), weights_sha256=hashlib.sha256(weights).hexdigest(),
        weights_size=len(weights), template=template_id))


def header_of(frame: bytes) -> tuple[dict[str, object], bytes]:
    n = struct.unpack_from("<I", frame, 5)[0]
    return json.loads(frame[9:9 + n]), frame[9 + n:]


def reframed(header: dict[str, object], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return b"FAIO" + struct.pack("<BI", 1, len(raw)) + raw + body


# ---------------------------------------------------------------------------- the wire


def test_template_and_weights_round_trip(small_template: OnnxTemplate) -> None:
    raw = template_bytes(small_template)
    t = decode_template(raw)
    assert t.id == small_template.id == hashlib.sha256(t.template.graph).hexdigest()
    assert t.spec == SMALL and t.template.bindings == small_template.bindings
    assert frame_kind(raw) == "template"

    w = np.random.default_rng(1).normal(0, 2, 15).astype(np.float32)
    raw_w = weights_bytes(small_template, 3, w)
    got = decode_weights(raw_w)
    assert (got.version, got.encoding, got.template_id) == (3, "float16", small_template.id)
    assert got.weights.dtype == np.float32
    # float16: half a step of relative error at most, never more.
    assert np.all(np.abs(got.weights - w) <= np.abs(w) * 2.0**-11 + 1e-7)
    assert not np.array_equal(got.weights, w)  # it really travelled as float16
    assert got.snapshot().onnx == b"" and got.snapshot().version == 3
    assert frame_kind(raw_w) == "weights" and frame_kind(b"junk") is None


def test_weights_beyond_float16_travel_as_float32(small_template: OnnxTemplate) -> None:
    w = np.zeros(15, np.float32)
    w[4] = 70_000.0  # > 65504: float16 would make it inf
    got = decode_weights(weights_bytes(small_template, 1, w))
    assert got.encoding == "float32" and np.array_equal(got.weights, w)
    with pytest.raises(WireError, match="float16 range"):
        encode_weights(WeightsMessage(version=1, spec=SMALL, template_id=small_template.id,
                                      weights=w, encoding="float16"))


def test_the_announcement_names_the_compact_snapshot_or_not() -> None:
    full, weights = b"f" * 100, b"w" * 30
    raw = compact_announcement(full, weights, "a" * 64, 5)
    a = decode_announcement(raw)
    assert a.compact and (a.weights_size, a.template) == (30, "a" * 64)
    assert a.weights_sha256 == hashlib.sha256(weights).hexdigest()
    # What an older coordinator sends: no compact keys, an ordinary announcement.
    old = encode_announcement(Announcement(version=5, sha256=a.sha256, size=100,
                                           created_at=time.time()))
    assert b"weights" not in old and not decode_announcement(old).compact
    obj = json.loads(raw)
    del obj["template"]
    with pytest.raises(WireError, match="come together"):
        decode_announcement(json.dumps(obj).encode())
    obj = json.loads(raw) | {"weights_size": 0}
    with pytest.raises(WireError, match="weights_size"):
        decode_announcement(json.dumps(obj).encode())
    obj = json.loads(raw) | {"template": "../../etc"}
    with pytest.raises(WireError, match="template"):
        decode_announcement(json.dumps(obj).encode())


def test_hostile_templates_and_weights_are_refused_with_a_reason(
        small_template: OnnxTemplate) -> None:
    t_raw = template_bytes(small_template)
    w_raw = weights_bytes(small_template, 2, np.ones(15, np.float32))
    th, tb = header_of(t_raw)
    wh, wb = header_of(w_raw)
    inf16 = np.full(15, np.inf, "<f2").tobytes()
    T, W = decode_template, decode_weights
    cases: list[tuple[object, bytes, type[Exception], str]] = [
        (T, t_raw[:-1], WireError, "body is"),
        (T, t_raw + b"x", WireError, "body is"),
        (T, reframed(th | {"sha256": "0" * 64}, tb), WireError, "sha256"),
        (T, reframed(th | {"bindings": [{"name": "x"}]}, tb), WireError, "bindings"),
        (T, reframed(th | {"bindings": "no"}, tb), WireError, "bindings"),
        (T, reframed(th | {"graph_len": -1}, tb), WireError, "graph_len"),
        (T, reframed(th | {"spec": {"kind": "rocket"}}, tb), WireError, "spec"),
        (T, reframed({k: v for k, v in th.items() if k != "bindings"}, tb), WireError,
         "missing"),
        (T, reframed(th | {"schema": 2}, tb), UnsupportedSchema, "schema"),
        (T, reframed(th | {"kind": "hologram"}, tb), UnsupportedSchema, "kind"),
        (W, w_raw[:-2], WireError, "body is"),
        (W, reframed(wh | {"n_params": 10**9}, wb), WireError, "n_params"),
        (W, reframed(wh | {"encoding": "int8"}, wb), UnsupportedSchema, "encoding"),
        (W, reframed(wh | {"encoding": 16}, wb), WireError, "encoding"),
        (W, reframed(wh | {"encoding": "float32"}, wb), WireError, "body is"),
        (W, reframed(wh | {"template": "x"}, wb), WireError, "template"),
        (W, reframed(wh | {"sha256": hashlib.sha256(inf16).hexdigest()}, inf16), WireError,
         "finite"),
        (W, reframed(wh | {"cohort": "pi-1"}, wb), WireError, "cohort"),
        (W, reframed(wh | {"cohort": ["a/b"]}, wb), WireError, "cohort"),
        (W, reframed(wh | {"version": True}, wb), WireError, "version"),
        (W, reframed(wh, wb[:-2] + b"\x00\x40"), WireError, "sha256"),
    ]
    for decode, data, error, why in cases:
        with pytest.raises(error, match=why):
            decode(data)  # type: ignore[operator]
    # Each decoder refuses the other's message by its kind.
    with pytest.raises(WireError, match="expected a weights"):
        decode_weights(t_raw)
    with pytest.raises(WireError, match="expected a template"):
        decode_template(w_raw)
    with pytest.raises(WireError, match="limit"):
        decode_weights(w_raw, max_message_bytes=len(w_raw) - 1)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_templates_and_weights_decode_or_raise_a_wire_error(
        data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from(_VALID))
    at = data.draw(st.integers(0, len(raw) - 1))
    how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    byte = data.draw(st.integers(0, 255))
    mutated = {"flip": raw[:at] + bytes([raw[at] ^ (byte or 1)]) + raw[at + 1:],
               "cut": raw[:at], "insert": raw[:at] + bytes([byte]) + raw[at:]}[how]
    for decode in (decode_template, decode_weights):
        with contextlib.suppress(WireError):  # UnsupportedSchema is one too; nothing else
            decode(mutated)


_SHARED_TEMPLATE = export_template(build_model(SMALL))
_VALID = [template_bytes(_SHARED_TEMPLATE), weights_bytes(
    _SHARED_TEMPLATE, 1, np.linspace(-3, 3, 15, dtype=np.float32))]  # fixed bytes: replayable


# ---------------------------------------------------------------------------- the agent, no network


def test_the_agent_fetches_the_template_once_then_only_weights(
        tmp_path: Path, small_template: OnnxTemplate) -> None:
    agent = offline_agent(tmp_path, StaticReader(UNPLUGGED))
    agent.on_connected()
    full = encode_snapshot(Snapshot(version=1, spec=SMALL, weights=np.zeros(15, np.float32)))
    w1 = weights_bytes(small_template, 1, np.full(15, 0.1, np.float32))
    agent.on_announce(compact_announcement(full, w1, small_template.id, 1))
    assert topics_of(agent) == {"announce", "template"}  # not cached: the template first
    agent.on_template(template_bytes(small_template))
    assert topics_of(agent) == {"announce", "weights"}
    assert (tmp_path / "templates" / f"{small_template.id}.template").exists()
    agent.on_weights(w1)
    assert topics_of(agent) == set() and agent.snapshot is not None
    assert agent.snapshot.version == 1 and agent.snapshot.weights.dtype == np.float32
    np.testing.assert_array_equal(agent.snapshot.weights, decode_weights(w1).weights)
    assert frame_kind((tmp_path / "model.snapshot").read_bytes()) == "weights"
    assert agent.status()["last_fetch"]["kind"] == "weights"

    # A newer version: the template is cached, only the weights are fetched.
    agent.config = dataclasses.replace(agent.config, model_refresh_s=1e-6)
    w2 = weights_bytes(small_template, 2, np.full(15, 0.2, np.float32))
    agent.check()
    agent.on_announce(compact_announcement(full, w2, small_template.id, 2))
    assert topics_of(agent) == {"announce", "weights"}
    agent.on_weights(w2)
    assert agent.snapshot.version == 2
    # A restarted agent loads the saved compact snapshot, and so does the Predictor.
    again = offline_agent(tmp_path, StaticReader(UNPLUGGED))
    assert again.snapshot is not None and again.snapshot.version == 2
    assert Predictor(tmp_path).predict(np.zeros((2, 4), np.float32)).shape == (2,)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupt_cached_template_is_fetched_again(
        tmp_path: Path, small_template: OnnxTemplate, damage: str) -> None:
    cached = tmp_path / "templates" / f"{small_template.id}.template"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(template_bytes(small_template))
    if damage == "missing":
        cached.unlink()
    else:
        cached.write_bytes(template_bytes(small_template)[:-10] + b"0123456789")
    agent = offline_agent(tmp_path, StaticReader(UNPLUGGED))
    agent.on_connected()
    full = encode_snapshot(Snapshot(version=1, spec=SMALL, weights=np.zeros(15, np.float32)))
    w1 = weights_bytes(small_template, 1, np.full(15, 0.1, np.float32))
    agent.on_announce(compact_announcement(full, w1, small_template.id, 1))
    assert topics_of(agent) == {"announce", "template"}
    # Weights that arrive before their template refuse nothing: the template is fetched.
    agent.on_weights(w1)
    assert agent.snapshot is None and agent.model_rejection is None
    assert "template" in topics_of(agent)
    agent.on_template(template_bytes(small_template))
    agent.on_weights(w1)
    assert agent.snapshot is not None and agent.snapshot.version == 1
    assert decode_template(cached.read_bytes()).id == small_template.id


def test_wrongly_signed_template_or_weights_are_refused_and_the_model_kept(
        tmp_path: Path, small_template: OnnxTemplate) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    other_private, _ = generate_keypair(tmp_path / "keys", name="other")
    good, evil = Signer.from_file(private), Signer.from_file(other_private)
    agent = offline_agent(tmp_path / "agent", StaticReader(UNPLUGGED),
                          coordinator_public_keys=(str(public),), model_refresh_s=1e-6)
    # Each reading of the device's clock a second later: a refresh is always due (on the real
    # clock two readings can be less than the 1 us refresh interval apart).
    ticks = itertools.count()
    agent.monotonic = lambda: float(next(ticks))
    agent.on_connected()
    full = good.sign(encode_snapshot(Snapshot(version=1, spec=SMALL,
                                              weights=np.zeros(15, np.float32))))
    w1 = good.sign(weights_bytes(small_template, 1, np.full(15, 0.1, np.float32)))
    agent.on_announce(compact_announcement(full, w1, small_template.id, 1))
    agent.on_template(evil.sign(template_bytes(small_template)))
    assert agent.model_rejection is not None and "template" in agent.model_rejection
    assert not (tmp_path / "agent" / "templates").exists() or not any(
        (tmp_path / "agent" / "templates").iterdir())
    assert "template" not in topics_of(agent) and "weights" not in topics_of(agent)
    agent.check()  # refused once: not fetched again for the same announcement
    assert topics_of(agent) <= {"announce"}

    # A version signed properly: template and weights accepted.
    w2 = good.sign(weights_bytes(small_template, 2, np.full(15, 0.2, np.float32)))
    agent.on_announce(compact_announcement(full, w2, small_template.id, 2))
    agent.on_template(good.sign(template_bytes(small_template)))
    agent.on_weights(w2)
    assert agent.snapshot is not None and agent.snapshot.version == 2
    saved = (tmp_path / "agent" / "model.snapshot").read_bytes()

    # Weights signed by another key, or not at all: refused, version 2 kept.
    for payload in (evil.sign(weights_bytes(small_template, 3, np.ones(15, np.float32))),
                    weights_bytes(small_template, 4, np.ones(15, np.float32))):
        agent.check()
        agent.on_announce(compact_announcement(full, payload, small_template.id,
                                               decode_weights(split(payload)[0]).version))
        assert "weights" in topics_of(agent)
        agent.on_weights(payload)
        assert agent.snapshot.version == 2 and agent.model_rejection is not None
        assert agent.status()["last_fetch"]["refused"] is True
    assert (tmp_path / "agent" / "model.snapshot").read_bytes() == saved


def test_weights_that_do_not_fit_their_template_are_refused(
        tmp_path: Path, small_template: OnnxTemplate) -> None:
    other_spec = ModelSpec(kind="logistic", n_features=4, classes=(0, 1))  # 5 parameters
    agent: Agent = offline_agent(tmp_path, StaticReader(UNPLUGGED))
    agent.on_connected()
    cached = tmp_path / "templates" / f"{small_template.id}.template"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(template_bytes(small_template))
    wrong = weights_bytes(small_template, 1, np.zeros(5, np.float32), spec=other_spec)
    agent.on_weights(wrong)
    assert agent.snapshot is None and "do not fit" in (agent.model_rejection or "")


# ---------------------------------------------------------------------------- real broker


def fetches(link: CountingLink) -> list[str]:
    """What the agent fetched, in order: full snapshots, templates, compact snapshots."""
    return [kind for kind, _, _ in link.received if kind in ("model", "template", "weights")]


@pytest.mark.broker
def test_an_agent_fetches_the_template_once_then_compact_snapshots(broker, fleet_name,
                                                                   tmp_path) -> None:
    topics = Topics(fleet_name)
    full_by_version: dict[int, bytes] = {}
    recorder = Listener(broker.url, [topics.model])  # every full snapshot, to compare with
    service = coordinator(broker, fleet_name, tmp_path / "coord",
                          snapshots=SnapshotConfig(min_interval_s=0, include_onnx=True))
    runner, link, thread = start_agent(broker, fleet_name, tmp_path / "agent",
                                       StaticReader(readings()))
    try:
        lineage = lambda: service.store.lineage(device_id=runner.config.device_id)  # noqa: E731
        # Trains, which makes a new version, which it fetches and trains from, ...
        assert wait_for(lambda: len({v for v in link.models() if v is not None}) >= 3
                        and len(lineage()) >= 2, timeout=60)
    finally:
        stop_agent(runner, thread)
    try:
        kinds = fetches(link)
        assert kinds[0] == "template" and kinds.count("template") == 1, kinds
        assert "model" not in kinds, "a compact-capable agent fetched a full snapshot"
        fetched = [v for v in link.models() if v is not None]
        assert len(set(fetched)) >= 3 and fetched == sorted(fetched)
        # Each update was trained from a version fetched compact.
        assert {r.base_version for r in lineage()} <= set(fetched)

        held = runner.agent.snapshot
        assert held is not None
        while held.version not in full_by_version:  # recorder.get waits at most 30 s
            payload = bytes(recorder.get().payload)
            full_by_version[decode_snapshot(payload).version] = payload
        full = decode_snapshot(full_by_version[held.version])
        assert full.onnx, "include_onnx: the full snapshot carries the ONNX export"

        # Bytes per version: the compact snapshot against the full one of the same version.
        per_fetch = [n for kind, n, _ in link.received if kind == "weights"]
        full_size = len(full_by_version[held.version])
        print(f"full snapshot {full_size} bytes; compact fetch {max(per_fetch)} bytes; "
              f"template once {link.bytes_of('template')} bytes")
        assert max(per_fetch) <= 0.3 * full_size
        # It trains from the dequantised weights: float16 of the full float32 ones.
        np.testing.assert_array_equal(held.weights,
                                      full.weights.astype(np.float16).astype(np.float32))
        # Its Predictor (template + weights) agrees with the full ONNX of the same version.
        predictor = Predictor(tmp_path / "agent")
        from fedasync_iot.models.ml._datasets import load_digits

        _, test = load_digits()
        X = test.X[:300].astype(np.float32)
        got = predictor.predict_proba(X)
        assert predictor.version == held.version
        want = OnnxModel(full.onnx).predict_proba(X)
        assert np.abs(got - want).max() <= 1e-3
        assert (predictor.predict(X) == OnnxModel(full.onnx).predict(X)).mean() >= 0.99
    finally:
        recorder.close()
        service.stop()


@pytest.mark.broker
def test_a_restarted_agent_with_a_corrupt_template_fetches_it_again(broker, fleet_name,
                                                                    tmp_path) -> None:
    service = coordinator(broker, fleet_name, tmp_path / "coord", model=SMALL)
    state = tmp_path / "agent"
    runner, link, thread = start_agent(broker, fleet_name, state, StaticReader(UNPLUGGED))
    try:
        assert wait_for(lambda: runner.agent.snapshot is not None, timeout=30)
        assert fetches(link) == ["template", "weights"]
    finally:
        stop_agent(runner, thread)
    (cached,) = (state / "templates").iterdir()
    cached.write_bytes(b"FAIO garbage")
    try:
        newest = new_versions(broker, service, fleet_name, 1, n_params=15)
        runner, link, thread = start_agent(broker, fleet_name, state, StaticReader(UNPLUGGED),
                                           model_refresh_s=0.001)
        assert wait_for(lambda: runner.agent.snapshot is not None
                        and runner.agent.snapshot.version == newest, timeout=30)
        assert fetches(link) == ["template", "weights"]
        assert decode_template(cached.read_bytes()).id == cached.stem
    finally:
        stop_agent(runner, thread)
        service.stop()


@pytest.mark.broker
def test_a_wrongly_signed_template_from_the_broker_is_refused(broker, fleet_name,
                                                              tmp_path) -> None:
    private, public = generate_keypair(tmp_path / "a")
    _, other_public = generate_keypair(tmp_path / "b")
    service = coordinator(broker, fleet_name, tmp_path / "coord", model=SMALL,
                          signing_key=str(private))
    good, good_link, good_thread = start_agent(
        broker, fleet_name, tmp_path / "good", StaticReader(UNPLUGGED),
        device_id=f"{fleet_name[:40]}-g", coordinator_public_keys=(str(public),))
    bad, bad_link, bad_thread = start_agent(
        broker, fleet_name, tmp_path / "bad", StaticReader(UNPLUGGED),
        device_id=f"{fleet_name[:40]}-b", coordinator_public_keys=(str(other_public),))
    try:
        assert wait_for(lambda: good.agent.snapshot is not None, timeout=30)
        assert fetches(good_link) == ["template", "weights"]
        assert wait_for(lambda: bad.agent.model_rejection is not None, timeout=30)
        assert "template" in (bad.agent.model_rejection or "")
        bad_link.sentinel(broker, fleet_name)
        assert bad.agent.snapshot is None and not (tmp_path / "bad" / "model.snapshot").exists()
        # Refused once, not fetched again; the weights were never fetched.
        assert fetches(bad_link) == ["template"]
    finally:
        stop_agent(good, good_thread)
        stop_agent(bad, bad_thread)
        service.stop()


@pytest.mark.broker
def test_an_announcement_without_compact_keys_is_followed_with_the_full_snapshot(
        broker, fleet_name, tmp_path) -> None:
    topics = Topics(fleet_name)
    full = encode_snapshot(Snapshot(version=4, spec=DIGITS, weights=np.full(650, 0.5,
                                                                             np.float32)))
    old = Listener(broker.url, [topics.ack("old-coordinator")])
    try:  # what an older coordinator leaves: a full snapshot and a plain announcement
        old.publish(topics.model, full, retain=True)
        old.publish(topics.announce, encode_announcement(Announcement(
            version=4, sha256=hashlib.sha256(full).hexdigest(), size=len(full),
            created_at=time.time())), retain=True)
    finally:
        old.close()
    runner, link, thread = start_agent(broker, fleet_name, tmp_path / "a",
                                       StaticReader(readings()))
    try:
        assert wait_for(lambda: runner.agent.counters.trained >= 1, timeout=60)
        assert runner.agent.snapshot is not None and runner.agent.snapshot.version == 4
        np.testing.assert_array_equal(runner.agent.snapshot.weights, np.full(650, 0.5))
        assert set(fetches(link)) == {"model"}
    finally:
        stop_agent(runner, thread)


def test_a_compact_fetch_that_never_arrives_falls_back_to_full_snapshots(
        tmp_path: Path, small_template: OnnxTemplate) -> None:
    """A broker whose ACL predates compact snapshots hides their topics: the agent waits out
    one fetch, then takes the full snapshot, and keeps doing so for COMPACT_RETRY_S."""
    import fedasync_iot.agent._fetch as fetch_module
    now = [1000.0]
    agent = offline_agent(tmp_path, StaticReader(UNPLUGGED))
    agent.monotonic = agent.net_clock = lambda: now[0]
    agent.on_connected()
    full = encode_snapshot(Snapshot(version=1, spec=SMALL, weights=np.zeros(15, np.float32)))
    w1 = weights_bytes(small_template, 1, np.full(15, 0.1, np.float32))
    agent.on_announce(compact_announcement(full, w1, small_template.id, 1))
    assert topics_of(agent) == {"announce", "template"}
    now[0] += fetch_module.FETCH_TIMEOUT_S + 1
    agent.check()
    assert topics_of(agent) == {"announce", "model"}
    agent.on_model(full)
    assert agent.snapshot is not None and agent.snapshot.version == 1
    # Within COMPACT_RETRY_S a newer version comes full too; after it, compact again.
    agent.config = dataclasses.replace(agent.config, model_refresh_s=1.0)
    now[0] += 2
    agent.check()
    agent.on_announce(compact_announcement(full, w1, small_template.id, 2))
    assert topics_of(agent) == {"announce", "model"}
    agent.on_model(encode_snapshot(Snapshot(version=2, spec=SMALL,
                                            weights=np.zeros(15, np.float32))))
    now[0] += fetch_module.COMPACT_RETRY_S
    agent.check()
    agent.on_announce(compact_announcement(full, w1, small_template.id, 3))
    assert topics_of(agent) == {"announce", "template"}
