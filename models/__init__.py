"""Shared vocabulary of fedasync-iot: model specs and adapters, ONNX, wire format, errors.

The scikit-learn adapters (``build_model`` ...) load on first use: importing them costs ~90 MB
and most of a second, which an idle agent on a 512 MB board should not pay.
"""

from typing import TYPE_CHECKING, Any

from fedasync_iot.models._errors import (
    ConfigError,
    FedAsyncError,
    InvalidUpdate,
    ModelError,
    StateError,
    UnsupportedSchema,
    WireError,
)
from fedasync_iot.models._spec import MODEL_KINDS, ModelKind, ModelSpec
from fedasync_iot.models._topics import Topics
from fedasync_iot.models._wire import (
    ACK_STATUSES,
    ENCODINGS,
    Ack,
    AckStatus,
    Encoding,
    Snapshot,
    UpdateMessage,
    decode_ack,
    decode_snapshot,
    decode_update,
    encode_ack,
    encode_snapshot,
    encode_update,
    validate_id,
)

if TYPE_CHECKING:
    from fedasync_iot.models.ml._adapters import (
        FitReport,
        LinearAdapter,
        LogisticAdapter,
        MLPAdapter,
        ModelAdapter,
        build_model,
    )

_LAZY = {"FitReport", "LinearAdapter", "LogisticAdapter", "MLPAdapter", "ModelAdapter",
         "build_model"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fedasync_iot.models.ml import _adapters

        return getattr(_adapters, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


__all__ = [
    "ACK_STATUSES",
    "ENCODINGS",
    "MODEL_KINDS",
    "Ack",
    "AckStatus",
    "ConfigError",
    "Encoding",
    "FedAsyncError",
    "FitReport",
    "InvalidUpdate",
    "LinearAdapter",
    "LogisticAdapter",
    "MLPAdapter",
    "ModelAdapter",
    "ModelError",
    "ModelKind",
    "ModelSpec",
    "Snapshot",
    "StateError",
    "Topics",
    "UnsupportedSchema",
    "UpdateMessage",
    "WireError",
    "build_model",
    "decode_ack",
    "decode_snapshot",
    "decode_update",
    "encode_ack",
    "encode_snapshot",
    "encode_update",
    "validate_id",
]
