"""On-device inference with the newest model the agent has received (ONNX in onnxruntime).

For the device's own application::

    from fedasync_iot.agent import Predictor
    predictor = Predictor("/var/lib/fedasync-agent")
    labels = predictor.predict(features)      # reloads by itself when a newer model arrives

The saved model is a full snapshot (its ONNX) or a compact one (weights), which is turned into
an ONNX model with the template it names, cached in ``<state_dir>/templates``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fedasync_iot.agent._model_cache import SNAPSHOT_FILE, TEMPLATES_DIR, load_template
from fedasync_iot.models import ModelError, decode_snapshot, decode_weights, frame_kind


class Predictor:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / SNAPSHOT_FILE
        self._lock = threading.Lock()
        self._mtime: int | None = None
        self._model: Any = None
        self.version: int | None = None

    def _current(self) -> Any:
        from fedasync_iot.models import OnnxModel

        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            raise ModelError(f"no model yet: {self.path} is missing (has the agent received "
                             "a snapshot?)") from exc
        with self._lock:
            if mtime != self._mtime:
                data = self.path.read_bytes()
                if frame_kind(data) == "weights":  # a compact snapshot: template + weights
                    weights = decode_weights(data)
                    template = load_template(self.path.parent / TEMPLATES_DIR,
                                             weights.template_id)
                    if template is None:
                        raise ModelError(f"model version {weights.version} needs template "
                                         f"{weights.template_id}, which is not cached (the "
                                         "agent fetches it with the next model)")
                    self._model = OnnxModel.from_template(
                        template.template.graph, template.template.bindings, weights.weights)
                    version = weights.version
                else:
                    snapshot = decode_snapshot(data)
                    if not snapshot.onnx:
                        raise ModelError(f"model version {snapshot.version} carries no ONNX")
                    self._model = OnnxModel.from_bytes(snapshot.onnx)
                    version = snapshot.version
                self._mtime, self.version = mtime, version
            return self._model

    def predict(self, X: ArrayLike) -> np.ndarray[Any, Any]:
        return np.asarray(self._current().predict(np.asarray(X, dtype=np.float32)))

    def predict_proba(self, X: ArrayLike) -> np.ndarray[Any, Any]:
        return np.asarray(self._current().predict_proba(np.asarray(X, dtype=np.float32)))
