"""Fleet simulation and benchmarks: many simulated devices running the real agent code against a
real broker and the real coordinator."""

from fedasync_iot.fleet._broker import EmbeddedBroker, MosquittoBroker, start_broker
from fedasync_iot.fleet._fleetfile import (
    DeviceEntry,
    FleetFile,
    FleetFileError,
    export_fleet,
    load_fleet,
    parse_fleet_file,
    replay_config,
)
from fedasync_iot.fleet._fleets import build_fleet
from fedasync_iot.fleet._sim import Fleet, RunResult, SimConfig, local_evaluation, run_rule
from fedasync_iot.fleet._traces import (
    DeviceTrace,
    FleetProfile,
    Intervals,
    SimClock,
    generate_fleet,
)

__all__ = [
    "DeviceEntry",
    "DeviceTrace",
    "EmbeddedBroker",
    "Fleet",
    "FleetFile",
    "FleetFileError",
    "FleetProfile",
    "Intervals",
    "MosquittoBroker",
    "RunResult",
    "SimClock",
    "SimConfig",
    "build_fleet",
    "export_fleet",
    "generate_fleet",
    "load_fleet",
    "local_evaluation",
    "parse_fleet_file",
    "replay_config",
    "run_rule",
    "start_broker",
]
