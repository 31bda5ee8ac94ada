"""ONNX export of a model adapter (coordinator side).

skl2onnx and onnx are imported inside `export_onnx`, not at module level, so that importing the
`models` package on a device (the ``agent`` extra has neither) stays cheap and possible.

Output contract, relied on by `models._inference.OnnxModel`:

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
from typing import TYPE_CHECKING

from models._errors import ModelError

if TYPE_CHECKING:
    from models._adapters import ModelAdapter

# The newest opset a converted model may use. onnxruntime has implemented opset 17 and ai.onnx.ml 3
# since 1.12, and skl2onnx writes IR version 8 for opset 17, so any runtime the `agent` extra allows
# (onnxruntime >= 1.16: opset 19, IR 9) loads these files. skl2onnx stamps the lowest opset the
# graph really needs (13-17 for our three kinds).
TARGET_OPSET = 17
_TARGET_ML_OPSET = 3

INPUT_NAME = "input"
SPEC_METADATA_KEY = "fedasync.spec"


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
