"""ONNX inference with onnxruntime (device side).

Imports onnxruntime only: never skl2onnx or onnx, which the ``agent`` extra does not install.
Understands the models `models.ml._onnx.export_onnx` writes (see its output contract): one float32
input of fixed width; two outputs (labels, probabilities) for a classifier, one for a regressor.
`OnnxModel.from_template` builds the same from a weight-free template (`models._template`) and
a flat weight vector.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import ArrayLike, NDArray

from fedasync_iot.models._errors import ModelError
from fedasync_iot.models._template import (
    BINDINGS_METADATA_KEY,
    bound_tensors,
    canonical_bindings,
    parse_bindings,
)

_ORT_WARNING = 2  # onnxruntime log severity: 0 verbose .. 4 fatal; keep device logs quiet


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # One thread each: a Raspberry Pi also trains and talks MQTT; oversubscribing its cores
    # costs more than parallel inference on tiny models gains.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = _ORT_WARNING
    return options


class OnnxModel:
    """An exported model, ready to predict on a CPU with one thread (the target is a small board).

    `source` is the serialized model (bytes) or a path to a ``.onnx`` file.
    """

    def __init__(self, source: bytes | str | os.PathLike[str]) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            origin = f"{len(data)} bytes"
        else:
            origin = os.fspath(source)
            try:
                data = Path(origin).read_bytes()
            except OSError as exc:
                raise ModelError(f"cannot read ONNX model {origin}: {exc}") from exc
        self._open(data, _session_options(), origin)

    def _open(self, data: bytes, options: ort.SessionOptions, origin: str) -> None:
        try:
            self._session = ort.InferenceSession(
                data, sess_options=options, providers=["CPUExecutionProvider"]
            )
        # onnxruntime's errors (InvalidProtobuf, InvalidGraph, Fail, ...) derive from plain
        # Exception, not from one base of their own.
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model ({origin}): {exc}") from exc

        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 2:
            raise ModelError("expected one 2-D float32 input [batch, n_features]")
        width = inputs[0].shape[1]
        if not isinstance(width, int) or width <= 0:
            raise ModelError(f"the model's input width is not fixed: {width!r}")
        if len(outputs) not in (1, 2):
            raise ModelError(f"expected 1 (regressor) or 2 (classifier) outputs: {len(outputs)}")
        self._input_name: str = inputs[0].name
        self._n_features = width
        self._output_names: list[str] = [o.name for o in outputs]
        self._metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)

    @classmethod
    def from_template(cls, graph: bytes, bindings: object, weights: ArrayLike) -> OnnxModel:
        """A model from a weight-free template graph and one flat weight vector.

        `graph` and `bindings` come from `models.ml._onnx.export_template` (the bindings as the JSON
        list `OnnxTemplate.bindings_json` gives, or `Binding`s); `weights` is the version's flat
        float32 vector. Everything is checked, as hostile input: the bindings themselves, the
        weights against the bindings (length, finite), the placeholders of the graph against the
        bindings (onnxruntime refuses a name, dims or dtype that differ), and the bindings the
        graph was made with (its metadata) against those given. Any mismatch is a `ModelError`.
        """
        if not isinstance(graph, (bytes, bytearray, memoryview)) or len(graph) == 0:
            raise ModelError("a template graph must be non-empty bytes")
        checked = parse_bindings(bindings)
        tensors = bound_tensors(checked, weights)
        options = _session_options()
        # add_external_initializers, not add_initializer: add_initializer needs the initializer
        # declared with all its data (onnxruntime checks the byte count before any override, so a
        # template would be as large as the full export) and checks nothing about the override (a
        # misnamed one is ignored, a wrong shape may broadcast). add_external_initializers fills
        # data-less external placeholders and refuses an unknown name, other dims or dtype. It
        # copies the data into the graph while the session loads, so these OrtValues and arrays
        # need not outlive the session.
        try:
            values = [ort.OrtValue.ortvalue_from_numpy(t) for _, t in tensors]
            options.add_external_initializers([name for name, _ in tensors], values)
        except Exception as exc:  # onnxruntime errors have no common base (see _open)
            raise ModelError(f"onnxruntime refused the template weights: {exc}") from exc
        model = cls.__new__(cls)
        model._open(bytes(graph), options, f"template of {len(graph)} bytes")
        embedded = model._metadata.get(BINDINGS_METADATA_KEY)
        if embedded is None:
            raise ModelError(f"the graph is not a template: no {BINDINGS_METADATA_KEY} metadata")
        if embedded != canonical_bindings(checked):
            raise ModelError("the bindings given differ from those the template was made with")
        return model

    @classmethod
    def from_bytes(cls, data: bytes) -> OnnxModel:
        """Same as ``OnnxModel(data)``, for call sites that read better with the source named."""
        return cls(data)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> OnnxModel:
        """Same as ``OnnxModel(path)``."""
        return cls(path)

    @property
    def n_features(self) -> int:
        return self._n_features

    @property
    def is_classifier(self) -> bool:
        return len(self._output_names) == 2

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata_props (e.g. ``"fedasync.spec"``), as a fresh dict."""
        return dict(self._metadata)

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """Labels (int64) for a classifier, values (float32, shape ``(n,)``) for a regressor."""
        first = self._run(X)[0]
        return np.asarray(first).reshape(-1)

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float32]:
        """Class probabilities (float32, ``(n, n_classes)``); classifiers only."""
        if not self.is_classifier:
            raise ModelError("a regression model has no class probabilities")
        return np.asarray(self._run(X)[1], dtype=np.float32)

    def _run(self, X: ArrayLike) -> list[Any]:
        try:
            arr = np.ascontiguousarray(X, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"X is not a numeric array: {exc}") from exc
        if arr.ndim != 2:
            raise ModelError(f"X must be 2-D (n_samples, n_features), got shape {arr.shape}")
        if arr.shape[1] != self._n_features:
            raise ModelError(f"X has {arr.shape[1]} features, the model expects {self._n_features}")
        # Some classifier graphs (ArrayFeatureExtractor) fail on an empty batch.
        if arr.shape[0] == 0:
            raise ModelError("X has no rows")
        if not np.isfinite(arr).all():
            raise ModelError("X contains NaN or infinite values (or values beyond float32)")
        try:
            result: list[Any] = self._session.run(self._output_names, {self._input_name: arr})
        except Exception as exc:  # onnxruntime errors have no common base (see __init__)
            raise ModelError(f"onnxruntime failed to run the model: {exc}") from exc
        return result
