"""The coordinator: validates and merges updates as they arrive, versions the model durably and
publishes snapshots to the fleet."""

from fedasync_iot.coordinator._config import (
    CoordinatorConfig,
    EvalConfig,
    SnapshotConfig,
    load_config,
)
from fedasync_iot.coordinator._engine import Engine, Incoming, Outcome
from fedasync_iot.coordinator._guards import GuardConfig, check_update
from fedasync_iot.coordinator._rules import (
    Contribution,
    FedAsync,
    FedAvgSync,
    FedBuff,
    Merge,
    MergeRule,
    RuleConfig,
    build_rule,
)
from fedasync_iot.coordinator._staleness import Staleness
from fedasync_iot.coordinator._store import Store

__all__ = [
    "Contribution",
    "CoordinatorConfig",
    "Engine",
    "EvalConfig",
    "FedAsync",
    "FedAvgSync",
    "FedBuff",
    "GuardConfig",
    "Incoming",
    "Merge",
    "MergeRule",
    "Outcome",
    "RuleConfig",
    "SnapshotConfig",
    "Staleness",
    "Store",
    "build_rule",
    "check_update",
    "load_config",
]
