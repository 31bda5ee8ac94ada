"""The agent's configuration: one frozen dataclass from TOML + FEDASYNC_* env + flags."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent._policy import PolicyConfig
from agent._trainer import TrainConfig
from models import ConfigError
from models._config import load


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    device_id: str
    broker: str = "mqtt://127.0.0.1:1883"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    fleet: str = "default"
    topic_root: str = "fl"
    state_dir: str = "agent-state"
    data: str = "data"  # a directory/file of CSV or NPZ, or module:function
    label_column: str = "label"
    min_samples: int = 10  # never train on less
    min_new_samples: int = 50  # new local samples that justify training on the same model
    retrain_on_new_model: bool = True  # a newer global model alone justifies training
    min_train_interval_s: float = 60.0
    check_interval_s: float = 15.0
    spool_max_count: int = 100
    spool_max_bytes: int = 64 * 1024 * 1024
    train_in_subprocess: bool = True
    # The coordinator's Ed25519 public key(s) (PEM files). When set, a model that is not signed
    # by one of them is refused and the previous model kept.
    coordinator_public_keys: tuple[str, ...] = ()
    training: TrainConfig = field(default_factory=TrainConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.device_id):
            raise ConfigError("device_id must be 1-64 characters of A-Z a-z 0-9 _ . -",
                              key="device_id")
        for key in ("min_samples", "min_new_samples", "spool_max_count", "spool_max_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < (1 if key.startswith("spool") else 0):
                raise ConfigError(f"{key} must be a non-negative integer", key=key)
        for key in ("min_train_interval_s", "check_interval_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key} must be a non-negative number of seconds", key=key)


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    return load(AgentConfig, path, environ=environ, overrides=overrides, required="device_id",
                hint="set device_id in the config, FEDASYNC_DEVICE_ID, or --device-id")
