"""ONNX export and onnxruntime inference: parity with scikit-learn, loadability, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray

from fedasync_iot.models._errors import ModelError
from fedasync_iot.models._spec import ModelSpec
from fedasync_iot.models.ml._adapters import ModelAdapter, build_model
from fedasync_iot.models.ml._datasets import Dataset, load_digits, make_synthetic
from fedasync_iot.models.ml._inference import OnnxModel
from fedasync_iot.models.ml._onnx import (
    SPEC_METADATA_KEY,
    TARGET_OPSET,
    bake_onnx,
    export_onnx,
    export_template,
)

CASES = ("logistic", "logistic-binary", "mlp", "mlp-binary", "linear")


def _case(name: str) -> tuple[ModelSpec, Dataset, Dataset]:
    """Spec, training set and held-out set for one parity case."""
    if name in ("logistic", "mlp"):
        train, test = load_digits(seed=0)
        spec = ModelSpec(kind=name, n_features=64, classes=tuple(range(10)))  # type: ignore[arg-type]
        return spec, train.subset(np.arange(600)), test
    if name.endswith("-binary"):
        ds = make_synthetic(n_samples=400, n_features=6, n_classes=2, seed=1)
        ds = Dataset(X=np.asarray(ds.X), y=np.where(ds.y == 0, 2, 7).astype(np.int64), name="bin")
        kind = name.removesuffix("-binary")
        spec = ModelSpec(kind=kind, n_features=6, classes=(2, 7))  # type: ignore[arg-type]
        return spec, ds.subset(np.arange(300)), ds.subset(np.arange(300, 400))
    ds = make_synthetic(n_samples=400, n_features=6, seed=1, task="regression")
    spec = ModelSpec(kind="linear", n_features=6)
    return spec, ds.subset(np.arange(300)), ds.subset(np.arange(300, 400))


@pytest.fixture(scope="module")
def trained() -> dict[str, tuple[ModelAdapter, Dataset]]:
    """Each case's adapter after two epochs, with its held-out set."""
    out = {}
    for name in CASES:
        spec, train, test = _case(name)
        out[name] = (build_model(spec).partial_fit(train.X, train.y, epochs=2), test)
    return out


def parity(adapter: ModelAdapter, model: OnnxModel, X: NDArray[np.float32]) -> dict[str, float]:
    """How far onnxruntime is from scikit-learn on X.

    Classifiers: share of differing labels, max abs probability difference. The regressor: max
    abs difference and the max difference relative to the largest |prediction| (elementwise
    relative error is meaningless where a float32 prediction cancels to near zero).
    """
    if adapter.spec.is_classifier:
        return {
            "label_mismatch": float(np.mean(adapter.predict(X) != model.predict(X))),
            "max_abs_proba_diff": float(
                np.max(np.abs(adapter.predict_proba(X) - model.predict_proba(X)))
            ),
        }
    expected, got = adapter.predict(X), model.predict(X)
    diff = np.abs(expected - got)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff_to_scale": float(diff.max() / np.abs(expected).max()),
    }


# --- the exported bytes --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_export_loads_in_a_plain_inference_session(
    name: str, trained: dict[str, tuple[ModelAdapter, Dataset]]
) -> None:
    adapter, test = trained[name]

    data = export_onnx(adapter)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": np.asarray(test.X[:5])})

    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1]) == ("input", "tensor(float)", adapter.spec.n_features)
    assert not isinstance(inp.shape[0], int)  # batch dimension is free
    names = [o.name for o in session.get_outputs()]
    if adapter.spec.is_classifier:
        assert names == ["label", "probabilities"]
        assert outputs[0].dtype == np.int64
        assert outputs[1].shape == (5, len(adapter.spec.classes))
    else:
        assert names == ["variable"]
        assert outputs[0].shape == (5, 1)


@pytest.mark.parametrize("name", CASES)
def test_export_stays_within_the_target_opset_and_an_old_ir(
    name: str, trained: dict[str, tuple[ModelAdapter, Dataset]]
) -> None:
    proto = onnx.load_from_string(export_onnx(trained[name][0]))

    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}

    assert TARGET_OPSET == 17
    assert opsets["ai.onnx"] <= TARGET_OPSET
    assert opsets.get("ai.onnx.ml", 1) <= 3
    assert proto.ir_version <= 8  # onnxruntime >= 1.12 reads IR 8
    onnx.checker.check_model(proto)


def test_export_carries_the_spec_and_caller_metadata(
    trained: dict[str, tuple[ModelAdapter, Dataset]],
) -> None:
    adapter, _ = trained["mlp"]

    model = OnnxModel(export_onnx(adapter, metadata={"fedasync.version": "12"}))

    assert model.metadata["fedasync.version"] == "12"
    spec = ModelSpec.from_dict(json.loads(model.metadata[SPEC_METADATA_KEY]))
    assert spec == adapter.spec


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_onnx_predictions_match_sklearn(
    name: str, trained: dict[str, tuple[ModelAdapter, Dataset]]
) -> None:
    adapter, test = trained[name]
    X = np.asarray(test.X)

    model = OnnxModel(export_onnx(adapter))
    figures = parity(adapter, model, X)

    print(f"\nONNX parity {name}: {figures}")
    if adapter.spec.is_classifier:
        np.testing.assert_array_equal(model.predict(X), adapter.predict(X))
        assert figures["max_abs_proba_diff"] < 1e-5
        assert model.predict(X).dtype == np.int64
    else:
        expected = adapter.predict(X)
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(model.predict(X), expected, rtol=1e-5, atol=1e-5 * scale)
        assert figures["max_rel_diff_to_scale"] < 1e-5
    assert model.n_features == adapter.spec.n_features
    assert model.is_classifier == adapter.spec.is_classifier


@pytest.mark.parametrize("name", CASES)
def test_a_baked_model_predicts_as_the_export(
    name: str, trained: dict[str, tuple[ModelAdapter, Dataset]]
) -> None:
    """The coordinator fills its template per snapshot instead of converting again."""
    adapter, test = trained[name]
    X = np.asarray(test.X)
    fresh = build_model(adapter.spec)  # the template depends on the spec alone
    baked = OnnxModel(bake_onnx(export_template(fresh), adapter.get_params_vector()))
    exported = OnnxModel(export_onnx(adapter))

    if adapter.spec.is_classifier:
        np.testing.assert_array_equal(baked.predict(X), exported.predict(X))
        assert np.max(np.abs(baked.predict_proba(X) - exported.predict_proba(X))) <= 1e-6
    else:
        np.testing.assert_allclose(baked.predict(X), exported.predict(X), rtol=1e-5,
                                   atol=1e-6 * float(np.abs(exported.predict(X)).max()))
    assert baked.metadata[SPEC_METADATA_KEY] == exported.metadata[SPEC_METADATA_KEY]
    assert "fedasync.bindings" not in baked.metadata
    with pytest.raises(ModelError, match="weights have"):
        bake_onnx(export_template(fresh), adapter.get_params_vector()[:-1])


@pytest.mark.parametrize("name", CASES)
def test_version_zero_exports_before_any_training(name: str) -> None:
    spec, _, test = _case(name)
    adapter = build_model(spec)
    X = np.asarray(test.X)

    model = OnnxModel(export_onnx(adapter))

    if spec.is_classifier:
        np.testing.assert_allclose(model.predict_proba(X), adapter.predict_proba(X), atol=1e-6)
    else:
        np.testing.assert_array_equal(model.predict(X), np.zeros(len(test), np.float32))


# --- OnnxModel loading and input checks ----------------------------------------------------------


@pytest.fixture(scope="module")
def logistic_bytes(trained: dict[str, tuple[ModelAdapter, Dataset]]) -> bytes:
    return export_onnx(trained["logistic"][0])


def test_onnx_model_loads_from_a_path(logistic_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(logistic_bytes)

    from_path, from_str = OnnxModel(path), OnnxModel.from_path(str(path))

    X = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    from_bytes = OnnxModel.from_bytes(logistic_bytes)
    np.testing.assert_array_equal(from_path.predict(X), from_bytes.predict(X))
    np.testing.assert_array_equal(from_str.predict_proba(X), from_path.predict_proba(X))


@pytest.mark.parametrize(
    ("source", "match"),
    [
        (b"definitely not protobuf", "cannot load"),
        (b"", "cannot load"),
        ("/nonexistent/model.onnx", "cannot read"),
    ],
)
def test_onnx_model_rejects_what_it_cannot_load(source: Any, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        OnnxModel(source)


def test_onnx_model_rejects_a_model_without_a_fixed_input_width() -> None:
    inp = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", "d"])
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "d"])
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [inp], [out])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8

    with pytest.raises(ModelError, match="not fixed"):
        OnnxModel(proto.SerializeToString())


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.zeros((2, 63), np.float32), "63 features, the model expects 64"),
        (np.zeros(64, np.float32), "2-D"),
        (np.zeros((0, 64), np.float32), "no rows"),
        (np.full((1, 64), np.nan, np.float32), "NaN"),
        ([["a"] * 64], "numeric"),
    ],
)
def test_onnx_model_checks_its_input(logistic_bytes: bytes, X: Any, match: str) -> None:
    model = OnnxModel(logistic_bytes)

    with pytest.raises(ModelError, match=match):
        model.predict(X)


def test_regression_onnx_model_has_no_probabilities(
    trained: dict[str, tuple[ModelAdapter, Dataset]],
) -> None:
    model = OnnxModel(export_onnx(trained["linear"][0]))

    with pytest.raises(ModelError, match="no class probabilities"):
        model.predict_proba(np.zeros((1, 6), np.float32))


# --- export errors and import hygiene ------------------------------------------------------------


def test_export_converts_converter_errors(
    trained: dict[str, tuple[ModelAdapter, Dataset]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import skl2onnx

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no converter for this")

    monkeypatch.setattr(skl2onnx, "convert_sklearn", broken)

    with pytest.raises(ModelError, match="export of the mlp model failed: no converter"):
        export_onnx(trained["mlp"][0])


@pytest.mark.parametrize(("opset", "match"), [(0, "positive integer"), (99, "export of")])
def test_export_rejects_unusable_opsets(
    opset: int, match: str, trained: dict[str, tuple[ModelAdapter, Dataset]]
) -> None:
    with pytest.raises(ModelError, match=match):
        export_onnx(trained["linear"][0], opset=opset)


def test_inference_imports_neither_skl2onnx_nor_onnx() -> None:
    code = (
        "import sys, models.ml._inference, models.ml._onnx\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'skl2onnx', 'onnx'})\n"
        "print(','.join(bad))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == ""
