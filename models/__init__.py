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
from models._topics import Topics
from models._wire import (
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

__all__ = [
    "ACK_STATUSES",
    "ENCODINGS",
    "MODEL_KINDS",
    "Ack",
    "AckStatus",
    "ConfigError",
    "Encoding",
    "FedAsyncError",
    "InvalidUpdate",
    "ModelError",
    "ModelKind",
    "ModelSpec",
    "Snapshot",
    "StateError",
    "Topics",
    "UnsupportedSchema",
    "UpdateMessage",
    "WireError",
    "decode_ack",
    "decode_snapshot",
    "decode_update",
    "encode_ack",
    "encode_snapshot",
    "encode_update",
    "validate_id",
]
