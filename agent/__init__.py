"""The edge agent: trains on local data when the device allows it, sends updates over MQTT,
keeps them until acknowledged, and runs the newest model locally."""

from agent._agent import Agent, Link
from agent._config import AgentConfig, load_config
from agent._data import CallableSource, DataSource, DirectorySource
from agent._policy import Check, Decision, EligibilityGate, PolicyConfig, evaluate, format_decision
from agent._predict import Predictor
from agent._readings import PsutilReader, Readings, ReadingsSource, StaticReader
from agent._spool import Spool
from agent._trainer import TrainConfig

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
    "PsutilReader",
    "Readings",
    "ReadingsSource",
    "Spool",
    "StaticReader",
    "TrainConfig",
    "evaluate",
    "format_decision",
    "load_config",
]
