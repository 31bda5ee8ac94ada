"""The edge agent: trains on local data when the device allows it, sends updates over MQTT,
keeps them until acknowledged, and runs the newest model locally."""

from fedasync_iot.agent._agent import Agent
from fedasync_iot.agent._child import train_in_child
from fedasync_iot.agent._config import AgentConfig, Session, load_config
from fedasync_iot.agent._data import CallableSource, DataSource, DirectorySource
from fedasync_iot.agent._link import Link
from fedasync_iot.agent._policy import (
    Check,
    Decision,
    EligibilityGate,
    PolicyConfig,
    evaluate,
    format_decision,
)
from fedasync_iot.agent._predict import Predictor
from fedasync_iot.agent._privacy import PrivacyConfig, PrivacyLedger, device_multiplier
from fedasync_iot.agent._readings import PsutilReader, Readings, ReadingsSource, StaticReader
from fedasync_iot.agent._resend import ResendConfig
from fedasync_iot.agent._spool import Spool
from fedasync_iot.agent._trainer import TrainConfig, train_update

__all__ = [
    "Agent",
    "AgentConfig",
    "CallableSource",
    "Check",
    "DataSource",
    "Decision",
    "DirectorySource",
    "EligibilityGate",
    "Link",
    "PolicyConfig",
    "Predictor",
    "PrivacyConfig",
    "PrivacyLedger",
    "PsutilReader",
    "Readings",
    "ReadingsSource",
    "ResendConfig",
    "Session",
    "Spool",
    "StaticReader",
    "TrainConfig",
    "device_multiplier",
    "evaluate",
    "format_decision",
    "load_config",
    "train_in_child",
    "train_update",
]
