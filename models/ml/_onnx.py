"""ONNX export of a model adapter (coordinator side).

skl2onnx and onnx are imported inside `export_onnx` and `export_template`, not at module level,
so that importing the `models` package on a device (the ``agent`` extra has neither) stays cheap
and possible. `export_template` writes the weight-free graph of a spec (`models._template`).

Output contract, relied on by `models.ml._inference.OnnxModel`:

- one input ``"input"``: float32, shape ``[None, n_features]``;
- classifiers: ``"label"`` (int64, ``[None]``, values from ``spec.classes``) then
  ``"probabilities"`` (float32, ``[None, n_classes]``, columns in ``spec.classes`` order);
  ZipMap is off, so both are plain tensors;
- the regressor: ``"variable"`` (float32, ``[None, 1]``);
- metadata ``"fedasync.spec"``: the spec as JSON, plus whatever the caller adds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from numpy.typing import ArrayLike, NDArray

from fedasync_iot.models._errors import ModelError
from fedasync_iot.models._template import (
    BINDINGS_METADATA_KEY,
    PLACEHOLDER_LOCATION,
    Binding,
    OnnxTemplate,
    bound_tensors,
    canonical_bindings,
    parse_bindings,
)

if TYPE_CHECKING:
    import onnx

    from fedasync_iot.models.ml._adapters import ModelAdapter

# The newest opset a converted model may use. onnxruntime has implemented opset 17 and ai.onnx.ml 3
# since 1.12, and skl2onnx writes IR version 8 for opset 17, so any runtime the `agent` extra allows
# (onnxruntime >= 1.16: opset 19, IR 9) loads these files. skl2onnx stamps the lowest opset the
# graph really needs (13-17 for our three kinds).
TARGET_OPSET = 17
_TARGET_ML_OPSET = 3

INPUT_NAME = "input"
SPEC_METADATA_KEY = "fedasync.spec"

# Probe weights for discovering where each parameter lands in the export: parameter i is the
# float32 integer _PROBE_BASE + i, exact below 2**24 (so for up to 15.7M parameters, beyond
# models._wire.MAX_PARAMS) and far from any constant a converter writes (1, -1, n_classes...).
_PROBE_BASE = float(2**20)
_PROBE_LIMIT = 2**24


def export_onnx(
    adapter: ModelAdapter,
    *,
    opset: int = TARGET_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialized ONNX model computing what `adapter` predicts, from its current weights.

    `metadata` (e.g. ``{"fedasync.version": "12"}``) is stored in the model's metadata_props, which
    onnxruntime exposes as `OnnxModel.metadata`. Any failure is a `ModelError`.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 1:
        raise ModelError(f"opset must be a positive integer, got {opset!r}")
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError as exc:
        raise ModelError(
            "ONNX export needs skl2onnx and onnx: install fedasync-iot[coordinator]"
        ) from exc

    spec = adapter.spec
    estimator = adapter.estimator
    options = {id(estimator): {"zipmap": False}} if spec.is_classifier else None
    try:
        model = convert_sklearn(
            estimator,
            name=f"fedasync-{spec.kind}",
            initial_types=[(INPUT_NAME, FloatTensorType([None, spec.n_features]))],
            target_opset={"": opset, "ai.onnx.ml": _TARGET_ML_OPSET},
            options=options,
        )
        props = {SPEC_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True)}
        props.update(metadata or {})
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        data: bytes = model.SerializeToString()
    # skl2onnx raises a zoo of types (RuntimeError subclasses, ValueError, TypeError, KeyError,
    # NotImplementedError) depending on which converter fails; all mean "cannot export".
    except Exception as exc:
        raise ModelError(f"ONNX export of the {spec.kind} model failed: {exc}") from exc
    return data


def export_template(adapter: ModelAdapter, *, opset: int = TARGET_OPSET) -> OnnxTemplate:
    """The weight-free ONNX graph of ``adapter.spec`` and the bindings that fill it.

    Depends only on the spec (and the onnx/skl2onnx build), never on the adapter's weights: the
    graph is exported from a fresh adapter of the same spec holding probe weights, each parameter
    a distinct value, so the position of every parameter in every initializer can be read off
    the export (no per-kind table to fall out of step with skl2onnx). Every float initializer
    holding probe values becomes an external-data placeholder: name, dtype and dims, no data.
    The graph carries the spec and the bindings in its metadata. A device fills it with
    `models.ml._inference.OnnxModel.from_template`. Any failure is a `ModelError`.

    The linear regressor's converter writes its weights as attributes of an ``ai.onnx.ml``
    LinearRegressor node, which nothing can override; the template computes the same with a
    MatMul and an Add over two initializers instead.
    """
    from fedasync_iot.models.ml._adapters import build_model

    spec = adapter.spec
    probe = build_model(spec)
    n = probe.n_params
    if n > _PROBE_LIMIT - int(_PROBE_BASE):
        raise ModelError(f"a template needs at most {_PROBE_LIMIT - int(_PROBE_BASE)} "
                         f"parameters, the {spec.kind} model has {n}")
    import numpy as np

    probe.set_params_vector(_PROBE_BASE + np.arange(n, dtype=np.float32))
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # export_onnx below says the same, but we need onnx first
        raise ModelError("ONNX templates need onnx: install fedasync-iot[coordinator]") from exc
    model = onnx.load_from_string(export_onnx(probe, opset=opset))
    try:
        _linear_regressor_as_matmul(model, opset)
        # Checked while it still holds its data: the checker insists on reading external data.
        onnx.checker.check_model(model)
        bindings: list[Binding] = []
        placeholders: list[onnx.TensorProto] = []
        for init in model.graph.initializer:
            binding = _discover(init, numpy_helper.to_array(init), n) if (
                init.data_type == onnx.TensorProto.FLOAT) else None
            if binding is None:
                placeholders.append(init)
                continue
            bindings.append(binding)
            placeholder = onnx.TensorProto(name=init.name, data_type=init.data_type,
                                           dims=list(init.dims))
            placeholder.data_location = onnx.TensorProto.EXTERNAL
            placeholder.external_data.add(key="location", value=PLACEHOLDER_LOCATION)
            placeholders.append(placeholder)
        covered = sum(b.length for b in bindings)
        if covered != n:
            raise ModelError(f"the {spec.kind} export carries {covered} of its {n} parameters "
                             f"as initializers; a template cannot override the others")
        checked = parse_bindings(bindings)  # unique names, an exact tiling of the vector
        del model.graph.initializer[:]
        model.graph.initializer.extend(placeholders)
        model.metadata_props.add(key=BINDINGS_METADATA_KEY,
                                 value=canonical_bindings(checked))
        graph: bytes = model.SerializeToString()
    except ModelError:
        raise
    # onnx raises ValidationError (a plain Exception subclass), protobuf DecodeError, ...
    except Exception as exc:
        raise ModelError(f"ONNX template of the {spec.kind} model failed: {exc}") from exc
    return OnnxTemplate(graph=graph, bindings=checked)


def bake_onnx(template: OnnxTemplate, weights: ArrayLike) -> bytes:
    """The full ONNX model of `weights`: `template`'s graph with its placeholders filled, the
    same predictions as `export_onnx` of an adapter holding those weights (tests/test_onnx.py)
    without converting again: the coordinator makes one per snapshot, and skl2onnx took 15 ms
    where this takes a fraction of that. Any failure is a `ModelError`."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ModelError("ONNX models need onnx: install fedasync-iot[coordinator]") from exc
    tensors = dict(bound_tensors(template.bindings, weights))
    try:
        model = onnx.load_from_string(template.graph)
        for init in model.graph.initializer:
            if init.name in tensors:
                init.CopyFrom(numpy_helper.from_array(tensors.pop(init.name), init.name))
        kept = [p for p in model.metadata_props if p.key != BINDINGS_METADATA_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        data: bytes = model.SerializeToString()
    except Exception as exc:  # onnx and protobuf errors have no common base
        raise ModelError(f"could not fill the ONNX template: {exc}") from exc
    if tensors:
        raise ModelError(f"the template has no initializer {sorted(tensors)[0]!r}")
    return data


def _discover(init: onnx.TensorProto, values: NDArray[Any], n: int) -> Binding | None:
    """The binding of one float initializer of a probe export, or None if it holds no parameter.

    It holds parameters when its values are probe values; they must then be one contiguous run
    of the vector, laid out in C order or (2-D) transposed: anything else (a converter that
    scales, reorders or splits the weights) cannot be filled by slicing and is an error.
    """
    import numpy as np

    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return None
    index = flat - _PROBE_BASE
    is_param = (index >= 0) & (index < n) & (index == np.round(index))
    if not is_param.any():
        return None
    if not is_param.all():
        raise ModelError(f"initializer {init.name} mixes parameters with other values")
    idx = index.astype(np.int64).reshape(values.shape)
    offset, length = int(idx.min()), int(idx.size)
    run = np.arange(offset, offset + length)
    shape = tuple(int(d) for d in values.shape)
    if np.array_equal(idx.ravel(), run):
        return Binding(name=init.name, shape=shape, offset=offset, length=length)
    if idx.ndim == 2 and np.array_equal(idx.T.ravel(), run):
        return Binding(name=init.name, shape=shape, offset=offset, length=length, transpose=True)
    raise ModelError(f"initializer {init.name} holds parameters in an order a template cannot "
                     f"express (neither a slice nor a transposed slice of the vector)")


def _linear_regressor_as_matmul(model: onnx.ModelProto, opset: int) -> None:
    """Replace each ``ai.onnx.ml`` LinearRegressor by MatMul + Add (in place): the same sum, with
    the weights in initializers instead of attributes."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    if not any(nd.op_type == "LinearRegressor" for nd in nodes):
        return
    rebuilt: list[onnx.NodeProto] = []
    for nd in nodes:
        if nd.op_type != "LinearRegressor" or nd.domain != "ai.onnx.ml":
            rebuilt.append(nd)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in nd.attribute}
        if attrs.get("post_transform", b"NONE") not in (b"NONE", "NONE"):
            raise ModelError("LinearRegressor with a post_transform has no MatMul form")
        targets = int(attrs.get("targets", 1))
        coef = np.asarray(attrs["coefficients"], dtype=np.float32).reshape(targets, -1).T
        intercept = np.asarray(attrs.get("intercepts", [0.0] * targets), dtype=np.float32)
        coef_name, intercept_name, product = (f"{nd.name or 'linear'}_{suffix}"
                                              for suffix in ("coef", "intercept", "product"))
        graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(coef), coef_name),
                                  numpy_helper.from_array(intercept, intercept_name)])
        rebuilt.append(helper.make_node("MatMul", [nd.input[0], coef_name], [product]))
        rebuilt.append(helper.make_node("Add", [product, intercept_name], [nd.output[0]]))
    del graph.node[:]
    graph.node.extend(rebuilt)
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        # MatMul and Add are unchanged since opset 13, which onnxruntime >= 1.16 runs.
        model.opset_import.add(domain="", version=min(opset, 13))
