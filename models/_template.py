"""ONNX graph templates: the graph of a model spec sent once, the weights of each version apart.

A model's ONNX graph depends only on its `ModelSpec`, yet a full export embeds the weights, so a
snapshot carrying both the flat weights and the export pays for them twice. A template is the
graph with every weight initializer replaced by an external-data placeholder (name, dtype, dims,
no data), plus *bindings* saying how each placeholder is cut from the flat parameter vector. The
coordinator makes one with `models.ml._onnx.export_template`; a device builds a session from it and
a weight vector with `models.ml._inference.OnnxModel.from_template`.

This module is imported on devices: numpy only (no onnx, no skl2onnx, no onnxruntime).

Bindings are plain JSON (a list of objects), so they can travel in a message header::

    {"name": "coef", "dtype": "float32", "shape": [64, 10], "offset": 0, "length": 640,
     "transpose": true}

The tensor of a binding is ``w[offset : offset + length]`` reshaped to `shape`, or, when
`transpose` is true (2-D only), reshaped to ``shape[::-1]`` and transposed: scikit-learn's
logistic `coef_` is (classes, features) while the exported MatMul wants (features, classes).
The bindings of a template tile the vector exactly: every parameter belongs to one binding.
The template's graph also carries its bindings in its metadata (`BINDINGS_METADATA_KEY`), so the
template id (the SHA-256 of the graph bytes) covers them and a device can check that the bindings
it was handed are the ones the graph was made with.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fedasync_iot.models._errors import ModelError

BINDINGS_METADATA_KEY = "fedasync.bindings"
# Where a placeholder's data would live if nothing replaced it. onnxruntime only reads it when a
# placeholder has no replacement, which `OnnxModel.from_template` never lets happen for a graph
# that matches its bindings; a directory that should not exist makes the failure loud anyway.
PLACEHOLDER_LOCATION = "fedasync-missing-weights/none"

DTYPES = ("float32",)
MAX_BINDINGS = 1024
MAX_RANK = 4
MAX_PARAMS = 10_000_000  # as models._wire.MAX_PARAMS
_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
_KEYS = frozenset({"name", "dtype", "shape", "offset", "length", "transpose"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """One overridable initializer and where its values sit in the flat parameter vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    length: int
    transpose: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ModelError(f"binding name must be 1-128 characters of A-Z a-z 0-9 _ . : / -, "
                             f"got {_show(self.name)}")
        if self.dtype not in DTYPES:
            raise ModelError(f"binding {self.name}: dtype must be one of {DTYPES}, "
                             f"got {_show(self.dtype)}")
        if (not isinstance(self.shape, tuple) or not 0 <= len(self.shape) <= MAX_RANK
                or not all(_is_int(d) and 1 <= d <= MAX_PARAMS for d in self.shape)):
            raise ModelError(f"binding {self.name}: shape must be at most {MAX_RANK} positive "
                             f"dimensions, got {_show(self.shape)}")
        if not _is_int(self.offset) or not 0 <= self.offset < MAX_PARAMS:
            raise ModelError(f"binding {self.name}: offset must be in 0..{MAX_PARAMS - 1}, "
                             f"got {_show(self.offset)}")
        if not _is_int(self.length) or self.length != math.prod(self.shape):
            raise ModelError(f"binding {self.name}: length {_show(self.length)} is not the "
                             f"size of shape {list(self.shape)}")
        if not isinstance(self.transpose, bool):
            raise ModelError(f"binding {self.name}: transpose must be a boolean")
        if self.transpose and len(self.shape) != 2:
            raise ModelError(f"binding {self.name}: transpose needs a 2-D shape, "
                             f"got {list(self.shape)}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "length": self.length, "transpose": self.transpose}

    @classmethod
    def from_json(cls, obj: object) -> Binding:
        """Build from decoded JSON, treated as hostile: anything malformed is a `ModelError`."""
        if not isinstance(obj, dict):
            raise ModelError(f"a binding must be a JSON object, got {_show(obj)}")
        missing, unknown = _KEYS - set(obj), set(obj) - _KEYS
        if missing or unknown:
            raise ModelError(f"binding keys: missing {sorted(missing)}, unknown "
                             f"{sorted(map(str, unknown))[:5]}")
        shape = obj["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise ModelError(f"binding shape must be a list of at most {MAX_RANK} integers")
        return cls(name=obj["name"], dtype=obj["dtype"], shape=tuple(shape),
                   offset=obj["offset"], length=obj["length"], transpose=obj["transpose"])


def parse_bindings(obj: object) -> tuple[Binding, ...]:
    """Bindings from decoded JSON (a list of objects) or `Binding`s, checked as a whole: names
    unique, and the bindings tile ``0..n_params`` exactly (no gap, no overlap)."""
    if isinstance(obj, (str, bytes)) or not isinstance(obj, (list, tuple)):
        raise ModelError(f"bindings must be a list, got {_show(obj)}")
    if not 1 <= len(obj) <= MAX_BINDINGS:
        raise ModelError(f"bindings must hold 1..{MAX_BINDINGS} entries, got {len(obj)}")
    bindings = tuple(b if isinstance(b, Binding) else Binding.from_json(b) for b in obj)
    names = [b.name for b in bindings]
    if len(set(names)) != len(names):
        raise ModelError("binding names must be unique")
    end = 0
    for b in sorted(bindings, key=lambda b: b.offset):
        if b.offset != end:
            raise ModelError(f"bindings must tile the parameter vector: {b.name} starts at "
                             f"{b.offset}, expected {end}")
        end += b.length
    if end > MAX_PARAMS:
        raise ModelError(f"bindings cover {end} parameters; the limit is {MAX_PARAMS}")
    return bindings


def bindings_json(bindings: Sequence[Binding]) -> list[dict[str, Any]]:
    """The bindings as plain JSON values (a list of objects), for a message header."""
    return [b.to_json() for b in bindings]


def canonical_bindings(bindings: Sequence[Binding]) -> str:
    """One fixed text per list of bindings: what the template's metadata holds."""
    return json.dumps(bindings_json(bindings), sort_keys=True, separators=(",", ":"))


def n_params(bindings: Sequence[Binding]) -> int:
    return sum(b.length for b in bindings)


def bound_tensors(bindings: Sequence[Binding], weights: ArrayLike
                  ) -> list[tuple[str, NDArray[np.float32]]]:
    """(name, C-contiguous float32 tensor) per binding, cut from the flat vector `weights`.

    `weights` must be a finite 1-D numeric vector of exactly ``n_params(bindings)`` values.
    """
    try:
        w = np.asarray(weights)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"weights are not an array: {exc}") from exc
    if w.ndim != 1 or w.dtype.kind not in "fiu":
        raise ModelError(f"weights must be a 1-D numeric vector, got {w.ndim}-D {w.dtype}")
    expected = n_params(bindings)
    if w.shape[0] != expected:
        raise ModelError(f"weights have {w.shape[0]} values; the bindings need {expected}")
    with np.errstate(over="ignore"):  # overflow shows up as inf, refused just below
        w32 = w.astype(np.float32)
    if not np.isfinite(w32).all():
        raise ModelError("weights must be finite (in float32)")
    out: list[tuple[str, NDArray[np.float32]]] = []
    for b in bindings:
        segment = w32[b.offset:b.offset + b.length]
        tensor = segment.reshape(b.shape[::-1]).T if b.transpose else segment.reshape(b.shape)
        # onnxruntime copies from the buffer it is given as laid out in C order; a transposed
        # view would hand it the untransposed bytes.
        out.append((b.name, np.ascontiguousarray(tensor)))
    return out


@dataclass(frozen=True, slots=True, eq=False)
class OnnxTemplate:
    """The ONNX graph of one model spec without its weights, and the bindings that fill it.

    `graph` is byte-identical for any two weight vectors of one spec (and one onnx/skl2onnx
    build), so it can be published once per spec and cached by `id`.
    """

    graph: bytes
    bindings: tuple[Binding, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.graph, bytes) or not self.graph:
            raise ModelError("a template graph must be non-empty bytes")
        object.__setattr__(self, "bindings", parse_bindings(self.bindings))

    @property
    def id(self) -> str:
        """SHA-256 (hex) of the graph bytes, which embed the bindings: one id per spec."""
        return hashlib.sha256(self.graph).hexdigest()

    @property
    def n_params(self) -> int:
        return n_params(self.bindings)

    def bindings_json(self) -> list[dict[str, Any]]:
        return bindings_json(self.bindings)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    """A short, safe rendering of hostile input for error messages."""
    if isinstance(value, (list, tuple, dict)) and (
            len(value) > 8 or not all(isinstance(v, (int, float, str)) for v in value)):
        return f"a {type(value).__name__} of {len(value)} items"  # repr of a huge one is costly
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return "a huge integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
