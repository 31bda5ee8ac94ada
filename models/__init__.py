"""Shared vocabulary of fedasync-iot: model specs and adapters, ONNX, wire format, errors."""

from models._errors import (
    ConfigError,
    FedAsyncError,
    InvalidUpdate,
    ModelError,
    StateError,
    UnsupportedSchema,
    WireError,
)
from models._spec import MODEL_KINDS, ModelKind, ModelSpec

__all__ = [
    "MODEL_KINDS",
    "ConfigError",
    "FedAsyncError",
    "InvalidUpdate",
    "ModelError",
    "ModelKind",
    "ModelSpec",
    "StateError",
    "UnsupportedSchema",
    "WireError",
]
