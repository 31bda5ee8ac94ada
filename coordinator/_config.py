"""The coordinator's configuration: one frozen dataclass, loaded from TOML + FEDASYNC_* env."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator._guards import GuardConfig
from coordinator._participation import ParticipationConfig
from coordinator._rules import RuleConfig
from models import ConfigError, ModelSpec
from models._config import load


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotConfig:
    """How often the retained model snapshot is republished (exporting ONNX costs time)."""

    min_interval_s: float = 1.0
    include_onnx: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_interval_s) or self.min_interval_s < 0:
            raise ConfigError("snapshots.min_interval_s must be >= 0", key="min_interval_s")


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalConfig:
    """Held-out evaluation of new versions: a file (NPZ/CSV) or ``builtin:digits``."""

    test_file: str | None = None
    every: int = 1

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError("evaluation.every must be >= 1", key="every")


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    model: ModelSpec
    broker: str = "mqtt://127.0.0.1:1883"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    fleet: str = "default"
    topic_root: str = "fl"
    client_id: str = "fedasync-coordinator"
    state_dir: str = "coordinator-state"
    keep_checkpoints: int = 10
    signing_key: str | None = None  # Ed25519 private key (PEM): sign every snapshot
    rule: RuleConfig = field(default_factory=RuleConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    snapshots: SnapshotConfig = field(default_factory=SnapshotConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    batch_max: int = 500
    max_message_bytes: int = 16 * 1024 * 1024
    http: str = "127.0.0.1:9464"  # metrics + status; "" turns it off; port 0 picks a free one
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.batch_max < 1:
            raise ConfigError("batch_max must be >= 1", key="batch_max")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be >= 1024", key="max_message_bytes")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be >= 1", key="keep_checkpoints")
        if self.http and (":" not in self.http or not self.http.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"http must be HOST:PORT or empty, got {self.http!r}", key="http")

    @property
    def http_address(self) -> tuple[str, int] | None:
        if not self.http:
            return None
        host, port = self.http.rsplit(":", 1)
        return host, int(port)


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> CoordinatorConfig:
    """Defaults < TOML file < FEDASYNC_* environment < `overrides` (the CLI's flags)."""
    return load(CoordinatorConfig, path, environ=environ, overrides=overrides, required="model",
                hint="set [model] in the config file (kind, n_features, classes) or pass --model")
