"""Weight-free ONNX templates: byte-identical per spec, exact parity with the full export, and
hostile graphs, bindings or weights refused as `ModelError`."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import numpy_helper

from fedasync_iot.models._errors import ModelError
from fedasync_iot.models._spec import ModelSpec
from fedasync_iot.models._template import (
    BINDINGS_METADATA_KEY,
    Binding,
    OnnxTemplate,
    bound_tensors,
    parse_bindings,
)
from fedasync_iot.models.ml._adapters import ModelAdapter, build_model
from fedasync_iot.models.ml._inference import OnnxModel
from fedasync_iot.models.ml._onnx import _PROBE_BASE, _discover, export_onnx, export_template

DIGITS = tuple(range(10))
SPECS = {
    "logistic": ModelSpec(kind="logistic", n_features=64, classes=DIGITS),
    "logistic-binary": ModelSpec(kind="logistic", n_features=6, classes=(2, 7)),
    "mlp": ModelSpec(kind="mlp", n_features=64, classes=DIGITS, hidden=(32,)),
    "mlp-2": ModelSpec(kind="mlp", n_features=64, classes=DIGITS, hidden=(64, 32)),
    "mlp-binary": ModelSpec(kind="mlp", n_features=6, classes=(2, 7), hidden=(5,)),
    "linear": ModelSpec(kind="linear", n_features=64),
}


def _adapter(name: str, seed: int) -> ModelAdapter:
    """An adapter of SPECS[name] holding seeded random weights (large enough to matter)."""
    adapter = build_model(SPECS[name])
    rng = np.random.default_rng(seed)
    adapter.set_params_vector(rng.normal(scale=0.5, size=adapter.n_params).astype(np.float32))
    return adapter


@pytest.fixture(scope="module")
def templates() -> dict[str, OnnxTemplate]:
    return {name: export_template(_adapter(name, seed=1)) for name in SPECS}


def _inputs(n_features: int, n: int = 300) -> NDArray[np.float32]:
    # Digits-like range [0, 1] plus some negatives and values past 1: a wider test of the graph.
    return np.random.default_rng(7).uniform(-1, 2, size=(n, n_features)).astype(np.float32)


# --- parity and identity -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_template_plus_weights_predicts_as_the_full_export(
    name: str, templates: dict[str, OnnxTemplate]
) -> None:
    adapter = _adapter(name, seed=2)  # other weights than the template was exported from
    t = templates[name]
    X = _inputs(adapter.spec.n_features)

    full = OnnxModel(export_onnx(adapter))
    filled = OnnxModel.from_template(t.graph, t.bindings_json(), adapter.get_params_vector())

    if adapter.spec.is_classifier:
        assert np.abs(full.predict_proba(X) - filled.predict_proba(X)).max() <= 1e-6
        assert np.array_equal(full.predict(X), filled.predict(X))
        # Not a vacuous pass: the inputs reach several classes and confident probabilities.
        assert len(set(full.predict(X).tolist())) > 1
    else:
        expected = full.predict(X)
        assert np.abs(expected - filled.predict(X)).max() <= 1e-6 * np.abs(expected).max()
    assert filled.n_features == full.n_features
    assert filled.is_classifier == full.is_classifier


@pytest.mark.parametrize("name", list(SPECS))
def test_template_bytes_depend_only_on_the_spec(
    name: str, templates: dict[str, OnnxTemplate]
) -> None:
    version_zero = export_template(build_model(SPECS[name]))
    other = export_template(_adapter(name, seed=3))

    assert version_zero.graph == templates[name].graph == other.graph
    assert version_zero.id == other.id == templates[name].id
    assert version_zero.bindings == other.bindings


def test_template_ids_differ_between_specs(templates: dict[str, OnnxTemplate]) -> None:
    assert len({t.id for t in templates.values()}) == len(templates)


@pytest.mark.parametrize("name", [n for n in SPECS if n != "linear"])
def test_bindings_cut_the_vector_into_the_full_exports_initializers(
    name: str, templates: dict[str, OnnxTemplate]
) -> None:
    adapter = _adapter(name, seed=4)
    exported = {i.name: numpy_helper.to_array(i)
                for i in onnx.load_from_string(export_onnx(adapter)).graph.initializer}

    tensors = bound_tensors(templates[name].bindings, adapter.get_params_vector())

    assert sum(t.size for _, t in tensors) == adapter.n_params
    for tensor_name, tensor in tensors:
        assert tensor.dtype == exported[tensor_name].dtype
        assert np.array_equal(tensor, exported[tensor_name])


def test_logistic_coefficients_are_bound_transposed(templates: dict[str, OnnxTemplate]) -> None:
    # sklearn's coef_ is (classes, features); the exported MatMul takes (features, classes).
    coef, intercept = templates["logistic"].bindings

    assert (coef.shape, coef.offset, coef.transpose) == ((64, 10), 0, True)
    assert (intercept.shape, intercept.offset, intercept.transpose) == ((10,), 640, False)


@pytest.mark.parametrize("name", ["logistic", "mlp-2", "linear"])
def test_template_graph_holds_no_weights(name: str, templates: dict[str, OnnxTemplate]) -> None:
    t = templates[name]
    proto = onnx.load_from_string(t.graph)
    bound = {b.name for b in t.bindings}
    placeholders = [i for i in proto.graph.initializer if i.name in bound]
    full = export_onnx(_adapter(name, seed=5))

    assert {i.name for i in placeholders} == bound
    for init in placeholders:
        assert init.data_location == onnx.TensorProto.EXTERNAL
        assert not init.raw_data and not init.float_data
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[BINDINGS_METADATA_KEY]) == t.bindings_json()
    # Smaller than one full export once the weights outweigh the graph: not so for the linear
    # model's 65 weights (810 bytes against 712), sent once per spec all the same.
    if name != "linear":
        assert len(t.graph) < len(full) / 2


def test_linear_template_replaces_the_unoverridable_regressor_node(
    templates: dict[str, OnnxTemplate],
) -> None:
    full = onnx.load_from_string(export_onnx(_adapter("linear", seed=1)))
    graph = onnx.load_from_string(templates["linear"].graph).graph

    assert [n.op_type for n in full.graph.node] == ["LinearRegressor"]  # weights as attributes
    assert [n.op_type for n in graph.node] == ["MatMul", "Add"]
    assert [o.name for o in graph.output] == ["variable"]


def test_bindings_survive_a_json_round_trip(templates: dict[str, OnnxTemplate]) -> None:
    t = templates["mlp-2"]
    header = json.dumps({"template": t.id, "bindings": t.bindings_json()})
    w = _adapter("mlp-2", seed=6).get_params_vector()

    received = json.loads(header)["bindings"]
    model = OnnxModel.from_template(t.graph, received, w)

    assert parse_bindings(received) == t.bindings
    assert model.predict(_inputs(64, 5)).shape == (5,)
    assert json.loads(model.metadata["fedasync.spec"])["hidden"] == [64, 32]


def test_weights_are_copied_when_the_session_is_built(templates: dict[str, OnnxTemplate]) -> None:
    # add_external_initializers copies: the caller may reuse its buffer for the next version.
    t = templates["mlp"]
    w = _adapter("mlp", seed=8).get_params_vector()
    X = _inputs(64, 50)
    model = OnnxModel.from_template(t.graph, t.bindings_json(), w)
    before = model.predict_proba(X)

    w[:] = 0.0

    assert np.array_equal(model.predict_proba(X), before)
    assert np.abs(before - 0.1).max() > 0.1  # zero weights would give uniform probabilities


def test_device_side_needs_neither_onnx_nor_skl2onnx(
    templates: dict[str, OnnxTemplate], tmp_path: Path
) -> None:
    t = templates["mlp"]
    w = _adapter("mlp", seed=9).get_params_vector()
    X = _inputs(64, 20)
    expected = OnnxModel(export_onnx(_adapter("mlp", seed=9))).predict(X)
    (tmp_path / "graph.onnx").write_bytes(t.graph)
    (tmp_path / "bindings.json").write_text(json.dumps(t.bindings_json()))
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "X.npy", X)
    code = (
        "import json, sys, pathlib, numpy as np\n"
        "from fedasync_iot.models.ml._inference import OnnxModel\n"
        f"d = pathlib.Path({str(tmp_path)!r})\n"
        "m = OnnxModel.from_template((d / 'graph.onnx').read_bytes(),\n"
        "    json.loads((d / 'bindings.json').read_text()), np.load(d / 'w.npy'))\n"
        "print(','.join(map(str, m.predict(np.load(d / 'X.npy')).tolist())))\n"
        "print(','.join(sorted({n.split('.')[0] for n in sys.modules} & {'onnx', 'skl2onnx',\n"
        "    'sklearn'})))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)

    labels, heavy = result.stdout.splitlines()
    assert [int(v) for v in labels.split(",")] == expected.tolist()
    assert heavy == ""


# --- mismatches are errors, not crashes -----------------------------------------------------------


def _edited(bindings: list[dict[str, Any]], index: int, **changes: Any) -> list[dict[str, Any]]:
    out = copy.deepcopy(bindings)
    out[index].update(changes)
    return out


def test_weights_that_do_not_fit_the_bindings_are_refused(
    templates: dict[str, OnnxTemplate],
) -> None:
    t = templates["mlp"]
    w = _adapter("mlp", seed=1).get_params_vector()
    bad_nan = w.copy()
    bad_nan[5] = np.nan

    for weights, match in [(w[:-1], "2409 values; the bindings need 2410"),
                           (np.append(w, 1.0), "2411 values"),
                           (bad_nan, "finite"),
                           (w.reshape(2, -1), "1-D"),
                           (np.array(["a"] * w.size), "numeric")]:
        with pytest.raises(ModelError, match=match):
            OnnxModel.from_template(t.graph, t.bindings_json(), weights)


def test_bindings_of_another_spec_are_refused(templates: dict[str, OnnxTemplate]) -> None:
    one, two = templates["mlp"], templates["mlp-2"]
    w = _adapter("mlp", seed=1).get_params_vector()

    # Same names and first dims, other sizes: onnxruntime refuses the replacement's dims.
    with pytest.raises(ModelError, match="cannot load the model"):
        OnnxModel.from_template(two.graph, one.bindings_json(), w)


@pytest.mark.parametrize("edit, match", [
    # Same length, other dims: onnxruntime compares dims with the placeholder.
    ({"shape": [32, 64]}, "cannot load"),
    # A name the graph does not have.
    ({"name": "not_there"}, "cannot load"),
])
def test_bindings_that_do_not_match_the_graph_are_refused(
    edit: dict[str, Any], match: str, templates: dict[str, OnnxTemplate]
) -> None:
    t = templates["mlp"]
    w = _adapter("mlp", seed=1).get_params_vector()

    with pytest.raises(ModelError, match=match):
        OnnxModel.from_template(t.graph, _edited(t.bindings_json(), 0, **edit), w)


def test_a_flipped_transpose_is_caught_by_the_embedded_bindings(
    templates: dict[str, OnnxTemplate],
) -> None:
    # Square coefficients keep their dims when the transpose flag lies: onnxruntime cannot tell,
    # the bindings the graph embeds can.
    spec = ModelSpec(kind="logistic", n_features=10, classes=DIGITS)
    t = export_template(build_model(spec))
    assert t.bindings[0].shape == (10, 10) and t.bindings[0].transpose
    w = np.arange(110, dtype=np.float32) / 110

    with pytest.raises(ModelError, match="differ from those the template was made with"):
        OnnxModel.from_template(t.graph, _edited(t.bindings_json(), 0, transpose=False), w)


def test_a_binding_left_out_is_refused(templates: dict[str, OnnxTemplate]) -> None:
    t = templates["mlp"]
    kept = t.bindings_json()[:-1]  # still a tiling, of the first 2400 parameters
    w = _adapter("mlp", seed=1).get_params_vector()[:2400]

    with pytest.raises(ModelError, match="cannot load"):
        OnnxModel.from_template(t.graph, kept, w)


def test_a_graph_that_is_not_a_template_is_refused(templates: dict[str, OnnxTemplate]) -> None:
    t = templates["mlp"]
    adapter = _adapter("mlp", seed=1)
    w = adapter.get_params_vector()

    for graph, match in [(export_onnx(adapter), "cannot load the model"),
                         (b"\x08\x07garbage", "cannot load"),
                         (b"", "non-empty bytes")]:
        with pytest.raises(ModelError, match=match):
            OnnxModel.from_template(graph, t.bindings_json(), w)
    with pytest.raises(ModelError, match="non-empty bytes"):
        OnnxModel.from_template("graph.onnx", t.bindings_json(), w)  # type: ignore[arg-type]


def test_template_without_embedded_bindings_is_refused(
    templates: dict[str, OnnxTemplate],
) -> None:
    t = templates["mlp"]
    proto = onnx.load_from_string(t.graph)
    kept = [p for p in proto.metadata_props if p.key != BINDINGS_METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    w = _adapter("mlp", seed=1).get_params_vector()

    with pytest.raises(ModelError, match="not a template"):
        OnnxModel.from_template(proto.SerializeToString(), t.bindings_json(), w)


GOOD = {"name": "w", "dtype": "float32", "shape": [2, 3], "offset": 0, "length": 6,
        "transpose": False}


@pytest.mark.parametrize("bindings, match", [
    ("[]", "must be a list"),
    ({"w": GOOD}, "must be a list"),
    ([], "1..1024 entries"),
    ([GOOD] * 1025, "1..1024 entries"),
    (["w"], "JSON object"),
    ([{**GOOD, "extra": 1}], "unknown"),
    ([{k: v for k, v in GOOD.items() if k != "offset"}], "missing"),
    ([{**GOOD, "dtype": "float64"}], "dtype"),
    ([{**GOOD, "name": ""}], "name"),
    ([{**GOOD, "name": "a b"}], "name"),
    ([{**GOOD, "name": 7}], "name"),
    ([{**GOOD, "shape": "2x3"}], "shape"),
    ([{**GOOD, "shape": [2, -3], "length": -6}], "shape"),
    ([{**GOOD, "shape": [2, 3.0]}], "shape"),
    ([{**GOOD, "shape": [1] * 5, "length": 1}], "shape"),
    ([{**GOOD, "length": 7}], "not the size of shape"),
    ([{**GOOD, "length": True}], "not the size of shape"),
    ([{**GOOD, "offset": -1}], "offset"),
    ([{**GOOD, "offset": 10**40}], "huge integer"),
    ([{**GOOD, "transpose": 1}], "transpose must be a boolean"),
    ([{**GOOD, "shape": [6], "transpose": True}], "transpose needs a 2-D shape"),
    ([GOOD, GOOD], "unique"),
    ([GOOD, {**GOOD, "name": "v", "offset": 5}], "tile"),  # overlap
    ([GOOD, {**GOOD, "name": "v", "offset": 7}], "tile"),  # gap
    ([{**GOOD, "offset": 1}], "tile"),  # does not start at 0
])
def test_malformed_bindings_are_refused(bindings: object, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        parse_bindings(bindings)


def test_bindings_parse_and_cut_a_vector() -> None:
    bindings = parse_bindings([{**GOOD, "name": "b", "offset": 6, "shape": [2, 3],
                                "transpose": True}, GOOD])
    w = np.arange(12, dtype=np.float32)

    tensors = dict(bound_tensors(bindings, w))

    assert np.array_equal(tensors["w"], np.arange(6).reshape(2, 3))
    assert np.array_equal(tensors["b"], np.arange(6, 12).reshape(3, 2).T)
    assert tensors["b"].flags.c_contiguous
    assert bindings[1] == Binding(name="w", shape=(2, 3), offset=0, length=6)


# --- discovery refuses what slicing cannot express ----------------------------------------------


def _probe_tensor(index: NDArray[np.int64], name: str = "t") -> tuple[onnx.TensorProto,
                                                                      NDArray[np.float32]]:
    values = (_PROBE_BASE + index).astype(np.float32)
    return numpy_helper.from_array(values, name), values


def test_discovery_reads_slices_and_transposed_slices() -> None:
    plain = _discover(*_probe_tensor(np.arange(4, 10).reshape(2, 3)), 20)
    flipped = _discover(*_probe_tensor(np.arange(6).reshape(3, 2).T), 20)
    one = numpy_helper.from_array(np.array([1.0, -1.0], dtype=np.float32), "unity")
    constant = _discover(one, numpy_helper.to_array(one), 20)

    assert plain == Binding(name="t", shape=(2, 3), offset=4, length=6)
    assert flipped == Binding(name="t", shape=(2, 3), offset=0, length=6, transpose=True)
    assert constant is None


@pytest.mark.parametrize("index, match", [
    (np.array([[0, 2], [1, 3]])[::-1], "order a template cannot express"),  # rows swapped
    (np.array([0, 1, 3]), "order a template cannot express"),  # a gap
    (np.array([0, 1, 1]), "order a template cannot express"),  # a repeat
])
def test_discovery_refuses_layouts_slicing_cannot_express(
    index: NDArray[np.int64], match: str
) -> None:
    with pytest.raises(ModelError, match=match):
        _discover(*_probe_tensor(index), 20)


def test_discovery_refuses_an_initializer_mixing_weights_and_constants() -> None:
    init = numpy_helper.from_array(np.array([_PROBE_BASE, 1.0], dtype=np.float32), "t")

    with pytest.raises(ModelError, match="mixes parameters"):
        _discover(init, numpy_helper.to_array(init), 20)


# --- the benchmark's quantisation and one of its cases --------------------------------------------


def test_benchmark_quantisation_errors_stay_within_half_a_step(
    templates: dict[str, OnnxTemplate],
) -> None:
    from fedasync_iot.bench.snapshot import quantised

    t = templates["mlp-2"]
    w = _adapter("mlp-2", seed=10).get_params_vector()
    w[t.bindings[1].offset:t.bindings[1].offset + t.bindings[1].length] *= 0.01  # a small tensor

    half, _ = quantised(w, "float16", t.bindings)
    whole, (scale,) = quantised(w, "int8/v", t.bindings)
    per_binding, scales = quantised(w, "int8/b", t.bindings)

    assert np.array_equal(quantised(w, "float32", t.bindings)[0], w)
    assert np.abs(half - w).max() <= np.abs(w).max() * 2.0**-11
    assert np.abs(whole - w).max() <= scale / 2 * (1 + 1e-6)
    assert len(scales) == len(t.bindings)
    for b, s in zip(t.bindings, scales, strict=True):
        cut = slice(b.offset, b.offset + b.length)
        assert np.abs(per_binding[cut] - w[cut]).max() <= s / 2 * (1 + 1e-6)
    # One scale per binding is what keeps the small tensor from rounding to zero.
    small = slice(t.bindings[1].offset, t.bindings[1].offset + t.bindings[1].length)
    assert np.count_nonzero(whole[small]) < np.count_nonzero(per_binding[small])


def test_benchmark_measures_the_logistic_case_side_by_side() -> None:
    from fedasync_iot.bench.snapshot import CASES, measure, report

    row = measure(CASES[0], repeats=2, steps=2, seeds=1)

    assert row["parity_max_diff"] <= 1e-6 and row["labels_equal"]
    assert row["bytes_float32"] < row["bytes_today"] / 2
    assert row["bytes_int8/v"] < row["bytes_float16"] < row["bytes_float32"]
    assert row["score_float32"] > 0.9  # trained, or accuracy comparisons would mean nothing
    assert row["max_diff_float16"] > 0  # float16 really rounds what the device runs
    assert "logistic 64x10" in report([row])
