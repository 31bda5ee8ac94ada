"""The shared core of fedasync-iot and its public API: wire format, topics, config, errors, the
MQTT boundary, signing, atomic files, model specs and ONNX templates; and, re-exported from
`fedasync_iot.models.ml`, the model side (scikit-learn adapters, ONNX export and inference,
datasets, the DP arithmetic).

The model side loads on first use: scikit-learn costs ~90 MB and most of a second, which an
idle agent on a 512 MB board should not pay.
"""

import importlib
from typing import TYPE_CHECKING, Any

from fedasync_iot.models._backoff import Backoff
from fedasync_iot.models._bounds import Bounds, bounds, check_fields
from fedasync_iot.models._cli import add_version, log_level, make_parser
from fedasync_iot.models._config import check_layer, load, load_toml, read_utf8
from fedasync_iot.models._errors import (
    ConfigError,
    FedAsyncError,
    InvalidUpdate,
    ModelError,
    StateError,
    UnsupportedSchema,
    WireError,
)
from fedasync_iot.models._files import (
    Features,
    Labels,
    atomic_write,
    load_xy,
    save_npz,
    sync_directory,
)
from fedasync_iot.models._ids import ID_PATTERN, ID_RULE, NAME_RULE, is_valid_id
from fedasync_iot.models._kept import KeptSubscription
from fedasync_iot.models._logging import setup_logging
from fedasync_iot.models._mqtt import (
    BrokerAddress,
    BrokerRefused,
    Client,
    Connack,
    Connection,
    Message,
    PacketAck,
    Publication,
    PublishFailed,
    broker_urls,
    check_broker,
    create_client,
    describe_error,
    topic_matches,
)
from fedasync_iot.models._signing import Signer, Verifier, generate_keypair
from fedasync_iot.models._signing import split as split_signature
from fedasync_iot.models._spec import MODEL_KINDS, ModelKind, ModelSpec
from fedasync_iot.models._template import Binding, OnnxTemplate
from fedasync_iot.models._topics import Topics
from fedasync_iot.models._wire import (
    ACK_STATUSES,
    ENCODINGS,
    MAX_COHORT,
    MAX_RETRY_AFTER_S,
    ROUTINE_REJECTIONS,
    Ack,
    AckStatus,
    Announcement,
    Encoding,
    Rejection,
    Snapshot,
    TemplateMessage,
    UpdateMessage,
    WeightsMessage,
    decode_ack,
    decode_announcement,
    decode_snapshot,
    decode_template,
    decode_update,
    decode_weights,
    encode_ack,
    encode_announcement,
    encode_snapshot,
    encode_template,
    encode_update,
    encode_weights,
    frame_kind,
    update_label,
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
    from fedasync_iot.models.ml._datasets import (
        Dataset,
        dirichlet_partition,
        load_digits,
        make_synthetic,
    )
    from fedasync_iot.models.ml._dp import Mechanism, epsilon
    from fedasync_iot.models.ml._inference import OnnxModel
    from fedasync_iot.models.ml._onnx import bake_onnx, export_onnx, export_template

# The model side (models/ml), re-exported on first use: name -> its module in fedasync_iot.models.ml
_LAZY = {name: module for module, names in {
    "_adapters": ("FitReport", "LinearAdapter", "LogisticAdapter", "MLPAdapter", "ModelAdapter",
                  "build_model"),
    "_datasets": ("Dataset", "dirichlet_partition", "load_digits", "make_synthetic"),
    "_dp": ("Mechanism", "epsilon"),
    "_inference": ("OnnxModel",),
    "_onnx": ("bake_onnx", "export_onnx", "export_template"),
}.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedasync_iot.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedasync_iot.models.ml.{module}"), name)


__all__ = [
    "ACK_STATUSES",
    "ENCODINGS",
    "ID_PATTERN",
    "ID_RULE",
    "MAX_COHORT",
    "MAX_RETRY_AFTER_S",
    "MODEL_KINDS",
    "NAME_RULE",
    "ROUTINE_REJECTIONS",
    "Ack",
    "AckStatus",
    "Announcement",
    "Backoff",
    "Binding",
    "Bounds",
    "BrokerAddress",
    "BrokerRefused",
    "Client",
    "ConfigError",
    "Connack",
    "Connection",
    "Dataset",
    "Encoding",
    "Features",
    "FedAsyncError",
    "FitReport",
    "InvalidUpdate",
    "KeptSubscription",
    "Labels",
    "LinearAdapter",
    "LogisticAdapter",
    "MLPAdapter",
    "Mechanism",
    "Message",
    "ModelAdapter",
    "ModelError",
    "ModelKind",
    "ModelSpec",
    "OnnxModel",
    "OnnxTemplate",
    "PacketAck",
    "Publication",
    "PublishFailed",
    "Rejection",
    "Signer",
    "Snapshot",
    "StateError",
    "TemplateMessage",
    "Topics",
    "UnsupportedSchema",
    "UpdateMessage",
    "Verifier",
    "WeightsMessage",
    "WireError",
    "add_version",
    "atomic_write",
    "bake_onnx",
    "bounds",
    "broker_urls",
    "build_model",
    "check_broker",
    "check_fields",
    "check_layer",
    "create_client",
    "decode_ack",
    "decode_announcement",
    "decode_snapshot",
    "decode_template",
    "decode_update",
    "decode_weights",
    "describe_error",
    "dirichlet_partition",
    "encode_ack",
    "encode_announcement",
    "encode_snapshot",
    "encode_template",
    "encode_update",
    "encode_weights",
    "epsilon",
    "export_onnx",
    "export_template",
    "frame_kind",
    "generate_keypair",
    "is_valid_id",
    "load",
    "load_digits",
    "load_toml",
    "load_xy",
    "log_level",
    "make_parser",
    "make_synthetic",
    "read_utf8",
    "save_npz",
    "setup_logging",
    "split_signature",
    "sync_directory",
    "topic_matches",
    "update_label",
    "validate_id",
]
