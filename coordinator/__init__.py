"""The coordinator: validates and merges updates as they arrive, versions the model durably and
publishes snapshots to the fleet."""

from fedasync_iot.coordinator._central_dp import (
    CentralDPConfig,
    privacy_status,
    versions_per_device,
)
from fedasync_iot.coordinator._config import (
    CoordinatorConfig,
    EvalConfig,
    SnapshotConfig,
    load_config,
)
from fedasync_iot.coordinator._engine import Engine, Incoming, Outcome
from fedasync_iot.coordinator._guards import GuardConfig, Params, check_update
from fedasync_iot.coordinator._participation import (
    Ledger,
    ParticipationConfig,
    gini,
    max_median_ratio,
)
from fedasync_iot.coordinator._rules import (
    Contribution,
    FedAsync,
    FedAvgSync,
    FedBuff,
    Merge,
    MergeRule,
    RuleConfig,
    build_rule,
    merge_weighted,
    staleness_weights,
)
from fedasync_iot.coordinator._scheduling import Stepped
from fedasync_iot.coordinator._service import CoordinatorService
from fedasync_iot.coordinator._staleness import Staleness
from fedasync_iot.coordinator._store import Store

__all__ = [
    "CentralDPConfig",
    "Contribution",
    "CoordinatorConfig",
    "CoordinatorService",
    "Engine",
    "EvalConfig",
    "FedAsync",
    "FedAvgSync",
    "FedBuff",
    "GuardConfig",
    "Incoming",
    "Ledger",
    "Merge",
    "MergeRule",
    "Outcome",
    "Params",
    "ParticipationConfig",
    "RuleConfig",
    "SnapshotConfig",
    "Staleness",
    "Stepped",
    "Store",
    "build_rule",
    "check_update",
    "gini",
    "load_config",
    "max_median_ratio",
    "merge_weighted",
    "privacy_status",
    "staleness_weights",
    "versions_per_device",
]
