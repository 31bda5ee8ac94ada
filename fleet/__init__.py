"""Fleet simulation and benchmarks: many simulated devices running the real agent code against a
real broker and the real coordinator."""

from fedasync_iot.fleet._broker import (
    SYS_COUNTERS,
    EmbeddedBroker,
    MosquittoBroker,
    free_port,
    mosquitto_path,
    raise_fd_limit,
    start_broker,
)
from fedasync_iot.fleet._clusters import (
    ClusterError,
    NatsCluster,
    RabbitError,
    RabbitNode,
    clear_retained,
    nats_server_path,
    rabbitmq_server_path,
    retained_round_trip,
)
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
from fedasync_iot.fleet._netloop import NetLoop
from fedasync_iot.fleet._sim import (
    Fleet,
    RunResult,
    SimConfig,
    first_reaching,
    local_evaluation,
    run_rule,
)
from fedasync_iot.fleet._traces import (
    DeviceTrace,
    FleetProfile,
    Intervals,
    SimClock,
    generate_fleet,
)
from fedasync_iot.fleet._traffic import KINDS, classify
from fedasync_iot.fleet._worker import WorkerSpec, run_worker

__all__ = [
    "KINDS",
    "SYS_COUNTERS",
    "ClusterError",
    "DeviceEntry",
    "DeviceTrace",
    "EmbeddedBroker",
    "Fleet",
    "FleetFile",
    "FleetFileError",
    "FleetProfile",
    "Intervals",
    "MosquittoBroker",
    "NatsCluster",
    "NetLoop",
    "RabbitError",
    "RabbitNode",
    "RunResult",
    "SimClock",
    "SimConfig",
    "WorkerSpec",
    "build_fleet",
    "classify",
    "clear_retained",
    "export_fleet",
    "first_reaching",
    "free_port",
    "generate_fleet",
    "load_fleet",
    "local_evaluation",
    "mosquitto_path",
    "nats_server_path",
    "parse_fleet_file",
    "rabbitmq_server_path",
    "raise_fd_limit",
    "replay_config",
    "retained_round_trip",
    "run_rule",
    "run_worker",
    "start_broker",
]
